"""The Core ML backend: runs an export directory made by `clara-edge export --format coreml` (macOS 15+ only).

One multifunction package (clara.mlpackage) holds the compressor, query and generator functions; the generator
keeps its KV cache in Core ML state (one sequence per state), so generation runs one question at a time.
Tokenization, the embedding table and the decode loop are shared with the ONNX backend (`ExportedBackend`).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .errors import ClaraError
from .onnx_backend import ExportedBackend

MASK_MIN = -1e4  # additive mask value for hidden positions: finite in fp16


def causal_mask(t: int, past: int) -> np.ndarray:
    """Additive mask [1, 1, t, past+t]: query i sees keys 0..past+i."""
    keys = np.arange(past + t)[None, :]
    queries = past + np.arange(t)[:, None]
    return np.where(keys <= queries, 0.0, MASK_MIN).astype(np.float32)[None, None]


class CoreMLBackend(ExportedBackend):
    name = "coreml"
    fmt = "coreml"
    max_batch = 1

    def __init__(self, path: str | Path, manifest: dict | None = None, compute_units: str = "all") -> None:
        if sys.platform != "darwin":
            raise ClaraError("Core ML runs only on macOS (use --backend onnx or torch here)")
        try:
            import coremltools  # noqa: F401
        except ImportError:
            raise ClaraError("the Core ML backend needs coremltools: pip install 'clara-edge[coreml]'") from None
        super().__init__(path, manifest)
        self.compute_units = compute_units
        self.max_context = int(self.manifest.get("max_context", 0))
        if self.max_context:  # the KV state is this long: the context budget must stop there, not the model's window
            self.max_positions = min(self.max_positions, self.max_context)
        self._models: dict = {}

    def function(self, role: str):
        """The role's function of the multifunction package, loaded once."""
        if role not in self._models:
            import coremltools as ct

            units = {"all": ct.ComputeUnit.ALL, "cpu": ct.ComputeUnit.CPU_ONLY,
                     "cpu_gpu": ct.ComputeUnit.CPU_AND_GPU, "cpu_ne": ct.ComputeUnit.CPU_AND_NE}[self.compute_units]
            package = self.path / self.manifest["package"]
            try:
                self._models[role] = ct.models.MLModel(str(package), compute_units=units, function_name=role)
            except Exception as e:  # Core ML raises RuntimeError / its own types
                raise ClaraError(f"cannot load {package} ({role}): {str(e).splitlines()[0][:200]}") from None
        return self._models[role]

    def _encode(self, role: str, embeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Rows one at a time, without their left padding (positions start at 0, as the mask would give)."""
        model = self.function(role)
        out = [model.predict({"inputs_embeds": embeds[b:b + 1, mask[b].argmax():]})["memories"]
               for b in range(embeds.shape[0])]
        return np.concatenate(out).astype(np.float32)

    def _generator_state(self, batch: int) -> dict:
        if batch != 1:
            raise ClaraError("the Core ML generator decodes one sequence per state (batch 1)")
        return {"state": self.function("generator").make_state(), "length": 0}

    def _crop_state(self, state: dict, n: int) -> dict:
        """The state's cache tensors stay as they are: the next step writes from position n on and its causal
        mask, n + T wide, never reads past what it wrote."""
        return {"state": state["state"], "length": n}

    def _generator_step(self, embeds: np.ndarray, mask: np.ndarray, positions: np.ndarray, state: dict):
        t = embeds.shape[1]
        total = state["length"] + t
        if total > self.max_context:
            raise ClaraError(f"context of {total} positions exceeds this Core ML export's {self.max_context} "
                             "(re-export with a larger max context)")
        out = self.function("generator").predict(
            {"inputs_embeds": embeds.astype(np.float32), "causal_mask": causal_mask(t, state["length"])},
            state=state["state"])
        return np.asarray(out["logits"], dtype=np.float32).reshape(1, -1), {"state": state["state"], "length": total}
