"""Flattened-cosine retrieval: the math, and exact search over a store against brute force."""
from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch

from clara_edge import retrieval
from clara_edge.errors import ClaraError
from clara_edge.bm25 import BM25Index
from clara_edge.retrieval import (cosine_scores, flatten_normalize, fused_search, reciprocal_rank_fusion, search,
                                  top_k)
from clara_edge.store import Chunk, MemoryStore, StoreSpec
from test_store import add_source, memories

SPEC = StoreSpec("fp", 16, n_mem=4, hidden=16)


def test_flatten_normalize_shapes_and_zero_rows():
    mem = torch.randn(5, 4, 16)
    mem[2] = 0
    unit = flatten_normalize(mem)
    assert unit.shape == (5, 64) and unit.dtype == torch.float32
    np.testing.assert_allclose(unit.norm(dim=1).numpy(), [1, 1, 0, 1, 1], atol=1e-6)
    torch.testing.assert_close(flatten_normalize(mem.flatten(1).numpy()), unit)
    with pytest.raises(ClaraError, match="expected memories"):
        flatten_normalize(torch.ones(3))


def test_cosine_is_over_the_flattened_memory():
    q, d = torch.randn(3, 4, 16, dtype=torch.float64), torch.randn(7, 4, 16, dtype=torch.float64)
    expect = torch.tensor([[torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
                            for b in d] for a in q], dtype=torch.float64)
    torch.testing.assert_close(cosine_scores(q, d).double(), expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(cosine_scores(q, d.flatten(1)), cosine_scores(q, d))
    # Not the mean of per-slot cosines: slots with larger norms weigh more.
    per_slot = torch.nn.functional.cosine_similarity(q[:, None], d[None], dim=-1).mean(-1)
    assert not torch.allclose(per_slot.float(), cosine_scores(q, d), atol=1e-3)
    with pytest.raises(ClaraError, match="query memories have 64 values, documents 32"):
        cosine_scores(q, torch.randn(2, 32))


def test_top_k_caps_k_and_sorts():
    values, idx = top_k(torch.tensor([[0.1, 0.9, 0.5]]), 5)
    assert idx.tolist() == [[1, 2, 0]] and values.shape == (1, 3)
    with pytest.raises(ClaraError):
        top_k(torch.zeros(1, 3), 0)


@pytest.fixture
def store(tmp_path, request):
    dtype = getattr(request, "param", "fp16")
    with MemoryStore.create(tmp_path / "s", StoreSpec("fp", 16, 4, 16, dtype)) as s:
        for i in range(6):
            add_source(s, f"src{i}", 7, seed=i)
        yield s


def brute_force(store: MemoryStore, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    records, live = store.snapshot()
    ids = np.flatnonzero(live)
    scores = cosine_scores(queries, store.memories(ids.tolist()))
    values, pos = top_k(scores, k)
    return values, torch.from_numpy(ids)[pos]


@pytest.mark.parametrize("store", ["fp16", "int8", "int4"], indirect=True)
@pytest.mark.parametrize("block_values", [64 * 5, retrieval.BLOCK_VALUES])  # 5 rows per block, or one block
def test_search_equals_brute_force(store, monkeypatch, block_values):
    monkeypatch.setattr(retrieval, "BLOCK_VALUES", block_values)
    queries = memories(5, 99, SPEC)
    scores, ids = search(store, queries, 6)
    expect_scores, expect_ids = brute_force(store, queries, 6)
    assert ids.tolist() == expect_ids.tolist()
    torch.testing.assert_close(scores, expect_scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("store", ["fp16", "int8"], indirect=True)
def test_search_with_a_centre_equals_brute_force(store):
    """Centred cosine over a store whose norms are of the raw memories = cosine of x - c on both sides."""
    records, live = store.snapshot()
    docs = store.memories(np.flatnonzero(live).tolist())
    centre = docs.mean(0) + 0.05 * torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    queries = memories(5, 99, SPEC)
    scores, ids = search(store, queries, 6, centre)
    expect = cosine_scores(queries, docs, centre)
    values, pos = top_k(expect, 6)
    assert ids.tolist() == torch.from_numpy(np.flatnonzero(live))[pos].tolist()
    torch.testing.assert_close(scores, values, atol=1e-5, rtol=0)
    assert not torch.allclose(scores, search(store, queries, 6)[0], atol=1e-3)  # the centre changed the scores
    with pytest.raises(ClaraError, match="retrieval centre has 48 values"):
        search(store, queries, 6, torch.zeros(3, 16))


def test_search_finds_the_document_itself(store):
    mem = store.memories(list(range(42)))
    scores, ids = search(store, mem[[3, 17, 40]], 1)
    assert ids[:, 0].tolist() == [3, 17, 40] and torch.allclose(scores, torch.ones(3, 1), atol=1e-5)


def test_search_skips_dead_and_unfinished_rows_and_caps_k(store):
    store.delete_source("src0")
    add_source(store, "late", 3, seed=50, complete=False)
    mem = store.memories(list(range(45)))
    scores, ids = search(store, mem[[0, 43]], 100)  # queries equal to a deleted and an unfinished row
    assert ids.shape == (2, 35)
    assert not set(ids.flatten().tolist()) & (set(range(7)) | set(range(42, 45)))
    store.compact()
    assert search(store, mem[:1], 3)[1].max() < 35


def test_search_on_empty_store_and_bad_queries(tmp_path):
    with MemoryStore.create(tmp_path / "e", SPEC) as s:
        scores, ids = search(s, memories(2, 0, SPEC), 5)
        assert scores.shape == ids.shape == (2, 0)
        scores, ids = fused_search(s, memories(2, 0, SPEC), ["a question", "another"], 5)
        assert scores.shape == ids.shape == (2, 0)
        with pytest.raises(ClaraError, match="do not match store"):
            search(s, torch.randn(1, 2, 16), 5)
        with pytest.raises(ClaraError, match="k must be at least 1"):
            search(s, memories(1, 0, SPEC), 0)


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_faiss_path_agrees_with_exact(store):
    queries = memories(4, 123, SPEC)
    exact_s, exact_i = search(store, queries, 5)
    faiss_s, faiss_i = search(store, queries, 5, use_faiss=True)
    assert faiss_i.tolist() == exact_i.tolist()
    torch.testing.assert_close(faiss_s, exact_s, atol=1e-4, rtol=0)
    store.delete_source("src1")  # the cached index follows the store's state
    assert not set(search(store, queries, 30, use_faiss=True)[1].flatten().tolist()) & set(range(7, 14))
    centre = torch.randn(4, 16)
    assert search(store, queries, 5, centre, use_faiss=True)[1].tolist() == search(store, queries, 5, centre)[1].tolist()
    with pytest.raises(ClaraError, match="faiss index 'Nonsense'"):
        search(store, queries, 5, use_faiss=True, faiss_index="Nonsense")


def test_reciprocal_rank_fusion_sums_reciprocal_ranks():
    items, scores = reciprocal_rank_fusion([[1, 2, 3], [3, 4]], k=60)
    assert items == [3, 1, 2, 4]  # 2 and 4 tie at 1/62: 2 appeared first
    np.testing.assert_allclose(scores, [1 / 63 + 1 / 61, 1 / 61, 1 / 62, 1 / 62])
    assert reciprocal_rank_fusion([[], [5]]) == ([5], [1 / 61])


WORDS = ["volcano", "glacier", "harbour", "orchard", "lantern", "meadow", "canyon", "lagoon", "quarry", "prairie",
         "tundra", "estuary"]


@pytest.fixture
def text_store(tmp_path):
    """Twelve chunks, each naming one distinctive word, with random memories."""
    with MemoryStore.create(tmp_path / "t", SPEC) as s:
        for i, word in enumerate(WORDS):
            s.add([Chunk(f"doc{i}", f"note {i}", f"A short note about the {word}.", 0, 0)], memories(1, i, SPEC),
                  begin={f"doc{i}": f"{i:064x}"}, complete=[f"doc{i}"])
        yield s


def test_fused_search_fuses_cosine_and_bm25_over_live_chunks(text_store):
    mem = text_store.memories(list(range(12)))
    dense = search(text_store, mem[[2]], 12)[1][0].tolist()  # chunk 2 first: the query memory is its own
    far = dense[-1]  # the chunk cosine ranks last; the question names its word, which BM25 finds
    question = f"Where is the {WORDS[far]}?"
    lexical = BM25Index([(c.title, c.text) for c in text_store.chunks(range(12))]).matches(question, 12)
    assert lexical == [far]  # chunk ids are rows
    scores, ids = fused_search(text_store, mem[[2]], [question], 3)
    items, fused = reciprocal_rank_fusion([dense, lexical])
    assert ids.shape == scores.shape == (1, 3) and ids[0].tolist() == items[:3]
    assert ids[0, :2].tolist() == [far, 2]  # 1/61 (BM25) + 1/72 (cosine, last) against 1/61 (cosine) alone
    np.testing.assert_allclose(scores[0].numpy(), fused[:3], rtol=1e-6)
    text_store.delete_source(f"doc{far}")  # the cached BM25 index follows the store's state
    _, ids = fused_search(text_store, mem[[2]], [question], 20)
    assert ids.shape == (1, 11) and far not in ids[0].tolist()
    with pytest.raises(ValueError, match="one question per query memory"):
        fused_search(text_store, mem[[2, 3]], ["one question"], 3)


def test_fused_search_maps_bm25_rows_to_chunk_ids_after_a_deletion(text_store):
    """BM25 indexes live chunks only: after doc0 goes, its row j is chunk j + 1."""
    mem = text_store.memories(list(range(12)))
    text_store.delete_source("doc0")
    _, ids = fused_search(text_store, mem[[2]], [f"Where is the {WORDS[7]}?"], 2)
    assert set(ids[0].tolist()) == {2, 7}


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_saved_text_index_is_mapped_by_a_new_reader_and_follows_the_state(text_store, monkeypatch):
    from clara_edge import bm25
    from clara_edge.retrieval import save_text_index
    mem = text_store.memories([2])
    expect = fused_search(text_store, mem, ["Where is the canyon?"], 5)
    folder = save_text_index(text_store)
    assert folder.name == f"bm25-{text_store.state()}" and (folder / "bm25s").is_dir()

    def no_build(self, docs):
        raise AssertionError("the saved index should have been loaded")

    monkeypatch.setattr(bm25.BM25Index, "__init__", no_build)
    with MemoryStore.open(text_store.path) as reader:  # a new process's handle: maps the saved index
        got = fused_search(reader, mem, ["Where is the canyon?"], 5)
        assert torch.equal(got[1], expect[1]) and torch.allclose(got[0], expect[0])
        with pytest.raises(ClaraError, match="read-only"):
            save_text_index(reader)
    monkeypatch.undo()
    text_store.delete_source("doc6")
    text_store.snapshot()
    (text_store.path / f".{folder.name}.partial").mkdir()  # a writer died while saving that state's index
    newer = save_text_index(text_store)
    assert newer != folder and not folder.exists() and newer.is_dir()  # the old state's index is gone
    assert not list(text_store.path.glob(".bm25-*"))  # and so is the half-saved one
    expect = fused_search(text_store, mem, ["Where is the canyon?"], 11)
    for part in sorted(p for p in newer.rglob("*") if p.is_file()):
        intact = part.read_bytes()
        # every way seen to break a file; a reader builds the index instead of failing
        kinds = [b"", intact[: len(intact) // 2], b"{broken", b"{}", b"[]"]
        if part.name.startswith(("indices", "indptr")):  # well-formed arrays pointing past the others
            kinds.append(_npy(np.full(len(np.load(part)), 999_999, dtype=np.load(part).dtype)))
        for damaged in kinds:
            part.write_bytes(damaged)
            with MemoryStore.open(text_store.path) as reader:
                got = fused_search(reader, mem, ["Where is the canyon?"], 11)
                assert torch.equal(got[1], expect[1]) and 6 not in got[1][0].tolist(), (part.name, damaged[:8])
        part.write_bytes(intact)
