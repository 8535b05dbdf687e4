"""Tests of bench/: the GPU check script (dry run)."""
