"""The one small interface every execution backend implements, and how a model name picks one.

`ClaraModel` (PyTorch on CPU / CUDA / MPS) is the reference implementation; the ONNX Runtime and Core ML
backends load export directories and implement the same five members.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import ClaraError
from .model import ClaraConfig, Generation

EXPORT_MANIFEST = "clara_export.json"  # marks an export directory; it is itself a model
EXPORTER_REVISION = 6  # bumped when exporting the same model gives different graphs (2: fused ONNX generator;
# 3: the ONNX generator merges its LoRA by default; 4: quantised nodes carry their block offsets as weight rows;
# 5: 8-bit nodes read their inputs' outlier channels as a block of their own; 6: int4 `--lora merged` keeps the
# merged roles' base weights at 8 bits, Core ML int4 encoders quantise their widest linear too, longrope and
# dynamic-NTK RoPE held at their original frequencies)
BACKENDS = ("torch", "onnx", "coreml")


@runtime_checkable
class Backend(Protocol):
    """What the runtime needs from a model, whatever executes it."""

    name: str
    config: ClaraConfig
    tokenizer: Any

    max_positions: int  # the generator's context window
    retrieval_centre: torch.Tensor | None  # [n_mem, hidden], subtracted before cosine (clara_edge.retrieval)

    def fingerprint(self) -> str:
        """Identity of the compressor: a memory store must have been built with the same one."""

    def compress(self, docs: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Documents -> memories [n_docs, n_mem, hidden]."""

    def encode_query(self, questions: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Questions -> query memories [n_questions, n_mem, hidden]."""

    def prompt_ids(self, question: str, n_docs: int) -> list[int]:
        """The generator prompt for `n_docs` memory blocks (its length sets the context budget)."""

    def generate(self, questions: Sequence[str], memories: Sequence[torch.Tensor], max_new_tokens: int = 64,
                 **sampling) -> Generation:
        """Answer each question from its memories [k_i, n_mem, hidden]; `on_token` streams pieces."""


def export_manifest(path: Path) -> dict | None:
    manifest = path / EXPORT_MANIFEST
    if not manifest.is_file():
        return None
    try:
        return json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClaraError(f"corrupted export manifest {manifest}: {e}") from None


def open_backend(model: str | None = None, backend: str = "auto", compression: int | None = None,
                 device: str | None = None, dtype: str | None = None, base: str | None = None) -> Backend:
    """Load `model` on `backend`; `auto` follows the model (an export directory names its own format)."""
    if backend not in ("auto", *BACKENDS):
        raise ClaraError(f"unknown backend {backend!r}: use auto, {', '.join(BACKENDS)}")
    manifest = export_manifest(Path(model).expanduser()) if model else None
    kind = manifest["format"] if manifest else "torch"
    if backend not in ("auto", kind):
        named = f"model {model}" if model else "the default model"
        article = "an" if backend[0] in "aeiou" else "a"
        raise ClaraError(f"{named} is a {kind} model; --backend {backend} needs {article} {backend} export "
                         f"(make one with `clara-edge export --format {backend}`)")
    if kind == "torch":
        from .checkpoint import load_model
        return load_model(model, compression, device, dtype, base)
    if kind == "onnx":
        from .onnx_backend import OnnxBackend
        return OnnxBackend(Path(model), manifest)
    if kind == "coreml":
        from .coreml_backend import CoreMLBackend
        return CoreMLBackend(Path(model), manifest)
    raise ClaraError(f"export {model} has unknown format {kind!r}")
