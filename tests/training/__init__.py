"""Tests of training/: networks, loss, augmentation, the PFGM++ kernel, dataset, training state, post-hoc EMA, consistency tuning."""
