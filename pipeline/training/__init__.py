"""Training: DeepSpeed wiring, checkpoints, metrics, the train loop."""
