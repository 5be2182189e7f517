"""index_paths end to end on tiny models: resume, changes, bad input, and kill -9 of a real indexing process."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from clara_edge.datasets import document_text
from clara_edge.errors import ClaraError
from clara_edge.indexing import forget_paths, index_paths
from clara_edge.retrieval import search
from clara_edge.store import MemoryStore
from tiny import tiny_clara

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def model():
    # One torch thread: a tiny model gains nothing from two, and on a busy 2-core machine the second
    # thread's spin-waits make indexing several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_clara("llama")
    torch.set_num_threads(threads)


def sentence(rng: random.Random) -> str:
    words = ["river", "mountain", "honey", "printing", "violin", "tide", "volcano", "coffee", "probe", "lake"]
    return " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "."


def make_corpus(root: Path, n_txt: int = 30, n_rows: int = 40, seed: int = 0) -> Path:
    """Text files in two folders, a markdown note and a ../shared/data-style JSONL (two docs per row)."""
    rng = random.Random(seed)
    for i in range(n_txt):
        path = root / f"part{i % 2}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(" ".join(sentence(rng) for _ in range(rng.randint(1, 6))))
    (root / "note.md").write_text("# A note\n\n" + " ".join(sentence(rng) for _ in range(4)))
    rows = [{"id": str(i), "dataset": "synthetic", "question": "?", "golden_answers": ["x"], "pos_index": [0],
             "docs": [{"title": f"T{i}-{j}", "text": sentence(rng) + " " + sentence(rng)} for j in range(2)]}
            for i in range(n_rows)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def contents(store_dir: Path) -> dict[tuple[str, int, int], tuple[str, torch.Tensor]]:
    """(source, doc, chunk index) -> (text, memory) of every visible chunk."""
    with MemoryStore.open(store_dir) as s:
        _, live = s.snapshot()
        ids = np.flatnonzero(live).tolist()
        return {(c.source, c.doc, c.index): (c.text, m) for c, m in zip(s.chunks(ids), s.memories(ids))}


def per_source(chunks: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for source, _, _ in chunks:
        out[source] = out.get(source, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ behaviour
def test_index_search_and_resume(model, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_txt=6, n_rows=4)
    report = index_paths(model, [corpus], tmp_path / "s", batch_size=4, progress=False)
    assert (report.files, report.sources_indexed, report.documents) == (8, 8, 6 + 1 + 8)
    assert report.chunks_added >= report.documents and report.docs_per_s > 0
    assert "docs/s" in report.summary()
    info = MemoryStore.open(tmp_path / "s").info()
    assert (info["documents"], info["sources"], info["compression"], info["dtype"]) == \
        (report.chunks_added, 8, 16, "fp16")
    assert info["fingerprint"] == model.fingerprint() and info["n_mem"] == model.config.n_mem
    with MemoryStore.open(tmp_path / "s") as s:  # the query adapter starts equal to the compressor
        chunk = s.chunks([5])[0]
        scores, ids = search(s, model.encode_query([document_text((chunk.title, chunk.text))]), 1)
        assert ids.tolist() == [[5]] and scores.item() == pytest.approx(1.0, abs=1e-3)
        md = [c for c in s.chunks(range(info["documents"])) if c.source.endswith("note.md")]
        assert md and md[0].title == "A note"

    again = index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert (again.sources_unchanged, again.chunks_added) == (8, 0)

    (corpus / "part0" / "doc000.txt").write_text("Completely new text. Two sentences.")
    (corpus / "part1" / "doc001.txt").write_text("")  # emptied: its chunks must go
    changed = index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert (changed.sources_indexed, changed.sources_unchanged, len(changed.empty_files)) == (1, 6, 1)
    after = contents(tmp_path / "s")
    assert [t for (src, _, _), (t, _) in after.items() if src.endswith("doc000.txt")] == \
        ["Completely new text. Two sentences."]
    assert not [k for k in after if k[0].endswith("doc001.txt")]


def test_an_interrupted_long_file_continues_after_its_committed_chunks(model, tmp_path, monkeypatch):
    rng = random.Random(7)
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a-long.txt").write_text(" ".join(sentence(rng) for _ in range(120)))
    (corpus / "b-short.txt").write_text(sentence(rng))
    clean = index_paths(model, [corpus], tmp_path / "clean", batch_size=4, progress=False)
    assert clean.chunks_added > 12
    compress, calls = model.compress, []

    def interrupted(texts, batch_size=16):  # Ctrl-C during the fourth batch, after three commits
        calls.append(len(texts))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return compress(texts, batch_size=batch_size)

    for tamper in (False, True):
        store = tmp_path / f"s{tamper:d}"
        calls.clear()
        monkeypatch.setattr(model, "compress", interrupted)
        with pytest.raises(KeyboardInterrupt):
            index_paths(model, [corpus], store, batch_size=4, progress=False)
        monkeypatch.setattr(model, "compress", compress)
        info = MemoryStore.open(store).info()
        assert (info["documents"], info["unfinished_sources"], info["rows"]) == (0, 1, 12)
        if tamper:  # the committed chunks no longer match this chunking: the file is redone from its start
            with sqlite3.connect(store / "store.sqlite") as db:
                db.execute("UPDATE chunks SET text = 'other' WHERE id = 11")
        resumed = index_paths(model, [corpus], store, batch_size=4, progress=False)
        assert (resumed.sources_resumed, resumed.chunks_resumed) == ((0, 0) if tamper else (1, 12))
        assert resumed.chunks_added == clean.chunks_added - (0 if tamper else 12)
        assert ("continued after the 12 chunks" in resumed.summary()) == (not tamper)
        info = MemoryStore.open(store).info()
        assert (info["unfinished_sources"], info["documents"]) == (0, clean.chunks_added)
        got, expected = contents(store), contents(tmp_path / "clean")
        assert got.keys() == expected.keys()
        for key, (text, mem) in expected.items():
            assert got[key][0] == text
            torch.testing.assert_close(got[key][1], mem, atol=2e-3, rtol=1e-2)


def test_reindexing_a_folder_removes_deleted_files_and_forget_removes_on_request(model, tmp_path, capsys):
    from clara_edge.cli import main
    corpus = make_corpus(tmp_path / "c", n_txt=6, n_rows=2)
    hidden = corpus / ".private" / "kept.txt"  # indexed by name: a folder run does not list it, must not drop it
    hidden.parent.mkdir()
    hidden.write_text("Honey is kept in the hive.")
    index_paths(model, [corpus, hidden], tmp_path / "s", progress=False)
    (corpus / "part0" / "doc000.txt").unlink()
    (corpus / "part1" / "doc001.txt").unlink()
    again = index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert (again.sources_removed, again.sources_unchanged, again.chunks_added) == (2, 6, 0)
    assert "2 removed (their files are gone)" in again.summary()
    sources = set(per_source(contents(tmp_path / "s")))
    assert not {s for s in sources if s.endswith(("doc000.txt", "doc001.txt"))} and str(hidden) in sources

    before = MemoryStore.open(tmp_path / "s").info()["documents"]
    assert main(["forget", str(corpus / "part0"), str(corpus / "note.md"), "--store", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.startswith("removed ")
    after = set(per_source(contents(tmp_path / "s")))
    assert after == {s for s in sources if "/part0/" not in s and not s.endswith("note.md")}
    assert MemoryStore.open(tmp_path / "s").info()["documents"] < before
    with MemoryStore.open(tmp_path / "s") as s:  # the saved BM25 index follows the change
        from clara_edge.retrieval import saved_text_index
        assert saved_text_index(s) is not None
    assert main(["forget", str(corpus / "part1"), str(corpus / "nope.txt"), "--store", str(tmp_path / "s")]) == 1
    assert "holds no source" in capsys.readouterr().err
    assert set(per_source(contents(tmp_path / "s"))) == after  # nothing removed


def test_a_symlinked_note_is_known_by_its_link(model, tmp_path, capsys, monkeypatch):
    """Deleting the link is deleting the note: a re-index drops it and forget takes the link's path (the store
    used to record the target, outside the folder, which no re-index saw go)."""
    from clara_edge.cli import main
    corpus, elsewhere = make_corpus(tmp_path / "c", n_txt=2, n_rows=0), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vault.txt").write_text("The vault password is swordfish.")
    (elsewhere / "keys.txt").write_text("The keys hang by the door.")
    (corpus / "vault.txt").symlink_to(elsewhere / "vault.txt")
    (corpus / "keys.txt").symlink_to(elsewhere / "keys.txt")
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert {str(corpus / "vault.txt"), str(corpus / "keys.txt")} <= set(per_source(contents(tmp_path / "s")))
    (corpus / "vault.txt").unlink()
    assert index_paths(model, [corpus], tmp_path / "s", progress=False).sources_removed == 1
    monkeypatch.chdir(tmp_path)
    assert main(["forget", "c/keys.txt", "--store", "s"]) == 0
    assert not {s for s in per_source(contents(tmp_path / "s")) if s.endswith(("vault.txt", "keys.txt"))}
    capsys.readouterr()
    assert main(["forget", "", "--store", "s"]) == 1  # an unset variable must not mean "everything here"
    assert "an empty path was given" in capsys.readouterr().err
    with pytest.raises(ClaraError, match="an empty path was given"):
        index_paths(model, [""], tmp_path / "s", progress=False)
    assert per_source(contents(tmp_path / "s"))


def test_a_store_that_named_a_linked_note_by_its_target_is_not_indexed_twice(model, tmp_path):
    corpus, elsewhere = make_corpus(tmp_path / "c", n_txt=2, n_rows=0), tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "vault.txt").write_text("The vault password is swordfish.")
    (corpus / "vault.txt").symlink_to(elsewhere / "vault.txt")
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    with MemoryStore.open(tmp_path / "s", write=True) as store:  # as the store of an earlier clara-edge had it
        store.rename_source(str(corpus / "vault.txt"), str(elsewhere / "vault.txt"))
    with sqlite3.connect(tmp_path / "s" / "store.sqlite") as db:
        db.execute("DELETE FROM meta WHERE key = 'link_names'")
    before = contents(tmp_path / "s")
    again = index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert again.chunks_added == 0 and again.sources_removed == 0
    sources = set(per_source(contents(tmp_path / "s")))
    assert str(corpus / "vault.txt") in sources and str(elsewhere / "vault.txt") not in sources
    assert len(contents(tmp_path / "s")) == len(before)


def test_a_file_indexed_in_its_own_right_is_not_taken_over_by_a_link_to_it(model, tmp_path):
    projects, notes = make_corpus(tmp_path / "projects", n_txt=2, n_rows=0), tmp_path / "notes"
    notes.mkdir()
    (notes / "plan.txt").symlink_to(projects / "part0" / "doc000.txt")
    (tmp_path / "shortcut.txt").symlink_to(projects / "part1" / "doc001.txt")
    index_paths(model, [projects], tmp_path / "s", progress=False)
    index_paths(model, [notes], tmp_path / "s", progress=False)
    assert {str(projects / "part0" / "doc000.txt"), str(notes / "plan.txt")} <= set(per_source(contents(tmp_path / "s")))
    forget_paths(tmp_path / "s", str(notes))  # one path, as a string: not its characters
    with pytest.raises(ClaraError, match="holds no source"):  # a link never indexed names no source
        forget_paths(tmp_path / "s", [tmp_path / "shortcut.txt"])
    kept = {str(projects / "part0" / "doc000.txt"), str(projects / "part1" / "doc001.txt")}
    assert kept <= set(per_source(contents(tmp_path / "s")))


def test_threads_can_share_a_store_and_a_runtime(model, tmp_path):
    """Readers on one handle used to interleave BEGIN/COMMIT on its one connection ('cannot start a transaction
    within a transaction')."""
    import threading

    from clara_edge.retrieval import fused_search
    from clara_edge.runtime import Runtime

    index_paths(model, [make_corpus(tmp_path / "c", n_txt=6, n_rows=4)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    query, errors = model.encode_query(["Which river?"]), []

    def work(i: int) -> None:
        for _ in range(15):
            try:
                search(runtime.store, query, 3)
                fused_search(runtime.store, query, ["Which river?"], 3)
                runtime.store.chunks([0, 1])
                runtime.ask(f"Which river {i}?", top_k=2, max_new_tokens=2)
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


def test_a_store_named_with_a_tilde_after_an_equals_sign(model, tmp_path, monkeypatch):
    from clara_edge.runtime import Runtime
    monkeypatch.setenv("HOME", str(tmp_path))
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=2, n_rows=0)], "~/s", progress=False)
    assert Runtime.open(model, "~/s", context=512).store.path == tmp_path / "s"
    assert forget_paths("~/s", [tmp_path / "c" / "part0"]) > 0


