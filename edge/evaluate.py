"""`clara-edge eval`: answer quality and retrieval quality of CLaRa against its text-RAG baselines.

Modes (who answers, and from what):
  clara        the generator adapter reading the top-k documents' compressed memories;
  text         the bare base LM reading the top-k documents as text (the text-RAG baseline);
  text-tuned   the base LM with the loaded model's generator adapter reading the documents as text: load a
               model whose generator adapter was fine-tuned on the same training data in text form, so that
               no comparison rewards answer-format tuning alone;
  closed-book  the bare base LM asked the question with no documents (the floor).
Retrievers: bm25 (bm25s over the candidates), clara (cosine of flattened query / document memories,
minus the model's retrieval centre when it has one), clara+bm25 (reciprocal rank fusion of clara's top 100 and
BM25's matching top 100, as `clara_edge.retrieval.fused_search` ranks a store),
oracle (the gold documents, in pos_index order; for debugging and parity). Defaults: clara -> clara,
text / text-tuned -> bm25, closed-book -> none.

Report (all scores on the 0-100 scale; max over all gold answers; SQuAD normalisation):
  n, em, f1, cover_em                      answer metrics (see clara_edge.metrics for the definitions)
  recall@1, recall@5                       |top-k ∩ gold| / |gold| of the retriever's ranking, averaged over
                                           rows that have gold documents; null for oracle / closed-book
  context_positions_mean                   prompt positions the generator saw (a memory slot counts one)
  effective_compression_mean               per row: document tokens the compressor read (capped at
                                           doc_max_length) / memory vectors, for the documents given to the
                                           generator; 1.0 in text modes; null for closed-book
  truncated_docs_frac                      clara mode: share of given documents longer than doc_max_length
                                           tokens (their tail never reaches the memory); else null
plus mode, retriever, top_k, compression_rate, n_mem, base_model, n_recall, docs_given_mean, new_tokens_mean,
prefill_s, decode_s, wall_s; and "rows" (per-question predictions and scores) when keep_rows is set.
retrieval_only: rank, score recall, generate nothing (answer metrics and positions null): minutes instead of
hours for a retriever comparison over many questions.
Each unique document is compressed once per run, as `document_text(doc)` ("title: text").
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import metrics
from .bm25 import BM25Cache
from .datasets import Candidates, Doc, EvalRow, build_candidates, document_text, load_eval_set
from .errors import ClaraError
from .reports import report_path, write_report
from .retrieval import FUSION_DEPTH, flatten_normalize, reciprocal_rank_fusion

MODES = ("clara", "text", "text-tuned", "closed-book")
RETRIEVERS = ("bm25", "clara", "clara+bm25", "oracle")
DEFAULT_RETRIEVER = {"clara": "clara", "text": "bm25", "text-tuned": "bm25", "closed-book": None}
TEXT_ROLE = {"text": None, "text-tuned": "generator", "closed-book": None}  # adapter for generate_text_rag
RECALL_KS = (1, 5)
COMPRESS_CHUNK = 64


class MemoryCache:
    """Memories and token counts per unique document text, computed once per run."""

    def __init__(self, model, batch_size: int, progress: bool) -> None:
        self.model = model
        self.batch_size = batch_size
        self.progress = progress
        self.memories: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._matrices: dict[int, tuple[Sequence, torch.Tensor]] = {}

    def ensure(self, texts: Sequence[str]) -> None:
        missing = list(dict.fromkeys(t for t in texts if t not in self.memories))
        if not missing:
            return
        bar = tqdm(total=len(missing), desc="compress", unit="doc", leave=False,
                   disable=not self.progress or len(missing) <= COMPRESS_CHUNK)
        for start in range(0, len(missing), COMPRESS_CHUNK):
            chunk = missing[start:start + COMPRESS_CHUNK]
            mem = self.model.compress(chunk, batch_size=self.batch_size)
            counts = self.model.tokenizer(chunk, add_special_tokens=False)["input_ids"]
            for text, m, ids in zip(chunk, mem, counts):
                self.memories[text] = m
                self.tokens[text] = len(ids)
            bar.update(len(chunk))
        bar.close()

    def stack(self, docs: Sequence) -> torch.Tensor:
        """Memories of `docs` [k, n_mem, H] (compressing what is missing)."""
        texts = [document_text(d) for d in docs]
        if not texts:  # oracle rows without gold documents
            return torch.empty(0, self.model.config.n_mem, self.model.hidden_size)
        self.ensure(texts)
        return torch.stack([self.memories[t] for t in texts])

    def unit_matrix(self, cands: Candidates) -> torch.Tensor:
        """Unit rows [n, n_mem*H] of a candidate set's memories as retrieval compares them; a pool that questions
        share is kept (per object), a row's own documents are not: no other row asks for them again."""
        hit = self._matrices.get(id(cands.docs))
        if hit is None:
            hit = (cands.docs, flatten_normalize(self.stack(cands.docs), self.model.retrieval_centre))
            if cands.shared:
                self._matrices[id(cands.docs)] = hit
        return hit[1]


