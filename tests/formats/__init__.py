"""Tests of formats/: weights-only files, image modes and dataset files, file modes of every writer."""
