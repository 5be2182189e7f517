"""The export toolchain's entry points, for `clara-edge export` and scripts.

    export_model(model, fmt, quant, out_dir, source=None, **options) -> Path
    check_export(export_dir, reference_model=None, questions=QUESTIONS, dev_file=None, n_dev=100,
                 json_out=None, probe=True, max_new_tokens=32) -> dict
    check_memory_quant(model, dtype="int8", questions=QUESTIONS, dev_file=None, n_dev=100, ...) -> dict
    check_bnb(model, mode="int8"|"nf4", device="cpu", questions=QUESTIONS, dev_file=None, n_dev=100, ...) -> dict
"""
from __future__ import annotations

from pathlib import Path

from clara_edge.errors import ClaraError
from clara_edge.model import ClaraModel

from .parity import check_bnb, check_export, check_memory_quant
from .quantize import QUANTS

FORMATS = ("onnx", "coreml")

__all__ = ["FORMATS", "QUANTS", "check_bnb", "check_export", "check_memory_quant", "export_model"]


def export_model(model: ClaraModel, fmt: str, quant: str, out_dir: str | Path, source: str | None = None,
                 **options) -> Path:
    """Export `model` (a torch ClaraModel) to `out_dir` as `fmt` (onnx | coreml) with `quant` weights.

    `source` is how the model was named (checkpoint dir, base model; None for the default): it is recorded so
    `check_export` can rebuild the fp32 reference. Options: onnx `lora="merged-generator"|"shared"|"merged"`, `accuracy_level`
    (MatMulNBits, default 4); coreml `max_context=1024`, `palettize=False`. An fp32 ONNX export as `model`
    with fmt onnx is requantised without the torch model or a new trace. Returns the export directory
    (itself a model wherever --model is accepted).
    """
    from clara_edge.onnx_backend import OnnxBackend

    from .onnx_export import check_out_dir

    if fmt not in FORMATS:
        raise ClaraError(f"unknown export format {fmt!r}: use {', '.join(FORMATS)}")
    if quant not in QUANTS:
        raise ClaraError(f"unknown quantisation {quant!r}: use {', '.join(QUANTS)}")
    check_out_dir(out_dir)  # before minutes of tracing, not after
    if isinstance(model, OnnxBackend) and fmt == "onnx":
        from .onnx_export import requantize_export

        lora = options.get("lora")
        if lora is not None and lora != model.manifest["lora"]:
            raise ClaraError(f"{model.path} is a {model.manifest['lora']!r} export: requantising keeps its LoRA "
                             f"layout; export --lora {lora} from the torch model instead")
        return requantize_export(model.path, out_dir, quant, options.get("accuracy_level"))
    if not isinstance(model, ClaraModel):
        raise ClaraError("export needs a torch model (a checkpoint, base model or the default) or, for --format "
                         "onnx, an fp32 ONNX export to requantise")
    named = Path(source).expanduser() if source else None
    source = str(named.resolve()) if named is not None and named.exists() else source  # valid from any cwd
    if fmt == "onnx":
        from .onnx_export import export_onnx

        return export_onnx(model, out_dir, quant, source=source, **options)
    from .coreml_export import export_coreml

    return export_coreml(model, out_dir, quant, source=source, **options)
