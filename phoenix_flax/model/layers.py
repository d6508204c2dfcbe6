"""Transformer building blocks of the original Grok-style recommender.

Shapes: B batch, T sequence, D model width, Hq query heads, Hkv key/value heads,
G = Hq // Hkv query heads per key/value head, K head width, F FFN width, L layers.

A sequence is `[prefix, candidates]`: the prefix (user and history) attends causally; each
candidate attends to the prefix and to itself (see `attention.py`). Layers are a loop or, with
`scan_layers`, one compiled body scanned over parameters stacked on a leading `layers` axis;
`remat` chooses what each layer keeps for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.model.attention import Segments, isolated_attention, sequence_attention
from phoenix_flax.sharding import constrain

RMS_EPS = 1e-5
ROPE_BASE = 10000.0
REMAT_POLICIES = {
    "full": None,  # jax.checkpoint's default: keep nothing but the layer's input
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep the weight matmuls' outputs
}


def param(
    rngs: nnx.Rngs,
    init: nnx.Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter annotated with logical axis names.

    Under a mesh (`sharding.use_mesh`) with logical axis rules, the value is created sharded;
    without one the names are only metadata, so models build on a single device too.
    """
    if len(names) != len(shape):
        raise ValueError(f"shape {tuple(shape)} and axis names {tuple(names)} differ in rank")
    return nnx.Param(
        init(rngs.params(), tuple(shape), jnp.float32),
        out_sharding=tuple(names),
        eager_sharding=not jax.sharding.get_abstract_mesh().empty,
    )


dense_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")


