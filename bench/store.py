"""Memory-store benchmark: exact retrieval latency as the store grows, and bytes per stored document.

    python -m clara_edge.bench.store [--json OUT] [--sizes 1000 10000 100000] [--reps 10] [--threads N]
                                     [--faiss] [--fused] [--model M]

For each configuration (n_mem 16 = compression 16 and n_mem 4 = compression 64 at doc_max_length 256, hidden 576
as in SmolLM2-135M; fp16 and int8 records) one store is grown with synthetic Gaussian memories and 1 KB chunk
texts (words drawn from a Zipf law over a 50,000-word vocabulary, as natural text's are) to each size in turn,
and `retrieval.search` (exact flattened cosine, top-10 over the memory map) is timed for 1 query and for a
batch of 8: two warm-up calls, then mean ± std over --reps calls, the map in the page cache. Bytes per document
are measured from the files (vector record + SQLite row with its text) and, for other rates and int4, computed
from the record layout. `--faiss` adds an IndexFlatIP row per size, `--fused` a `retrieval.fused_search` row
(clara+bm25: the cosine ranking fused with BM25's over the chunk texts); their first call, which builds the
index, is reported apart, and for clara+bm25 also a new reader's first call once the index is saved in the store
(as `clara-edge index` leaves it). `--model M` also indexes the bundled demo corpus with that model and reports docs/s.
Timings depend on the machine and its load: the JSON records both.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from clara_edge.corpus import Chunk
from clara_edge.errors import ClaraError
from clara_edge.reports import report_path, write_report
from clara_edge.retrieval import fused_search, save_text_index, search
from clara_edge.store import DTYPES, MemoryStore, StoreSpec, record_dtype

HIDDEN = 576
DOC_MAX_LENGTH = 256
RATES = (4, 16, 32, 64, 128)
TEXT_CHARS = 1024  # about the 256 tokens a chunk holds
VOCAB = 50_000
ZIPF_A = 1.2
ADD_ROWS = 2048  # rows per append while growing the store


def synthetic_texts(n: int, rng: np.random.Generator, words: int = 200) -> list[str]:
    """`n` texts of Zipf-distributed words ("w17 w3 w2290 ..."), cut to TEXT_CHARS: BM25 sees a realistic
    vocabulary (a few frequent words, a long tail of rare ones) instead of one repeated text."""
    ranks = rng.zipf(ZIPF_A, size=(n, words)) % VOCAB
    return [" ".join(f"w{r}" for r in row)[:TEXT_CHARS] for row in ranks]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m clara_edge.bench.store", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="OUT", help="write the rows, byte sizes and machine facts here")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    p.add_argument("--n-mem", type=int, nargs="+", default=[16, 4])
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=["fp16", "int8"])
    p.add_argument("--reps", type=int, default=10, help="timed searches per row (after 2 warm-up calls)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--faiss", action="store_true", help="also time the faiss IndexFlatIP path")
    p.add_argument("--fused", action="store_true", help="also time fused_search (cosine fused with BM25)")
    p.add_argument("--model", default=None, help="also index the bundled demo corpus with this model (docs/s)")
    p.add_argument("--dir", default=None, help="where to build the stores (default: a temporary directory)")
    p.add_argument("--threads", type=int, default=None, help="torch (and faiss) threads (default: torch's)")
    args = p.parse_args(argv)
    if min(args.reps, *args.sizes, *args.n_mem, args.k) < 1:
        p.error("--reps, --sizes, --n-mem and --k must be positive")
    return args


def timed(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    """Mean and std of `fn`'s wall time in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.mean(times), statistics.stdev(times) if len(times) > 1 else 0.0


def grow(store: MemoryStore, to: int, gen: torch.Generator, rng: np.random.Generator) -> None:
    """Append synthetic chunks (one source per append) until the store holds `to` rows."""
    have = store.info()["rows"]
    while have < to:
        n = min(ADD_ROWS, to - have)
        source = f"synthetic/{have:08d}"
        mem = torch.randn(n, store.spec.n_mem, store.spec.hidden, generator=gen)
        store.add([Chunk(source, "title", text, 0, i) for i, text in enumerate(synthetic_texts(n, rng))], mem,
                  begin={source: source}, complete=[source])
        have += n


def first_and_timed(fn, reps: int) -> tuple[float, float, float]:
    """(first call ms, mean ms, std ms) of `fn`: the first call builds an index, the rest reuse it."""
    start = time.perf_counter()
    fn()
    first = (time.perf_counter() - start) * 1e3
    return (first, *timed(fn, reps))