def test_runtime_prefills_the_shared_prompt_head_once(model, tmp_path):
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=6, n_rows=4)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    first = runtime.ask("Which river?", top_k=2, max_new_tokens=4)
    second = runtime.ask("Which lake?", top_k=2, max_new_tokens=4)
    assert first.stats["reused_positions"] == 0 and second.stats["reused_positions"] > 0
    assert second.answer == Runtime.open(model, tmp_path / "s", 512).ask("Which lake?", top_k=2, max_new_tokens=4).answer


def test_runtime_retrieves_by_clara_bm25_by_default_or_clara_alone(model, tmp_path):
    from clara_edge.errors import ClaraError
    from clara_edge.retrieval import fused_search
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=6, n_rows=4)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)  # clara+bm25 is the default
    question = "Which river?"
    answer = runtime.ask(question, top_k=3, max_new_tokens=2)
    scores, ids = fused_search(runtime.store, model.encode_query([question]), [question], 3, model.retrieval_centre)
    assert [s["id"] for s in answer.sources] == ids[0].tolist()
    assert [s["score"] for s in answer.sources] == pytest.approx(scores[0].tolist())
    assert all(0 < s["score"] <= 2 / 61 for s in answer.sources)
    with pytest.raises(ClaraError, match="use it with --retriever clara"):
        runtime.ask(question, top_k=None, min_score=0.5)
    clara = Runtime.open(model, tmp_path / "s", context=512, retriever="clara").ask(question, top_k=3, max_new_tokens=2)
    _, ids = search(runtime.store, model.encode_query([question]), 3, model.retrieval_centre)
    assert [s["id"] for s in clara.sources] == ids[0].tolist()
    with pytest.raises(ClaraError, match="unknown retriever .bm99."):
        Runtime.open(model, tmp_path / "s", retriever="bm99")


