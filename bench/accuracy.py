"""Accuracy rows: the four dev sets x {closed-book, text RAG (BM25 / clara top-5), clara at each rate, clara + BM25,
k=50}.

Every row is one `clara_edge.evaluate.evaluate_file` call. Methods (`methods(rates)`):

  closed-book               the bare base LM, no documents
  text RAG (BM25 top-5)     the bare base LM reading BM25's top-5 as text
  text RAG (clara top-5)    the bare base LM reading the clara retriever's top-5 (first rate) as text
  clara CR{r}               the generator reading the top-5 documents' memories, for each rate r
  clara CR{r} + BM25        the first rate reading the top-5 of clara's ranking fused with BM25's (clara+bm25)
  clara CR{r} k=50          the largest rate, 50 documents (fewer when 50 do not fit a 4096 context, or when
                            a question has fewer candidates)

A row's document memories are computed once per model and run (`CachedCompression`), so the clara rows and
"text RAG (clara top-5)" share one compression of each candidate set. Quick mode evaluates the first
`QUICK_ROWS` questions of each set; a set whose questions retrieve from the pooled file (NQ) is pooled over
its first `QUICK_POOL_ROWS` rows only (a temporary subset file), which the row's `pool` field records.
"""
from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DATASETS = {"hotpotqa": "hotpotqa_dev200.jsonl", "musique": "musique_dev200.jsonl",
            "2wiki": "2wiki_dev164.jsonl", "nq": "nq_open_dev1000.jsonl"}
QUICK_ROWS = 2
QUICK_POOL_ROWS = 20
TOP_K = 5
WIDE_K = 50
WIDE_CONTEXT = 4096


@dataclass(frozen=True)
class Method:
    name: str
    mode: str                 # evaluate mode
    retriever: str | None
    rate: int | None          # which model answers / retrieves (None: any, the base LM answers)
    top_k: int | None

    @property
    def compression(self) -> int | None:
        return self.rate if self.mode == "clara" else None


def methods(rates: Sequence[int]) -> list[Method]:
    first, last = rates[0], rates[-1]
    out = [Method("closed-book", "closed-book", None, None, None),
           Method("text RAG (BM25 top-5)", "text", "bm25", None, TOP_K),
           Method(f"text RAG (clara CR{first} top-5)", "text", "clara", first, TOP_K)]
    out += [Method(f"clara CR{r}", "clara", "clara", r, TOP_K) for r in rates]
    out.append(Method(f"clara CR{first} + BM25", "clara", "clara+bm25", first, TOP_K))
    out.append(Method(f"clara CR{last} k={WIDE_K}", "clara", "clara", last, WIDE_K))
    return out


