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


def test_empty_corpus_text_does_not_crash():
    assert BM25Index((("", ""), ("", "a"))).top_k("anything", 2) == [0, 1]


def test_cache_indexes_each_candidate_set_once():
    cache, pool = BM25Cache(), tuple(DOCS)
    assert cache.get(pool) is cache.get(pool)
    cache.get(tuple(DOCS[:2]))
    assert len(cache) == 2
