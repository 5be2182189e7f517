import pytest

from clara_edge.metrics import cover_exact_match, exact_match, f1_score, normalize_answer, recall_at_k


@pytest.mark.parametrize("raw, norm", [
    ("The Eiffel Tower!", "eiffel tower"),
    ("  An   apple, a day.  ", "apple day"),
    ("Theater of the Absurd", "theater of absurd"),   # articles only as whole words
    ("U.S.A.", "usa"),
    ("Röntgen", "röntgen"),                            # non-ASCII letters kept
    ("the", ""),
])
def test_squad_normalisation(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_max_over_golds():
    assert exact_match("the Rush.", ["Rush"]) == 1.0
    assert exact_match("Rush band", ["Rush"]) == 0.0
    assert exact_match("Paris", ["London", "paris"]) == 1.0
    assert exact_match("Paris", []) == 0.0


def test_f1_partial_overlap_and_max():
    # pred tokens {william, shakespeare, playwright}, gold {william, shakespeare}: P=2/3, R=1 -> F1=0.8
    assert f1_score("William Shakespeare, playwright", ["William Shakespeare"]) == pytest.approx(0.8)
    assert f1_score("William Shakespeare, playwright", ["Marlowe", "William Shakespeare"]) == pytest.approx(0.8)
    assert f1_score("Shakespeare", ["William Shakespeare"]) == pytest.approx(2 / 3)
    assert f1_score("blue", ["red"]) == 0.0
    # multiset overlap: the repeated token counts once in gold
    assert f1_score("paris paris", ["paris"]) == pytest.approx(2 * 0.5 * 1 / 1.5)
    # empty after normalisation: both empty -> 1, one empty -> 0
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("", ["Paris"]) == 0.0


def test_cover_em_token_boundaries():
    assert cover_exact_match("It was William Shakespeare in 1600.", ["william shakespeare"]) == 1.0
    assert cover_exact_match("Shakespeare William", ["William Shakespeare"]) == 0.0  # order matters
    assert cover_exact_match("a category", ["cat"]) == 0.0
    assert cover_exact_match("born in 1990", ["1", "1990"]) == 1.0
    assert cover_exact_match("born in 1990", ["1"]) == 0.0
    assert cover_exact_match("anything", ["the"]) == 0.0


def test_recall_at_k():
    assert recall_at_k([3, 1, 0, 2], [1, 2], 1) == 0.0
    assert recall_at_k([3, 1, 0, 2], [1, 2], 2) == 0.5
    assert recall_at_k([3, 1, 0, 2], [1, 2], 5) == 1.0
    assert recall_at_k([0], [0, 0], 1) == 1.0
    with pytest.raises(ValueError):
        recall_at_k([0], [], 1)
