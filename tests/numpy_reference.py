"""The original Phoenix forward pass in float64 numpy, written from the reference README.

Independent of phoenix_flax: parameter names and shapes are the original's. Used to check the
port at shapes other than the golden file's.
"""

from __future__ import annotations

import numpy as np


def ffn_size(d: int, widening: float) -> int:
    f = int(widening * d) * 2 // 3
    return f + (8 - f) % 8


def rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * scale


def rope(x, positions):
    """x [B, T, H, K], positions [T]."""
    k = x.shape[-1]
    freq = 1.0 / 10000 ** (np.arange(0, k, 2) / k)
    phase = np.concatenate([positions[:, None] * freq, positions[:, None] * freq], -1)[None, :, None, :]
    x1, x2 = x[..., : k // 2], x[..., k // 2 :]
    return x * np.cos(phase) + np.concatenate([-x2, x1], -1) * np.sin(phase)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def transformer(h, p, cfg, mask, positions):
    """h [B, T, D]; p maps 'transformer/...' names; mask [B, T, T] of 0/1."""
    b, t, _ = h.shape
    hq, hkv, k = cfg["num_q_heads"], cfg["num_kv_heads"], cfg["key_size"]
    for i in range(cfg["num_layers"]):
        pre = f"transformer/decoder_layer_{i}/"
        x = rms_norm(h, p[pre + "rms_norm/scale"])
        q = rope((x @ p[pre + "multi_head_attention/query/w"]).reshape(b, t, hq, k), positions)
        kk = rope((x @ p[pre + "multi_head_attention/key/w"]).reshape(b, t, hkv, k), positions)
        v = (x @ p[pre + "multi_head_attention/value/w"]).reshape(b, t, hkv, k)
        out = np.zeros((b, t, hq, k))
        for head in range(hq):
            g = head // (hq // hkv)
            logits = np.einsum("btk,bsk->bts", q[:, :, head], kk[:, :, g]) * cfg["attn_output_multiplier"]
            logits = 30 * np.tanh(logits / 30)
            logits = np.where(mask > 0, logits, -1e30)
            w = np.exp(logits - logits.max(-1, keepdims=True))
            w = w / w.sum(-1, keepdims=True)
            out[:, :, head] = np.einsum("bts,bsk->btk", w, v[:, :, g])
        attn = out.reshape(b, t, hq * k) @ p[pre + "multi_head_attention/linear/w"]
        h = h + rms_norm(attn, p[pre + "rms_norm_1/scale"])
        x = rms_norm(h, p[pre + "rms_norm_2/scale"])
        dense = (gelu_tanh(x @ p[pre + "linear/w"]) * (x @ p[pre + "linear_v/w"])) @ p[pre + "linear_1/w"]
        h = h + rms_norm(dense, p[pre + "rms_norm_3/scale"])
    return h


def _flat(x):
    return x.reshape(*x.shape[:-2], -1)


def _user_history(p, prefix, cfg, batch, emb):
    user = _flat(emb["user_embeddings"])[:, None] @ p[prefix + "proj_mat_1"]
    actions = batch["history_actions"].astype(np.float64)
    action_emb = (2 * actions - 1) @ p[prefix + "action_projection"]
    action_emb = action_emb * (actions.sum(-1, keepdims=True) > 0)
    surface = np.eye(cfg["product_surface_vocab_size"])[batch["history_product_surface"]]
    surface_emb = surface @ p[prefix + "product_surface_embedding_table"]
    hist = (
        np.concatenate(
            [_flat(emb["history_post_embeddings"]), _flat(emb["history_author_embeddings"]), action_emb, surface_emb],
            -1,
        )
        @ p[prefix + "proj_mat_3"]
    )
    valid = np.concatenate([batch["user_hashes"][:, :1] != 0, batch["history_post_hashes"][..., 0] != 0], 1)
    return user, hist, valid


def ranker_logits(p, cfg, batch, emb):
    pre = "phoenix_model/"
    user, hist, prefix_valid = _user_history(p, pre, cfg, batch, emb)
    surface = np.eye(cfg["product_surface_vocab_size"])[batch["candidate_product_surface"]]
    cand = (
        np.concatenate(
            [
                _flat(emb["candidate_post_embeddings"]),
                _flat(emb["candidate_author_embeddings"]),
                surface @ p[pre + "product_surface_embedding_table"],
            ],
            -1,
        )
        @ p[pre + "proj_mat_2"]
    )
    h = np.concatenate([user, hist, cand], 1)
    t = h.shape[1]
    start = 1 + hist.shape[1]
    structure = np.tril(np.ones((t, t)))
    structure[start:, start:] = np.eye(t - start)
    valid = np.concatenate([prefix_valid, batch["candidate_post_hashes"][..., 0] != 0], 1)
    mask = structure[None] * valid[:, None, :]
    h = transformer(h, p, cfg, mask, np.arange(t, dtype=np.float64))
    return rms_norm(h[:, start:], p[pre + "rms_norm/scale"]) @ p[pre + "unembeddings"]


def _l2(x):
    return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), 1e-12))


