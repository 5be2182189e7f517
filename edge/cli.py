"""The `clara-edge` command line. Thin: it parses, calls the Python API, prints. Nothing imports it."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .bench.options import add_bench_arguments
from .errors import ClaraError
from .quiet import quiet_libraries

PROG = "clara-edge"
BNB_CHECKS = ("bnb-int8", "bnb-nf4")
STORE_CHECKS = ("store-int8", "store-int4")  # a memory store's quantised vectors against fp16 ones


# ------------------------------------------------------------------------------------------ shared options
def _model_options(p: argparse.ArgumentParser, compression: bool = True) -> None:
    p.add_argument("--model", default=None, help="checkpoint dir, export dir, CLaRa folder, base model "
                   "(smollm2-135m, HF folder, .gguf); default: the shipped trained default")
    p.add_argument("--base", default=None, help="where the base model comes from (overrides the checkpoint's)")
    if compression:
        p.add_argument("--compression", type=int, default=None, help="compression rate (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda[:N] or mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16")


def _backend_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "coreml"],
                   help="execution backend (auto follows --model)")


def _ask_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="memory store directory")
    p.add_argument("--top-k", default="5", help="documents to use, or 'auto' (as many as fit above --min-score)")
    p.add_argument("--min-score", type=float, default=0.0, help="cosine floor for --top-k auto (--retriever clara)")
    p.add_argument("--retriever", default="clara+bm25", choices=["clara+bm25", "clara"],
                   help="clara+bm25 (default): memories fused with BM25 over the chunks' text; clara: memories alone")
    p.add_argument("--context", type=int, default=4096, help="generator context positions (default 4096)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=None)


def _top_k(value: str) -> int | None:
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise ClaraError(f"--top-k must be a number or 'auto', got {value!r}") from None


def _open(args: argparse.Namespace):
    from .backend import open_backend
    return open_backend(args.model, getattr(args, "backend", "auto"), getattr(args, "compression", None),
                        args.device, args.dtype, args.base)


def _sampling(args: argparse.Namespace) -> dict:
    return {"do_sample": args.sample, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}


# ------------------------------------------------------------------------------------------ commands
def cmd_models(args: argparse.Namespace) -> int:
    from .base_models import cache_root, fetch_builtin, list_models
    if args.action == "fetch":
        print(fetch_builtin(args.name))
        return 0
    print(f"cache: {cache_root()}")
    for row in list_models():
        state = f"cached at {row['cached']}" if row["cached"] else "not fetched (clara-edge models fetch)"
        print(f"{row['name']:<16} {row['source']:<22} {row['license']:<12} {state}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    if args.store:
        from .retrieval import saved_text_index
        from .store import MemoryStore
        with MemoryStore.open(Path(args.store)) as store:
            saved = saved_text_index(store)
            info = {**store.info(), "text_index": saved.name if saved else "none saved (clara+bm25 builds it on its "
                                                                              "first question; `index` saves it)"}
    else:
        model = _open(args)
        export = model.describe() if hasattr(model, "describe") else {}  # export directories describe themselves
        info = {"backend": model.name, **export, "fingerprint": model.fingerprint(), **model.config.to_dict(),
                "n_mem": model.config.n_mem, "retrieval": "centred cosine" if model.retrieval_centre is not None
                else "cosine"}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        rows = _flat(info)
        width = max(map(len, rows)) + 1
        for key, value in rows.items():
            print(f"{key:<{width}}{value}")
    return 0


def _flat(info: dict, prefix: str = "") -> dict:
    """Nested dicts as dotted keys (`extra.init.recipe`), one line each in `info`'s table."""
    flat = {}
    for key, value in info.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def cmd_index(args: argparse.Namespace) -> int:
    from .indexing import index_paths
    report = index_paths(_open(args), [Path(p) for p in args.paths], Path(args.store), batch_size=args.batch_size)
    print(report.summary())
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from .indexing import forget_paths
    removed = forget_paths(Path(args.store), args.paths)
    print(f"removed {removed} chunk{'s' if removed != 1 else ''}; store {args.store}")
    return 0


def _print_answer(answer, as_json: bool) -> None:
    from .runtime import format_answer_footer
    print(json.dumps(answer.to_dict(), indent=2) if as_json else format_answer_footer(answer))


def _runtime(args: argparse.Namespace):
    args.top_k = _top_k(args.top_k)  # validate options before loading anything
    from .runtime import Runtime
    return Runtime.open(_open(args), Path(args.store), context=args.context, retriever=args.retriever)


def _ask_once(rt, question: str, args: argparse.Namespace):
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    return rt.ask(question, top_k=args.top_k, min_score=args.min_score,
                  max_new_tokens=args.max_new_tokens, on_text=stream, **_sampling(args))


