"""Ways to fine-tune that keep what the pretrained weights knew, or that fit a small machine."""
