"""pyinetd: an inetd-style super-server."""

__version__ = "0.1.0"
