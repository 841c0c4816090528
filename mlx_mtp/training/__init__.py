"""Training an adapter: data, losses and the training loop."""
