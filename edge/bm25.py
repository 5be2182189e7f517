"""BM25 over a candidate set (bm25s; its own regex tokenizer, lower-cased, English stopwords, no stemming).

Documents are indexed as `document_text(doc)` ("title: text"). Ranking is by descending score with ties
broken by candidate order, so results are deterministic (bm25s' own top-k orders ties arbitrarily).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .datasets import Doc, document_text


def _import_bm25s():
    """bm25s without JAX: when JAX is installed, `import bm25s` imports it and runs an op, and JAX then claims
    75 % of a GPU's memory (torch beside it runs out). Only bm25s' numpy scores are used here, so JAX stays
    unimported unless the process imported it already; a later `import jax` elsewhere works as usual."""
    if "jax" in sys.modules:
        import bm25s
        return bm25s
    sys.modules["jax"] = None  # makes bm25s' `import jax.lax` raise ImportError, which it handles
    try:
        import bm25s
    finally:
        del sys.modules["jax"]
    return bm25s


bm25s = _import_bm25s()

STOPWORDS = "en"


def _tokens(texts: Sequence[str], return_ids: bool = False):
    """One tokenizer for documents and questions: string tokens, or (return_ids) bm25s' ids and vocabulary."""
    return bm25s.tokenize(list(texts), stopwords=STOPWORDS, return_ids=return_ids, show_progress=False)


def _consistent(retriever: bm25s.BM25, size: int) -> bool:
    """Whether bm25s' term-by-document matrix (CSC: data, indices, indptr) and vocabulary agree with each other
    and with `size` documents: one read of the arrays, once per store state."""
    m = retriever.scores
    data, indices, indptr = m["data"], m["indices"], m["indptr"]
    terms = len(indptr) - 1
    return (m["num_docs"] == size and indptr.ndim == indices.ndim == data.ndim == 1 and terms >= 0
            and len(data) == len(indices) == int(indptr[-1]) and int(indptr[0]) == 0
            and bool(np.all(np.diff(indptr) >= 0))
            and (not len(indices) or (int(indices.min()) >= 0 and int(indices.max()) < size))
            and all(0 <= i <= terms for i in retriever.vocab_dict.values()))


class BM25Index:
    """A BM25 index over one candidate set."""

    def __init__(self, docs: Sequence[Doc]) -> None:
        self.size = len(docs)
        # Token ids and one vocabulary rather than lists of strings: a third less time and memory over a large store.
        tokens = _tokens([document_text(d) for d in docs], return_ids=True)
        self._retriever = None
        if any(tokens.ids):  # bm25s cannot index a corpus without a single token
            self._retriever = bm25s.BM25()
            self._retriever.index(tokens, show_progress=False)

    def save(self, folder: Path) -> None:
        """Write the index into the new folder `folder` (bm25s' arrays and vocabulary plus the candidate count),
        every file synced to disk."""
        folder.mkdir()
        (folder / "size.json").write_text(json.dumps({"size": self.size}))
        if self._retriever is not None:
            self._retriever.save(str(folder / "bm25s"), show_progress=False)
        for file in folder.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())

    @classmethod
    def load(cls, folder: Path) -> BM25Index:
        """An index `save` wrote, its arrays memory-mapped and checked to fit together (a damaged one raises,
        whatever the damage: bm25s would index past its arrays at the first question otherwise)."""
        index = cls.__new__(cls)
        index.size = int(json.loads((folder / "size.json").read_text())["size"])
        saved = folder / "bm25s"
        index._retriever = (bm25s.BM25.load(str(saved), mmap=True, show_progress=False) if saved.is_dir()
                            else None)
        if index._retriever is not None and not _consistent(index._retriever, index.size):
            raise ValueError(f"{saved}: arrays do not fit together")
        return index

    def scores(self, question: str) -> np.ndarray:
        """BM25 score of every candidate for `question`, [n_docs]."""
        query = _tokens([question])[0]
        if self._retriever is None or not query:
            return np.zeros(self.size, dtype=np.float32)
        return np.asarray(self._retriever.get_scores(query), dtype=np.float32)

    def top_k(self, question: str, k: int) -> list[int]:
        """Indices of the `k` best candidates (fewer if the set is smaller), best first."""
        order = np.argsort(-self.scores(question), kind="stable")
        return order[:k].tolist()

    def matches(self, question: str, k: int) -> list[int]:
        """As `top_k`, but only candidates sharing a term with the question (score > 0): a document BM25 did not
        match is no evidence, and ranking it by candidate order would be noise in a fusion."""
        scores = self.scores(question)
        order = np.argsort(-scores, kind="stable")[:k]
        return order[scores[order] > 0].tolist()


class BM25Cache:
    """One index per candidate set object: a pooled corpus shared by many rows is indexed once."""

    def __init__(self) -> None:
        self._indexes: dict[int, tuple[Sequence[Doc], BM25Index]] = {}

    def get(self, docs: Sequence[Doc]) -> BM25Index:
        hit = self._indexes.get(id(docs))
        if hit is None:
            hit = self._indexes[id(docs)] = (docs, BM25Index(docs))  # holding `docs` keeps its id unique
        return hit[1]

    def __len__(self) -> int:
        return len(self._indexes)
