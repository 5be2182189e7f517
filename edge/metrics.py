"""QA and retrieval metrics, as in the SQuAD / CLaRa evaluations.

Every answer metric takes one prediction and a list of gold answers and returns the **maximum over all
gold answers** (the CLaRa reference used only the first gold answer; we take the max and say so), as a
fraction in [0, 1]: `exact_match` and `cover_exact_match` are 0.0 or 1.0, `f1_score` lies in [0, 1].
`recall_at_k` is a fraction too. The eval report (`clara_edge.evaluate`) scales means to 0-100.
An empty gold list scores 0.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower-case, drop ASCII punctuation, drop articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _best(prediction: str, golds: Sequence[str], score: Callable[[str, str], float]) -> float:
    pred = normalize_answer(prediction)
    return max((score(pred, normalize_answer(g)) for g in golds), default=0.0)


def _em(pred: str, gold: str) -> float:
    return float(pred == gold)


def _f1(pred: str, gold: str) -> float:
    pred_toks, gold_toks = pred.split(), gold.split()
    if not pred_toks or not gold_toks:  # SQuAD v2 convention: both empty -> 1, one empty -> 0
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_toks), common / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def _cover(pred: str, gold: str) -> float:
    if not gold:
        return float(not pred)
    return float(f" {gold} " in f" {pred} ")


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals some normalised gold answer, else 0.0."""
    return _best(prediction, golds, _em)


def f1_score(prediction: str, golds: Sequence[str]) -> float:
    """SQuAD token F1 (bag of normalised tokens), max over gold answers, in [0, 1]."""
    return _best(prediction, golds, _f1)


def cover_exact_match(prediction: str, golds: Sequence[str]) -> float:
    """1.0 if some normalised gold answer is a substring of the normalised prediction, else 0.0.

    The substring must sit on token boundaries (gold "cat" is not covered by "category", gold "1" is not
    covered by "1990"): since normalised strings are single-spaced, this is "the gold tokens appear
    contiguously, in order, in the prediction". A gold that normalises to "" covers only an empty prediction.
    """
    return _best(prediction, golds, _cover)


def recall_at_k(retrieved: Sequence[int], gold: Sequence[int], k: int) -> float:
    """|top-k of `retrieved` ∩ gold| / |gold| (fraction). Raises ValueError for an empty gold set."""
    gold_set = set(gold)
    if not gold_set:
        raise ValueError("recall is undefined without gold documents")
    return len(set(retrieved[:k]) & gold_set) / len(gold_set)
