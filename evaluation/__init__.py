"""Evaluation: feature detectors (Inception, DINOv2, the digits classifier) and feature statistics (``features``),
the metrics computed from them (``metrics``: FID and the Frechet distances of other detectors, KID,
precision/recall), and the runs of ``fid.py``'s commands (``runs``)."""
