"""Training: arguments, parameter groups, HistoTrainer, callbacks, losses, metrics, embedding cache."""
