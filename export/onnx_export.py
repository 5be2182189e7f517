"""Export a ClaraModel to ONNX: three graphs, one weight file, the embedding table, the tokenizer, a manifest.

Graphs (torch.onnx, dynamo exporter; dynamic batch and lengths):
    compressor.onnx / query.onnx   inputs_embeds [B, T, H], attention_mask [B, T] -> memories [B, M, H]
                                   (final-norm hidden states at the trailing M MEM slots; positions from the mask)
    generator.onnx                 inputs_embeds [B, T, H], attention_mask [B, P+T], position_ids [B, T],
                                   past_key_i / past_value_i [B, kv, P, D] -> logits [B, V] of the last position,
                                   present_key_i / present_value_i [B, kv, P+T, D]; one graph serves prefill
                                   (P = 0) and decode (T = 1). Written on ONNX Runtime's fused operators
                                   (`onnx_fused`) for the Llama-layout families it covers, traced otherwise.

LoRA (`lora=`):
    shared            each graph keeps its role's LoRA as separate low-rank MatMuls beside the frozen base
                      weights; the writer stores each distinct tensor once, so the three roles share one copy
                      of the base in weights.bin (~ base + 3 small adapters)
    merged-generator  (default) the encoders as `shared`, the generator's adapter merged into its own copy of
                      the adapted projections (8-bit when quantised): a decode step runs one MatMul per linear
                      instead of three plus an Add (SmolLM2 int4 on 2 CPU threads: 1.21x the decode tokens/s of
                      `shared` for +29 MB; docs/onnx-export.md)
    merged            each role's adapter is merged into a private copy of the base (peft merge): a copy of
                      the adapted projections per role on disk, one MatMul per linear at run time
Graph inputs are embeddings, not ids: the runtime reads the one embedding table (embeddings.npy, plus the
added tokens' fp32 rows in special_embeddings.npy), which it needs anyway to splice memory slots into the
generator's input, so the table is stored once.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clara_edge.atomic import replace_dir, staging_dir
from clara_edge.backend import EXPORT_MANIFEST, EXPORTER_REVISION
from clara_edge.errors import ClaraError, cause_line
from clara_edge.model import ROLES, SWITCHING_ROPE, ClaraModel
from clara_edge.onnx_backend import (CENTRE_FILE, EMBEDDING_SCALES_FILE, EMBEDDINGS_FILE, EXPORT_FORMAT_VERSION,
                                     SPECIAL_EMBEDDINGS_FILE, TOKENIZER_DIR)
from clara_edge.prompt import special_tokens

from .onnx_fused import build_generator, fused_support
from .outliers import OUTLIER_CHANNELS
from .quantize import ACCURACY_LEVEL, QUANTS, embedding_table, quantize_graph

LORA_MODES = ("merged-generator", "shared", "merged")  # the first is the default
WEIGHTS_FILE = "weights.bin"
OPSET = 18
_ALIGN = 4096  # page-aligned external tensors (onnxruntime can memory-map them)
_INLINE_BYTES = 1024  # smaller tensors stay inside the .onnx file
CALIBRATION_TOKENS = 256


def _role_lora(lora: str, role: str) -> str:
    """How `role`'s graph carries its adapter under the export's LoRA mode: "shared" or "merged"."""
    if lora == "merged-generator":
        return "merged" if role == "generator" else "shared"
    return lora


# ------------------------------------------------------------------------------------------ graph modules
class EncoderGraph(nn.Module):
    """Compressor / query encoder: embeddings and mask -> memories (ClaraModel.encode_ids after the lookup)."""

    def __init__(self, model: ClaraModel, role: str) -> None:
        super().__init__()
        self.model, self.role, self.n_mem = model, role, model.config.n_mem

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model.hidden_states(self.role, inputs_embeds, attention_mask)[:, -self.n_mem:]


class GeneratorGraph(nn.Module):
    """The causal LM with plain-tensor KV cache in and out (a transformers DynamicCache lives inside)."""

    def __init__(self, model: ClaraModel, role: str = "generator") -> None:
        super().__init__()
        self.model, self.role = model, role
        self.causal = model.lm.get_base_model()

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        self.model._activate(self.role)
        # plain (full) layers even for sliding-window models: the mask applies the window, the cache keeps all
        cache = DynamicCache([(past[i], past[i + 1]) for i in range(0, len(past), 2)])
        out = self.causal(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits[:, -1], *present)


# ------------------------------------------------------------------------------------------ tracing
@dataclass
class TracedGraphs:
    """The three fp32 graphs of one model, ready to quantise and write (export once, write many)."""
    lora: str
    protos: dict = field(default_factory=dict)  # role -> onnx.ModelProto
    num_layers: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    vocab_size: int = 0
    generator_graph: str = "traced"  # "fused" (onnx_fused) or "traced"; why not fused, where it is not


@contextmanager
def _export_view(model: ClaraModel):
    """The model in eval mode on CPU fp32 with fixed rotary frequencies; the caller's model comes back as it was
    (active adapter, mode, RoPE)."""
    if model.device.type != "cpu" or model.dtype != torch.float32:
        work = copy.deepcopy(model).to("cpu", torch.float32).eval()
        _fix_rope(work)
        yield work
        return
    active, training = model._active, model.training
    model.eval()
    restore = _fix_rope(model)
    try:
        yield model
    finally:
        restore()
        if active is not None:
            model._activate(active)
        model.train(training)


def _fix_rope(model: ClaraModel):
    """Switching RoPE (longrope, dynamic NTK) held at its original frequencies, which serve the export's
    `fixed_rope_positions`: torch.export cannot trace the in-place switch. Returns the undo."""
    changed = []
    for module in model.lm.modules():
        if getattr(module, "rope_type", None) in SWITCHING_ROPE and hasattr(module, "original_inv_freq"):
            changed.append((module, module.rope_type, module.inv_freq.clone()))
            module.rope_type = "default"  # forward skips the length-dependent update
            module.inv_freq.copy_(module.original_inv_freq)

    def restore() -> None:
        for module, rope_type, inv_freq in changed:
            module.rope_type = rope_type
            module.inv_freq.copy_(inv_freq)
    return restore


def _role_model(model: ClaraModel, role: str, lora: str) -> ClaraModel:
    """The model a role's graph traces: the shared model with `role` active, or a private merged copy."""
    if lora == "shared":
        model._activate(role)
        return model
    clone = copy.deepcopy(model)
    clone._activate(role)
    clone.lm.base_model.merge_adapter([role])
    return clone


