"""Latency and memory of one question, llama-bench style: CLaRa vs text RAG at k = 5, 20, 100, per backend.

Each (backend, method) pair runs in its own subprocess (`python -m clara_edge.bench.latency --worker SPEC`),
so its peak RSS (VmHWM: model load + compression + every k) is not polluted by other backends or by the
parent's accuracy models. Inside a worker, per k: one warm-up question, then `reps` timed questions (real
dev-set questions in turn), reported as mean ± std:

  query_encode_s   clara: the query adapter over the question; text: none (BM25 tokenises in retrieval)
  retrieval_s      clara: exact cosine top-k over the pool's flattened memories; text: BM25 top-k over the
                   pool's texts (index built once, outside the timing)
  ttft_s           generator level: from the generate call to the first answer token (prefill + first pick),
                   with the runtime's prefix cache: the KV of what the prompt shares with the previous
                   question's (the chat head, 37 positions for SmolLM2) is reused; reused_positions says how many
  ttft_cold_s      the same prompt prefilled whole (a fresh KV cache), measured just before
  decode_tokens_per_s   tokens after the first / time after the first, the closing EOS counted as generated
                   (as the llama.cpp anchor counts it): an answer's every decode forward, so short answers are
                   not under-rated (null when the first token ended the answer)
  e2e_s            query_encode_s + retrieval_s + the whole generate call (one answer of <= max_new_tokens)
  kv_bytes         2 * layers * kv_heads * head_dim * context positions * bytes per element (the prompt's
                   KV cache; the answer's tokens add the same per position)

Documents are real dev-set passages (~150 tokens: HotpotQA's first rows), with "title: text" as everywhere.
Clara memories come from compressing `compress_docs` of them with the backend under test (after a one-document
warm-up; the worker's `compress_s`: what indexing costs per document) and cycling them up to the pool size
(generator-level timing does not depend on which memories are read). A configuration whose
prompt does not fit the model's window is reported with ttft null and a note "exceeds context (N > M)".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

KS = (5, 20, 100)
POOL = 100                 # documents retrieval ranks (and the largest k)
BACKENDS = ("torch", "onnx-fp32", "onnx-int8", "onnx-int4", "coreml", "cuda", "cuda-triton")
QUICK_BACKENDS = ("torch", "onnx-int4")
ALIASES = {"onnx": ("onnx-fp32", "onnx-int8", "onnx-int4"), "ort": ("onnx-fp32", "onnx-int8", "onnx-int4")}
TORCH_KINDS = ("torch", "cuda", "cuda-triton")  # backends that also run text RAG (generate_text_rag)
SYNTHETIC_DOC = ("The committee met in the spring to review the survey of the river basin, its tributaries, "
                 "the towns along its banks and the records of floods kept since the eighteenth century. ") * 5
LATENCY_DATASET = "hotpotqa_dev200.jsonl"


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None for a single value: no spread was measured); (None, None) for
    no values."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    """'mean ± std' (scaled); 'mean (n=1)' without a spread; '-' when there is no value."""
    if mean is None:
        return "-"
    if std is None:
        return f"{mean * scale:.{digits}f} (n=1)"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def expand_backends(names: Sequence[str] | None, quick: bool) -> list[str]:
    """User backend names (comma lists and aliases expanded, order kept, duplicates dropped).

    None -> the mode's default; an unknown name is a ClaraError.
    """
    from clara_edge.errors import ClaraError
    out: list[str] = []
    for name in names or (QUICK_BACKENDS if quick else BACKENDS):
        for item in str(name).split(","):
            item = item.strip().lower()
            if item and item not in BACKENDS and item not in ALIASES:
                raise ClaraError(f"unknown bench backend {item!r}: use {', '.join(BACKENDS)} or onnx (all ORT rows)")
            out += [one for one in ALIASES.get(item, (item,)) if one and one not in out]
    if not out:
        raise ClaraError(f"no bench backend named: use {', '.join(BACKENDS)} or onnx (all ORT rows)")
    return out


@dataclass
class LatencyRow:
    method: str                  # "clara CR16" | "text RAG"
    backend: str
    k: int
    positions: int | None = None  # prompt positions the generator reads
    max_positions: int | None = None
    ttft_s: float | None = None
    ttft_std_s: float | None = None
    ttft_cold_s: float | None = None
    ttft_cold_std_s: float | None = None
    prefill_tokens_per_s: float | None = None
    reused_positions: float | None = None
    decode_tokens_per_s: float | None = None
    decode_std: float | None = None
    query_encode_s: float | None = None
    query_encode_std_s: float | None = None
    retrieval_s: float | None = None
    retrieval_std_s: float | None = None
    e2e_s: float | None = None
    e2e_std_s: float | None = None
    new_tokens: float | None = None
    peak_rss_mb: float | None = None
    kv_bytes: int | None = None
    reps: int = 0
    note: str = ""


# ------------------------------------------------------------------------------------------ KV cache
def kv_geometry(backend) -> tuple[int, int, int, int] | None:
    """(layers, kv_heads, head_dim, bytes per element) of a backend's generator KV cache, None if unknown."""
    manifest = getattr(backend, "manifest", None)
    if manifest and "num_layers" in manifest:
        width = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(manifest.get("kv_dtype", "float32")), 4)
        return int(manifest["num_layers"]), int(manifest["num_kv_heads"]), int(manifest["head_dim"]), width
    lm = getattr(backend, "lm", None)
    if lm is None:
        return None
    cfg = lm.get_base_model().config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim), backend.dtype.itemsize


