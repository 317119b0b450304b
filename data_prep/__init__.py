"""Dataset -> webdataset shards (see the data issue)."""
