"""The memory store: layout, commit protocol, crash leftovers, one writer, checksums, bad files, fuzzing."""
from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clara_edge import store as store_mod
from clara_edge.corpus import Chunk
from clara_edge.errors import ClaraError
from clara_edge.retrieval import search
from clara_edge.store import MemoryStore, StoreSpec, record_dtype

SPEC = StoreSpec("fingerprint-a", 16, n_mem=2, hidden=8, dtype="fp16", model="tiny")


def chunks_of(source: str, n: int) -> list[Chunk]:
    return [Chunk(source, f"title {source}", f"text {source} {i}", 10 * i, i) for i in range(n)]


def memories(n: int, seed: int, spec: StoreSpec = SPEC) -> torch.Tensor:
    return torch.randn(n, spec.n_mem, spec.hidden, generator=torch.Generator().manual_seed(seed))


def add_source(store: MemoryStore, source: str, n: int, seed: int = 0, complete: bool = True) -> torch.Tensor:
    mem = memories(n, seed, store.spec)
    store.add(chunks_of(source, n), mem, begin={source: hashlib.sha256(source.encode()).hexdigest()},
              complete=[source] if complete else [])
    return mem


def stored(store: MemoryStore) -> dict[tuple[str, int], tuple[str, torch.Tensor]]:
    """(source, chunk index) -> (text, memory) of the live chunks: what compaction must preserve."""
    records, live = store.snapshot()
    ids = np.flatnonzero(live).tolist()
    mems = store.memories(ids)
    return {(c.source, c.index): (c.text, m) for c, m in zip(store.chunks(ids), mems)}


@pytest.fixture
def filled(tmp_path) -> Path:
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        add_source(s, "a", 3, seed=1)
        add_source(s, "b", 5, seed=2)
    return tmp_path / "s"


# ------------------------------------------------------------------------------------------ basics
def test_create_add_info_and_read_back(filled):
    with MemoryStore.open(filled) as s:
        info = s.info()
        assert {k: info[k] for k in ("documents", "sources", "model", "compression", "dtype", "rows", "dead_rows")} \
            == {"documents": 8, "sources": 2, "model": "tiny", "compression": 16, "dtype": "fp16", "rows": 8,
                "dead_rows": 0}
        assert info["bytes"] >= 8 * info["record_bytes"] and info["fingerprint"] == SPEC.fingerprint
        assert [c.text for c in s.chunks([4, 0])] == ["text b 1", "text a 0"]
        assert s.chunks([3])[0].source == "b" and s.chunks([3])[0].offset == 0
        torch.testing.assert_close(s.memories([0, 1, 2]), memories(3, 1).half().float())
        s.verify()
        with pytest.raises(ClaraError, match="no chunk 99"):
            s.chunks([99])
        with pytest.raises(ClaraError, match="read-only"):
            add_source(s, "c", 1)


# error bound as a share of a vector's largest magnitude: fp16's relative rounding; int8 / int4 round to nearest,
# half a step of amax / 127 or amax / 7 (the 1e-5 for the scale's own float rounding)
@pytest.mark.parametrize("dtype,tolerance", [("fp16", 1e-3), ("int8", 0.5 / 127 * (1 + 1e-5)),
                                             ("int4", 0.5 / 7 * (1 + 1e-5))])
def test_dtypes_round_trip_within_their_step(tmp_path, dtype, tolerance):
    spec = StoreSpec("fp", 16, n_mem=3, hidden=33, dtype=dtype)  # odd width: int4 pads a nibble
    with MemoryStore.create(tmp_path / dtype, spec) as s:
        mem = add_source(s, "a", 6)
        back = s.memories(range(6))
        step = mem.abs().amax(-1, keepdim=True)
        assert ((back - mem).abs() <= tolerance * step).all()
        norms = np.asarray(s.snapshot()[0]["norm"])
        np.testing.assert_allclose(norms, back.flatten(1).norm(dim=1).numpy(), rtol=1e-5)


def test_record_sizes_shrink_with_dtype():
    sizes = [record_dtype(StoreSpec("f", 16, 16, 576, d)).itemsize for d in ("fp16", "int8", "int4")]
    assert sizes == [16 + 2 * 16 * 576, 80 + 16 * 576, 80 + 8 * 576]


