"""moma.pipeline: everything after tokens — corpus readers, shards, loader, model, training, CLI."""
