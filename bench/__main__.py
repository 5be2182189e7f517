"""`python -m clara_edge.bench`: the `clara-edge bench` command, plus --data-dir and --threads."""
from __future__ import annotations

import argparse
import sys

from .report import run_bench_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clara_edge.bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="subsets and fewer repetitions")
    p.add_argument("--backend", action="append", default=None,
                   help="torch, onnx-fp32, onnx-int8, onnx-int4, onnx (all three), coreml, cuda, cuda-triton")
    p.add_argument("--out", default="bench-out", help="output directory")
    p.add_argument("--rows", type=int, default=None, help="accuracy: first N questions of each dev set")
    p.add_argument("--only", choices=("accuracy", "latency"), action="append", default=None,
                   help="run only this part (repeatable)")
    p.add_argument("--model", default=None)
    p.add_argument("--base", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", default=None, help="folder with eval/*.jsonl (default: the repo's shared/data)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch, ORT and llama.cpp")
    return run_bench_command(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
