"""The CLaRa model: one frozen base causal LM, three LoRA adapters, and the added special tokens.

    documents --(compressor adapter)--> memories [n_docs, n_mem, hidden]
    question  --(query adapter)-------> query memory [n_mem, hidden] --cosine--> top-k documents
    question + top-k memories --(generator adapter, memories spliced into inputs_embeds)--> answer

Shapes follow Hugging Face conventions: B batch, T sequence, H hidden, M = n_mem memory slots per document.
The added tokens (<MEM_i>, <AE>, <ENC>, <SEP>) are never looked up in the base embedding table: their
vectors live in `special_embeddings`, so the base weights stay untouched (and their fingerprint stable).
"""
from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from . import prompt as prompts
from .errors import ClaraError
from .prefix_cache import PrefixCache

ROLES = ("compressor", "query", "generator")
SWITCHING_ROPE = ("longrope", "dynamic")  # RoPE types whose frequencies change with the sequence length
MAX_COMPRESSION = 256


@dataclass
class ClaraConfig:
    base_model: str = "smollm2-135m"
    compression_rate: int = 16
    doc_max_length: int = 256
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: str | list[str] = "all-linear"
    extra: dict = field(default_factory=dict)  # free-form provenance (training recipe, import source)

    def __post_init__(self) -> None:
        if not 1 <= self.compression_rate <= MAX_COMPRESSION:
            raise ClaraError(f"compression rate must be in 1..{MAX_COMPRESSION}, got {self.compression_rate}")
        if self.doc_max_length < 1 or self.doc_max_length // self.compression_rate < 1:
            raise ClaraError(f"doc_max_length {self.doc_max_length} gives no memory slot at compression "
                             f"{self.compression_rate}")

    @property
    def n_mem(self) -> int:
        return self.doc_max_length // self.compression_rate

    def to_dict(self) -> dict:
        return asdict(self)


def _cut_cache(past, n: int) -> tuple[int, object | None]:
    """A transformers KV cache cut to its first n positions: (n, cache), or (0, None) where it cannot be."""
    extra = past.get_seq_length() - n
    try:
        if extra > 0:
            past.crop(-extra)  # a negative count removes that many in transformers 4.x and 5.x alike
    except RuntimeError:  # sliding-window layers past their window keep no history to cut back to
        return 0, None
    return n, past


@dataclass
class Generation:
    """What `generate` returns: one text per question, plus the timings the runtime reports."""
    texts: list[str]
    token_ids: list[list[int]]
    context_positions: list[int]  # prompt positions per row (memory slots count one each)
    prefill_s: float
    decode_s: float
    reused_positions: int = 0  # prompt positions whose KV came from a prefix cache (batch 1)
    decode_steps: int = 0  # forwards after the first token, each picking one (an EOS too): decode_s covers them

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


TokenCallback = Callable[[int, str], None]  # (row, text piece) for streaming, once per generated token


class TokenStream:
    """Each row's generated tokens, streamed to `on_token` as text pieces that join into the decoded answer so far.

    Why not decode token by token: byte-level BPE splits a character across tokens ("日" is two in SmolLM2's
    vocabulary) and SentencePiece drops a lone token's leading space; the answer so far decodes right. A token
    that ends inside a character streams "" until the character is whole, so callers still see every token."""

    def __init__(self, tokenizer, batch: int, on_token: TokenCallback | None) -> None:
        self.tokenizer, self.on_token = tokenizer, on_token
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self._shown = [0] * batch

    def push(self, row: int, token_id: int) -> None:
        self.tokens[row].append(token_id)
        if self.on_token is None:
            return
        text = self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)
        piece = "" if text.endswith("\ufffd") else text[self._shown[row]:]
        self._shown[row] += len(piece)
        self.on_token(row, piece)

    def answers(self) -> list[str]:
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in self.tokens]