def user_representation(p, cfg, batch, emb):
    user, hist, valid = _user_history(p, "phoenix_retrieval_model/", cfg, batch, emb)
    h = np.concatenate([user, hist], 1)
    t = h.shape[1]
    mask = np.tril(np.ones((t, t)))[None] * valid[:, None, :]
    h = transformer(h, p, cfg, mask, np.arange(t, dtype=np.float64))
    mean = (h * valid[..., None]).sum(1) / np.maximum(valid.sum(1, keepdims=True), 1)
    return _l2(mean)


def candidate_representation(p, emb):
    tower = "phoenix_retrieval_model/~build_candidate_representation/candidate_tower/"
    x = np.concatenate([_flat(emb["candidate_post_embeddings"]), _flat(emb["candidate_author_embeddings"])], -1)
    x = x @ p[tower + "candidate_tower_projection_1"]
    x = x / (1 + np.exp(-x))
    return _l2(x @ p[tower + "candidate_tower_projection_2"])


def param_shapes(cfg, kind: str) -> dict[str, tuple[int, ...]]:
    """The original's parameter names and shapes for `kind` in {'ranker', 'retrieval'}."""
    d, k, a = cfg["emb_size"], cfg["key_size"], cfg["num_actions"]
    hu, hp, ha = cfg["num_user_hashes"], cfg["num_item_hashes"], cfg["num_author_hashes"]
    f = ffn_size(d, cfg["widening_factor"])
    pre = "phoenix_model/" if kind == "ranker" else "phoenix_retrieval_model/"
    shapes = {
        pre + "proj_mat_1": (hu * d, d),
        pre + "proj_mat_3": ((hp + ha + 2) * d, d),
        pre + "action_projection": (a, d),
        pre + "product_surface_embedding_table": (cfg["product_surface_vocab_size"], d),
    }
    if kind == "ranker":
        shapes[pre + "proj_mat_2"] = ((hp + ha + 1) * d, d)
        shapes[pre + "unembeddings"] = (d, a)
        shapes[pre + "rms_norm/scale"] = (d,)
    else:
        tower = pre + "~build_candidate_representation/candidate_tower/"
        shapes[tower + "candidate_tower_projection_1"] = ((hp + ha) * d, 2 * d)
        shapes[tower + "candidate_tower_projection_2"] = (2 * d, d)
    for i in range(cfg["num_layers"]):
        lp = f"transformer/decoder_layer_{i}/"
        shapes[lp + "multi_head_attention/query/w"] = (d, cfg["num_q_heads"] * k)
        shapes[lp + "multi_head_attention/key/w"] = (d, cfg["num_kv_heads"] * k)
        shapes[lp + "multi_head_attention/value/w"] = (d, cfg["num_kv_heads"] * k)
        shapes[lp + "multi_head_attention/linear/w"] = (cfg["num_q_heads"] * k, d)
        shapes[lp + "linear/w"] = (d, f)
        shapes[lp + "linear_v/w"] = (d, f)
        shapes[lp + "linear_1/w"] = (f, d)
        for n in ("rms_norm", "rms_norm_1", "rms_norm_2", "rms_norm_3"):
            shapes[lp + n + "/scale"] = (d,)
    return shapes


def random_params(cfg, kind: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in param_shapes(cfg, kind).items():
        if name.endswith("/scale"):
            out[name] = (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
    return out


def random_inputs(cfg, b: int, rng: np.random.Generator):
    """A batch and looked-up embeddings with padded users, history items and candidates."""
    s, c, d, a = cfg["history_seq_len"], cfg["candidate_seq_len"], cfg["emb_size"], cfg["num_actions"]
    hu, hp, ha = cfg["num_user_hashes"], cfg["num_item_hashes"], cfg["num_author_hashes"]

    def hashes(*shape):
        return rng.integers(1, 1000, size=shape)

    batch = {
        "user_hashes": hashes(b, hu),
        "history_post_hashes": hashes(b, s, hp),
        "history_author_hashes": hashes(b, s, ha),
        "history_actions": (rng.random((b, s, a)) < 0.3).astype(np.int32),
        "history_product_surface": rng.integers(0, cfg["product_surface_vocab_size"], size=(b, s)),
        "candidate_post_hashes": hashes(b, c, hp),
        "candidate_author_hashes": hashes(b, c, ha),
        "candidate_product_surface": rng.integers(0, cfg["product_surface_vocab_size"], size=(b, c)),
    }
    batch["user_hashes"][-1] = 0  # the last user is padding
    for i in range(b):  # history padded at the end, a different amount per row
        batch["history_post_hashes"][i, s - i % s :] = 0
    batch["history_actions"][0, 0] = 0  # an item with no action at all
    batch["candidate_post_hashes"][0, -1] = 0  # a padded candidate
    emb = {
        "user_embeddings": rng.standard_normal((b, hu, d)),
        "history_post_embeddings": rng.standard_normal((b, s, hp, d)),
        "history_author_embeddings": rng.standard_normal((b, s, ha, d)),
        "candidate_post_embeddings": rng.standard_normal((b, c, hp, d)),
        "candidate_author_embeddings": rng.standard_normal((b, c, ha, d)),
    }
    return batch, {k: v.astype(np.float32) for k, v in emb.items()}
