"""Ranker properties: candidate isolation, slot independence with shared positions, padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from phoenix_flax.config import ModelConfig
from phoenix_flax.extensions import ExtendedRanker
from phoenix_flax.extensions.ranker import LogitBlend
from phoenix_flax.model.attention import ranker_attention_mask
from phoenix_flax.model.ranker import PhoenixRanker
from phoenix_flax.model.retrieval import PhoenixRetrieval
from phoenix_flax.sharding import DEFAULT_RULES
from phoenix_flax.testing import gated_blend_features, model_inputs, random_batch

TOL = dict(atol=1e-5, rtol=0)
SMALL = ModelConfig(
    emb_size=32,
    key_size=8,
    num_q_heads=4,
    num_kv_heads=2,
    num_layers=2,
    actions=("a", "b", "c", "d", "e"),
    user_vocab_rows=64,
    post_vocab_rows=256,
    author_vocab_rows=64,
    history_len=6,
    num_candidates=5,
    # Every extension on, so that the properties below cover their paths too.
    action_bias=True,
    calibration=True,
    count_blend=True,
    count_gate=True,
)
CANDIDATE_FIELDS = ("candidate_post_hashes", "candidate_author_hashes", "candidate_product_surface")


def with_random_action_bias(model, seed=1):
    """The action bias starts at zero; random rows (and affinity mix) make the properties below cover it."""
    rng = np.random.default_rng(seed)
    bias = model.action_bias
    for p in (bias.post.table, bias.author.table, bias.user.table, bias.mix):
        p[...] = jnp.asarray(rng.normal(size=p.shape), jnp.float32)
    return model


def summed_rows(table, hashes):
    """`table`'s rows of `hashes [..., H]` summed over the hashes, padding (0) adding nothing."""
    return (table[hashes] * (hashes != 0)[..., None]).sum(-2)


@pytest.fixture(scope="module", params=["shared", "sequential"])
def ranker(request):
    model = ExtendedRanker(dataclasses.replace(SMALL, candidate_positions=request.param), rngs=nnx.Rngs(0))
    with_random_action_bias(model)
    forward = nnx.jit(lambda m, batch: m(batch))
    return request.param, lambda batch: np.asarray(forward(model, model_inputs(batch)))


def full_batch(seed, b=3, c=5):
    """No padded candidates, so that any candidate may be picked as the one under test."""
    batch = random_batch(SMALL, b, np.random.default_rng(seed), num_candidates=c)
    fresh = random_batch(SMALL, b, np.random.default_rng(seed + 100), num_candidates=c)
    for k in CANDIDATE_FIELDS:
        batch[k] = fresh[k]
    batch["candidate_post_hashes"][..., 0] = np.maximum(batch["candidate_post_hashes"][..., 0], 1)
    return batch


def with_candidates(batch, index):
    """The batch with its candidates replaced by `batch[..., index]` along the candidate axis."""
    out = dict(batch)
    for k in CANDIDATE_FIELDS:
        out[k] = np.take(batch[k], index, axis=1)
    return out


