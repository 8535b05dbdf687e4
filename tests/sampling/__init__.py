"""Tests of sampling/: noise levels, samplers and solvers, guidance, the generation pipeline and runs."""