def test_bad_memories_store_nothing(tmp_path):
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        bad = memories(2, 0)
        bad[1, 0, 0] = float("nan")
        with pytest.raises(ClaraError, match="non-finite"):
            s.add(chunks_of("a", 2), bad, begin={"a": "x"}, complete=["a"])
        with pytest.raises(ClaraError, match="do not fit"):
            s.add(chunks_of("a", 2), torch.zeros(2, 3, 8), begin={"a": "x"}, complete=["a"])
        with pytest.raises(ClaraError, match="not begun"):
            s.add(chunks_of("a", 2), memories(2, 0), complete=["a"])
        assert s.info()["rows"] == 0 and s.info()["sources"] == 0
    with pytest.raises(ClaraError, match="unknown store dtype"):
        MemoryStore.create(tmp_path / "t", StoreSpec("f", 16, 1, 1, "bf16"))
    with pytest.raises(ClaraError, match="already exists"):
        MemoryStore.create(tmp_path / "s", SPEC)


def test_a_new_store_needs_a_folder_of_its_own(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("keep me")
    with pytest.raises(ClaraError, match="holds other files: a new store needs an empty or new --store"):
        MemoryStore.create(notes, SPEC)
    assert sorted(p.name for p in notes.iterdir()) == ["a.txt"]
    leftovers = tmp_path / "interrupted"  # what a create cut off before its rename leaves, and Finder's file
    leftovers.mkdir()
    for name in ("write.lock", "store.sqlite.new", ".DS_Store"):
        (leftovers / name).write_text("")
    MemoryStore.create(leftovers, SPEC).close()
    MemoryStore.create(tmp_path / "empty" / "new", SPEC).close()


def test_a_new_store_keeps_nothing_of_an_earlier_one_in_its_folder(tmp_path):
    """A store deleted but for some files: its saved BM25 index, WAL and vectors must not pass for the new one's."""
    from clara_edge.retrieval import save_text_index, saved_text_index

    old = tmp_path / "s"
    with MemoryStore.create(old, SPEC) as s:
        add_source(s, "/old.txt", 3)
        save_text_index(s)
    (old / "store.sqlite").unlink()
    (old / "store.sqlite-wal").write_bytes(b"\0" * 64)
    (old / ".bm25-x.partial").mkdir()
    with MemoryStore.create(old, SPEC) as s:
        assert saved_text_index(s) is None and (old / "vectors.bin").stat().st_size == 0
        assert not [p.name for p in old.iterdir() if "bm25" in p.name]
        add_source(s, "/new.txt", 3)
        assert saved_text_index(s) is None and [c.source for c in s.chunks([0, 1, 2])] == ["/new.txt"] * 3


def test_missing_store_is_one_clear_line(tmp_path):
    for path in (tmp_path / "nope", tmp_path):
        with pytest.raises(ClaraError, match=r"no memory store at .*clara-edge index"):
            MemoryStore.open(path)


def test_store_from_another_model_or_rate(filled):
    other = StoreSpec("fingerprint-b", 16, 2, 8)
    with pytest.raises(ClaraError, match=r"built with model tiny \(fingerprint-\) at compression 16, not "
                                         r"fingerprint-\S* at compression 16"):
        MemoryStore.open_or_create(filled, other)
    with pytest.raises(ClaraError, match="at compression 16, not .* at compression 64"):
        MemoryStore.open(filled).expect(SPEC.fingerprint, 64)
    MemoryStore.open(filled).expect(SPEC.fingerprint, 16)
    with MemoryStore.open_or_create(filled, SPEC) as s:  # the lock was released by the failed attempt
        assert s.info()["documents"] == 8


# ------------------------------------------------------------------------------------------ writer / readers
def test_one_writer_many_readers(filled):
    writer = MemoryStore.open(filled, write=True)
    with pytest.raises(ClaraError, match="being written by another process"):
        MemoryStore.open(filled, write=True)
    reader = MemoryStore.open(filled)
    assert reader.info()["documents"] == 8
    add_source(writer, "c", 2, complete=False)  # committed rows of an unfinished source: not visible yet
    records, live = reader.snapshot()
    assert len(records) == 10 and live.sum() == 8 and reader.info()["documents"] == 8
    writer.add(chunks_of("c", 1), memories(1, 5), complete=["c"])
    assert reader.info()["documents"] == 11 and reader.snapshot()[1].sum() == 11
    writer.close()
    MemoryStore.open(filled, write=True).close()
    reader.close()


def test_a_store_in_a_folder_the_reader_cannot_write_opens(filled, monkeypatch):
    """SQLite needs to create the WAL index beside a WAL database it reads: on read-only media, in an app
    bundle or in another user's folder that failed with 'attempt to write a readonly database'."""
    import os

    filled.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write anyway: take the branch a reader without the permission takes
            monkeypatch.setattr(store_mod, "_writable", lambda folder: False)
        with MemoryStore.open(filled) as reader:
            assert reader.info()["documents"] == 8 and reader.snapshot()[1].sum() == 8
            assert len(search(reader, memories(1, 1), 3)[1][0]) == 3
    finally:
        filled.chmod(0o755)


def test_uncommitted_rows_are_invisible_and_truncated(filled):
    with MemoryStore.open(filled, write=True) as writer:
        # A failed add writes its records first, then its transaction rolls back: crash leftovers.
        with pytest.raises(ClaraError, match="not begun"):
            writer.add(chunks_of("z", 4), memories(4, 0), complete=["z"])
        assert (filled / "vectors.bin").stat().st_size == 8 * writer.record.itemsize  # rolled back: not written
    with open(filled / "vectors.bin", "ab") as f:
        f.write(b"\x7f" * 1000)  # what a kill between write and commit leaves
    with MemoryStore.open(filled) as reader:
        assert len(reader.snapshot()[0]) == 8
        reader.verify()
    with MemoryStore.open(filled, write=True) as writer:
        assert (filled / "vectors.bin").stat().st_size == 8 * writer.record.itemsize
        add_source(writer, "c", 2)
        writer.verify()


def test_unfinished_source_stays_invisible_until_continued_or_restarted(filled):
    sha = hashlib.sha256(b"c").hexdigest()
    with MemoryStore.open(filled, write=True) as s:
        add_source(s, "c", 3, complete=False)
    with MemoryStore.open(filled, write=True) as s:  # the next writer keeps its chunks, unsearchable
        assert s.source_state("c") == (sha, "indexing")
        info = s.info()
        assert (info["documents"], info["rows"], info["dead_rows"], info["unfinished_sources"]) == (8, 11, 0, 1)
        assert int(s.snapshot()[1].sum()) == 8
        assert s.unfinished("c", "other bytes") is None and s.unfinished("a", hashlib.sha256(b"a").hexdigest()) is None
        n, last = s.unfinished("c", sha)
        assert (n, last.id, last.index, last.text) == (3, 10, 2, "text c 2")
        more = chunks_of("c", 5)[3:]  # continued: no `begin`, so the committed chunks stay
        s.add(more, memories(2, 9), complete=["c"])
        assert s.info()["documents"] == 13 and s.unfinished("c", sha) is None
        assert [c.text for c in s.chunks(range(8, 13))] == [f"text c {i}" for i in range(5)]
        add_source(s, "d", 2, complete=False)
        add_source(s, "d", 4, seed=3, complete=False)  # restarted (`begin`): the first attempt's chunks go
        assert s.unfinished("d", hashlib.sha256(b"d").hexdigest())[0] == 4
        s.delete_source("d")
        assert s.info()["unfinished_sources"] == 0


def test_state_names_every_change_of_what_a_search_can_return(tmp_path):
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        states = [s.state()]
        for change in (lambda: add_source(s, "a", 3), lambda: add_source(s, "b", 2, seed=1),
                       lambda: add_source(s, "a", 3, seed=2), s.compact):  # a replaced source, then compacted
            change()
            s.snapshot()
            states.append(s.state())
        assert len(set(states)) == len(states)
        records, live = s.snapshot()
        assert (len(records), int(live.sum())) == (5, 5)  # rows and mask as after the second add: state differs
        assert re.fullmatch(r"[\w-]+", s.state())  # usable in a file name


def test_a_reader_whose_vector_file_is_compacted_away_reads_the_new_one(filled):
    """Between a reader's metadata read and its open of the vector file another process may compact the store
    (and delete the file it read): snapshot() must read the metadata again, not fail."""
    with MemoryStore.open(filled, write=True) as writer:
        writer.delete_source("b")
        reader, opened = MemoryStore.open(filled), []

        def compacted_just_before_the_open(name, rows):
            if not opened:
                writer.compact()
            opened.append(name)
            return MemoryStore._memmap(reader, name, rows)

        reader._memmap = compacted_just_before_the_open
        records, live = reader.snapshot()
        assert opened == ["vectors.bin", "vectors-1.bin"] and len(records) == 3 and live.all()


def test_replace_delete_and_compact(filled, tmp_path):
    with MemoryStore.open(filled, write=True) as s:
        before = stored(s)
        new_a = add_source(s, "a", 2, seed=9)  # a changed source replaces its chunks
        assert s.info()["documents"] == 7 and s.info()["dead_rows"] == 3
        with pytest.raises(ClaraError, match="holds no source c"):  # all or nothing: b stays
            s.delete_source("b", "c")
        assert s.info()["sources"] == 2
        assert s.delete_source("b") == 5
        with pytest.raises(ClaraError, match="holds no source"):
            s.delete_source("b")
        reader = MemoryStore.open(filled)
        old_records, _ = reader.snapshot()
        assert s.compact() == 8 and s.compact() == 0
        info = s.info()
        assert (info["documents"], info["rows"], info["dead_rows"]) == (2, 2, 0)
        after = stored(s)
        assert sorted(after) == [("a", 0), ("a", 1)]
        torch.testing.assert_close(torch.stack([after[("a", i)][1] for i in range(2)]), new_a.half().float())
        assert not (filled / "vectors.bin").exists() and (filled / "vectors-1.bin").exists()
        s.verify()
        assert len(old_records) == 10 and np.isfinite(old_records["norm"]).all()  # old map still readable
        assert reader.snapshot()[1].sum() == 2  # and a refresh follows the switch
        reader.close()
        add_source(s, "d", 1)
    with MemoryStore.open(filled, verify="full") as s:
        assert s.info()["documents"] == 3 and before[("b", 0)][0] == "text b 0"


def test_folder_delete_removes_sources_under_it(tmp_path):
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        for src in ("/data/x/1.txt", "/data/x/2.txt", "/data/x_y.txt", "/data/xz/3.txt"):
            add_source(s, src, 1)
        assert sorted(s.sources_under("/data/x/")) == ["/data/x/1.txt", "/data/x/2.txt"]
        assert s.delete_source("/data/x") == 2
        assert s.info()["sources"] == 2


def test_folder_delete_is_case_sensitive_and_overlapping_paths_go_once(tmp_path):
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        for src in ("/d/Notes/a.txt", "/d/notes/b.txt", "/d/Notes/c.txt", "/d/100%/e.txt", "/d/1000/f.txt"):
            add_source(s, src, 1)
        assert s.sources_under("/d/Notes") == ["/d/Notes/a.txt", "/d/Notes/c.txt"]
        assert s.delete_source("/d/Notes", "/d/Notes/a.txt", "/d/Notes") == 2  # a folder, a file in it, again
        assert s.sources_under("/d/notes") == ["/d/notes/b.txt"]
        assert s.sources_under("/d/100%") == ["/d/100%/e.txt"]  # no wildcards in paths
        with pytest.raises(ClaraError, match="holds no source /d/NOTES"):
            s.delete_source("/d/notes/b.txt", "/d/NOTES")  # all or none
        assert s.info()["sources"] == 3


# ------------------------------------------------------------------------------------------ damaged files
def test_truncated_vector_file_is_one_clear_line_and_nothing_changes(filled):
    vec = filled / "vectors.bin"
    vec.write_bytes(vec.read_bytes()[:-100])
    snapshot = {p.name: p.read_bytes() for p in filled.iterdir() if p.name != "write.lock"}
    for write in (False, True):
        with pytest.raises(ClaraError, match=r"vectors.bin is truncated \(\d+ bytes, the index needs \d+\)") as e:
            MemoryStore.open(filled, write=write)
        assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in filled.iterdir() if p.name in snapshot} == snapshot


