"""localai: an on-device assistant runtime."""

__version__ = "0.1.0"