@pytest.mark.parametrize("retriever", ["clara+bm25", "clara"])
@pytest.mark.parametrize("top_k,needle", [(0, "at least 1, got 0"), (-3, "at least 1, got -3"),
                                          (500, r"top-k 500 \(all 188 documents there are\) needs")])
def test_runtime_refuses_a_bad_top_k_before_retrieving(model, tmp_path, retriever, top_k, needle):
    from clara_edge.errors import ClaraError
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=2, n_rows=40)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512, retriever=retriever)
    with pytest.raises(ClaraError, match=needle):
        runtime.ask("Which river?", top_k=top_k, max_new_tokens=2)


def test_a_top_k_past_the_store_reads_the_whole_store(model, tmp_path):
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=2, n_rows=0)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    answer = runtime.ask("Which river?", top_k=500, max_new_tokens=2)  # k=500 fits no budget; the store does
    assert answer.stats["documents"] == int(runtime.store.snapshot()[1].sum()) < 500
    with pytest.raises(ClaraError, match="--min-score must be a number, got nan"):
        Runtime.open(model, tmp_path / "s", retriever="clara").ask("Which river?", min_score=float("nan"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3"])
def test_the_budget_counts_the_prompt_the_generator_reads(family):
    from clara_edge.budget import make_budget, prompt_overhead
    model = tiny_clara(family)
    for question in ("Which river?", "What is the longest river in the world, and where does it end?"):
        budget = make_budget(512, model.max_positions, prompt_overhead(model, question), model.config.n_mem, 8)
        for n in range(1, budget.max_docs + 1):
            assert budget.positions(n) == len(model.prompt_ids(question, n)), (question, n)


def test_runtime_says_when_the_question_alone_fills_the_context(model, tmp_path):
    from clara_edge.errors import ClaraError
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=2, n_rows=0)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    with pytest.raises(ClaraError, match=r"prompt with its question takes \d+ positions .* shorten the question"):
        runtime.ask("Which river? " * 200, top_k=None, max_new_tokens=2)


@pytest.mark.parametrize("retriever", ["clara+bm25", "clara"])
def test_a_compaction_between_search_and_reading_is_searched_again(model, tmp_path, monkeypatch, retriever):
    """Another process's forget compacts the store (renumbering ids) after a question's search: the answer must
    read the documents the new search finds, not whatever the old ids point at now."""
    from clara_edge import runtime as runtime_module
    from clara_edge.indexing import forget_paths
    from clara_edge.runtime import Runtime

    corpus = make_corpus(tmp_path / "c", n_txt=8, n_rows=0)
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512, retriever=retriever)
    searched = []
    search_fn = "fused_search" if retriever == "clara+bm25" else "search"
    original = getattr(runtime_module, search_fn)

    def search_then_compact(*args):
        found = original(*args)
        if not searched:  # the first search: then half the files go, enough dead rows to compact
            forget_paths(tmp_path / "s", sorted((corpus / "part0").glob("*.txt")))
        searched.append(found[1][0].tolist())
        return found

    monkeypatch.setattr(runtime_module, search_fn, search_then_compact)
    answer = runtime.ask("Which river?", top_k=3, max_new_tokens=2)
    assert len(searched) == 2 and searched[0] != searched[1]
    assert [s["id"] for s in answer.sources] == searched[1]
    with MemoryStore.open(tmp_path / "s") as store:
        assert [c.source for c in store.chunks(searched[1])] == [s["source"] for s in answer.sources]
        assert "part0" not in "".join(s["source"] for s in answer.sources)
    monkeypatch.setattr(runtime.store, "fetch", lambda ids, vector_file: None)
    with pytest.raises(ClaraError, match="kept changing while answering"):
        runtime.ask("Which river?", top_k=3, max_new_tokens=2)


