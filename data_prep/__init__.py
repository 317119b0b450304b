"""Datasets -> webdataset shards + manifest.json; verify shards. ``python -m data_prep --help``
or ``flowscale prep --help``.

    sources.py    each dataset form -> per-split item lists (what the manifest records about them)
    images.py     decoding by content, explicit RGB conversion, center crop, box resize
    tfrecord.py   Glow's tfrecords without TensorFlow
    convert.py    items -> deterministic shards, in parallel and resumable
    verify.py     shards vs manifest: counts, decodability, sizes, sha256
"""
