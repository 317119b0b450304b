"""Data: demo crops, batching with resumable state, quantisation."""

from .demo import demo_images
from .loader import TensorBatches, build_datasets
from .quantize import dequantize, postprocess, preprocess, reduce_bits

__all__ = ["demo_images", "TensorBatches", "build_datasets", "dequantize", "postprocess", "preprocess", "reduce_bits"]
