"""The memory store: a directory holding every chunk's memory [n_mem, hidden] and the text it came from.

    store.sqlite   (WAL) meta (model fingerprint, compression rate, n_mem, hidden, dtype, format, rows, ...),
                   sources (path, sha256 of its bytes, state), chunks (id = row in the vector file, source,
                   document, index, offset, title, text), blocks (crc32 per BLOCK_ROWS rows of the vector file)
    vectors.bin    append-only fixed-size records, memory-mapped by readers: a fp32 norm of the stored
                   (dequantised) flattened memory, per-slot fp32 scales for int8/int4, then the values
    bm25-STATE/    the BM25 index of the live chunks' text at `state()` STATE, written by the indexer
                   (`retrieval.save_text_index`), memory-mapped by `clara+bm25` searches; optional
    write.lock     held (filelock) by the one writer; readers never take it

Commit protocol: records are written and fsync'ed past the committed end first; then one SQLite transaction
inserts the chunks that reference them, extends the checksums and moves `rows`. A crash therefore leaves at
most unreferenced bytes past `rows`, which the next writer truncates. Committed records are immutable, so a
reader's memory map of the committed prefix stays valid while a writer appends; space of deleted or replaced
chunks is reclaimed by `compact()`, which writes a new vector file and switches to it in one transaction.

A source's chunks become visible (documents, search) only once the source is complete; a source still
'indexing' when its writer stopped keeps its committed chunks, invisible, so that a later run of the same
bytes continues after them (`unfinished`) instead of redoing a long file from scratch; a run of other bytes
restarts it (`add`'s `begin`), and `delete_source` removes it.
"""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock, Timeout

from .corpus import Chunk, source_path
from .atomic import fsync_dir
from .errors import ClaraError

FORMAT_VERSION = 1
DTYPES = ("fp16", "int8", "int4")
BLOCK_ROWS = 1024  # rows per checksum block
SNAPSHOT_TRIES = 3  # reads of the metadata while other processes compact the store between them
DB_NAME, LOCK_NAME = "store.sqlite", "write.lock"
_VECTOR_FILE = re.compile(r"vectors(-\d+)?\.bin")
_QMAX = {"int8": 127, "int4": 7}
# a source path below a folder: the prefix bound twice; case-sensitive, unlike LIKE (Notes/ is not notes/)
_UNDER = "substr(path, 1, length(?)) = ?"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL,
                      state TEXT NOT NULL, chunks INTEGER NOT NULL DEFAULT 0);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, source_id INTEGER NOT NULL, doc INTEGER NOT NULL,
                     idx INTEGER NOT NULL, offset INTEGER NOT NULL, title TEXT NOT NULL, text TEXT NOT NULL);
CREATE INDEX chunks_source ON chunks(source_id);
CREATE TABLE blocks (block INTEGER PRIMARY KEY, rows INTEGER NOT NULL, crc32 INTEGER NOT NULL);
"""


def _fits_a_new_store(name: str) -> bool:
    """Whether a file `name` may be in the folder of a new store: one a store writes (an interrupted create
    leaves some behind) or macOS's folder metadata."""
    return (name.startswith((DB_NAME, "bm25-", ".bm25-")) or name in (LOCK_NAME, ".DS_Store")
            or _VECTOR_FILE.fullmatch(name) is not None)


def _writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK)


class VectorFileGone(ClaraError):
    """The vector file the metadata named is gone: another process compacted the store since it was read."""


@dataclass(frozen=True)
class StoreSpec:
    """What a store holds; fixed at creation."""
    fingerprint: str
    compression_rate: int
    n_mem: int
    hidden: int
    dtype: str = "fp16"
    model: str = ""


@dataclass(frozen=True)
class ChunkRecord:
    id: int
    source: str
    title: str
    text: str
    offset: int
    index: int
    doc: int


