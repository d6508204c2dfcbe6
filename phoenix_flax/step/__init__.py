"""One training step: the model a config trains (`model.py`), its losses (`losses.py`), the
optimizer (`optimizer.py`), the jitted train and eval steps and the sharded train state
(`step.py`), and the step compiled ahead of time for planning (`plan.py`)."""
