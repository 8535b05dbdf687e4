"""Tests of dnnlib/ and torch_utils/: utilities, persistence, distributed helpers, training statistics."""