def _align(n: int, to: int = 16) -> int:
    return -(-n // to) * to


def record_dtype(spec: StoreSpec) -> np.dtype:
    """One vector-file record: norm, per-slot scales (quantised dtypes), values; 16-byte aligned."""
    m, h = spec.n_mem, spec.hidden
    if spec.dtype == "fp16":
        fields = [("norm", "<f4", (), 0), ("v", "<f2", (m, h), 16)]
        end = 16 + 2 * m * h
    else:
        width = h if spec.dtype == "int8" else -(-h // 2)  # int4: two values per byte
        start = _align(4 + 4 * m)
        fields = [("norm", "<f4", (), 0), ("scale", "<f4", (m,), 4),
                  ("v", "i1" if spec.dtype == "int8" else "u1", (m, width), start)]
        end = start + m * width
    return np.dtype({"names": [f[0] for f in fields], "formats": [(f[1], f[2]) if f[2] else f[1] for f in fields],
                     "offsets": [f[3] for f in fields], "itemsize": _align(end)})


def encode(memories: torch.Tensor | np.ndarray, spec: StoreSpec) -> np.ndarray:
    """Memories [B, n_mem, hidden] -> records [B] of `record_dtype(spec)`; norms of what is stored."""
    x = torch.as_tensor(memories).detach().to("cpu", torch.float32)
    if x.ndim != 3 or tuple(x.shape[1:]) != (spec.n_mem, spec.hidden):
        raise ClaraError(f"memories of shape {tuple(x.shape)} do not fit this store ([*, {spec.n_mem}, "
                         f"{spec.hidden}])")
    if not bool(torch.isfinite(x).all()):
        raise ClaraError("the model produced non-finite memories (NaN or inf); nothing was stored")
    rec = np.zeros(x.shape[0], dtype=record_dtype(spec))
    if spec.dtype == "fp16":
        rec["v"] = x.clamp(-65504, 65504).numpy().astype(np.float16)  # saturate rather than store inf
    else:
        qmax = _QMAX[spec.dtype]
        scale = x.abs().amax(-1) / qmax  # [B, M]: one scale per memory vector
        q = torch.round(x / scale.clamp(min=1e-30).unsqueeze(-1)).clamp(-qmax, qmax).to(torch.int8).numpy()
        rec["scale"] = scale.numpy()
        rec["v"] = q if spec.dtype == "int8" else _pack_int4(q)
    rec["norm"] = decode(rec, spec).norm(dim=-1).numpy()
    return rec


def decode(records: np.ndarray, spec: StoreSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Records [B] -> flattened fp32 memories [B, n_mem*hidden], written into `out` [B, D] when given.

    Reads the values through a strided view of the records (no intermediate copy), so a search can reuse
    one buffer per block instead of allocating (and page-faulting) a fresh one.
    """
    v = records["v"] if spec.dtype != "int4" else _unpack_int4(records["v"], spec.hidden)
    if out is None:
        out = torch.empty(len(records), spec.n_mem * spec.hidden)
    # 2-D [B, n_mem*hidden] view of the records (slots are contiguous within one): torch converts a 2-D
    # strided source several times faster than the 3-D one.
    out.copy_(torch.from_numpy(v.reshape(len(records), spec.n_mem * spec.hidden)))
    if spec.dtype != "fp16":
        scale = torch.from_numpy(np.ascontiguousarray(records["scale"]))
        out.view(len(records), spec.n_mem, spec.hidden).mul_(scale.unsqueeze(-1))
    return out


def _pack_int4(q: np.ndarray) -> np.ndarray:
    """int values in [-7, 7], [B, M, H] -> bytes [B, M, ceil(H/2)], low nibble first."""
    u = (q.astype(np.int16) + 8).astype(np.uint8)
    if u.shape[-1] % 2:
        u = np.concatenate([u, np.full(u.shape[:-1] + (1,), 8, np.uint8)], axis=-1)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def _unpack_int4(b: np.ndarray, hidden: int) -> np.ndarray:
    out = np.empty(b.shape[:-1] + (2 * b.shape[-1],), np.int8)
    out[..., 0::2] = (b & 0xF).astype(np.int8) - 8
    out[..., 1::2] = (b >> 4).astype(np.int8) - 8
    return out[..., :hidden]


class MemoryStore:
    """A store directory opened for reading (default) or writing (`write=True`, one writer at a time)."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock: FileLock | None, verify: str) -> None:
        self._in_use = threading.RLock()  # threads sharing this handle take turns on its connection and caches
        self.path = path
        self._db = db
        self._lock = lock
        self.spec = self._read_spec()
        self.record = record_dtype(self.spec)
        self._map: tuple[tuple, np.ndarray] | None = None
        self._live: tuple[tuple, np.ndarray] | None = None
        self._fd: int | None = None
        if lock is not None:
            self._recover()
        if verify == "full":
            self.verify()
        elif verify == "tail":
            self._verify_blocks(tail_only=True)

    # ------------------------------------------------------------------------------ open / create
    @classmethod
    def open(cls, path: str | Path, write: bool = False, verify: str = "tail") -> MemoryStore:
        """Open an existing store; `verify`: 'tail' (last checksum block, cheap), 'full' or 'none'."""
        path = Path(path).expanduser()
        if not (path / DB_NAME).is_file():
            raise ClaraError(f"no memory store at {path} (create one with `clara-edge index FILES --store {path}`)")
        if verify not in ("tail", "full", "none"):
            raise ClaraError(f"unknown verify mode {verify!r}: use tail, full or none")
        return cls._connect(path, _take_lock(path) if write else None, verify)

    @classmethod
    def _connect(cls, path: Path, lock: FileLock | None, verify: str) -> MemoryStore:
        """Open the database (read-only without `lock`); on any failure close it and release the lock."""
        db = None
        try:
            with _guarded(path, "cannot open"):
                # A reader in a folder it cannot write (read-only media, an app bundle, another user's store)
                # cannot create the WAL index SQLite needs: no writer can be at work there, so read it as immutable.
                uri = (path / DB_NAME).resolve().as_uri() + ("" if lock else "?mode=ro" if _writable(path)
                                                             else "?mode=ro&immutable=1")
                db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA synchronous=FULL" if lock else "PRAGMA query_only=1")
            return cls(path, db, lock, verify)
        except BaseException:
            if db is not None:
                db.close()
            if lock is not None:
                lock.release()
            raise

    @classmethod
    def create(cls, path: str | Path, spec: StoreSpec) -> MemoryStore:
        """Create a store for `spec` (the directory may exist but must hold no store); opened for writing."""
        path = Path(path).expanduser()
        if spec.dtype not in DTYPES:
            raise ClaraError(f"unknown store dtype {spec.dtype!r}: use {', '.join(DTYPES)}")
        if (path / DB_NAME).exists():
            raise ClaraError(f"a memory store already exists at {path}")
        if path.is_dir() and any(not _fits_a_new_store(p.name) for p in path.iterdir()):
            # a store's files do not belong among a user's own (notes, a corpus being indexed)
            raise ClaraError(f"{path} holds other files: a new store needs an empty or new --store folder")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ClaraError(f"cannot create store directory {path}: {e.strerror or e}") from None
        lock = _take_lock(path)  # held from here on: no other writer sees the store before we do
        try:
            for leftover in path.iterdir():  # an earlier store's: its BM25 index or WAL must not pass for ours
                if leftover.is_dir():
                    shutil.rmtree(leftover)
                elif leftover.name not in (LOCK_NAME, ".DS_Store"):
                    leftover.unlink()
            tmp = path / (DB_NAME + ".new")
            # Build the schema under a temporary name and rename it, so a half-created store never exists.
            meta = {**asdict(spec), "format": FORMAT_VERSION, "rows": 0, "version": 0, "vector_file": "vectors.bin",
                    "link_names": 1}
            with _guarded(path, "cannot create"):
                db = sqlite3.connect(tmp, isolation_level=None)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.executescript(SCHEMA)
                    db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
                finally:
                    db.close()
            (path / "vectors.bin").touch()
            os.replace(tmp, path / DB_NAME)
        except BaseException:
            lock.release()
            raise
        return cls._connect(path, lock, "none")

    @classmethod
    def open_or_create(cls, path: str | Path, spec: StoreSpec) -> MemoryStore:
        """The writer for `spec`: an existing store must match its model fingerprint and compression rate."""
        path = Path(path).expanduser()
        if not (path / DB_NAME).exists():
            return cls.create(path, spec)
        store = cls.open(path, write=True)
        try:
            store.expect(spec.fingerprint, spec.compression_rate)
        except ClaraError:
            store.close()
            raise
        return store

    def close(self) -> None:
        self._close_fd()
        self._db.close()
        self._map = self._live = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------ reading
    def expect(self, fingerprint: str, compression_rate: int) -> None:
        """ClaraError unless the store was built by this compressor at this rate."""
        s = self.spec
        if s.fingerprint != fingerprint or s.compression_rate != compression_rate:
            raise ClaraError(f"store {self.path} was built with model {s.model or '?'} ({s.fingerprint[:12]}) at "
                             f"compression {s.compression_rate}, not {fingerprint[:12]} at compression "
                             f"{compression_rate}; index into a new --store for this model")

    def info(self) -> dict:
        """documents (visible chunks), sources, bytes on disk, model, compression, dtype, and the rest
        (unfinished_sources: left 'indexing' by an interrupted run; their chunks are not searched)."""
        with self._read() as db:
            docs, sources = map(int, db.execute("SELECT coalesce(sum(chunks), 0), count(*) FROM sources "
                                                "WHERE state = 'complete'").fetchone())
            stored = int(db.execute("SELECT count(*) FROM chunks").fetchone()[0])
            unfinished = int(db.execute("SELECT count(*) FROM sources WHERE state != 'complete'").fetchone()[0])
            rows = self._meta_int(db, "rows")
        with _guarded(self.path, "cannot list"):
            size = sum(p.stat().st_size for p in self.path.iterdir()
                       if p.name.startswith(DB_NAME) or _VECTOR_FILE.fullmatch(p.name))
        return {"store": str(self.path), "documents": docs, "sources": sources, "bytes": size,
                "model": self.spec.model, "compression": self.spec.compression_rate, "dtype": self.spec.dtype,
                "fingerprint": self.spec.fingerprint, "n_mem": self.spec.n_mem, "hidden": self.spec.hidden,
                "rows": rows, "dead_rows": rows - stored, "unfinished_sources": unfinished,
                "record_bytes": self.record.itemsize,
                "format": FORMAT_VERSION}

    def source_state(self, path: str) -> tuple[str, str] | None:
        """(sha256, state) of a source, or None."""
        with self._read() as db:
            row = db.execute("SELECT sha256, state FROM sources WHERE path = ?", (path,)).fetchone()
        return (str(row[0]), str(row[1])) if row else None

    def sources_under(self, folder: str) -> list[str]:
        """Paths of the sources (complete or not) below `folder`."""
        with self._read() as db:
            prefix = folder.rstrip("/") + "/"
            return [str(r[0]) for r in db.execute(f"SELECT path FROM sources WHERE {_UNDER}", (prefix, prefix))]

    def unfinished(self, path: str, sha256: str) -> tuple[int, ChunkRecord] | None:
        """(chunks committed, the last of them) of a source left 'indexing' with these bytes, else None."""
        with self._read() as db:
            row = db.execute("SELECT count(*), max(c.id) FROM chunks c JOIN sources s ON s.id = c.source_id "
                             "WHERE s.path = ? AND s.sha256 = ? AND s.state = 'indexing'", (path, sha256)).fetchone()
        return (int(row[0]), self.chunks([row[1]])[0]) if row[0] else None

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """The committed records [rows] (memory-mapped copy-on-write: nothing reaches the file) and which
        rows are live [rows] bool.

        Live = chunk of a complete source; deleted or unfinished rows must never be returned by search.
        """
        for _ in range(SNAPSHOT_TRIES):
            name, rows, live = self._live_rows()
            try:
                return self._mapped(name, rows), live
            except VectorFileGone:  # a compaction switched files after our read: read again
                continue
        raise ClaraError(f"store {self.path} is missing its vector file {name}")

    def state(self) -> str:
        """What the last `snapshot()` saw, as a file-name-safe key: vector file, committed rows and the store's
        version, which every change to what a search can return bumps. Indexes built over a snapshot (faiss,
        BM25) are keyed by it."""
        if self._live is None:
            self.snapshot()
        return _state_key(*self._live[0])

    def _live_rows(self) -> tuple[str, int, np.ndarray]:
        """(vector file, committed rows, live mask [rows]) from one snapshot; the mask is cached per state."""
        with self._read() as db:
            rows, version = self._meta_int(db, "rows"), self._meta_int(db, "version")
            name = self._vector_name(db)
            key = (name, rows, version)
            if self._live is None or self._live[0] != key:
                ids = _int_array(db.execute("SELECT c.id FROM chunks c JOIN sources s ON s.id = c.source_id "
                                            "WHERE s.state = 'complete'"))
                if ids.size and (ids.min() < 0 or ids.max() >= rows):
                    raise ClaraError(f"store {self.path} is corrupted: a chunk points past the vector file")
                live = np.zeros(rows, dtype=bool)
                live[ids] = True
                self._live = (key, live)
        return name, rows, self._live[1]

    def chunks(self, ids: Iterable[int]) -> list[ChunkRecord]:
        """Chunk text and provenance for ids (as returned by search), in the order given."""
        with self._read() as db:
            found = self._chunk_records(db, ids)
        if isinstance(found, int):
            raise ClaraError(f"store {self.path} has no chunk {found}")
        return found

    def memories(self, ids: Sequence[int]) -> torch.Tensor:
        """Dequantised memories [len(ids), n_mem, hidden] fp32, for the generator."""
        return self._decode_rows(self.snapshot()[0], ids)

    @property
    def vector_file(self) -> str:
        """The vector file the last `snapshot()` read. A compaction, which renumbers chunk ids, writes a new one."""
        if self._live is None:
            self.snapshot()
        return self._live[0][0]

    def fetch(self, ids: Sequence[int], vector_file: str) -> tuple[list[ChunkRecord], torch.Tensor] | None:
        """`chunks(ids)` and `memories(ids)` of a search made while the store's vectors were `vector_file` (its
        `vector_file` before the search); None when the ids may mean other chunks now, because a compaction by
        another process renumbered them or a chunk was removed: search again. Appends renumber nothing, so a
        store that is being indexed still answers."""
        with self._read() as db:
            name, rows = self._vector_name(db), self._meta_int(db, "rows")
            chunks = self._chunk_records(db, ids) if name == vector_file else None
            if chunks is None or isinstance(chunks, int):
                return None
            try:
                records = self._mapped(name, rows)
            except VectorFileGone:  # compacted away since this transaction began
                return None
        return chunks, self._decode_rows(records, ids)

    def _mapped(self, name: str, rows: int) -> np.ndarray:
        """The records of vector file `name` up to `rows`, mapped once per (file, rows)."""
        with self._in_use:
            if self._map is None or self._map[0] != (name, rows):
                self._map = ((name, rows), self._memmap(name, rows))
            return self._map[1]

    def live_chunks(self) -> tuple[str, np.ndarray, list[tuple[str, str]]]:
        """(state key, ids [n], (title, text) of each) of the live chunks, read in one transaction, so that no
        compaction falls between the ids and their texts (the BM25 index of a state is built from them)."""
        with self._read() as db:
            key = _state_key(self._vector_name(db), self._meta_int(db, "rows"), self._version(db))
            found = db.execute("SELECT c.id, c.title, c.text FROM chunks c JOIN sources s ON s.id = c.source_id "
                               "WHERE s.state = 'complete' ORDER BY c.id").fetchall()
        return key, np.asarray([r[0] for r in found], dtype=np.int64), [(str(r[1]), str(r[2])) for r in found]

    def _chunk_records(self, db: sqlite3.Connection, ids: Iterable[int]) -> list[ChunkRecord] | int:
        """The records of `ids`, in order, or the first id the store does not hold."""
        ids = [int(i) for i in ids]
        found = {}
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            part = ids[start:start + 500]
            q = (f"SELECT c.id, s.path, c.title, c.text, c.offset, c.idx, c.doc FROM chunks c "
                 f"JOIN sources s ON s.id = c.source_id WHERE c.id IN ({','.join('?' * len(part))})")
            for r in db.execute(q, part):
                found[int(r[0])] = ChunkRecord(int(r[0]), str(r[1]), str(r[2]), str(r[3]), int(r[4]),
                                               int(r[5]), int(r[6]))
        missing = [i for i in ids if i not in found]
        return missing[0] if missing else [found[i] for i in ids]

    def _decode_rows(self, records: np.ndarray, ids: Sequence[int]) -> torch.Tensor:
        idx = np.asarray(ids, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(records)):
            raise ClaraError(f"store {self.path} has no row {int(idx.max())}")
        return decode(records[idx], self.spec).view(-1, self.spec.n_mem, self.spec.hidden)

    def verify(self) -> None:
        """Check every checksum block of the vector file and SQLite's own integrity; ClaraError on damage."""
        with self._read() as db:
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise ClaraError(f"store {self.path} is corrupted: {DB_NAME} fails its integrity check")
        self._verify_blocks(tail_only=False)

    # ------------------------------------------------------------------------------ writing
    def add(self, chunks: Sequence[Chunk], memories: torch.Tensor | np.ndarray,
            begin: Mapping[str, str] | None = None, complete: Iterable[str] = ()) -> list[int]:
        """Append chunks and their memories [B, n_mem, hidden] in one commit; returns their ids.

        `begin` {path: sha256} starts (or restarts, dropping old chunks) sources before the chunks go in;
        `complete` marks sources whose last chunk is in this call, making them visible.
        """
        self.require_writer()
        records = encode(memories, self.spec)
        if len(records) != len(chunks):
            raise ClaraError(f"{len(chunks)} chunks but {len(records)} memories")
        with self._write() as db:
            changed = any([self._begin_source(db, p, sha) for p, sha in (begin or {}).items()])
            start = self._meta_int(db, "rows")
            source_ids = {p: self._source_id(db, p) for p in dict.fromkeys(c.source for c in chunks)}
            self._write_records(db, start, records)
            ids = list(range(start, start + len(chunks)))
            db.executemany("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                           [(i, source_ids[c.source], c.doc, c.index, c.offset, c.title, c.text)
                            for i, c in zip(ids, chunks)])
            for p in complete:
                if not db.execute("UPDATE sources SET state = 'complete', chunks = (SELECT count(*) FROM chunks "
                                  "WHERE source_id = sources.id) WHERE path = ? AND state = 'indexing'",
                                  (p,)).rowcount:
                    raise ClaraError(f"source {p} was not begun in this store, so it cannot be completed")
                changed = True
            self._set_meta(db, rows=start + len(chunks), **({"version": self._version(db) + 1} if changed else {}))
        return ids

    def delete_source(self, *paths: str | Path) -> int:
        """Remove sources (each path a source, or every source under a folder) in one commit: all of them, or
        none when a path matches nothing; returns how many chunks went."""
        self.require_writer()
        with self._write() as db:
            matched: dict[int, None] = {}  # paths may overlap (a folder and a file in it): each source goes once
            for path in paths:
                if not str(path).strip():  # "" would match every source under "/"
                    raise ClaraError("an empty path was given: name the files or folders to forget")
                ids: list[int] = []
                # As given (an API source name), else as index_paths records a file (`source_path`: a link by its
                # own name), else fully resolved if a folder (one reached through a link). A link to a file is
                # never resolved: its target may be indexed in its own right.
                given = Path(path).expanduser()
                keys = [str(path), str(source_path(given))] + ([str(given.resolve())] if given.is_dir() else [])
                for key in dict.fromkeys(keys):
                    prefix = key.rstrip("/") + "/"
                    ids = ids or [r[0] for r in db.execute(f"SELECT id FROM sources WHERE path = ? OR {_UNDER}",
                                                           (key, prefix, prefix))]
                if not ids:
                    raise ClaraError(f"store {self.path} holds no source {path}")
                matched.update(dict.fromkeys(ids))
            removed = sum(self._drop_source(db, i) for i in matched)
            self._set_meta(db, version=self._version(db) + 1)
        return removed

    @property
    def names_links_by_target(self) -> bool:
        """Whether this store was created before 2026-12-05, when a symlinked file's source was named by its
        target (`corpus.source_path` names it by the link since)."""
        with self._read() as db:
            return db.execute("SELECT 1 FROM meta WHERE key = 'link_names'").fetchone() is None

    def rename_source(self, old: str, new: str) -> None:
        """Give the source `old` (its chunks and memories unchanged) the name `new`, which no source has."""
        self.require_writer()
        with self._write() as db:
            if db.execute("SELECT 1 FROM sources WHERE path = ?", (new,)).fetchone():
                raise ClaraError(f"store {self.path} already holds a source {new}")
            if db.execute("UPDATE sources SET path = ? WHERE path = ?", (new, old)).rowcount != 1:
                raise ClaraError(f"store {self.path} holds no source {old}")
            self._set_meta(db, version=self._version(db) + 1)

    def compact(self) -> int:
        """Rewrite the vector file without dead rows (renumbering chunk ids); returns rows reclaimed."""
        self.require_writer()
        records, _ = self.snapshot()
        with self._read() as db:
            keep = _int_array(db.execute("SELECT id FROM chunks ORDER BY id"))
            old = self._vector_name(db)
        if len(keep) == len(records):
            return 0
        generation = int(old[len("vectors-"):-len(".bin")]) + 1 if old != "vectors.bin" else 1
        new = f"vectors-{generation}.bin"
        blocks = []
        with open(self.path / new, "wb") as f:
            for start in range(0, len(keep), BLOCK_ROWS):
                data = records[keep[start:start + BLOCK_ROWS]].tobytes()
                f.write(data)
                blocks.append((start // BLOCK_ROWS, min(BLOCK_ROWS, len(keep) - start), zlib.crc32(data)))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.path)
        with self._write() as db:
            # In ascending order, so each target id is already free.
            db.executemany("UPDATE chunks SET id = ? WHERE id = ?", enumerate(keep.tolist()))
            db.execute("DELETE FROM blocks")
            db.executemany("INSERT INTO blocks VALUES (?, ?, ?)", blocks)
            self._set_meta(db, rows=len(keep), vector_file=new, version=self._version(db) + 1)
        self._close_fd()
        (self.path / old).unlink(missing_ok=True)  # readers still mapping it keep their (unlinked) copy
        return len(records) - len(keep)

    # ------------------------------------------------------------------------------ internals
    def _read_spec(self) -> StoreSpec:
        with self._read() as db:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            try:
                if int(meta["format"]) != FORMAT_VERSION:
                    raise ClaraError(f"store {self.path} has format {meta['format']}; this clara-edge reads "
                                     f"format {FORMAT_VERSION}")
                spec = StoreSpec(str(meta["fingerprint"]), int(meta["compression_rate"]), int(meta["n_mem"]),
                                 int(meta["hidden"]), str(meta["dtype"]), str(meta["model"]))
            except (KeyError, ValueError, TypeError) as e:
                raise ClaraError(f"store {self.path} is corrupted: bad metadata ({type(e).__name__}: {e})") from None
        if spec.dtype not in DTYPES or not (0 < spec.n_mem <= 1 << 12 and 0 < spec.hidden <= 1 << 16):
            raise ClaraError(f"store {self.path} is corrupted: bad metadata (dtype {spec.dtype!r}, "
                             f"n_mem {spec.n_mem}, hidden {spec.hidden})")
        return spec

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[sqlite3.Connection]:
        """One consistent snapshot, or one atomic change committed on success; any database or decoding
        failure becomes a one-line ClaraError."""
        with self._in_use, _guarded(self.path, "cannot write" if write else "cannot read"):
            self._db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            commit = False
            try:
                yield self._db
                commit = write
            finally:
                if self._db.in_transaction:
                    self._db.execute("COMMIT" if commit else "ROLLBACK")

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(write=False)

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._transaction(write=True)

    def _meta_int(self, db: sqlite3.Connection, key: str) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        try:
            value = int(row[0])
        except (TypeError, ValueError):
            raise ClaraError(f"store {self.path} is corrupted: bad metadata {key!r}") from None
        if value < 0:
            raise ClaraError(f"store {self.path} is corrupted: negative {key!r}")
        return value

    def _version(self, db: sqlite3.Connection) -> int:
        return self._meta_int(db, "version")

    def _vector_name(self, db: sqlite3.Connection) -> str:
        row = db.execute("SELECT value FROM meta WHERE key = 'vector_file'").fetchone()
        if row is None or not isinstance(row[0], str) or not _VECTOR_FILE.fullmatch(row[0]):
            raise ClaraError(f"store {self.path} is corrupted: bad vector file name")
        return row[0]

    def _set_meta(self, db: sqlite3.Connection, **values) -> None:
        db.executemany("UPDATE meta SET value = ? WHERE key = ?", [(str(v), k) for k, v in values.items()])

    def _memmap(self, name: str, rows: int) -> np.ndarray:
        need = rows * self.record.itemsize
        try:  # one open, then its size: a compaction may remove the file at any moment, never under an open file
            file = open(self.path / name, "rb")
        except FileNotFoundError:
            raise VectorFileGone(f"store {self.path} is missing its vector file {name}") from None
        except OSError as e:
            raise ClaraError(f"store {self.path}: cannot read {name}: {e.strerror}") from None
        with file:
            size = os.fstat(file.fileno()).st_size
            if size < need:
                raise ClaraError(f"store {self.path} is corrupted: {name} is truncated ({size} bytes, the index "
                                 f"needs {need}); re-index into a new store")
            if rows == 0:
                return np.zeros(0, dtype=self.record)
            # Copy-on-write: pages are shared with the file as in mode 'r', but the arrays count as writable,
            # so torch can view them without a copy (and without warning about read-only memory).
            return np.memmap(file, dtype=self.record, mode="c", shape=(rows,))

    def _verify_blocks(self, tail_only: bool) -> None:
        with self._read() as db:
            rows, name = self._meta_int(db, "rows"), self._vector_name(db)
            blocks = db.execute("SELECT block, rows, crc32 FROM blocks ORDER BY block").fetchall()
        expect = [(b, min(BLOCK_ROWS, rows - b * BLOCK_ROWS)) for b in range(-(-rows // BLOCK_ROWS))]
        if [(b[0], b[1]) for b in blocks] != expect or not all(type(v) is int for b in blocks for v in b):
            raise ClaraError(f"store {self.path} is corrupted: checksum table does not cover the vector file")
        records = self._memmap(name, rows).view(np.uint8).reshape(rows, -1) if rows else None
        for block, n, crc in blocks[-1:] if tail_only else blocks:
            data = records[block * BLOCK_ROWS: block * BLOCK_ROWS + n]
            if zlib.crc32(data) != crc:
                raise ClaraError(f"store {self.path} is corrupted: checksum mismatch in {name} rows "
                                 f"{block * BLOCK_ROWS}..{block * BLOCK_ROWS + n - 1}; re-index into a new store")

    def require_writer(self) -> None:
        """A one-line error unless this handle holds the store's write lock."""
        if self._lock is None:
            raise ClaraError(f"store {self.path} is open read-only")

    def _recover(self) -> None:
        """Writer start: drop crash leftovers (bytes past the committed rows) and orphaned vector files."""
        with self._read() as db:
            rows, name = self._meta_int(db, "rows"), self._vector_name(db)
        for p in self.path.iterdir():
            if _VECTOR_FILE.fullmatch(p.name) and p.name != name:
                p.unlink(missing_ok=True)  # a compaction's leftover (before or after its commit)
        self._memmap(name, rows)  # raises if truncated
        with _guarded(self.path, "cannot repair"):
            os.truncate(self.path / name, rows * self.record.itemsize)

    def _begin_source(self, db: sqlite3.Connection, path: str, sha256: str) -> bool:
        """(Re)start a source as 'indexing'; True if it had visible chunks that are now gone."""
        row = db.execute("SELECT id, state FROM sources WHERE path = ?", (path,)).fetchone()
        if row is not None:
            self._drop_source(db, row[0])
        db.execute("INSERT INTO sources (path, sha256, state) VALUES (?, ?, 'indexing')", (path, sha256))
        return row is not None and row[1] == "complete"

    def _drop_source(self, db: sqlite3.Connection, source_id: int) -> int:
        n = db.execute("DELETE FROM chunks WHERE source_id = ?", (source_id,)).rowcount
        db.execute("DELETE FROM sources WHERE id = ?", (source_id,))
        return n

    def _source_id(self, db: sqlite3.Connection, path: str) -> int:
        row = db.execute("SELECT id FROM sources WHERE path = ? AND state = 'indexing'", (path,)).fetchone()
        if row is None:
            raise ClaraError(f"source {path} was not begun in this store before adding its chunks")
        return int(row[0])

    def _write_records(self, db: sqlite3.Connection, start: int, records: np.ndarray) -> None:
        """Write records at row `start`, fsync, and extend the block checksums (same transaction as rows)."""
        name = self._vector_name(db)
        if self._fd is None:
            self._fd = os.open(self.path / name, os.O_RDWR)
        data = memoryview(records.tobytes())
        size = self.record.itemsize
        os.pwrite(self._fd, data, start * size)
        os.fsync(self._fd)
        row = start
        while row < start + len(records):
            block = row // BLOCK_ROWS
            take = min((block + 1) * BLOCK_ROWS, start + len(records)) - row
            prev = db.execute("SELECT rows, crc32 FROM blocks WHERE block = ?", (block,)).fetchone() or (0, 0)
            piece = data[(row - start) * size:(row - start + take) * size]
            db.execute("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?)",
                       (block, prev[0] + take, zlib.crc32(piece, prev[1])))
            row += take

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _take_lock(path: Path) -> FileLock:
    lock = FileLock(str(path / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ClaraError(f"store {path} is being written by another process") from None
    except OSError as e:
        raise ClaraError(f"cannot lock store {path}: {e.strerror or e}") from None
    return lock


@contextmanager
def _guarded(path: Path, what: str) -> Iterator[None]:
    """SQLite, file-system and decoding failures -> one-line ClaraError (corrupt files raise all of these)."""
    try:
        yield
    except sqlite3.Error as e:
        raise ClaraError(f"store {path}: {what} {DB_NAME}: {_first_line(e)}") from None
    except (OSError, ValueError, TypeError, OverflowError) as e:
        raise ClaraError(f"store {path}: {what}: {type(e).__name__}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _state_key(vector_file: str, rows: int, version: int) -> str:
    return f"{Path(vector_file).stem}-{rows}-{version}"


def _int_array(cursor: sqlite3.Cursor) -> np.ndarray:
    return np.fromiter((r[0] for r in cursor), dtype=np.int64)