def test_missing_vector_file(filled):
    (filled / "vectors.bin").unlink()
    with pytest.raises(ClaraError, match="missing its vector file"):
        MemoryStore.open(filled)


def test_checksums_catch_a_flipped_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(store_mod, "BLOCK_ROWS", 4)
    with MemoryStore.create(tmp_path / "s", SPEC) as s:
        for i in range(5):
            add_source(s, f"src{i}", 3, seed=i)  # 15 rows, blocks of 4: the last block is partial
        s.verify()
        size = s.record.itemsize
    vec = tmp_path / "s" / "vectors.bin"
    data = bytearray(vec.read_bytes())
    data[5 * size + 20] ^= 0x01  # row 5: second block
    vec.write_bytes(bytes(data))
    MemoryStore.open(tmp_path / "s").close()  # the cheap open check only reads the last block
    with pytest.raises(ClaraError, match=r"checksum mismatch in vectors.bin rows 4\.\.7"):
        MemoryStore.open(tmp_path / "s").verify()
    with pytest.raises(ClaraError, match="checksum mismatch"):
        MemoryStore.open(tmp_path / "s", verify="full")
    data[5 * size + 20] ^= 0x01
    data[13 * size + 3] ^= 0x80  # row 13: last block, caught on open
    vec.write_bytes(bytes(data))
    with pytest.raises(ClaraError, match=r"rows 12\.\.14"):
        MemoryStore.open(tmp_path / "s")


