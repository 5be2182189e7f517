"""`clara-edge bench`: accuracy, latency / memory and the llama.cpp anchor in one report (issue #7).

    clara-edge bench [--quick] [--backend B ...] [--out DIR] [--model M] [--rows N] [--only accuracy|latency]
    python -m clara_edge.bench [--quick] [--backend B ...] [--out DIR] [--data-dir D] [--threads N]

writes DIR/report.json, DIR/report.md (also printed) and DIR/{f1_vs_context,ttft_vs_k,rss_per_backend}.png.

report.json:
  accuracy        rows {dataset, method, compression, top_k, em, f1, cover_em, recall@1, recall@5,
                  context_positions, effective_compression, n, docs_given, new_tokens, wall_s, decode_s, pool,
                  note}
                  (clara_edge.bench.accuracy)
  latency         rows {method ("clara CR16" | "text RAG"), backend, k, positions, max_positions, ttft_s,
                  ttft_std_s, ttft_cold_s, ttft_cold_std_s (the whole prompt prefilled), reused_positions,
                  prefill_tokens_per_s, decode_tokens_per_s, decode_std, query_encode_s, retrieval_s, e2e_s
                  (each with its std), new_tokens, peak_rss_mb, kv_bytes, reps, note}
                  (clara_edge.bench.latency); unavailable backends and over-long prompts are rows with a note
  latency_workers one entry per measured (backend, method) process: peak RSS, load / compression time,
                  max_k_in_context (where the method stops fitting the model's window)
  anchor          llama.cpp rows (clara_edge.bench.anchor), or one row saying why there are none
  targets         the issues' ratios (TTFT, KV, decode speed; F1 and R@5 per dev set), measured in this run,
                  with met true / false / null (not measurable)
  machine, versions, settings, command, started, wall_s (and estimated_full_wall_s for --quick)

Backends: torch (fp32 on the CPU), onnx-fp32, onnx-int8, onnx-int4 (exported here, traced once, and cached
in ~/.cache/clara-edge/bench-exports by model fingerprint; --quick uses only cached exports unless the
backend is named with --backend), coreml
(macOS), cuda and cuda-triton (CLARA_EDGE_ATTENTION=sdpa / triton); `onnx` names the three ORT rows.
Default: torch and onnx-int4 for --quick, all of them otherwise (unavailable ones become note rows).
Threads: `--threads`, else $CLARA_EDGE_THREADS, else all cores but one (`clara-edge bench`; `python -m clara_edge.bench`
without --threads leaves torch's default, which OMP_NUM_THREADS sets); workers, ORT and llama.cpp get the same count.
On a shared machine OMP_NUM_THREADS=1 gives far steadier numbers than oversubscribed cores.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clara_edge.errors import ClaraError, cause_line

from .accuracy import QUICK_ROWS, dataset_files, run_accuracy
from .anchor import NOT_INSTALLED, bracket, run_anchor_subprocess
from .latency import (KS, POOL, TORCH_KINDS, eval_dir, expand_backends, fmt_pm, latency_source, load_documents,
                      make_exports, run_latency, text_rag_docs)
from .plots import write_plots

PARTS = ("accuracy", "latency")

QUICK_LATENCY_REPS, FULL_LATENCY_REPS = 2, 5
ANCHOR_KS = (1, 5, 20, 100)  # k=1: the text context nearest clara CR16's at k=5
TRAINED = {True: "trained", False: "**untrained** (answers are nonsense, accuracy near zero)", None: "unknown"}
PACKAGES = ("clara-edge", "torch", "transformers", "peft", "numpy", "bm25s", "onnx", "onnxruntime",
            "llama_cpp_python", "matplotlib", "coremltools", "triton")


# ------------------------------------------------------------------------------------------ facts
def default_data_dir() -> Path:
    import clara_edge
    return Path(clara_edge.__file__).resolve().parents[2] / "shared" / "data"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = None
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "ram_gib": round(ram, 1) if ram else None,
            "os": platform.platform(), "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# ------------------------------------------------------------------------------------------ targets
def _find(rows: Sequence[dict], method_prefix: str, backend: str, k: int) -> dict | None:
    return next((r for r in rows if r["method"].startswith(method_prefix) and r["backend"] == backend
                 and r["k"] == k), None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _target(name: str, value: float | None, threshold: float, higher_is_better: bool = False,
            note: str = "") -> dict:
    met = None if value is None else (value >= threshold if higher_is_better else value <= threshold)
    return {"target": name, "value": round(value, 4) if value is not None else None,
            "threshold": f"{'>=' if higher_is_better else '<='} {threshold:g}", "met": met, "note": note}


def targets(latency: Sequence[dict], anchor: Sequence[dict], rate: int) -> list[dict]:
    """The issue's same-run targets, from the measured rows (value null when a side was not measured). TTFT is
    compared on every backend that runs both methods (the CPU row, and CUDA with and without the Triton kernels
    when measured); KV bytes do not depend on the backend."""
    out = []
    clara = f"clara CR{rate}"
    measured = [b for b in TORCH_KINDS if any(r["backend"] == b for r in latency)] or ["torch"]
    for backend in measured:
        for k, bound in ((5, 1 / 5), (20, 1 / 10)):
            c, t = _find(latency, clara, backend, k), _find(latency, "text", backend, k)
            for key, how in (("ttft_s", "prompt head reused, as the runtime does"), ("ttft_cold_s", "whole prompt")):
                out.append(_target(f"TTFT {clara} / text RAG at k={k} ({backend}, {how})",
                                   _ratio(c and c.get(key), t and t.get(key)), bound))
    for k in (5, 20):
        c, t = _find(latency, clara, measured[0], k), _find(latency, "text", measured[0], k)
        out.append(_target(f"KV bytes {clara} / text RAG at k={k}",
                           _ratio(c and c["kv_bytes"], t and t["kv_bytes"]), 1 / 8))
    ort = _find(latency, clara, "onnx-int4", 5)
    for k, what in ((5, "k=5"), (1, "clara k=5 vs text k=1: the nearest text context")):
        llama = next((r for r in anchor if r.get("k") == k and r.get("decode_tokens_per_s")), None)
        context = f"{ort['positions']} vs {llama['positions']} positions" if ort and llama else ""
        out.append(_target(f"decode tokens/s ORT int4 / llama.cpp Q4_1 ({what})",
                           _ratio(ort and ort["decode_tokens_per_s"], llama and llama["decode_tokens_per_s"]), 1.0,
                           higher_is_better=True,
                           note=context if llama else (anchor[0]["note"] if anchor and anchor[0].get("note") else
                                                       "no llama.cpp row")))
    return out


RECALL_TARGET_SETS = ("hotpotqa", "musique", "2wiki")  # the multi-hop sets whose R@5 the issue compares with BM25


def accuracy_targets(accuracy: Sequence[dict], rates: Sequence[int]) -> list[dict]:
    """Per dev set: clara F1 / text-RAG F1 (>= 1 at the first rate, >= 0.9 at the last) and clara R@5 / BM25
    R@5 (>= 1, multi-hop sets), from this run's accuracy rows."""
    def row(dataset: str, method: str) -> dict | None:
        return next((r for r in accuracy if r["dataset"] == dataset and r["method"] == method), None)

    def compare(name: str, clara: dict | None, text: dict | None, key: str, bound: float) -> dict:
        a, b = clara and clara[key], text and text[key]
        note = f"{a:.1f} vs {b:.1f}" if a is not None and b is not None else ""
        return _target(name, _ratio(a, b), bound, higher_is_better=True, note=note)

    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in accuracy):
        text = row(dataset, "text RAG (BM25 top-5)")
        for rate, bound in [(rates[0], 1.0)] + ([(rates[-1], 0.9)] if len(rates) > 1 else []):
            out.append(compare(f"F1 clara CR{rate} / text RAG (BM25 top-5), {dataset}",
                               row(dataset, f"clara CR{rate}"), text, "f1", bound))
        if dataset in RECALL_TARGET_SETS:
            out.append(compare(f"R@5 clara CR{rates[0]} / BM25, {dataset}", row(dataset, f"clara CR{rates[0]}"),
                               text, "recall@5", 1.0))
    return out