def kv_bytes(geometry: tuple[int, int, int, int] | None, positions: int | None) -> int | None:
    """2 (K and V) * layers * kv_heads * head_dim * positions * bytes per element."""
    if geometry is None or positions is None:
        return None
    layers, kv_heads, head_dim, width = geometry
    return 2 * layers * kv_heads * head_dim * positions * width


# ------------------------------------------------------------------------------------------ documents
def eval_dir(data_dir: Path | None) -> Path | None:
    """The folder holding the dev-set JSONL files: DATA/eval when it exists, else DATA itself."""
    if data_dir is None:
        return None
    data_dir = Path(data_dir).expanduser()
    return data_dir / "eval" if (data_dir / "eval").is_dir() else data_dir


def latency_source(data_dir: Path | None) -> Path | None:
    """The dev-set file the latency documents come from (HotpotQA, else any JSONL with documents)."""
    folder = eval_dir(data_dir)
    if folder is None or not folder.is_dir():
        return None
    preferred = folder / LATENCY_DATASET
    return preferred if preferred.is_file() else next(iter(sorted(folder.glob("*.jsonl"))), None)


def load_documents(source: str | Path | None, pool: int = POOL) -> tuple[list[str], list[tuple[str, str]]]:
    """Questions and up to `pool` unique (title, text) documents from a dev-set file (synthetic if none)."""
    questions: list[str] = []
    docs: dict[tuple[str, str], None] = {}
    if source is not None and Path(source).is_file():
        from clara_edge.datasets import load_eval_rows
        for row in load_eval_rows(source):
            questions.append(row.question)
            for doc in row.docs:
                if len(docs) < pool:
                    docs.setdefault(doc, None)
            if len(docs) >= pool and len(questions) >= 8:
                break
    if not docs:
        docs = {(f"Synthetic {i}", SYNTHETIC_DOC): None for i in range(pool)}
    if not questions:
        questions = ["Which river basin did the committee survey?"]
    listed = list(docs)
    return questions, [listed[i % len(listed)] for i in range(pool)]


# ------------------------------------------------------------------------------------------ worker
@dataclass
class WorkerSpec:
    backend: str                 # label: torch | onnx-int4 | cuda | ...
    method: str                  # clara | text
    model: str | None = None     # torch model spec, or an export directory for exported backends
    base: str | None = None
    device: str | None = None
    dtype: str | None = None
    compression: int = 16
    docs_file: str | None = None
    ks: list[int] = field(default_factory=lambda: list(KS))
    reps: int = 5
    warmup: int = 1
    max_new_tokens: int = 32
    compress_docs: int = POOL
    pool: int = POOL
    threads: int | None = None