def test_mask_isolates_candidates():
    prefix_valid = jnp.array([[True, True, False]])
    mask = np.asarray(ranker_attention_mask(prefix_valid, jnp.array([[True, True]])))[0]
    expected = np.array(
        [  # keys: user, h0, h1 (padding), c0, c1
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0],
            [1, 1, 0, 0, 1],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(mask, expected)


def test_other_candidates_do_not_matter(ranker):
    """Changing, adding, removing or padding the other candidates leaves candidate 2's logits.

    Candidate 2 has candidates on both sides, so a causal or a full mask would both fail here.
    """
    _, forward = ranker
    batch = full_batch(1)
    base = forward(batch)[:, 2]
    other = full_batch(2)

    changed = dict(batch)
    for k in CANDIDATE_FIELDS:
        changed[k] = other[k].copy()
        changed[k][:, 2] = batch[k][:, 2]
    np.testing.assert_allclose(forward(changed)[:, 2], base, **TOL)

    added = dict(batch)
    for k in CANDIDATE_FIELDS:
        added[k] = np.concatenate([batch[k], other[k][:, :3]], axis=1)
    np.testing.assert_allclose(forward(added)[:, 2], base, **TOL)

    np.testing.assert_allclose(forward(with_candidates(batch, [0, 1, 2]))[:, 2], base, **TOL)

    padded = dict(batch)
    padded["candidate_post_hashes"] = batch["candidate_post_hashes"].copy()
    padded["candidate_post_hashes"][:, [0, 1, 3, 4], 0] = 0
    np.testing.assert_allclose(forward(padded)[:, 2], base, **TOL)


def test_shared_positions_make_scores_slot_independent(ranker):
    setting, forward = ranker
    batch = full_batch(3)
    base = forward(batch)
    perm = np.array([3, 0, 4, 1, 2])
    permuted = forward(with_candidates(batch, perm))
    alone = np.stack([forward(with_candidates(batch, [j]))[:, 0] for j in range(5)], axis=1)
    if setting == "shared":
        np.testing.assert_allclose(permuted, base[:, perm], **TOL)
        np.testing.assert_allclose(alone, base, **TOL)
    else:  # the original's positions: the slot changes the score, so the check above is real
        assert not np.allclose(permuted, base[:, perm], atol=1e-3)
        np.testing.assert_allclose(alone[:, 0], base[:, 0], **TOL)


def test_padded_history_and_candidates_have_no_effect(ranker):
    """What padded slots hold (beyond the zero first hash) does not change valid outputs."""
    _, forward = ranker
    batch = full_batch(4)
    batch["history_post_hashes"][:, 3:, 0] = 0
    batch["candidate_post_hashes"][:, 3:, 0] = 0
    base = forward(batch)

    junk = dict(batch)
    rng = np.random.default_rng(5)
    for k in ("history_post_hashes", "history_author_hashes", "history_actions", "history_product_surface"):
        junk[k] = batch[k].copy()
        junk[k][:, 3:] = rng.integers(0, 4, size=junk[k][:, 3:].shape)
    for k in CANDIDATE_FIELDS:
        junk[k] = batch[k].copy()
        junk[k][:, 3:] = rng.integers(0, 4, size=junk[k][:, 3:].shape)
    junk["history_post_hashes"][:, 3:, 0] = 0
    junk["candidate_post_hashes"][:, 3:, 0] = 0
    np.testing.assert_allclose(forward(junk)[:, :3], base[:, :3], **TOL)

    # The same content in a valid slot does change the outputs: the check above can fail.
    unpadded = dict(junk)
    unpadded["history_post_hashes"] = junk["history_post_hashes"].copy()
    unpadded["history_post_hashes"][:, 3:, 0] = 1
    assert not np.allclose(forward(unpadded)[:, :3], base[:, :3], atol=1e-3)


def test_the_action_bias_adds_the_candidates_post_and_author_rows_and_the_users_affinity():
    """And `logit_parts` gives each of them, and the transformer's part, apart."""
    model = with_random_action_bias(ExtendedRanker(SMALL, rngs=nnx.Rngs(0)))
    batch = random_batch(SMALL, 3, np.random.default_rng(5))  # with padded candidates and hashes
    batch["user_hashes"][0, 1] = 0  # a padded user hash adds nothing either
    with_bias = np.asarray(model(model_inputs(batch)))
    parts = {k: np.asarray(v) for k, v in model.logit_parts(model_inputs(batch)).items()}
    bias, a = model.action_bias, len(SMALL.actions)
    post_rows, author_rows, user_f, mix = (
        np.asarray(x) for x in (bias.post.table[...], bias.author.table[...], bias.user.table[...], bias.mix[...])
    )
    post, post_f, author, author_f = post_rows[:, :a], post_rows[:, a:], author_rows[:, :a], author_rows[:, a:]
    model.action_bias = None
    without = np.asarray(model(model_inputs(batch)))
    core = PhoenixRanker(SMALL, rngs=nnx.Rngs(0))  # the same parameters, no extension
    nnx.update(core, nnx.state(model, nnx.Param))
    np.testing.assert_allclose(np.asarray(core(model_inputs(batch))), without, atol=1e-5)

    ph, ah, uh = batch["candidate_post_hashes"], batch["candidate_author_hashes"], batch["user_hashes"]
    user, candidate = summed_rows(user_f, uh)[:, None], summed_rows(post_f, ph) + summed_rows(author_f, ah)
    affinity = (user * candidate) @ mix  # [B, C, A]
    want = summed_rows(post, ph) + summed_rows(author, ah) + affinity
    assert (ph == 0).any() and np.abs(affinity).max() > 0.5 and SMALL.affinity_rank > 0
    np.testing.assert_allclose(with_bias - without, want, atol=1e-4)

    assert list(parts) == ["transformer", "post", "author", "affinity"]
    np.testing.assert_allclose(parts["transformer"], without, atol=1e-5)
    np.testing.assert_allclose(parts["post"], summed_rows(post, ph), atol=1e-5)
    np.testing.assert_allclose(parts["author"], summed_rows(author, ah), atol=1e-5)
    np.testing.assert_allclose(parts["affinity"], affinity, atol=1e-4)
    np.testing.assert_allclose(sum(parts.values()), with_bias, atol=1e-5)


def test_the_reported_logits_blend_the_parts_and_the_counts_per_action_and_add_the_shifts():
    model = with_random_action_bias(ExtendedRanker(SMALL, rngs=nnx.Rngs(0)))
    batch = model_inputs(random_batch(SMALL, 3, np.random.default_rng(6)))
    forward = nnx.jit(lambda m, b: (m.logit_parts(b), m(b)))
    parts, logits = forward(model, batch)
    counts = jnp.asarray(np.random.default_rng(7).normal(size=parts["post"].shape), jnp.float32)  # [B, C, A]
    # Unfitted, the blend (ones for the parts, zero for the counts and the gated parts) reports the
    # logits themselves.
    np.testing.assert_allclose(model.calibrated_logits(parts, counts), logits, atol=1e-5)
    rng = np.random.default_rng(8)
    weights, shifts = rng.normal(size=(9, len(SMALL.actions))), rng.normal(size=len(SMALL.actions))
    model.blend[...], model.calibration[...] = jnp.asarray(weights, jnp.float32), jnp.asarray(shifts, jnp.float32)
    named = [np.asarray(parts[k]) for k in ("transformer", "post", "author", "affinity")]
    features = gated_blend_features(named, np.asarray(counts))
    want = sum(w * f for w, f in zip(weights, features, strict=True)) + shifts
    np.testing.assert_allclose(model.calibrated_logits(parts, counts), want, atol=1e-4)
    np.testing.assert_allclose(model.probabilities(parts, counts), 1 / (1 + np.exp(-want)), atol=1e-5)
    with pytest.raises(ValueError, match="scores with the candidates' counts"):
        model.probabilities(parts)
    # As model.count_gate=False builds it: the parts and the counts alone.
    model.count_gate, model.blend = False, LogitBlend(jnp.asarray(weights[:5], jnp.float32))
    want = sum(w * f for w, f in zip(weights[:5], features[:5], strict=True)) + shifts
    np.testing.assert_allclose(model.calibrated_logits(parts, counts), want, atol=1e-4)
    model.blend = None  # as model.count_blend=False builds it: the parts summed, no counts needed
    np.testing.assert_allclose(model.probabilities(parts), jax.nn.sigmoid(logits + shifts), atol=1e-6)


@pytest.mark.slow
def test_the_exposure_softmax_scores_each_shown_author_against_other_sessions_authors():
    """Every shown candidate's author against one shown author of every other session (session
    j's slot j mod its count), same authors as the row's removed, logQ from the columns the
    training step recorded; checked against numpy after one step."""
    from phoenix_flax.config import LossConfig, OptimizerConfig
    from phoenix_flax.data.batch import labeled_candidates
    from phoenix_flax.extensions.exposure import exposure_loss
    from phoenix_flax.step.model import PhoenixModel
    from phoenix_flax.step.optimizer import TrainOptimizer, make_optimizer
    from phoenix_flax.step.step import train_step_fn

    model = PhoenixModel(SMALL, rngs=nnx.Rngs(0), retrieval=False, exposure_frequency_buckets=1 << 12)
    with_random_action_bias(model.ranker)
    batch = random_batch(SMALL, 6, np.random.default_rng(3))  # with padded candidates
    batch["labeled"][5] = False  # an unlabeled session's candidates count nowhere
    ah, fp = batch["candidate_author_hashes"], batch["candidate_author_fingerprint"]
    v = batch["candidate_post_hashes"][..., 0] != 0
    v[5] = False
    slot = np.arange(6) % np.maximum(v.sum(1), 1)
    ah[1, slot[1]], fp[1, slot[1]] = ah[0, 0], fp[0, 0]  # session 0's author is session 1's column: a hit
    impression = 1 / (6 * SMALL.num_candidates * SMALL.num_actions)
    cfg = OptimizerConfig()
    tx = make_optimizer(cfg, 10, impression, action_bias=True, offset_columns=SMALL.num_actions, steps_per_epoch=1.0)
    optimizer = TrainOptimizer(model, tx, cfg)
    nnx.jit(train_step_fn(LossConfig(exposure_weight=0.5)))(model, optimizer, batch)
    got = float(exposure_loss(model, batch, labeled_candidates(batch)))

    bias, a = model.ranker.action_bias, len(SMALL.actions)
    author_f, user_f = np.asarray(bias.author.table[...])[:, a:], np.asarray(bias.user.table[...])

    users, authors = summed_rows(user_f, batch["user_hashes"]), summed_rows(author_f, ah)  # [B, r], [B, C, r]
    col = np.arange(6)[v.any(1)]  # the sessions with a column
    col_ids, col_authors = fp[col, slot[col]], authors[col, slot[col]]

    def log_q(ids):  # one step recorded the columns: an author's rate is its count among them
        return np.log(np.maximum([(col_ids == i).sum() for i in ids], 0.01))

    losses = []
    for b in range(6):
        others = [k for k, j in enumerate(col) if j != b and col_ids[k] not in fp[b][v[b]]]
        neg = users[b] @ col_authors[others].T - log_q(col_ids[others])
        for c in np.nonzero(v[b])[0]:
            pos = users[b] @ authors[b, c] - log_q([fp[b, c]])[0]
            losses.append(np.logaddexp.reduce([pos, *neg]) - pos)
    assert (~v).any() and fp[0, 0] in fp[1][v[1]]  # padding, and a hit for rows 0 and 1
    np.testing.assert_allclose(got, np.mean(losses), rtol=1e-5)


def test_the_action_bias_trains_with_the_tables_optimizer():
    from phoenix_flax.step.optimizer import param_labels

    params = nnx.state(ExtendedRanker(SMALL, rngs=nnx.Rngs(0)), nnx.Param)
    labels = param_labels(params, bias_tables=True)
    assert labels["action_bias"]["post"]["table"].get_value() == "bias_tables"
    assert labels["action_bias"]["user"]["table"].get_value() == "bias_tables"
    assert labels["action_bias"]["mix"].get_value() == "dense"
    assert labels["embeddings"]["post"]["table"].get_value() == "tables"
    assert labels["unembed"].get_value() == "dense"
    assert param_labels(params)["action_bias"]["post"]["table"].get_value() == "tables"
    newton = param_labels(params, bias_tables=True, bias_offsets=True)["action_bias"]
    assert [newton[t]["table"].get_value() for t in ("post", "author", "user")] == ["bias_offsets"] * 2 + [
        "bias_tables"
    ]


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters():
    batch = model_inputs(full_batch(6))
    f32 = ExtendedRanker(SMALL, rngs=nnx.Rngs(0))
    bf16 = ExtendedRanker(dataclasses.replace(SMALL, dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = nnx.state(bf16, nnx.Param)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    out32, out16 = np.asarray(f32(batch)), np.asarray(bf16(batch))
    assert out16.dtype == np.float32
    assert np.abs(out16 - out32).max() < 0.1 * max(1.0, np.abs(out32).max())
    assert not np.array_equal(out16, out32)  # bfloat16 really was used


def test_every_parameter_has_logical_axis_names_with_rules():
    ruled = {name for name, _ in DEFAULT_RULES}
    model = nnx.List([ExtendedRanker(SMALL, rngs=nnx.Rngs(0)), PhoenixRetrieval(SMALL, rngs=nnx.Rngs(0))])
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            names = var.get_metadata()["out_sharding"]
            assert len(names) == var[...].ndim, (path, names)
            assert set(names) <= ruled, (path, names)


@pytest.mark.slow
def test_parameters_are_created_sharded_under_a_mesh():
    import flax.linen as nn
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"))
    with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
        model = ExtendedRanker(SMALL, rngs=nnx.Rngs(0))
    table = model.embeddings.post.table[...]
    assert table.sharding.spec == P(("model", "fsdp"), None)
    assert len(table.addressable_shards) == 8 and table.addressable_shards[0].data.shape == (256 // 4, 32)
    assert model.transformer.layers[0].ffn.gate[...].sharding.spec == P("fsdp", "model")


def test_the_default_config_builds_the_original_ranker_whose_probabilities_are_the_logits_sigmoid():
    """`ModelConfig()` is X's release: one logit path, no post-hoc heads, no extension's tables."""
    from phoenix_flax.extensions import build_ranker

    cfg = dataclasses.replace(ModelConfig(), **{k: getattr(SMALL, k) for k in ("emb_size", "key_size", "actions")})
    cfg = dataclasses.replace(cfg, user_vocab_rows=64, post_vocab_rows=256, author_vocab_rows=64)
    model = build_ranker(cfg, rngs=nnx.Rngs(0))
    assert type(model) is PhoenixRanker
    assert not {"action_bias", "calibration", "blend"} & set(vars(model))
    assert not any("action_bias" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model)))
    batch = model_inputs(random_batch(cfg, 3, np.random.default_rng(9)))
    parts, logits = nnx.jit(lambda m, b: (m.logit_parts(b), m(b)))(model, batch)
    assert list(parts) == ["transformer"]
    np.testing.assert_allclose(model.probabilities(parts), 1 / (1 + np.exp(-np.asarray(logits))), atol=1e-6)
    with pytest.raises(TypeError, match="reads no"):
        model.probabilities(parts, count_logits=logits)
    assert type(build_ranker(dataclasses.replace(cfg, action_bias=True), rngs=nnx.Rngs(0))) is ExtendedRanker
