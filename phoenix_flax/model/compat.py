"""Import of the original (Haiku) Phoenix parameters into the NNX models.

`params` maps the original's parameter names (e.g. `transformer/decoder_layer_0/linear/w`,
`phoenix_model/proj_mat_1`) to arrays; `reference_config` is the original's shape dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.model.layers import Transformer
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.retrieval import PhoenixRetrieval

REFERENCE_CONFIG_KEYS = (
    "emb_size",
    "key_size",
    "num_q_heads",
    "num_kv_heads",
    "num_layers",
    "widening_factor",
    "attn_output_multiplier",
    "num_actions",
    "history_seq_len",
    "candidate_seq_len",
    "num_user_hashes",
    "num_item_hashes",
    "num_author_hashes",
    "product_surface_vocab_size",
)

# Where each original parameter lives: (variable, the original's shape, which is ours with the
# head axes merged, and the layer's index along a stacked `layers` axis, or None).
ParamMap = dict[str, tuple[nnx.Param, tuple[int, ...], int | None]]


def config_from_reference(reference_config: Mapping, **options) -> ModelConfig:
    """The original's shape dict -> a ModelConfig with its numerics ("sequential" positions,
    float32); the architecture is the default's. `options` set the others (attention,
    scan_layers, remat)."""
    missing = [k for k in REFERENCE_CONFIG_KEYS if k not in reference_config]
    if missing:
        raise ValueError(f"reference_config lacks {missing}")
    rc = reference_config
    return ModelConfig(
        emb_size=int(rc["emb_size"]),
        key_size=int(rc["key_size"]),
        num_q_heads=int(rc["num_q_heads"]),
        num_kv_heads=int(rc["num_kv_heads"]),
        num_layers=int(rc["num_layers"]),
        widening_factor=float(rc["widening_factor"]),
        attn_output_multiplier=float(rc["attn_output_multiplier"]),
        actions=tuple(f"action_{i}" for i in range(int(rc["num_actions"]))),
        history_len=int(rc["history_seq_len"]),
        num_candidates=int(rc["candidate_seq_len"]),
        num_user_hashes=int(rc["num_user_hashes"]),
        num_post_hashes=int(rc["num_item_hashes"]),
        num_author_hashes=int(rc["num_author_hashes"]),
        product_surface_vocab_size=int(rc["product_surface_vocab_size"]),
        candidate_positions="sequential",
        dtype="float32",
        **options,
    )


def _same(var: nnx.Param, layer: int | None = None) -> tuple[nnx.Param, tuple[int, ...], int | None]:
    shape = tuple(var.shape)
    return var, shape if layer is None else shape[1:], layer


def _merge(var: nnx.Param, axes: slice, layer: int | None = None) -> tuple[nnx.Param, tuple[int, ...], int | None]:
    """The original stores heads flattened: merge `axes` of our (per-layer) shape into one."""
    _, shape, _ = _same(var, layer)
    shape = list(shape)
    shape[axes] = [math.prod(shape[axes])]
    return var, tuple(shape), layer


def _transformer_map(transformer: Transformer, num_layers: int) -> ParamMap:
    out: ParamMap = {}
    for i in range(num_layers):
        # Scanned layers share one module whose parameters stack the layers on axis 0.
        layer, index = (transformer.layers, i) if transformer.scan else (transformer.layers[i], None)
        p = f"transformer/decoder_layer_{i}/"
        attn = layer.attn
        out[p + "multi_head_attention/query/w"] = _merge(attn.query, slice(1, 3), index)
        out[p + "multi_head_attention/key/w"] = _merge(attn.key, slice(1, 3), index)
        out[p + "multi_head_attention/value/w"] = _merge(attn.value, slice(1, 3), index)
        out[p + "multi_head_attention/linear/w"] = _merge(attn.out, slice(0, 2), index)
        out[p + "linear/w"] = _same(layer.ffn.gate, index)
        out[p + "linear_v/w"] = _same(layer.ffn.up, index)
        out[p + "linear_1/w"] = _same(layer.ffn.down, index)
        out[p + "rms_norm/scale"] = _same(layer.pre_attn_norm.scale, index)
        out[p + "rms_norm_1/scale"] = _same(layer.post_attn_norm.scale, index)
        out[p + "rms_norm_2/scale"] = _same(layer.pre_ffn_norm.scale, index)
        out[p + "rms_norm_3/scale"] = _same(layer.post_ffn_norm.scale, index)
    return out


def _blocks_map(prefix: str, model: PhoenixRanker | PhoenixRetrieval) -> ParamMap:
    return {
        prefix + "proj_mat_1": _same(model.blocks.user_proj),
        prefix + "proj_mat_3": _same(model.blocks.history_proj),
        prefix + "action_projection": _same(model.blocks.action_proj),
        prefix + "product_surface_embedding_table": _same(model.blocks.surface_table),
    }


def _load(kind: str, params: Mapping[str, np.ndarray], targets: ParamMap) -> None:
    missing = sorted(set(targets) - set(params))
    extra = sorted(set(params) - set(targets))
    misshaped = [
        f"{name}: got {tuple(np.shape(params[name]))}, expected {shape}"
        for name, (_, shape, _) in targets.items()
        if name in params and tuple(np.shape(params[name])) != shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if misshaped:
        problems.append("mis-shaped " + "; ".join(misshaped))
    if problems:
        raise ValueError(f"{kind} parameters do not fit the model: " + " | ".join(problems))
    for name, (var, _, layer) in targets.items():
        if layer is None:
            var[...] = np.asarray(params[name], np.float32).reshape(var.shape)
        else:
            var[...] = var[...].at[layer].set(np.asarray(params[name], np.float32).reshape(var.shape[1:]))


def ranker_from_reference(
    params: Mapping[str, np.ndarray], reference_config: Mapping, *, seed: int = 0, **options
) -> PhoenixRanker:
    """The original ranker's parameters -> a PhoenixRanker computing what it computed.

    The hash tables are not part of the original's parameters; they are freshly initialised
    from `seed`. `options` are ModelConfig fields beyond the shapes (attention, scan_layers, remat).
    """
    cfg = config_from_reference(reference_config, **options)
    model = PhoenixRanker(cfg, rngs=nnx.Rngs(seed))
    prefix = "phoenix_model/"
    targets = {
        **_blocks_map(prefix, model),
        prefix + "proj_mat_2": _same(model.candidate_proj),
        prefix + "unembeddings": _same(model.unembed),
        prefix + "rms_norm/scale": _same(model.final_norm.scale),
        **_transformer_map(model.transformer, cfg.num_layers),
    }
    _load("ranker", params, targets)
    return model


def retrieval_from_reference(
    params: Mapping[str, np.ndarray], reference_config: Mapping, *, seed: int = 0, **options
) -> PhoenixRetrieval:
    """The original two-tower model's parameters -> a PhoenixRetrieval (hash tables from `seed`)."""
    cfg = config_from_reference(reference_config, **options)
    model = PhoenixRetrieval(cfg, rngs=nnx.Rngs(seed))
    prefix = "phoenix_retrieval_model/"
    tower = prefix + "~build_candidate_representation/candidate_tower/"
    targets = {
        **_blocks_map(prefix, model),
        tower + "candidate_tower_projection_1": _same(model.candidate_tower.proj_1),
        tower + "candidate_tower_projection_2": _same(model.candidate_tower.proj_2),
        **_transformer_map(model.transformer, cfg.num_layers),
    }
    _load("retrieval", params, targets)
    return model
