"""Asking: question -> query memory -> retrieval over the store -> context budget -> streamed answer."""
from __future__ import annotations

import math
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .backend import Backend
from .budget import DEFAULT_CONTEXT, Budget, check_top_k, choose_k, make_budget, prompt_overhead
from .errors import ClaraError
from .prefix_cache import PrefixCache
from .retrieval import fused_search, search
from .store import ChunkRecord, MemoryStore

SEARCH_TRIES = 3  # a search whose store another process changed before its documents were read runs again


def peak_rss_mb() -> float:
    """This process's peak resident set. Linux: VmHWM, which starts afresh at exec (ru_maxrss keeps the peak of
    the process that forked it, so a benchmark worker would report its parent's); elsewhere ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


@dataclass
class Answer:
    question: str
    answer: str
    sources: list[dict]  # {id, title, source, score}, best first
    stats: dict          # see Runtime.ask

    def to_dict(self) -> dict:
        return asdict(self)


RETRIEVERS = ("clara+bm25", "clara")  # over a store: memories fused with BM25 over the chunks' text, or alone


class Runtime:
    """A backend and a memory store built by the same compressor, answering questions one after another
    (the prompt head every question shares is prefilled once: see `PrefixCache`).

    retriever  clara+bm25 (default): the cosine ranking of query and document memories fused with BM25's over the
               chunks' text (`retrieval.fused_search`; source scores are fusion scores, at most 2 / 61; the
               first question maps the BM25 index `clara-edge index` saved in the store, or builds it, ~1 s per
               10,000 chunks); clara: the cosine ranking alone (`retrieval.search`). Why fused by default: it
               retrieves better than either alone on the multi-hop dev sets, and far better than clara alone on
               NQ (README, "Retrieval fused with BM25")."""

    def __init__(self, backend: Backend, store: MemoryStore, context: int = DEFAULT_CONTEXT,
                 retriever: str = RETRIEVERS[0]) -> None:
        if retriever not in RETRIEVERS:
            raise ClaraError(f"unknown retriever {retriever!r}: use {', '.join(RETRIEVERS)}")
        store.expect(backend.fingerprint(), backend.config.compression_rate)
        self.backend, self.store, self.context, self.retriever = backend, store, context, retriever
        self.prefix_cache = PrefixCache()
        self._one_question = threading.Lock()  # the prefix cache and the backend's state serve one question at a time

    @classmethod
    def open(cls, backend: Backend, store_dir: Path, context: int = DEFAULT_CONTEXT,
             retriever: str = RETRIEVERS[0]) -> Runtime:
        store_dir = Path(store_dir).expanduser()  # `--store=~/notes`: no shell expands a ~ after "="
        if not store_dir.is_dir():
            raise ClaraError(f"no memory store at {store_dir} (create one with `clara-edge index`)")
        return cls(backend, MemoryStore.open(store_dir), context, retriever)

    def ask(self, question: str, top_k: int | None = 5, min_score: float = 0.0, max_new_tokens: int = 64,
            on_text: Callable[[str], None] | None = None, **sampling) -> Answer:
        """Answer `question` from the store; `top_k=None` takes as many documents as fit above `min_score`.

        stats: query_encode_s, retrieval_s, ttft_s (from the call to the first answer token, so it includes
        encoding, retrieval and the generator's prefill), decode_tokens_per_s (tokens after the first, the closing EOS
        included, over the time after the first),
        context_positions, reused_positions (of them, prefilled by an earlier question), memory_positions,
        effective_compression (document tokens per memory vector),
        peak_rss_mb.
        """
        with self._one_question:  # threads that share a runtime take turns
            return self._answer(question, top_k, min_score, max_new_tokens, on_text, **sampling)

    def _answer(self, question: str, top_k: int | None, min_score: float, max_new_tokens: int,
                on_text: Callable[[str], None] | None, **sampling) -> Answer:
        question = question.strip()
        if not question:
            raise ClaraError("the question is empty")
        if max_new_tokens < 1:
            raise ClaraError(f"max-new-tokens must be at least 1, got {max_new_tokens}")
        if sampling.get("do_sample"):
            temperature, top_p = sampling.get("temperature", 1.0), sampling.get("top_p", 1.0)
            if not temperature > 0:
                raise ClaraError(f"--temperature must be above 0 when sampling, got {temperature}")
            if not 0 < top_p <= 1:
                raise ClaraError(f"--top-p must be above 0 and at most 1, got {top_p}")
        if not math.isfinite(min_score):
            raise ClaraError(f"--min-score must be a number, got {min_score}")
        if min_score and self.retriever == "clara+bm25":
            raise ClaraError("--min-score is a cosine floor: use it with --retriever clara (clara+bm25 ranks by "
                             "fusion scores)")
        n_mem = self.backend.config.n_mem
        budget = make_budget(self.context, self.backend.max_positions, prompt_overhead(self.backend, question), n_mem,
                             max_new_tokens)
        # a k past the store's size means all of it: only that many must fit
        check_top_k(budget, top_k, int(self.store.snapshot()[1].sum()))
        start = time.perf_counter()
        query = self.backend.encode_query([question])
        encoded = time.perf_counter()
        for _ in range(SEARCH_TRIES):
            found = self._retrieve(question, query, budget, top_k, min_score)
            if found is not None:
                break
        else:
            raise ClaraError(f"store {self.store.path} kept changing while answering (another process is "
                             "writing to it): ask again")
        scores, chunks, memories = found
        k = len(chunks)
        retrieved = time.perf_counter()

        first: list[float] = []

        def stream(row: int, piece: str) -> None:
            if not first:
                first.append(time.perf_counter())
            if on_text is not None:
                on_text(piece)

        out = self.backend.generate([question], [memories], max_new_tokens=max_new_tokens, on_token=stream,
                                    prefix_cache=self.prefix_cache, **sampling)
        end = time.perf_counter()
        if on_text is not None:
            on_text("\n")
        n_tokens = len(out.token_ids[0])
        doc_tokens = sum(len(ids_) for ids_ in self.backend.tokenizer([c.text for c in chunks],
                                                                      add_special_tokens=False)["input_ids"])
        ttft = (first[0] if first else end) - start
        stats = {
            "query_encode_s": encoded - start,
            "retrieval_s": retrieved - encoded,
            "ttft_s": ttft,
            "decode_tokens_per_s": out.decode_steps / out.decode_s if out.decode_steps and out.decode_s > 0 else 0.0,
            "new_tokens": n_tokens,
            "documents": k,
            "context_positions": out.context_positions[0],
            "reused_positions": out.reused_positions,
            "memory_positions": k * n_mem,
            "effective_compression": doc_tokens / (k * n_mem),
            "peak_rss_mb": peak_rss_mb(),
        }
        sources = [{"id": c.id, "title": c.title, "source": c.source, "score": s}
                   for c, s in zip(chunks, scores)]
        return Answer(question, out.texts[0], sources, stats)

    def _retrieve(self, question: str, query: torch.Tensor, budget: Budget, top_k: int | None, min_score: float
                  ) -> tuple[list[float], list[ChunkRecord], torch.Tensor] | None:
        """(scores, chunks, memories) of the k documents to read; None when a compaction by another process
        renumbered the store's chunks meanwhile."""
        self.store.snapshot()
        vector_file = self.store.vector_file
        n = top_k or budget.max_docs
        centre = self.backend.retrieval_centre
        scores, ids = (fused_search(self.store, query, [question], n, centre) if self.retriever == "clara+bm25"
                       else search(self.store, query, n, centre))
        scores, ids = scores[0].tolist(), ids[0].tolist()
        if not ids:
            raise ClaraError(f"store {self.store.path} holds no documents")
        k = choose_k(budget, scores, top_k, min_score)
        fetched = self.store.fetch(ids[:k], vector_file)
        return None if fetched is None else (scores[:k], *fetched)


def format_answer_footer(answer: Answer) -> str:
    """Sources and stats as the CLI and the demo print them under a streamed answer."""
    lines = [f"   [{i}] {src['title'] or Path(src['source']).name}  ({Path(src['source']).name}, "
             f"score {src['score']:.3f})" for i, src in enumerate(answer.sources, 1)]
    s = answer.stats
    lines.append(f"   encode {s['query_encode_s'] * 1e3:.0f} ms | retrieval {s['retrieval_s'] * 1e3:.1f} ms | "
                 f"TTFT {s['ttft_s']:.2f} s | decode {s['decode_tokens_per_s']:.1f} tok/s | "
                 f"{s['context_positions']} positions ({s['reused_positions']} reused), {s['memory_positions']} memory "
                 f"({s['effective_compression']:.1f} text tokens per vector) | peak RSS {s['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
