"""Tests of evaluation/: metrics, paired comparisons, the digits classifier."""
