"""Prompts: the CLaRa generator prompt, its text-RAG twin, rendered through the base model's chat template."""
from __future__ import annotations

import functools
import re
from collections.abc import Sequence

SYSTEM_PROMPT = ("You are a helpful assistant. Your task is to extract relevant information from provided "
                 "documents and to answer to questions as briefly as possible.")


def mem_tokens(n_mem: int) -> list[str]:
    return [f"<MEM{i}>" for i in range(n_mem)]


def special_tokens(n_mem: int) -> list[str]:
    """The added tokens, in CLaRa's order: MEM0..MEM{n-1}, AE, ENC, SEP."""
    return mem_tokens(n_mem) + ["<AE>", "<ENC>", "<SEP>"]


# Inserted after the first character of a control-token string in user text (U+2060, invisible when shown).
WORD_JOINER = "\u2060"


def literal(tokenizer, text: str) -> str:
    """User text (a question, a document) as the tokenizer must read it: as words, never as control tokens.

    A question quoting `<MEM0>` would otherwise become a memory slot (and leave the prompt one memory short),
    and a document quoting `<|im_end|>` would end the chat turn; each such string gets a word joiner after its
    first character, so it tokenizes as the characters it shows.
    """
    pattern = _control_tokens(tuple(t.content for t in tokenizer.added_tokens_decoder.values() if t.special))
    if pattern is None:
        return text
    return pattern.sub(lambda m: m[0][0] + WORD_JOINER + m[0][1:], text)


@functools.lru_cache(maxsize=16)
def _control_tokens(tokens: tuple[str, ...]) -> re.Pattern | None:
    tokens = sorted((t for t in tokens if len(t) > 1), key=len, reverse=True)  # longest first: <MEM10> before <MEM1>
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def memory_background(n_docs: int, n_mem: int) -> str:
    """`Background:` followed by one block of MEM slots and a SEP per document."""
    return "Background:\n" + ("".join(mem_tokens(n_mem)) + "<SEP>") * n_docs


def document_text(doc: tuple[str, str]) -> str:
    """The one string form of a (title, text) document: what text mode shows, the compressor reads and
    BM25 indexes."""
    title, text = doc
    return f"{title}: {text}" if title else text


def text_background(docs: Sequence[tuple[str, str]]) -> str:
    """The text-RAG twin of `memory_background`: the same frame with the documents written out."""
    return "Background:\n" + "\n".join(document_text(d) for d in docs)


def question_message(background: str, question: str) -> str:
    return f"{background}\n\nQuestion:{question}"


def render_chat(tokenizer, user: str, system: str | None = SYSTEM_PROMPT, answer_prefix: str = "") -> str:
    """Render system + user through the tokenizer's chat template, ready for the assistant's answer.

    Templates that reject a system role (Mistral's) get the system text folded into the user turn, which
    is how the released CLaRa prompt reads; tokenizers without a template get a plain frame.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        head = f"{system}\n\n" if system else ""
        return f"{head}{user}\nAnswer:{answer_prefix}"
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # jinja raises TemplateError for an unsupported system role
        merged = f"{system}\n\n{user}" if system else user
        text = tokenizer.apply_chat_template([{"role": "user", "content": merged}], tokenize=False,
                                             add_generation_prompt=True)
    return text + answer_prefix
