"""bitsandbytes int8 (LLM.int8) / nf4 weights for the torch backend's frozen base, where bitsandbytes runs.

Only the base transformer's linear layers are replaced (peft keeps each LoRA adapter in full precision beside
them, QLoRA-style); embeddings, norms and lm_head stay as they are, and so do the model's fingerprints (they
describe the unquantised weights the memories were built with). bitsandbytes runs on CUDA, and on CPU from
0.46 where its CPU kernels cover the layer type; `bnb_unavailable` says in one line why it cannot run here.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from clara_edge.errors import ClaraError
from clara_edge.model import ClaraModel

BNB_MODES = ("int8", "nf4")


def bnb_unavailable(device: str = "cpu") -> str | None:
    """Why bitsandbytes cannot quantise on `device` (one line), or None."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not installed or does not load ({type(e).__name__}); torch backend stays fp32/bf16"
    if device.startswith("cuda") and not torch.cuda.is_available():
        return "bitsandbytes int8/nf4 needs CUDA here, and no CUDA device is available"
    if device == "cpu" and tuple(int(x) for x in bnb.__version__.split(".")[:2]) < (0, 46):
        return f"bitsandbytes {bnb.__version__} has no CPU kernels (0.46+ has)"
    return None


def _quantized_linear(layer: nn.Linear, mode: str, device: str) -> nn.Module:
    import bitsandbytes as bnb

    bias = layer.bias is not None
    if mode == "int8":
        new = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False,
                                  threshold=6.0)
        new.weight = bnb.nn.Int8Params(layer.weight.data.to(torch.float16), requires_grad=False)
    else:
        new = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, compute_dtype=torch.float16,
                                quant_type="nf4")
        new.weight = bnb.nn.Params4bit(layer.weight.data.to(torch.float16), requires_grad=False, quant_type="nf4")
    if bias:
        new.bias = nn.Parameter(layer.bias.data.to(torch.float16), requires_grad=False)
    return new.to(device)  # moving to the device quantises the weights


def base_linears(decoder: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The decoder's base linear layers: the ones LoRA wraps (their `base_layer`) and the ones it does not (the MLP,
    when adapters sit on attention only), never the LoRA matrices themselves."""
    return [(name, mod) for name, mod in decoder.named_modules()
            if type(mod) is nn.Linear and not any(part.startswith("lora_") for part in name.split("."))]


def quantize_bnb(model: ClaraModel, mode: str = "nf4", device: str = "cuda") -> ClaraModel:
    """A copy of `model` whose base linear layers are bitsandbytes int8 / nf4 (LoRA and lm_head untouched)."""
    if mode not in BNB_MODES:
        raise ClaraError(f"unknown bitsandbytes mode {mode!r}: use {', '.join(BNB_MODES)}")
    reason = bnb_unavailable(device)
    if reason:
        raise ClaraError(reason)
    out = copy.deepcopy(model)
    decoder = out.lm.get_base_model().get_decoder()
    for name, layer in base_linears(decoder):
        parent_name, _, child = name.rpartition(".")
        setattr(decoder.get_submodule(parent_name), child, _quantized_linear(layer, mode, device))
    out.to(device)
    out.bnb_mode = mode
    return out.eval()