def _check_args(model, mode: str, retriever: str | None, top_k: int, retrieval_only: bool = False) -> str | None:
    if mode not in MODES:
        raise ClaraError(f"unknown eval mode {mode!r}: use {', '.join(MODES)}")
    if mode != "clara" and not hasattr(model, "generate_text_rag"):
        raise ClaraError(f"--mode {mode} needs the torch backend (this backend has no text generation)")
    if mode == "closed-book":
        if retriever is not None:
            raise ClaraError("closed-book mode reads no documents: drop --retriever")
        if retrieval_only:
            raise ClaraError("closed-book mode retrieves nothing: --retrieval-only needs another mode")
        return None
    retriever = retriever or DEFAULT_RETRIEVER[mode]
    if retriever not in RETRIEVERS:
        raise ClaraError(f"unknown retriever {retriever!r}: use {', '.join(RETRIEVERS)}")
    if top_k < 1:
        raise ClaraError(f"--top-k must be at least 1, got {top_k}")
    if retrieval_only and retriever == "oracle":
        raise ClaraError("--retrieval-only needs a ranking retriever (bm25 or clara), not oracle")
    return retriever


def _rankings(model, retriever: str, questions: list[str], cands: list[Candidates], depth: int,
              bm25: BM25Cache, cache: MemoryCache) -> list[list[int]]:
    """Candidate indices per question, best first, `depth` deep (fewer when a set is smaller)."""
    if retriever == "oracle":
        return [list(c.gold) for c in cands]
    if retriever == "bm25":
        return [bm25.get(c.docs).top_k(q, depth) for q, c in zip(questions, cands)]
    queries = flatten_normalize(model.encode_query(questions), model.retrieval_centre)
    out = []
    for question, q, c in zip(questions, queries, cands):
        scores = cache.unit_matrix(c) @ q
        ranking = torch.argsort(scores, descending=True, stable=True)[:max(depth, FUSION_DEPTH)].tolist()
        if retriever == "clara+bm25":
            lexical = bm25.get(c.docs).matches(question, FUSION_DEPTH)
            ranking, _ = reciprocal_rank_fusion([ranking[:FUSION_DEPTH], lexical])
        out.append(ranking[:depth])
    return out


def _mean(values: list[float], scale: float = 1.0) -> float | None:
    return round(scale * sum(values) / len(values), 4) if values else None


def _check_context(model, mode: str, questions: list[str], docs: list[list[Doc]], max_new_tokens: int) -> None:
    """Every prompt plus its answer fits the generator's window (past it a model reads garbage, slowly)."""
    for question, row_docs in zip(questions, docs):
        ids = (model.prompt_ids(question, len(row_docs)) if mode == "clara"
               else model.text_prompt_ids(question, row_docs))
        if len(ids) + max_new_tokens > model.max_positions:
            raise ClaraError(f"{mode} prompt with {len(row_docs)} documents takes {len(ids)} positions; with "
                             f"{max_new_tokens} new tokens it exceeds the model's context of {model.max_positions}: "
                             "lower --top-k")


