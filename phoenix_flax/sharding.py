"""Logical axis names of the model's parameters and their mapping to mesh axes.

Mesh axes: `data` (pure data parallel), `fsdp` (data parallel with parameters and optimizer
state sharded), `model` (tensor parallel). Every logical name the model uses appears here;
None means replicated.
"""

from __future__ import annotations

LogicalRules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),  # activations and inputs
    ("vocab", ("model", "fsdp")),  # hash-table rows
    ("table_embed", None),
    ("embed", "fsdp"),  # the model width of dense weights
    ("proj_in", None),  # concatenated inputs of the input projections
    ("mlp", "model"),
    ("q_heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("actions", None),
    ("surfaces", None),
    ("norm", None),
)
