"""`python -m clara_edge.bench`: the `clara-edge bench` command, plus --data-dir and --threads."""
from __future__ import annotations

import argparse
import sys

from clara_edge.errors import ClaraError

from .options import add_bench_arguments
from .report import run_bench_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clara_edge.bench", description=__doc__)
    add_bench_arguments(p)
    p.add_argument("--model", default=None)
    p.add_argument("--base", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--data-dir", default=None,
                   help="folder with eval/*.jsonl (default: ../shared/data beside the repo)")
    p.add_argument("--threads", type=int, default=None, help="threads for torch, ORT and llama.cpp")
    try:
        return run_bench_command(p.parse_args(argv))
    except ClaraError as e:  # bad input: one line, not a traceback
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
