"""The training loop (`loop.py`): steps, evaluation during training and the post-hoc fit,
checkpoints, metrics, resume and preemption; the workdir's lock (`workdir.py`)."""
