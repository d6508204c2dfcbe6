"""Serving a trained model: ranking with a cached user context (`ranking.py`) and retrieval from a
corpus index (`index.py`)."""
