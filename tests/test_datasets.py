import json

import pytest

from clara_edge import prompt
from clara_edge.datasets import (build_candidates, document_text, load_corpus, load_eval_rows, load_eval_set,
                                 parse_row)
from clara_edge.errors import ClaraError

A, B, C, D = ({"title": t, "text": f"text {t}"} for t in "ABCD")


def row(i, docs, pos, answers=("x",)):
    return {"id": f"r{i}", "dataset": "t", "question": f"q{i}?", "golden_answers": list(answers), "docs": docs,
            "pos_index": pos}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_rows_and_limit(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [row(i, [A, B], [1]) for i in range(5)])
    rows = load_eval_rows(f)
    assert len(rows) == 5 and rows[0].docs == (("A", "text A"), ("B", "text B")) and rows[0].pos_index == (1,)
    assert [r.id for r in load_eval_rows(f, limit=2)] == ["r0", "r1"]
    assert len(load_eval_rows(f, limit=50)) == 5


@pytest.mark.parametrize("content, match", [
    (None, "not found"),
    ("", "no rows"),
    ('{"question": "q", "golden_answers": ["a"]}\n{not json\n', r"d.jsonl:2: not valid JSON"),
    ('{"golden_answers": ["a"]}\n', "question"),
    ('{"question": "q", "golden_answers": [1]}\n', "golden_answers"),
    ('{"question": "q", "golden_answers": ["a"], "docs": [{"title": "t"}]}\n', "document"),
    ('[1, 2]\n', "JSON object"),
])
def test_bad_eval_files_are_one_line_errors(tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(ClaraError, match=match) as e:
        load_eval_rows(f)
    assert "\n" not in str(e.value)


def test_bad_limit_and_directory(tmp_path):
    with pytest.raises(ClaraError, match="limit"):
        load_eval_rows(tmp_path, limit=0)
    with pytest.raises(ClaraError, match="directory"):
        load_eval_rows(tmp_path)


def test_load_corpus_json_list_and_jsonl(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps([A, {"text": "no title"}, "plain"]))
    assert load_corpus(tmp_path / "c.json") == [("A", "text A"), ("", "no title"), ("", "plain")]
    write_jsonl(tmp_path / "c.jsonl", [A, B])
    assert load_corpus(tmp_path / "c.jsonl") == [("A", "text A"), ("B", "text B")]
    (tmp_path / "bad.json").write_text('[{"title": "A", ')
    with pytest.raises(ClaraError, match="not valid JSON"):
        load_corpus(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ClaraError, match="no documents"):
        load_corpus(tmp_path / "empty.json")
    with pytest.raises(ClaraError, match="not found"):
        load_corpus(tmp_path / "missing.json")


def test_rows_with_several_docs_use_their_own():
    rows = [parse_row(row(0, [A, B, C], [2, 0])), parse_row(row(1, [C, D], [1]))]
    cands = build_candidates(rows)
    assert cands[0].docs == rows[0].docs and cands[0].gold == (2, 0) and not cands[0].shared
    assert cands[1].docs == rows[1].docs and cands[1].gold == (1,)


def test_single_doc_rows_pool_the_whole_file_deduplicated():
    rows = [parse_row(row(0, [A], [0])), parse_row(row(1, [B], [0])), parse_row(row(2, [A], [0])),
            parse_row(row(3, [C, D], [1])), parse_row(row(4, [], []))]
    cands = build_candidates(rows)
    pool = (("A", "text A"), ("B", "text B"), ("C", "text C"), ("D", "text D"))
    assert cands[0].docs == pool and cands[0].shared
    assert cands[0].docs is cands[1].docs is cands[2].docs is cands[4].docs  # one object: cached once
    assert [c.gold for c in cands] == [(0,), (1,), (0,), (1,), ()]
    assert cands[3].docs == (("C", "text C"), ("D", "text D"))


def test_corpus_overrides_row_docs():
    rows = [parse_row(row(0, [], [2])), parse_row(row(1, [A, B], [0]))]
    corpus = [("X", "x"), ("Y", "y"), ("Z", "z")]
    cands = build_candidates(rows, corpus)
    assert all(c.docs == tuple(corpus) and c.shared for c in cands)
    assert [c.gold for c in cands] == [(2,), (0,)]
    with pytest.raises(ClaraError, match="out of range"):
        build_candidates([parse_row(row(0, [], [3]))], corpus)


def test_bad_pos_index_and_nothing_to_pool():
    with pytest.raises(ClaraError, match="r0: pos_index 2 is out of range"):
        build_candidates([parse_row(row(0, [A, B], [2]))])
    with pytest.raises(ClaraError, match="--corpus"):
        build_candidates([parse_row(row(0, [], []))])


def test_eval_set_limit_pools_over_the_whole_file(tmp_path):
    f = write_jsonl(tmp_path / "nq.jsonl", [row(i, [{"title": "", "text": f"p{i}"}], [0]) for i in range(6)])
    s = load_eval_set(f, limit=2)
    assert len(s.rows) == len(s.candidates) == 2
    assert len(s.candidates[0].docs) == 6 and [c.gold for c in s.candidates] == [(0,), (1,)]
    write_jsonl(tmp_path / "corpus.jsonl", [A, B])
    s = load_eval_set(f, corpus=tmp_path / "corpus.jsonl", limit=1)
    assert len(s.rows) == 1 and s.candidates[0].docs == (("A", "text A"), ("B", "text B"))


def test_document_text_is_what_the_text_prompt_shows():
    docs = [("Title", "Body."), ("", "Untitled.")]
    assert prompt.text_background(docs) == "Background:\n" + "\n".join(document_text(d) for d in docs)
