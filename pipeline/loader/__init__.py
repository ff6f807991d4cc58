"""Streaming loader: plans, shard reading, packing streams, the resumable loader."""
