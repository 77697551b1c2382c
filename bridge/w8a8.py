"""Former location of `bridge.export.w8a8` (kept so existing imports work)."""
from bridge.export.w8a8 import *  # noqa: F401,F403
from bridge.export.w8a8 import W8A8Error, W8A8OverflowWarning, check_exportable, integer_bias, integer_forward  # noqa: F401
