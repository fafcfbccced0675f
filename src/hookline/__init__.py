"""hookline: a self-hosted asynchronous AI gateway."""

__version__ = "0.1.0"