def evaluate(model, rows: Sequence[EvalRow], mode: str = "clara", retriever: str | None = None, top_k: int = 5,
             candidates: Sequence[Candidates] | None = None, batch_size: int = 8, progress: bool = True,
             keep_rows: bool = False, max_new_tokens: int = 64, retrieval_only: bool = False) -> dict:
    """Evaluate `model` on `rows`; returns the report dict described in the module docstring.

    model       a ClaraModel (any Backend for mode clara; text modes need `generate_text_rag`)
    rows        EvalRow list (clara_edge.datasets.load_eval_set / load_eval_rows)
    mode        clara | text | text-tuned | closed-book
    retriever   bm25 | clara | oracle; None -> the mode's default (must be None for closed-book)
    top_k       documents given to the generator per question (recall@1/@5 are measured regardless)
    candidates  one Candidates per row; None -> build_candidates(rows) (pooling only over `rows`: pass
                load_eval_set's candidates to pool over a whole file)
    batch_size  questions per generate call (and documents per compress call)
    retrieval_only  rank and score recall only (no generation)
    """
    retriever = _check_args(model, mode, retriever, top_k, retrieval_only)
    rows = list(rows)
    if not rows:
        raise ClaraError("no rows to evaluate")
    cands = list(candidates) if candidates is not None else build_candidates(rows)
    if len(cands) != len(rows):
        raise ValueError("one Candidates per row")
    if batch_size < 1:
        raise ClaraError(f"--batch-size must be at least 1, got {batch_size}")
    if mode == "clara" and retriever != "oracle" and not retrieval_only:  # k alone sets its length: fail first
        _check_context(model, mode, [rows[0].question], [list(cands[0].docs[:top_k])], max_new_tokens)
    cfg = model.config
    cache, bm25 = MemoryCache(model, batch_size, progress), BM25Cache()
    depth = max(top_k, *RECALL_KS)
    scores: dict[str, list[float]] = {k: [] for k in ("em", "f1", "cover_em", "recall@1", "recall@5",
                                                        "positions", "compression", "docs", "tokens")}
    given_docs = truncated = 0
    per_row, prefill_s, decode_s = [], 0.0, 0.0
    start = time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"eval {mode}", unit="q", disable=not progress)
    for b in range(0, len(rows), batch_size):
        batch, bcands = rows[b:b + batch_size], cands[b:b + batch_size]
        questions = [r.question for r in batch]
        ranked = (_rankings(model, retriever, questions, bcands, depth, bm25, cache) if retriever
                  else [[] for _ in batch])
        picked = [rank if retriever == "oracle" else rank[:top_k] for rank in ranked]
        docs = [[c.docs[i] for i in p] for c, p in zip(bcands, picked)]
        if not retrieval_only and mode != "closed-book":
            _check_context(model, mode, questions, docs, max_new_tokens)
        gen = None
        if retrieval_only:
            cache.ensure([document_text(d) for row_docs in docs for d in row_docs] if mode == "clara" else [])
        elif mode == "clara":
            gen = model.generate(questions, [cache.stack(d) for d in docs], max_new_tokens=max_new_tokens)
        else:
            gen = model.generate_text_rag(questions, docs, role=TEXT_ROLE[mode], max_new_tokens=max_new_tokens)
        if gen is not None:
            prefill_s += gen.prefill_s
            decode_s += gen.decode_s
        for i, row in enumerate(batch):
            pred = gen.texts[i] if gen is not None else None
            rec = {} if pred is None else {"em": metrics.exact_match(pred, row.answers),
                                           "f1": metrics.f1_score(pred, row.answers),
                                           "cover_em": metrics.cover_exact_match(pred, row.answers)}
            gold = bcands[i].gold
            if retriever not in (None, "oracle") and gold:
                for k in RECALL_KS:
                    rec[f"recall@{k}"] = metrics.recall_at_k(ranked[i], gold, k)
            comp = None
            if docs[i] and mode == "clara":
                counts = [cache.tokens[document_text(d)] for d in docs[i]]
                comp = sum(min(n, cfg.doc_max_length) for n in counts) / (len(counts) * cfg.n_mem)
                given_docs += len(counts)
                truncated += sum(n > cfg.doc_max_length for n in counts)
            elif docs[i]:
                comp = 1.0
            for key, value in rec.items():
                scores[key].append(value)
            if comp is not None:
                scores["compression"].append(comp)
            if gen is not None:
                scores["positions"].append(gen.context_positions[i])
                scores["tokens"].append(len(gen.token_ids[i]))
            scores["docs"].append(len(docs[i]))
            if keep_rows:
                per_row.append({"id": row.id, "question": row.question, "golden_answers": list(row.answers),
                                "prediction": pred, **{k: round(100 * v, 2) for k, v in rec.items()},
                                "retrieved": picked[i], "retrieved_titles": [d[0] for d in docs[i]],
                                "gold": list(gold),
                                "context_positions": gen.context_positions[i] if gen is not None else None,
                                "effective_compression": comp})
        bar.update(len(batch))
    bar.close()
    report = {
        "n": len(rows),
        "em": _mean(scores["em"], 100), "f1": _mean(scores["f1"], 100), "cover_em": _mean(scores["cover_em"], 100),
        "recall@1": _mean(scores["recall@1"], 100), "recall@5": _mean(scores["recall@5"], 100),
        "context_positions_mean": _mean(scores["positions"]),
        "effective_compression_mean": _mean(scores["compression"]),
        "truncated_docs_frac": round(truncated / given_docs, 4) if given_docs else None,
        "mode": mode, "retriever": retriever, "top_k": top_k if retriever else None,
        "compression_rate": cfg.compression_rate, "n_mem": cfg.n_mem, "base_model": cfg.base_model,
        "n_recall": len(scores["recall@1"]), "docs_given_mean": _mean(scores["docs"]),
        "new_tokens_mean": _mean(scores["tokens"]),
        "prefill_s": round(prefill_s, 3), "decode_s": round(decode_s, 3),
        "wall_s": round(time.perf_counter() - start, 3),
    }
    if keep_rows:
        report["rows"] = per_row
    return report


def evaluate_file(model, data: str | Path, mode: str = "clara", retriever: str | None = None, top_k: int = 5,
                  corpus: str | Path | None = None, limit: int | None = None, json_out: str | Path | None = None,
                  batch_size: int = 8, progress: bool = True, keep_rows: bool = False,
                  max_new_tokens: int = 64, retrieval_only: bool = False) -> dict:
    """`clara-edge eval` in one call: load the file (and corpus), evaluate, write the report to `json_out`."""
    _check_args(model, mode, retriever, top_k, retrieval_only)  # fail before reading a large file
    report_path(json_out, "eval")
    data_set = load_eval_set(data, corpus, limit)
    report = evaluate(model, data_set.rows, mode, retriever, top_k, data_set.candidates, batch_size, progress,
                      keep_rows, max_new_tokens, retrieval_only)
    report = {"data": str(data), "corpus": str(corpus) if corpus else None, **report}
    write_report(report, json_out, "eval")
    return report
