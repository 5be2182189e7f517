"""Evaluation data: QA rows, external corpora, and the candidate documents each question retrieves from.

Row format (JSONL, see shared/data/README.md):
    {"id", "dataset", "question", "golden_answers": [..], "docs": [{"title", "text"}, ..], "pos_index": [..]}
`pos_index` lists the gold documents: indices into the row's `docs`, or into the `--corpus` when one is given.

Candidate rules (`build_candidates`):
  * with a corpus (`--corpus`): every row retrieves from that corpus; `pos_index` points into it, and the
    row's own `docs` (possibly empty) are ignored;
  * otherwise a row with more than one doc retrieves from its own docs (the distractor setting);
  * otherwise (zero or one doc) the row retrieves from the pooled corpus of all docs of the file,
    deduplicated by (title, text) in order of first appearance, with `pos_index` remapped into the pool.
Rows that share a pool share one `docs` tuple object, so indexes and memories can be cached per pool.

A document is a `(title, text)` pair. It is shown to the models as `document_text(doc)`, i.e.
"title: text" (just "text" when the title is empty): the same string the text-RAG prompt writes out
(`prompt.text_background`), the compressor compresses and BM25 indexes.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ClaraError
from .prompt import document_text  # noqa: F401  (re-exported: the datasets' view of a document)

Doc = tuple[str, str]  # (title, text)


@dataclass(frozen=True)
class EvalRow:
    id: str
    question: str
    answers: tuple[str, ...]
    docs: tuple[Doc, ...]
    pos_index: tuple[int, ...]
    dataset: str = ""


@dataclass(frozen=True)
class Candidates:
    """What one question retrieves from: `docs` (shared object when `shared`) and its gold indices into them."""
    docs: tuple[Doc, ...]
    gold: tuple[int, ...]
    shared: bool = False


@dataclass(frozen=True)
class EvalSet:
    rows: list[EvalRow]
    candidates: list[Candidates]


def parse_doc(item, where: str) -> Doc:
    if isinstance(item, str):
        return ("", item)
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        title = item.get("title") or ""
        if not isinstance(title, str):
            raise ClaraError(f"{where}: document title must be a string")
        return (title, item["text"])
    got = (f"keys {sorted(item)}, no string \"text\"" if isinstance(item, dict) else type(item).__name__)
    raise ClaraError(f"{where}: a document must be {{\"title\", \"text\"}} (got {got})")


def parse_row(obj, where: str = "row") -> EvalRow:
    """One JSON object -> EvalRow (golden_answers may be a single string; docs may be plain strings)."""
    if not isinstance(obj, dict):
        raise ClaraError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ClaraError(f"{where}: missing or empty \"question\"")
    answers = obj.get("golden_answers", obj.get("answers"))
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ClaraError(f"{where}: \"golden_answers\" must be a list of strings")
    docs = obj.get("docs") or []
    if not isinstance(docs, list):
        raise ClaraError(f"{where}: \"docs\" must be a list")
    pos = obj.get("pos_index") or []
    if not isinstance(pos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in pos):
        raise ClaraError(f"{where}: \"pos_index\" must be a list of integers")
    return EvalRow(id=str(obj.get("id", where)), question=question, answers=tuple(answers),
                   docs=tuple(parse_doc(d, where) for d in docs), pos_index=tuple(pos),
                   dataset=str(obj.get("dataset") or ""))


def _read_text(path: str | Path, what: str) -> tuple[Path, str]:
    path = Path(path).expanduser()
    try:
        return path, path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClaraError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ClaraError(f"{what} path is a directory, not a file: {path}") from None
    except UnicodeDecodeError:
        raise ClaraError(f"{what} file {path} is not UTF-8 text") from None
    except OSError as e:
        raise ClaraError(f"cannot read {what} file {path}: {e.strerror}") from None


def _jsonl(path: Path, text: str, limit: int | None = None) -> list[tuple[str, object]]:
    """(location, parsed object) per non-blank line, up to `limit` objects."""
    out = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            out.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ClaraError(f"{where}: not valid JSON ({e.msg}); expected one JSON object per line") from None
    return out


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ClaraError(f"--limit must be at least 1, got {limit}")


def load_eval_rows(path: str | Path, limit: int | None = None) -> list[EvalRow]:
    """The first `limit` rows (all when None) of an eval JSONL file."""
    _check_limit(limit)
    path, text = _read_text(path, "eval data")
    rows = [parse_row(obj, where) for where, obj in _jsonl(path, text, limit)]
    if not rows:
        raise ClaraError(f"eval data file {path} holds no rows")
    return rows


def load_corpus(path: str | Path) -> list[Doc]:
    """A corpus file: a JSON list, or JSONL, of {"title", "text"} objects (plain strings also accepted)."""
    path, text = _read_text(path, "corpus")
    if text.lstrip().startswith("["):
        try:
            items = [(f"{path}[{i}]", d) for i, d in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ClaraError(f"corpus {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    else:
        items = _jsonl(path, text)
    docs = [parse_doc(item, where) for where, item in items]
    if not docs:
        raise ClaraError(f"corpus file {path} holds no documents")
    return docs


def _check_gold(row: EvalRow, n: int, of: str) -> None:
    bad = [i for i in row.pos_index if not 0 <= i < n]
    if bad:
        raise ClaraError(f"row {row.id}: pos_index {bad[0]} is out of range for {n} {of}")


def build_candidates(rows: Sequence[EvalRow], corpus: Sequence[Doc] | None = None) -> list[Candidates]:
    """Candidate documents and gold indices per row, by the rules in the module docstring.

    Pass every row of the file (not just the evaluated ones) so that the pooled corpus is the whole file's.
    """
    if corpus is not None:
        shared = tuple(corpus)
        if not shared:
            raise ClaraError("the corpus holds no documents")
        for row in rows:
            _check_gold(row, len(shared), "corpus documents")
        return [Candidates(shared, row.pos_index, shared=True) for row in rows]
    index: dict[Doc, int] = {}
    for row in rows:
        for doc in row.docs:
            index.setdefault(doc, len(index))
    pool = tuple(index)
    out = []
    for row in rows:
        _check_gold(row, len(row.docs), "docs of the row")
        if len(row.docs) > 1:
            out.append(Candidates(row.docs, row.pos_index))
            continue
        if not pool:
            raise ClaraError(f"row {row.id} has no docs and the file holds none to pool: pass --corpus")
        out.append(Candidates(pool, tuple(index[row.docs[i]] for i in row.pos_index), shared=True))
    return out


def load_eval_set(data: str | Path, corpus: str | Path | None = None, limit: int | None = None) -> EvalSet:
    """Rows to evaluate (the first `limit`) and their candidates; a pooled corpus spans the whole file."""
    _check_limit(limit)
    docs = load_corpus(corpus) if corpus is not None else None
    # With a corpus nothing is pooled, so only the evaluated rows need reading.
    rows = load_eval_rows(data, limit if docs is not None else None)
    candidates = build_candidates(rows, docs)
    n = len(rows) if limit is None else min(limit, len(rows))
    return EvalSet(rows[:n], candidates[:n])
