"""The attention rule of a packed unified-model row, computed from per-token metadata.

Query q may see key k iff

    doc[q] == doc[k] != 0
    and (order[k] <= order[q]  or  split[q] == split[k] >= 0)
    and not (noisy[k] and split[q] != split[k])

so text is causal, an image (a split) is bidirectional inside, documents never see each other,
and nothing outside a noisy image ever sees its noisy latents, while clean latents and ViT
tokens are visible to every later token (BAGEL's rule, `data/data_utils.py` there).

Because the mask is a function of O(L) metadata, it can change every batch without recompiling
and kernels evaluate it per block instead of reading an L x L array.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from unijax.batch import TokenMeta


def visible(q: TokenMeta, k: TokenMeta):
    """The rule on broadcastable metadata (e.g. q fields [..., Lq, 1], k fields [..., 1, Lk])."""
    same_doc = (q.doc_id == k.doc_id) & (q.doc_id != 0)
    same_split = (q.split_id == k.split_id) & (q.split_id >= 0)
    causal = k.order <= q.order
    hidden_noise = k.noisy & ~same_split
    return same_doc & (causal | same_split) & ~hidden_noise


def _expand(meta: TokenMeta, axis: int) -> TokenMeta:
    return TokenMeta(*(jnp.expand_dims(jnp.asarray(x), axis) for x in
                       (meta.doc_id, meta.order, meta.split_id, meta.noisy)))


def dense_mask(q_meta: TokenMeta, kv_meta: TokenMeta | None = None):
    """The full boolean mask [B, Lq, Lk] (only for small L: tests, references, inference)."""
    kv_meta = q_meta if kv_meta is None else kv_meta
    return visible(_expand(q_meta, -1), _expand(kv_meta, -2))


def brute_force_mask(doc_id, order, split_id, noisy) -> np.ndarray:
    """The rule as nested Python loops over one row ([L] each): the slow, obvious oracle."""
    n = len(doc_id)
    out = np.zeros((n, n), bool)
    for q in range(n):
        for k in range(n):
            if doc_id[q] == 0 or doc_id[q] != doc_id[k]:
                continue
            same_split = split_id[q] >= 0 and split_id[q] == split_id[k]
            if noisy[k] and not same_split:
                continue
            out[q, k] = order[k] <= order[q] or same_split
    return out
