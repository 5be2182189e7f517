"""The context budget (edge/budget.py): how many documents fit, and how many auto-k takes."""
from __future__ import annotations

import pytest

from clara_edge.budget import check_top_k, choose_k, make_budget
from clara_edge.errors import ClaraError


def test_max_docs_keeps_room_for_the_answer():
    budget = make_budget(100, 4096, overhead=10, n_mem=4, answer=12)
    n = budget.max_docs
    assert n == (100 - 10 - 12) // 5 == 15
    assert budget.positions(n) + budget.answer <= budget.context < budget.positions(n + 1) + budget.answer


def test_auto_k_takes_the_documents_above_min_score_at_least_one_at_most_what_fits():
    budget = make_budget(100, 4096, overhead=10, n_mem=4, answer=12)
    assert choose_k(budget, [0.9, 0.8, 0.5, 0.1], None, 0.5) == 3      # a score equal to min_score counts
    assert choose_k(budget, [0.1, 0.05], None, 0.5) == 1               # never fewer than one
    assert choose_k(budget, [0.9] * 40, None, 0.0) == budget.max_docs  # never more than fit
    assert choose_k(budget, [0.9] * 3, None, 0.0) == 3                 # nor more than there are
    assert choose_k(budget, [0.9] * 40, 7, 0.99) == 7                  # an explicit k ignores min_score


def test_an_explicit_k_must_fit():
    budget = make_budget(100, 4096, overhead=10, n_mem=4, answer=12)
    check_top_k(budget, 15)
    check_top_k(budget, 50, available=15)  # only 15 documents exist: they fit
    with pytest.raises(ClaraError, match="top-k 16 needs 102 positions; context 100 fits 15 documents"):
        check_top_k(budget, 16)
    with pytest.raises(ClaraError, match="top-k must be at least 1"):
        choose_k(budget, [0.5], 0, 0.0)


@pytest.mark.parametrize("context, message", [
    (0, "context must be positive"),
    (5000, "context 5000 exceeds the model's 4096 positions"),
    (26, "leaves no room for a document"),
])
def test_impossible_budgets_are_one_clear_line(context, message):
    with pytest.raises(ClaraError, match=message):
        make_budget(context, 4096, overhead=10, n_mem=4, answer=12)
