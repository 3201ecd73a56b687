"""Training: the step loop (no Ray), parallelism applied to an unchanged model, checkpoints, metrics, and the Ray Train edge."""
