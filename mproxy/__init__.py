"""
mproxy: a small HTTP(S) reverse proxy that makes web-app deploys zero-downtime.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
