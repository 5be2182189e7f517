"""Corpus loading and chunking: files and folders -> documents -> chunks of at most `doc_max_length` tokens.

Inputs: .txt and .md (one document per file; title = first markdown heading or the file stem) and .jsonl
(one row per line: a {"title", "text"} object or plain string, or a ../shared/data row whose "docs" are the
documents; exact (title, text) repeats within a file are kept once). Folders are walked in sorted order,
skipping hidden entries and other file types. Text must be UTF-8: binary (NUL bytes) or undecodable input
is a ClaraError naming the file; empty files are skipped and counted.

Chunks break after sentence ends or newlines where one lies within the token budget, else hard at the
budget. Each document is tokenized once (with offsets) in windows of WINDOW characters, so a 10 MB document
costs linear time and bounded memory. The budget covers `document_text((title, chunk))`, the exact string
the compressor reads, and every chunk is re-counted in that form (one batched call) and split further if a
tokenizer counts it differently out of context.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from .datasets import parse_doc
from .prompt import document_text
from .errors import ClaraError

SUFFIXES = (".txt", ".md", ".jsonl")
WINDOW = 1 << 16  # characters tokenized per call: bounds the offsets arrays for huge documents
# A new sentence starts after . ! ? (and closing quotes/brackets) plus whitespace, or after a newline.
_SENTENCE_START = re.compile(r"(?<=[.!?\u3002\uff01\uff1f])[\"'\u201d\u2019)\]]*\s+|\n\s*")
_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#\r]*$", re.MULTILINE)  # \r: Windows line ends
log = logging.getLogger("clara_edge")


@dataclass(frozen=True)
class Document:
    source: str  # resolved path of the file it came from
    title: str
    text: str
    index: int = 0  # position among the documents of its source


@dataclass(frozen=True)
class Chunk:
    source: str
    title: str
    text: str
    offset: int  # character offset of `text` in its document's text
    index: int  # position among the chunks of its document
    doc: int = 0  # Document.index


@dataclass(frozen=True)
class SourceFile:
    """One input file, read whole: its bytes identify it (sha256) before anything is parsed."""
    path: Path
    data: bytes

    @property
    def name(self) -> str:
        return str(self.path)

    @cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def documents(self) -> list[Document]:
        """Parse the file; [] when it holds no text. ClaraError for binary, non-UTF-8 or malformed input."""
        text = _decode(self.path, self.data)
        if not text.strip():
            return []
        if self.path.suffix.lower() == ".jsonl":
            return _jsonl_documents(self.name, text)
        title, body = _title_and_body(self.path, text)
        return [Document(self.name, title, body)] if body.strip() else []


# ------------------------------------------------------------------------------------------ files
def source_path(path: str | Path) -> Path:
    """The absolute path a file is indexed under: its folder resolved, its own name kept. Why not resolve the name
    too: a symlinked note must be known by its link, which is what goes when the user deletes the note."""
    absolute = Path(path).expanduser().absolute()  # not abspath: "link/../n.md" must go through the link
    return absolute.parent.resolve() / absolute.name


def path_list(paths: Iterable[str | Path] | str | Path) -> list[str | Path]:
    """One path or several, as a list (a lone string is one path, not its characters)."""
    return [paths] if isinstance(paths, (str, Path)) else list(paths)


def list_files(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    """Expand files and folders into the supported files (as `source_path` names them), in argument order then
    sorted folder order. Links to nothing and special files (pipes, devices) in a folder are skipped with a
    warning, and so are unreadable subfolders (their files, already indexed, are not taken for deleted) and
    linked subfolders (not followed: give their own path); given by name, they are an error. A file reached
    twice (a link beside its target) is listed once, by the name met first."""
    paths = path_list(paths)
    out: dict[Path, None] = {}
    targets: set[Path] = set()

    def add(file: Path) -> None:
        target = file.resolve()
        if target not in targets:
            targets.add(target)
            out.setdefault(source_path(file))
    for given in paths:
        if not str(given).strip():  # an unset shell variable: "" would mean the current folder
            raise ClaraError("an empty path was given: name the files or folders")
        path = Path(given).expanduser()
        if path.is_dir():
            found = []
            for root, dirs, files in os.walk(path, onerror=_skip_unreadable):
                for name in dirs:
                    if not name.startswith(".") and Path(root, name).is_symlink():
                        log.warning("skipped %s: a linked folder (index it by its own path)", Path(root, name))
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for name in files:
                    file = Path(root, name)
                    if name.startswith(".") or file.suffix.lower() not in SUFFIXES:
                        continue
                    if file.is_file():
                        found.append(file)
                    else:
                        log.warning("skipped %s: %s", file, _not_a_file(file))
            for file in sorted(found, key=lambda p: p.parts):  # sorted by path: a/b.txt < a/c/d.txt < a/e.txt
                add(file)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise ClaraError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                                 f"index {', '.join(SUFFIXES)} files or folders")
            add(path)
        elif path.exists() or path.is_symlink():
            raise ClaraError(f"cannot index {path}: {_not_a_file(path)}")
        else:
            raise ClaraError(f"no such file or folder: {path}")
    if not out:
        raise ClaraError(f"no {', '.join(SUFFIXES)} files in {' '.join(map(str, paths))}")
    return list(out)


def _skip_unreadable(error: OSError) -> None:
    log.warning("skipped folder %s: %s", error.filename, error.strerror or error)


def _not_a_file(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"a link to {os.readlink(path)}, which does not exist"
    return "not a regular file (a pipe, socket or device)"


def read_source(path: Path) -> SourceFile:
    try:
        return SourceFile(path, path.read_bytes())
    except OSError as e:
        raise ClaraError(f"cannot read {path}: {e.strerror or e}") from None


def load_documents(paths: Iterable[str | Path], skipped: list[str] | None = None) -> Iterator[Document]:
    """Documents of every file under `paths`; empty files are appended to `skipped` (and logged).

    Raises ClaraError when nothing at all results, so an empty corpus never passes silently.
    """
    empty: list[str] = []
    found = False
    for path in list_files(paths):
        docs = read_source(path).documents()
        if not docs:
            empty.append(str(path))
        found = found or bool(docs)
        yield from docs
    if skipped is not None:
        skipped.extend(empty)
    if empty:
        log.warning("skipped %d empty file(s)", len(empty))
    if not found:
        raise ClaraError(f"no documents in {' '.join(map(str, paths))} ({len(empty)} empty file(s) skipped)")


def _decode(path: Path, data: bytes) -> str:
    nul = data.find(b"\0")
    if nul >= 0:
        raise ClaraError(f"{path}: binary file (NUL byte at offset {nul}); only UTF-8 text can be indexed")
    try:
        return data.decode("utf-8-sig")  # strict; a UTF-8 BOM is dropped
    except UnicodeDecodeError as e:
        raise ClaraError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8") \
            from None


def _title_and_body(path: Path, text: str) -> tuple[str, str]:
    """Markdown: the first heading is the title, and is dropped from the body when it opens the file."""
    if path.suffix.lower() == ".md":
        heading = _HEADING.search(text)
        if heading:
            if not text[:heading.start()].strip():
                body = text[heading.end():].lstrip("\r\n")
                # a note that is only a heading is its own text
                return (heading.group(1), body) if body.strip() else (path.stem, heading.group(1))
            return heading.group(1), text
    return path.stem, text


def _jsonl_documents(source: str, text: str) -> list[Document]:
    seen: set[tuple[str, str]] = set()
    out: list[Document] = []
    # Split on \n only: str.splitlines would also break at U+2028 and friends, which JSON strings may hold.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{source}:{lineno}"
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:
            raise ClaraError(f"{where}: not valid JSON ({getattr(e, 'msg', type(e).__name__)}); "
                             "expected one JSON object per line") from None
        items = row["docs"] if isinstance(row, dict) and "docs" in row else [row]
        if not isinstance(items, list):
            raise ClaraError(f"{where}: \"docs\" must be a list")
        for item in items:
            doc = parse_doc(item, where)
            if not doc[1].strip() or doc in seen:
                continue
            _check_unicode(doc, where)
            seen.add(doc)
            out.append(Document(source, doc[0], doc[1], len(out)))
    return out


def _check_unicode(doc: tuple[str, str], where: str) -> None:
    """JSON escapes can spell lone surrogates, which no UTF-8 store or tokenizer accepts."""
    try:
        for s in doc:
            s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ClaraError(f"{where}: text holds an unpaired surrogate at character {e.start}") from None


# ------------------------------------------------------------------------------------------ chunking
def chunk_document(doc: Document, tokenizer, max_tokens: int) -> list[Chunk]:
    """Split `doc` into chunks whose `document_text((title, text))` is at most `max_tokens` tokens."""
    if max_tokens < 1:
        raise ClaraError(f"chunk length must be at least 1 token, got {max_tokens}")
    if not getattr(tokenizer, "is_fast", False):
        raise ClaraError("chunking needs a fast (Rust) tokenizer: it reads token offsets")
    title, prefix = _fitting_title(doc.title, tokenizer, max_tokens)
    doc = replace(doc, title=title)
    budget = max(max_tokens - prefix, 1)
    spans: list[tuple[int, int]] = []
    pos, text = 0, doc.text
    while pos < len(text):
        end = _window_end(text, pos)
        starts = _token_starts(tokenizer, text[pos:end]) + pos  # [T]
        ranges = _pack(starts, _sentence_cuts(text, pos, end, starts), 0, starts.size, budget)
        next_pos = end
        if end < len(text) and len(ranges) > 1:
            # The window's last chunk may continue past it: redo it in the next window.
            *ranges, (carry, _) = ranges
            next_pos = int(starts[carry])
        bounds = np.append(starts, end)  # [T + 1] character position of each token boundary
        spans += _fit(doc, tokenizer, prefix + budget, starts, bounds, ranges)
        pos = next_pos
    chunks = []
    for a, b in spans:
        raw = text[a:b]
        body = raw.strip()
        if body:
            lead = len(raw) - len(raw.lstrip())
            chunks.append(Chunk(doc.source, doc.title, body, a + lead, len(chunks), doc.index))
    return chunks


def _fitting_title(title: str, tokenizer, max_tokens: int) -> tuple[str, int]:
    """`title` cut to whole tokens so that its chunk prefix ("title: ") takes at most half the budget, and that
    prefix's length in tokens. Why: the rest is for text, and the compressor cuts a chunk's end, which is text."""
    limit = max(max_tokens // 2, 1)
    starts = _token_starts(tokenizer, title)
    keep = len(starts)
    while title:
        prefix = len(_token_counts(tokenizer, [document_text((title, ""))])[0])
        if prefix <= limit:
            return title, prefix
        keep = min(keep - 1, len(starts) - (prefix - limit))  # drop the tokens over the limit, one at least
        title = title[:starts[keep]].rstrip() if keep > 0 else ""
    return "", 0


def _token_counts(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def _token_starts(tokenizer, text: str) -> np.ndarray:
    """Character start of each token of `text` [T] (made non-decreasing)."""
    enc = tokenizer(text, add_special_tokens=False, truncation=False, return_offsets_mapping=True,
                    return_attention_mask=False, verbose=False)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return np.maximum.accumulate(offsets[:, 0]) if offsets.size else offsets[:, 0]


def _window_end(text: str, pos: int) -> int:
    """End of the window from `pos`: at whitespace in its second half, so no word is cut in two."""
    end = pos + WINDOW
    if end >= len(text):
        return len(text)
    cut = max(text.rfind(c, pos + WINDOW // 2, end) for c in " \n\t")
    return cut + 1 if cut >= 0 else end


def _sentence_cuts(text: str, pos: int, end: int, starts: np.ndarray) -> np.ndarray:
    """Token indices at which a sentence starts, for text[pos:end] with token starts `starts`."""
    chars = np.fromiter((m.end() + pos for m in _SENTENCE_START.finditer(text, pos, end)), dtype=np.int64)
    return np.unique(np.searchsorted(starts, chars, side="left"))


def _pack(starts: np.ndarray, cuts: np.ndarray, lo: int, hi: int, budget: int) -> list[tuple[int, int]]:
    """Token ranges covering [lo, hi), each at most `budget` tokens, ending at the last cut within reach."""
    out = []
    i = lo
    while i < hi:
        j = min(i + budget, hi)
        if j < hi:
            k = int(np.searchsorted(cuts, j, side="right")) - 1
            if k >= 0 and cuts[k] > i:
                j = int(cuts[k])
            j = _char_boundary(starts, i, j, hi)
        out.append((i, j))
        i = j
    return out


def _char_boundary(starts: np.ndarray, i: int, j: int, hi: int) -> int:
    """Move a cut at token j off the middle of a character (byte tokens of one character share a start):
    back to the character's first token if that leaves the chunk non-empty, else forward past it."""
    back = j
    while back > i and starts[back] == starts[back - 1]:
        back -= 1
    if back > i:
        return back
    while j < hi and starts[j] == starts[j - 1]:
        j += 1
    return j


def _fit(doc: Document, tokenizer, limit: int, starts: np.ndarray, bounds: np.ndarray,
         ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges -> character spans, re-counted as the compressor will see them; the rare ranges over
    `limit` tokens are split further.

    A slice can tokenize longer alone than in context (a word losing its leading space, the title joined on).
    This second pass costs about one more tokenization of the document.
    """
    done, todo = [], ranges
    while todo:
        texts = [document_text((doc.title, doc.text[bounds[i]:bounds[j]].strip())) for i, j in todo]
        again = []
        for (i, j), ids in zip(todo, _token_counts(tokenizer, texts)):
            over = len(ids) - limit
            parts = _pack(starts, np.empty(0, np.int64), i, j, max(j - i - over, 1)) if over > 0 else [(i, j)]
            (done if len(parts) == 1 else again).extend(parts)
        todo = again
    return [(int(bounds[i]), int(bounds[j])) for i, j in sorted(done)]
