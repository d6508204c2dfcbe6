"""Evaluating a checkpoint (`evaluate.py`): per-action metrics (`metrics.py`) beside popularity and
oracle baselines, retrieval recall, next-item ranking, and the pictures (`plots.py`). Reads only."""
