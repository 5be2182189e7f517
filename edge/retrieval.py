"""Retrieval: cosine between the flattened query memory and each flattened document memory.

A memory [n_mem, H] is compared as one vector of n_mem*H values (D below), so cosine = inner product of
L2-normalised D-vectors. A model may carry a retrieval centre c [n_mem, H] (the mean memory of its training
bank): then both sides are compared as x - c. Why: a compressor's memories share one large common direction
(mean cosine 0.85-0.995 between unrelated documents), which squeezes raw cosines into a sliver that a query
adapter trains poorly against; centred, they spread out. Documents are stored raw (the generator reads
them), so centring happens at scoring time and a store does not depend on the centre.

Over a store, `search` streams the memory-mapped records in blocks: each block is dequantised into one
reused fp32 buffer (small enough to stay in cache) and scored with one matmul against the normalised
queries and the centre, using the document norms the store keeps (|d - c|^2 = |d|^2 - 2 d.c + |c|^2), so
nothing is normalised at query time. Rows that are not live (deleted, replaced, or of a source still being
indexed) never come back.
`use_faiss=True` searches a faiss inner-product index over the normalised live rows instead (built on first
use per store state and kept in memory; an IndexFlatIP by default, any index_factory string otherwise).
`fused_search` fuses the cosine ranking with BM25's over the chunks' text (reciprocal rank fusion). Its BM25
index is the one the indexer saved in the store for its current state (`save_text_index`), else built on first
use per store state like faiss's.
"""
from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bm25 import BM25Index
from .errors import ClaraError
from .atomic import fsync_dir
from .store import MemoryStore, decode

BLOCK_VALUES = 1 << 22  # fp32 values per scoring block (16 MiB): large enough for a fast matmul, cache-sized
_FAISS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> (state key, index, row ids)
_BM25: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # store -> (state key, BM25Index, row ids)
TEXT_INDEX_PREFIX = "bm25-"  # + store state: a saved BM25 index inside the store directory


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float32)


def flatten_normalize(mem: torch.Tensor | np.ndarray, centre: torch.Tensor | None = None) -> torch.Tensor:
    """Memories [N, n_mem, H] (or already flat [N, D]) -> unit rows [N, D] fp32 of x - centre (centre
    [n_mem, H] or None); zero rows stay zero."""
    x = _as_tensor(mem)
    if x.ndim < 2:
        raise ClaraError(f"expected memories [N, n_mem, H] or [N, D], got shape {tuple(x.shape)}")
    x = x.flatten(1)
    if centre is not None:
        x = x - _flat_centre(centre, x.shape[1])
    return torch.nn.functional.normalize(x, dim=-1)


def _flat_centre(centre: torch.Tensor | np.ndarray, values: int) -> torch.Tensor:
    c = _as_tensor(centre).flatten()
    if c.numel() != values:
        raise ClaraError(f"the model's retrieval centre has {c.numel()} values, its memories {values}")
    return c


def cosine_scores(query: torch.Tensor | np.ndarray, docs: torch.Tensor | np.ndarray,
                  centre: torch.Tensor | None = None) -> torch.Tensor:
    """Query memories [Q, n_mem, H] vs documents [N, n_mem, H] or [N, D] -> cosine [Q, N] (of x - centre)."""
    q, d = flatten_normalize(query, centre), flatten_normalize(docs, centre)
    if q.shape[1] != d.shape[1]:
        raise ClaraError(f"query memories have {q.shape[1]} values, documents {d.shape[1]}")
    return q @ d.T


def top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best `k` per row of scores [Q, N] -> (values [Q, k'], indices [Q, k']), k' = min(k, N), best first."""
    if k < 1:
        raise ClaraError(f"k must be at least 1, got {k}")
    return torch.topk(scores, min(k, scores.shape[1]), dim=1)


