"""phoenix-flax: X's Phoenix recommender (ranking and two-tower retrieval) in Flax NNX."""

from phoenix_flax.config import DEFAULT_ACTIONS, ExperimentConfig, ModelConfig
from phoenix_flax.embeddings import HashEmbeddings
from phoenix_flax.hashing import hash_ids
from phoenix_flax.ranker import PhoenixRanker
from phoenix_flax.retrieval import PhoenixRetrieval, top_k

__all__ = [
    "DEFAULT_ACTIONS",
    "ExperimentConfig",
    "HashEmbeddings",
    "ModelConfig",
    "PhoenixRanker",
    "PhoenixRetrieval",
    "hash_ids",
    "top_k",
]
