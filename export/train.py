"""`clara-edge train`: CLaRa's three training stages (and the text-tuned baseline) from one recipe.

    stage "scp"       compressor pretraining: memory of one passage -> its QA pairs / reconstruction /
                      restatement; CE + mse_weight * MSE; trains compressor + generator + MEM embeddings.
    stage "instruct"  question + k compressed documents -> answer (gold and/or the teacher's answer, the
                      teacher being the base LM reading the documents as text: sequence-level distillation;
                      kl_weight > 0 adds token-level KL to the teacher's logits); CE + mse_weight * MSE.
    stage "e2e"       frozen compressor (candidate memories computed once and cached); the query adapter
                      (initialised from the compressor) scores N candidates, straight-through top-k picks k,
                      the generator answers; CE on the answer only.
    stage "retrieval" not in the paper: only the query adapter, on the gold documents' labels, by InfoNCE over
                      every memory of the bank (the frozen compressor's, as in stage 3; temperature `tau`). The
                      generator is not run and not changed, so answers from given documents stay as they were;
                      it is the cheap lever when stage 3's answer loss has not taught retrieval yet. With
                      `centre`, the model's retrieval centre becomes the bank's mean memory, subtracted from
                      both sides before cosine here and wherever the model retrieves (clara_edge.retrieval);
                      `candidate_weight` adds InfoNCE over each question's own candidates (hard negatives).
    stage "text"      the baseline for `--mode text-tuned`: only the generator adapter, reading the documents
                      as text (same data and targets as "instruct").

A recipe (export/recipes/NAME.json) lists the model, the data and the stages; each stage only states what
differs from STAGE_DEFAULTS. Runs go through accelerate: several processes with
`accelerate launch --multi_gpu --num_processes N -m clara_edge.cli train ...` (DDP; add `--device cpu`
for gloo on CPUs: `accelerate launch --cpu` starts a single process whatever --num_processes says).
Determinism: the batch of optimizer step s is a function of (seed, s), and the RNG is reseeded from
(seed, stage, step, micro-batch, rank) before every forward, so a resumed run repeats the uninterrupted one
exactly. Layout of a run directory:
    recipe.json                 the resolved recipe (a resume must match it)
    init.json                   with --init: the checkpoint the first stage started from (a resume must match it)
    teacher/                    cached teacher answers (JSONL, one file per process)
    N-<stage>/state/            resumable state: trained tensors, optimizer, step (removed when the stage ends)
    N-<stage>/model/            the stage's result (fp32 clara-edge checkpoint); the next stage starts from it
    bank-<compressor>/          stage 3 / retrieval: the candidates' memories (shared by stages with that compressor)
    N-<stage>/log.jsonl         per-step loss, lr, tokens/s
    final/                      the last stage's model as an fp16 checkpoint (what ships)
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from clara_edge.atomic import replace_dir, staging_dir
from clara_edge.checkpoint import (ADAPTERS_FILE, EMBEDDINGS_FILE, build_model, default_checkpoint, is_checkpoint,
                                  load_checkpoint, read_checkpoint_config, save_checkpoint)
from clara_edge.devices import resolve_device
from clara_edge.errors import ClaraError
from clara_edge.model import ROLES, ClaraConfig

from . import train_data as data
from .train_losses import (bank_nce, cosine_scores, kl_to_teacher, left_pad_labels, memory_mse,
                           straight_through_topk, target_logits)

RECIPES_DIR = Path(__file__).parent / "recipes"
REPO_ROOT = Path(__file__).resolve().parents[1]
STAGE_KINDS = ("scp", "instruct", "e2e", "retrieval", "text")
_QA_DATA = {"k": 5, "targets": "gold", "questions_per_passage": 2, "multihop_repeat": 4, "max_target_tokens": 64,
            "max_answer_words": None}
STAGE_DEFAULTS: dict[str, dict] = {
    "common": {"epochs": 1, "max_steps": None, "max_samples": None, "batch_size": 32, "micro_batch": 4, "lr": 1e-4,
               "schedule": "cosine", "min_lr_ratio": 0.1, "warmup_ratio": 0.03, "weight_decay": 0.0,
               "betas": [0.9, 0.95], "grad_clip": 1.0, "special_embeddings": False, "reset": [],
               "mse_weight": 0.0, "kl_weight": 0.0, "kl_temperature": 1.0},
    "scp": {"trainable": ["compressor", "generator"], "special_embeddings": True, "mse_weight": 0.1,
            "tasks": list(data.SCP_TASKS), "max_target_tokens": 320},
    "instruct": {"trainable": ["compressor", "generator"], "special_embeddings": True, "mse_weight": 0.1,
                 "reset": ["generator"], **_QA_DATA},
    "e2e": {"trainable": ["query", "generator"], "init_query_from": "compressor", "candidates": 10,
            "temperature": 0.02, "lr": 5e-6, "schedule": "constant", **_QA_DATA, "questions_per_passage": 1},
    "retrieval": {"trainable": ["query"], "candidates": 10, "tau": 0.05, "centre": False, "candidate_weight": 0.0,
                  **_QA_DATA, "questions_per_passage": 4, "multihop_repeat": 1},
    "text": {"trainable": ["generator"], **_QA_DATA},
}
BANK_STAGES = ("e2e", "retrieval")  # stages that read the frozen compressor's memories of their candidates
RECIPE_DEFAULTS = {
    "seed": 0, "mixed_precision": "no", "gradient_checkpointing": False, "save_every": 50,
    "model": {"base_model": "smollm2-135m", "compression_rate": 16, "doc_max_length": 256, "lora_r": 8,
              "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "data": {"dir": "../shared/data/train", "pretrain": ["clara_pretrain_sample1000.jsonl"],
             "multihop": ["hotpotqa_train100.jsonl", "musique_train100.jsonl"], "limit": None},
    "teacher": {"max_new_tokens": 64, "batch_size": 16},
}
# Stage fields that are counts (None: unset where the default is None), and rates that must be above 0 / at least 0.
COUNT_FIELDS = {"epochs", "max_steps", "max_samples", "batch_size", "micro_batch", "k", "questions_per_passage",
                "max_target_tokens", "candidates", "max_answer_words"}
POSITIVE_FIELDS = {"lr", "temperature", "tau", "kl_temperature", "grad_clip"}
NON_NEGATIVE_FIELDS = {"multihop_repeat", "weight_decay", "mse_weight", "kl_weight", "candidate_weight",
                       "warmup_ratio", "min_lr_ratio"}
# Overrides that name a recipe field by a short name (CLI options).
ALIASES = {"compression": "model.compression_rate", "base_model": "model.base_model", "data_dir": "data.dir"}


# ------------------------------------------------------------------------------------------ recipes
def recipe_path(recipe: str | Path) -> Path:
    """A bare name (no suffix, no separator) is export/recipes/NAME.json; anything else is a path."""
    text = str(recipe)
    path = RECIPES_DIR / f"{text}.json" if ("/" not in text and not text.endswith(".json")) else Path(text)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.json")))
        raise ClaraError(f"recipe {recipe!r} not found ({path}); built-in recipes: {known}")
    return path


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _set_dotted(node, dotted: str, value) -> None:
    """`a.b.c` = value; in a list, a number picks one element and `*` all ("stages.*.max_steps", "stages.0.lr")."""
    head, _, rest = dotted.partition(".")
    if isinstance(node, list):
        if head != "*" and not (head.isdigit() and int(head) < len(node)):
            raise ClaraError(f"--set {dotted}: {head!r} is not one of the {len(node)} entries (0-{len(node) - 1} or *)")
        keys = range(len(node)) if head == "*" else [int(head)]
    elif not isinstance(node, dict):
        raise ClaraError(f"--set: {dotted!r} goes below a value that has no fields")
    else:
        keys = [head]
        if rest:
            node.setdefault(head, {})
    for key in keys:
        if rest:
            _set_dotted(node[key], rest, value)
        else:
            node[key] = value


def load_recipe(recipe: str | Path, overrides: dict | None = None) -> dict:
    """Read a recipe (following `extends`), apply overrides (dotted keys or ALIASES; max_steps applies to
    every stage), and fill in the defaults: the result is complete and is what a run records."""
    path = recipe_path(recipe)
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ClaraError(f"recipe {path} is not readable JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ClaraError(f"recipe {path} must be a JSON object")
    name = raw.pop("name", path.stem)
    raw.pop("description", None)  # prose: editing it must not invalidate a run directory or a checkpoint's digest
    parent = raw.pop("extends", None)
    resolved = _merge(load_recipe(parent) if parent else RECIPE_DEFAULTS, raw)
    resolved["name"] = name
    for key, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(resolved, ALIASES.get(key, "stages.*.max_steps" if key == "max_steps" else key), value)
    resolved["stages"] = [_resolve_stage(i, stage) for i, stage in enumerate(resolved.get("stages") or [])]
    if not resolved["stages"]:
        raise ClaraError(f"recipe {recipe} has no stages")
    unknown = set(resolved) - set(RECIPE_DEFAULTS) - {"name", "stages", "teacher_cache"}
    if unknown:
        raise ClaraError(f"recipe {recipe}: unknown fields {sorted(unknown)}")
    return resolved


def _resolve_stage(i: int, stage: dict) -> dict:
    kind = stage.get("kind", stage.get("name"))
    if kind not in STAGE_KINDS:
        raise ClaraError(f"recipe stage {i}: unknown kind {kind!r}; kinds: {', '.join(STAGE_KINDS)}")
    defaults = _merge(STAGE_DEFAULTS["common"], STAGE_DEFAULTS[kind])
    unknown = set(stage) - set(defaults) - {"kind", "name"}
    if unknown:
        raise ClaraError(f"recipe stage {i} ({kind}): unknown fields {sorted(unknown)}")
    if stage.get("kl_weight") and kind != "instruct":
        raise ClaraError(f"recipe stage {i} ({kind}): kl_weight applies to the instruct stage only")
    resolved = {**_merge(defaults, stage), "kind": kind, "name": stage.get("name", kind)}
    for key, value in resolved.items():
        problem = _bad_value(key, value)
        if problem:
            raise ClaraError(f"recipe stage {i} ({kind}): {key} must be {problem}, got {value!r}")
    return resolved


def _bad_value(key: str, value) -> str | None:
    """What a stage field's value must be, when it is not (None when it is fine or not a number field)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if key in COUNT_FIELDS and value is not None and not (isinstance(value, int) and not isinstance(value, bool)
                                                          and value >= 1):
        return "a whole number of at least 1"
    if key in POSITIVE_FIELDS and not (number and value > 0):
        return "a number above 0"
    if key in NON_NEGATIVE_FIELDS and not (number and value >= 0):
        return "a number of at least 0"
    return None


