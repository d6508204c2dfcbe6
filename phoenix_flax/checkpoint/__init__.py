"""Orbax checkpoints of a run: saving and the retention policy (`manager.py`), integrity records
(`integrity.py`), what Orbax says that a user need not hear (`orbax_workarounds.py`), and
restoring for resume, evaluation and serving (`restore.py`)."""
