"""Small utilities shared by every part of the project (EDM's ``dnnlib``).

``EasyDict`` is exported here and in :mod:`dnnlib.util` because pickles written
by the original code refer to it under both names.
"""

from .util import EasyDict, make_cache_dir_path  # noqa: F401