def cmd_ask(args: argparse.Namespace) -> int:
    answer = _ask_once(_runtime(args), args.question, args)
    _print_answer(answer, args.json)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """A question per line. With --json, stdout holds one JSON object per answer and nothing else (the banner and
    prompts go to stderr). Ctrl-C stops the answer being written and asks for the next question."""
    from .runtime import format_answer_footer
    rt = _runtime(args)
    prompts = sys.stderr if args.json else sys.stdout
    print("clara-edge chat: ask a question, empty line or Ctrl-D to quit; Ctrl-C stops an answer.", file=prompts)
    while True:
        print("> ", end="", flush=True, file=prompts)
        try:
            question = input()
        except (EOFError, KeyboardInterrupt):
            question = ""
        if not question.strip():
            print(file=prompts)  # the shell's prompt on a line of its own
            break
        try:
            answer = _ask_once(rt, question.strip(), args)
        except ClaraError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            print("\n(stopped)", file=prompts)
            continue
        print(json.dumps(answer.to_dict(), ensure_ascii=False) if args.json else format_answer_footer(answer),
              flush=True)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    if args.questions < 1:  # before the model loads
        raise ClaraError(f"--questions must be at least 1, got {args.questions}")
    return run_demo(_open(args), store_dir=Path(args.store) if args.store else None, limit=args.questions,
                    as_json=args.json)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_file
    result = evaluate_file(_open(args), args.data, mode=args.mode, retriever=args.retriever, top_k=args.top_k,
                           corpus=args.corpus, limit=args.limit, json_out=args.json_out,
                           batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           retrieval_only=args.retrieval_only, keep_rows=args.per_question)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0


