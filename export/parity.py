"""The parity gate: how far an export (ONNX / Core ML) is from the fp32 torch model it came from.

`check_export` reports
    graphs           per graph, max-abs and cosine error against torch on identical inputs: compressor and
                     query memories, generator logits over prefill and teacher-forced KV-cache decode steps;
                     "retrieval": the question-document cosine scores, which the retrieval centre moves too
    same_centre      whether the export carries the torch model's retrieval centre (or neither has one)
    retrieval_agreement  share of the questions below whose top-scored document (among all their documents) is
                     the same for the export as for torch
    token_agreement  greedy-token agreement (0..1) on a fixed question set, plus the first AGREEMENT_DEV_ROWS
                     dev questions (gold documents) when a dev file is given, teacher-forced: the export runs its
                     whole pipeline (its compressor, embedding table and generator) and at every step predicts
                     the next token of torch's greedy answer (its EOS included); one early flip cannot cascade.
                     `token_steps` counts the tokens: the fixed set alone gives ~55, where one flipped token
                     moves agreement by ~2 points, too coarse for a 0.95 gate
    sequence_match   share of questions whose free-running greedy answers are identical
    f1_torch, f1_export, f1_delta   token F1 (0-100) on `n_dev` dev questions with their gold documents as
                     memories (each backend compresses them itself); delta = export - torch
    f1_delta_se, f1_rows_changed    the delta's standard error over the paired questions, and how many
                     questions' F1 changed at all: whether a delta is signal or a handful of flipped answers
    size_mb, peak_rss_mb, tokens_per_s, prefill_s   the export on disk; a fresh process's peak RSS and batch-1
                     decode speed on one CPU thread (64 forced tokens after a warm-up)
    targets, passed  same_centre, retrieval_agreement >= 0.9, token_agreement >= 0.95 and |f1_delta| <= 0.5
                     (fp32 / fp16 / int8); retrieval_agreement >= 0.9 and |f1_delta| <= 1.5 (int4)
`check_memory_quant` applies the same gate to a memory store's int8 (or int4) vectors against fp16 ones, and
`check_bnb` to bitsandbytes int8 / nf4 base weights (torch backend) against fp32.
"""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clara_edge.backend import open_backend
from clara_edge.errors import ClaraError
from clara_edge.model import ROLES, ClaraModel
from clara_edge.reports import report_path, write_report
from clara_edge.retrieval import cosine_scores
from clara_edge.runtime import peak_rss_mb

# (question, documents): a fixed set, short enough for any model's context
QUESTIONS: list[tuple[str, list[str]]] = [
    ("Where is the Eiffel Tower?", ["The Eiffel Tower is a wrought-iron lattice tower in Paris, France."]),
    ("Who wrote Hamlet?", ["Hamlet is a tragedy written by William Shakespeare around 1600."]),
    ("At what temperature does water boil at sea level?",
     ["At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit)."]),
    ("What is the highest mountain above sea level?",
     ["Mount Everest, on the border of Nepal and China, is the highest mountain above sea level.",
      "K2 is the second-highest mountain on Earth."]),
    ("When did the first Nobel Prize in Physics get awarded?",
     ["The first Nobel Prize in Physics was awarded in 1901 to Wilhelm Conrad Roentgen."]),
    ("What is the capital of Japan?", ["Tokyo is the capital and most populous city of Japan."]),
    ("Which planet is known as the Red Planet?",
     ["Mars is often called the Red Planet because of the iron oxide on its surface."]),
    ("Who painted the Mona Lisa?",
     ["The Mona Lisa is a half-length portrait painted by Leonardo da Vinci.",
      "It hangs in the Louvre in Paris."]),
]
# quant -> (min token agreement, max |f1_delta|); the issue sets no agreement target for int4
TARGETS = {"fp32": (0.95, 0.5), "fp16": (0.95, 0.5), "int8": (0.95, 0.5), "int4": (None, 1.5)}
# min share of questions whose top document the export ranks first too, at every quant: int4 of the shipped CR16
# gives 0.966 over 57 questions (7 fixed + 50 NQ dev rows); a query graph that ranks at random gives ~1/n_docs
RETRIEVAL_AGREEMENT_MIN = 0.9
PROBE_TOKENS = 64
AGREEMENT_DEV_ROWS = 50


