"""predict.py mode="web": a local page (FastAPI + one static HTML/JS file) for classifying and searching."""