def _recipe_overrides(args: argparse.Namespace) -> dict:
    out = {"compression": args.compression, "max_steps": args.max_steps, "data_dir": args.data}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ClaraError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from clara_edge.export.train import load_recipe, train
    overrides = _recipe_overrides(args)
    out = args.out
    if out is None:
        rate = args.compression or load_recipe(args.recipe, overrides)["model"]["compression_rate"]
        out = Path("runs") / f"{Path(str(args.recipe)).stem}-cr{rate}"
    final = train(args.recipe, Path(out), resume=not args.no_resume, overrides=overrides, device=args.device,
                  stop_after=args.stop_after, progress=not args.no_progress, init=args.init)
    print(final if final is not None else "stopped; run the same command again to continue")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clara_edge.export.api import check_bnb, check_export, check_memory_quant, export_model
    if args.check:  # an export, bitsandbytes weights or store vectors, each against --model in fp32
        from .checkpoint import load_model

        def reference():
            return load_model(args.model, args.compression, "cpu", "fp32", args.base)

        common = {"dev_file": args.data, "n_dev": args.limit, "json_out": args.json_out}
        if args.check in STORE_CHECKS:  # generation by the same model from decoded store vectors
            result = check_memory_quant(reference(), args.check.removeprefix("store-"), **common)
        elif args.check in BNB_CHECKS:  # bitsandbytes base weights of the torch backend
            from .devices import resolve_device
            device = str(resolve_device(args.device))
            result = check_bnb(reference(), args.check.removeprefix("bnb-"), device, **common)
        else:  # --model names the reference only when the export's recorded source has changed since
            result = check_export(Path(args.check), reference() if args.model else None, **common)
        print(json.dumps(result, indent=2))
        if result.get("passed") is False:  # a gate that scripts and CI can act on
            print(f"{PROG}: the parity gate failed (see 'targets' and 'passed' above)", file=sys.stderr)
            return 1
        return 0
    if not args.out:
        raise ClaraError("export needs --out DIR (or --check DIR to check an existing export)")
    if args.lora and args.format != "onnx":
        raise ClaraError("--lora applies to ONNX exports (a Core ML export's functions always share the base)")
    if args.dtype not in ("auto", "fp32"):  # --quant chooses the export's precision, from fp32 weights
        raise ClaraError(f"export reads the model in fp32 (--quant sets the export's precision): drop --dtype {args.dtype}")
    args.dtype, args.device = "fp32", "cpu"  # a GPU's bf16 would round an "fp32" export's weights
    options = {"lora": args.lora} if args.lora else {}
    source = args.model  # recorded for `--check`, which may run from another folder
    if source and Path(source).expanduser().exists():
        source = str(Path(source).expanduser().resolve())
    print(export_model(_open(args), args.format, args.quant, Path(args.out), source=source, **options))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from clara_edge.bench.report import run_bench_command
    return run_bench_command(args)


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="On-device compression-native RAG (CLaRa).")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch and ONNX Runtime "
                             "(default: $CLARA_EDGE_THREADS, else all cores but one)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('clara_edge').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=fn)
        return p

    p = add("demo", cmd_demo, "index the bundled corpus and answer a few questions with the default model")
    _model_options(p)
    _backend_option(p)
    p.add_argument("--store", default=None, help="store directory (default: a temporary one)")
    p.add_argument("--questions", type=int, default=3, help="how many bundled questions to ask")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")

    p = add("index", cmd_index, "compress documents (.txt, .md, .jsonl, folders) into a memory store")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--store", required=True, help="store directory (created if missing)")
    p.add_argument("--batch-size", type=int, default=16)
    _model_options(p)
    _backend_option(p)

    p = add("forget", cmd_forget, "remove files (or every file below a folder) from a memory store")
    p.add_argument("paths", nargs="+", help="files or folders, as they were indexed")
    p.add_argument("--store", required=True, help="store directory")

    p = add("ask", cmd_ask, "answer one question from a memory store, streaming, then cite sources")
    p.add_argument("question")
    _ask_options(p)
    _model_options(p)
    _backend_option(p)
    p.add_argument("--json", action="store_true", help="print one JSON object with answer, sources, stats")

    p = add("chat", cmd_chat, "interactive question loop over a memory store")
    _ask_options(p)
    _model_options(p)
    _backend_option(p)
    p.add_argument("--json", action="store_true")

    p = add("eval", cmd_eval, "accuracy on a JSONL eval set (EM, F1, cover-EM, recall@k)")
    p.add_argument("--data", required=True, help="eval JSONL (the ../shared/data row format)")
    p.add_argument("--corpus", default=None, help="retrieve over this corpus (JSON list or JSONL of title/text)")
    p.add_argument("--mode", default="clara", choices=["clara", "text", "text-tuned", "closed-book"])
    p.add_argument("--retriever", default=None, choices=["bm25", "clara", "clara+bm25", "oracle"],
                   help="default: clara for --mode clara, bm25 for text modes")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--limit", type=int, default=None, help="first N rows only")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--retrieval-only", action="store_true",
                   help="rank and score recall@k only, no answers (fast retriever comparisons)")
    p.add_argument("--json", dest="json_out", default=None, help="write the result object to this file")
    p.add_argument("--per-question", action="store_true",
                   help="with --json: add each question's prediction, scores and retrieved documents (\"rows\")")
    _model_options(p)
    _backend_option(p)

    p = add("train", cmd_train, "train adapters by distillation (CLaRa's three stages) from a recipe; resumable")
    p.add_argument("--recipe", default="default", help="recipe name (export/recipes/NAME.json) or path")
    p.add_argument("--out", default=None, help="run directory (default runs/<recipe>-cr<N>); resumes if it exists")
    p.add_argument("--compression", type=int, default=None, help="compression rate (overrides the recipe)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps per stage (smoke runs)")
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: what accelerate picks)")
    p.add_argument("--data", default=None, help="training data folder (default: the recipe's)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop after N optimizer steps of this invocation (rerun to continue)")
    p.add_argument("--no-resume", action="store_true", help="start the run directory over")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start from this clara-edge checkpoint ('default': the shipped one at the recipe's rate) "
                        "instead of fresh adapters")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any recipe field, e.g. stages.0.lr=3e-4 (VALUE parsed as JSON when it can be)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = add("export", cmd_export, "export to ONNX / Core ML with quantisation, or check an export's parity")
    p.add_argument("--format", default="onnx", choices=["onnx", "coreml"])
    p.add_argument("--quant", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    p.add_argument("--out", default=None, help="export directory")
    p.add_argument("--lora", default=None, choices=["merged-generator", "shared", "merged"],
                   help="ONNX: how the roles carry their adapters (default merged-generator: the encoders share one "
                        "base, the generator merges its adapter for faster decoding; shared: smallest; merged)")
    p.add_argument("--check", default=None, metavar="DIR", help="parity-check an export against torch fp32; or "
                   "bnb-int8 / bnb-nf4: bitsandbytes base weights of --model (torch backend) against the same in fp32; "
                   "or store-int8 / store-int4: a memory store's quantised vectors of --model against fp16 ones")
    p.add_argument("--data", default=None, help="dev JSONL for the F1 delta of --check")
    p.add_argument("--limit", type=int, default=100, help="dev questions for --check")
    p.add_argument("--json", dest="json_out", default=None, help="write --check's result here")
    _model_options(p)

    p = add("bench", cmd_bench, "accuracy, latency and memory benchmarks; writes report.json/.md and plots")
    add_bench_arguments(p)
    _model_options(p, compression=False)

    p = add("info", cmd_info, "describe a memory store (--store) or a model (--model)")
    p.add_argument("--store", default=None)
    p.add_argument("--json", action="store_true")
    _model_options(p)
    _backend_option(p)

    p = add("models", cmd_models, "list built-in base models, or fetch one into the cache")
    p.add_argument("action", nargs="?", default="list", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", default="smollm2-135m")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        from .devices import configure_threads
        configure_threads(args.threads)
        return int(args.func(args) or 0)
    except ClaraError as e:  # one line, even when it quotes a file name with a line break in it
        print(f"{PROG}: error: " + str(e).replace("\n", "\\n"), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing more to say, nor anyone to say it to
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush fails quietly too
        return 1
    except Exception as e:  # a bug: still one line, unless the user asks for the traceback
        if os.environ.get("CLARA_EDGE_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"{PROG}: internal error: {type(e).__name__}: {first} (CLARA_EDGE_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
