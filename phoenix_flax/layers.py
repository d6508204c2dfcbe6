"""Transformer building blocks of the original Grok-style recommender.

Shapes: B batch, T sequence, D model width, Hq query heads, Hkv key/value heads,
G = Hq // Hkv query heads per key/value head, K head width, F FFN width.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from phoenix_flax.config import ModelConfig

ATTN_SOFTCAP = 30.0
# A finite stand-in for -inf in attention and the sampled softmax: masked logits keep gradients finite.
MASKED_LOGIT = -1e30
RMS_EPS = 1e-5
ROPE_BASE = 10000.0


def param(
    rngs: nnx.Rngs,
    init: nnx.Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter annotated with logical axis names.

    Under a mesh (`jax.set_mesh`) with logical axis rules, the value is created sharded;
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


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T] validity -> [B, T, T] bool (True = may attend): earlier or same positions, valid keys."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


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
        self.query = param(rngs, dense_init, (d, cfg.num_q_heads, k), ("embed", "q_heads", "head_dim"))
        self.key = param(rngs, dense_init, (d, cfg.num_kv_heads, k), ("embed", "kv_heads", "head_dim"))
        self.value = param(rngs, dense_init, (d, cfg.num_kv_heads, k), ("embed", "kv_heads", "head_dim"))
        self.out = param(rngs, dense_init, (cfg.num_q_heads, k, d), ("q_heads", "head_dim", "embed"))

    def keys_values(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, T, D] -> rotated keys and values, each [B, T, Hkv, K]."""
        k = jnp.einsum("btd,dhk->bthk", x, self.key[...].astype(x.dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.value[...].astype(x.dtype))
        return apply_rope(k, positions), v

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D] -> rotated queries [B, T, Hq, K]."""
        q = jnp.einsum("btd,dhk->bthk", x, self.query[...].astype(x.dtype))
        return apply_rope(q, positions)

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q: [B, T, Hq, K], k and v: [B, S, Hkv, K], mask: [B, T, S] (True = may attend) -> [B, T, D]."""
        b, t, hq, kd = q.shape
        q = q.reshape(b, t, self.num_kv_heads, hq // self.num_kv_heads, kd)  # [B, T, Hkv, G, K]
        logits = jnp.einsum("btngk,bsnk->bngts", q, k).astype(jnp.float32) * self.multiplier
        logits = ATTN_SOFTCAP * jnp.tanh(logits / ATTN_SOFTCAP)
        logits = jnp.where(mask[:, None, None], logits, MASKED_LOGIT)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, Hkv, G, T, S]
        out = jnp.einsum("bngts,bsnk->btngk", weights, v).reshape(b, t, hq, kd)
        return jnp.einsum("bthk,hkd->btd", out, self.out[...].astype(out.dtype))


class FeedForward(nnx.Module):
    """Gated GELU: `(gelu(x @ gate) * (x @ up)) @ down`, tanh-approximate GELU."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.emb_size, cfg.ffn_size
        self.gate = param(rngs, dense_init, (d, f), ("embed", "mlp"))
        self.up = param(rngs, dense_init, (d, f), ("embed", "mlp"))
        self.down = param(rngs, dense_init, (f, d), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = jax.nn.gelu(x @ self.gate[...].astype(x.dtype), approximate=True)
        return (gate * (x @ self.up[...].astype(x.dtype))) @ self.down[...].astype(x.dtype)


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

    def __call__(self, h: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        return self.with_keys_values(h, positions, mask)[0]

    def with_keys_values(self, h, positions, mask) -> tuple[jax.Array, jax.Array, jax.Array]:
        """As __call__, also returning this layer's rotated keys and values [B, T, Hkv, K]."""
        x = self.pre_attn_norm(h)
        k, v = self.attn.keys_values(x, positions)
        return self._after_attention(h, self.attn.attend(self.attn.queries(x, positions), k, v, mask)), k, v

    def isolated(self, h, position, context_k, context_v, context_valid) -> jax.Array:
        """Items that each attend to their own cached context and to themselves only.

        h: [N, D]; position: [] rotary position of every item; context_k, context_v:
        [N, P, Hkv, K]; context_valid: [N, P] -> [N, D].
        """
        x = self.pre_attn_norm(h)[:, None]  # [N, 1, D]
        positions = jnp.reshape(position, (1,))
        k, v = self.attn.keys_values(x, positions)
        keys = jnp.concatenate([context_k, k.astype(context_k.dtype)], axis=1)  # [N, P+1, Hkv, K]
        values = jnp.concatenate([context_v, v.astype(context_v.dtype)], axis=1)
        mask = jnp.concatenate([context_valid, jnp.ones_like(context_valid[:, :1])], axis=1)[:, None]
        out = self.attn.attend(self.attn.queries(x, positions), keys, values, mask)
        return self._after_attention(h, out[:, 0])


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    def __call__(self, h: jax.Array, positions: jax.Array, mask: jax.Array) -> jax.Array:
        """h: [B, T, D], positions: [T] or [B, T], mask: [B, T, T] -> [B, T, D]."""
        for layer in self.layers:
            h = layer(h, positions, mask)
        return h

    def with_keys_values(self, h, positions, mask) -> tuple[jax.Array, list[tuple[jax.Array, jax.Array]]]:
        """As __call__, also returning every layer's keys and values."""
        cache = []
        for layer in self.layers:
            h, k, v = layer.with_keys_values(h, positions, mask)
            cache.append((k, v))
        return h, cache

    def isolated(self, h, position, cache, context_valid) -> jax.Array:
        """h: [N, D] items over per-layer cached contexts `cache` ([N, P, Hkv, K] pairs) -> [N, D]."""
        for layer, (k, v) in zip(self.layers, cache, strict=True):
            h = layer.isolated(h, position, k, v, context_valid)
        return h
