"""fastlb: an HTTP/1.1 load balancer and reverse proxy."""
from fastlb._version import __version__

__all__ = ["__version__"]
