"""PyTorch helpers: persistence, distributed plumbing, misc and training statistics."""
