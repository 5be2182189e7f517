"""Triton attention kernels for CLaRa's memory tokens, with PyTorch references (also the CPU path).

Kernels (each in its own module, each with a reference in `reference.py`):
    prefill_attention / prefill_attention_batched   varlen, causal bottom-right, GQA     prefill_attention.py
    decode_attention                                split-KV + LSE merge, GQA            decode_attention.py
    decode_attention_quant                          int8 / fp8 memory KV + fp16 tail     decode_attention_quant.py
    cascade_decode_attention                        shared memory prefix read once       cascade_attention.py
transformers integration ("clara_triton" attention implementation): hf_attention.py.

The kernel modules are imported lazily, on first attribute access: Triton decides at decoration time whether a
kernel is compiled or interpreted (TRITON_INTERPRET=1), so importing this package must not decorate anything.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import torch

from .reference import (cascade_decode_reference, decode_attention_quant_reference, decode_attention_reference,
                        dequantize_kv, merge_states_reference, prefill_attention_batched_reference,
                        prefill_attention_reference, quantize_kv, rel_error)

# public name -> module that defines it (None: the name is a module, e.g. hf_attention)
_LAZY = {
    "prefill_attention": "prefill_attention",
    "prefill_attention_batched": "prefill_attention",
    "decode_attention": "decode_attention",
    "decode_attention_quant": "decode_attention_quant",
    "cascade_decode_attention": "cascade_attention",
    "hf_attention": None,
}
# Modules named after their main function. Importing a submodule binds it on its package, which would replace
# the function `clara_edge.kernels.decode_attention` by the module `decode_attention.py`; the package class
# below refuses that binding (the module stays importable and in sys.modules; use importlib.import_module to
# get it), so `from clara_edge.kernels import decode_attention` is always the function.
_SHADOWED = frozenset(name for name, module in _LAZY.items() if module == name)


class _KernelsPackage(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _KernelsPackage


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name] or name}", __name__)
    return module if _LAZY[name] is None else getattr(module, name)


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on `device`: CUDA with triton installed, or the interpreter."""
    device = torch.device(device)
    if device.type == "cpu":
        return os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
    return device.type == "cuda" and torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


__all__ = ["cascade_decode_attention", "cascade_decode_reference", "decode_attention", "decode_attention_quant",
           "decode_attention_quant_reference", "decode_attention_reference", "dequantize_kv", "hf_attention",
           "merge_states_reference", "prefill_attention", "prefill_attention_batched",
           "prefill_attention_batched_reference", "prefill_attention_reference", "quantize_kv", "rel_error",
           "triton_available"]
