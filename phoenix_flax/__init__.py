"""phoenix-flax: X's Phoenix recommender (ranking and two-tower retrieval) in Flax NNX."""

from phoenix_flax.config import DEFAULT_ACTIONS, ExperimentConfig, ModelConfig
from phoenix_flax.data.hashing import hash_ids
from phoenix_flax.model.embeddings import HashEmbeddings
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.retrieval import PhoenixRetrieval, top_k

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
