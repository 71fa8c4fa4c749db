"""Importing this package registers VAN-B0..B6 and the port's names (van_tiny/small/base/large) with timm."""
from .van import VAN, VAN_NAMES, checkpoint_filter_fn, clean_state_dict  # noqa: F401