def bench_config(root: Path, n_mem: int, dtype: str, args: argparse.Namespace) -> tuple[list[dict], dict]:
    spec = StoreSpec("synthetic", DOC_MAX_LENGTH // n_mem, n_mem, HIDDEN, dtype, "synthetic")
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    queries = torch.randn(8, n_mem, HIDDEN, generator=gen)
    question = synthetic_texts(1, rng, words=8)[0]
    rows = []
    path = root / f"store-{n_mem}-{dtype}"
    with MemoryStore.create(path, spec) as store:
        for n in sorted(args.sizes):
            grow(store, n, gen, rng)
            info = store.info()
            base = {"n_mem": n_mem, "compression": spec.compression_rate, "hidden": HIDDEN, "dtype": dtype,
                    "docs": n, "bytes_per_doc": info["bytes"] / n}
            for q in (1, 8):
                mean, std = timed(lambda: search(store, queries[:q], args.k), args.reps)
                rows.append({**base, "method": "exact", "queries": q, "ms": mean, "ms_std": std})
            indexed = []  # methods whose first call builds an index over the store
            if args.faiss:
                indexed.append(("faiss-flat", lambda: search(store, queries[:1], args.k, use_faiss=True)))
            if args.fused:
                indexed.append(("clara+bm25", lambda: fused_search(store, queries[:1], [question], args.k)))
            for method, fn in indexed:
                first, mean, std = first_and_timed(fn, args.reps)
                rows.append({**base, "method": method, "queries": 1, "ms": mean, "ms_std": std,
                             "first_call_ms": first})
            if args.fused:  # as after `clara-edge index`: the index saved in the store, a new reader maps it
                save_text_index(store)
                with MemoryStore.open(path) as reader:
                    start = time.perf_counter()
                    fused_search(reader, queries[:1], [question], args.k)
                    rows[-1]["first_call_saved_ms"] = (time.perf_counter() - start) * 1e3
            print(format_rows(rows[-(2 + len(indexed)):], header=n == min(args.sizes)), flush=True)
        sqlite_bytes = sum(p.stat().st_size for p in path.iterdir() if p.name.startswith("store.sqlite"))
    shutil.rmtree(path)  # free the disk before the next configuration
    return rows, {"record_bytes": record_dtype(spec).itemsize, "sqlite_bytes_per_doc": sqlite_bytes / max(args.sizes)}


def byte_table(sqlite_per_doc: float) -> list[dict]:
    """Bytes per document for each rate and dtype: the record layout plus the measured SQLite share."""
    return [{"compression": rate, "n_mem": DOC_MAX_LENGTH // rate, "dtype": dtype,
             "vector_bytes": (r := record_dtype(StoreSpec("", rate, DOC_MAX_LENGTH // rate, HIDDEN, dtype)).itemsize),
             "total_bytes": round(r + sqlite_per_doc)} for rate in RATES for dtype in DTYPES]


def format_rows(rows: list[dict], header: bool = True) -> str:
    cols = ["n_mem", "compression", "dtype", "docs", "bytes_per_doc", "method", "queries", "ms", "first call ms"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)] if header else []
    for r in rows:
        ms = f"{r['ms']:.2f} ± {r['ms_std']:.2f}"
        first = f"{r['first_call_ms']:.0f}" if "first_call_ms" in r else "-"
        if "first_call_saved_ms" in r:
            first += f" (saved: {r['first_call_saved_ms']:.0f})"
        cells = [str(r["n_mem"]), str(r["compression"]), r["dtype"], str(r["docs"]), f"{r['bytes_per_doc']:.0f}",
                 r["method"], str(r["queries"]), ms, first]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def index_demo(backend, model_spec: str) -> dict:
    from clara_edge.indexing import index_paths

    corpus = resources.files("clara_edge") / "demo_corpus"
    with tempfile.TemporaryDirectory() as tmp:
        report = index_paths(backend, [Path(str(corpus))], Path(tmp) / "s", progress=False)
    return {"model": model_spec, **report.to_dict()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except ClaraError as e:  # bad input: one line, not a traceback
        print(f"python -m clara_edge.bench.store: error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    report_path(args.json, "store benchmark")  # before minutes of timing, not after
    backend = None
    if args.model:
        from clara_edge.backend import open_backend
        backend = open_backend(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
        if args.faiss:
            import faiss
            faiss.omp_set_num_threads(args.threads)
    out: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                             "torch_threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
                 "rows": [], "bytes": {}}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n_mem in args.n_mem:
            for dtype in args.dtypes:
                rows, sizes = bench_config(Path(tmp), n_mem, dtype, args)
                out["rows"] += rows
                out["bytes"][f"n_mem{n_mem}-{dtype}"] = sizes
    sqlite_per_doc = statistics.mean(b["sqlite_bytes_per_doc"] for b in out["bytes"].values())
    out["bytes_per_doc"] = byte_table(sqlite_per_doc)
    out["machine"]["loadavg_end"] = os.getloadavg()
    if backend is not None:
        out["index"] = index_demo(backend, args.model)
        print(f"\nindex: {out['index']['chunks_added']} chunks at {out['index']['docs_per_s']:.1f} docs/s")
    print(f"\nbytes per document (vector record + {sqlite_per_doc:.0f} B of SQLite for a ~1 KB chunk text):")
    print("| compression | n_mem | " + " | ".join(DTYPES) + " |\n|---:|---:|" + "---:|" * len(DTYPES))
    for rate in RATES:
        cells = [str(b["total_bytes"]) for b in out["bytes_per_doc"] if b["compression"] == rate]
        print(f"| {rate} | {DOC_MAX_LENGTH // rate} | " + " | ".join(cells) + " |")
    write_report(out, args.json, "store benchmark")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
