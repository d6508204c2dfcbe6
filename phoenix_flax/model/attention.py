"""Attention of the ranker and the user tower: the dense reference and the blockwise form.

The ranker's sequence is `[prefix, candidates]`: the prefix (user and history, P positions)
attends causally; each candidate attends to the whole prefix and to itself, never to another
candidate. That structure is computed as it is, without a `[B, T, T]` mask or score tensor:

- the prefix part is causal attention over the prefix (`prefix_attention`, the one place where
  a fused accelerator kernel can serve: splash attention on TPU supports the soft-capping);
- the candidate part is each candidate's attention over the prefix keys, merged with its own
  key by log-sum-exp (`candidate_attention`).

Both run blockwise with an online softmax (the memory-efficient / flash attention algorithm,
Rabe & Staats 2021, Dao et al. 2022) in pure JAX, on every backend. The backward pass is a
custom VJP that recomputes each block's scores from the saved output and log-sum-exp, so no
tensor grows with the sequence length squared in either pass. `dense_attention` with the full
mask is the reference the parity tests compare against (`attention="dense"`).

Shapes: B batch, P prefix length, C candidates, T = P + C, N key/value heads, G query heads per
key/value head, K head width. Queries are `[B, T, N, G, K]`, keys and values `[B, T, N, K]`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

ATTN_SOFTCAP = 30.0
# A finite stand-in for -inf in attention and the sampled softmax: masked logits keep gradients finite.
MASKED_LOGIT = -1e30


def softcap(logits: jax.Array) -> jax.Array:
    return ATTN_SOFTCAP * jnp.tanh(logits / ATTN_SOFTCAP)


# --- the dense reference -----------------------------------------------------------------------


def causal_mask(valid: jax.Array) -> jax.Array:
    """[B, T] validity -> [B, T, T] bool (True = may attend): earlier or same positions, valid keys."""
    t = valid.shape[1]
    return jnp.tril(jnp.ones((t, t), dtype=bool))[None] & valid[:, None, :]


def ranker_attention_mask(prefix_valid: jax.Array, candidate_valid: jax.Array) -> jax.Array:
    """[B, P] and [B, C] validity -> [B, T, T] bool mask (True = may attend), T = P + C.

    Prefix positions (user and history) attend causally; each candidate attends to the whole
    prefix and to itself only ("candidate isolation"); padded keys are never attended.
    """
    p = prefix_valid.shape[1]
    mask = causal_mask(jnp.concatenate([prefix_valid, candidate_valid], axis=1))  # [B, T, T]
    idx = jnp.arange(mask.shape[1])
    other_candidate = (idx[:, None] >= p) & (idx[None, :] >= p) & (idx[:, None] != idx[None, :])
    return mask & ~other_candidate[None]


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, multiplier: float) -> jax.Array:
    """q [B, Tq, N, G, K], k and v [B, Tk, N, K], mask [B, Tq, Tk] -> [B, Tq, N, G, K]."""
    logits = jnp.einsum("bqngk,bsnk->bngqs", q, k, preferred_element_type=jnp.float32) * multiplier
    logits = jnp.where(mask[:, None, None], softcap(logits), MASKED_LOGIT)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, N, G, Tq, Tk]
    return jnp.einsum("bngqs,bsnk->bqngk", weights, v)


# --- blockwise attention with an online softmax ------------------------------------------------


def _pad(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)  # padded keys are invalid (False); padded queries are dropped


def _blocked(x: jax.Array, size: int) -> jax.Array:
    """[B, T, ...] (T a multiple of size) -> [T / size, B, size, ...]."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // size, size, *x.shape[2:]), 1, 0)


def _block_scores(qi, kj, valid_j, i, j, bq, bk, causal, multiplier):
    """Soft-capped scores of query block i against key block j: (masked [B, N, G, bq, bk] for the
    softmax, and the tanh derivative's factor 1 - tanh^2, for the backward pass)."""
    x = jnp.einsum("bqngk,bsnk->bngqs", qi, kj, preferred_element_type=jnp.float32) * multiplier
    t = jnp.tanh(x / ATTN_SOFTCAP)
    mask = valid_j[:, None, None, None, :]
    if causal:
        q_pos, k_pos = i * bq + jnp.arange(bq), j * bk + jnp.arange(bk)
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    return jnp.where(mask, ATTN_SOFTCAP * t, MASKED_LOGIT), 1.0 - t * t


