"""Export a ClaraModel to Core ML (ML Program, iOS 18 / macOS 15): one multifunction package, three functions.

    clara.mlpackage   functions `compressor`, `query` (inputs_embeds [1, T, H] -> memories [1, M, H]) and
                      `generator` (inputs_embeds [1, T, H], causal_mask [1, 1, T, P+T] additive -> logits [1, V])
                      with a stateful KV cache: states key_cache / value_cache [layers, 1, kv, max_context, D]
                      written in place (slice_update), so a decode step moves no cache through the API
    embeddings.npy    the token table (+ embedding_scales.npy), tokenizer/, clara_export.json: as for ONNX

Each function keeps its role's LoRA unmerged beside the frozen base, so the base weights are identical
constants in all three and the multifunction package stores them once (`weights_shared_saved_mb`).
Quantisation (coremltools.optimize.coreml): int4 per-block (block 32) linear symmetric, lm_head int8
per-channel; int8 per-channel; `palettize=True` swaps int4 for 4-bit k-means palettes (group 16).
fp32 computes in fp32, the others in fp16.

Conversion and spec checks run anywhere coremltools installs (Linux CI); predictions need macOS
(scripts/coreml_mac_check.py). coremltools 9.0 converts through TorchScript here: torch 2.13 is past its tested
range and NumPy >= 2.4 rejects its size-1-array casts, which `_numpy_cast_fix` patches for the conversion.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from clara_edge.coreml_backend import MASK_MIN, causal_mask
from clara_edge.errors import ClaraError, cause_line
from clara_edge.model import ROLES, ClaraModel

from .onnx_export import _export_view, base_manifest, export_staging_dir, finish_export, write_common
from .quantize import BLOCK_SIZE, QUANTS

PACKAGE = "clara.mlpackage"
WEIGHT_THRESHOLD = 512  # quantise weights with at least this many elements (norms and tiny tensors stay fp16)
MAX_CONTEXT = 1024


def coreml_unavailable() -> str | None:
    """Why Core ML conversion cannot run here (one line), or None."""
    try:
        import coremltools  # noqa: F401
    except Exception as e:  # ImportError, or a broken native extension
        return f"coremltools is not usable here ({type(e).__name__}: {str(e).splitlines()[0][:120]}): " \
               "pip install 'clara-edge[coreml]'"
    return None


# ------------------------------------------------------------------------------------------ graph modules
class CoreMLEncoder(nn.Module):
    """One unpadded sequence: embeddings [1, T, H] -> memories [1, M, H] (positions 0..T-1)."""

    def __init__(self, model: ClaraModel, role: str) -> None:
        super().__init__()
        self.model, self.role, self.n_mem = model, role, model.config.n_mem

    def forward(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        self.model._activate(self.role)
        base = self.model.lm.get_base_model()
        idx = torch.arange(inputs_embeds.shape[1])
        mask = ((idx[None, :] > idx[:, None]).float() * MASK_MIN)[None, None]  # 4D: HF takes it as is
        hidden = getattr(base, base.base_model_prefix)(inputs_embeds=inputs_embeds, attention_mask=mask,
                                                       position_ids=idx[None], use_cache=False).last_hidden_state
        return hidden[:, -self.n_mem:]


class SliceCache:
    """The cache interface the HF decoder layers call, writing into preallocated state tensors in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start) -> None:
        self.keys, self.values, self.start = keys, values, start

    def update(self, key, value, layer_idx, cache_kwargs=None):
        end = self.start + key.shape[-2]
        self.keys[layer_idx:layer_idx + 1, :, :, self.start:end, :] = key.unsqueeze(0)
        self.values[layer_idx:layer_idx + 1, :, :, self.start:end, :] = value.unsqueeze(0)
        return self.keys[layer_idx, :, :, :end, :], self.values[layer_idx, :, :, :end, :]


