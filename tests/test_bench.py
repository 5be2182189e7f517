"""`clara-edge bench` smoke test on a tiny random model and a tiny generated data set, plus its pieces."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from clara_edge.bench import anchor
from clara_edge.bench.latency import (backend_unavailable, expand_backends, kv_bytes, max_k_in_context,
                                     run_in_subprocess)
from clara_edge.bench.report import accuracy_targets, run_bench, targets
from clara_edge.errors import ClaraError

FACTS = ["The Eiffel Tower is in Paris.", "Mount Everest is the highest mountain.", "Water boils at 100 degrees.",
         "Hamlet was written by William Shakespeare.", "The Nile flows through Egypt.", "Tea comes from China."]
QUESTIONS = [("Where is the Eiffel Tower?", "Paris", 0), ("Which is the highest mountain?", "Mount Everest", 1),
             ("Who wrote Hamlet?", "William Shakespeare", 3)]


def _write_data(folder):
    """A multi-document set (own candidates) and a one-document set (pooled candidates), in the eval format."""
    folder.mkdir()
    docs = [{"title": f"T{i}", "text": t} for i, t in enumerate(FACTS)]
    multi = [{"id": f"m{i}", "dataset": "multi", "question": q, "golden_answers": [a], "docs": docs,
              "pos_index": [g]} for i, (q, a, g) in enumerate(QUESTIONS)]
    pooled = [{"id": f"p{i}", "dataset": "pooled", "question": q, "golden_answers": [a], "docs": [docs[g]],
               "pos_index": [0]} for i, (q, a, g) in enumerate(QUESTIONS)]
    for name, rows in (("multi.jsonl", multi), ("pooled.jsonl", pooled)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _unavailable_backend() -> str:
    return next(b for b in ("coreml", "cuda", "cuda-triton") if backend_unavailable(b))


def test_bench_quick_smoke(tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    missing = _unavailable_backend()
    report = run_bench(str(tiny_base_dir), ["torch", missing], out, quick=True, data_dir=_write_data(tmp_path / "data"),
                       accuracy_limit=2, latency_reps=1, command="pytest", log=lambda msg: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["command"] == "pytest" and saved["wall_s"] > 0
    for key in ("accuracy", "latency", "anchor", "targets", "machine", "versions"):
        assert key in saved
    assert {"cpu", "cores", "ram_gib", "os"} <= set(saved["machine"])
    assert saved["versions"]["torch"] and saved["versions"]["transformers"]

    acc = saved["accuracy"]
    assert {r["dataset"] for r in acc} == {"multi", "pooled"}
    assert len({r["method"] for r in acc}) == 7  # closed-book, 2 text RAG, CR16, CR64, CR16 + BM25, CR64 k=50
    for r in acc:
        assert {"dataset", "method", "compression", "top_k", "em", "f1", "cover_em", "recall@5",
                "context_positions"} <= set(r)
        assert r["f1"] is not None, r["note"]
    clara16 = next(r for r in acc if r["method"] == "clara CR16" and r["dataset"] == "multi")
    text5 = next(r for r in acc if r["method"] == "text RAG (BM25 top-5)" and r["dataset"] == "multi")
    assert clara16["compression"] == 16 and clara16["top_k"] == 5 and clara16["recall@5"] is not None
    assert text5["effective_compression"] == 1.0 and text5["compression"] is None
    assert 1 < next(r for r in acc if r["method"] == "clara CR64 k=50")["top_k"] <= 50  # what fits 512 positions

    lat = saved["latency"]
    for r in lat:
        assert {"method", "backend", "k", "ttft_s", "decode_tokens_per_s", "peak_rss_mb", "kv_bytes"} <= set(r)
        assert r["method"].startswith(("clara", "text"))
    measured = [r for r in lat if r["backend"] == "torch" and r["ttft_s"] is not None]
    assert {r["method"] for r in measured} == {"clara CR16", "text RAG"}
    assert all(r["peak_rss_mb"] > 0 and r["kv_bytes"] > 0 for r in measured)
    assert all(r["ttft_cold_s"] > 0 and 0 < r["reused_positions"] < r["positions"] for r in measured)
    over = [r for r in lat if r["ttft_s"] is None and r["note"].startswith("exceeds context")]
    assert any(r["method"] == "text RAG" and r["k"] == 100 for r in over)  # 100 texts overflow 512 positions
    assert all(r["kv_bytes"] and r["peak_rss_mb"] is None for r in over)  # not run: no memory to report
    assert all(r["reps"] == 1 and r["ttft_std_s"] is None for r in measured)  # one question: no spread measured
    assert all(r["note"].startswith("unavailable") for r in lat if r["backend"] == missing)
    assert saved["anchor"] and saved["anchor"][0]["note"]

    md = (out / "report.md").read_text()
    assert "| dataset | method |" in md and "| method | backend | k |" in md
    latency_table = md.split("| method | backend | k |")[1].split("\n\n")[0]
    assert "(n=1)" in latency_table and "±" not in latency_table  # one question: no spread to show
    torch_clara = next(w for w in saved["latency_workers"] if w["backend"] == "torch" and w["method"] == "clara")
    assert f"torch {torch_clara['compressed_docs']} documents in {torch_clara['compress_s']:.2f} s" in md
    for png in ("f1_vs_context.png", "ttft_vs_k.png", "rss_per_backend.png"):
        assert (out / png).stat().st_size > 1000
    assert report["targets"][0]["value"] is not None  # TTFT ratio at k=5 measured on torch


def test_bench_accuracy_only(tiny_base_dir, tmp_path):
    out = tmp_path / "out"
    run_bench(str(tiny_base_dir), None, out, quick=False, data_dir=_write_data(tmp_path / "data"),
              accuracy_limit=1, parts=["accuracy"], log=lambda msg: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["latency"] == [] and saved["anchor"] == [] and saved["settings"]["parts"] == ["accuracy"]
    assert saved["accuracy"] and all(r["n"] == 1 for r in saved["accuracy"])
    assert saved["files"] == ["report.json", "report.md", "f1_vs_context.png"]
    md = (out / "report.md").read_text()
    assert "## Accuracy (1 rows per set" in md and "## Latency" not in md
    for bad in ({"parts": ["speed"]}, {"accuracy_limit": 0}):
        with pytest.raises(ClaraError, match="parts|rows"):
            run_bench(str(tiny_base_dir), None, tmp_path / "bad", quick=True, **bad)


def test_backend_names_and_kv_arithmetic():
    assert expand_backends(["onnx", "torch,onnx-int4"], quick=False) == ["onnx-fp32", "onnx-int8", "onnx-int4", "torch"]
    assert expand_backends(None, quick=True) == ["torch", "onnx-int4"]
    with pytest.raises(ClaraError):
        expand_backends(["onx"], quick=True)
    for nothing in ([""], [","]):
        with pytest.raises(ClaraError, match="no bench backend named"):
            expand_backends(nothing, quick=True)
    # SmolLM2-135M: 30 layers, 3 kv heads of 64, fp32 -> 46080 bytes per position
    assert kv_bytes((30, 3, 64, 4), 1) == 46080 and kv_bytes(None, 10) is None
    assert max_k_in_context(lambda k: 50 + 17 * k, 8192 - 32, 100) == 100
    assert max_k_in_context(lambda k: 50 + 170 * k, 8192 - 32, 100) == 47
    assert run_in_subprocess("clara_edge.bench.no_such_worker", {})["error"].startswith("worker exited 1")


def test_anchor_with_a_stand_in_llama_cpp(monkeypatch, tmp_path):
    """The llama.cpp timing loop against a fake module (the real one is an optional, compiled extra)."""
    class FakeLlama:
        def __init__(self, model_path, **kw):
            self.kw = kw

        def reset(self):
            pass

        def token_eos(self):
            return 2

        def generate(self, tokens, **kw):
            yield from [5, 6, 7, 2, 9]

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama, __version__="fake"))
    monkeypatch.setattr(anchor, "fetch_gguf", lambda workdir: tmp_path / "model.gguf")
    rows = anchor.run_anchor({5: [[1] * 40, [1] * 44]}, n_ctx=8192, threads=1, reps=2, max_new_tokens=16,
                             notes={100: "exceeds context (17000 positions > 8192)"})
    assert [r["k"] for r in rows] == [5, 100]
    assert rows[0]["reps"] == 2 and rows[0]["positions"] == 42 and rows[0]["ttft_s"] > 0
    assert rows[0]["prefill_tokens_per_s"] > 0 and rows[0]["decode_tokens_per_s"] > 0
    assert rows[1]["ttft_s"] is None and rows[1]["note"].startswith("exceeds")
    clock = iter(range(100))
    monkeypatch.setattr(anchor.time, "perf_counter", lambda: float(next(clock)))
    # start 0, first token 1, end 2: tokens 6, 7 and the EOS came in one second, as clara's decode_steps counts
    assert anchor.time_generation(FakeLlama("m"), [1] * 4, max_new_tokens=16) == (1.0, 3.0, 3)
    monkeypatch.delitem(sys.modules, "llama_cpp")
    monkeypatch.setattr("builtins.__import__", _no_llama(__import__))
    assert anchor.run_anchor({}, n_ctx=1, threads=1, reps=1, max_new_tokens=1)[0]["note"] == anchor.NOT_INSTALLED


def test_the_anchor_cycles_the_latency_questions_like_the_workers(monkeypatch):
    """--reps 20 asked for questions 11-21 of a 10-question latency set: none, and max() of nothing crashed the run."""
    from clara_edge.base_models import DEFAULT_BASE
    from clara_edge.bench import report

    asked = {}
    monkeypatch.setattr(anchor, "llama_cpp_version", lambda: "0.0-test")
    monkeypatch.setattr(report, "load_documents", lambda source: ([f"q{i}?" for i in range(10)], [("T", f"doc {i}") for i in range(100)]))
    monkeypatch.setattr(report, "run_anchor_subprocess", lambda prompts, notes, **kw: asked.update(prompts) or [])
    primary = types.SimpleNamespace(config=types.SimpleNamespace(base_model=DEFAULT_BASE), max_positions=8192,
                                    text_prompt_ids=lambda q, docs: [int(q[1:-1])] * 3)
    report._anchor_rows(primary, 16, reps=10, threads=1, data_dir=None, log=lambda line: None, first=10)
    assert asked and all([ids[0] for ids in prompts] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0] for prompts in asked.values())


def test_mean_std_and_its_cells():
    from clara_edge.bench.latency import fmt_pm, mean_std

    assert mean_std([1.0, 2.0, None, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, None) and mean_std([None]) == (None, None)
    assert fmt_pm(2.0, 1.0, 1000, 0) == "2000 ± 1000" and fmt_pm(5.0, None) == "5.00 (n=1)" and fmt_pm(None, None) == "-"


def test_a_plot_that_fails_costs_the_plots_only(tiny_base_dir, tmp_path, monkeypatch):
    def broken(report, out_dir):
        raise OSError("disk full")

    monkeypatch.setattr("clara_edge.bench.report.write_plots", broken)
    out = tmp_path / "out"
    run_bench(str(tiny_base_dir), None, out, quick=True, data_dir=_write_data(tmp_path / "data"), accuracy_limit=1,
              parts=["accuracy"], log=lambda msg: None)
    saved = json.loads((out / "report.json").read_text())
    assert saved["files"] == ["report.json", "report.md"] and saved["plot_error"] == "OSError: disk full"
    assert saved["accuracy"] and (out / "report.md").is_file()


def test_bench_refuses_an_out_folder_it_cannot_write_before_running(tiny_base_dir, tmp_path, monkeypatch):
    import importlib.util

    with pytest.raises(ClaraError, match="cannot take files"):
        run_bench(str(tiny_base_dir), None, Path("/proc/self"), quick=True, log=lambda msg: None)
    plain = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else plain(name, *a))
    with pytest.raises(ClaraError, match="matplotlib"):
        run_bench(str(tiny_base_dir), None, tmp_path / "out", quick=True, log=lambda msg: None)


def test_bracketed_anchor_pools_both_runs():
    """Before and after the latency workers: per k, mean ± std over both runs' questions, each run's rate in the
    note; note rows pass through, and a k the second run lacks says so."""
    from clara_edge.bench.latency import mean_std

    def run(decode: list[float], ks=(1, 5)) -> list[dict]:
        return [anchor.measured_row(k, {"positions": [300 * k] * len(decode), "ttft": [0.5 * k] * len(decode),
                                        "decode": decode}) for k in ks] + [anchor.anchor_row(100, note="exceeds")]

    rows = anchor.bracket(run([100.0, 104.0]), run([80.0, 84.0], ks=(1,)))
    assert [r["k"] for r in rows] == [1, 5, 100]
    assert rows[0]["reps"] == 4 and rows[0]["positions"] == 300
    assert (rows[0]["decode_tokens_per_s"], rows[0]["decode_std"]) == mean_std([100.0, 104.0, 80.0, 84.0])
    assert rows[0]["note"] == "decode 102.0 before, 82.0 after the latency runs"
    assert rows[1]["reps"] == 2 and rows[1]["note"] == "measured before the latency runs only"
    assert rows[2]["note"] == "exceeds" and rows[2]["decode_tokens_per_s"] is None
    # every answer stopped at its first token (no decode rate), and a "before" run that failed
    stopped = anchor.bracket(run([None]), run([80.0]))
    assert stopped[0]["note"] == "decode - before, 80.0 after the latency runs"
    failed = [anchor.anchor_row(None, note="llama.cpp run failed: boom")]
    assert anchor.bracket(failed, run([80.0])) == run([80.0])


def test_worker_payloads_larger_than_a_command_line_argument(tmp_path):
    """A full run's k=20 prompts are ~130 KB of JSON, beyond one argument's 128 KiB: the payload goes by file."""
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('a stand-in: not installed')\n")
    payload = {"prompts": {"20": [[1] * 40_000] * 6}, "notes": {}, "n_ctx": 8192, "threads": 1, "reps": 5,
               "max_new_tokens": 4}
    result = run_in_subprocess("clara_edge.bench.anchor", payload, env={"PYTHONPATH": str(tmp_path)})
    assert result == {"rows": [anchor.anchor_row(None, note=anchor.NOT_INSTALLED)]}


def _no_llama(real_import):
    def fake(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    return fake


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_a_worker_reports_its_own_peak_rss_not_its_parents():
    """ru_maxrss survives fork + exec on Linux: a worker spawned by a 1.5 GB parent would report 1.5 GB."""
    ballast = bytearray(1536 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page
    child = subprocess.run([sys.executable, "-c", "from clara_edge.runtime import peak_rss_mb; print(peak_rss_mb())"],
                           capture_output=True, text=True, check=True)
    assert float(child.stdout) < 1024
    del ballast


def test_accuracy_targets_follow_the_issue():
    def row(dataset, method, f1, r5=None):
        return {"dataset": dataset, "method": method, "f1": f1, "recall@5": r5}

    rows = [row("hotpotqa", "text RAG (BM25 top-5)", 10.0, 80.0), row("hotpotqa", "clara CR16", 12.0, 60.0),
            row("hotpotqa", "clara CR64", 8.5, 70.0), row("nq", "text RAG (BM25 top-5)", 10.0, 90.0),
            row("nq", "clara CR16", 9.0, 50.0)]
    got = {t["target"]: (t["value"], t["met"]) for t in accuracy_targets(rows, [16, 64])}
    assert got == {"F1 clara CR16 / text RAG (BM25 top-5), hotpotqa": (1.2, True),
                   "F1 clara CR64 / text RAG (BM25 top-5), hotpotqa": (0.85, False),  # needs 0.9
                   "R@5 clara CR16 / BM25, hotpotqa": (0.75, False),
                   "F1 clara CR16 / text RAG (BM25 top-5), nq": (0.9, False),
                   "F1 clara CR64 / text RAG (BM25 top-5), nq": (None, None)}  # not measured


def test_cached_exports_must_come_from_this_model_and_exporter(monkeypatch, tmp_path):
    from clara_edge.backend import EXPORT_MANIFEST, EXPORTER_REVISION
    from clara_edge.bench import latency

    monkeypatch.setattr(latency, "export_cache", lambda: tmp_path)
    model = types.SimpleNamespace(fingerprint=lambda roles=None: "abc")
    folder = tmp_path / "abc-coreml"
    folder.mkdir()
    for manifest, hit in (({"model_fingerprint": "abc", "exporter_revision": EXPORTER_REVISION}, True),
                          ({"model_fingerprint": "abc"}, False),  # made before revisions were recorded
                          ({"model_fingerprint": "abc", "exporter_revision": EXPORTER_REVISION - 1}, False),
                          ({"model_fingerprint": "xyz", "exporter_revision": EXPORTER_REVISION}, False)):
        (folder / EXPORT_MANIFEST).write_text(json.dumps({"format": "coreml", **manifest}))
        assert (latency._cached(model, "coreml") == folder) is hit


def test_decode_targets_compare_the_same_k_and_the_nearest_text_context():
    latency = [{"method": "clara CR16", "backend": "onnx-int4", "k": 5, "positions": 157, "decode_tokens_per_s": 60.0}]
    anchor_rows = [anchor.anchor_row(1, positions=190, decode_tokens_per_s=75.0),
                   anchor.anchor_row(5, positions=974, decode_tokens_per_s=50.0)]
    got = {t["target"]: t for t in targets(latency, anchor_rows, 16) if t["target"].startswith("decode")}
    same_k, same_context = got.values()
    assert same_k["value"] == 60 / 50 and same_k["met"] and same_k["note"] == "157 vs 974 positions"
    assert same_context["value"] == 60 / 75 and not same_context["met"] and "190" in same_context["note"]
    assert all(t["value"] is None for t in targets(latency, [], 16) if t["target"].startswith("decode"))


def test_ttft_targets_on_every_backend_that_ran_both_methods():
    def row(method, backend, k, ttft):
        return {"method": method, "backend": backend, "k": k, "ttft_s": ttft, "ttft_cold_s": ttft, "kv_bytes": 8 * k}
    latency = [row("clara CR16", "cuda", 5, 0.08), row("text", "cuda", 5, 0.09), row("text", "cuda", 20, 0.3),
               row("clara CR16", "cuda", 20, 0.02), row("clara CR16", "cuda-triton", 5, 0.1)]
    got = {t["target"]: t for t in targets(latency, [], 16)}
    k5 = got["TTFT clara CR16 / text RAG at k=5 (cuda, whole prompt)"]
    assert k5["value"] == pytest.approx(0.08 / 0.09, abs=1e-4) and not k5["met"]
    assert got["TTFT clara CR16 / text RAG at k=20 (cuda, prompt head reused, as the runtime does)"]["met"]
    assert got["TTFT clara CR16 / text RAG at k=5 (cuda-triton, whole prompt)"]["value"] is None  # no text row
    assert not any("(torch," in name for name in got)  # the CPU backend was not measured in this run
    assert got["KV bytes clara CR16 / text RAG at k=5"]["value"] == 1.0


def test_store_bench_times_exact_and_fused_search(tmp_path, capsys):
    import numpy as np

    from clara_edge.bench import store as store_bench
    texts = store_bench.synthetic_texts(50, np.random.default_rng(0))
    assert all(len(t) <= store_bench.TEXT_CHARS for t in texts) and len(set(texts)) == 50
    out = tmp_path / "store.json"
    assert store_bench.main(["--sizes", "40", "80", "--reps", "1", "--n-mem", "4", "--dtypes", "fp16", "--fused",
                             "--dir", str(tmp_path), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["docs"], r["method"], r["queries"]) for r in rows] == \
        [(n, m, q) for n in (40, 80) for m, q in (("exact", 1), ("exact", 8), ("clara+bm25", 1))]
    assert all(r["first_call_ms"] > 0 and r["first_call_saved_ms"] > 0 for r in rows if r["method"] == "clara+bm25")
    assert "| clara+bm25 | 1 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [(["--model", "/nonexistent/model"], "/nonexistent/model"),
                                         (["--json", "{tmp}"], "it is a directory")])
def test_store_bench_refuses_bad_input_before_timing(tmp_path, capsys, monkeypatch, argv, needle):
    from clara_edge.bench import store as store_bench

    monkeypatch.setattr(store_bench, "bench_config", lambda *a: pytest.fail("timed before checking its input"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert store_bench.main(["--sizes", "40", "--reps", "1", *argv]) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        store_bench.main(["--n-mem", "0"])
