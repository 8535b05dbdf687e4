"""Tests of The command-line scripts end to end: train.py, generate.py, fid.py, dataset_tool.py, on one and two nodes."""
