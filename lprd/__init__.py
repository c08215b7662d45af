"""lprd: a license plate recognition daemon for edge devices."""

__version__ = "0.1.0"