class CachedCompression:
    """A model whose `compress` remembers each document text's memory, so several evaluations share it."""

    def __init__(self, model) -> None:
        self._model = model
        self._memories: dict[str, torch.Tensor] = {}

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def compress(self, docs: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        missing = [d for d in dict.fromkeys(docs) if d not in self._memories]
        if missing:
            self._memories.update(zip(missing, self._model.compress(missing, batch_size=batch_size)))
        return torch.stack([self._memories[d] for d in docs])


def wide_k(model, context: int = WIDE_CONTEXT, answer: int = 64) -> int:
    """min(WIDE_K, the documents that fit `context` positions at this model's rate)."""
    from clara_edge.budget import make_budget, prompt_overhead
    overhead = prompt_overhead(model, "a question of ordinary length, about twelve words long?")
    budget = make_budget(min(context, model.max_positions), model.max_positions, overhead,
                         model.config.n_mem, answer)
    return min(WIDE_K, budget.max_docs)


def dataset_files(folder: Path) -> dict[str, Path]:
    """The dev sets present in `folder` (the four known names, else every *.jsonl by its stem)."""
    known = {name: folder / file for name, file in DATASETS.items() if (folder / file).is_file()}
    return known or {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def _is_pooled(path: Path) -> bool:
    """Whether the file's questions retrieve from the pooled corpus (their rows hold <= 1 document)."""
    with open(path, encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "{}")
    return len(json.loads(first).get("docs") or []) <= 1


def _subset(path: Path, rows: int, tmp: Path) -> Path:
    out = tmp / path.name
    with open(path, encoding="utf-8") as src:
        lines = [line for line in src if line.strip()][:rows]
    out.write_text("".join(lines), encoding="utf-8")
    return out


def run_accuracy(load: Callable[[int], object], folder: Path, rates: Sequence[int], *, quick: bool,
                 limit: int | None = None, max_new_tokens: int | None = None, batch_size: int = 4,
                 log: Callable[[str], None] = print) -> list[dict]:
    """Accuracy rows for every dev set in `folder` and every method; `load(rate)` gives the model at a rate.

    One model is in memory at a time. A method whose model cannot be loaded or evaluated gets a row with
    `note` and null scores.
    """
    limit = limit if limit is not None else (QUICK_ROWS if quick else None)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else (16 if quick else 64)
    files = dataset_files(folder)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs = {name: _input(path, quick, limit, Path(tmp)) for name, path in files.items()}
        for group in _by_rate(methods(rates), rates[0]):
            model = None
            gc.collect()
            try:
                model = CachedCompression(load(group[0].rate or rates[0]))
            except Exception as e:  # a model fixed at another rate, a failed load: record and go on
                rows += [_row(name, m, None, note=f"{type(e).__name__}: {e}") for m in group for name in files]
                continue
            for m in group:
                top_k = wide_k(model) if m.top_k == WIDE_K else m.top_k
                for name, (path, pool) in inputs.items():
                    t0 = time.perf_counter()
                    try:
                        report = _evaluate(model, path, m, top_k, limit, max_new_tokens, batch_size)
                    except Exception as e:
                        rows.append(_row(name, m, None, note=f"{type(e).__name__}: {e}"))
                        log(f"  {name:<9} {m.name}: failed ({e})")
                        continue
                    rows.append(_row(name, m, report, top_k=top_k, pool=pool))
                    log(f"  {name:<9} {m.name:<26} F1 {report['f1']:6.2f}  positions "
                        f"{report['context_positions_mean']:7.1f}  ({time.perf_counter() - t0:.0f} s)")
            del model
    gc.collect()
    return rows


def _input(path: Path, quick: bool, limit: int | None, tmp: Path) -> tuple[Path, str | None]:
    """The file to evaluate and how its pool was cut: quick mode pools NQ-like files over their first rows."""
    if not quick or not _is_pooled(path):
        return path, None
    n = max(limit or 0, QUICK_POOL_ROWS)
    return _subset(path, n, tmp), f"pooled over the first {n} rows"


def _by_rate(ms: Sequence[Method], default: int) -> list[list[Method]]:
    """Methods grouped by the model they need (one model in memory at a time), in first-use order."""
    groups: dict[int, list[Method]] = {}
    for m in ms:
        groups.setdefault(m.rate or default, []).append(m)
    return list(groups.values())


def _evaluate(model, path: Path, m: Method, top_k: int | None, limit: int | None, max_new_tokens: int,
              batch_size: int) -> dict:
    from clara_edge.evaluate import evaluate_file
    return evaluate_file(model, path, mode=m.mode, retriever=m.retriever, top_k=top_k or TOP_K, limit=limit,
                         batch_size=batch_size, progress=False, max_new_tokens=max_new_tokens)


def _row(dataset: str, m: Method, report: dict | None, top_k: int | None = None, pool: str | None = None,
         note: str = "") -> dict:
    report = report or {}
    return {"dataset": dataset, "method": m.name, "compression": m.compression, "top_k": top_k,
            "em": report.get("em"), "f1": report.get("f1"), "cover_em": report.get("cover_em"),
            "recall@1": report.get("recall@1"), "recall@5": report.get("recall@5"),
            "context_positions": report.get("context_positions_mean"),
            "effective_compression": report.get("effective_compression_mean"),
            "n": report.get("n"), "docs_given": report.get("docs_given_mean"),
            "new_tokens": report.get("new_tokens_mean"), "wall_s": report.get("wall_s"),
            "decode_s": report.get("decode_s"),
            "pool": pool, "note": note[:300]}
