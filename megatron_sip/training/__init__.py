"""Training loops, losses and optimizer set-up."""
