"""Training: data, optimisation, checkpoints (``glocal train``)."""
