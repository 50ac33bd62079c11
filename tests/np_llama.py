"""An independent float64 NumPy Llama forward for sampler references.

It shares nothing with `jaxgen.model` but the params pytree, and exposes what cache-based
references need: each layer's post-RoPE K/V of the fed tokens, and attention over K/V handed in
from an earlier forward (prepended, or overwriting a range in place). Full attention only: the
diffusion references that use it are bidirectional; `mask_BLS` adds per-query masks (WeDLM).
"""
import numpy as np


def _rms(x, w, eps):
    return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def _rope(x_BLHD, pos_BL, theta):
    D = x_BLHD.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, D, 2) / D)
    ang = pos_BL[..., None] * inv
    ang = np.concatenate([ang, ang], -1)[:, :, None, :]
    rot = np.concatenate([-x_BLHD[..., D // 2:], x_BLHD[..., : D // 2]], -1)
    return x_BLHD * np.cos(ang) + rot * np.sin(ang)


def forward(params, cfg, tokens_BL, positions_BL, past=None, replace_at=None, key_valid_BS=None, mask_BLS=None):
    """(logits [B, L, V] with the mask token at -inf, [(k, v) per layer of the fed tokens]).

    past: per-layer (k [B, S, K, D], v) from an earlier forward. replace_at=None prepends them to
    the fed tokens' K/V; replace_at=s overwrites slots [s, s + L) of them instead.
    key_valid_BS: which of the attended keys are visible (default all).
    mask_BLS: per-query visibility of the attended keys (e.g. causal rows), on top of that.
    """
    p = {k: np.asarray(v, np.float64) for k, v in params.items() if k != "layers"}
    layers = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
    H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = p["embed"][np.asarray(tokens_BL)]
    pos = np.asarray(positions_BL, np.float64)
    fresh = []
    for i in range(cfg.num_layers):
        lp = {k: v[i] for k, v in layers.items()}
        h = _rms(x, lp["attn_norm"], cfg.norm_eps)
        q = _rope(np.einsum("ble,ehd->blhd", h, lp["wq"]), pos, cfg.rope_theta)
        k = _rope(np.einsum("ble,ehd->blhd", h, lp["wk"]), pos, cfg.rope_theta)
        v = np.einsum("ble,ehd->blhd", h, lp["wv"])
        fresh.append((k, v))
        if past is None:
            keys, values = k, v
        elif replace_at is None:
            keys, values = np.concatenate([past[i][0], k], 1), np.concatenate([past[i][1], v], 1)
        else:
            keys, values = past[i][0].copy(), past[i][1].copy()
            keys[:, replace_at:replace_at + k.shape[1]] = k
            values[:, replace_at:replace_at + v.shape[1]] = v
        keys, values = np.repeat(keys, H // K, axis=2), np.repeat(values, H // K, axis=2)
        scores = np.einsum("blhd,bshd->bhls", q, keys) / np.sqrt(D)
        if key_valid_BS is not None:
            scores = np.where(key_valid_BS[:, None, None, :], scores, -np.inf)
        if mask_BLS is not None:
            scores = np.where(mask_BLS[:, None, :, :], scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        x = x + np.einsum("bhls,bshd,hde->ble", probs, values, lp["wo"])
        h = _rms(x, lp["mlp_norm"], cfg.norm_eps)
        gate, up = h @ lp["w_gate"], h @ lp["w_up"]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["w_down"]
    x = _rms(x, p["final_norm"], cfg.norm_eps)
    logits = x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"])
    logits[..., cfg.mask_id] = -np.inf
    return logits, fresh
