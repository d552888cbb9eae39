"""Version of the heavy app (read by admin pages to spot stale workers)."""
__all__ = ["VERSION"]

VERSION = "h1"
