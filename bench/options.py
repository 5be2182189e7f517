"""The bench command's options, shared by `clara-edge bench` and `python -m clara_edge.bench` (import-light)."""
from __future__ import annotations

import argparse


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="subsets and fewer repetitions (< 10 min on a laptop CPU)")
    p.add_argument("--backend", action="append", default=None,
                   help="backends to time (repeatable): torch, onnx-fp32, onnx-int8, onnx-int4, onnx (all three), "
                        "coreml, cuda, cuda-triton")
    p.add_argument("--out", default="bench-out", help="output directory")
    p.add_argument("--data", dest="data_dir", default=None,
                   help="folder of dev-set JSONL files, or one holding them in eval/ (default: ../shared/data)")
    p.add_argument("--rows", type=int, default=None,
                   help="accuracy: first N questions of each dev set (default: all; --quick: 2)")
    p.add_argument("--reps", type=int, default=None,
                   help="latency: timed questions per configuration after one warm-up (default 5; --quick: 2)")
    p.add_argument("--only", choices=("accuracy", "latency"), action="append", default=None,
                   help="run only this part (repeatable; latency includes the exports it times and llama.cpp)")
