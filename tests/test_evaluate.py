import json

import pytest
import torch

from clara_edge.datasets import build_candidates, document_text, load_eval_set, parse_row
from clara_edge.errors import ClaraError
from clara_edge.evaluate import evaluate, evaluate_file
from tiny import tiny_clara

KEYS = {"n", "em", "f1", "cover_em", "recall@1", "recall@5", "context_positions_mean",
        "effective_compression_mean"}
FACTS = ["The Eiffel Tower is in Paris.", "Mount Everest is the highest mountain.", "Water boils at 100 degrees.",
         "William Shakespeare wrote Hamlet.", "The Nile is a long river.", "Gold is a yellow metal."]


@pytest.fixture(scope="module")
def model():
    return tiny_clara("llama", compression_rate=16, doc_max_length=64)


def multi_doc_rows(n=4):
    """Each row: 3 own docs, gold = doc 1, question = the gold text (untrained adapters: query == compressor)."""
    rows = []
    for i in range(n):
        docs = [{"title": "", "text": FACTS[(i + j) % len(FACTS)]} for j in range(3)]
        rows.append(parse_row({"id": str(i), "question": docs[1]["text"], "golden_answers": ["Paris", "x"],
                               "docs": docs, "pos_index": [1]}))
    return rows


def nq_like_rows(n=5):
    return [parse_row({"id": f"nq{i}", "question": FACTS[i], "golden_answers": ["a"],
                       "docs": [{"title": "", "text": FACTS[i]}], "pos_index": [0]}) for i in range(n)]


@pytest.mark.parametrize("mode, retriever, has_recall, has_compression", [
    ("clara", None, True, True),
    ("clara", "bm25", True, True),
    ("clara", "clara+bm25", True, True),
    ("clara", "oracle", False, True),
    ("text", None, True, True),
    ("text", "clara", True, True),
    ("text-tuned", None, True, True),
    ("closed-book", None, False, False),
])
def test_report_keys_and_nulls_per_mode(model, mode, retriever, has_recall, has_compression):
    rows = multi_doc_rows(3)
    r = evaluate(model, rows, mode, retriever, top_k=2, batch_size=2, progress=False, max_new_tokens=3)
    assert KEYS <= set(r) and "rows" not in r
    assert r["n"] == 3 and r["mode"] == mode
    for key in ("em", "f1", "cover_em"):
        assert 0 <= r[key] <= 100
    assert (r["recall@1"] is not None) == has_recall and (r["recall@5"] is not None) == has_recall
    assert (r["effective_compression_mean"] is not None) == has_compression
    assert r["context_positions_mean"] > 0
    if mode.startswith("text"):
        assert r["effective_compression_mean"] == 1.0
    if mode == "clara":
        assert r["effective_compression_mean"] > 1.0
    json.dumps(r)


def test_clara_positions_are_memory_slots_not_document_tokens(model):
    rows = multi_doc_rows(2)
    clara = evaluate(model, rows, "clara", "oracle", progress=False, max_new_tokens=1)
    text = evaluate(model, rows, "text", "oracle", progress=False, max_new_tokens=1)
    closed = evaluate(model, rows, "closed-book", progress=False, max_new_tokens=1)
    assert closed["context_positions_mean"] < clara["context_positions_mean"] < text["context_positions_mean"]


def test_clara_retriever_finds_identical_text(model):
    # Untrained adapters are the base LM, so a question equal to a document has cosine 1 with it.
    r = evaluate(model, multi_doc_rows(4), "clara", top_k=1, progress=False, max_new_tokens=1, keep_rows=True)
    assert r["recall@1"] == 100.0 and r["recall@5"] == 100.0
    assert [x["retrieved"] for x in r["rows"]] == [[1]] * 4


def test_clara_bm25_ranking_fuses_clara_and_bm25(model):
    from clara_edge.bm25 import BM25Index
    from clara_edge.retrieval import reciprocal_rank_fusion
    rows = multi_doc_rows(4)
    clara = evaluate(model, rows, "clara", "clara", top_k=3, progress=False, retrieval_only=True, keep_rows=True)
    fused = evaluate(model, rows, "clara", "clara+bm25", top_k=3, progress=False, retrieval_only=True, keep_rows=True)
    for row, c, h in zip(rows, clara["rows"], fused["rows"]):
        lexical = BM25Index(row.docs).matches(row.question, 100)
        assert h["retrieved"] == reciprocal_rank_fusion([c["retrieved"], lexical])[0][:3]
    assert fused["recall@1"] == 100.0  # question = gold text: first in both rankings