RRF_K = 60  # Cormack et al. (2009)'s constant: the top ranks of each list count, no single list dominates
FUSION_DEPTH = 100  # each retriever's ranking is cut here before fusing


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: int = RRF_K) -> tuple[list[int], list[float]]:
    """Rankings of the same items (best first) -> (items, fused scores), best first: an item scores
    sum(1 / (k + rank)) over the lists it appears in (rank from 1); ties keep the order of first appearance.

    Why ranks and not a weighted sum of scores: BM25 scores and cosines live on unrelated scales that move
    with the corpus and the query; ranks do not."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    items = sorted(fused, key=fused.__getitem__, reverse=True)  # stable: ties keep first appearance
    return items, [fused[i] for i in items]


def search(store: MemoryStore, query_memories: torch.Tensor | np.ndarray, k: int, centre: torch.Tensor | None = None,
           use_faiss: bool = False, faiss_index: str = "Flat") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k live chunks per query: (cosine [Q, k'], chunk ids [Q, k'] int64), k' = min(k, live chunks).

    `centre`: the model's retrieval centre [n_mem, H] (`Backend.retrieval_centre`), or None for raw cosine."""
    spec = store.spec
    q = flatten_normalize(query_memories, centre)
    if q.shape[1] != spec.n_mem * spec.hidden:
        raise ClaraError(f"query memories of {q.shape[1]} values do not match store {store.path} "
                         f"({spec.n_mem} x {spec.hidden})")
    if k < 1:
        raise ClaraError(f"k must be at least 1, got {k}")
    records, live = store.snapshot()
    k = min(k, int(live.sum()))
    if k == 0:
        return torch.empty(q.shape[0], 0), torch.empty(q.shape[0], 0, dtype=torch.int64)
    if use_faiss:
        return _faiss_search(store, records, live, q, k, faiss_index, centre)
    c = torch.zeros(q.shape[1]) if centre is None else _flat_centre(centre, q.shape[1])
    probes = torch.cat([q, c[None]])  # [Q + 1, D]: the last row gives d.c for the centred norms
    q_dot_c, c_sq = (q @ c)[:, None], float(c @ c)
    block = max(1, BLOCK_VALUES // q.shape[1])
    buf = torch.empty(block, q.shape[1])
    best_s = torch.full((q.shape[0], 0), -torch.inf)
    best_i = torch.empty((q.shape[0], 0), dtype=torch.int64)
    for start in range(0, len(records), block):
        part = records[start:start + block]
        dots = probes @ decode(part, spec, out=buf[:len(part)]).T  # [Q + 1, b]
        norm_sq = torch.from_numpy(part["norm"].astype(np.float32)) ** 2 - 2 * dots[-1] + c_sq
        scores = (dots[:-1] - q_dot_c) * norm_sq.clamp(min=1e-30).rsqrt()
        dead = ~live[start:start + len(part)]
        if dead.any():
            scores[:, torch.from_numpy(dead)] = -torch.inf
        s, i = top_k(scores, k)
        best_s, pick = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.cat([best_i, i + start], 1).gather(1, pick)
    return best_s, best_i


def fused_search(store: MemoryStore, query_memories: torch.Tensor | np.ndarray, questions: Sequence[str], k: int,
                 centre: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k live chunks per question by reciprocal rank fusion of `search`'s cosine ranking and BM25 over the
    chunks' text ("title: text", what the compressor read), each cut to `FUSION_DEPTH` (or k if larger):
    (fused scores [Q, k'], chunk ids [Q, k']), k' = min(k, live chunks). Why: the two rankings miss different
    documents; fused, they find more than either on the multi-hop dev sets (README, "Retrieval fused with BM25")."""
    if len(questions) != len(query_memories):
        raise ValueError("one question per query memory")
    depth = max(k, FUSION_DEPTH)
    _, dense = search(store, query_memories, depth, centre)
    index, rows = _store_bm25(store)
    k = min(k, dense.shape[1])
    scores, ids = [], []
    for question, ranking in zip(questions, dense.tolist()):
        items, fused = reciprocal_rank_fusion([ranking, rows[index.matches(question, depth)].tolist()])
        ids.append(items[:k])
        scores.append(fused[:k])
    shape = (len(questions), k)
    return torch.tensor(scores, dtype=torch.float32).reshape(shape), torch.tensor(ids, dtype=torch.int64).reshape(shape)


def _store_bm25(store: MemoryStore) -> tuple[BM25Index, np.ndarray]:
    """A BM25 index over the store's live chunks and the chunk id of each of its rows: the one the indexer saved
    for this store state when there is one, else built here (~1 s per 10,000 chunks); kept in memory."""
    _, live = store.snapshot()
    key = store.state()
    hit = _BM25.get(store)
    if hit is None or hit[0] != key:
        rows = np.flatnonzero(live)
        index = _load_text_index(_text_index_folder(store), len(rows))
        if index is None:
            key, rows, texts = store.live_chunks()  # ids and texts of one state, whatever commits meanwhile
            index = BM25Index(texts)
        hit = _BM25[store] = (key, index, rows)
    return hit[1], hit[2]


def _load_text_index(folder: Path, size: int) -> BM25Index | None:
    if not folder.is_dir():
        return None
    try:
        index = BM25Index.load(folder)
    except Exception:  # damaged, however: it is a cache, so build it again rather than fail a question
        return None
    return index if index.size == size else None


def _text_index_folder(store: MemoryStore) -> Path:
    """Where the BM25 index of the store's last snapshot is saved (or would be)."""
    return store.path / f"{TEXT_INDEX_PREFIX}{store.state()}"


def saved_text_index(store: MemoryStore) -> Path | None:
    """The BM25 index saved in the store for its current state, if there is one."""
    store.snapshot()
    folder = _text_index_folder(store)
    return folder if folder.is_dir() else None


def save_text_index(store: MemoryStore) -> Path:
    """Save the BM25 index of the store's current state into it (`bm25-STATE/`), so that a new process's first
    clara+bm25 question maps it instead of building it; indexes of older states go. Needs the writer."""
    store.require_writer()
    store.snapshot()
    folder = _text_index_folder(store)
    if not folder.is_dir():
        index, _ = _store_bm25(store)
        partial = store.path / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)  # left by a writer that died while saving
        index.save(partial)
        os.replace(partial, folder)  # readers see the whole index or none
        fsync_dir(store.path)
    # older states' indexes, and what a writer that died while saving left (which nothing else would remove)
    for old in [*store.path.glob(f"{TEXT_INDEX_PREFIX}*"), *store.path.glob(f".{TEXT_INDEX_PREFIX}*.partial")]:
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _faiss_search(store: MemoryStore, records: np.ndarray, live: np.ndarray, q: torch.Tensor, k: int,
                  spec_string: str, centre: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        import faiss
    except ImportError:
        raise ClaraError("faiss is not installed: pip install 'clara-edge[faiss]' (or search without it)") from None
    centre_key = None if centre is None else hash(_as_tensor(centre).numpy().tobytes())
    key = (store.state(), spec_string, centre_key)  # not (rows, live mask): a compaction can repeat those
    hit = _FAISS.get(store)
    if hit is None or hit[0] != key:
        rows = np.flatnonzero(live)
        block = max(1, BLOCK_VALUES // q.shape[1])

        def unit_rows(start: int, stop: int) -> np.ndarray:
            return flatten_normalize(decode(records[rows[start:stop]], store.spec), centre).numpy()

        try:
            index = faiss.index_factory(q.shape[1], spec_string, faiss.METRIC_INNER_PRODUCT)
            if not index.is_trained:  # e.g. IVF: train on a sample of up to 64k rows
                index.train(unit_rows(0, 1 << 16))
        except RuntimeError as e:
            raise ClaraError(f"faiss index {spec_string!r}: {str(e).strip().splitlines()[-1]}") from None
        for start in range(0, len(rows), block):
            index.add(unit_rows(start, start + block))
        hit = _FAISS[store] = (key, index, rows)
    _, index, rows = hit
    scores, pos = index.search(np.ascontiguousarray(q.numpy()), k)
    ids = np.where(pos >= 0, rows[np.clip(pos, 0, None)], -1)
    return torch.from_numpy(scores), torch.from_numpy(ids.astype(np.int64))