def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _data_dir(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return REPO_ROOT / path


def _lr_at(stage: dict, step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio x lr (or constant)."""
    lr = stage["lr"]
    warm = int(stage["warmup_ratio"] * total) if stage["schedule"] == "cosine" else 0
    if step < warm:
        return lr * (step + 1) / warm
    if stage["schedule"] == "constant":
        return lr
    progress = (step - warm) / max(1, total - warm)
    floor = stage["min_lr_ratio"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _seed_for(*parts) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:7], "little")


# ------------------------------------------------------------------------------------------ the stage module
class StageModule(nn.Module):
    """What DDP wraps: forward(batch) -> {"loss", "ce", "mse", "kl", "tokens"} for one stage.

    A batch is a dict of plain id lists (from `collate`); `bank` holds the stage-3 candidate memories
    [n_passages, M, H] (a plain attribute: not a buffer, so DDP never broadcasts it).
    """

    def __init__(self, clara, stage: dict, bank: torch.Tensor | None = None) -> None:
        super().__init__()
        self.clara = clara
        self.stage = stage
        self.bank = bank

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        m, stage = self.clara, self.stage
        zero = torch.zeros((), device=m.device)
        mse, kl, tokens = zero, zero, 0
        memories = None
        if stage["kind"] == "retrieval":  # the query adapter alone, against the whole bank
            ids, mask = m.pad_left(batch["query"])
            nce = bank_nce(m.encode_ids("query", ids, mask), self.bank, batch["gold"], stage["tau"], m.retrieval_centre,
                           batch["cands"], stage["candidate_weight"])
            return {"loss": nce, "ce": zero, "mse": zero, "kl": zero,
                    "tokens": torch.tensor(float(mask.sum()), device=m.device)}
        if batch["docs"]:  # stages 1-2: compress the documents, with the compressor's side loss
            ids, mask = m.pad_left(batch["docs"])
            hidden = m.hidden_states("compressor", m.embed(ids), mask)
            tokens += int(mask.sum())
            memories = list(hidden[:, -m.config.n_mem:].split(batch["doc_counts"]))
            if stage["mse_weight"]:
                mse = memory_mse(hidden, mask, m.config.n_mem)
        elif batch["query"]:  # stage 3: the query adapter picks k cached memories
            ids, mask = m.pad_left(batch["query"])
            tokens += int(mask.sum())
            memories = list(self.select(m.encode_ids("query", ids, mask), batch["cands"]))
        seq, mask = m.pad_left(batch["seq"])
        labels = left_pad_labels(batch["seq"], batch["n_prompt"], m.device)
        embeds = m.splice(seq, memories) if memories is not None else m.embed(seq)
        tokens += int(mask.sum())
        logits, targets = target_logits(m, m.hidden_states("generator", embeds, mask), labels)
        ce = nn.functional.cross_entropy(logits, targets)
        if stage["kl_weight"]:
            teacher, n = self.teacher_logits(batch)
            kl, tokens = kl_to_teacher(logits, teacher, stage["kl_temperature"]), tokens + n
        loss = ce + stage["mse_weight"] * mse + stage["kl_weight"] * kl
        return {"loss": loss, "ce": ce.detach(), "mse": mse.detach(), "kl": kl.detach(),
                "tokens": torch.tensor(float(tokens), device=m.device)}

    def select(self, query: torch.Tensor, cands: list[list[int]]) -> torch.Tensor:
        """Query memories [B, M, H] + candidate rows -> the k chosen memories [B, k, M, H], best first."""
        n = max(len(c) for c in cands)
        index = torch.tensor([c + [0] * (n - len(c)) for c in cands], device=query.device)
        valid = torch.tensor([[j < len(c) for j in range(n)] for c in cands], device=query.device)
        pool = self.bank[index].to(query.dtype) * valid[..., None, None]  # [B, N, M, H]
        scores = cosine_scores(query, pool, valid, self.clara.retrieval_centre)
        weights = straight_through_topk(scores, self.stage["k"], self.stage["temperature"])
        return torch.einsum("bkn,bnmh->bkmh", weights.to(pool.dtype), pool)

    @torch.no_grad()
    def teacher_logits(self, batch: dict) -> tuple[torch.Tensor, int]:
        m = self.clara
        ids, mask = m.pad_left(batch["teacher_seq"])
        labels = left_pad_labels(batch["teacher_seq"], batch["teacher_n_prompt"], m.device)
        with base_lm(m):
            hidden = m.hidden_states("generator", m.embed(ids), mask)
        return target_logits(m, hidden, labels)[0], int(mask.sum())


@contextmanager
def base_lm(model):
    """The bare base LM (adapters off). peft's disable/enable toggles requires_grad, so re-sync it after."""
    try:
        with model.lm.disable_adapter():
            yield model
    finally:
        model.set_trainable(sorted(model.trainable_roles), model.special_embeddings.requires_grad)


def collate(items: list[data.Encoded]) -> dict:
    return {"seq": [e.seq for e in items], "n_prompt": [e.n_prompt for e in items],
            "docs": [d for e in items for d in e.docs], "doc_counts": [len(e.docs) for e in items],
            "query": [e.query for e in items if e.query], "cands": [e.cands for e in items if e.query],
            "gold": [e.gold for e in items if e.query],
            "teacher_seq": [e.teacher_seq for e in items if e.teacher_seq],
            "teacher_n_prompt": [e.teacher_n_prompt for e in items if e.teacher_seq]}


# ------------------------------------------------------------------------------------------ the run
class Run:
    """One invocation of a recipe in one run directory (one per process under accelerate)."""

    def __init__(self, recipe: dict, out_dir: Path, device: str | None = None, progress: bool = True,
                 stop_after: int | None = None, init: Path | None = None) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.recipe, self.out, self.init = recipe, Path(out_dir), init
        self.accel = Accelerator(cpu=device == "cpu", mixed_precision=recipe["mixed_precision"],
                                 kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
        self.main = self.accel.is_main_process
        if self.accel.device.type == "cuda":  # fp32 weights and optimizer state; matmuls on TF32 tensor cores
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.progress, self.stop_after, self.steps_done = progress, stop_after, 0
        self.seed = recipe["seed"]
        self.sources = None
        self.teacher_dir = Path(recipe.get("teacher_cache") or self.out / "teacher")

    # ---------------------------------------------------------------- helpers shared by all processes
    def barrier(self) -> None:
        self.accel.wait_for_everyone()

    def model_config(self) -> ClaraConfig:
        spec = self.recipe["model"]
        return ClaraConfig(**spec, extra={"recipe": self.recipe["name"], "recipe_sha": recipe_digest(self.recipe)})

    def load_sources(self) -> data.Sources:
        if self.sources is None:
            spec = self.recipe["data"]
            self.sources = data.load_sources(_data_dir(spec["dir"]), spec["pretrain"], spec["multihop"], spec["limit"])
        return self.sources

    def sharded(self, folder: Path, keys: list[str], compute, fmt: str) -> dict:
        """{key: value} for all keys, cached in `folder`: each process computes its share of the keys not
        cached yet (`compute(keys) -> {key: value}`) into its own part file, then every process reads all parts.
        All processes list the cache before any writes to it, so they agree on the shares."""
        save, load = PART_FORMATS[fmt]
        folder.mkdir(parents=True, exist_ok=True)

        def cached() -> dict:
            return {k: v for part in sorted(folder.glob(f"part-*.{fmt}")) for k, v in load(part).items()}

        have = cached()
        todo = [key for key in keys if key not in have]
        self.barrier()
        mine = todo[self.accel.process_index::self.accel.num_processes]
        if mine:
            save(folder / f"part-{time.time_ns()}-{self.accel.process_index}.{fmt}", compute(mine))
        self.barrier()
        return cached()

    # ---------------------------------------------------------------- data per stage
    def samples(self, stage: dict, model) -> list[data.Sample]:
        src, kind = self.load_sources(), stage["kind"]
        if kind == "scp":
            tok, limit = model.tokenizer, model.config.doc_max_length
            cut = lambda t: tok.decode(tok(t, add_special_tokens=False)["input_ids"][:limit])  # noqa: E731
            return data.subset(data.scp_samples(src, self.seed, stage["tasks"], truncate=cut),
                               stage["max_samples"], self.seed)
        samples = data.qa_samples(src, self.seed, stage["k"], stage.get("candidates") if kind in BANK_STAGES else None,
                                  stage["questions_per_passage"], stage["multihop_repeat"], stage["max_answer_words"])
        samples = data.subset(samples, stage["max_samples"], self.seed)
        teacher = self.teacher_answers(model, samples) if stage["targets"] != "gold" else {}
        return data.with_targets(samples, stage["targets"], teacher)

    def teacher_answers(self, model, samples: list[data.Sample]) -> dict[str, str]:
        """The base LM reading each sample's documents as text, greedy; cached as JSONL, computed once."""
        spec = self.recipe["teacher"]
        unique = {s.key(): s for s in samples}

        def compute(keys):
            rows = sorted((unique[k] for k in keys), key=lambda s: sum(len(t) for _, t in s.docs))
            out = {}
            for start in self.bar_range(0, len(rows), spec["batch_size"], "teacher answers"):
                batch = rows[start:start + spec["batch_size"]]
                gen = model.generate_text_rag([s.prompt for s in batch], [s.docs for s in batch],
                                              role=None, max_new_tokens=spec["max_new_tokens"])
                out.update({s.key(): text for s, text in zip(batch, gen.texts)})
            return out

        folder = self.teacher_dir / f"{model.base_fingerprint[:12]}-t{spec['max_new_tokens']}"
        return self.sharded(folder, list(unique), compute, "jsonl")

    def memory_bank(self, model, samples: list[data.Sample]) -> tuple[torch.Tensor, dict]:
        """Every candidate's memory from the frozen compressor, computed once (and kept on disk, per compressor)."""
        passages = list(dict.fromkeys(d for s in samples for d in s.docs))
        keys = [hashlib.sha256(data.document_text(d).encode()).hexdigest()[:24] for d in passages]
        model.eval()

        def compute(todo):
            texts = {k: data.document_text(d) for k, d in zip(keys, passages)}
            mem = model.compress([texts[k] for k in todo], batch_size=16)
            return {k: mem[i].float().cpu().contiguous() for i, k in enumerate(todo)}

        have = self.sharded(self.out / f"bank-{model.fingerprint()[:12]}", keys, compute, "safetensors")
        bank = torch.stack([have[k] for k in keys]).to(model.device)
        return bank, {d: i for i, d in enumerate(passages)}

    def bar_range(self, start: int, stop: int, step: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(range(start, stop, step), desc=desc, disable=not (self.main and self.progress), leave=False)

    # ---------------------------------------------------------------- one stage
    def run_stage(self, index: int, stage: dict, previous: Path | None) -> Path | None:
        stage_dir = self.out / f"{index + 1}-{stage['name']}"
        done = stage_dir / "model"
        if is_checkpoint(done):
            return done
        stage_dir.mkdir(parents=True, exist_ok=True)
        device = str(self.accel.device)
        if previous is not None:
            model = load_checkpoint(previous, device, "fp32")
        elif self.init is not None:
            model = self.initial_checkpoint(device)
        else:
            model = build_model(self.model_config(), device, "fp32", seed=self.seed)
        samples = self.samples(stage, model)
        bank, bank_index = self.memory_bank(model, samples) if stage["kind"] in BANK_STAGES else (None, None)
        if stage.get("centre"):
            model.retrieval_centre = bank.mean(0).cpu()
        mode = {"e2e": "select", "retrieval": "retrieve", "text": "text"}.get(stage["kind"], "memory")
        encoded = [data.encode(model, s, mode, stage["max_target_tokens"], stage.get("k", 0), bank_index,
                               with_teacher=bool(stage["kl_weight"])) for s in samples]
        self.prepare_adapters(model, index, stage)
        state = stage_dir / "state"
        start = self.load_state(model, state) if state.is_dir() else 0
        optimizer = torch.optim.AdamW(self.trained(model), lr=stage["lr"], betas=tuple(stage["betas"]),
                                      weight_decay=stage["weight_decay"])
        if start:
            optimizer.load_state_dict(torch.load(state / "optimizer.pt", map_location=device, weights_only=True))
        module, optimizer = self.accel.prepare(StageModule(model, stage, bank), optimizer)
        if start and self.accel.scaler is not None and (state / "scaler.pt").is_file():
            self.accel.scaler.load_state_dict(torch.load(state / "scaler.pt", weights_only=True))
        finished = self.loop(index, stage, stage_dir, module, optimizer, encoded, start)
        if finished and self.main:
            save_checkpoint(model, done, dtype=torch.float32)
            shutil.rmtree(state, ignore_errors=True)
        self.accel.free_memory()
        self.barrier()
        model.eval()
        return done if finished else None

    def initial_checkpoint(self, device: str):
        """The `init` checkpoint, on the recipe's base model; its model fields must equal the recipe's."""
        spec = self.recipe["model"]
        model = load_checkpoint(self.init, device, "fp32", base=spec["base_model"])
        have = dataclasses.asdict(model.config)
        differ = [f"{k} {have.get(k)!r} (recipe: {v!r})" for k, v in spec.items()
                  if k != "base_model" and have.get(k) != v]
        if differ:
            raise ClaraError(f"--init {self.init} does not fit recipe {self.recipe['name']}: " + "; ".join(differ))
        return model

    def prepare_adapters(self, model, index: int, stage: dict) -> None:
        torch.manual_seed(_seed_for(self.seed, "init", index))
        from peft.tuners.lora import LoraLayer
        for role in stage["reset"]:
            for layer in model.lm.modules():
                if isinstance(layer, LoraLayer) and role in layer.lora_A:
                    layer.reset_lora_parameters(role, True)
        if stage.get("init_query_from"):
            model.copy_adapter(stage["init_query_from"], "query")
        unknown = set(stage["trainable"]) - set(ROLES)
        if unknown:
            raise ClaraError(f"stage {stage['name']}: unknown trainable roles {sorted(unknown)}")
        model.set_trainable(stage["trainable"], special_embeddings=stage["special_embeddings"])
        if self.recipe["gradient_checkpointing"]:  # recompute layer activations in backward: far less memory
            model.lm.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})
        model.train()

    @staticmethod
    def trained(model) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    @staticmethod
    def trained_state(model) -> dict[str, torch.Tensor]:
        return {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}

    def load_state(self, model, state: Path) -> int:
        from safetensors.torch import load_file
        meta = json.loads((state / "meta.json").read_text())
        tensors = load_file(state / "trained.safetensors")
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
        return int(meta["step"])

    def save_state(self, model, optimizer, state: Path, step: int) -> None:
        """Atomically: trained tensors (fp32), optimizer state, step. Main process only."""
        from safetensors.torch import save_file
        if not self.main:
            return
        tmp = staging_dir(state)
        save_file(self.trained_state(model), tmp / "trained.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if self.accel.scaler is not None:  # fp16 mixed precision: a resumed run keeps its loss scale
            torch.save(self.accel.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "recipe_sha": recipe_digest(self.recipe)}) + "\n")
        replace_dir(tmp, state)

    def batch_indices(self, n: int, global_batch: int, step: int, index: int) -> list[int]:
        """This process's share of optimizer step `step`'s global batch: epoch-wise seeded permutations."""
        per_epoch = n // global_batch
        epoch, offset = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed_for(self.seed, "order", index, epoch)))
        batch = perm[offset * global_batch:(offset + 1) * global_batch].tolist()
        share = global_batch // self.accel.num_processes
        return batch[self.accel.process_index * share:(self.accel.process_index + 1) * share]

    def loop(self, index, stage, stage_dir, module, optimizer, encoded, start) -> bool:
        from tqdm.auto import tqdm
        accel, model = self.accel, self.accel.unwrap_model(module).clara
        gb, procs = stage["batch_size"], accel.num_processes
        if gb % procs:
            raise ClaraError(f"stage {stage['name']}: batch_size {gb} is not divisible by {procs} processes")
        if len(encoded) < gb:
            raise ClaraError(f"stage {stage['name']}: {len(encoded)} samples, fewer than one batch of {gb}")
        total = stage["max_steps"] if stage["max_steps"] is not None else stage["epochs"] * (len(encoded) // gb)
        params = self.trained(model)
        log = _open_log(stage_dir / "log.jsonl", start) if self.main else None
        bar = tqdm(total=total, initial=start, desc=f"{index + 1}/{len(self.recipe['stages'])} {stage['name']}",
                   unit="step", disable=not (self.main and self.progress), dynamic_ncols=True)
        t0, seen_tokens, step, updating = time.perf_counter(), 0.0, start, False
        try:
            while step < total:
                if self.stop_after is not None and self.steps_done >= self.stop_after:
                    if step > start:
                        self.save_state(model, optimizer, stage_dir / "state", step)
                    return False
                lr = _lr_at(stage, step, total)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                mine = sorted(self.batch_indices(len(encoded), gb, step, index), key=lambda i: encoded[i].size)
                micro = [mine[i:i + stage["micro_batch"]] for i in range(0, len(mine), stage["micro_batch"])]
                sums = torch.zeros(5, device=accel.device)
                for j, chunk in enumerate(micro):
                    torch.manual_seed(_seed_for(self.seed, "step", index, step, j, accel.process_index))
                    with accel.no_sync(module) if j < len(micro) - 1 else nullcontext():
                        out = module(collate([encoded[i] for i in chunk]))
                        accel.backward(out["loss"] * (len(chunk) / len(mine)))
                    share = len(chunk) / len(mine)
                    sums += torch.stack([out["loss"].detach() * share, out["ce"] * share, out["mse"] * share,
                                         out["kl"] * share, out["tokens"]])
                updating = True
                if stage["grad_clip"]:
                    accel.clip_grad_norm_(params, stage["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step, self.steps_done, updating = step + 1, self.steps_done + 1, False
                sums = accel.reduce(sums, "sum")
                seen_tokens += float(sums[4])
                stats = {"step": step, "loss": float(sums[0]) / procs, "ce": float(sums[1]) / procs,
                         "mse": float(sums[2]) / procs, "kl": float(sums[3]) / procs, "lr": lr,
                         "tokens": int(sums[4]), "tok_s": seen_tokens / (time.perf_counter() - t0)}
                if log:
                    log.write(json.dumps(stats) + "\n")
                    log.flush()
                bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tok_s']:.0f}", lr=f"{lr:.1e}")
                bar.update(1)
                if self.recipe["save_every"] and step % self.recipe["save_every"] == 0 and step < total:
                    self.save_state(model, optimizer, stage_dir / "state", step)
        except KeyboardInterrupt:
            if not updating and step > start:
                self.save_state(model, optimizer, stage_dir / "state", step)
            raise
        finally:
            bar.close()
            if log:
                log.close()
        return True

    # ---------------------------------------------------------------- all stages
    def __call__(self) -> Path | None:
        self.out.mkdir(parents=True, exist_ok=True)
        previous = None
        for index, stage in enumerate(self.recipe["stages"]):
            previous = self.run_stage(index, stage, previous)
            if previous is None:
                return None
        final = self.out / "final"
        if self.main:
            model = load_checkpoint(previous, "cpu", "fp32")
            cr = model.config.compression_rate
            command = f"clara-edge train --recipe {self.recipe['name']} --compression {cr}"
            extra = {k: v for k, v in model.config.extra.items() if k != "init"}
            if self.init is not None:  # the chain of runs that made these weights
                command += f" --init {self.init}"
                extra["init"] = {**init_record(self.init), "from": model.config.extra.get("init")}
            model.config.extra = {**extra, "recipe": self.recipe["name"], "recipe_sha": recipe_digest(self.recipe),
                                  "stages": [s["name"] for s in self.recipe["stages"]], "command": command}
            save_checkpoint(model, final, dtype=torch.float16)
        self.barrier()
        return final


def _open_log(path: Path, start: int):
    """The stage's log for appending, without its rows after `start`: a run killed after its last saved state
    logged steps that the resumed run takes again (and maybe half a line)."""
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= start:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # the line the kill cut short
        _replace_text(path, "".join(kept))
    return open(path, "a")


def _replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a sibling file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_jsonl(path: Path, rows: dict[str, str]) -> None:
    _replace_text(path, "".join(json.dumps({"key": k, "answer": v}) + "\n" for k, v in rows.items()))


def _load_jsonl(path: Path) -> dict[str, str]:
    return {row["key"]: row["answer"] for row in data.read_jsonl(path)}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


PART_FORMATS = {"jsonl": (_save_jsonl, _load_jsonl), "safetensors": (_save_tensors, _load_tensors)}


def init_record(path: Path) -> dict:
    """What identifies an `init` checkpoint: where it was, the recipe that made it, its weights' sha256."""
    extra = read_checkpoint_config(path)["config"].get("extra") or {}
    digest = hashlib.sha256()
    for name in (ADAPTERS_FILE, EMBEDDINGS_FILE):
        digest.update((path / name).read_bytes())
    return {"path": str(path), "recipe": extra.get("recipe"), "recipe_sha": extra.get("recipe_sha"),
            "weights_sha256": digest.hexdigest()[:32]}


def _check_run_dir(run: Run, resume: bool) -> None:
    """A run directory belongs to one resolved recipe and one `init` checkpoint; resume=False starts it over
    (keeping teacher answers). Every process reads before the main process writes, so all of them agree."""
    out, record, recipe = run.out, run.out / "recipe.json", json.loads(json.dumps(run.recipe))
    init_file = out / "init.json"
    init = None if run.init is None else {k: v for k, v in init_record(run.init).items() if k != "path"}
    if out.exists() and (not out.is_dir() or (not record.is_file() and any(out.iterdir()))):
        # never train into (nor, with --no-resume, empty) a folder that holds something else, a store say
        raise ClaraError(f"{out} exists and is not a training run directory: choose an empty or new --out")
    if resume and record.is_file():
        previous = json.loads(record.read_text())
        if previous != recipe:
            changed = sorted(k for k in set(previous) | set(recipe) if previous.get(k) != recipe.get(k))
            raise ClaraError(f"{out} holds a run of a different recipe (differs in {', '.join(changed)}): "
                             "use another output directory, or --no-resume to start it over")
        if (json.loads(init_file.read_text()) if init_file.is_file() else None) != init:
            raise ClaraError(f"{out} holds a run started from a different --init checkpoint: "
                             "use another output directory, or --no-resume to start it over")
    run.barrier()
    if run.main:
        if not resume and out.is_dir():
            for child in out.iterdir():
                if child.name != "teacher":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(recipe, indent=2) + "\n")
        if init is not None:
            init_file.write_text(json.dumps(init, indent=2) + "\n")
        elif init_file.exists():
            init_file.unlink()
    run.barrier()


def train(recipe: str | Path, out_dir: Path, resume: bool = True, overrides: dict | None = None, *,
          device: str | None = None, stop_after: int | None = None, progress: bool = True,
          init: str | Path | None = None) -> Path | None:
    """Run a recipe into `out_dir` and return its final (fp16) checkpoint directory.

    `overrides`: {"compression": 64, "max_steps": 20, "model.lora_r": 4, "stages.0.lr": 3e-4, ...} (dotted
    recipe keys or ALIASES; "device" is taken as the device). `resume`: continue from what `out_dir` holds
    (finished stages are skipped, an interrupted one continues from its last saved step). `stop_after`:
    stop (resumably) after that many optimizer steps of this invocation; returns None then. `init`: a
    clara-edge checkpoint (or "default": the shipped one at the recipe's rate) the first stage starts from
    instead of fresh adapters, so a recipe can continue a trained model (e.g. a longer retrieval stage).
    """
    overrides = dict(overrides or {})
    device = overrides.pop("device", None) or device
    if device:
        resolve_device(device)  # accelerate would fall back to the CPU without a word
    resolved = load_recipe(recipe, overrides)
    if init is not None:
        init = default_checkpoint(resolved["model"]["compression_rate"]) if str(init) == "default" else Path(init)
        if not is_checkpoint(init):
            raise ClaraError(f"--init {init}: not a clara-edge checkpoint directory")
    run = Run(resolved, Path(out_dir), device=device, progress=progress, stop_after=stop_after, init=init)
    _check_run_dir(run, resume)
    return run()


# ------------------------------------------------------------------------------------------ command line
