"""Data: shards -> split -> per-worker order -> checked reading -> batches; demo crops, quantisation.

    manifest.py    what a split holds (counts, sizes, hashes, keys); DataError
    codec.py       one sample's tar members: png/npy pixels, .cls label
    tar.py         deterministic tar writing, the checked USTAR reader, write_shards
    splits.py      manifest + shard URLs of a split, checked against the config
    order.py       which samples a worker reads in an epoch, and in what order (no data read)
    reader.py      a shard cursor held to its manifest, sample decoding, the bad-data policy, batch stacking
    loader.py      build_train_loader: per-rank batches with an exact state_dict
    evaluation.py  eval_split / iter_eval_batches: a split read once across ranks; TensorSplit
    demo.py        the demo photos as crops, built into cached shards on first use
    quantize.py    n-bit reduction and dequantisation
    attributes.py  per-sample binary attributes (<key>.attr) streamed for the latent tools
"""

from .demo import build_datasets, demo_images, demo_shards
from .evaluation import EvalSplit, TensorSplit, eval_split, first_images, iter_eval_batches
from .loader import ShardLoader, build_train_loader
from .manifest import DataError, Manifest
from .quantize import dequantize, postprocess, preprocess, reduce_bits
from .splits import load_split

__all__ = ["build_datasets", "demo_images", "demo_shards", "EvalSplit", "ShardLoader", "TensorSplit",
           "build_train_loader", "eval_split", "first_images", "iter_eval_batches", "load_split", "dequantize",
           "postprocess", "preprocess", "reduce_bits", "DataError", "Manifest"]
