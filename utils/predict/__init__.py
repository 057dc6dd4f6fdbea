"""What predict.py does besides its loop, one module per mode: folder prediction to CSV and the speed check."""