# ------------------------------------------------------------------------------------------ markdown
def _num(v, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def accuracy_table(rows: Sequence[dict]) -> str:
    return _table(["dataset", "method", "CR", "k", "EM", "F1", "cover-EM", "R@5", "positions", "eff. compr.",
                   "n", "note"],
                  [[r["dataset"], r["method"], _num(r["compression"]), _num(r["top_k"]), _num(r["em"]),
                    _num(r["f1"]), _num(r["cover_em"]), _num(r["recall@5"]), _num(r["context_positions"], 1),
                    _num(r["effective_compression"], 1), _num(r["n"]), r.get("pool") or r.get("note") or ""]
                   for r in rows])


def latency_table(rows: Sequence[dict]) -> str:
    return _table(["method", "backend", "k", "positions", "reused", "encode ms", "retrieval ms", "TTFT s",
                   "TTFT s, whole prompt", "prefill tok/s", "decode tok/s", "end-to-end s", "peak RSS MB", "KV MiB",
                   "note"],
                  [[r["method"], r["backend"], r["k"], _num(r["positions"]), _num(r.get("reused_positions"), 0),
                    fmt_pm(r["query_encode_s"], r["query_encode_std_s"], 1e3, 1),
                    fmt_pm(r["retrieval_s"], r["retrieval_std_s"], 1e3, 2), fmt_pm(r["ttft_s"], r["ttft_std_s"], 1, 3),
                    fmt_pm(r.get("ttft_cold_s"), r.get("ttft_cold_std_s"), 1, 3),
                    _num(r.get("prefill_tokens_per_s"), 0), fmt_pm(r["decode_tokens_per_s"], r["decode_std"], 1, 1),
                    fmt_pm(r["e2e_s"], r["e2e_std_s"], 1, 2), _num(r["peak_rss_mb"], 0),
                    _num(r["kv_bytes"] / 2**20 if r["kv_bytes"] is not None else None, 2), r["note"]]
                   for r in rows])


def compression_line(workers: Sequence[dict]) -> str:
    """What indexing costs per backend: the clara workers' one timed batch of documents (after a warm-up)."""
    done = [w for w in workers if w.get("compressed_docs") and w.get("compress_s")]
    return ("Compression (what indexing costs, one batch after a warm-up): " + "; ".join(
        f"{w['backend']} {w['compressed_docs']} documents in {w['compress_s']:.2f} s "
        f"({w['compressed_docs'] / w['compress_s']:.1f} docs/s)" for w in done) + ".") if done else ""


def anchor_table(rows: Sequence[dict]) -> str:
    return _table(["method", "backend", "k", "positions", "TTFT s", "prefill tok/s", "decode tok/s", "note"],
                  [[r["method"], r["backend"], _num(r["k"]), _num(r["positions"]),
                    fmt_pm(r["ttft_s"], r["ttft_std_s"], 1, 3),
                    fmt_pm(r["prefill_tokens_per_s"], r["prefill_std"], 1, 0),
                    fmt_pm(r["decode_tokens_per_s"], r["decode_std"], 1, 1), r["note"]] for r in rows])


def targets_table(rows: Sequence[dict]) -> str:
    mark = {True: "yes", False: "**no**", None: "n/a"}
    return _table(["target", "value", "threshold", "met", "note"],
                  [[r["target"], _num(r["value"], 3), r["threshold"], mark[r["met"]], r["note"]] for r in rows])


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 7200 else f"{seconds / 60:.0f} min"


def render_markdown(report: dict) -> str:
    m, v, s = report["machine"], report["versions"], report["settings"]
    stops = [f"{w['backend']} {w['method']}: k <= {w['max_k_in_context']}" for w in report["latency_workers"]
             if w.get("max_k_in_context") is not None]
    lines = [
        f"# clara-edge bench{' (quick)' if report['quick'] else ''}",
        "",
        f"`{report['command']}`  ",
        f"started {report['started']}, wall time **{report['wall_s']:.0f} s**"
        + (f" (a full run: roughly {_duration(report['estimated_full_wall_s'])} on this machine, "
           "extrapolated from this run, plus any export not cached yet)" if report.get("estimated_full_wall_s")
           else ""),
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']}, python {m['python']}, "
        f"{m['torch_threads']} torch threads, load average at start {m['load_average']}"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ""),
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        f"Model: {report['model']} (base {s['base_model']}, rates {s['compression_rates']}); "
        f"adapters {TRAINED[s['trained']]}",
        "",
    ]
    parts = s.get("parts", PARTS)
    if "accuracy" in parts:
        lines += [
            f"## Accuracy ({s['accuracy_rows']} rows per set, answers up to {s['accuracy_max_new_tokens']} tokens)",
            "",
            accuracy_table(report["accuracy"]) if report["accuracy"] else f"No dev sets found in {s['data_dir']}.",
            "",
        ]
    if "latency" in parts:
        lines += [
            f"## Latency and memory (mean ± std over {s['latency_reps']} questions after 1 warm-up; "
            f"answers up to {s['latency_max_new_tokens']} tokens)",
            "",
            *(["**Synthetic documents** (no dev set found: give `--data`): every question reads the same "
               "prompt, so TTFT is a whole prefill with nothing reused.", ""]
              if s["latency_documents"] == "None" else []),
            "TTFT is generator level (prefill + first token); end-to-end adds query encoding and retrieval over "
            f"{s['latency_pool']} documents and the whole answer. KV = 2 x layers x kv_heads x head_dim x prompt "
            "positions x bytes. Peak RSS is the whole worker process (load, compression, every k).",
            "",
            latency_table(report["latency"]),
            "",
            ("Where each method stops fitting the model's window: " + "; ".join(stops) + ".") if stops else "",
            "",
            compression_line(report["latency_workers"]),
            "",
            "## llama.cpp anchor (text RAG, same gguf, same machine and run)",
            "",
            anchor_table(report["anchor"]),
            "",
        ]
    if report["targets"]:
        lines += ["## Targets (same machine, same run)", "", targets_table(report["targets"]), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the run
def _anchor_rows(primary, max_new_tokens: int, reps: int, threads: int, data_dir: Path | None,
                 log: Callable[[str], None], first: int = 0) -> list[dict]:
    """llama.cpp rows for reps + 1 questions of the latency set from `first` on, cycling as the latency workers
    do (the first one warms up)."""
    from clara_edge.base_models import DEFAULT_BASE

    from .anchor import anchor_row, llama_cpp_version
    if llama_cpp_version() is None:
        return [anchor_row(None, note=NOT_INSTALLED)]
    base = primary.config.base_model
    if base != DEFAULT_BASE or not hasattr(primary, "text_prompt_ids"):
        return [anchor_row(None, note=f"the anchor runs the {DEFAULT_BASE} gguf; this model's base is {base} "
                                      "(or it has no text mode)")]
    from clara_edge.bm25 import BM25Index

    questions, docs = load_documents(latency_source(data_dir))
    bm25 = BM25Index(docs)  # the documents the text-RAG latency rows read: each question's BM25 top k
    n_ctx = primary.max_positions
    prompts, notes = {}, {}
    asked = [questions[(first + i) % len(questions)] for i in range(reps + 1)]
    for k in ANCHOR_KS:
        ids = [primary.text_prompt_ids(q, text_rag_docs(bm25, docs, q, k)) for q in asked]
        if max(len(i) for i in ids) + max_new_tokens > n_ctx:
            notes[k] = f"exceeds context ({max(len(i) for i in ids)} positions > {n_ctx})"
        else:
            prompts[k] = ids
    log(f"anchor: llama.cpp, {reps + 1} questions from question {first % len(questions) + 1} of {len(questions)}")
    return run_anchor_subprocess(prompts, notes, n_ctx=n_ctx, threads=threads, reps=reps,
                                 max_new_tokens=max_new_tokens)


def _estimate_full(report: dict, folder: Path | None, setup_s: float) -> float | None:
    """Rough wall time of a full run, scaled from this quick run's measured parts."""
    if folder is None:
        return None
    files = dataset_files(folder)
    full_rows = {name: sum(1 for line in open(p, encoding="utf-8") if line.strip()) for name, p in files.items()}
    # per question: decoding scales with the answer limit (64 vs 16 tokens: untrained adapters use it all)
    acc = sum(((r["wall_s"] or 0) + 3 * (r["decode_s"] or 0)) / r["n"] * full_rows.get(r["dataset"], r["n"])
              for r in report["accuracy"] if r.get("n"))
    reps = (FULL_LATENCY_REPS + 1) / (QUICK_LATENCY_REPS + 1)
    lat = sum(w["wall_s"] * reps * 2 for w in report["latency_workers"])  # 2: 32 vs 16 tokens, 100 vs 10 docs
    return round(setup_s + acc + lat)  # exports not cached yet come on top (tracing: minutes)


def run_bench(model: str | None, backends: list[str] | None, out_dir: Path, quick: bool,
              data_dir: Path | None = None, compression_rates=(16, 64), *, base: str | None = None,
              device: str | None = None, dtype: str | None = None, threads: int | None = None,
              command: str | None = None, accuracy_limit: int | None = None, latency_reps: int | None = None,
              ks: Sequence[int] = KS, parts: Sequence[str] = PARTS, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark, write report.json / report.md / plots into `out_dir`, return the report dict.
    `parts`: "accuracy" and/or "latency" (latency includes the exports it times and the llama.cpp anchor)."""
    import torch

    from clara_edge.backend import export_manifest, open_backend
    from clara_edge.model import ClaraModel

    started = time.perf_counter()
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ClaraError(f"unknown bench parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
    if accuracy_limit is not None and accuracy_limit < 1:
        raise ClaraError(f"--rows must be at least 1, not {accuracy_limit}")
    explicit = bool(backends)
    backends = expand_backends(backends, quick)  # a bad name fails before anything is loaded or written
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ClaraError(f"bench --out {out_dir} is a file: give a folder for report.json, report.md and plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_writable(out_dir)
    if importlib.util.find_spec("matplotlib") is None:
        raise ClaraError("bench draws its plots with matplotlib: pip install 'clara-edge[bench]'")
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if latency_source(data_dir) is None:
        log(f"no dev sets in {data_dir} (give --data): latency runs on synthetic documents, accuracy is skipped")
    folder = eval_dir(data_dir)
    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    rates = tuple(compression_rates)
    reps = latency_reps or (QUICK_LATENCY_REPS if quick else FULL_LATENCY_REPS)
    lat_tokens = 16 if quick else 32
    acc_tokens = 16 if quick else 64
    report: dict = {
        "schema": 1, "quick": quick,
        "command": command or " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": model or "default", "machine": machine_info(), "versions": package_versions(),
    }

    def load(rate: int):
        return open_backend(model, "auto", rate, device, dtype, base)

    log(f"clara-edge bench{' --quick' if quick else ''}: backends {', '.join(backends)}; data {folder}")
    manifest = export_manifest(Path(model).expanduser()) if model else None
    primary = load(rates[0])
    if manifest:  # an export directory is its own (only) backend
        label = f"{manifest['format']}-{manifest.get('quant', 'fp32')}"
        backends, exports = [label], {label: str(Path(model).expanduser())}
    report["settings"] = {
        "backends": backends, "compression_rates": list(rates), "base_model": primary.config.base_model,
        "trained": _looks_trained(primary) if isinstance(primary, ClaraModel) else None,
        "threads": threads, "latency_reps": reps, "latency_warmup": 1, "latency_ks": list(ks),
        "latency_max_new_tokens": lat_tokens, "latency_pool": POOL, "latency_documents": str(latency_source(data_dir)),
        "accuracy_rows": accuracy_limit or (QUICK_ROWS if quick else "all"),
        "accuracy_max_new_tokens": acc_tokens, "data_dir": str(folder),
    }
    report["settings"]["parts"] = list(parts)
    report["latency"], report["latency_workers"], report["anchor"], report["exports"] = [], [], [], {}
    setup_s = 0.0
    if "latency" in parts:
        t0 = time.perf_counter()
        if not manifest:
            exports = (make_exports(primary, backends, log, export=explicit or not quick)
                       if isinstance(primary, ClaraModel) else {})
        setup_s = time.perf_counter() - t0
        report["exports"] = {name: str(value) for name, value in exports.items()}
        half = max(1, reps // 2)  # the anchor's questions: half before the latency workers, the rest after
        anchor_before = _anchor_rows(primary, lat_tokens, half, threads, data_dir, log)
        log("latency (one process per backend and method)")
        latency, workers = run_latency(None if manifest else model, backends, exports, quick=quick,
                                       data_dir=data_dir, compression=rates[0], base=base, device=device,
                                       dtype=dtype, threads=threads, ks=ks, reps=reps, max_new_tokens=lat_tokens,
                                       log=log)
        report["latency"], report["latency_workers"] = latency, workers
        report["anchor"] = bracket(anchor_before, _anchor_rows(primary, lat_tokens, max(1, reps - half), threads,
                                                               data_dir, log, first=half))
    del primary
    gc.collect()
    report["accuracy"] = []
    if "accuracy" in parts and folder is not None and folder.is_dir():
        log("accuracy")
        report["accuracy"] = run_accuracy(load, folder, rates, quick=quick, limit=accuracy_limit,
                                          max_new_tokens=acc_tokens, log=log)
    report["targets"] = (targets(report["latency"], report["anchor"], rates[0]) if "latency" in parts else []) + \
        accuracy_targets(report["accuracy"], rates)
    report["machine"]["load_average_end"] = ([round(x, 2) for x in os.getloadavg()]
                                             if hasattr(os, "getloadavg") else None)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if quick:
        report["estimated_full_wall_s"] = _estimate_full(report, folder, setup_s)
    try:  # after a whole run, a plot that fails must not cost the report
        plots = [p.name for p in write_plots(report, out_dir)]
    except (ImportError, OSError, RuntimeError) as e:
        plots, report["plot_error"] = [], cause_line(e)
        log(f"plots not written: {report['plot_error']}")
    report["files"] = ["report.json", "report.md", *plots]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return report


def _check_writable(out_dir: Path) -> None:
    """Fail before the run, not after it, where --out cannot take files."""
    try:
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".bench-probe-"):
            pass
    except OSError as e:
        raise ClaraError(f"bench --out {out_dir} cannot take files: {cause_line(e)}") from None


def _looks_trained(model) -> bool:
    """Whether any LoRA B matrix is non-zero (untrained adapters start at B = 0)."""
    return any(bool(p.detach().abs().max() > 0) for n, p in model.lm.named_parameters() if "lora_B" in n)


# ------------------------------------------------------------------------------------------ entry points
def run_bench_command(args: argparse.Namespace) -> int:
    """`clara-edge bench` (args: quick, backend, out, model, base, device, dtype; optional data_dir, threads)."""
    device = None if getattr(args, "device", None) in (None, "auto") else args.device
    dtype = None if getattr(args, "dtype", None) in (None, "auto") else args.dtype
    data_dir = getattr(args, "data_dir", None)
    if data_dir and not Path(data_dir).expanduser().is_dir():
        raise ClaraError(f"--data {data_dir}: no such folder")
    reps = getattr(args, "reps", None)
    if reps is not None and reps < 1:
        raise ClaraError(f"--reps must be at least 1, got {reps}")
    report = run_bench(args.model, args.backend, Path(args.out), args.quick,
                       data_dir=Path(data_dir) if data_dir else None, base=args.base, device=device, dtype=dtype,
                       accuracy_limit=getattr(args, "rows", None), parts=getattr(args, "only", None) or PARTS,
                       latency_reps=reps, threads=getattr(args, "threads", None),
                       log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(render_markdown(report))
    print(f"wrote {Path(args.out) / 'report.json'}, report.md and plots ({report['wall_s']:.0f} s)")
    return 0
