"""`clara-edge index`: files -> documents -> chunks -> memories, appended to a memory store.

Resumable by construction: the store commits once per batch, and a source (file) counts as done only when
the batch holding its last chunk commits. A later run skips sources whose bytes (sha256) are unchanged and
complete, continues a source that was cut off after its committed chunks (chunking is deterministic for the
same bytes and model; the last committed chunk is checked against the new chunking, and the source is redone
from scratch if it differs), replaces the chunks of a source that changed, and removes the sources below a
given folder whose files are gone.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .corpus import Chunk, SourceFile, chunk_document, list_files, path_list, read_source
from .datasets import document_text
from .errors import ClaraError
from .retrieval import save_text_index
from .store import MemoryStore, StoreSpec

COMPACT_DEAD_FRACTION = 0.25  # rewrite the vector file once this share of its rows is dead


@dataclass
class IndexReport:
    store: str
    files: int = 0
    sources_indexed: int = 0
    sources_unchanged: int = 0
    sources_resumed: int = 0  # cut off by an earlier run, continued after its committed chunks
    chunks_resumed: int = 0  # chunks of those sources the earlier run had committed
    sources_removed: int = 0  # below a folder indexed now, their files gone from disk
    empty_files: list[str] = field(default_factory=list)
    documents: int = 0  # documents read from the sources indexed now
    chunks_added: int = 0
    seconds: float = 0.0
    rows_compacted: int = 0

    @property
    def docs_per_s(self) -> float:
        """Stored documents (chunks) compressed and committed per second of the run."""
        return self.chunks_added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "docs_per_s": self.docs_per_s}

    def summary(self) -> str:
        parts = [f"indexed {self.sources_indexed} of {self.files} files: {self.documents} documents -> "
                 f"{self.chunks_added} chunks in {self.seconds:.1f} s ({self.docs_per_s:.1f} docs/s)"]
        if self.sources_unchanged:
            parts.append(f"{self.sources_unchanged} unchanged")
        if self.sources_resumed:
            parts.append(f"{self.sources_resumed} continued after the {self.chunks_resumed} chunks an earlier run "
                         f"committed")
        if self.empty_files:
            parts.append(f"{len(self.empty_files)} empty skipped")
        if self.sources_removed:
            parts.append(f"{self.sources_removed} removed (their files are gone)")
        return "; ".join(parts) + f"; store {self.store}"


@dataclass
class _Batch:
    chunks: list[Chunk] = field(default_factory=list)
    begin: dict[str, str] = field(default_factory=dict)  # sources whose first chunk is here: path -> sha256
    complete: list[str] = field(default_factory=list)  # sources whose last chunk is here


def store_spec(model, dtype: str = "fp16") -> StoreSpec:
    """The store a model writes: its compressor fingerprint, rate and memory shape."""
    cfg = model.config
    hidden = getattr(model, "hidden_size", None) or int(model.compress(["x"]).shape[-1])
    return StoreSpec(model.fingerprint(), cfg.compression_rate, cfg.n_mem, hidden, dtype, cfg.base_model)


def index_paths(model, paths: Iterable[str | Path] | str | Path, store_dir: str | Path, batch_size: int = 16,
                progress: bool = True, dtype: str = "fp16") -> IndexReport:
    """Index files and folders into the store at `store_dir`.

    A missing store is created for `model` with record `dtype` (fp16, int8 or int4); an existing one must
    match the model's fingerprint and compression rate and keeps its own dtype. Commits every `batch_size`
    chunks; a ClaraError for a bad file comes after the work before it is committed. The progress bar shows
    only on a terminal, so that logs of a redirected run stay readable.
    """
    if batch_size < 1:
        raise ClaraError(f"--batch-size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    paths = path_list(paths)
    files = list_files(paths)
    report = IndexReport(store=str(store_dir), files=len(files))
    with MemoryStore.open_or_create(store_dir, store_spec(model, dtype)) as store, \
            tqdm(desc="index", unit="doc", disable=None if progress else True, dynamic_ncols=True) as bar:
        if store.names_links_by_target:
            _name_linked_files_by_their_links(store, files)
        report.sources_removed = _remove_gone(store, paths, files)
        completed = 0  # the chunk count is unknown up front (files are chunked as they are read): files give the total
        for batch in _batches(_pending(files, store, model, report), batch_size):
            texts = [document_text((c.title, c.text)) for c in batch.chunks]
            store.add(batch.chunks, model.compress(texts, batch_size=batch_size), batch.begin, batch.complete)
            report.chunks_added += len(batch.chunks)
            completed += len(batch.complete)
            done = completed + report.sources_unchanged + len(report.empty_files)
            bar.set_postfix_str(f"files {done}/{len(files)}", refresh=False)
            bar.update(len(batch.chunks))
        report.rows_compacted = _finish(store)
    if report.empty_files and report.empty_files == [str(f) for f in files]:
        raise ClaraError(f"no documents to index: all {len(files)} files are empty")
    report.seconds = time.perf_counter() - started
    return report


def forget_paths(store_dir: str | Path, paths: Iterable[str | Path] | str | Path) -> int:
    """Remove sources (files, or every source below a folder) from a store; returns how many chunks went."""
    store_dir = Path(store_dir).expanduser()
    if not store_dir.is_dir():
        raise ClaraError(f"no memory store at {store_dir}")
    with MemoryStore.open(store_dir, write=True) as store:
        removed = store.delete_source(*path_list(paths))
        _finish(store)
    return removed


def _finish(store: MemoryStore) -> int:
    """After a change: compact once enough rows are dead (returns rows reclaimed), save the BM25 index."""
    info = store.info()
    compacted = store.compact() if info["dead_rows"] > COMPACT_DEAD_FRACTION * max(info["rows"], 1) else 0
    save_text_index(store)  # for clara+bm25: a new process then maps it instead of building it
    return compacted


def _remove_gone(store: MemoryStore, paths: Iterable[str | Path], files: list[Path]) -> int:
    """Delete the sources below each given folder whose files no longer exist (a note deleted from disk must
    not keep answering); returns how many went."""
    listed = {str(f) for f in files}
    gone = list(dict.fromkeys(name for given in paths if Path(given).expanduser().is_dir()
                              for name in store.sources_under(str(Path(given).expanduser().resolve()))
                              if name not in listed and _deleted(name)))
    if gone:
        store.delete_source(*gone)
    return len(gone)


def _name_linked_files_by_their_links(store: MemoryStore, files: list[Path]) -> None:
    """Stores indexed before 2026-12-05 named a symlinked file by its target: that source takes the link's name
    now (`corpus.source_path`) instead of the same text being indexed a second time beside it."""
    for file in files:
        target = str(file.resolve())
        if target != str(file) and store.source_state(str(file)) is None and store.source_state(target):
            store.rename_source(target, str(file))


def _deleted(name: str) -> bool:
    try:
        return not Path(name).exists()
    except OSError:  # unreadable (a folder's permissions) is not deleted
        return False


def _pending(files: list[Path], store: MemoryStore, model, report: IndexReport
             ) -> Iterator[tuple[Chunk, SourceFile, bool, bool]]:
    """(chunk, its source, first chunk of the source?, last?) for every source that needs (re)indexing."""
    for path in files:
        source = read_source(path)
        state = store.source_state(source.name)
        if state == (source.sha256, "complete"):
            report.sources_unchanged += 1
            continue
        docs = source.documents()
        if not docs:
            report.empty_files.append(source.name)
            if state is not None:  # it had content before: its old chunks must not outlive it
                store.delete_source(source.name)
            continue
        chunks = [c for d in docs for c in chunk_document(d, model.tokenizer, model.config.doc_max_length)]
        report.sources_indexed += 1
        report.documents += len(docs)
        done = _committed_prefix(store, source, chunks) if state == (source.sha256, "indexing") else 0
        if done:
            report.sources_resumed += 1
            report.chunks_resumed += done
        for i in range(done, len(chunks)):
            yield chunks[i], source, i == 0, i == len(chunks) - 1


def _committed_prefix(store: MemoryStore, source: SourceFile, chunks: list[Chunk]) -> int:
    """How many of `chunks` an interrupted run already committed for these bytes (0: start afresh)."""
    unfinished = store.unfinished(source.name, source.sha256)
    if unfinished is None:
        return 0
    n, last = unfinished
    if n >= len(chunks):  # the last chunk commits with the source's completion: cannot be all of them
        return 0
    mine = chunks[n - 1]
    same = (last.doc, last.index, last.offset, last.title, last.text) == \
        (mine.doc, mine.index, mine.offset, mine.title, mine.text)
    return n if same else 0


def _batches(items: Iterator[tuple[Chunk, SourceFile, bool, bool]], size: int) -> Iterator[_Batch]:
    batch = _Batch()
    try:
        for chunk, source, first, last in items:
            if first:
                batch.begin[source.name] = source.sha256
            batch.chunks.append(chunk)
            if last:
                batch.complete.append(source.name)
            if len(batch.chunks) == size:
                yield batch
                batch = _Batch()
    except ClaraError:
        if batch.chunks:  # a bad file stops the run: commit the work before it first
            yield batch
        raise
    if batch.chunks:
        yield batch

