"""The context budget: how many documents fit the generator's window at a given compression rate.

A prompt holds the chat frame and question (`overhead` positions), one block of n_mem memory slots plus a
<SEP> per document, and room for the answer. At CR64 (4 slots + 1) a 4096 window fits 100+ documents.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ClaraError

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class Budget:
    context: int          # positions the generator may use in all
    overhead: int         # prompt positions without any document
    per_doc: int          # positions one document takes (n_mem + <SEP>)
    answer: int           # positions kept free for the answer

    @property
    def max_docs(self) -> int:
        return max(0, (self.context - self.overhead - self.answer) // self.per_doc)

    def positions(self, n_docs: int) -> int:
        return self.overhead + n_docs * self.per_doc


def prompt_overhead(backend, question: str) -> int:
    """Positions of `question`'s generator prompt besides its documents' (n_mem + 1 each), measured with one
    document: the frame's blank lines tokenize differently around none (SmolLM2: one position fewer)."""
    return len(backend.prompt_ids(question, 1)) - (backend.config.n_mem + 1)


def make_budget(context: int, model_max: int, overhead: int, n_mem: int, answer: int) -> Budget:
    if context < 1:
        raise ClaraError(f"context must be positive, got {context}")
    if context > model_max:
        raise ClaraError(f"context {context} exceeds the model's {model_max} positions")
    budget = Budget(context, overhead, n_mem + 1, answer)
    if budget.max_docs < 1:
        raise ClaraError(f"the prompt with its question takes {overhead} positions and the answer {answer}: "
                         f"context {context} leaves no room for a document ({budget.per_doc} positions); "
                         "shorten the question or --max-new-tokens, or raise --context")
    return budget


def check_top_k(budget: Budget, top_k: int | None, available: int | None = None) -> None:
    """An explicit k is at least one and its documents (no more than the `available` ones) fit the budget (a clear
    error otherwise); `None` (auto) always passes."""
    if top_k is None:
        return
    if top_k < 1:
        raise ClaraError(f"top-k must be at least 1, got {top_k}")
    k = top_k if available is None else min(top_k, available)
    if k > budget.max_docs:
        every = f" (all {k} documents there are)" if k < top_k else ""
        raise ClaraError(f"top-k {top_k}{every} needs {budget.positions(k) + budget.answer} positions; "
                         f"context {budget.context} fits {budget.max_docs} documents (use --top-k auto)")


def choose_k(budget: Budget, scores: list[float], top_k: int | None, min_score: float) -> int:
    """How many of the ranked candidates to use.

    An explicit k must fit the budget (a clear error otherwise); `None` means auto: as many as fit whose
    score is at least `min_score`, and never fewer than one.
    """
    if top_k is not None:
        check_top_k(budget, top_k, len(scores))
        return min(top_k, len(scores))
    above = sum(1 for s in scores if s >= min_score)
    return min(max(above, 1), budget.max_docs, len(scores))
