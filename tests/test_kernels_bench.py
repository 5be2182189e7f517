"""`python -m clara_edge.bench.kernels` on a machine without CUDA: one clear line, exit status 2; its argument
parsing and table formatting run on the CPU."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # keep the suite's interpreter setting consistent, whatever runs first

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from clara_edge.bench import kernels as bench  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA exit path")
def test_without_cuda_prints_one_line_and_exits_2():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "clara_edge.bench.kernels", "--quick"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [bench.NO_CUDA_MESSAGE]


def test_a_json_path_that_cannot_be_written_is_refused_before_the_run(tmp_path, capsys):
    assert bench.main(["--quick", "--json", str(tmp_path)]) == 1  # a directory: checked before CUDA, too
    err = capsys.readouterr().err.strip()
    assert "it is a directory" in err and len(err.splitlines()) == 1


def test_default_shapes_are_the_issue_list():
    assert bench.DECODE_SHAPES == [(1, 128), (1, 2048), (16, 512), (128, 512), (128, 4096)]
    assert bench.PREFILL_POSITIONS == [512, 4096]
    assert bench.MODELS == {"smollm2-135m": dict(hq=9, hkv=3, d=64), "mistral-7b": dict(hq=32, hkv=8, d=128)}


def test_arguments():
    args = bench.parse_args(["--quick", "--json", "out.json", "--models", "mistral-7b", "--tail", "32"])
    assert args.quick and args.no_flex and args.json == "out.json" and args.models == ["mistral-7b"]
    assert args.tail == 32 and not args.tune
    with pytest.raises(SystemExit):
        bench.parse_args(["--reps", "0"])


def test_table_has_one_row_per_configuration():
    rows = [bench.Row("smollm2-135m", "decode", "bf16", 128, 4096, "sdpa-cudnn", us=92.0, gbps=4380.0,
                      pct_copy=101.9, vs_best_torch=1.0, note="packed"),
            bench.Row("smollm2-135m", "decode", "int8-token", 128, 4096, "triton", us=55.0, rel_err=3e-3,
                      vs_best_torch=92.0 / 55.0),
            bench.Row("mistral-7b", "prefill", "bf16", 1, 512, "flex", note="skipped: RuntimeError")]
    table = bench.format_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[0].startswith("| model | op | kv | B | N | backend | µs |")
    assert "| 1.67x |" in table[3] and "| 92.0 |" in table[2] and "| - |" in table[4]


class CpuDryRun(bench.Bench):
    """Runs every workload once on the CPU (kernels through the interpreter) instead of timing it: catches errors
    in the GPU-only code paths of the benchmark."""

    def __init__(self):
        self.device, self.name, self.l2_bytes, self.reps, self.copy_gbps = torch.device("cpu"), "cpu", 1, 1, None

    def sync(self):
        pass

    def time_calls(self, calls, min_calls=8):
        for call in calls:
            call()
        return 1.0, "graph"

    def measure_copy(self):
        self.copy_gbps = 100.0
        return self.copy_gbps


def test_workloads_dry_run_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "MODELS", {"tiny": dict(hq=4, hkv=2, d=16)})
    monkeypatch.setattr(bench, "DECODE_SHAPES", [(2, 24)])
    monkeypatch.setattr(bench, "CASCADE_MIN_BATCH", 2)
    monkeypatch.setattr(bench, "PREFILL_POSITIONS", [20])
    out = tmp_path / "bench.json"
    args = bench.parse_args(["--models", "tiny", "--dtype", "fp16", "--tail", "8", "--no-flex", "--json", str(out)])
    report, rows = bench.run(args, CpuDryRun())
    kinds = {(r.op, r.kv, r.backend) for r in rows}
    for kv in ("fp16", "int8-token", "int8-head", "fp8-token", "fp16-shared-prefix"):
        assert ("decode", kv, "triton") in kinds
    assert ("prefill", "fp16", "triton") in kinds
    triton_rows = [r for r in rows if r.backend == "triton"]
    assert all(r.us == 1.0 and r.rel_err is not None and r.rel_err < 4e-3 for r in triton_rows), triton_rows
    assert "FAIL" not in bench.format_table(rows)
    assert report["rows"] and report["skipped"] == []
    assert json.loads(out.read_text())["rows"] == report["rows"]


def test_a_failing_kernel_becomes_a_row_note():
    """On the GPU a kernel that does not compile must cost one row, not the whole run."""
    runner = bench.Runner(CpuDryRun(), bench.parse_args([]))

    def broken():
        raise RuntimeError("PassManager::run failed\nmore")

    row = runner.triton_row(dict(model="m", op="decode", kv="bf16", batch=1, n=8), torch.bfloat16, 2.0, 100,
                            check=broken, calls=lambda cfg: [])
    assert row.us is None and row.note == "error: RuntimeError: PassManager::run failed"
    row = runner.triton_row(dict(model="m", op="decode", kv="bf16", batch=1, n=8), torch.bfloat16, 2.0, 100,
                            check=lambda: 0.5, calls=lambda cfg: [lambda: None])
    assert row.note.startswith("FAIL accuracy") and row.us == 1.0 and row.vs_best_torch == 2.0
