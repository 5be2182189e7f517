"""Training data for the CLaRa stages, built deterministically from the files in shared/data/train.

Text level (no model needed): `Sample`s, one per training example.
    SCP (stage 1)        one passage -> its QA pairs (`Question: q1\\nAnswer: a1\\n...`), the passage itself
                         (reconstruction) or its sentences restated one per line (a shuffled paraphrase);
                         each with an instruction drawn from a few templates.
    QA (stages 2, 3, text)  question + documents -> answer. Multi-hop rows (HotpotQA / MuSiQue format) keep
                         their gold documents and are filled up with their own distractors; the QA pairs of
                         the pretraining passages read their passage among other pretraining passages.
Token level (needs the model's tokenizer and prompt): `encode` turns a Sample into id lists for one stage.

A document is a (title, text) pair; the compressor reads `document_text(doc)` = "title: text", exactly as
in evaluation (clara_edge.datasets) and as the text-RAG prompt writes it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from clara_edge.datasets import Doc, EvalRow, document_text, load_eval_rows
from clara_edge.errors import ClaraError

QA_PAIR_INSTRUCTIONS = (
    "Write every question the background answers, each followed by its answer.",
    "List the questions and answers contained in the background.",
    "Generate question-answer pairs that cover the facts of the background.",
)
RECONSTRUCT_INSTRUCTIONS = (
    "Repeat the background word for word.",
    "Reconstruct the document given in the background exactly.",
    "Write out the full text of the background.",
)
RESTATE_INSTRUCTIONS = (
    "Restate each fact of the background on its own line.",
    "Paraphrase the background as a list of its statements.",
    "List the statements of the background, in any order, one per line.",
)
SCP_TASKS = ("qa_pairs", "reconstruct", "restate")
TARGET_MODES = ("gold", "teacher", "both")


@dataclass(frozen=True)
class Sample:
    task: str                      # qa_pairs | reconstruct | restate | paraphrase | answer
    prompt: str                    # the instruction (SCP) or the question
    docs: tuple[Doc, ...]          # SCP: one passage; answer: the documents read (or the candidates, stage 3)
    target: str = ""               # filled by `with_targets` for answer samples
    answers: tuple[str, ...] = ()  # gold answers
    gold: tuple[Doc, ...] = ()     # the documents that hold the answer (the retrieval stage's positives)

    def key(self) -> str:
        """Stable id of the input (question + documents), for the teacher-answer cache."""
        return hashlib.sha256(json.dumps([self.prompt, self.docs]).encode()).hexdigest()[:24]


@dataclass
class Sources:
    pretrain: list[dict] = field(default_factory=list)  # {"data_type", "question", "answers", "docs": [passage]}
    multihop: list[EvalRow] = field(default_factory=list)  # the eval row format (HotpotQA / MuSiQue train rows)

    def passages(self) -> list[Doc]:
        """Every distinct passage of the sources, in file order."""
        seen: dict[Doc, None] = {}
        for rec in self.pretrain:
            seen.update({("", d): None for d in rec["docs"]})
        for row in self.multihop:
            seen.update(dict.fromkeys(row.docs))
        return list(seen)


def _rng(seed: int, *parts) -> random.Random:
    return random.Random(":".join(map(str, (seed, *parts))))


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if limit is not None and len(rows) >= limit:
                    break
    return rows


def load_sources(data_dir: Path, pretrain: Sequence[str], multihop: Sequence[str],
                 limit: int | None = None) -> Sources:
    """Read the training files; refuses anything under an `eval` folder (never train on evaluation data)."""
    def path(name: str) -> Path:
        p = (data_dir / name).resolve()
        if "eval" in p.parts:
            raise ClaraError(f"refusing to train on {p}: it lies under an eval/ folder")
        if not p.is_file():
            raise ClaraError(f"training file not found: {p}")
        return p

    return Sources([r for n in pretrain for r in read_jsonl(path(n), limit)],
                   [r for n in multihop for r in load_eval_rows(path(n), limit)])


# ------------------------------------------------------------------------------------------ stage 1 (SCP)
def qa_pairs_text(questions: Sequence[str], answers: Sequence[str]) -> str:
    return "\n".join(f"Question: {q}\nAnswer: {a}" for q, a in zip(questions, answers))


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text) if s.strip()]


def scp_samples(sources: Sources, seed: int, tasks: Sequence[str] = SCP_TASKS,
                truncate: Callable[[str], str] = lambda t: t) -> list[Sample]:
    """SCP samples: QA pairs of each pretraining passage, and for every distinct passage either its
    reconstruction or its restatement (alternating by a seeded draw). `truncate` cuts a passage to what the
    compressor reads (doc_max_length tokens), so a reconstruction target never asks for unseen text."""
    unknown = set(tasks) - set(SCP_TASKS)
    if unknown:
        raise ClaraError(f"unknown SCP tasks {sorted(unknown)}; known: {', '.join(SCP_TASKS)}")
    out = []
    for i, rec in enumerate(sources.pretrain):
        doc = ("", rec["docs"][0])
        if rec.get("data_type", "qa") == "paraphrase" and rec.get("answers"):
            out.append(Sample("paraphrase", _rng(seed, "para", i).choice(RESTATE_INSTRUCTIONS), (doc,),
                              rec["answers"][0]))
        elif "qa_pairs" in tasks and rec.get("question"):
            out.append(Sample("qa_pairs", _rng(seed, "qa", i).choice(QA_PAIR_INSTRUCTIONS), (doc,),
                              qa_pairs_text(rec["question"], rec["answers"])))
    text_tasks = [t for t in ("reconstruct", "restate") if t in tasks]
    for i, doc in enumerate(sources.passages() if text_tasks else []):
        rng = _rng(seed, "passage", i)
        task = rng.choice(text_tasks)
        seen = truncate(document_text(doc))
        if task == "reconstruct":
            out.append(Sample(task, rng.choice(RECONSTRUCT_INSTRUCTIONS), (doc,), seen))
        else:
            parts = sentences(seen)
            rng.shuffle(parts)
            out.append(Sample(task, rng.choice(RESTATE_INSTRUCTIONS), (doc,), "\n".join(f"- {s}" for s in parts)))
    return out


# ------------------------------------------------------------------------------------------ QA (stages 2, 3, text)
def qa_samples(sources: Sources, seed: int, k: int, candidates: int | None = None,
               questions_per_passage: int | None = 2, multihop_repeat: int = 1,
               max_answer_words: int | None = None) -> list[Sample]:
    """Question + documents -> gold answers (targets are set later by `with_targets`).

    candidates=None (stages 2 and text): each sample reads k documents, gold ones first choice, shuffled.
    candidates=N (stage 3): a multi-hop row offers its gold documents and distractors up to N; a pretraining
    question its passage among N-1 other pretraining passages; the model picks k of them (rows with fewer
    than k documents are left out).
    max_answer_words: take only pretraining QA pairs whose answer is that short (many of their answers are whole
    sentences, the dev sets' are a few words); passages left with none give no question.
    questions_per_passage=None: every QA pair of a pretraining passage.
    """
    out = []
    n_docs = k if candidates is None else candidates
    for i, row in enumerate(sources.multihop):
        docs = list(row.docs)
        if candidates is not None and len(docs) < k:  # nothing to choose: the straight-through top-k needs k
            continue
        rng = _rng(seed, "multihop", i)
        gold = [docs[j] for j in row.pos_index]
        rest = [d for d in docs if d not in gold]
        rng.shuffle(rest)
        docs = (gold + rest)[:max(n_docs, len(gold))]
        rng.shuffle(docs)
        sample = Sample("answer", row.question, tuple(docs), answers=row.answers, gold=tuple(gold))
        out.extend([sample] * multihop_repeat)
    pool = [("", r["docs"][0]) for r in sources.pretrain]
    for i, rec in enumerate(sources.pretrain):
        rng = _rng(seed, "pretrain", i)
        pairs = [(q, a) for q, a in zip(rec.get("question", []), rec.get("answers", []))
                 if max_answer_words is None or len(a.split()) <= max_answer_words]
        rng.shuffle(pairs)
        for q, a in pairs[:questions_per_passage]:
            others = rng.sample([j for j in range(len(pool)) if j != i], min(n_docs - 1, len(pool) - 1))
            docs = [pool[i]] + [pool[j] for j in others]
            rng.shuffle(docs)
            out.append(Sample("answer", q, tuple(docs), answers=(a,), gold=(pool[i],)))
    return out


def subset(samples: list[Sample], n: int | None, seed: int) -> list[Sample]:
    """A seeded random subset of n samples, in their original order (all of them when n is None or larger)."""
    if n is None or n >= len(samples):
        return samples
    keep = sorted(_rng(seed, "subset").sample(range(len(samples)), n))
    return [samples[i] for i in keep]


def with_targets(samples: Sequence[Sample], mode: str, teacher: dict[str, str] | None = None) -> list[Sample]:
    """Set answer targets: the first gold answer, the teacher's answer, or both (two samples)."""
    if mode not in TARGET_MODES:
        raise ClaraError(f"unknown targets {mode!r}; use one of {', '.join(TARGET_MODES)}")
    out = []
    for s in samples:
        if s.task != "answer":
            out.append(s)
            continue
        if mode in ("gold", "both"):
            out.append(replace(s, target=s.answers[0]))
        if mode in ("teacher", "both"):
            answer = (teacher or {}).get(s.key(), "")
            if answer.strip():
                out.append(replace(s, target=answer.strip()))
    return out


# ------------------------------------------------------------------------------------------ token level
@dataclass
class Encoded:
    """One sample as token ids for one stage (plain lists: they travel through DDP's forward untouched)."""
    seq: list[int]                                     # generator input: prompt + target (+ EOS)
    n_prompt: int                                      # labels start here
    docs: list[list[int]] = field(default_factory=list)  # compressor inputs (stages 1-2)
    query: list[int] = field(default_factory=list)       # query-encoder input (stage 3)
    cands: list[int] = field(default_factory=list)       # candidate rows of the memory bank (stage 3, retrieval)
    gold: list[int] = field(default_factory=list)        # bank rows of the gold documents (retrieval stage)
    teacher_seq: list[int] = field(default_factory=list)  # text prompt + the same target (KL option)
    teacher_n_prompt: int = 0

    @property
    def size(self) -> int:
        return len(self.seq) + sum(map(len, self.docs)) + len(self.query) + len(self.teacher_seq)


def target_ids(model, text: str, max_tokens: int) -> list[int]:
    """Target tokens, cut at max_tokens; an EOS closes a target that was not cut (the model learns to stop)."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = model.tokenizer.eos_token_id if model.tokenizer.eos_token_id is not None else model.eos_ids()[0]
    return ids[:max_tokens] if len(ids) > max_tokens else ids + [eos]


def encode(model, sample: Sample, mode: str, max_target_tokens: int, k: int = 0,
           bank_index: dict[Doc, int] | None = None, with_teacher: bool = False) -> Encoded:
    """mode: "memory" (compress the sample's documents), "select" (stage 3: pick k of the candidates),
    "retrieve" (the query alone, scored against the bank: no generator input) or "text" (documents written
    out, no memory)."""
    if mode == "retrieve":
        return Encoded([], 0, query=model.tokenize_documents([sample.prompt])[0],
                       cands=[bank_index[d] for d in sample.docs], gold=[bank_index[d] for d in sample.gold])
    target = target_ids(model, sample.target, max_target_tokens)
    if mode == "text":
        prompt = model.text_prompt_ids(sample.prompt, sample.docs)
        return Encoded(prompt + target, len(prompt))
    if mode == "select":
        prompt = model.prompt_ids(sample.prompt, k)
        return Encoded(prompt + target, len(prompt), query=model.tokenize_documents([sample.prompt])[0],
                       cands=[bank_index[d] for d in sample.docs])
    prompt = model.prompt_ids(sample.prompt, len(sample.docs))
    enc = Encoded(prompt + target, len(prompt), docs=model.tokenize_documents([document_text(d) for d in sample.docs]))
    if with_teacher:
        text_prompt = model.text_prompt_ids(sample.prompt, sample.docs)
        enc.teacher_seq, enc.teacher_n_prompt = text_prompt + target, len(text_prompt)
    return enc
