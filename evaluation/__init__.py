"""Evaluation: feature detectors (Inception, DINOv2, the digits classifier), feature statistics and the metrics
computed from them (FID, FD-DINOv2, KID, precision/recall)."""