def _open_worker_backend(spec: WorkerSpec):
    from clara_edge.backend import export_manifest, open_backend
    if spec.model and export_manifest(Path(spec.model)) is not None:
        manifest = export_manifest(Path(spec.model))
        if manifest.get("format") == "onnx":
            from clara_edge.onnx_backend import OnnxBackend
            return OnnxBackend(Path(spec.model), manifest, threads=spec.threads)
        return open_backend(spec.model)
    device = "cuda" if spec.backend.startswith("cuda") else (spec.device or "cpu")  # "torch" = the CPU row
    return open_backend(spec.model, "torch", spec.compression, device, spec.dtype, spec.base)


def _timed(fn: Callable[[], object], backend=None) -> tuple[float, object]:
    """Wall time of fn(), with `backend`'s CUDA work finished inside it (kernels launch asynchronously)."""
    start = time.perf_counter()
    out = fn()
    _sync(backend)
    return time.perf_counter() - start, out


def _sync(backend) -> None:
    import torch
    if getattr(backend, "device", None) is not None and backend.device.type == "cuda":
        torch.cuda.synchronize()


def text_rag_docs(bm25, docs: Sequence[tuple[str, str]], question: str, k: int) -> list[tuple[str, str]]:
    """The documents text RAG reads for `question`: the pool's BM25 top k (`bm25` indexes `docs`)."""
    return [docs[i] for i in bm25.top_k(question, k)]


def prompt_positions(backend, method: str, questions: Sequence[str], docs: Sequence[tuple[str, str]], k: int,
                     bm25=None) -> int:
    """The longest prompt of `questions` with k documents: memory blocks (n_mem + 1 positions whichever they
    are), or for text the documents `bm25` ranks first for each question."""
    if method == "clara":
        return max(len(backend.prompt_ids(q, k)) for q in questions)
    return max(len(backend.text_prompt_ids(q, text_rag_docs(bm25, docs, q, k))) for q in questions)