class RMSNorm(nnx.Module):
    """`x * rsqrt(mean(x^2) + eps) * scale`, in float32, returned in the input dtype."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + RMS_EPS)
        return (normed * self.scale[...]).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotary embedding, "rotate half" convention.

    x: [B, T, H, K]; positions: [T] or [B, T].
    """
    k = x.shape[-1]
    inv_freq = 1.0 / ROPE_BASE ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)  # [K/2]
    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [(B,) T, K/2]
    phase = jnp.concatenate([phase, phase], axis=-1)[..., None, :]  # [(B,) T, 1, K]
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention with rotary embeddings and soft-capped logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, k = cfg.emb_size, cfg.key_size
        self.num_kv_heads = cfg.num_kv_heads
        self.multiplier = cfg.attn_output_multiplier
        self.impl, self.block = cfg.attention, cfg.attention_block
        self.query = param(rngs, dense_init, (d, cfg.num_q_heads, k), ("embed", "q_heads", "head_dim"))
        self.key = param(rngs, dense_init, (d, cfg.num_kv_heads, k), ("embed", "kv_heads", "head_dim"))
        self.value = param(rngs, dense_init, (d, cfg.num_kv_heads, k), ("embed", "kv_heads", "head_dim"))
        self.out = param(rngs, dense_init, (cfg.num_q_heads, k, d), ("q_heads", "head_dim", "embed"))

    def keys_values(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, D] -> rotated keys and values, each [B, T, Hkv, K]."""
        k = jnp.einsum("btd,dhk->bthk", x, self.key[...].astype(x.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.value[...].astype(x.dtype))
        k = constrain(apply_rope(k, positions), "batch", "length", "act_kv_heads", None)
        return k, constrain(v, "batch", "length", "act_kv_heads", None)

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D] -> rotated queries grouped by key/value head [B, T, Hkv, G, K]."""
        q = apply_rope(jnp.einsum("btd,dhk->bthk", x, self.query[...].astype(x.dtype)), positions)
        b, t, hq, kd = q.shape
        return constrain(
            q.reshape(b, t, self.num_kv_heads, hq // self.num_kv_heads, kd),
            "batch",
            "length",
            "act_kv_heads",
            None,
            None,
        )

    def project(self, out: jax.Array) -> jax.Array:
        """[B, T, Hkv, G, K] -> [B, T, D]."""
        b, t = out.shape[:2]
        return jnp.einsum("bthk,hkd->btd", out.reshape(b, t, -1, out.shape[-1]), self.out[...].astype(out.dtype))

    def __call__(
        self, x, positions, prefix_valid, candidate_valid, segments: Segments | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attention over a `[prefix, candidates]` sequence x [B, T, D] -> ([B, T, D], keys, values);
        `segments`: a packed batch's sessions."""
        k, v = self.keys_values(x, positions)
        out = sequence_attention(
            self.queries(x, positions), k, v, prefix_valid, candidate_valid,
            multiplier=self.multiplier, impl=self.impl, block=self.block, segments=segments,
        )  # fmt: skip
        return self.project(out), k, v

    def isolated(self, x, position, context_k, context_v, context_valid) -> jax.Array:
        """Items x [N, 1, D], each over its own cached context [N, P, Hkv, K] and itself -> [N, 1, D]."""
        positions = jnp.reshape(position, (1,))
        k, v = self.keys_values(x, positions)
        out = isolated_attention(
            self.queries(x, positions), context_k, context_v, context_valid, k, v,
            multiplier=self.multiplier, impl=self.impl, block=self.block,
        )  # fmt: skip
        return self.project(out)


class FeedForward(nnx.Module):
    """Gated GELU: `(gelu(x @ gate) * (x @ up)) @ down`, tanh-approximate GELU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.emb_size, cfg.ffn_size
        self.gate = param(rngs, dense_init, (d, f), ("embed", "mlp"))
        self.up = param(rngs, dense_init, (d, f), ("embed", "mlp"))
        self.down = param(rngs, dense_init, (f, d), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.gelu(x @ self.gate[...].astype(x.dtype), approximate=True)
        hidden = constrain(gate * (x @ self.up[...].astype(x.dtype)), "batch", "length", "act_mlp")
        return hidden @ self.down[...].astype(x.dtype)


class DecoderLayer(nnx.Module):
    """`h += post_norm(attn(pre_norm(h)))`, then the same around the FFN."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d = cfg.emb_size
        self.pre_attn_norm = RMSNorm(d, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(d, rngs=rngs)
        self.pre_ffn_norm = RMSNorm(d, rngs=rngs)
        self.ffn = FeedForward(cfg, rngs=rngs)
        self.post_ffn_norm = RMSNorm(d, rngs=rngs)

    def _after_attention(self, h: jax.Array, attn_out: jax.Array) -> jax.Array:
        h = h + self.post_attn_norm(attn_out)
        return h + self.post_ffn_norm(self.ffn(self.pre_ffn_norm(h)))

    def __call__(
        self, h, positions, prefix_valid, candidate_valid, segments=None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h [B, T, D] -> (h [B, T, D], this layer's rotated keys and values [B, T, Hkv, K])."""
        attn_out, k, v = self.attn(self.pre_attn_norm(h), positions, prefix_valid, candidate_valid, segments)
        return self._after_attention(h, attn_out), k, v

    def isolated(self, h, position, context_k, context_v, context_valid) -> jax.Array:
        """Items h [N, D] that each attend to their own cached context and to themselves only."""
        x = self.pre_attn_norm(h)[:, None]  # [N, 1, D]
        attn_out = self.attn.isolated(x, position, context_k, context_v, context_valid)
        return self._after_attention(h, attn_out[:, 0])


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.scan = cfg.scan_layers
        self.remat = cfg.remat
        if cfg.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs: nnx.Rngs) -> DecoderLayer:
                return DecoderLayer(cfg, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def _run(self, body: Callable, h: jax.Array, per_layer=None):
        """`h, y_l = body(layer_l, h, per_layer[l])` for every layer in order -> (h, ys stacked [L, ...]).

        One scanned body over the stacked layers, or a loop; either way under the remat policy.
        """
        if self.remat != "none":
            body = nnx.remat(body, policy=REMAT_POLICIES[self.remat])
        if self.scan:
            return nnx.scan(body, in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))(self.layers, h, per_layer)
        ys = []
        for i, layer in enumerate(self.layers):
            h, y = body(layer, h, jax.tree.map(lambda x, i=i: x[i], per_layer))
            ys.append(y)
        return h, jax.tree.map(lambda *y: jnp.stack(y), *ys)

    def __call__(
        self, h, positions, prefix_valid, candidate_valid=None, *, keys_values: bool = False, segments=None
    ):  # fmt: skip
        """h [B, T, D] over `[prefix, candidates]` (no candidates: the prefix alone) -> [B, T, D];
        positions [T] or [B, T]; `segments`: a packed batch's sessions (`attention.Segments`).

        With `keys_values`, also every layer's keys and values, stacked: ([L, B, T, Hkv, K]) x 2.
        """

        def layer_fn(layer, h, _):
            h = constrain(h, "batch", "length", "act_embed")
            h, k, v = layer(h, positions, prefix_valid, candidate_valid, segments)
            return constrain(h, "batch", "length", "act_embed"), (k, v) if keys_values else None

        h, kv = self._run(layer_fn, h)
        return (h, kv) if keys_values else h

    def isolated(self, h, position, context_k, context_v, context_valid) -> jax.Array:
        """Items h [N, D] over per-layer cached contexts context_k/v [L, N, P, Hkv, K] -> [N, D]."""

        def layer_fn(layer, h, kv):
            h = layer.isolated(constrain(h, "batch", "act_embed"), position, *kv, context_valid)
            return h, None

        return self._run(layer_fn, h, (context_k, context_v))[0]