def test_a_store_being_indexed_still_answers(model, tmp_path, monkeypatch):
    """Appends renumber nothing: a question must not give up because another process commits batches."""
    from clara_edge import runtime as runtime_module
    from clara_edge.runtime import Runtime

    corpus = make_corpus(tmp_path / "c", n_txt=4, n_rows=0)
    index_paths(model, [corpus / "part0"], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    searched, original = [], runtime_module.fused_search

    def search_then_append(*args):
        found = original(*args)
        index_paths(model, [corpus / "part1", corpus / "note.md"][len(searched):][:1], tmp_path / "s", progress=False)
        searched.append(found[1][0].tolist())
        return found

    monkeypatch.setattr(runtime_module, "fused_search", search_then_append)
    answer = runtime.ask("Which river?", top_k=2, max_new_tokens=2)
    assert len(searched) == 1 and [s["id"] for s in answer.sources] == searched[0]


def test_a_compaction_while_the_text_index_is_built_is_searched_again(model, tmp_path, monkeypatch):
    from clara_edge.indexing import forget_paths
    from clara_edge.runtime import Runtime

    corpus = make_corpus(tmp_path / "c", n_txt=8, n_rows=0)
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    for saved in (tmp_path / "s").glob("bm25-*"):  # no saved index: the question builds one
        shutil.rmtree(saved)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    real = type(runtime.store).live_chunks
    calls = []

    def compact_first(store):
        calls.append(store)
        if len(calls) == 1:  # another process compacts just as this question reads the texts
            forget_paths(tmp_path / "s", sorted((corpus / "part0").glob("*.txt")))
        return real(store)

    monkeypatch.setattr(type(runtime.store), "live_chunks", compact_first)
    answer = runtime.ask("Which river?", top_k=3, max_new_tokens=2)
    assert calls and "part0" not in "".join(s["source"] for s in answer.sources)


@pytest.mark.parametrize("sampling,needle", [({"temperature": 0.0}, "--temperature must be above 0"),
                                              ({"temperature": -1.0}, "--temperature must be above 0"),
                                              ({"top_p": 0.0}, "--top-p must be above 0"),
                                              ({"top_p": 1.5}, "--top-p must be above 0 and at most 1")])
def test_runtime_refuses_bad_sampling_options(model, tmp_path, sampling, needle):
    from clara_edge.errors import ClaraError
    from clara_edge.runtime import Runtime
    index_paths(model, [make_corpus(tmp_path / "c", n_txt=2, n_rows=0)], tmp_path / "s", progress=False)
    runtime = Runtime.open(model, tmp_path / "s", context=512)
    with pytest.raises(ClaraError, match=needle):
        runtime.ask("Which river?", top_k=1, max_new_tokens=2, do_sample=True, **sampling)
    runtime.ask("Which river?", top_k=1, max_new_tokens=2, do_sample=False, **sampling)  # greedy ignores them


def test_index_saves_the_text_index_of_the_final_state(model, tmp_path, capsys):
    from clara_edge.cli import main
    corpus = make_corpus(tmp_path / "c", n_txt=4, n_rows=2)
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    (corpus / "part0" / "doc000.txt").write_text("A new text about lakes.")
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    with MemoryStore.open(tmp_path / "s") as s:
        s.snapshot()
        saved = f"bm25-{s.state()}"
    assert sorted(p.name for p in (tmp_path / "s").glob("bm25-*")) == [saved]
    assert main(["info", "--store", str(tmp_path / "s"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text_index"] == saved


def test_progress_bar_reports_docs_per_second_on_a_terminal_only(model, tmp_path, capsys, monkeypatch):
    corpus = make_corpus(tmp_path / "c", n_txt=2, n_rows=0)
    index_paths(model, [corpus], tmp_path / "s", batch_size=2, progress=True)
    assert capsys.readouterr().err == ""  # a redirected log stays free of bar redraws
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    index_paths(model, [corpus], tmp_path / "t", batch_size=2, progress=True)
    assert "doc/s" in capsys.readouterr().err


def test_int8_store(model, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_txt=3, n_rows=0)
    index_paths(model, [corpus], tmp_path / "s8", progress=False, dtype="int8")
    index_paths(model, [corpus], tmp_path / "s16", progress=False)
    a, b = contents(tmp_path / "s8"), contents(tmp_path / "s16")
    assert a.keys() == b.keys() and MemoryStore.open(tmp_path / "s8").info()["dtype"] == "int8"
    for key in a:
        assert torch.nn.functional.cosine_similarity(a[key][1].flatten(), b[key][1].flatten(), dim=0) > 0.999


@pytest.mark.parametrize("name,content,message", [
    ("zz_binary.txt", b"\x00\x01\x02", "zz_binary.txt: binary file"),
    ("zz_latin1.txt", "na\xefve".encode("latin-1"), "zz_latin1.txt: not UTF-8 text"),
    ("zz_bad.jsonl", b"{oops}\n", "zz_bad.jsonl:1: not valid JSON"),
])
def test_bad_file_stops_with_one_line_and_keeps_what_was_done(model, tmp_path, name, content, message):
    corpus = make_corpus(tmp_path / "c", n_txt=3, n_rows=2)
    (corpus / name).write_bytes(content)  # sorted last: everything before it gets indexed first
    with pytest.raises(ClaraError, match=message) as err:
        index_paths(model, [corpus], tmp_path / "s", batch_size=2, progress=False)
    assert "\n" not in str(err.value)
    done = MemoryStore.open(tmp_path / "s").info()
    assert done["sources"] == 5  # the three texts, note.md and rows.jsonl are complete and kept
    (corpus / name).unlink()
    report = index_paths(model, [corpus], tmp_path / "s", progress=False)
    assert (report.sources_unchanged, report.chunks_added) == (5, 0)


def test_nothing_to_index(model, tmp_path):
    with pytest.raises(ClaraError, match="no such file or folder"):
        index_paths(model, [tmp_path / "missing"], tmp_path / "s", progress=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "a.txt").write_text("  \n")
    (tmp_path / "e" / "b.md").write_text("")
    with pytest.raises(ClaraError, match="all 2 files are empty"):
        index_paths(model, [tmp_path / "e"], tmp_path / "s", progress=False)
    with pytest.raises(ClaraError, match="--batch-size must be at least 1"):
        index_paths(model, [tmp_path / "e"], tmp_path / "s", batch_size=0, progress=False)


def test_store_of_another_model_or_rate_is_refused(model, tmp_path):
    corpus = make_corpus(tmp_path / "c", n_txt=2, n_rows=0)
    index_paths(model, [corpus], tmp_path / "s", progress=False)
    for other in (tiny_clara("llama", seed=1), tiny_clara("llama", compression_rate=32)):
        with pytest.raises(ClaraError, match=r"was built with model tiny-llama .* at compression 16, not"):
            index_paths(other, [corpus], tmp_path / "s", progress=False)
    assert MemoryStore.open(tmp_path / "s", verify="full").info()["sources"] == 3  # 2 texts + note.md


# ------------------------------------------------------------------------------------------ kill -9
# One `python3 -c` process imports torch, builds the tiny model (fixed seed) and then forks a fresh child per
# indexing run, so each run is a real process we can SIGKILL without paying the imports again.
ZYGOTE = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)  # before any op: a one-thread runtime forks safely
    from tiny import tiny_clara
    from clara_edge.indexing import index_paths
    model = tiny_clara("llama")
    for line in sys.stdin:
        if line.strip() != "run":
            break
        pid = os.fork()
        if pid == 0:
            index_paths(model, [{corpus!r}], {store!r}, batch_size=8, progress=False)
            os._exit(0)
        print("@", pid, flush=True)
        print("@", os.waitpid(pid, 0)[1], flush=True)
""")


def committed_rows(store: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store / 'store.sqlite'}?mode=ro", uri=True, timeout=0.1) as db:
            return int(db.execute("SELECT value FROM meta WHERE key = 'rows'").fetchone()[0])
    except (sqlite3.Error, TypeError):
        return -1  # not created yet


def reply(zygote: subprocess.Popen) -> int:
    """The zygote's next protocol line ("@ N"); libraries may print other lines to stdout."""
    while line := zygote.stdout.readline():
        if line.startswith("@ "):
            return int(line[2:])
    raise AssertionError(f"the indexing process died: exit code {zygote.wait()}")


def run_and_kill(zygote: subprocess.Popen, store: Path, extra_rows: int, rng: random.Random) -> bool:
    """One indexing run; SIGKILL it once `extra_rows` more rows are committed, after a random delay so the
    kill lands anywhere (compressing, writing vectors, committing). True if it was killed mid-run."""
    start = max(committed_rows(store), 0)
    zygote.stdin.write("run\n")
    zygote.stdin.flush()
    pid = reply(zygote)
    deadline = time.monotonic() + 120
    while committed_rows(store) < start + extra_rows and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.05))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    status = reply(zygote)
    assert os.WIFSIGNALED(status) or os.WEXITSTATUS(status) == 0, f"indexer failed: status {status}"
    return os.WIFSIGNALED(status)


def test_kill_9_at_several_points_then_resume_equals_a_clean_run(model, tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE.format(tests=str(TESTS), corpus=str(corpus),
                                                                   store=str(tmp_path / "crash"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        clean = index_paths(model, [corpus], tmp_path / "clean", batch_size=8, progress=False)
        expected = contents(tmp_path / "clean")
        expected_per_source = per_source(expected)
        assert clean.chunks_added == len(expected) > 100

        rng = random.Random(4)
        kills = 0
        for fraction in (0.1, 0.3, 0.3):
            kills += run_and_kill(zygote, tmp_path / "crash", max(1, int(fraction * len(expected))), rng)
            with MemoryStore.open(tmp_path / "crash", verify="full") as s:  # opens, checksums hold
                info = s.info()
            now = contents(tmp_path / "crash")
            assert info["documents"] == len(now) <= len(expected)
            for source, n in per_source(now).items():  # only complete sources are visible
                assert n == expected_per_source[source]
        assert kills >= 2, "the indexer finished before it could be killed"
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)

    resumed = index_paths(model, [corpus], tmp_path / "crash", batch_size=8, progress=False)
    assert resumed.sources_indexed + resumed.sources_unchanged == clean.sources_indexed
    got = contents(tmp_path / "crash")
    assert got.keys() == expected.keys()
    assert MemoryStore.open(tmp_path / "crash").info()["documents"] == clean.chunks_added
    for key, (text, mem) in expected.items():
        assert got[key][0] == text
        torch.testing.assert_close(got[key][1], mem, atol=2e-3, rtol=1e-2)