def test_clara_rankings_follow_the_models_retrieval_centre(model, monkeypatch):
    from clara_edge.retrieval import cosine_scores
    rows = nq_like_rows(5)
    docs = model.compress(FACTS[:5])
    queries = model.encode_query([FACTS[(i + 1) % 5] + " " + FACTS[i] for i in range(5)])
    centre = docs.mean(0)  # even a random model's memories share a direction (cosine 0.85-0.96 here)
    ranked = {c is None: cosine_scores(queries, docs, c).argsort(dim=1, descending=True, stable=True)[:, :3].tolist()
              for c in (None, centre)}
    assert ranked[True] != ranked[False]  # this centre reorders candidates, so the check below can fail
    rows = [parse_row({"id": r.id, "question": FACTS[(i + 1) % 5] + " " + FACTS[i], "golden_answers": ["a"],
                       "docs": [{"title": "", "text": FACTS[i]}], "pos_index": [0]}) for i, r in enumerate(rows)]
    monkeypatch.setattr(model, "retrieval_centre", centre)
    r = evaluate(model, rows, "clara", top_k=3, progress=False, max_new_tokens=1, keep_rows=True)
    assert [x["retrieved"] for x in r["rows"]] == ranked[False]


@pytest.mark.parametrize("mode", ["clara", "text"])
def test_retrieval_only_scores_recall_and_generates_nothing(model, monkeypatch, mode):
    rows = multi_doc_rows(4)
    full = evaluate(model, rows, mode, "clara", progress=False, max_new_tokens=1)
    monkeypatch.setattr(model, "generate", None)  # any generation would now fail
    monkeypatch.setattr(model, "generate_text_rag", None)
    fast = evaluate(model, rows, mode, "clara", progress=False, retrieval_only=True, keep_rows=True)
    assert (fast["recall@1"], fast["recall@5"]) == (full["recall@1"], full["recall@5"])
    assert fast["em"] is fast["f1"] is fast["context_positions_mean"] is None
    assert fast["effective_compression_mean"] == full["effective_compression_mean"]
    assert fast["rows"][0]["prediction"] is None
    for mode, retriever, message in (("clara", "oracle", "ranking retriever"), ("closed-book", None, "retrieves nothing")):
        with pytest.raises(ClaraError, match=message):
            evaluate(model, rows, mode, retriever, progress=False, retrieval_only=True)


def test_memories_cached_per_unique_document_and_match_compress(model, monkeypatch):
    rows = nq_like_rows(5)
    cands = build_candidates(rows)
    compressed, given = [], []
    real_compress, real_generate = model.compress, model.generate
    monkeypatch.setattr(model, "compress", lambda texts, batch_size=16: compressed.extend(texts)
                        or real_compress(texts, batch_size))
    monkeypatch.setattr(model, "generate", lambda qs, mems, **kw: given.extend(mems) or real_generate(qs, mems, **kw))
    r = evaluate(model, rows, "clara", top_k=2, candidates=cands, batch_size=2, progress=False, max_new_tokens=1)
    assert sorted(compressed) == sorted(FACTS[:5])  # the pooled corpus, each document once
    assert r["recall@1"] == 100.0
    want = real_compress([document_text(cands[0].docs[0])])[0]
    assert torch.allclose(given[0][0], want, atol=1e-5)  # row 0's top document is its gold one
    assert len(given) == 5 and all(m.shape[0] == 2 for m in given)


def test_effective_compression_counts_document_tokens(model):
    rows = nq_like_rows(1)
    r = evaluate(model, rows, "clara", "oracle", progress=False, max_new_tokens=1)
    n_tokens = len(model.tokenizer(FACTS[0], add_special_tokens=False)["input_ids"])
    assert r["effective_compression_mean"] == pytest.approx(n_tokens / model.config.n_mem, abs=1e-4)
    assert r["truncated_docs_frac"] == 0.0


def test_keep_rows(model):
    r = evaluate(model, multi_doc_rows(2), "text", top_k=2, progress=False, max_new_tokens=2, keep_rows=True)
    assert len(r["rows"]) == 2
    first = r["rows"][0]
    assert {"id", "prediction", "em", "f1", "cover_em", "recall@1", "retrieved", "gold"} <= set(first)
    assert len(first["retrieved"]) == 2 and first["gold"] == [1]


