"""flowscale: deep multi-scale normalizing flows trained at scale."""

__version__ = "0.1.0"
