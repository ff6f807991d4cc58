"""The paper's measurements as commands (`moma experiment ...`)."""
