"""Data: shards (format, manifest), the streaming loader, demo crops, quantisation.

    shards.py    the tar/manifest format, written by data_prep and read by the loader
    loader.py    build_train_loader (per rank, exact state_dict), eval_split / iter_eval_batches
    demo.py      the demo photos as crops, built into cached shards on first use
    quantize.py  n-bit reduction and dequantisation
"""

from .demo import build_datasets, demo_images, demo_shards
from .loader import (EvalSplit, ShardLoader, TensorSplit, build_train_loader, eval_split, first_images,
                     iter_eval_batches, load_split)
from .quantize import dequantize, postprocess, preprocess, reduce_bits
from .shards import DataError, Manifest

__all__ = ["build_datasets", "demo_images", "demo_shards", "EvalSplit", "ShardLoader", "TensorSplit",
           "build_train_loader", "eval_split", "first_images", "iter_eval_batches", "load_split", "dequantize",
           "postprocess", "preprocess", "reduce_bits", "DataError", "Manifest"]