def max_k_in_context(positions: Callable[[int], int], limit: int, most: int) -> int:
    """The largest k <= most with positions(k) <= limit (positions grows with k), by bisection."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if positions(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _method_label(spec: WorkerSpec, backend) -> str:
    return f"clara CR{backend.config.compression_rate}" if spec.method == "clara" else "text RAG"


def run_worker(spec: WorkerSpec) -> dict:
    """Measure one (backend, method) at every k in this process; returns rows and the process's peak RSS."""
    import torch

    from clara_edge.bm25 import BM25Index
    from clara_edge.datasets import document_text
    from clara_edge.prefix_cache import PrefixCache
    from clara_edge.retrieval import cosine_scores, top_k
    from clara_edge.runtime import peak_rss_mb

    if spec.threads:
        torch.set_num_threads(spec.threads)
    load_s, backend = _timed(lambda: _open_worker_backend(spec))
    questions, docs = load_documents(spec.docs_file, spec.pool)
    texts = [document_text(d) for d in docs]
    geometry = kv_geometry(backend)
    max_positions = getattr(backend, "max_positions", None)
    label = _method_label(spec, backend)
    bm25 = BM25Index(docs) if spec.method == "text" else None
    pool_mem = None
    compress_s = None
    if spec.method == "clara":
        unique = list(dict.fromkeys(texts))[: max(1, spec.compress_docs)]
        backend.compress(unique[:1])  # warm-up: an export opens its compressor session on first use
        compress_s, mem = _timed(lambda: backend.compress(unique), backend)
        pool_mem = torch.stack([mem[i % len(unique)] for i in range(len(texts))])
    # as the runtime keeps one: each question reuses what it shares with the last; synthetic documents (no dev
    # set) make every prompt the same, which would reuse all of it, so there the TTFT is a whole prefill
    synthetic = spec.docs_file is None or not Path(spec.docs_file).is_file()
    prefix_cache = None if synthetic else PrefixCache()
    asked = list(dict.fromkeys(questions[rep % len(questions)] for rep in range(spec.warmup + spec.reps)))
    rows = []
    for k in spec.ks:
        row = LatencyRow(label, spec.backend, k, max_positions=max_positions)
        if k > len(docs):
            row.note = f"pool holds {len(docs)} documents"
            rows.append(row)
            continue
        row.positions = prompt_positions(backend, spec.method, asked, docs, k, bm25)  # the fit check's
        row.kv_bytes = kv_bytes(geometry, row.positions)
        if max_positions and row.positions + spec.max_new_tokens > max_positions:
            row.note = (f"exceeds context ({row.positions} positions > {max_positions})"
                        if row.positions > max_positions else
                        f"exceeds context ({row.positions} positions + {spec.max_new_tokens} answer tokens "
                        f"> {max_positions})")
            rows.append(row)
            continue
        samples: dict[str, list[float]] = {"encode": [], "retrieval": [], "ttft": [], "cold": [], "reused": [],
                                           "decode": [], "e2e": [], "tokens": [], "positions": [], "prefill": []}
        for rep in range(spec.warmup + spec.reps):
            question = questions[rep % len(questions)]
            if spec.method == "clara":
                encode_s, query = _timed(lambda: backend.encode_query([question]), backend)
                retrieval_s, (_, ids) = _timed(
                    lambda: top_k(cosine_scores(query, pool_mem, backend.retrieval_centre), k), backend)
                picked = pool_mem[ids[0]]

                def answer(tokens: int, cache: PrefixCache | None):
                    return backend.generate([question], [picked], max_new_tokens=tokens, prefix_cache=cache)
            else:
                encode_s = 0.0
                retrieval_s, picked_docs = _timed(lambda: [text_rag_docs(bm25, docs, question, k)])

                def answer(tokens: int, cache: PrefixCache | None):
                    return backend.generate_text_rag([question], picked_docs, max_new_tokens=tokens,
                                                     prefix_cache=cache)
            if rep >= spec.warmup:
                cold = answer(1, None)
                samples["cold"].append(cold.prefill_s)
                samples["prefill"].append(cold.context_positions[0] / cold.prefill_s if cold.prefill_s > 0 else None)
            gen_s, gen = _timed(lambda: answer(spec.max_new_tokens, prefix_cache), backend)
            if rep < spec.warmup:
                continue
            samples["positions"].append(gen.context_positions[0])
            samples["reused"].append(gen.reused_positions)
            n = len(gen.token_ids[0])
            samples["encode"].append(encode_s)
            samples["retrieval"].append(retrieval_s)
            samples["ttft"].append(gen.prefill_s)
            samples["decode"].append(gen.decode_steps / gen.decode_s if gen.decode_steps and gen.decode_s > 0 else None)
            samples["e2e"].append(encode_s + retrieval_s + gen_s)
            samples["tokens"].append(n)
        row.positions = round(mean_std(samples["positions"])[0])  # each question's own retrieved documents
        row.kv_bytes = kv_bytes(geometry, row.positions)
        row.reps = len(samples["ttft"])
        row.prefill_tokens_per_s = mean_std(samples["prefill"])[0]  # per question: its prompt over its prefill
        row.ttft_s, row.ttft_std_s = mean_std(samples["ttft"])
        row.ttft_cold_s, row.ttft_cold_std_s = mean_std(samples["cold"])
        row.reused_positions = mean_std(samples["reused"])[0]
        row.decode_tokens_per_s, row.decode_std = mean_std(samples["decode"])
        row.query_encode_s, row.query_encode_std_s = mean_std(samples["encode"])
        row.retrieval_s, row.retrieval_std_s = mean_std(samples["retrieval"])
        row.e2e_s, row.e2e_std_s = mean_std(samples["e2e"])
        row.new_tokens = mean_std(samples["tokens"])[0]
        if spec.method == "text":
            row.query_encode_s = row.query_encode_std_s = None
        rows.append(row)
        gc.collect()
    peak = peak_rss_mb()
    for row in rows:
        if row.reps:  # rows that ran (not those over the context or the pool)
            row.peak_rss_mb = round(peak, 1)
    extra = {}
    if getattr(backend, "device", None) is not None and backend.device.type == "cuda":
        extra["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    fits = None
    if max_positions:
        fits = max_k_in_context(lambda k: prompt_positions(backend, spec.method, asked, docs, k, bm25),
                                max_positions - spec.max_new_tokens, len(docs))
    return {"rows": [asdict(r) for r in rows], "peak_rss_mb": round(peak, 1), "load_s": round(load_s, 3),
            "max_k_in_context": fits,
            "compress_s": round(compress_s, 3) if compress_s is not None else None,
            "compressed_docs": min(spec.compress_docs, len(set(texts))) if spec.method == "clara" else 0,
            "threads": torch.get_num_threads(), **extra}


# ------------------------------------------------------------------------------------------ parent side
def unavailable_rows(backend: str, methods: Sequence[str], ks: Sequence[int], reason: str) -> list[dict]:
    return [asdict(LatencyRow(m, backend, k, note=f"unavailable: {reason}")) for m in methods for k in ks]


def backend_unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine (None when it can, modulo its export)."""
    import platform

    import torch
    if backend.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device on this machine"
    if backend == "cuda-triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if backend == "coreml" and platform.system() != "Darwin":
        return "Core ML needs macOS"
    if backend.startswith("onnx"):
        try:
            import onnxruntime  # noqa: F401

            import clara_edge.onnx_backend  # noqa: F401
        except ImportError as e:
            return f"ONNX backend does not import ({e})"
    return None


def export_cache() -> Path:
    """Where benchmark exports are kept between runs (one folder per model fingerprint and backend)."""
    from clara_edge.base_models import cache_root
    return cache_root() / "bench-exports"


def _cached(model, backend: str) -> Path | None:
    """The cached export of `model` for `backend`, if one exists, is whole and was made from this model by
    this exporter."""
    from clara_edge.backend import EXPORTER_REVISION, export_manifest
    from clara_edge.errors import ClaraError
    from clara_edge.model import ROLES
    path = export_cache() / f"{model.fingerprint(ROLES)}-{backend}"
    try:
        manifest = export_manifest(path)
        if manifest is None or manifest.get("model_fingerprint") != model.fingerprint(ROLES) \
                or manifest.get("exporter_revision", 1) != EXPORTER_REVISION:
            return None
        if manifest.get("format") == "onnx":
            from clara_edge.onnx_backend import read_manifest
            read_manifest(path, "onnx", manifest)
    except ClaraError:
        return None
    return path


def make_exports(model, backends: Sequence[str], log: Callable[[str], None], export: bool = True) -> dict[str, object]:
    """Export `model` for each exported backend: {backend: export dir | 'unavailable: reason'}.

    Exports are cached under `export_cache()` and reused while the model's fingerprint matches; with
    `export=False` only cached ones are used (tracing the graphs takes minutes on a small CPU). ONNX graphs
    are traced once and written per quantisation (what `export_model` does for one).
    """
    from clara_edge.model import ROLES
    out: dict[str, object] = {}
    wanted = [b for b in backends if (b.startswith("onnx-") or b == "coreml") and backend_unavailable(b) is None]
    for name in wanted:
        hit = _cached(model, name)
        if hit is not None:
            out[name] = hit
            log(f"  {name}: cached export {hit}")
        elif not export:
            out[name] = ("unavailable: no cached export and --quick does not export (tracing takes minutes); "
                         f"name it with --backend {name}, or run once without --quick")
    todo = [b for b in wanted if b not in out]
    target = export_cache()
    onnx = [b for b in todo if b.startswith("onnx-")]
    if onnx:
        try:
            from clara_edge.export.onnx_export import trace_graphs, write_onnx_export
            t0 = time.perf_counter()
            traced = trace_graphs(model)
            log(f"  traced the ONNX graphs in {time.perf_counter() - t0:.0f} s")
            for name in onnx:
                t0 = time.perf_counter()
                out[name] = write_onnx_export(model, traced, target / f"{model.fingerprint(ROLES)}-{name}",
                                              name.split("-", 1)[1])
                log(f"  exported {name} in {time.perf_counter() - t0:.0f} s")
            del traced
        except Exception as e:  # an unfinished exporter may fail in many ways: record it, keep benchmarking
            reason = f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            for name in onnx:
                out.setdefault(name, f"unavailable: {reason}")
    if "coreml" in todo:
        try:
            from clara_edge.export.api import export_model
            out["coreml"] = export_model(model, "coreml", "fp16", target / f"{model.fingerprint(ROLES)}-coreml")
        except Exception as e:
            out["coreml"] = f"unavailable: Core ML export failed: {type(e).__name__}: {str(e)[:160]}"
    gc.collect()
    return out


def run_in_subprocess(module: str, payload: dict, env: dict[str, str] | None = None,
                      timeout: float | None = None) -> dict:
    """`python -m MODULE --worker FILE --result FILE` in a fresh interpreter -> the result JSON.

    The payload travels in a file: prompts of thousands of tokens exceed what one command-line argument may
    hold (128 KiB on Linux). Any failure, a native crash included (a llama.cpp built for other CPU features dies
    of SIGILL), comes back as {'error': reason} instead of taking the benchmark down.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out, spec = Path(tmp) / "result.json", Path(tmp) / "worker.json"
        spec.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", module, "--worker", str(spec), "--result", str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})},
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            code = proc.returncode
            how = f"died of {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"worker {how}: {tail[:200]}"}
        return json.loads(out.read_text())


def worker_main(argv: list[str] | None, module: str, work: Callable[[dict], dict]) -> int:
    """The entry point of a benchmark worker process (see `run_in_subprocess`)."""
    p = argparse.ArgumentParser(prog=f"python -m {module}", description="a `clara-edge bench` worker")
    p.add_argument("--worker", required=True, help="a JSON file of the worker's parameters")
    p.add_argument("--result", required=True, help="where to write the result JSON")
    args = p.parse_args(argv)
    from clara_edge.quiet import quiet_libraries
    quiet_libraries()  # as the CLI does (CLARA_EDGE_DEBUG=1 keeps warnings)
    Path(args.result).write_text(json.dumps(work(json.loads(Path(args.worker).read_text()))) + "\n")
    return 0


def run_worker_subprocess(spec: WorkerSpec, timeout: float | None = None) -> dict:
    """Run one latency worker in a fresh interpreter; {'error': ...} when it fails."""
    env = {"cuda-triton": {"CLARA_EDGE_ATTENTION": "triton"}, "cuda": {"CLARA_EDGE_ATTENTION": "sdpa"}}
    return run_in_subprocess("clara_edge.bench.latency", asdict(spec), env.get(spec.backend), timeout)


def run_latency(model: str | None, backends: Sequence[str], exports: dict[str, object], *, quick: bool,
                data_dir: Path | None, compression: int = 16, base: str | None = None, device: str | None = None,
                dtype: str | None = None, threads: int | None = None, ks: Sequence[int] = KS,
                reps: int | None = None, max_new_tokens: int | None = None,
                log: Callable[[str], None] = print) -> tuple[list[dict], list[dict]]:
    """Latency rows for every backend (unavailable ones as note rows) and the per-worker facts."""
    reps = reps if reps is not None else (2 if quick else 5)
    max_new_tokens = max_new_tokens if max_new_tokens is not None else (16 if quick else 32)
    source = latency_source(data_dir)
    rows: list[dict] = []
    workers: list[dict] = []
    for backend in backends:
        methods = ["clara", "text"] if backend in TORCH_KINDS else ["clara"]
        labels = [f"clara CR{compression}" if m == "clara" else "text RAG" for m in methods]
        reason = backend_unavailable(backend)
        export = exports.get(backend)
        if reason is None and isinstance(export, str):
            reason = export.removeprefix("unavailable: ")
        if reason is not None:
            rows += unavailable_rows(backend, labels, ks, reason)
            log(f"  {backend}: unavailable ({reason})")
            continue
        for method, label in zip(methods, labels):
            spec = WorkerSpec(backend=backend, method=method, model=str(export) if export else model, base=base,
                              device=device, dtype=dtype, compression=compression,
                              docs_file=str(source) if source else None, ks=list(ks), reps=reps,
                              max_new_tokens=max_new_tokens, compress_docs=10 if quick else POOL,
                              threads=threads)
            t0 = time.perf_counter()
            result = run_worker_subprocess(spec)
            wall = time.perf_counter() - t0
            if "error" in result:
                rows += unavailable_rows(backend, [label], ks, result["error"])
                log(f"  {backend} {method}: failed ({result['error']})")
                continue
            rows += result.pop("rows")
            workers.append({"backend": backend, "method": method, "wall_s": round(wall, 1), **result})
            log(f"  {backend} {method}: {wall:.0f} s, peak RSS {result['peak_rss_mb']:.0f} MB")
    return rows, workers


def main(argv: list[str] | None = None) -> int:
    return worker_main(argv, "clara_edge.bench.latency", lambda spec: run_worker(WorkerSpec(**spec)))


if __name__ == "__main__":
    sys.exit(main())
