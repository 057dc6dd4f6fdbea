"""What predict.py does, one module per job: the ask loop, folder prediction to CSV, search and the speed check."""
