"""File formats: network files (pickles, training states, weights-only files), generation manifests, image modes
and the dataset archive helpers."""
