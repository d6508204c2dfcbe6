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

Packed rows (`Segments`: several sessions a row, `data.pack_prefix`) add one rule: a position
attends within its own session. The blockwise form then visits, row by row, only the blocks
that hold the query's session, so a row's cost is its sessions' own, not the row's length squared.

Shapes: B batch, P prefix length, C candidates, T = P + C, N key/value heads, G query heads per
key/value head, K head width. Queries are `[B, T, N, G, K]`, keys and values `[B, T, N, K]`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from phoenix_flax.sharding import mesh_axes

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


def ranker_attention_mask(prefix_valid: jax.Array, candidate_valid: jax.Array | None, segments=None) -> jax.Array:
    """[B, P] and [B, C] validity -> [B, T, T] bool mask (True = may attend), T = P + C.

    Prefix positions (user and history) attend causally; each candidate attends to the whole
    prefix and to itself only ("candidate isolation"); padded keys are never attended. No
    candidates (None): the prefix's causal mask. `segments` (packed rows, `Segments`): a
    position attends within its own session only.
    """
    p = prefix_valid.shape[1]
    valid = prefix_valid if candidate_valid is None else jnp.concatenate([prefix_valid, candidate_valid], axis=1)
    mask = causal_mask(valid)  # [B, T, T]
    idx = jnp.arange(mask.shape[1])
    other_candidate = (idx[:, None] >= p) & (idx[None, :] >= p) & (idx[:, None] != idx[None, :])
    mask = mask & ~other_candidate[None]
    if segments is not None:
        seg = segments.prefix if candidate_valid is None else jnp.concatenate([segments.prefix, segments.candidates], 1)
        mask = mask & (seg[:, :, None] == seg[:, None, :])
    return mask


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
    return jnp.pad(x, widths)  # padded keys are in segment 0 (none); padded queries are dropped


