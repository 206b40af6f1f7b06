"""Training: the pure jitted step, the one loop around it, losses, optimizers, metric writers
and the figures of a run."""