def _to_onnx(module: nn.Module, args: tuple, dynamic_shapes, input_names, output_names):
    """torch.export + translation, unoptimised: initializers keep their parameter names (see `_role_graph`)."""
    import warnings

    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic_shapes,
                                        input_names=input_names, output_names=output_names, opset_version=OPSET,
                                        optimize=False, verbose=False)
        except Exception as e:  # torch.export / onnxscript raise many types
            raise ClaraError(f"ONNX export of {type(module).__name__} failed: {cause_line(e)}") from e
    return program.model_proto


def _optimize(proto):
    """onnxscript's optimiser: constant folding (weight transposes included), fusions, dead-code removal."""
    import logging

    import onnxscript.optimizer

    logging.getLogger("onnxscript").setLevel(logging.WARNING)  # its rewriter logs every rule at INFO
    return onnxscript.optimizer.optimize(proto)


def _role_graph(proto, role_model: ClaraModel, role: str, lora: str):
    """The encoder graph traced for the compressor, carrying `role`'s weights instead (same structure).

    Shared LoRA: the compressor's LoRA initializers take the role's adapter values; merged: every base weight
    takes the role's merged value. Initializers are named after the traced module's parameters ("model.<name>").
    """
    from onnx import numpy_helper

    params = dict(role_model.named_parameters())
    proto = copy.deepcopy(proto)
    for i, tensor in enumerate(proto.graph.initializer):
        name = tensor.name.removeprefix("model.")
        if lora == "shared" and ".compressor." in name:
            name = name.replace(".compressor.", f".{role}.")
        elif lora == "shared" or "base_layer" not in name:
            continue
        value = params[name].detach().to("cpu", torch.float32).numpy()
        proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, tensor.name))
    return proto


def _cache_shape(model: ClaraModel) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) read off a real forward's cache (robust across model families)."""
    causal = model.lm.get_base_model()
    with torch.no_grad():
        out = causal(inputs_embeds=torch.zeros(1, 2, model.hidden_size), use_cache=True)
    layers = out.past_key_values.layers
    return len(layers), layers[0].keys.shape[1], layers[0].keys.shape[3]


