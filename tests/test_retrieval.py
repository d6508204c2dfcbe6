"""Two-tower retrieval: towers, chunked top-K against brute force, temperature, shared tables."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.model.embeddings import HashEmbeddings
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.retrieval import PhoenixRetrieval, top_k
from phoenix_flax.step.losses import sampled_softmax_loss
from phoenix_flax.testing import model_inputs, random_batch

SMALL = ModelConfig(
    emb_size=16,
    key_size=4,
    num_q_heads=2,
    num_kv_heads=1,
    num_layers=1,
    actions=("a", "b", "c"),
    user_vocab_rows=32,
    post_vocab_rows=128,
    author_vocab_rows=32,
    history_len=5,
    num_candidates=4,
)


def brute_force(users, corpus, k, valid):
    scores = users @ corpus.T
    scores = np.where(valid[None], scores, -np.inf)
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, idx, axis=1), idx


@pytest.mark.parametrize("chunk_size", [10, 64, 1000])
def test_top_k_equals_brute_force(chunk_size):
    rng = np.random.default_rng(0)
    users = rng.standard_normal((5, 8)).astype(np.float32)
    corpus = rng.standard_normal((103, 8)).astype(np.float32)
    valid = rng.random(103) < 0.7
    scores, idx = top_k(users, corpus, 7, valid, chunk_size=chunk_size)
    want_scores, want_idx = brute_force(users, corpus, 7, valid)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(scores), want_scores, rtol=1e-6)


def test_top_k_with_fewer_valid_items_than_k():
    rng = np.random.default_rng(1)
    users = rng.standard_normal((2, 4)).astype(np.float32)
    corpus = rng.standard_normal((20, 4)).astype(np.float32)
    valid = np.zeros(20, bool)
    valid[[3, 11, 17]] = True
    scores, idx = top_k(users, corpus, 5, valid, chunk_size=6)
    idx, scores = np.asarray(idx), np.asarray(scores)
    assert (np.sort(idx[:, :3], axis=1) == [3, 11, 17]).all()
    assert (idx[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    with pytest.raises(ValueError, match="k=21"):
        top_k(users, corpus, 21)


def test_top_k_compiles_no_corpus_sized_constant():
    # In one chunk the rows' indices are known at compile time: an index array built from them was
    # folded into a [B, N] int32 constant of the program (82 MB, 1.6 s to compile, for 1,024 users
    # over 20,000 posts).
    users, corpus = jax.ShapeDtypeStruct((64, 8), jnp.float32), jax.ShapeDtypeStruct((3000, 8), jnp.float32)
    hlo = top_k.lower(users, corpus, 10).compile().as_text()
    shapes = re.findall(r"\[([\d,]+)\]\{[^}]*\} constant\(", hlo)
    assert max((math.prod(int(d) for d in s.split(",")) for s in shapes), default=0) < 3000


@pytest.fixture(scope="module")
def model():
    return PhoenixRetrieval(SMALL, rngs=nnx.Rngs(0))


def test_towers_give_unit_vectors_and_ignore_padding(model):
    batch = model_inputs(random_batch(SMALL, 4, np.random.default_rng(2)))
    batch["history_post_hashes"][:, 3:, 0] = 0
    users = np.asarray(model.user(batch))
    np.testing.assert_allclose(np.linalg.norm(users, axis=-1), 1.0, rtol=1e-5)

    junk = dict(batch)
    for k in ("history_author_hashes", "history_actions", "history_product_surface"):
        junk[k] = batch[k].copy()
        junk[k][:, 3:] = 1
    np.testing.assert_allclose(np.asarray(model.user(junk)), users, atol=1e-6)

    emb = model.embeddings(batch)
    cands = np.asarray(model.candidates_from_embeddings(batch, emb))
    np.testing.assert_allclose(
        cands, np.asarray(model.candidates(batch["candidate_post_hashes"], batch["candidate_author_hashes"])), atol=1e-6
    )
    valid = batch["candidate_post_hashes"][..., 0] != 0
    np.testing.assert_allclose(np.linalg.norm(cands[valid], axis=-1), 1.0, rtol=1e-5)


def test_learned_temperature_is_a_trained_parameter():
    model = PhoenixRetrieval(dataclasses.replace(SMALL, learn_temperature=True), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(model.temperature(), SMALL.retrieval_temperature, rtol=1e-6)
    rng = np.random.default_rng(3)
    users = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)
    pos = jnp.asarray(rng.standard_normal((6, 16)), jnp.float32)

    def loss(m):
        return sampled_softmax_loss(users, pos, jnp.arange(6), jnp.ones(6, bool), m.temperature())

    grads = nnx.grad(loss)(model)
    assert abs(float(grads.log_temperature[...])) > 0
    fixed = PhoenixRetrieval(SMALL, rngs=nnx.Rngs(0))
    assert "log_temperature" not in nnx.state(fixed, nnx.Param)


def test_ranker_and_retrieval_can_share_hash_tables():
    tables = HashEmbeddings(SMALL, rngs=nnx.Rngs(0))
    ranker = PhoenixRanker(SMALL, rngs=nnx.Rngs(1), embeddings=tables)
    retrieval = PhoenixRetrieval(SMALL, rngs=nnx.Rngs(2), embeddings=tables)
    joint = nnx.List([ranker, retrieval])
    params = nnx.state(joint, nnx.Param)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    n_tables = sum(1 for p in paths if "'embeddings'" in p)
    assert n_tables == 3  # user, post, author: once each, not once per model
    ranker.embeddings.post.table[...] = jnp.zeros_like(ranker.embeddings.post.table[...])
    assert not np.any(np.asarray(retrieval.embeddings.post.table[...]))