def _tensor_digest(t: torch.Tensor) -> str:
    """Device- and dtype-stable digest of a weight: bf16-rounded values, so fp32/bf16/fp16 copies agree."""
    v = t.detach().to(torch.bfloat16).flatten()
    head_tail = torch.cat([v[:2048], v[-2048:]]).float().cpu().numpy().tobytes()
    return f"{tuple(t.shape)}|{v.double().sum().item():.5e}|{hashlib.sha256(head_tail).hexdigest()[:16]}"


def weights_fingerprint(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in named:
        digest.update(f"{name}={_tensor_digest(tensor)};".encode())
    return digest.hexdigest()[:32]


# Projections some families fuse into one linear (Phi-3): a recipe's q/k/v or gate/up names the fused module there.
FUSED_PROJECTIONS = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                     "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def lora_targets(causal_lm: nn.Module, targets: str | list[str]) -> str | list[str]:
    """The LoRA target module names for this base: each name as given where a module has it, else its fused
    projection; a name this base has neither way is an error (peft would adapt the rest without a word)."""
    if isinstance(targets, str):
        return targets
    names = {name.rsplit(".", 1)[-1] for name, _ in causal_lm.named_modules()}
    resolved: dict[str, None] = {}
    for target in targets:
        found = target if target in names else FUSED_PROJECTIONS.get(target)
        if found not in names:
            linears = sorted({n.rsplit(".", 1)[-1] for n, m in causal_lm.named_modules() if isinstance(m, nn.Linear)})
            raise ClaraError(f"LoRA target module {target!r} is not in this base model ({type(causal_lm).__name__}); "
                             f"its linear layers: {', '.join(linears)}")
        resolved[found] = None
    return list(resolved)


class ClaraModel(nn.Module):
    """Base LM + compressor / query / generator LoRA adapters + special-token embeddings.

    It is also the PyTorch backend: it implements `clara_edge.backend.Backend`.
    """

    name = "torch"

    def __init__(self, causal_lm: nn.Module, tokenizer, config: ClaraConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        base_named = [(n, p) for n, p in causal_lm.named_parameters()]
        self.base_fingerprint = weights_fingerprint(base_named)
        for p in causal_lm.parameters():
            p.requires_grad_(False)
        self.input_embeddings: nn.Embedding = causal_lm.get_input_embeddings()
        self.base_vocab = self.input_embeddings.num_embeddings

        torch.manual_seed(seed)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=lora_targets(causal_lm, config.target_modules), bias="none")
        self.lm = get_peft_model(causal_lm, lora, adapter_name=ROLES[0])
        for role in ROLES[1:]:
            self.lm.add_adapter(role, lora)
        self.trainable_roles: set[str] = set()
        # Subtracted from query and document memories before cosine when set (clara_edge.retrieval explains
        # why); the retrieval training stage sets it to the mean memory of its bank. [n_mem, H] fp32, CPU.
        self.retrieval_centre: torch.Tensor | None = None
        # The eos ids a checkpoint was trained with (recorded at save): generation stops on them too, so a
        # generator trained where the tokenizer named another eos still stops (clara_edge.base_models says why).
        self.trained_eos_ids: list[int] = []
        self._active: str | None = None
        self._activate(ROLES[0])

        self._add_special_tokens(seed)

    # ---------------------------------------------------------------- special tokens and embeddings
    def _add_special_tokens(self, seed: int) -> None:
        tokens = prompts.special_tokens(self.config.n_mem)
        self.tokenizer.add_tokens(tokens, special_tokens=True)
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        self.special_ids = dict(zip(tokens, ids))
        table_size = max(len(self.tokenizer), self.base_vocab, max(ids) + 1)
        id_to_special = torch.full((table_size,), -1, dtype=torch.long)
        id_to_special[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("id_to_special", id_to_special, persistent=False)
        self.mem_ids = torch.tensor(ids[: self.config.n_mem])
        # New rows start at the mean embedding plus small distinct noise, so MEM slots differ from the start.
        base = self.input_embeddings.weight.detach().float()
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(len(ids), base.shape[1], generator=gen) * base.std().item() * 0.5
        init = (base.mean(0, keepdim=True).cpu() + noise).to(base.dtype)
        self.special_embeddings = nn.Parameter(init.to(self.input_embeddings.weight))

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.embedding_dim

    @property
    def max_positions(self) -> int:
        """The base model's context window."""
        return int(getattr(self.lm.get_base_model().config, "max_position_embeddings", 2048))

    @property
    def sliding_window(self) -> int | None:
        """The window of positions the base attends through, where it is shorter than its context window."""
        cfg = self.lm.get_base_model().config
        window = getattr(cfg, "sliding_window", None)
        return window if window and getattr(cfg, "use_sliding_window", True) and window < self.max_positions else None

    @property
    def fixed_rope_positions(self) -> int:
        """The positions that fixed rotary frequencies (an export's graphs) serve as this model does: the context
        window, or for RoPE that switches frequencies past a length (longrope: Phi-3-128k, Phi-3.5; dynamic NTK)
        that length, below which the base runs its original ones."""
        cfg = self.lm.get_base_model().config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", rope.get("type")) not in SWITCHING_ROPE:
            return self.max_positions
        original = rope.get("original_max_position_embeddings") or getattr(cfg, "original_max_position_embeddings",
                                                                            None)
        return min(int(original or self.max_positions), self.max_positions)

    @property
    def device(self) -> torch.device:
        return self.input_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, T] -> embeddings [B, T, H]; added tokens read `special_embeddings`."""
        special = self.id_to_special[ids]
        is_special = special >= 0
        base_ids = torch.where(is_special | (ids >= self.base_vocab), 0, ids)
        emb = self.input_embeddings(base_ids)
        if bool(is_special.any()):
            rows = self.special_embeddings[special.clamp(min=0)].to(emb.dtype)
            emb = torch.where(is_special.unsqueeze(-1), rows, emb)
        return emb

    # ---------------------------------------------------------------- adapters
    def _activate(self, role: str | None) -> None:
        """Switch the active adapter without touching which adapters train (peft's set_adapter would)."""
        if role == self._active:
            return
        if role is not None and role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if role is not None:
            self.lm.set_adapter(role)
        self._active = role
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        for name, p in self.lm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(any(f".{r}." in name for r in self.trainable_roles))

    def set_trainable(self, roles: Sequence[str], special_embeddings: bool = False) -> None:
        """Choose which adapters (and whether the added-token embeddings) receive gradients."""
        unknown = set(roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown roles {sorted(unknown)}")
        self.trainable_roles = set(roles)
        self.special_embeddings.requires_grad_(special_embeddings)
        self._sync_requires_grad()

    def adapter_parameters(self, role: str) -> list[nn.Parameter]:
        return [p for n, p in self.lm.named_parameters() if "lora_" in n and f".{role}." in n]

    def copy_adapter(self, src: str, dst: str) -> None:
        """Initialise one adapter from another (stage 3 starts the query adapter from the compressor)."""
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                if "lora_" in name and f".{dst}." in name:
                    p.copy_(params[name.replace(f".{dst}.", f".{src}.")])

    def fingerprint(self, roles: Sequence[str] = ("compressor",), as_saved: torch.dtype | None = None) -> str:
        """What a memory store must match: base weights, rate, length, the given adapters, MEM embeddings
        (`as_saved`: as they will read once saved in that dtype, which a checkpoint records)."""
        named = [(n, p) for n, p in self.lm.named_parameters()
                 if "lora_" in n and any(f".{r}." in n for r in roles)]
        named.append(("special_embeddings", self.special_embeddings))
        if as_saved is not None:
            named = [(n, p.detach().to(as_saved)) for n, p in named]
        head = f"{self.base_fingerprint}|cr{self.config.compression_rate}|len{self.config.doc_max_length}|"
        return hashlib.sha256((head + weights_fingerprint(named)).encode()).hexdigest()[:32]

    # ---------------------------------------------------------------- compressor and query encoder
    def _special(self, token: str) -> int:
        return self.special_ids[token]

    def tokenize_documents(self, texts: Sequence[str]) -> list[list[int]]:
        """Wrap each text as <ENC> BOS text EOS <MEM0..MEMn-1>, text truncated to doc_max_length tokens."""
        tok = self.tokenizer
        body = tok([prompts.literal(tok, t) for t in texts], add_special_tokens=False, truncation=True,
                   max_length=self.config.doc_max_length)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        mem = self.mem_ids.tolist()
        return [[self._special("<ENC>")] + bos + ids + eos + mem for ids in body]

    def pad_left(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-pad id lists to [B, T] ids and a [B, T] attention mask, on the model's device."""
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
        return ids.to(self.device), mask.to(self.device)

    def encode_ids(self, role: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Wrapped ids [B, T] -> final-norm hidden states at the trailing MEM slots [B, M, H]."""
        hidden = self.hidden_states(role, self.embed(ids), mask)
        return hidden[:, -self.config.n_mem:]

    def hidden_states(self, role: str, inputs_embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states after the final norm, [B, T, H], with `role`'s adapter active.

        Position ids follow the attention mask, so a document's memory does not depend on its batch.
        """
        self._activate(role)
        decoder = getattr(self.lm.get_base_model(), self.lm.get_base_model().base_model_prefix)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions,
                       use_cache=False).last_hidden_state

    def _encode_texts(self, role: str, texts: Sequence[str], batch_size: int) -> torch.Tensor:
        if not texts:
            return torch.empty(0, self.config.n_mem, self.hidden_size, device=self.device, dtype=self.dtype)
        seqs = self.tokenize_documents(texts)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
        out = torch.empty(len(seqs), self.config.n_mem, self.hidden_size, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = self.pad_left([seqs[i] for i in idx])
                out[torch.tensor(idx, device=self.device)] = self.encode_ids(role, ids, mask)
        return out

    def compress(self, docs: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Documents -> memories [n_docs, n_mem, H] (compressor adapter)."""
        return self._encode_texts("compressor", docs, batch_size)

    def encode_query(self, questions: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Questions -> query memories [n_questions, n_mem, H] (query adapter, same wrapper as documents)."""
        return self._encode_texts("query", questions, batch_size)

    # ---------------------------------------------------------------- generator
    def prompt_ids(self, question: str, n_docs: int) -> list[int]:
        """The CLaRa generator prompt for `n_docs` memory blocks, as token ids (chat template applied)."""
        user = prompts.question_message(prompts.memory_background(n_docs, self.config.n_mem),
                                        prompts.literal(self.tokenizer, question))
        text = prompts.render_chat(self.tokenizer, user)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def splice(self, ids: torch.Tensor, memories: Sequence[torch.Tensor]) -> torch.Tensor:
        """Embed ids [B, T] and write row b's memories [k_b, M, H] over its MEM slots, in order."""
        emb = self.embed(ids)
        is_mem = torch.isin(ids, self.mem_ids.to(ids.device))
        rows = []
        for b, mem in enumerate(memories):
            slots = is_mem[b].nonzero().squeeze(-1)
            flat = mem.reshape(-1, self.hidden_size)
            if flat.shape[0] != slots.numel():
                raise ValueError(f"row {b}: prompt has {slots.numel()} MEM slots, memories fill {flat.shape[0]}")
            rows.append(emb[b].index_copy(0, slots, flat.to(emb)))
        return torch.stack(rows)

    def generation_inputs(self, questions: Sequence[str],
                          memories: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Questions and their memories -> left-padded inputs_embeds [B, T, H] and mask [B, T]."""
        if len(questions) != len(memories):
            raise ValueError("one memory tensor per question")
        ids, mask = self.pad_left([self.prompt_ids(q, m.shape[0]) for q, m in zip(questions, memories)])
        return self.splice(ids, memories), mask

    def eos_ids(self) -> list[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        gen_eos = getattr(self.lm.get_base_model().generation_config, "eos_token_id", None)
        ids.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        ids.update(self.trained_eos_ids)
        return sorted(ids)

    @torch.inference_mode()
    def generate(self, questions: Sequence[str], memories: Sequence[torch.Tensor], max_new_tokens: int = 64,
                 **sampling) -> Generation:
        """Answer each question from its documents' memories (generator adapter)."""
        embeds, mask = self.generation_inputs(questions, memories)
        return self.decode(embeds, mask, role="generator", max_new_tokens=max_new_tokens, **sampling)

    @torch.inference_mode()
    def decode(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, role: str | None, max_new_tokens: int = 64,
               do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
               on_token: TokenCallback | None = None, prefix_cache: PrefixCache | None = None) -> Generation:
        """Greedy or sampled decoding with a KV cache from left-padded embeddings [B, T, H].

        `role=None` runs the bare base LM (the text-RAG baseline and the distillation teacher).
        Stops per row at an EOS id or after `max_new_tokens`. `prefix_cache` (batch 1): reuse the KV of the
        positions this prompt shares with the previous one, and keep this prompt's KV for the next.
        """
        self._activate(role if role is not None else self._active)
        causal = self.lm.get_base_model()
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        eos_list = self.eos_ids() or [-1]
        eos = torch.tensor(eos_list, device=self.device)
        batch = inputs_embeds.shape[0]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        context = mask.sum(-1).tolist()
        stream = TokenStream(self.tokenizer, batch, on_token)
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        reuse, past, steps = 0, None, 0
        if prefix_cache is not None:
            reuse, past = prefix_cache.take(role, inputs_embeds)
            if past is not None:
                reuse, past = _cut_cache(past, reuse)
        start = time.perf_counter()
        with self._adapters_disabled_if(role is None):
            out = causal(inputs_embeds=inputs_embeds[:, reuse:], attention_mask=mask,
                         position_ids=positions[:, reuse:], past_key_values=past, use_cache=True, logits_to_keep=1)
            prefill_end = None
            for step in range(max_new_tokens):
                logits = out.logits[:, -1].float()
                nxt = self._pick(logits, do_sample, temperature, top_p, gen)
                picked = nxt.tolist()  # waits for the device, so the first token's time is real on CUDA too
                if prefill_end is None:
                    prefill_end = time.perf_counter()
                for row in (~finished).nonzero().squeeze(-1).tolist():
                    tid = picked[row]
                    if tid in eos_list:
                        continue
                    stream.push(row, tid)
                finished |= torch.isin(nxt, eos)
                if bool(finished.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                positions = positions[:, -1:] + 1
                out = causal(inputs_embeds=self.embed(nxt.unsqueeze(1)), attention_mask=mask,
                             position_ids=positions, past_key_values=out.past_key_values, use_cache=True)
                steps += 1
        end = time.perf_counter()
        if prefix_cache is not None:
            prefix_cache.keep(role, inputs_embeds, out.past_key_values)
        prefill_end = prefill_end or end
        return Generation(stream.answers(), stream.tokens, context, prefill_end - start, end - prefill_end, reuse,
                          steps)

    @contextmanager
    def _adapters_disabled_if(self, disabled: bool):
        if not disabled:
            yield
            return
        try:
            with self.lm.disable_adapter():
                yield
        finally:
            self._sync_requires_grad()  # peft re-enables grads of the active adapter only

    @staticmethod
    def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
              gen: torch.Generator | None) -> torch.Tensor:
        if not do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)

    # ---------------------------------------------------------------- text mode (baseline, teacher)
    def text_prompt_ids(self, question: str, docs: Sequence[tuple[str, str]]) -> list[int]:
        tok = self.tokenizer
        docs = [(prompts.literal(tok, title), prompts.literal(tok, text)) for title, text in docs]
        user = prompts.question_message(prompts.text_background(docs), prompts.literal(tok, question))
        return tok(prompts.render_chat(tok, user), add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate_text_rag(self, questions: Sequence[str], docs: Sequence[Sequence[tuple[str, str]]],
                          role: str | None = None, max_new_tokens: int = 64, **sampling) -> Generation:
        """The base LM reading its documents as full text (role=None: no adapter; the text-RAG baseline)."""
        ids, mask = self.pad_left([self.text_prompt_ids(q, d) for q, d in zip(questions, docs)])
        return self.decode(self.embed(ids), mask, role=role, max_new_tokens=max_new_tokens, **sampling)
