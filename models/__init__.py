"""Importing this package registers VAN-B0..B6 and the port's names (van_tiny/small/base/large) with timm."""
from . import timm_compat  # noqa: F401 - first: imports timm (quietly, on old timm releases) before van.py uses it
from .van import VAN, VAN_NAMES, checkpoint_filter_fn  # noqa: F401
