"""Tests of demo/: the demos and studies."""