def test_bad_arguments(model):
    rows = multi_doc_rows(1)
    with pytest.raises(ClaraError, match="mode"):
        evaluate(model, rows, "bogus", progress=False)
    with pytest.raises(ClaraError, match="retriever"):
        evaluate(model, rows, "text", "dense", progress=False)
    with pytest.raises(ClaraError, match="closed-book"):
        evaluate(model, rows, "closed-book", "bm25", progress=False)
    with pytest.raises(ClaraError, match="top-k"):
        evaluate(model, rows, "clara", top_k=0, progress=False)
    with pytest.raises(ClaraError, match="no rows"):
        evaluate(model, [], "clara", progress=False)


@pytest.mark.parametrize("mode", ["clara", "text"])
def test_a_prompt_past_the_context_is_refused_before_generating(model, monkeypatch, mode):
    rows = multi_doc_rows(2)
    one = model.prompt_ids(rows[0].question, 1) if mode == "clara" else model.text_prompt_ids(
        rows[0].question, rows[0].docs[:1])
    monkeypatch.setattr(type(model), "max_positions", property(lambda self: len(one) + 1))  # k=1 fits exactly
    evaluate(model, rows, mode, "bm25", top_k=1, progress=False, max_new_tokens=1)  # one document fits
    monkeypatch.setattr(type(model), "decode", lambda *a, **k: pytest.fail("generated past the context"))
    if mode == "clara":  # refused before compressing the candidates
        monkeypatch.setattr(type(model), "compress", lambda *a, **k: pytest.fail("compressed past the context"))
    with pytest.raises(ClaraError, match=rf"{mode} prompt with 3 documents takes \d+ positions.*lower --top-k"):
        evaluate(model, rows, mode, "bm25", top_k=3, progress=False, max_new_tokens=1)


def test_evaluate_file_limit_and_json(model, tmp_path):
    data = tmp_path / "nq.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f, "golden_answers": ["x"],
                                        "docs": [{"title": "T", "text": f}], "pos_index": [0]}) + "\n"
                            for i, f in enumerate(FACTS)))
    out = tmp_path / "out" / "report.json"
    r = evaluate_file(model, data, mode="text", limit=3, json_out=out, progress=False, max_new_tokens=1)
    assert r["n"] == 3 and json.loads(out.read_text()) == r
    assert r["recall@5"] == 100.0  # bm25 over the pooled 6-passage corpus, question = passage text
    with pytest.raises(ClaraError, match="not found"):
        evaluate_file(model, tmp_path / "missing.jsonl", progress=False)
    with pytest.raises(ClaraError, match="closed-book"):  # argument errors come before reading the file
        evaluate_file(model, tmp_path / "missing.jsonl", mode="closed-book", retriever="bm25")
    assert len(load_eval_set(data, limit=3).candidates[2].docs) == 6
    (tmp_path / "file").write_text("")
    for unwritable in (tmp_path / "out", tmp_path / "file" / "report.json"):  # refused before evaluating
        with pytest.raises(ClaraError, match=f"cannot write the eval report to {unwritable}: "):
            evaluate_file(model, tmp_path / "missing.jsonl", json_out=unwritable, progress=False)


def test_cli_eval_writes_per_question_rows_on_request(tiny_base_dir, tmp_path, capsys):
    from clara_edge.cli import main
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": r.id, "question": r.question, "golden_answers": list(r.answers),
                                        "docs": [{"title": t, "text": x} for t, x in r.docs],
                                        "pos_index": list(r.pos_index)}) + "\n" for r in multi_doc_rows(3)))
    argv = ["eval", "--data", str(data), "--model", str(tiny_base_dir), "--retrieval-only", "--limit", "2"]
    assert main([*argv, "--json", str(tmp_path / "plain.json")]) == 0
    assert "rows" not in json.loads((tmp_path / "plain.json").read_text())
    assert main([*argv, "--json", str(tmp_path / "rows.json"), "--per-question"]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["id"] for r in rows] == ["0", "1"] and all(len(r["retrieved"]) == 3 for r in rows)
    assert '"rows"' not in capsys.readouterr().out  # the printed summary stays short


def test_only_shared_pools_keep_their_retrieval_matrix(model):
    """A row's own documents are asked for once: keeping their matrix too grew memory with the eval file."""
    from clara_edge.datasets import Candidates
    from clara_edge.evaluate import MemoryCache

    cache = MemoryCache(model, batch_size=4, progress=False)
    own = Candidates((("a", "The river runs north."), ("b", "The hill is green.")), (0,))
    pool = Candidates(own.docs + (("c", "A third document."),), (1,), shared=True)
    first = cache.unit_matrix(own)
    assert first.shape[0] == 2 and not cache._matrices
    assert torch.allclose(first.norm(dim=1), torch.ones(2))
    assert cache.unit_matrix(pool) is cache.unit_matrix(pool) and len(cache._matrices) == 1
