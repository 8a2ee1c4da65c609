"""Self-Improving Pretraining: candidate selection, losses and the EMA reference."""
