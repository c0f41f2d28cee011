"""Training harness: models, optimizers, schedules, the training loop, metrics and plots."""
