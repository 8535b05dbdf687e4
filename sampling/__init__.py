"""Sampling: noise levels, the EDM and ablation samplers, the fast solvers, guidance, weight quantization, the
exact denoiser, and the seeds -> images pipeline that generate.py and fid.py gen share."""
