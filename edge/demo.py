"""`clara-edge demo`: index the bundled corpus into a store and answer a few of its questions."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from .backend import Backend
from .indexing import index_paths
from .metrics import f1_score
from .runtime import Runtime, format_answer_footer

DEMO_CORPUS = Path(__file__).parent / "demo_corpus"


def demo_documents() -> list[Path]:
    return sorted(p for p in DEMO_CORPUS.glob("[0-9][0-9]-*.md"))


def demo_questions() -> list[dict]:
    return json.loads((DEMO_CORPUS / "questions.json").read_text())


def run_demo(backend: Backend, store_dir: Path | None = None, limit: int = 3, as_json: bool = False) -> int:
    """Index the bundled corpus (into `store_dir`, or a temporary store) and ask `limit` questions."""
    with tempfile.TemporaryDirectory(prefix="clara-demo-") as tmp:
        store_dir = store_dir or Path(tmp) / "store"
        started = time.perf_counter()
        report = index_paths(backend, demo_documents(), store_dir, progress=not as_json)
        if not as_json:
            print(report.summary())
        runtime = Runtime.open(backend, store_dir)
        for item in demo_questions()[:limit]:
            if not as_json:
                print(f"\nQ: {item['question']}\nA: ", end="", flush=True)
            answer = runtime.ask(item["question"], top_k=3,
                                 on_text=None if as_json else (lambda piece: print(piece, end="", flush=True)))
            hit = Path(answer.sources[0]["source"]).name == item["source"]
            if as_json:
                print(json.dumps({**answer.to_dict(), "expected": item["answers"], "expected_source": item["source"],
                                  "f1": f1_score(answer.answer, item["answers"]), "top1_source_correct": hit}))
                continue
            print(f"   expected: {' / '.join(item['answers'])} (from {item['source']}; "
                  f"top source {'correct' if hit else 'wrong'})")
            print(format_answer_footer(answer))
        if not as_json:
            print(f"\ndemo finished in {time.perf_counter() - started:.1f} s")
    return 0
