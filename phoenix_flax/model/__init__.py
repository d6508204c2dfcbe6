"""X's Phoenix, as released: hash embeddings, the transformer, the ranker with isolated candidates,
the two-tower retrieval model, the final score, and the import of the original's parameters.

Nothing here knows of the extensions (phoenix_flax/extensions): the ranker's one seam for them is
`PhoenixRanker.extra_parts` and `probabilities`.
"""
