"""Training: typed configs and recipes, batching, the trainer, checkpoints and staged training."""
