"""Networks, losses, the PFGM++ kernel, samplers, augmentation, datasets and the training loop."""
