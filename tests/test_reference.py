"""The port against the original: golden vectors, and a numpy forward pass at other shapes."""

import numpy as np
import numpy_reference as ref
import pytest

from phoenix_flax.model.compat import config_from_reference, ranker_from_reference, retrieval_from_reference

ATOL = 1e-4


# The import works for every layout and attention form, and each reproduces the original.
# (The scanned layout compiles slowest: `make test-all` only.)
OPTIONS = [
    pytest.param({}, id="blockwise"),
    pytest.param({"attention": "dense"}, id="dense"),
    pytest.param({"scan_layers": True, "remat": "full"}, id="scanned", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_ranker_matches_golden(golden, options):
    model = ranker_from_reference(golden["ranker_params"], golden["config"], **options)
    logits = model.logits_from_embeddings(golden["batch"], golden["embeddings"])
    np.testing.assert_allclose(np.asarray(logits), golden["expected"]["ranker_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("options", OPTIONS)
def test_retrieval_matches_golden(golden, options):
    model = retrieval_from_reference(golden["retrieval_params"], golden["config"], **options)
    user = model.user_from_embeddings(golden["batch"], golden["embeddings"])
    cands = model.candidates_from_embeddings(golden["batch"], golden["embeddings"])
    np.testing.assert_allclose(np.asarray(user), golden["expected"]["user_representation"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(cands), golden["expected"]["candidate_representation"], atol=ATOL, rtol=0)


def test_numpy_reference_matches_golden(golden):
    """The numpy forward pass used below is itself right: it reproduces the golden vectors."""
    cfg, batch, emb, exp = golden["config"], golden["batch"], golden["embeddings"], golden["expected"]
    np.testing.assert_allclose(
        ref.ranker_logits(golden["ranker_params"], cfg, batch, emb), exp["ranker_logits"], atol=ATOL
    )
    p = golden["retrieval_params"]
    np.testing.assert_allclose(ref.user_representation(p, cfg, batch, emb), exp["user_representation"], atol=ATOL)
    np.testing.assert_allclose(ref.candidate_representation(p, emb), exp["candidate_representation"], atol=ATOL)
    assert set(ref.param_shapes(cfg, "ranker")) == set(golden["ranker_params"])
    assert set(ref.param_shapes(cfg, "retrieval")) == set(golden["retrieval_params"])


OTHER_SHAPES = {
    "emb_size": 24,
    "key_size": 6,
    "num_q_heads": 6,
    "num_kv_heads": 2,
    "num_layers": 3,
    "widening_factor": 3.0,
    "attn_output_multiplier": 0.3,
    "num_actions": 7,
    "history_seq_len": 5,
    "candidate_seq_len": 3,
    "num_user_hashes": 3,
    "num_item_hashes": 1,
    "num_author_hashes": 2,
    "product_surface_vocab_size": 5,
}


@pytest.mark.slow
def test_conversion_at_other_shapes():
    rng = np.random.default_rng(0)
    cfg = OTHER_SHAPES
    batch, emb = ref.random_inputs(cfg, b=4, rng=rng)
    ranker_params = ref.random_params(cfg, "ranker", rng)
    retrieval_params = ref.random_params(cfg, "retrieval", rng)

    ranker = ranker_from_reference(ranker_params, cfg)
    logits = np.asarray(ranker.logits_from_embeddings(batch, emb))
    assert logits.shape == (4, 3, 7)
    np.testing.assert_allclose(logits, ref.ranker_logits(ranker_params, cfg, batch, emb), atol=ATOL, rtol=0)

    retrieval = retrieval_from_reference(retrieval_params, cfg)
    user = np.asarray(retrieval.user_from_embeddings(batch, emb))
    np.testing.assert_allclose(user, ref.user_representation(retrieval_params, cfg, batch, emb), atol=ATOL, rtol=0)
    cands = np.asarray(retrieval.candidates_from_embeddings(batch, emb))
    np.testing.assert_allclose(cands, ref.candidate_representation(retrieval_params, emb), atol=ATOL, rtol=0)


def test_reference_config_uses_the_originals_positions():
    assert config_from_reference(OTHER_SHAPES).candidate_positions == "sequential"


@pytest.mark.parametrize("load", [ranker_from_reference, retrieval_from_reference])
def test_missing_extra_and_misshaped_parameters_are_named(golden, load):
    key = "ranker_params" if load is ranker_from_reference else "retrieval_params"
    params = dict(golden[key])
    name = "transformer/decoder_layer_1/linear_v/w"

    missing = {k: v for k, v in params.items() if k != name}
    with pytest.raises(ValueError, match=f"missing.*{name}"):
        load(missing, golden["config"])

    extra = {**params, "transformer/decoder_layer_2/linear/w": params[name]}
    with pytest.raises(ValueError, match=r"unexpected.*decoder_layer_2/linear/w"):
        load(extra, golden["config"])

    misshaped = {**params, name: params[name][:, :-1]}
    with pytest.raises(ValueError, match=rf"mis-shaped.*{name}: got \(32, 47\), expected \(32, 48\)"):
        load(misshaped, golden["config"])


def test_incomplete_reference_config_is_named(golden):
    cfg = {k: v for k, v in golden["config"].items() if k != "num_kv_heads"}
    with pytest.raises(ValueError, match="num_kv_heads"):
        ranker_from_reference(golden["ranker_params"], cfg)
