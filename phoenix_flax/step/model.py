"""What a run trains: hash tables shared by the ranker and the retrieval model."""

from __future__ import annotations

from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.extensions import build_ranker
from phoenix_flax.model.embeddings import HashEmbeddings
from phoenix_flax.model.retrieval import PhoenixRetrieval
from phoenix_flax.step.losses import FrequencyEstimator


class PhoenixModel(nnx.Module):
    """The ranker and/or the retrieval model over one set of hash tables.

    `frequency` (streaming item frequencies for the logQ correction) is present when the
    retrieval model is trained with estimated logQ; `exposure_frequency` (the shown authors'
    frequencies) when the exposure softmax (an extension) is. The ranker is the original's, or an
    `ExtendedRanker` where the config turns an extension on (`extensions.build_ranker`).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        ranker: bool = True,
        retrieval: bool = True,
        frequency_buckets: int | None = None,
        frequency_alpha: float = 0.01,
        exposure_frequency_buckets: int | None = None,
    ):
        if not (ranker or retrieval):
            raise ValueError("a PhoenixModel needs the ranker, the retrieval model or both")
        self.embeddings = HashEmbeddings(cfg, rngs=rngs)
        self.ranker = build_ranker(cfg, rngs=rngs, embeddings=self.embeddings) if ranker else None
        self.retrieval = PhoenixRetrieval(cfg, rngs=rngs, embeddings=self.embeddings) if retrieval else None
        self.frequency = (
            FrequencyEstimator(frequency_buckets, frequency_alpha) if retrieval and frequency_buckets else None
        )
        self.exposure_frequency = (
            FrequencyEstimator(exposure_frequency_buckets, frequency_alpha)
            if ranker and exposure_frequency_buckets
            else None
        )
