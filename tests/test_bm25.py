from clara_edge.bm25 import BM25Cache, BM25Index

DOCS = (("Eiffel Tower", "A wrought-iron tower in Paris, France."),
        ("Mount Everest", "The highest mountain above sea level, in the Himalayas."),
        ("Water", "Water boils at 100 degrees Celsius at sea level."),
        ("Hamlet", "A tragedy written by William Shakespeare."))


def test_top_k_ranks_the_matching_document_first():
    index = BM25Index(DOCS)
    assert index.top_k("Who wrote Hamlet?", 1) == [3]
    assert index.top_k("highest mountain in the Himalayas", 2)[0] == 1
    assert index.top_k("In which city is the Eiffel Tower?", 3)[0] == 0  # the title is indexed too


def test_k_is_capped_and_ties_keep_candidate_order():
    index = BM25Index(DOCS)
    assert index.top_k("zebra", 10) == [0, 1, 2, 3]          # unknown word: all tie
    assert index.top_k("the of and", 2) == [0, 1]             # only stopwords: empty query
    assert sorted(index.top_k("sea level", 4)[:2]) == [1, 2]


def test_matches_keeps_only_documents_sharing_a_term():
    index = BM25Index(DOCS)
    assert index.matches("sea level", 4)[:2] == index.top_k("sea level", 2) and len(index.matches("sea level", 4)) == 2
    assert index.matches("zebra", 4) == [] and index.matches("the of and", 4) == []
    assert index.matches("Who wrote Hamlet?", 0) == []


def test_empty_corpus_text_does_not_crash():
    assert BM25Index((("", ""), ("", "a"))).top_k("anything", 2) == [0, 1]


def test_cache_indexes_each_candidate_set_once():
    cache, pool = BM25Cache(), tuple(DOCS)
    assert cache.get(pool) is cache.get(pool)
    cache.get(tuple(DOCS[:2]))
    assert len(cache) == 2


def test_bm25s_is_imported_without_initialising_jax(tmp_path):
    """bm25s imports JAX when it is installed, and JAX then claims most of a GPU's memory; clara_edge.bm25
    keeps it out, and leaves `import jax` working afterwards. A stand-in `jax` package records its import."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "jax"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'a').write('x')\n")
    (fake / "lax.py").write_text("import numpy as np\ntop_k = lambda x, k: (np.sort(x)[-k:], None)\n")
    code = ("import sys, clara_edge.bm25\n"
            "assert 'jax' not in sys.modules\n"
            "assert not __import__('bm25s').selection.JAX_IS_AVAILABLE\n"
            "import jax\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
    assert (tmp_path / "imported").read_text() == "x"  # only the explicit `import jax` at the end ran it
