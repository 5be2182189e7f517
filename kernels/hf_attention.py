"""transformers integration: the Triton kernels as an attention implementation named "clara_triton".

    from clara_edge.kernels import hf_attention
    hf_attention.enable(model)    # model.config._attn_implementation = "clara_triton"
    hf_attention.disable(model)   # back to "sdpa"

`clara_triton_attention` has transformers 5.x's attention-interface signature. It runs the Triton kernels when
they compute exactly what SDPA would (CUDA tensors, no explicit mask, no dropout, softcap, sinks, position bias,
gradients or paged cache) and otherwise calls transformers' own SDPA function with the same arguments, so the
model's output never depends on which path was taken (the CPU path is always SDPA):

* one query token (decode) -> decode_attention over the whole KV, as SDPA does with no mask;
* several query tokens, causal -> prefill_attention_batched. transformers passes no mask only when
  q_len == kv_len (or when a static cache is empty, where SDPA slices the keys to q_len and applies its
  top-left causal mask; we slice the same way, after which top-left == bottom-right).

The mask interface is registered as SDPA's, so the model builds the same masks (None when causal is enough,
a boolean [B, 1, T, S] tensor with padding) and padded batches take the SDPA path.

Triton is imported only when a kernel is actually called on a supported input, so importing this module (and
enabling it) on a CPU-only machine never touches Triton.
"""
from __future__ import annotations

import torch

NAME = "clara_triton"
FALLBACK = "sdpa"
# Tests only: run the kernels on CPU tensors (needs TRITON_INTERPRET=1 before the kernels are imported).
FORCE_KERNELS_ON_CPU = False
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "cache")


def _sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def kernel_unsupported_reason(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask, dropout: float, kwargs: dict) -> str | None:
    """Why this call must go to SDPA, or None when the Triton kernels compute the same result."""
    if query.device.type != "cuda" and not FORCE_KERNELS_ON_CPU:
        return f"device {query.device.type}"
    if attention_mask is not None:
        return "explicit attention mask"
    if dropout and getattr(module, "training", False):
        return "dropout"
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return "autograd (forward-only kernels)"
    if query.dtype not in _SUPPORTED_DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype}"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not [B, H, T, D]"
    d = query.shape[-1]
    if key.shape[-1] != d or value.shape[-1] != d or d > 256:
        return f"head dims q={d} k={key.shape[-1]} v={value.shape[-1]}"
    if query.shape[1] % key.shape[1] != 0 or key.shape[:3] != value.shape[:3] or key.shape[0] != query.shape[0]:
        return "head or batch layout"
    if any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS):
        return "softcap / sinks / position bias / paged cache"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    is_causal = kwargs.get("is_causal")
    if query.shape[2] > 1 and key.shape[2] < query.shape[2] and (
            getattr(module, "is_causal", True) if is_causal is None else is_causal):
        return "causal with fewer keys than queries (SDPA aligns that mask top-left, the kernel bottom-right)"
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        return "sliding window shorter than the KV"
    if any(s != 1 for s in (query.stride(-1), key.stride(-1), value.stride(-1))):
        return "head dim not contiguous"
    return None


def clara_triton_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, S, D] -> (attn_output [B, T, Hq, D], None)."""
    if kernel_unsupported_reason(module, query, key, value, attention_mask, dropout, kwargs) is not None:
        return _sdpa(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    q_len = query.shape[2]
    if q_len == 1:
        from .decode_attention import decode_attention

        batch, hq, _, d = query.shape
        out = torch.empty((batch, 1, hq, d), dtype=query.dtype, device=query.device)
        decode_attention(query[:, :, 0], key, value, scale=scaling, out=out[:, 0])
        return out, None

    from .prefill_attention import prefill_attention_batched

    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    if is_causal and key.shape[2] > q_len:
        # Same as transformers' SDPA path: no mask with more keys than queries only happens for an empty static
        # cache, whose keys past q_len are unused slots.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    return prefill_attention_batched(query, key, value, causal=bool(is_causal), scale=scaling), None


def register() -> None:
    """Register "clara_triton" with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, clara_triton_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def enable(model):
    """Switch a loaded transformers model (and its sub-models) to the Triton kernels; returns the model."""
    register()
    model.set_attn_implementation(NAME)
    return model


def disable(model, implementation: str = FALLBACK):
    """Switch the model back to SDPA (or another registered implementation); returns the model."""
    model.set_attn_implementation(implementation)
    return model


def configure(model, implementation: str = "auto"):
    """The backend's switch: "auto" enables the kernels when the model is on CUDA and Triton is installed,
    "triton" enables them, "sdpa" (or any other registered name) selects that implementation. Returns the model."""
    if implementation == "auto":
        from . import triton_available

        device = next(model.parameters()).device
        implementation = "triton" if device.type == "cuda" and triton_available(device) else FALLBACK
    if implementation == "triton":
        return enable(model)
    return disable(model, implementation)


def is_enabled(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == NAME


__all__ = ["NAME", "clara_triton_attention", "register", "enable", "disable", "configure", "is_enabled",
           "kernel_unsupported_reason"]
