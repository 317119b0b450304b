"""Invertible layers and the multi-scale flows built from them."""
