"""WebDataset shards: build (readers -> tokens -> tars), manifest, inspect."""
