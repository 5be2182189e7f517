#!/usr/bin/env python3
"""Core ML prediction parity on a Mac (macOS 15+, `pip install -e '.[coreml]'`).

Linux CI converts and spec-checks Core ML exports but cannot run them; this script does the rest:

    python scripts/coreml_mac_check.py                      # tiny random model: export, then check
    python scripts/coreml_mac_check.py --export DIR         # an existing Core ML export (its source model loads)
    python scripts/coreml_mac_check.py --model default --quant int4 --out /tmp/clara-coreml \
        --data eval/nq_open_dev1000.jsonl --json parity.json

It runs the parity gate (`clara_edge.export.parity.check_export`): per-function max-abs / cosine against the
fp32 torch model, teacher-forced greedy-token agreement, free-running sequence match, F1 delta with --data,
size, peak RSS and decode tokens/s. Exit status 0 when the gate passes, 1 when it does not, 2 on errors.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _tiny_model():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import randomize_adapters, tiny_clara

    model = tiny_clara("llama")
    randomize_adapters(model, scale=0.05)
    return model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default=None, help="an existing Core ML export directory to check")
    p.add_argument("--model", default=None, help="model to export first (default: a tiny random model)")
    p.add_argument("--quant", default="int4", choices=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--palettize", action="store_true", help="4-bit palettes instead of int4 blocks")
    p.add_argument("--max-context", type=int, default=1024)
    p.add_argument("--out", default=None, help="where to export (default: a temporary directory)")
    p.add_argument("--data", default=None, help="dev JSONL for the F1 delta")
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    if sys.platform != "darwin":
        print("Core ML predictions need macOS; on Linux run the spec checks (tests/test_export_coreml.py)")
        return 2

    from clara_edge.errors import ClaraError
    from clara_edge.export.coreml_export import check_spec, export_coreml
    from clara_edge.export.parity import check_export

    try:
        reference = None
        export_dir = args.export
        if export_dir is None:
            if args.model is None:
                reference = _tiny_model()
            else:
                from clara_edge.checkpoint import load_model

                reference = load_model(None if args.model == "default" else args.model, dtype="fp32", device="cpu")
            export_dir = args.out or tempfile.mkdtemp(prefix="clara-coreml-")
            export_coreml(reference, export_dir, args.quant, args.max_context, args.palettize,
                          source=None if args.model in (None, "default") else args.model)
        spec = check_spec(export_dir)
        if spec["problems"]:
            print(json.dumps(spec, indent=2))
            return 1
        result = check_export(export_dir, reference_model=reference, dev_file=args.data, n_dev=args.limit,
                              json_out=args.json_out)
    except ClaraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in result.items()}, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