def test_garbage_database_is_one_clear_line(filled):
    (filled / "store.sqlite").write_bytes(b"not a database at all" * 100)
    for name in ("store.sqlite-wal", "store.sqlite-shm"):
        (filled / name).unlink(missing_ok=True)
    with pytest.raises(ClaraError, match="store .*: cannot (open|read) store.sqlite: file is not a database$"):
        MemoryStore.open(filled)


# ------------------------------------------------------------------------------------------ fuzz
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """A small closed store (30 rows over 3 sources, one partial) as file bytes, to corrupt."""
    path = tmp_path_factory.mktemp("ref") / "s"
    with MemoryStore.create(path, SPEC) as s:
        for i, n in enumerate((10, 12, 8)):
            add_source(s, f"src{i}", n, seed=i, complete=i < 2)
    return {name: (path / name).read_bytes() for name in ("store.sqlite", "vectors.bin")}


mutations = st.lists(st.tuples(st.sampled_from(["store.sqlite", "vectors.bin"]),
                               st.sampled_from(["flip", "truncate", "append", "zero"]),
                               st.floats(0, 1), st.integers(1, 255), st.integers(1, 64)), min_size=1, max_size=3)


def mutate(data: bytes, kind: str, where: float, value: int, length: int) -> bytes:
    pos = min(int(where * len(data)), max(len(data) - 1, 0))
    if kind == "truncate":
        return data[:pos]
    if kind == "append":
        return data + bytes([value]) * length
    if not data:
        return data
    out = bytearray(data)
    for i in range(pos, min(pos + length, len(out))):
        out[i] = out[i] ^ value if kind == "flip" else 0
    return bytes(out)


@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(changes=mutations, write=st.booleans())
def test_fuzz_corrupted_store_reader_raises_only_clara_errors(reference, tmp_path, changes, write):
    path = tmp_path / "fuzz"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    files = dict(reference)
    for name, *how in changes:
        files[name] = mutate(files[name], *how)
    for name, data in files.items():
        (path / name).write_bytes(data)
    committed = 30 * record_dtype(SPEC).itemsize
    vectors_changed = files["vectors.bin"][:committed] != reference["vectors.bin"][:committed]
    try:
        with MemoryStore.open(path, write=write) as s:
            s.info()
            scores, ids = search(s, memories(2, 7), 4)
            s.chunks(ids[0].tolist())
            s.verify()
    except ClaraError as e:
        assert "\n" not in str(e)
        return
    assert not vectors_changed, "a damaged vector file passed verify()"