def agreement_questions(dev_file: str | Path | None, n_dev: int,
                        fixed: Sequence[tuple[str, Sequence[str]]] = QUESTIONS) -> list[tuple[str, list[str]]]:
    """The fixed questions, then the first min(n_dev, AGREEMENT_DEV_ROWS) dev rows that name gold documents."""
    from clara_edge.datasets import document_text, load_eval_rows

    rows = load_eval_rows(dev_file, limit=min(n_dev, AGREEMENT_DEV_ROWS)) if dev_file else []
    dev = [(r.question, [document_text(r.docs[i]) for i in r.pos_index]) for r in rows if r.pos_index]
    return [*((q, list(ds)) for q, ds in fixed), *dev]


# ------------------------------------------------------------------------------------------ numerics
def tensor_error(ref, got) -> dict:
    """max-abs and cosine (per item over its flattened values: mean and min) of `got` against `ref`."""
    a, b = _float64_rows(ref), _float64_rows(got)
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return {"max_abs": float((a - b).abs().max()), "cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def _float64_rows(x) -> torch.Tensor:
    """[n, ...] numpy array or tensor (any device) -> float64 CPU tensor [n, -1]."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu", torch.float64)
    else:
        t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    return t.reshape(len(t), -1)


def _merge_errors(parts: list[dict]) -> dict:
    if not parts:
        return {}
    return {"max_abs": max(p["max_abs"] for p in parts), "cosine": float(np.mean([p["cosine"] for p in parts])),
            "cosine_min": min(p["cosine_min"] for p in parts)}


def _targets(tokens: list[int], eos: Sequence[int], max_new_tokens: int) -> list[int]:
    """What the model predicted at each step: its tokens, then the EOS that stopped it (if one did)."""
    return tokens + [eos[0]] if len(tokens) < max_new_tokens and eos else list(tokens)


@torch.inference_mode()
def torch_forced_logits(model: ClaraModel, embeds: torch.Tensor, mask: torch.Tensor, targets: list[int]) -> np.ndarray:
    """Torch generator logits [n, V] at each step of a teacher-forced answer (one full forward, B = 1)."""
    model._activate("generator")
    if len(targets) > 1:
        embeds = torch.cat([embeds, model.embed(torch.tensor([targets[:-1]], device=embeds.device))], dim=1)
        mask = torch.cat([mask, torch.ones(1, len(targets) - 1, dtype=mask.dtype, device=mask.device)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model.lm.get_base_model()(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                    use_cache=False, logits_to_keep=len(targets))
    return out.logits[0].float().cpu().numpy()


def export_forced_logits(backend, embeds: torch.Tensor, mask: torch.Tensor, targets: list[int]) -> np.ndarray:
    """The export's generator logits [n, V], stepping its own KV cache through a teacher-forced answer."""
    mask_np = mask.numpy().astype(np.int64)
    positions = np.clip(mask_np.cumsum(-1) - 1, 0, None)
    logits, state = backend._generator_step(embeds.detach().float().numpy(), mask_np, positions,
                                            backend._generator_state(1))
    rows = [logits[0]]
    for tid in targets[:-1]:
        mask_np = np.concatenate([mask_np, np.ones((1, 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, state = backend._generator_step(backend.embed(torch.tensor([[tid]])).numpy(), mask_np, positions, state)
        rows.append(logits[0])
    return np.stack(rows)


# ------------------------------------------------------------------------------------------ reference
def reference_for(manifest: dict, reference_model: ClaraModel | None = None) -> ClaraModel:
    """The fp32 torch model an export came from: `reference_model`, else its recorded source, else the default
    model of its config (the shipped trained one where it exists); its fingerprint must match the export's."""
    if reference_model is None:
        from clara_edge.base_models import DEFAULT_BASE
        from clara_edge.checkpoint import build_model, load_model
        from clara_edge.model import ClaraConfig

        config = ClaraConfig(**manifest["config"])
        source = manifest.get("source")
        if source:  # at the export's rate and on its base (`--compression`, `--base` when it was made)
            reference_model = load_model(source, config.compression_rate, device="cpu", dtype="fp32",
                                         base=config.base_model)
        elif config.base_model == DEFAULT_BASE:
            reference_model = load_model(None, config.compression_rate, device="cpu", dtype="fp32")
        else:
            reference_model = build_model(config, device="cpu", dtype="fp32")
    expected = manifest.get("model_fingerprint")
    if expected and reference_model.fingerprint(ROLES) != expected:
        raise ClaraError("the reference model is not the one this export was made from (fingerprints differ): "
                         "pass the source model with --model")
    return reference_model


# ------------------------------------------------------------------------------------------ the gate
def _agreement(ref: ClaraModel, questions, ref_mem: torch.Tensor, cand_mem: torch.Tensor, forced_logits, generate,
               max_new_tokens: int, per_question=None) -> dict:
    """Teacher-forced token agreement and free-running sequence match of a candidate against torch greedy.

    forced_logits(question, memories, targets) -> [n, V] and generate(question, memories) -> token ids run the
    candidate on its own memories; per_question(question, ref memories, targets) sees each reference answer.
    """
    eos = ref.eos_ids()
    matched = steps = same = start = 0
    for q, ds in questions:
        sl = slice(start, start + len(ds))
        start += len(ds)
        answer = ref.generate([q], [ref_mem[sl]], max_new_tokens=max_new_tokens)
        targets = _targets(answer.token_ids[0], eos, max_new_tokens)
        if per_question is not None:
            per_question(q, ref_mem[sl], targets)
        matched += int((forced_logits(q, cand_mem[sl], targets).argmax(-1) == np.array(targets)).sum())
        steps += len(targets)
        same += generate(q, cand_mem[sl]) == answer.token_ids
    return {"token_agreement": round(matched / max(steps, 1), 4), "token_steps": steps,
            "sequence_match": round(same / max(len(questions), 1), 4)}


def graph_and_token_parity(backend, ref: ClaraModel, questions=QUESTIONS, max_new_tokens: int = 32) -> dict:
    """Per-graph errors and greedy-token agreement on `questions` [(question, docs)]."""
    docs = [d for _, ds in questions for d in ds]
    ref_mem, exp_mem = ref.compress(docs), backend.compress(docs)
    qs = [q for q, _ in questions]
    ref_query, exp_query = ref.encode_query(qs), backend.encode_query(qs)
    ref_scores = cosine_scores(ref_query, ref_mem, ref.retrieval_centre)
    exp_scores = cosine_scores(exp_query, exp_mem, backend.retrieval_centre)
    graphs = {"compressor": tensor_error(ref_mem, exp_mem), "query": tensor_error(ref_query, exp_query),
              # what ranking sees: both graphs and the retrieval centre the export carries
              "retrieval": tensor_error(ref_scores, exp_scores)}
    gen_errors = []

    def generator_error(q, mem, targets):  # identical inputs: the generator graph alone
        embeds, mask = ref.generation_inputs([q], [mem])
        gen_errors.append(tensor_error(torch_forced_logits(ref, embeds, mask, targets),
                                       export_forced_logits(backend, embeds, mask, targets)))

    result = _agreement(  # the export's own pipeline: its memories, embedding table and generator
        ref, questions, ref_mem, exp_mem,
        lambda q, mem, targets: export_forced_logits(backend, *backend.generation_inputs([q], [mem]), targets),
        lambda q, mem: backend.generate([q], [mem], max_new_tokens=max_new_tokens).token_ids,
        max_new_tokens, generator_error)
    graphs["generator"] = _merge_errors(gen_errors)
    return {"graphs": graphs, "retrieval_agreement": retrieval_agreement(ref_scores, exp_scores), **result}


def retrieval_agreement(ref_scores: torch.Tensor, got_scores: torch.Tensor) -> float:
    """Share of questions [n_q, n_docs] whose first document is the same, the ranking a user sees first."""
    return round(float((ref_scores.argmax(-1) == got_scores.argmax(-1)).float().mean()), 4)


def f1_parity(backend, ref, dev_file: str | Path, n_dev: int = 100, batch_size: int = 8,
              max_new_tokens: int = 64) -> dict:
    """Token F1 (0-100) of both on the first `n_dev` rows of a dev JSONL, gold documents as memories."""
    from clara_edge.datasets import load_eval_rows
    from clara_edge.evaluate import evaluate

    rows = load_eval_rows(dev_file, limit=n_dev)
    kw = dict(mode="clara", retriever="oracle", batch_size=batch_size, progress=False, max_new_tokens=max_new_tokens,
              keep_rows=True)
    ref_report, exp_report = evaluate(ref, rows, **kw), evaluate(backend, rows, **kw)
    diffs = [e["f1"] - r["f1"] for r, e in zip(ref_report["rows"], exp_report["rows"])]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"n_dev": len(rows), "dev_file": str(dev_file), "f1_torch": ref_report["f1"],
            "f1_export": exp_report["f1"], "f1_delta": round(exp_report["f1"] - ref_report["f1"], 4),
            "f1_delta_se": round(se, 4) if se is not None else None,
            "f1_rows_changed": sum(d != 0 for d in diffs)}


def _gate(result: dict, quant: str) -> dict:
    """Add the targets and `passed` (None when nothing the targets name was measured)."""
    agree, f1_tol = TARGETS.get(quant, TARGETS["int4"])
    result["targets"] = {"token_agreement": agree, "abs_f1_delta": f1_tol}
    checks = [result["token_agreement"] >= agree] if agree is not None else []
    if result.get("retrieval_agreement") is not None:
        result["targets"]["retrieval_agreement"] = RETRIEVAL_AGREEMENT_MIN
        checks.append(result["retrieval_agreement"] >= RETRIEVAL_AGREEMENT_MIN)
    if result.get("f1_delta") is not None:
        checks.append(abs(result["f1_delta"]) <= f1_tol)
    result["passed"] = bool(all(checks)) if checks else None
    if result.get("same_centre") is False:  # the export would rank otherwise than its model, whatever it answers
        result["passed"] = False
    return result


def _same_centre(ref: torch.Tensor | None, got: torch.Tensor | None) -> bool:
    if ref is None or got is None:
        return ref is None and got is None
    return ref.shape == got.shape and torch.allclose(ref.float(), got.float())


def check_export(export_dir: str | Path, reference_model: ClaraModel | None = None,
                 questions: Sequence[tuple[str, Sequence[str]]] = QUESTIONS, dev_file: str | Path | None = None,
                 n_dev: int = 100, json_out: str | Path | None = None, probe: bool = True,
                 max_new_tokens: int = 32) -> dict:
    """Compare the export at `export_dir` with its fp32 torch model; see the module docstring for the fields."""
    report_path(json_out, "parity")
    backend = open_backend(str(export_dir))
    if not hasattr(backend, "_generator_step"):
        raise ClaraError(f"{export_dir} is not an export directory (check compares an export with torch)")
    ref = reference_for(backend.manifest, reference_model)
    quant = backend.manifest.get("quant", "fp32")
    result = {"export": str(export_dir), "format": backend.manifest["format"], "quant": quant,
              "lora": backend.manifest.get("lora"), "size_mb": backend.manifest.get("size_mb"),
              "same_centre": _same_centre(ref.retrieval_centre, backend.retrieval_centre)}
    result.update(graph_and_token_parity(backend, ref, agreement_questions(dev_file, n_dev, questions),
                                         max_new_tokens))
    result.update(f1_parity(backend, ref, dev_file, n_dev) if dev_file else {"f1_delta": None})
    if probe:
        result.update(probe_process(str(export_dir)))
    _gate(result, quant)
    write_report(result, json_out, "parity")
    return result


# ------------------------------------------------------------------------------------------ memory-store vectors
class StoredMemories:
    """A backend whose memories pass through a memory store's encoding (fp16 / int8 / int4) and back."""

    def __init__(self, model, dtype: str) -> None:
        from clara_edge.store import StoreSpec

        self.model, self.dtype = model, dtype
        self.spec = StoreSpec(model.fingerprint(), model.config.compression_rate, model.config.n_mem,
                              model.hidden_size, dtype)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def roundtrip(self, memories: torch.Tensor) -> torch.Tensor:
        from clara_edge import store

        return store.decode(store.encode(memories, self.spec), self.spec).reshape(memories.shape)

    def compress(self, docs, batch_size: int = 16) -> torch.Tensor:
        return self.roundtrip(self.model.compress(docs, batch_size))


def check_memory_quant(model: ClaraModel, dtype: str = "int8", questions=QUESTIONS, dev_file=None, n_dev: int = 100,
                       max_new_tokens: int = 32, json_out=None) -> dict:
    """The parity gate for store vectors: torch fp32 generation from `dtype` memories against fp16 memories."""
    report_path(json_out, "parity")
    ref, cand = StoredMemories(model, "fp16"), StoredMemories(model, dtype)
    questions = agreement_questions(dev_file, n_dev, questions)
    docs = [d for _, ds in questions for d in ds]
    raw = model.compress(docs)
    ref_mem, cand_mem = ref.roundtrip(raw), cand.roundtrip(raw)
    result = {"store_dtype": dtype, "reference_dtype": "fp16", "memories": tensor_error(ref_mem, cand_mem)}
    result.update(_torch_agreement(model, model, questions, ref_mem, cand_mem, max_new_tokens))
    result.update(f1_parity(cand, ref, dev_file, n_dev) if dev_file else {"f1_delta": None})
    _gate(result, "int8" if dtype == "int8" else "int4")
    write_report(result, json_out, "parity")
    return result


def _torch_agreement(ref: ClaraModel, cand: ClaraModel, questions, ref_mem, cand_mem, max_new_tokens: int) -> dict:
    """`_agreement` for a torch candidate (same generation code as the reference, other weights or memories)."""
    return _agreement(
        ref, questions, ref_mem, cand_mem,
        lambda q, mem, targets: torch_forced_logits(cand, *cand.generation_inputs([q], [mem]), targets),
        lambda q, mem: cand.generate([q], [mem], max_new_tokens=max_new_tokens).token_ids, max_new_tokens)


# ------------------------------------------------------------------------------------------ bitsandbytes
def _weights_mb(model: nn.Module) -> float:
    return round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1)


def check_bnb(model: ClaraModel, mode: str = "int8", device: str = "cpu", questions=QUESTIONS, dev_file=None,
              n_dev: int = 100, max_new_tokens: int = 32, json_out=None) -> dict:
    """The parity gate for bitsandbytes int8 / nf4 base weights (`export.bnb`) against the same fp32 torch model:
    memory errors, token agreement and F1 delta as for exports; int8 is held to the int8 targets, nf4 to int4's."""
    from .bnb import quantize_bnb

    report_path(json_out, "parity")
    cand = quantize_bnb(model, mode, device)
    questions = agreement_questions(dev_file, n_dev, questions)
    docs, qs = [d for _, ds in questions for d in ds], [q for q, _ in questions]
    ref_mem, cand_mem = model.compress(docs), cand.compress(docs)
    result = {"bnb": mode, "device": device,
              "weights_mb": _weights_mb(cand), "weights_mb_fp32": _weights_mb(model),
              "graphs": {"compressor": tensor_error(ref_mem, cand_mem),
                         "query": tensor_error(model.encode_query(qs), cand.encode_query(qs))}}
    result.update(_torch_agreement(model, cand, questions, ref_mem, cand_mem, max_new_tokens))
    result.update(f1_parity(cand, model, dev_file, n_dev) if dev_file else {"f1_delta": None})
    _gate(result, "int8" if mode == "int8" else "int4")
    write_report(result, json_out, "parity")
    return result


# ------------------------------------------------------------------------------------------ RSS and speed
def probe_process(model: str | None, threads: int = 1, timeout: float = 900) -> dict:
    """Peak RSS and batch-1 decode speed of `model` (an export directory or torch model spec) in a fresh
    process, on `threads` CPU threads (1 by default: comparable across formats and on a busy machine)."""
    cmd = [sys.executable, "-m", "clara_edge.export.parity", "--probe", model or "default", "--threads", str(threads)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"peak_rss_mb": None, "tokens_per_s": None, "probe_error": f"timed out after {timeout:.0f} s"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"peak_rss_mb": None, "tokens_per_s": None, "probe_error": last[:200]}
    return json.loads(lines[-1])


def _probe(model: str, threads: int) -> dict:
    """Run in the probe process: load, compress one document, decode PROBE_TOKENS tokens (EOS ignored)."""
    import transformers  # noqa: F401  (the runtime's own imports, before any model: the RSS floor)

    from clara_edge.backend import export_manifest

    torch.set_num_threads(threads)
    import_rss = peak_rss_mb()
    start = time.perf_counter()
    path = None if model == "default" else Path(model)
    manifest = export_manifest(path) if path is not None and path.is_dir() else None
    if manifest and manifest.get("format") == "onnx":
        from clara_edge.onnx_backend import OnnxBackend

        backend = OnnxBackend(path, manifest, threads=threads)
    else:
        backend = open_backend(None if path is None else str(path))
    load_s = time.perf_counter() - start
    q, docs = QUESTIONS[0]
    mem = backend.compress(docs)
    backend.generate([q], [mem], max_new_tokens=4)  # warm-up
    if isinstance(backend, ClaraModel):
        backend.eos_ids = lambda: []
    else:
        backend.eos_list = []
    gen = backend.generate([q], [mem], max_new_tokens=PROBE_TOKENS)
    return {"peak_rss_mb": round(peak_rss_mb(), 1),
            "tokens_per_s": round(max(gen.decode_steps, 1) / max(gen.decode_s, 1e-9), 2),
            "prefill_s": round(gen.prefill_s, 4), "prompt_positions": gen.context_positions[0],
            "import_rss_mb": round(import_rss, 1), "load_s": round(load_s, 2), "threads": threads,
            "probe_backend": backend.name}


if __name__ == "__main__":
    import argparse
    import warnings

    warnings.simplefilter("ignore")
    parser = argparse.ArgumentParser(prog="python -m clara_edge.export.parity")
    parser.add_argument("--probe", required=True, metavar="EXPORT_DIR|MODEL")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(_probe(args.probe, args.threads)))
