"""Counting the (query, key) pairs a packed row's attention mask lets through, on the host.

`visible_pairs` gives, per row, the number of pairs `mask.visible` allows, exactly, in O(L) per
row from the [B, L] token metadata (numpy; never an L x L array), for FLOP counts and
benchmarks at 32k-token rows. `mask.dense_mask(...).sum()` is the slow oracle it is tested
against.
"""

from __future__ import annotations

import numpy as np


def visible_pairs(doc_id, order, split_id, noisy) -> np.ndarray:
    """Visible (query, key) pairs of each row under `kernels/mask.py`'s rule, exactly.

    A query sees the clean keys of its document up to its causal order, plus every key of its
    own bidirectional span. So per row: sum over queries of the clean same-document keys with
    order <= its order (a running count along causal order, per document), plus sum over spans
    of n^2, minus the n (n + 1) / 2 pairs of each clean span the running count already holds.

    Args:
      doc_id, order, split_id, noisy: [B, L] token metadata (numpy or jax).

    Returns:
      [B] int64 pair counts.
    """
    doc, order = np.asarray(doc_id, np.int64), np.asarray(order, np.int64)
    split, noisy = np.asarray(split_id, np.int64), np.asarray(noisy, bool)
    b = doc.shape[0]
    rows = np.broadcast_to(np.arange(b, dtype=np.int64)[:, None], doc.shape)
    live = doc > 0
    row, doc, order, split, noisy = (x[live] for x in (rows, doc, order, split, noisy))
    if not len(row):
        return np.zeros(b, np.int64)
    clean = (~noisy).astype(np.int64)
    segment = row * (int(doc.max()) + 1) + doc  # one id per (row, document)
    index = _causal_sort(row, order, segment)
    segment, clean_sorted = segment[index], clean[index]
    running = np.cumsum(clean_sorted)
    first = np.ones(len(index), bool)
    first[1:] = segment[1:] != segment[:-1]
    start = np.maximum.accumulate(np.where(first, np.arange(len(index)), 0))
    causal = running - (running[start] - clean_sorted[start])  # clean keys <= order, in doc
    pairs = np.bincount(row[index], weights=causal, minlength=b)
    in_span = split >= 0
    if in_span.any():
        width = int(split.max()) + 1
        span_key = row[in_span] * width + split[in_span]
        size = np.bincount(span_key, minlength=b * width).reshape(b, width)
        span_noisy = np.bincount(span_key, weights=noisy[in_span], minlength=b * width) > 0
        extra = size * size - np.where(span_noisy.reshape(b, width), 0, size * (size + 1) // 2)
        pairs += extra.sum(axis=1)
    return np.rint(pairs).astype(np.int64)


def _causal_sort(row: np.ndarray, order: np.ndarray, segment: np.ndarray) -> np.ndarray:
    """Indices sorting live tokens by (row, document, order). Orders are unique per row and
    documents contiguous in causal order (the PackedBatch contract), so placing each token at
    (row, order) sorts in O(N); a batch breaking the contract is sorted by argsort instead."""
    low = int(order.min())
    width = int(order.max()) - low + 1
    place = row * width + (order - low)
    slots = np.full(int(row.max() + 1) * width, -1, np.int64)
    slots[place] = np.arange(len(row))
    index = slots[slots >= 0]
    if len(index) == len(row):
        runs = 1 + np.count_nonzero(segment[index][1:] != segment[index][:-1])
        if runs == np.count_nonzero(np.bincount(segment)):
            return index
    return np.argsort(segment * width + (order - low), kind="stable")
