"""Version of the demo app (read by admin pages to spot stale workers)."""
__all__ = ["VERSION"]

VERSION = "v1"
