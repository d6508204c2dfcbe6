"""Training, evaluation and demo programs."""
