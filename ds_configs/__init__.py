"""DeepSpeed JSON presets (see README.md here); loaded by moma.pipeline.training.ds_config."""
