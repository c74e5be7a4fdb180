"""Training a run: the loop, checkpoints and resume, the run folder, signals, logs, evaluation."""
