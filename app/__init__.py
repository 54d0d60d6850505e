"""Visual product search service."""

__version__ = "0.1.0"