def _block_size(length: int, largest: int) -> int:
    """The block that tiles `length` in as few blocks of at most `largest` as it can, evenly:
    a prefix of 1 + 256 positions takes two blocks of 129, not two of 256 with one nearly empty."""
    return -(-length // -(-length // largest))


def _key_blocks_seen(i, bq, bk, nk, causal):
    """How many key blocks query block i attends to (all of them unless causal)."""
    return jnp.minimum(nk, ((i + 1) * bq + bk - 1) // bk) if causal else nk


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def flash_attention(q, k, v, key_valid, causal: bool, multiplier: float, block_q: int, block_k: int):
    """Blockwise softmax attention with soft-capped logits and key padding.

    q [B, Tq, N, G, K]; k, v [B, Tk, N, K]; key_valid [B, Tk]. With `causal`, query i sees keys
    j <= i (the queries and keys are the same positions). Returns the output [B, Tq, N, G, K]
    and the log-sum-exp of each query's scores [B, N, G, Tq] (float32), so that a caller can
    merge further keys. Memory is O(block_q * block_k) per step beside the inputs and outputs.
    """
    return _flash_forward(q, k, v, key_valid, causal, multiplier, block_q, block_k)[0]


def _flash_forward(q, k, v, key_valid, causal, multiplier, block_q, block_k):
    b, tq, n, g, kd = q.shape
    tk = k.shape[1]
    bq, bk = _block_size(tq, block_q), _block_size(tk, block_k)
    qb = _blocked(_pad(q, 1, bq), bq)  # [nq, B, bq, N, G, K]
    kb, vb = _blocked(_pad(k, 1, bk), bk), _blocked(_pad(v, 1, bk), bk)  # [nk, B, bk, N, K]
    validb = _blocked(_pad(key_valid, 1, bk), bk)  # [nk, B, bk]
    nq, nk = qb.shape[0], kb.shape[0]

    def query_block(args):
        i, qi = args

        def step(j, carry):
            m, denom, acc = carry
            s, _ = _block_scores(qi, kb[j], validb[j], i, j, bq, bk, causal, multiplier)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bngqs,bsnk->bngqk", p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
            return m_new, denom * correction + p.sum(-1), acc * correction[..., None] + pv

        init = (
            jnp.full((b, n, g, bq), MASKED_LOGIT, jnp.float32),
            jnp.zeros((b, n, g, bq), jnp.float32),
            jnp.zeros((b, n, g, bq, kd), jnp.float32),
        )
        m, denom, acc = jax.lax.fori_loop(0, _key_blocks_seen(i, bq, bk, nk, causal), step, init)
        return (acc / denom[..., None]).astype(q.dtype), m + jnp.log(denom)

    out, lse = jax.lax.map(query_block, (jnp.arange(nq), qb))  # [nq, B, N, G, bq, K], [nq, B, N, G, bq]
    out = jnp.moveaxis(out, 0, 3).reshape(b, n, g, nq * bq, kd)[:, :, :, :tq]
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, n, g, nq * bq)[..., :tq]
    return (jnp.moveaxis(out, 3, 1), lse), (q, k, v, key_valid, jnp.moveaxis(out, 3, 1), lse)


def _flash_fwd(q, k, v, key_valid, causal, multiplier, block_q, block_k):
    return _flash_forward(q, k, v, key_valid, causal, multiplier, block_q, block_k)


def _flash_bwd(causal, multiplier, block_q, block_k, residuals, cotangents):
    q, k, v, key_valid, out, lse = residuals
    d_out, d_lse = cotangents
    b, tq, n, g, kd = q.shape
    tk = k.shape[1]
    bq, bk = _block_size(tq, block_q), _block_size(tk, block_k)
    # dS = P * (dP - D) with D = rowsum(dO * O) - dLSE (the log-sum-exp's own cotangent).
    delta = jnp.einsum("bqngk,bqngk->bngq", d_out.astype(jnp.float32), out.astype(jnp.float32)) - d_lse
    qb, dob = _blocked(_pad(q, 1, bq), bq), _blocked(_pad(d_out, 1, bq), bq)  # [nq, B, bq, N, G, K]
    lseb = jnp.moveaxis(_pad(lse, 3, bq).reshape(b, n, g, -1, bq), 3, 0)  # [nq, B, N, G, bq]
    deltab = jnp.moveaxis(_pad(delta, 3, bq).reshape(b, n, g, -1, bq), 3, 0)
    kb, vb = _blocked(_pad(k, 1, bk), bk), _blocked(_pad(v, 1, bk), bk)
    validb = _blocked(_pad(key_valid, 1, bk), bk)
    nq, nk = qb.shape[0], kb.shape[0]

    def score_grads(i, j):
        """Probabilities and dL/d(raw logits) of query block i against key block j."""
        s, tanh_grad = _block_scores(qb[i], kb[j], validb[j], i, j, bq, bk, causal, multiplier)
        p = jnp.exp(s - lseb[i][..., None])  # [B, N, G, bq, bk]
        dp = jnp.einsum("bqngk,bsnk->bngqs", dob[i], vb[j], preferred_element_type=jnp.float32)
        return p, p * (dp - deltab[i][..., None]) * tanh_grad * multiplier

    def query_grad(i):
        def step(j, dq):
            _, dx = score_grads(i, j)
            return dq + jnp.einsum("bngqs,bsnk->bqngk", dx, kb[j], preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(
            0, _key_blocks_seen(i, bq, bk, nk, causal), step, jnp.zeros((b, bq, n, g, kd), jnp.float32)
        )

    def key_grads(j):
        def step(i, carry):
            dk, dv = carry
            p, dx = score_grads(i, j)
            dv = dv + jnp.einsum("bngqs,bqngk->bsnk", p.astype(v.dtype), dob[i], preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bngqs,bqngk->bsnk", dx, qb[i], preferred_element_type=jnp.float32)
            return dk, dv

        first = (j * bk) // bq if causal else 0  # earlier query blocks never see key block j
        zeros = jnp.zeros((b, bk, n, kd), jnp.float32)
        return jax.lax.fori_loop(first, nq, step, (zeros, zeros))

    dq = jax.lax.map(query_grad, jnp.arange(nq))  # [nq, B, bq, N, G, K]
    dk, dv = jax.lax.map(key_grads, jnp.arange(nk))  # [nk, B, bk, N, K]
    dq = jnp.moveaxis(dq, 0, 1).reshape(b, nq * bq, n, g, kd)[:, :tq]
    dk = jnp.moveaxis(dk, 0, 1).reshape(b, nk * bk, n, kd)[:, :tk]
    dv = jnp.moveaxis(dv, 0, 1).reshape(b, nk * bk, n, kd)[:, :tk]
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# --- the ranker's structure --------------------------------------------------------------------


def prefix_attention(q, k, v, valid, *, multiplier: float, block: int) -> jax.Array:
    """Causal attention of the [user, history] prefix: q [B, P, N, G, K], k and v [B, P, N, K],
    valid [B, P] -> [B, P, N, G, K].

    The place for a fused kernel: this is plain causal attention with key padding and
    soft-capped logits (splash attention on TPU takes `attn_logits_soft_cap`), and nothing else
    of the model depends on how it is computed.
    """
    return flash_attention(q, k, v, valid, True, multiplier, block, block)[0]


def candidate_attention(
    q, prefix_k, prefix_v, prefix_valid, own_k, own_v, own_valid, *, multiplier: float, block: int
) -> jax.Array:
    """Each candidate over the prefix keys and its own key, never another candidate's.

    q [B, C, N, G, K]; prefix_k, prefix_v [B, P, N, K]; prefix_valid [B, P]; own_k, own_v
    [B, C, N, K]; own_valid [B, C] -> [B, C, N, G, K]. The prefix part runs blockwise; its
    log-sum-exp is merged with the candidate's own score, as one softmax over both.
    """
    over_prefix, lse = flash_attention(q, prefix_k, prefix_v, prefix_valid, False, multiplier, block, block)
    own = jnp.einsum("bcngk,bcnk->bngc", q, own_k, preferred_element_type=jnp.float32) * multiplier
    own = jnp.where(own_valid[:, None, None, :], softcap(own), MASKED_LOGIT)  # [B, N, G, C]
    total = jnp.logaddexp(lse, own)
    w_prefix = jnp.moveaxis(jnp.exp(lse - total), 3, 1)[..., None]  # [B, C, N, G, 1]
    w_own = jnp.moveaxis(jnp.exp(own - total), 3, 1)[..., None]
    out = w_prefix * over_prefix.astype(jnp.float32) + w_own * own_v[:, :, :, None, :].astype(jnp.float32)
    return out.astype(q.dtype)


def sequence_attention(q, k, v, prefix_valid, candidate_valid, *, multiplier: float, impl: str, block: int):
    """Attention over `[prefix, candidates]` (candidates may be absent: the user tower).

    q [B, T, N, G, K], k and v [B, T, N, K], prefix_valid [B, P], candidate_valid [B, C] or None.
    """
    if impl == "dense":
        if candidate_valid is None:
            mask = causal_mask(prefix_valid)
        else:
            mask = ranker_attention_mask(prefix_valid, candidate_valid)
        return dense_attention(q, k, v, mask, multiplier)
    p = prefix_valid.shape[1]
    out = prefix_attention(q[:, :p], k[:, :p], v[:, :p], prefix_valid, multiplier=multiplier, block=block)
    if candidate_valid is None:
        return out
    candidates = candidate_attention(
        q[:, p:], k[:, :p], v[:, :p], prefix_valid, k[:, p:], v[:, p:], candidate_valid,
        multiplier=multiplier, block=block,
    )  # fmt: skip
    return jnp.concatenate([out, candidates], axis=1)


def isolated_attention(
    q, context_k, context_v, context_valid, own_k, own_v, *, multiplier: float, impl: str, block: int
):
    """Serving: N items, each over its own cached context and itself. q [N, 1, Hkv, G, K],
    context [N, P, Hkv, K], context_valid [N, P], own_k/own_v [N, 1, Hkv, K] -> [N, 1, Hkv, G, K]."""
    if impl == "dense":
        keys = jnp.concatenate([context_k, own_k.astype(context_k.dtype)], axis=1)
        values = jnp.concatenate([context_v, own_v.astype(context_v.dtype)], axis=1)
        mask = jnp.concatenate([context_valid, jnp.ones_like(context_valid[:, :1])], axis=1)[:, None]
        return dense_attention(q, keys, values, mask, multiplier)
    own_valid = jnp.ones(q.shape[:2], bool)
    return candidate_attention(
        q, context_k, context_v, context_valid, own_k, own_v, own_valid, multiplier=multiplier, block=block
    )
