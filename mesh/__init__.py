"""mesh-serving: serve thousands of ML models from a few runtime processes."""

__version__ = "0.1.0"