def _trace_generator(work: ClaraModel, lora: str, cache: tuple[int, int, int], batch):
    """The generator graph through torch.onnx (any family transformers runs)."""
    Dim = torch.export.Dim
    n_layers, kv, hd = cache
    t, p = 5, 3
    emb = torch.randn(2, t, work.hidden_size)
    mask = torch.ones(2, p + t, dtype=torch.long)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -t:]
    past = tuple(torch.randn(2, kv, p, hd) for _ in range(2 * n_layers))
    kv_names = [f"{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]
    step, past_len, total = Dim("seq"), Dim("past"), Dim("total")
    return _optimize(_to_onnx(
        GeneratorGraph(_role_model(work, "generator", lora)), (emb, mask, positions, *past),
        ({0: batch, 1: step}, {0: batch, 1: total}, {0: batch, 1: step}, tuple({0: batch, 2: past_len} for _ in past)),
        ["inputs_embeds", "attention_mask", "position_ids"] + [f"past_{n}" for n in kv_names],
        ["logits"] + [f"present_{n}" for n in kv_names]))


def trace_graphs(model: ClaraModel, lora: str = LORA_MODES[0], fused: bool = True) -> TracedGraphs:
    """Export the compressor, query and generator graphs (fp32) without writing anything.

    `fused`: write the generator on ORT's fused operators where `onnx_fused` covers the base (a fraction of the
    traced graph's nodes, which is what a batch-1 decode step pays for; docs/measurements.md), else trace it.
    """
    if lora not in LORA_MODES:
        raise ClaraError(f"unknown LoRA mode {lora!r}: use {', '.join(LORA_MODES)}")
    Dim = torch.export.Dim
    with _export_view(model) as work:
        n_layers, kv, hd = _cache_shape(work)
        traced = TracedGraphs(lora, num_layers=n_layers, num_kv_heads=kv, head_dim=hd,
                              vocab_size=work.lm.get_base_model().get_output_embeddings().weight.shape[0])
        h, n_mem = work.hidden_size, work.config.n_mem
        batch = Dim("batch")
        seq = Dim("seq", min=n_mem + 1)
        emb = torch.randn(2, n_mem + 6, h)
        mask = torch.ones(2, n_mem + 6, dtype=torch.long)
        mask[0, :2] = 0
        enc_lora, gen_lora = _role_lora(lora, "compressor"), _role_lora(lora, "generator")
        encoder = _role_model(work, "compressor", enc_lora)
        proto = _to_onnx(EncoderGraph(encoder, "compressor"), (emb, mask), ({0: batch, 1: seq}, {0: batch, 1: seq}),
                         ["inputs_embeds", "attention_mask"], ["memories"])
        for role in ("compressor", "query"):  # one trace, two weight sets
            role_model = encoder if role == "compressor" else _role_model(work, role, enc_lora)
            traced.protos[role] = _optimize(_role_graph(proto, role_model, role, enc_lora))
        del proto, encoder
        unsupported = fused_support(work) if fused else "not asked for"
        if unsupported is None:
            traced.protos["generator"] = build_generator(work, "generator", gen_lora)
            traced.generator_graph = "fused"
        else:
            traced.protos["generator"] = _trace_generator(work, gen_lora, (n_layers, kv, hd), batch)
            traced.generator_graph = f"traced ({unsupported})"
    return traced


# ------------------------------------------------------------------------------------------ writing
def _raw_bytes(tensor) -> bytes:
    from onnx import numpy_helper

    if not tensor.HasField("raw_data"):
        tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    return tensor.raw_data


def save_graphs(protos: dict, out_dir: Path, data_name: str = WEIGHTS_FILE) -> dict:
    """Write `{name}.onnx` per proto with every large tensor in one page-aligned data file, each distinct
    tensor (same type, shape and bytes) once. Returns {"unique_bytes", "referenced_bytes"} of external tensors."""
    import onnx

    seen: dict[bytes, tuple[int, int]] = {}
    referenced = unique = 0
    with open(out_dir / data_name, "wb") as data:
        for name, proto in protos.items():
            for node in proto.graph.node:  # exporter provenance (stack traces, scopes): megabytes, unused at run time
                del node.metadata_props[:]
                node.doc_string = ""
            for tensor in proto.graph.initializer:
                raw = _raw_bytes(tensor)
                if len(raw) < _INLINE_BYTES:
                    continue
                key = hashlib.sha256(raw).digest() + f"|{tensor.data_type}|{list(tensor.dims)}".encode()
                if key not in seen:
                    data.write(b"\0" * (-data.tell() % _ALIGN))
                    seen[key] = (data.tell(), len(raw))
                    data.write(raw)
                    unique += len(raw)
                offset, length = seen[key]
                referenced += length
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = k, v
            onnx.save_model(proto, out_dir / f"{name}.onnx")
    return {"unique_bytes": unique, "referenced_bytes": referenced}


def _versions() -> dict:
    import onnx
    import onnxruntime
    import transformers

    from clara_edge import __version__

    return {"clara_edge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def base_manifest(model: ClaraModel, fmt: str, quant: str, source: str | None) -> dict:
    """The manifest fields every export format shares (`clara_edge.onnx_backend.read_manifest` checks them)."""
    tokens = special_tokens(model.config.n_mem)
    tok = model.tokenizer
    return {"format": fmt, "format_version": EXPORT_FORMAT_VERSION, "exporter_revision": EXPORTER_REVISION,
            "quant": quant, "config": model.config.to_dict(), "source": source,
            "fingerprint": model.fingerprint(), "model_fingerprint": model.fingerprint(ROLES),
            "base_fingerprint": model.base_fingerprint,
            "special_ids": {t: model.special_ids[t] for t in tokens}, "eos_ids": model.eos_ids(),
            "pad_id": tok.pad_token_id, "bos_id": tok.bos_token_id, "base_vocab": model.base_vocab,
            "hidden_size": model.hidden_size, "max_positions": model.fixed_rope_positions}


def write_table(out: Path, table: np.ndarray, quant: str) -> None:
    """The embedding table (fp32 rows in) as stored for `quant`."""
    values, scales = embedding_table(table, quant)
    np.save(out / EMBEDDINGS_FILE, values)
    if scales is not None:
        np.save(out / EMBEDDING_SCALES_FILE, scales)


def write_common(model: ClaraModel, out: Path, quant: str) -> None:
    """Tokenizer, base embedding table (as `quant` stores it) and the added tokens' rows (fp32), for every format."""
    model.tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    write_table(out, model.input_embeddings.weight.detach().to("cpu", torch.float32).numpy(), quant)
    np.save(out / SPECIAL_EMBEDDINGS_FILE, model.special_embeddings.detach().to("cpu", torch.float32).numpy())
    if model.retrieval_centre is not None:
        np.save(out / CENTRE_FILE, model.retrieval_centre.to(torch.float32).numpy())


def finish_export(out: Path, final: str | Path, manifest: dict) -> Path:
    """Record every file's size, write the manifest, and move the staging directory `out` to `final`."""
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    manifest["files"] = files
    manifest["size_mb"] = round(sum(files.values()) / 2**20, 2)
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return replace_dir(out, Path(final).expanduser())


def check_out_dir(out_dir: str | Path) -> Path:
    """`out_dir` is new, empty or an earlier export (which the new one replaces); never another folder or a file."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or (not (out / EXPORT_MANIFEST).is_file() and any(out.iterdir()))):
        raise ClaraError(f"{out} exists and is not an export directory: choose an empty or new --out")
    return out


def export_staging_dir(out_dir: str | Path) -> Path:
    return staging_dir(check_out_dir(out_dir))


def calibration_embeds(tokenizer, table: np.ndarray) -> np.ndarray:
    """[T, H] embeddings of the bundled demo corpus's first CALIBRATION_TOKENS tokens: the prefill from which the
    quantiser learns each input's outlier channels (`outliers`; those channels are large at every position)."""
    from clara_edge.demo import demo_documents

    text = "\n\n".join(p.read_text() for p in demo_documents())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:CALIBRATION_TOKENS]
    return np.asarray(table[ids], dtype=np.float32)


def calibration_feeds(role: str, embeds: np.ndarray, manifest: dict) -> dict[str, np.ndarray]:
    """One batch-1 prefill of `embeds` [T, H] for a role's graph (the generator with an empty past)."""
    feeds = {"inputs_embeds": embeds[None], "attention_mask": np.ones((1, len(embeds)), np.int64)}
    if role == "generator":
        feeds["position_ids"] = np.arange(len(embeds), dtype=np.int64)[None]
        past = np.zeros((1, manifest["num_kv_heads"], 0, manifest["head_dim"]), np.float32)
        feeds.update({f"past_{kind}_{i}": past for i in range(manifest["num_layers"]) for kind in ("key", "value")})
    return feeds


def _write_onnx(out_dir: str | Path, protos: dict, quant: str, accuracy_level: int | None, manifest: dict,
                write_rest, calibration: np.ndarray) -> Path:
    """Quantise `protos` (consumed; `calibration` [T, H] embeddings for the outlier channels), write graphs +
    weights, `write_rest(tmp)` the rest, then the manifest."""
    if quant not in QUANTS:
        raise ClaraError(f"unknown quantisation {quant!r}: use {', '.join(QUANTS)}")
    level = ACCURACY_LEVEL if accuracy_level is None else accuracy_level
    tmp = export_staging_dir(out_dir)
    try:
        for role in ROLES:
            protos[role] = quantize_graph(protos[role], quant, level, manifest["config"]["lora_r"],
                                          manifest["vocab_size"], calibration_feeds(role, calibration, manifest),
                                          merged=_role_lora(manifest["lora"], role) == "merged")
        stats = save_graphs(protos, tmp)
        protos.clear()
        write_rest(tmp)
        quantised = quant in ("int8", "int4")
        manifest.update({
            "quant": quant, "accuracy_level": level if quantised else None,
            "outlier_channels": OUTLIER_CHANNELS if quantised else None,
            "graphs": {role: f"{role}.onnx" for role in ROLES}, "weights": WEIGHTS_FILE, "kv_dtype": "float32",
            "opset": OPSET, "embeddings": {"file": EMBEDDINGS_FILE, "dtype": "int8" if quantised else quant,
                                           "scales": EMBEDDING_SCALES_FILE if quantised else None},
            "weights_unique_bytes": stats["unique_bytes"], "weights_referenced_bytes": stats["referenced_bytes"],
            "weights_dedup_saved_mb": round((stats["referenced_bytes"] - stats["unique_bytes"]) / 2**20, 2),
            "versions": _versions()})
        return finish_export(tmp, out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_onnx_export(model: ClaraModel, traced: TracedGraphs, out_dir: str | Path, quant: str = "fp32",
                      source: str | None = None, accuracy_level: int | None = None, consume: bool = False) -> Path:
    """Quantise traced graphs and write a complete export directory (atomically). `consume=True` quantises
    `traced`'s graphs in place, leaving it empty: no copy of the fp32 graphs (1.4 GB less peak RSS for SmolLM2)."""
    manifest = base_manifest(model, "onnx", quant, source)
    manifest.update({"lora": traced.lora, "generator_graph": traced.generator_graph,
                     "num_layers": traced.num_layers, "num_kv_heads": traced.num_kv_heads,
                     "head_dim": traced.head_dim, "vocab_size": traced.vocab_size})
    protos = traced.protos if consume else {role: copy.deepcopy(traced.protos[role]) for role in ROLES}
    table = model.input_embeddings.weight.detach().to("cpu", torch.float32).numpy()
    return _write_onnx(out_dir, protos, quant, accuracy_level, manifest,
                       lambda tmp: write_common(model, tmp, quant), calibration_embeds(model.tokenizer, table))


def requantize_export(src: str | Path, out_dir: str | Path, quant: str, accuracy_level: int | None = None) -> Path:
    """Quantise an fp32 ONNX export into a new export directory, without the model or a new trace."""
    import onnx

    from clara_edge.onnx_backend import load_tokenizer, read_manifest

    src = Path(src)
    manifest = read_manifest(src, "onnx")
    if manifest.get("quant") != "fp32":
        raise ClaraError(f"{src} is a {manifest.get('quant')} export: quantise from an fp32 export")
    if Path(out_dir).expanduser().resolve() == src.resolve():
        raise ClaraError("requantising needs a new --out directory")
    protos = {role: onnx.load(str(src / manifest["graphs"][role])) for role in ROLES}
    carried = {k: v for k, v in manifest.items() if not k.startswith(("files", "size_mb", "weights_"))}

    def write_rest(tmp: Path) -> None:
        shutil.copytree(src / TOKENIZER_DIR, tmp / TOKENIZER_DIR)
        shutil.copy2(src / SPECIAL_EMBEDDINGS_FILE, tmp / SPECIAL_EMBEDDINGS_FILE)
        if CENTRE_FILE in manifest["files"]:  # without it the export would rank by raw cosine, silently
            shutil.copy2(src / CENTRE_FILE, tmp / CENTRE_FILE)
        write_table(tmp, table, quant)

    table = np.load(src / EMBEDDINGS_FILE)
    calibration = calibration_embeds(load_tokenizer(src, manifest), table)
    # The graphs keep the source's trace; the quantisation is this exporter's, so both revisions are recorded.
    provenance = {"requantized_from": str(src.resolve()), "exporter_revision": EXPORTER_REVISION,
                  "traced_by_exporter_revision": manifest.get("traced_by_exporter_revision",
                                                              manifest.get("exporter_revision"))}
    return _write_onnx(out_dir, protos, quant, accuracy_level, {**carried, **provenance}, write_rest, calibration)


def export_onnx(model: ClaraModel, out_dir: str | Path, quant: str = "fp32", lora: str = LORA_MODES[0],
                source: str | None = None, accuracy_level: int | None = None) -> Path:
    """Export `model` as an ONNX directory at `out_dir` (quant: fp32 | fp16 | int8 | int4)."""
    if quant not in QUANTS:
        raise ClaraError(f"unknown quantisation {quant!r}: use {', '.join(QUANTS)}")
    return write_onnx_export(model, trace_graphs(model, lora), out_dir, quant, source, accuracy_level, consume=True)