def _blocked(x: jax.Array, groups: int, size: int) -> jax.Array:
    """[B, T, ...] (T a multiple of size) -> [groups, T / size, B / groups, size, ...]."""
    b, t = x.shape[:2]
    return jnp.swapaxes(x.reshape(groups, b // groups, t // size, size, *x.shape[2:]), 1, 2)


def _unblocked(x: jax.Array, length: int) -> jax.Array:
    """[groups, blocks, r, size, ...] -> [groups * r, length, ...] (the padding cut)."""
    g, n, r, size = x.shape[:4]
    return jnp.swapaxes(x, 1, 2).reshape(g * r, n * size, *x.shape[4:])[:, :length]


def _block_scores(qi, kj, q_seg, k_seg, i, j, bq, bk, causal, multiplier):
    """Soft-capped scores of query block i against key block j: (masked [b, N, G, bq, bk] for the
    softmax, and the tanh derivative's factor 1 - tanh^2, for the backward pass). A query sees a
    key of its own segment (segment 0: padding, seen by none), and with `causal` not a later one."""
    x = jnp.einsum("bqngk,bsnk->bngqs", qi, kj, preferred_element_type=jnp.float32) * multiplier
    t = jnp.tanh(x / ATTN_SOFTCAP)
    mask = (k_seg != 0)[:, None, :]  # [b, 1, bk]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])  # [b, bq, bk]
    if causal:
        q_pos, k_pos = i * bq + jnp.arange(bq), j * bk + jnp.arange(bk)
        mask = mask & (q_pos[:, None] >= k_pos[None, :])
    return jnp.where(mask[:, None, None], ATTN_SOFTCAP * t, MASKED_LOGIT), 1.0 - t * t


def _block_size(length: int, largest: int) -> int:
    """The block that tiles `length` in as few blocks of at most `largest` as it can, evenly:
    a prefix of 1 + 256 positions takes two blocks of 129, not two of 256 with one nearly empty."""
    return -(-length // -(-length // largest))


def _spans(segment: jax.Array, ids: int) -> tuple[jax.Array, jax.Array]:
    """segment [B, T] -> (first, end) [B, ids]: where each segment id starts in each row, and one
    past where it ends (first = T, end = 0 for an id absent)."""
    b, t = segment.shape
    rows = jnp.arange(b)[:, None]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    first = jnp.full((b, ids), t, jnp.int32).at[rows, segment].min(pos)
    end = jnp.zeros((b, ids), jnp.int32).at[rows, segment].max(pos + 1)
    return first, end


def _other_side(segment: jax.Array, size: int, first: jax.Array, end: jax.Array, groups: int):
    """-> [lo, hi) [groups, n]: for each block of `size` positions of `segment [B, T]`, the
    positions of the other side (keys for a query block, queries for a key block) in the segments
    of the block's non-padding positions, from their spans on that side (`_spans`), over the rows
    of each group. Segments run in order along a row, so the span of a row's lowest to its
    highest covers them; an all-padding block sees none."""
    blocked = _blocked(_pad(segment, 1, size), segment.shape[0], size)[:, :, 0]  # [B, n, size]
    valid = blocked > 0
    lowest = jnp.min(jnp.where(valid, blocked, jnp.iinfo(jnp.int32).max), axis=2)  # [B, n]
    highest = jnp.max(jnp.where(valid, blocked, 0), axis=2)
    seen = highest > 0
    lo = jnp.where(seen, jnp.take_along_axis(first, jnp.where(seen, lowest, 0), axis=1), jnp.iinfo(jnp.int32).max)
    hi = jnp.where(seen, jnp.take_along_axis(end, highest, axis=1), 0)
    lo = jnp.min(lo.reshape(groups, -1, lo.shape[1]), axis=1)  # [groups, n]
    hi = jnp.max(hi.reshape(groups, -1, hi.shape[1]), axis=1)
    return jnp.where(hi > 0, lo, 0), hi


def _ceil_div(x, y):
    return (x + y - 1) // y


class _Blocks(NamedTuple):
    """What both passes tile: queries, keys and values and their segments in blocks, and for each
    query block the key blocks it sees, for each key block the query blocks that see it."""

    qb: jax.Array  # [groups, nq, r, bq, N, G, K]
    kb: jax.Array  # [groups, nk, r, bk, N, K]
    vb: jax.Array
    q_seg: jax.Array | None  # [groups, nq, r, bq]; None: every query in one segment
    k_seg: jax.Array  # [groups, nk, r, bk]
    key_range: tuple[jax.Array, jax.Array]  # [groups, nq] each: key blocks [lo, hi)
    query_range: tuple[jax.Array, jax.Array]  # [groups, nk] each: query blocks [lo, hi)
    bq: int
    bk: int


def _tile(q, k, v, q_segment, k_segment, causal, block_q, block_k, per_row) -> _Blocks:
    b, tq = q.shape[:2]
    tk = k.shape[1]
    groups = b if per_row else 1
    bq, bk = _block_size(tq, block_q), _block_size(tk, block_k)
    q_seg = None if q_segment is None else _blocked(_pad(q_segment, 1, bq), groups, bq)
    k_seg = _blocked(_pad(k_segment, 1, bk), groups, bk)
    nq, nk = _ceil_div(tq, bq), k_seg.shape[1]
    if q_segment is None:  # one segment: every block of keys for every block of queries
        key_lo, key_hi = jnp.zeros((groups, nq), jnp.int32), jnp.full((groups, nq), nk, jnp.int32)
        query_lo, query_hi = jnp.zeros((groups, nk), jnp.int32), jnp.full((groups, nk), nq, jnp.int32)
    else:
        ids = max(tq, tk) + 1
        k_lo, k_hi = _other_side(q_segment, bq, *_spans(k_segment, ids), groups)  # key positions, per query block
        q_lo, q_hi = _other_side(k_segment, bk, *_spans(q_segment, ids), groups)  # query positions, per key block
        key_lo, key_hi = k_lo // bk, _ceil_div(k_hi, bk)
        query_lo, query_hi = q_lo // bq, _ceil_div(q_hi, bq)
    if causal:  # queries and keys are the same positions: query block i sees keys up to its end
        key_hi = jnp.minimum(key_hi, _ceil_div((jnp.arange(nq) + 1) * bq, bk))
        query_lo = jnp.maximum(query_lo, (jnp.arange(nk) * bk) // bq)
    return _Blocks(
        _blocked(_pad(q, 1, bq), groups, bq),
        _blocked(_pad(k, 1, bk), groups, bk),
        _blocked(_pad(v, 1, bk), groups, bk),
        q_seg,
        k_seg,
        (key_lo, jnp.maximum(key_lo, key_hi)),
        (query_lo, jnp.maximum(query_lo, query_hi)),
        bq,
        bk,
    )


def _each_block(fn, n: int, groups: int, *per_block):
    """`fn(group, block, *per_block[group, block])` for every block of every group, one at a time:
    results stacked [groups, n, ...]."""
    index = jnp.arange(groups * n)
    flat = [x.reshape(groups * n, *x.shape[2:]) for x in per_block]
    out = jax.lax.map(lambda a: fn(a[0] // n, a[0] % n, *a[1:]), (index, *flat))
    return jax.tree.map(lambda x: x.reshape(groups, n, *x.shape[1:]), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def flash_attention(
    q, k, v, q_segment, k_segment, causal: bool, multiplier: float, block_q: int, block_k: int, per_row: bool
):
    """Blockwise softmax attention with soft-capped logits and segments.

    q [B, Tq, N, G, K]; k, v [B, Tk, N, K]; q_segment [B, Tq] and k_segment [B, Tk] int: a query
    sees the keys of its own segment, and segment 0 is padding, seen by none. q_segment None:
    every query sees every key not in segment 0 (plain key padding, the keys' validity). With `causal`, query i
    sees keys j <= i (the queries and keys are the same positions). Each query block visits only
    the key blocks its segments reach (segments run in order along a row), over the whole batch
    or, `per_row`, each row on its own: packed rows (many sessions a row) skip the blocks of the
    other sessions. Returns the output [B, Tq, N, G, K] and the log-sum-exp of each query's
    scores [B, N, G, Tq] (float32), so that a caller can merge further keys. Memory is
    O(block_q * block_k) per step beside the inputs and outputs.
    """
    return _flash_forward(q, k, v, q_segment, k_segment, causal, multiplier, block_q, block_k, per_row)[0]


def _flash_forward(q, k, v, q_segment, k_segment, causal, multiplier, block_q, block_k, per_row):
    tq, n, g, kd = q.shape[1:]
    t = _tile(q, k, v, q_segment, k_segment, causal, block_q, block_k, per_row)
    groups, nq, r = t.qb.shape[:3]

    def query_block(group, i, qi, lo, hi):
        q_seg = None if t.q_seg is None else t.q_seg[group, i]

        def step(j, carry):
            m, denom, acc = carry
            s, _ = _block_scores(qi, t.kb[group, j], q_seg, t.k_seg[group, j], i, j, t.bq, t.bk, causal, multiplier)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            pv = jnp.einsum("bngqs,bsnk->bngqk", p.astype(v.dtype), t.vb[group, j], preferred_element_type=jnp.float32)
            return m_new, denom * correction + p.sum(-1), acc * correction[..., None] + pv

        init = (
            jnp.full((r, n, g, t.bq), MASKED_LOGIT, jnp.float32),
            jnp.zeros((r, n, g, t.bq), jnp.float32),
            jnp.zeros((r, n, g, t.bq, kd), jnp.float32),
        )
        m, denom, acc = jax.lax.fori_loop(lo, hi, step, init)
        # A query of a block that sees no key (all padding) gets 0 and a log-sum-exp of MASKED_LOGIT.
        seen = denom > 0
        out = acc / jnp.where(seen, denom, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), MASKED_LOGIT)
        return jnp.moveaxis(out, 3, 1).astype(q.dtype), jnp.moveaxis(lse, 3, 1)  # [r, bq, N, G(, K)]

    out, lse = _each_block(query_block, nq, groups, t.qb, *t.key_range)
    out = _unblocked(out, tq)  # [B, Tq, N, G, K]
    lse = jnp.moveaxis(_unblocked(lse, tq), 1, 3)  # [B, N, G, Tq]
    return (out, lse), (q, k, v, q_segment, k_segment, out, lse)


def _flash_fwd(q, k, v, q_segment, k_segment, causal, multiplier, block_q, block_k, per_row):
    return _flash_forward(q, k, v, q_segment, k_segment, causal, multiplier, block_q, block_k, per_row)


def _flash_bwd(causal, multiplier, block_q, block_k, per_row, residuals, cotangents):
    q, k, v, q_segment, k_segment, out, lse = residuals
    d_out, d_lse = cotangents
    tq, tk = q.shape[1], k.shape[1]
    t = _tile(q, k, v, q_segment, k_segment, causal, block_q, block_k, per_row)
    groups, nq, nk = t.qb.shape[0], t.qb.shape[1], t.kb.shape[1]
    # dS = P * (dP - D) with D = rowsum(dO * O) - dLSE (the log-sum-exp's own cotangent).
    delta = jnp.einsum("bqngk,bqngk->bqng", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - jnp.moveaxis(d_lse, 3, 1)  # [B, Tq, N, G]
    dob = _blocked(_pad(d_out, 1, t.bq), groups, t.bq)  # [groups, nq, r, bq, N, G, K]
    lseb = _blocked(_pad(jnp.moveaxis(lse, 3, 1), 1, t.bq), groups, t.bq)  # [groups, nq, r, bq, N, G]
    deltab = _blocked(_pad(delta, 1, t.bq), groups, t.bq)

    def score_grads(group, i, j):
        """Probabilities and dL/d(raw logits) of query block i against key block j."""
        q_seg = None if t.q_seg is None else t.q_seg[group, i]
        s, tanh_grad = _block_scores(
            t.qb[group, i], t.kb[group, j], q_seg, t.k_seg[group, j], i, j, t.bq, t.bk, causal, multiplier
        )
        p = jnp.exp(s - jnp.moveaxis(lseb[group, i], 1, 3)[..., None])  # [r, N, G, bq, bk]
        dp = jnp.einsum("bqngk,bsnk->bngqs", dob[group, i], t.vb[group, j], preferred_element_type=jnp.float32)
        return p, p * (dp - jnp.moveaxis(deltab[group, i], 1, 3)[..., None]) * tanh_grad * multiplier

    def query_grad(group, i, lo, hi):
        def step(j, dq):
            _, dx = score_grads(group, i, j)
            return dq + jnp.einsum("bngqs,bsnk->bqngk", dx, t.kb[group, j], preferred_element_type=jnp.float32)

        return jax.lax.fori_loop(lo, hi, step, jnp.zeros(t.qb.shape[2:], jnp.float32))

    def key_grads(group, j, lo, hi):
        def step(i, carry):
            dk, dv = carry
            p, dx = score_grads(group, i, j)
            dv = dv + jnp.einsum(
                "bngqs,bqngk->bsnk", p.astype(v.dtype), dob[group, i], preferred_element_type=jnp.float32
            )
            dk = dk + jnp.einsum("bngqs,bqngk->bsnk", dx, t.qb[group, i], preferred_element_type=jnp.float32)
            return dk, dv

        zeros = jnp.zeros(t.kb.shape[2:], jnp.float32)
        return jax.lax.fori_loop(lo, hi, step, (zeros, zeros))

    dq = _unblocked(_each_block(query_grad, nq, groups, *t.key_range), tq)
    dk, dv = _each_block(key_grads, nk, groups, *t.query_range)
    dk, dv = _unblocked(dk, tk), _unblocked(dv, tk)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


flash_attention.defvjp(_flash_fwd, _flash_bwd)


# --- the ranker's structure --------------------------------------------------------------------


class Segments(NamedTuple):
    """Packed rows (several sessions a row): the session of every position, 0 for padding and
    1, 2, ... in order along the row, each session's positions contiguous."""

    prefix: jax.Array  # [B, P] int32: each session's [user, history], one after another
    candidates: jax.Array | None = None  # [B, C] int32: each session's candidates, one session after another


def _query_key_segments(prefix_valid, candidate_valid, segments):
    """(prefix queries [B, P], prefix keys [B, P], candidate queries [B, C]) segments: of a packed
    batch, its sessions; otherwise the valid keys in segment 1 and the queries None (see all)."""
    if segments is not None:
        return segments.prefix, segments.prefix, segments.candidates
    return None, prefix_valid.astype(jnp.int32), None


def _attention(q, k, v, q_segment, k_segment, causal, multiplier, block, per_row):
    """`flash_attention` of q, k, v; `per_row` (a packed batch) on each device's own rows and heads.

    A row-by-row loop over a batch sharded across devices would run over the whole batch on
    every device (XLA cannot split a sequential loop's axis); under a mesh whose rules shard
    `batch`, each device loops over the rows it holds (`shard_map`), heads sharded as the
    activations' `act_kv_heads`.
    """
    mesh, rules = jax.sharding.get_abstract_mesh(), nn.get_logical_axis_rules()

    def attend(q, k, v, q_segment, k_segment):
        return flash_attention(q, k, v, q_segment, k_segment, causal, multiplier, block, block, per_row)

    if not per_row or mesh.empty or not rules:
        return attend(q, k, v, q_segment, k_segment)
    rows, heads = mesh_axes("batch", rules) or None, mesh_axes("act_kv_heads", rules) or None
    local = jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(
            PartitionSpec(rows, None, heads, None, None),
            PartitionSpec(rows, None, heads, None),
            PartitionSpec(rows, None, heads, None),
            PartitionSpec(rows, None),
            PartitionSpec(rows, None),
        ),
        out_specs=(PartitionSpec(rows, None, heads, None, None), PartitionSpec(rows, heads, None, None)),
        check_vma=False,
    )
    return local(q, k, v, q_segment, k_segment)


def prefix_attention(q, k, v, q_segment, k_segment, *, multiplier: float, block: int, per_row: bool = False):
    """Causal attention of the [user, history] prefix: q [B, P, N, G, K], k and v [B, P, N, K],
    segments [B, P] (`flash_attention`) -> [B, P, N, G, K].

    The place for a fused kernel: this is plain causal attention with key padding (or segment
    ids) and soft-capped logits (splash attention on TPU takes `attn_logits_soft_cap` and
    segment ids), and nothing else of the model depends on how it is computed.
    """
    return _attention(q, k, v, q_segment, k_segment, True, multiplier, block, per_row)[0]


def candidate_attention(
    q, prefix_k, prefix_v, q_segment, k_segment, own_k, own_v, own_valid, *, multiplier: float, block: int,
    per_row: bool = False,
) -> jax.Array:  # fmt: skip
    """Each candidate over the prefix keys of its segment and its own key, never another candidate's.

    q [B, C, N, G, K]; prefix_k, prefix_v [B, P, N, K]; q_segment [B, C], k_segment [B, P]
    (`flash_attention`); own_k, own_v [B, C, N, K]; own_valid [B, C] -> [B, C, N, G, K]. The
    prefix part runs blockwise; its log-sum-exp is merged with the candidate's own score, as one
    softmax over both.
    """
    over_prefix, lse = _attention(q, prefix_k, prefix_v, q_segment, k_segment, False, multiplier, block, per_row)
    own = jnp.einsum("bcngk,bcnk->bngc", q, own_k, preferred_element_type=jnp.float32) * multiplier
    own = jnp.where(own_valid[:, None, None, :], softcap(own), MASKED_LOGIT)  # [B, N, G, C]
    total = jnp.logaddexp(lse, own)
    w_prefix = jnp.moveaxis(jnp.exp(lse - total), 3, 1)[..., None]  # [B, C, N, G, 1]
    w_own = jnp.moveaxis(jnp.exp(own - total), 3, 1)[..., None]
    out = w_prefix * over_prefix.astype(jnp.float32) + w_own * own_v[:, :, :, None, :].astype(jnp.float32)
    return out.astype(q.dtype)


def sequence_attention(
    q, k, v, prefix_valid, candidate_valid, *, multiplier: float, impl: str, block: int, segments: Segments | None = None
):  # fmt: skip
    """Attention over `[prefix, candidates]` (candidates may be absent: the user tower).

    q [B, T, N, G, K], k and v [B, T, N, K], prefix_valid [B, P], candidate_valid [B, C] or None;
    `segments`: a packed batch's sessions (each position attends within its own).
    """
    if impl == "dense":
        return dense_attention(q, k, v, ranker_attention_mask(prefix_valid, candidate_valid, segments), multiplier)
    p = prefix_valid.shape[1]
    q_prefix, k_prefix, q_candidates = _query_key_segments(prefix_valid, candidate_valid, segments)
    per_row = segments is not None  # a packed row's sessions lie elsewhere in each row: skip blocks row by row
    out = prefix_attention(
        q[:, :p], k[:, :p], v[:, :p], q_prefix, k_prefix, multiplier=multiplier, block=block, per_row=per_row
    )
    if candidate_valid is None:
        return out
    candidates = candidate_attention(
        q[:, p:], k[:, :p], v[:, :p], q_candidates, k_prefix, k[:, p:], v[:, p:], candidate_valid,
        multiplier=multiplier, block=block, per_row=per_row,
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
        q, context_k, context_v, None, context_valid.astype(jnp.int32), own_k, own_v, own_valid,
        multiplier=multiplier, block=block,
    )  # fmt: skip
