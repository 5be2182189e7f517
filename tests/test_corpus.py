"""Corpus loading (.txt, .md, .jsonl, folders, bad input) and sentence-aware chunking."""
from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clara_edge import corpus
from clara_edge.corpus import Document, chunk_document, list_files, load_documents, read_source
from clara_edge.datasets import document_text
from clara_edge.errors import ClaraError
from conftest import SHARED_DATA
from tiny import tiny_tokenizer

FUZZ = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def nows(text: str) -> str:
    return "".join(ch for ch in text if not ch.isspace())


def n_tokens(tok, chunk) -> int:
    return len(tok(document_text((chunk.title, chunk.text)), add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------ loading
def test_formats_titles_and_folder_order(tmp_path):
    write(tmp_path / "b" / "z.txt", "Plain text file.")
    write(tmp_path / "b" / "a.md", "\n# The Heading #\n\nBody of the note.\n## Sub\nMore.")
    write(tmp_path / "a.jsonl", "\n".join([
        json.dumps({"title": "T1", "text": "Row one."}),
        "",
        json.dumps("A bare string row."),
        json.dumps({"id": "q1", "dataset": "hotpotqa", "question": "?", "golden_answers": ["x"],
                    "docs": [{"title": "D1", "text": "Doc one."}, {"title": "T1", "text": "Row one."},
                             "Plain doc."], "pos_index": [0]}),
        json.dumps({"title": "U", "text": "line\u2028separator inside"}),
    ]))
    write(tmp_path / "b" / ".hidden.txt", "skip me")
    write(tmp_path / "b" / "image.png", b"\x89PNG\0")
    write(tmp_path / ".git" / "x.txt", "skip me too")
    docs = list(load_documents([tmp_path]))
    assert [(Path(d.source).name, d.title, d.text, d.index) for d in docs] == [
        ("a.jsonl", "T1", "Row one.", 0),
        ("a.jsonl", "", "A bare string row.", 1),
        ("a.jsonl", "D1", "Doc one.", 2),  # the repeated (T1, Row one.) is kept once
        ("a.jsonl", "", "Plain doc.", 3),
        ("a.jsonl", "U", "line\u2028separator inside", 4),
        ("a.md", "The Heading", "Body of the note.\n## Sub\nMore.", 0),
        ("z.txt", "z", "Plain text file.", 0),
    ]
    assert all(Path(d.source).is_absolute() for d in docs)


def test_a_windows_line_end_is_not_part_of_the_title(tmp_path):
    (tmp_path / "crlf.md").write_bytes(b"# My Title \r\n\r\nSome text.\r\n")
    (doc,) = load_documents([tmp_path / "crlf.md"])
    assert doc.title == "My Title"


def test_markdown_heading_later_is_title_but_text_kept(tmp_path):
    write(tmp_path / "n.md", "Intro line.\n\n# Late heading\ntext")
    (doc,) = load_documents([tmp_path / "n.md"])
    assert (doc.title, doc.text) == ("Late heading", "Intro line.\n\n# Late heading\ntext")


def test_empty_files_are_skipped_and_counted(tmp_path):
    write(tmp_path / "empty.txt", "")
    write(tmp_path / "blank.md", " \n\t\n")
    write(tmp_path / "blank.jsonl", "\n\n" + json.dumps({"title": "t", "text": "  "}) + "\n")
    write(tmp_path / "ok.txt", "Some text.")
    skipped: list[str] = []
    docs = list(load_documents([tmp_path], skipped))
    assert [d.text for d in docs] == ["Some text."]
    assert sorted(Path(p).name for p in skipped) == ["blank.jsonl", "blank.md", "empty.txt"]
    (tmp_path / "ok.txt").unlink()
    with pytest.raises(ClaraError, match="no documents .*3 empty"):
        list(load_documents([tmp_path]))


@pytest.mark.parametrize("name,content,message", ids=lambda v: v if isinstance(v, str) and len(v) < 20 else "",
                         argvalues=[
    ("bin.txt", b"abc\0def", r"bin.txt: binary file \(NUL byte at offset 3\)"),
    ("utf16.md", "hello".encode("utf-16"), r"utf16.md: binary file"),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), r"latin1.txt: not UTF-8 text \(invalid byte at offset 3\)"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
    ("deep.jsonl", b"[" * 100_000, r"deep.jsonl:1: not valid JSON"),
    ("shape.jsonl", b'{"title": "no text"}\n', r"shape.jsonl:1: a document must be .*keys \['title'\], no string"),
    ("list.jsonl", b'[1, 2]\n', r"list.jsonl:1: a document must be .*\(got list\)"),
    ("docs.jsonl", b'{"docs": {"text": "x"}}\n', r"docs.jsonl:1: \"docs\" must be a list"),
    ("title.jsonl", b'{"title": 3, "text": "x"}\n', r"title.jsonl:1: document title must be a string"),
    ("surrogate.jsonl", b'{"text": "bad \\ud800 char"}\n', r"surrogate.jsonl:1: text holds an unpaired surrogate"),
])
def test_bad_files_raise_one_line_naming_the_file(tmp_path, name, content, message):
    path = write(tmp_path / name, content)
    with pytest.raises(ClaraError, match=message) as err:
        list(load_documents([path]))
    assert "\n" not in str(err.value)


def test_bom_is_dropped(tmp_path):
    (doc,) = load_documents([write(tmp_path / "bom.txt", b"\xef\xbb\xbfHello")])
    assert doc.text == "Hello"


def test_missing_and_unsupported_paths(tmp_path):
    with pytest.raises(ClaraError, match="no such file or folder"):
        list_files([tmp_path / "nope"])
    with pytest.raises(ClaraError, match="unsupported file type '.pdf'"):
        list_files([write(tmp_path / "x.pdf", "%PDF")])
    (tmp_path / "sub").mkdir()
    with pytest.raises(ClaraError, match="no .txt, .md, .jsonl files"):
        list_files([tmp_path / "sub"])


def test_pipes_and_dangling_links_are_skipped_in_a_folder_and_refused_by_name(tmp_path, caplog, monkeypatch):
    """A named pipe hung `index` forever; a link to nothing aborted the run naming its target."""
    import os

    from clara_edge import corpus as corpus_module

    good = write(tmp_path / "notes" / "a.txt", "Kept.")
    os.mkfifo(tmp_path / "notes" / "pipe.txt")
    (tmp_path / "notes" / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    write(tmp_path / "work" / "b.txt", "Elsewhere.")
    (tmp_path / "notes" / "work").symlink_to(tmp_path / "work")
    with caplog.at_level("WARNING", logger="clara_edge"):
        assert list_files(tmp_path / "notes") == [good.resolve()]  # one path needs no list
    assert "pipe.txt: not a regular file" in caplog.text and "gone.txt: a link to" in caplog.text
    assert "notes/work: a linked folder" in caplog.text
    with pytest.raises(ClaraError, match=r"cannot index .*pipe.txt: not a regular file"):
        list_files([tmp_path / "notes" / "pipe.txt"])
    with pytest.raises(ClaraError, match=r"cannot index .*gone.txt: a link to .*nowhere.txt, which does not exist"):
        list_files([tmp_path / "notes" / "gone.txt"])
    with pytest.raises(ClaraError, match="an empty path was given"):
        list_files([""])

    def unreadable_walk(top, onerror=None):  # what os.walk meets in a subfolder without read permission
        yield str(top), [], ["a.txt"]
        onerror(PermissionError(13, "Permission denied", str(top) + "/private"))
    monkeypatch.setattr(corpus_module.os, "walk", unreadable_walk)
    caplog.clear()
    with caplog.at_level("WARNING", logger="clara_edge"):
        assert list_files([tmp_path / "notes"]) == [good.resolve()]  # it used to be skipped without a word
    assert "skipped folder" in caplog.text and "notes/private: Permission denied" in caplog.text


def test_a_path_through_a_linked_folder_names_the_file_it_reads(tmp_path, monkeypatch):
    write(tmp_path / "real" / "n.md", "the real note")
    (tmp_path / "real" / "sub").mkdir()
    write(tmp_path / "n.md", "a decoy beside the link")
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path)
    (listed,) = list_files(["link/../n.md"])  # the OS goes through the link: real/n.md
    assert listed == (tmp_path / "real" / "n.md").resolve()
    assert listed.read_text() == "the real note"


def test_a_note_that_is_only_a_heading_is_its_own_text(tmp_path):
    (doc,) = load_documents([write(tmp_path / "fact.md", "# Alice was born in Lyon in 1921\n")])
    assert (doc.title, doc.text) == ("fact", "Alice was born in Lyon in 1921")


def test_same_file_twice_is_listed_once(tmp_path):
    path = write(tmp_path / "a.txt", "x")
    assert list_files([path, tmp_path, tmp_path / "." / "a.txt"]) == [path.resolve()]
    (tmp_path / "b.txt").symlink_to(path)  # a link beside its target: one file, by the name met first
    assert list_files([tmp_path]) == [path.resolve()]
    assert list_files([tmp_path / "b.txt", tmp_path]) == [tmp_path.resolve() / "b.txt"]


def test_source_sha_is_of_the_bytes(tmp_path):
    import hashlib
    path = write(tmp_path / "a.txt", "content")
    assert read_source(path).sha256 == hashlib.sha256(b"content").hexdigest()


@pytest.mark.skipif(not (SHARED_DATA / "eval" / "hotpotqa_dev200.jsonl").exists(), reason="shared data missing")
def test_shared_data_rows_load_their_docs():
    path = SHARED_DATA / "eval" / "hotpotqa_dev200.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    unique = {(d["title"], d["text"]) for r in rows for d in r["docs"] if d["text"].strip()}
    docs = list(load_documents([path]))
    assert len(docs) == len(unique) and {(d.title, d.text) for d in docs} == unique


# ------------------------------------------------------------------------------------------ chunking
def check_chunks(doc: Document, chunks, tok, max_tokens: int) -> None:
    """Offsets point at the text, order is kept, nothing but whitespace is lost, the budget holds."""
    assert [c.index for c in chunks] == list(range(len(chunks)))
    pos = 0
    for c in chunks:
        assert c.text and c.text == c.text.strip()
        assert doc.text[c.offset:c.offset + len(c.text)] == c.text
        assert not doc.text[pos:c.offset].strip()  # only whitespace between chunks
        pos = c.offset + len(c.text)
        assert (c.source, c.title, c.doc) == (doc.source, doc.title, doc.index)
        if len(c.text) > 1:
            assert n_tokens(tok, c) <= max_tokens
    assert not doc.text[pos:].strip()


def test_chunks_end_at_sentences_when_they_fit(tok):
    sentences = [f"Sentence number {i} says something short." for i in range(40)]
    doc = Document("s", "Title", " ".join(sentences))
    chunks = chunk_document(doc, tok, 64)
    check_chunks(doc, chunks, tok, 64)
    assert len(chunks) > 3
    assert all(c.text.endswith(".") for c in chunks)
    assert chunk_document(Document("s", "", "Short one."), tok, 64)[0].text == "Short one."


def test_long_sentence_is_hard_split_by_tokens(tok):
    doc = Document("s", "", "word " * 300 + "end. Next sentence.")
    chunks = chunk_document(doc, tok, 32)
    check_chunks(doc, chunks, tok, 32)
    assert sum(n_tokens(tok, c) for c in chunks) >= 300 and len(chunks) >= 300 * 2 // 32


def test_newlines_break_chunks(tok):
    doc = Document("s", "", "\n".join(f"line {i} without stop" for i in range(30)))
    chunks = chunk_document(doc, tok, 40)
    check_chunks(doc, chunks, tok, 40)
    assert all(re.fullmatch(r"(line \d+ without stop\s*)+", c.text) for c in chunks)


def test_title_tokens_count_against_the_budget(tok):
    doc = Document("s", "A fairly long title for this document", "Some words here. " * 50)  # 35 tokens here
    check_chunks(doc, chunk_document(doc, tok, 72), tok, 72)


def test_a_long_title_is_cut_to_half_the_budget_and_the_text_still_fits(tok):
    title = "An extraordinarily long title that goes on and on about many things " * 4
    doc = Document("s", title, "Some words here. " * 50)
    chunks = chunk_document(doc, tok, 32)
    assert chunks and all(c.title == chunks[0].title for c in chunks) and title.startswith(chunks[0].title)
    assert 0 < len(tok(chunks[0].title + ": ", add_special_tokens=False)["input_ids"]) <= 16
    check_chunks(replace(doc, title=chunks[0].title), chunks, tok, 32)
    assert nows("".join(c.text for c in chunks)) == nows(doc.text)
    tiny_budget = chunk_document(doc, tok, 1)
    assert tiny_budget and nows("".join(c.text for c in tiny_budget)) == nows(doc.text)


def test_windows_do_not_change_the_chunks(tok, monkeypatch):
    text = " ".join(f"Sentence {i} is here{'!' if i % 3 else ''}" for i in range(400)) + " " + "x" * 900
    doc = Document("s", "T", text)
    whole = chunk_document(doc, tok, 48)
    monkeypatch.setattr(corpus, "WINDOW", 700)
    windowed = chunk_document(doc, tok, 48)
    check_chunks(doc, windowed, tok, 48)
    assert abs(len(windowed) - len(whole)) <= len(whole) // 20


def test_a_window_without_tokens_does_not_end_the_document(monkeypatch):
    monkeypatch.setattr(corpus, "WINDOW", 40)
    doc = Document("s", "", "internationalization." + " " * 200 + "characteristically.")
    chunks = chunk_document(doc, word_tokenizer(), 8)  # the word tokenizer gives whitespace no tokens
    assert [c.text for c in chunks] == ["internationalization.", "characteristically."]


def test_multibyte_characters_never_split(tok):
    doc = Document("s", "", "😀🎉 émigré naïve 日本語のテキスト。" * 20)
    for budget in (1, 2, 5, 17):
        chunks = chunk_document(doc, tok, budget)
        check_chunks(doc, chunks, tok, max(budget, 4))  # one emoji is 4 byte tokens: budgets below overflow
        assert nows("".join(c.text for c in chunks)) == nows(doc.text)


def test_chunking_needs_a_fast_tokenizer_and_a_budget(tok):
    with pytest.raises(ClaraError, match="at least 1 token"):
        chunk_document(Document("s", "", "x"), tok, 0)

    class Slow:
        is_fast = False
    with pytest.raises(ClaraError, match="fast"):
        chunk_document(Document("s", "", "x"), Slow(), 8)


LONG_WORDS = "internationalization characteristically incomprehensibilities counterrevolutionaries"


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over long words: 10 MB is ~0.5M tokens, quick enough for the test budget."""
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(LONG_WORDS.split() + ["."])}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def test_ten_megabyte_document(tmp_path):
    text = ((LONG_WORDS + ". ") * 9 + "\n") * 13_000
    assert len(text) > 10_000_000
    path = write(tmp_path / "big.txt", text)
    tok = word_tokenizer()
    start = time.perf_counter()
    (doc,) = load_documents([path])
    chunks = chunk_document(doc, tok, 256)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"10 MB took {elapsed:.1f} s"
    assert len(chunks) > 2_000  # 0.6M tokens in chunks of <= 256
    last = chunks[-1]
    assert last.offset + len(last.text) == len(text.rstrip())
    for c in chunks[:: len(chunks) // 50]:
        assert doc.text[c.offset:c.offset + len(c.text)] == c.text and n_tokens(tok, c) <= 256


# ------------------------------------------------------------------------------------------ fuzz
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                               st.sampled_from(["title", "text", "docs", "id", "x"]), inner, max_size=4),
                           max_leaves=8)
jsonl_lines = st.lists(json_values.map(json.dumps) | st.sampled_from(['{"text": "\\udc00"}', "{", "[]", ""]),
                       max_size=6).map("\n".join).map(str.encode)
file_bytes = st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | jsonl_lines


@settings(FUZZ, max_examples=700)
@given(content=file_bytes, suffix=st.sampled_from([".txt", ".md", ".jsonl"]))
def test_fuzz_loaders_raise_only_clara_errors(tmp_path, content, suffix):
    path = write(tmp_path / f"f{suffix}", content)
    try:
        docs = list(load_documents([path]))
    except ClaraError as e:
        assert "\n" not in str(e)
        return
    assert docs and all(d.text.strip() for d in docs)


@settings(FUZZ, max_examples=300)
@given(text=st.text(min_size=1, max_size=400), title=st.text(max_size=20), budget=st.integers(1, 40))
def test_fuzz_chunking_keeps_every_character(tok, text, title, budget):
    doc = Document("s", title, text)
    chunks = chunk_document(doc, tok, budget)
    assert nows("".join(c.text for c in chunks)) == nows(text)
    for c in chunks:
        assert doc.text[c.offset:c.offset + len(c.text)] == c.text