class CoreMLGenerator(nn.Module):
    """The causal LM over a stateful cache: (inputs_embeds [1, T, H], causal_mask [1, 1, T, P+T]) -> logits [1, V]."""

    def __init__(self, model: ClaraModel, layers: int, kv_heads: int, head_dim: int, max_context: int) -> None:
        super().__init__()
        self.model, self.causal = model, model.lm.get_base_model()
        shape = (layers, 1, kv_heads, max_context, head_dim)
        self.register_buffer("key_cache", torch.zeros(shape))
        self.register_buffer("value_cache", torch.zeros(shape))

    def forward(self, inputs_embeds: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        self.model._activate("generator")
        t = inputs_embeds.shape[1]
        past = causal_mask.shape[-1] - t
        positions = (torch.arange(t) + past).unsqueeze(0)
        out = self.causal(inputs_embeds=inputs_embeds, attention_mask=causal_mask, position_ids=positions,
                          past_key_values=SliceCache(self.key_cache, self.value_cache, past), use_cache=True,
                          logits_to_keep=1)
        return out.logits[:, -1]


# ------------------------------------------------------------------------------------------ conversion
@contextmanager
def _numpy_cast_fix():
    """coremltools 9.0's int/bool cast calls int(array) on size-1 arrays, an error since NumPy 2.4."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    original = ops._cast

    def cast(context, node, dtype, dtype_name):
        x = ops._get_inputs(context, node, expected=1)[0]
        if x.can_be_folded_to_const() and isinstance(x.val, np.ndarray) and x.val.size == 1:
            context.add(mb.const(val=dtype(x.val.reshape(()).item()), name=node.name), node.name)
            return
        original(context, node, dtype, dtype_name)

    ops._cast = cast
    try:
        yield
    finally:
        ops._cast = original


def _convert(module: nn.Module, example: tuple, inputs: list, outputs: list, states: list, precision):
    import warnings

    import coremltools as ct

    with warnings.catch_warnings(), torch.no_grad(), _numpy_cast_fix():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module.eval(), example, check_trace=False)
        try:
            return ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None,
                              minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                              compute_precision=precision, skip_model_load=True)
        except Exception as e:  # the converter raises many types
            raise ClaraError(f"Core ML conversion of {type(module).__name__} failed: {cause_line(e)}") from e


def convert_roles(model: ClaraModel, quant: str = "fp16", max_context: int = MAX_CONTEXT) -> dict:
    """The three roles as (unquantised) Core ML models: role -> MLModel."""
    import coremltools as ct

    from .onnx_export import _cache_shape

    precision = ct.precision.FLOAT32 if quant == "fp32" else ct.precision.FLOAT16
    cfg = model.config
    h = model.hidden_size
    longest = cfg.doc_max_length + 3 + cfg.n_mem
    models = {}
    with _export_view(model) as work:
        for role in ("compressor", "query"):
            seq = ct.RangeDim(cfg.n_mem + 1, longest, default=cfg.n_mem + 8)
            models[role] = _convert(CoreMLEncoder(work, role), (torch.randn(1, cfg.n_mem + 8, h),),
                                    [ct.TensorType("inputs_embeds", shape=ct.Shape((1, seq, h)), dtype=np.float32)],
                                    [ct.TensorType("memories", dtype=np.float32)], [], precision)
        layers, kv, hd = _cache_shape(work)
        gen = CoreMLGenerator(work, layers, kv, hd, max_context)
        t, p = 4, 3
        step = ct.RangeDim(1, max_context, default=1)
        total = ct.RangeDim(1, max_context, default=1)
        cache = (layers, 1, kv, max_context, hd)
        models["generator"] = _convert(
            gen, (torch.randn(1, t, h), torch.from_numpy(causal_mask(t, p))),
            [ct.TensorType("inputs_embeds", shape=ct.Shape((1, step, h)), dtype=np.float32),
             ct.TensorType("causal_mask", shape=ct.Shape((1, 1, step, total)), dtype=np.float32)],
            [ct.TensorType("logits", dtype=np.float32)],
            [ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name="key_cache"),
             ct.StateType(wrapped_type=ct.TensorType(shape=cache, dtype=np.float16), name="value_cache")],
            precision)
    return models


def _lm_head_ops(mlmodel) -> list[str]:
    """Names of the linear ops producing the logits (kept at 8 bit under int4)."""
    ops = [op for op in mlmodel._mil_program.functions["main"].operations if op.op_type == "linear"]
    vocab = max((op.outputs[0].shape[-1] for op in ops if op.outputs[0].shape), default=None)
    return [op.name for op in ops if op.outputs[0].shape and op.outputs[0].shape[-1] == vocab][-1:]


def quantize_mlmodel(mlmodel, quant: str, palettize: bool = False, has_lm_head: bool = True):
    """Weight quantisation of one converted model (fp32 / fp16: unchanged); an int4 generator keeps its lm_head
    at 8 bits (`has_lm_head`: False for the encoders, whose widest linear is no head)."""
    if quant in ("fp32", "fp16"):
        return mlmodel
    import coremltools.optimize.coreml as cto

    if quant == "int8":
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=WEIGHT_THRESHOLD))
        return cto.linear_quantize_weights(mlmodel, config)
    head = {name: cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
            for name in (_lm_head_ops(mlmodel) if has_lm_head else [])}
    if palettize:
        config = cto.OptimizationConfig(
            global_config=cto.OpPalettizerConfig(mode="kmeans", nbits=4, granularity="per_grouped_channel",
                                                 group_size=16, weight_threshold=WEIGHT_THRESHOLD),
            op_name_configs={name: None for name in head})
        mlmodel = cto.palettize_weights(mlmodel, config)
        if not head:
            return mlmodel
        return cto.linear_quantize_weights(mlmodel, cto.OptimizationConfig(global_config=None, op_name_configs=head))
    config = cto.OptimizationConfig(
        global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", granularity="per_block",
                                                  block_size=BLOCK_SIZE, weight_threshold=WEIGHT_THRESHOLD),
        op_name_configs=head)
    return cto.linear_quantize_weights(mlmodel, config)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def save_multifunction(models: dict, out: Path) -> dict:
    """Save the role models as one multifunction package (shared weights stored once); sizes for the report."""
    import coremltools as ct

    with tempfile.TemporaryDirectory() as tmp:
        desc = ct.utils.MultiFunctionDescriptor()
        separate = 0
        for role, mlmodel in models.items():
            path = Path(tmp) / f"{role}.mlpackage"
            mlmodel.save(str(path))
            separate += _dir_bytes(path)
            desc.add_function(str(path), src_function_name="main", target_function_name=role)
        desc.default_function_name = "generator"
        ct.utils.save_multifunction(desc, str(out))
    return {"separate_mb": round(separate / 2**20, 2), "multifunction_mb": round(_dir_bytes(out) / 2**20, 2)}


def export_coreml(model: ClaraModel, out_dir: str | Path, quant: str = "int4", max_context: int = MAX_CONTEXT,
                  palettize: bool = False, source: str | None = None) -> Path:
    """Export `model` as a Core ML directory (see the module docstring); ClaraError where coremltools cannot run."""
    reason = coreml_unavailable()
    if reason:
        raise ClaraError(reason)
    if quant not in QUANTS:
        raise ClaraError(f"unknown quantisation {quant!r}: use {', '.join(QUANTS)}")
    if model.sliding_window and model.sliding_window < max(max_context, model.config.doc_max_length + model.config.n_mem + 3):
        # its functions take a plain causal mask: they would attend past the window that torch keeps to
        raise ClaraError(f"this base attends through a sliding window of {model.sliding_window} positions, which "
                         "the Core ML export does not model: use --format onnx")
    if max_context > model.fixed_rope_positions:
        raise ClaraError(f"max_context {max_context} is past the {model.fixed_rope_positions} positions this base "
                         "keeps its original RoPE frequencies for (an export holds them fixed): use at most that")
    tmp = export_staging_dir(out_dir)
    try:
        models = {role: quantize_mlmodel(m, quant, palettize, has_lm_head=role == "generator")
                  for role, m in convert_roles(model, quant, max_context).items()}
        sizes = save_multifunction(models, tmp / PACKAGE)
        write_common(model, tmp, quant)
        from .onnx_export import _cache_shape

        with _export_view(model) as work:
            layers, kv, hd = _cache_shape(work)
        manifest = base_manifest(model, "coreml", quant, source)
        manifest.update({
            "package": PACKAGE, "functions": list(ROLES), "lora": "shared", "max_context": max_context,
            "num_layers": layers, "num_kv_heads": kv, "head_dim": hd, "palettized": bool(palettize and quant == "int4"),
            "compute_precision": "fp32" if quant == "fp32" else "fp16", "deployment_target": "iOS18/macOS15",
            "kv_dtype": "float16",  # Core ML states are fp16 at every precision
            "weights_shared_saved_mb": round(sizes["separate_mb"] - sizes["multifunction_mb"], 2), **sizes})
        return finish_export(tmp, out_dir, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_spec(export_dir: str | Path) -> dict:
    """Linux-side checks of a Core ML export: functions, inputs / outputs / states, spec version, weight ops."""
    import coremltools as ct

    from clara_edge.onnx_backend import read_manifest

    path = Path(export_dir)
    manifest = read_manifest(path, "coreml")
    spec = ct.utils.load_spec(str(path / manifest["package"]))
    desc = spec.description
    functions = {f.name: {"inputs": [i.name for i in f.input], "outputs": [o.name for o in f.output],
                          "states": [s.name for s in f.state]} for f in desc.functions}
    ops: dict[str, int] = {}
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                ops[op.type] = ops.get(op.type, 0) + 1
    expected = {"compressor": (["inputs_embeds"], ["memories"], []), "query": (["inputs_embeds"], ["memories"], []),
                "generator": (["inputs_embeds", "causal_mask"], ["logits"], ["key_cache", "value_cache"])}
    problems = [f"{name}: {functions.get(name)}" for name, (i, o, s) in expected.items()
                if functions.get(name) != {"inputs": i, "outputs": o, "states": s}]
    return {"specification_version": spec.specificationVersion, "functions": functions,
            "default_function": desc.defaultFunctionName, "weight_ops": {k: v for k, v in ops.items()
                                                                         if k.startswith("constexpr")},
            "problems": problems}
