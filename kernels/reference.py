"""PyTorch references for the attention kernels; also the CPU path of `clara_edge.kernels`.

Nothing here imports Triton, so this module is safe to import anywhere (the Triton interpreter switch,
TRITON_INTERPRET=1, is read when a kernel is *decorated*, and the kernel modules are only imported lazily).

Conventions shared by every kernel in this package
--------------------------------------------------
* GQA: query head `h` reads KV head `h // (Hq // Hkv)`; `Hq % Hkv == 0`.
* Causal masking is aligned to the bottom right (FlashAttention >= 2.1): in a sequence with `Lq` queries and
  `Lk >= Lq` keys, query `i` sees key `j` iff `j <= i + Lk - Lq`. With `Lk = memory slots + prompt` and the
  queries being the prompt, every prompt token sees all the memory slots and the prompt before it.
* A query row that sees no key (only possible when `Lk < Lq`, or a zero-length KV) outputs zeros and has
  log-sum-exp `-inf`.
* LSE values are natural-log `logsumexp(scale * q.k)` in float32.
* Quantised memory KV: `x ~= x_q * scale`; int8 uses a symmetric range of +-127, fp8 is e4m3 (`float8_e4m3fn`,
  max 448). A scale is either per token (`[B, Hkv, N]`) or per head (`[Hkv]` or `[B, Hkv]`).

The references compute in `promote(q.dtype, float32)`: float32 for fp16/bf16/fp32 inputs (the CPU path), and
float64 when given float64 inputs (what the tests do).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)
QUANT_MAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


# --------------------------------------------------------------------------------------------------------------
# Input checks, shared by the references and the Triton launchers so that both paths accept the same inputs and
# raise the same ValueError.
# --------------------------------------------------------------------------------------------------------------
def check_tensor(name: str, t, ndim: int | None = None, dtypes: Iterable[torch.dtype] | None = None,
                 device: torch.device | None = None, last_dim_contiguous: bool = True) -> None:
    """Raise ValueError unless `t` is a tensor with the given rank, dtype, device and a unit stride on its last dim."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in tuple(dtypes):
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).removeprefix('torch.')}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but the query is on {device}: put all inputs on one device")
    if last_dim_contiguous and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)}); call .contiguous()")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int, head_axis: int = 1,
              dtypes: Iterable[torch.dtype] | None = None, last_dim_contiguous: bool = False) -> int:
    """Rank / dtype / device / layout checks of a (q, k, v) triple; returns the GQA group size."""
    check_tensor("q", q, ndim=ndim, dtypes=dtypes, last_dim_contiguous=last_dim_contiguous)
    check_tensor("k", k, ndim=ndim, device=q.device, last_dim_contiguous=last_dim_contiguous)
    check_tensor("v", v, ndim=ndim, device=q.device, last_dim_contiguous=last_dim_contiguous)
    return check_gqa(q.shape[head_axis], k.shape[head_axis])


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}: they must match")


def check_gqa(hq: int, hkv: int) -> int:
    """Return the GQA group size Hq // Hkv, or raise if the head counts do not divide."""
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    return hq // hkv


def check_lengths(name: str, lens: torch.Tensor | None, batch: int, maximum: int, device: torch.device) -> None:
    """Optional per-sequence lengths: int32 [B], on the query's device. Values are trusted (no device sync)."""
    if lens is None:
        return
    check_tensor(name, lens, ndim=1, dtypes=(torch.int32,), device=device)
    if lens.shape[0] != batch:
        raise ValueError(f"{name} must have shape [{batch}] (one length per sequence, <= {maximum}), "
                         f"got {tuple(lens.shape)}")


def check_cu_seqlens(name: str, cu: torch.Tensor, device: torch.device) -> int:
    """cu_seqlens: int32 [B + 1], starting at 0 and non-decreasing. Returns B."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,), device=device)
    if cu.shape[0] < 2:
        raise ValueError(f"{name} must have B + 1 >= 2 entries, got {cu.shape[0]}")
    return cu.shape[0] - 1


def default_scale(scale: float | None, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def check_scale_tensor(name: str, s: torch.Tensor, batch: int, hkv: int, n: int, device: torch.device) -> bool:
    """Validate a dequantisation scale and return True if it is per token ([B, Hkv, N]), False if per head."""
    check_tensor(name, s, dtypes=FLOAT_DTYPES, device=device, last_dim_contiguous=False)
    if tuple(s.shape) == (batch, hkv, n):
        return True
    if tuple(s.shape) in ((hkv,), (batch, hkv)):
        return False
    raise ValueError(f"{name} must be per token [B={batch}, Hkv={hkv}, N={n}] or per head [Hkv] / [B, Hkv], "
                     f"got {tuple(s.shape)}")


def per_head_scale_strides(s: torch.Tensor) -> tuple[int, int]:
    """(batch stride, head stride) of a per-head scale; a [Hkv] scale is shared by the whole batch."""
    return (0, s.stride(0)) if s.dim() == 1 else (s.stride(0), s.stride(1))


# --------------------------------------------------------------------------------------------------------------
# Accuracy helpers (tests and the GPU benchmark)
# --------------------------------------------------------------------------------------------------------------
def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; any non-finite value in `out` (e.g. an unwritten NaN) gives inf."""
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if out64.shape != ref64.shape:
        raise ValueError(f"shape mismatch: {tuple(out64.shape)} vs {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


@contextlib.contextmanager
def poisoned_allocations():
    """Debug aid: inside the block, torch.empty / torch.empty_like return float tensors filled with NaN, so any
    output element (or partial state) that a kernel forgets to write shows up as NaN instead of stale memory."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(math.nan) if t.is_floating_point() else t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


# --------------------------------------------------------------------------------------------------------------
# Core: masked softmax attention for one sequence, in the compute dtype
# --------------------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
            scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [Hq, M, D], k/v [Hkv, N, D], visible [M, N] or [Hq, M, N] bool -> (out [Hq, M, D], lse [Hq, M]).

    Rows with no visible key give zeros and lse = -inf (not NaN), the kernels' convention.
    """
    group = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = torch.einsum("hmd,hnd->hmn", q, k) * scale
    if visible is not None:
        scores = scores.masked_fill(~visible, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)                                   # -inf for empty rows
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))   # exp(-inf) = 0 for masked keys
    if visible is not None:
        probs = probs.masked_fill(~visible, 0.0)
    return torch.einsum("hmn,hnd->hmd", probs, v), lse


def causal_bottom_right_mask(lq: int, lk: int, device: torch.device | None = None) -> torch.Tensor:
    """[lq, lk] bool: query i sees key j iff j <= i + lk - lq."""
    i = torch.arange(lq, device=device).unsqueeze(1)
    j = torch.arange(lk, device=device).unsqueeze(0)
    return j <= i + (lk - lq)


# --------------------------------------------------------------------------------------------------------------
# Prefill
# --------------------------------------------------------------------------------------------------------------
def prefill_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                                cu_seqlens_k: torch.Tensor, causal: bool = True, scale: float | None = None,
                                return_lse: bool = False):
    """Packed variable-length prefill.

    q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens_q/k int32 [B + 1]
    -> out [total_q, Hq, D] (q's dtype) and, with return_lse, lse [Hq, total_q] float32 (float64 for float64 q).
    """
    check_qkv(q, k, v, ndim=3)
    scale = default_scale(scale, q.shape[-1])
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=cdt, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), -math.inf, dtype=cdt, device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        qs, qe, ks, ke = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if qe == qs:
            continue
        qb = q[qs:qe].transpose(0, 1).to(cdt)
        kb, vb = k[ks:ke].transpose(0, 1).to(cdt), v[ks:ke].transpose(0, 1).to(cdt)
        visible = causal_bottom_right_mask(qe - qs, ke - ks, q.device) if causal else None
        o, l = _attend(qb, kb, vb, visible, scale)
        out[qs:qe] = o.transpose(0, 1)
        lse[:, qs:qe] = l
    out = out.to(q.dtype)
    return (out, lse.to(torch.float32 if cdt != torch.float64 else cdt)) if return_lse else out


def prefill_attention_batched_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                                        scale: float | None = None) -> torch.Tensor:
    """Padded-batch prefill, transformers' layout: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Tq, Hq, D]."""
    check_qkv(q, k, v, ndim=4)
    scale = default_scale(scale, q.shape[-1])
    cdt = _compute_dtype(q.dtype)
    visible = causal_bottom_right_mask(q.shape[2], k.shape[2], q.device) if causal else None
    outs = [_attend(q[b].to(cdt), k[b].to(cdt), v[b].to(cdt), visible, scale)[0] for b in range(q.shape[0])]
    return torch.stack(outs).transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Decode
# --------------------------------------------------------------------------------------------------------------
def _decode_from_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
                       scale: float, return_lse: bool):
    """q [B, Hq, D], k/v [B, Hkv, N, D] (compute dtype), visible [B, N] -> out [B, Hq, D] (+ lse [B, Hq])."""
    if q.shape[0] == 0:
        return torch.empty_like(q), q.new_empty(q.shape[:2])
    outs, lses = [], []
    for b in range(q.shape[0]):
        vis = None if visible is None else visible[b].unsqueeze(0)
        o, l = _attend(q[b].unsqueeze(1), k[b], v[b], vis, scale)
        outs.append(o[:, 0])
        lses.append(l[:, 0])
    return torch.stack(outs), torch.stack(lses)


def _length_mask(lens: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """[B, n] bool: position < lens[b] (all True when lens is None)."""
    if lens is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return torch.arange(n, device=device).unsqueeze(0) < lens.to(device).long().unsqueeze(1)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               kv_lens: torch.Tensor | None = None, scale: float | None = None,
                               return_lse: bool = False):
    """One new token per sequence: q [B, Hq, D], k/v [B, Hkv, N, D], kv_lens int32 [B] (default N)
    -> out [B, Hq, D] (q's dtype) and, with return_lse, lse [B, Hq]."""
    check_tensor("q", q, ndim=3, last_dim_contiguous=False)
    check_tensor("k", k, ndim=4, device=q.device, last_dim_contiguous=False)
    check_tensor("v", v, ndim=4, device=q.device, last_dim_contiguous=False)
    check_gqa(q.shape[1], k.shape[1])
    scale = default_scale(scale, q.shape[-1])
    cdt = _compute_dtype(q.dtype)
    visible = _length_mask(kv_lens, q.shape[0], k.shape[2], q.device)
    out, lse = _decode_from_dense(q.to(cdt), k.to(cdt), v.to(cdt), visible, scale, return_lse)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Quantised memory KV
# --------------------------------------------------------------------------------------------------------------
def quantize_kv(x: torch.Tensor, dtype: torch.dtype = torch.int8, per_token: bool = True,
                scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation of x [B, Hkv, N, D] -> (x_q same shape in `dtype`, scale).

    per_token: scale [B, Hkv, N] (amax over D); otherwise one scale per (sequence, head): [B, Hkv].
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES + (torch.float64,), last_dim_contiguous=False)
    if dtype not in QUANT_DTYPES:
        raise ValueError(f"quantised dtype must be int8 or float8_e4m3fn, got {dtype}")
    qmax = QUANT_MAX[dtype]
    x32 = x.to(torch.float32)
    amax = x32.abs().amax(dim=-1) if per_token else x32.abs().amax(dim=(-2, -1))
    scale = (amax / qmax).clamp_min(1e-8).to(scale_dtype)
    s = scale.to(torch.float32)
    s = s.unsqueeze(-1) if per_token else s[:, :, None, None]
    y = x32 / s
    xq = y.round().clamp(-qmax, qmax).to(dtype) if dtype == torch.int8 else y.clamp(-qmax, qmax).to(dtype)
    return xq, scale


def dequantize_kv(xq: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize_kv: xq [B, Hkv, N, D] with a per-token [B, Hkv, N] or per-head [Hkv]/[B, Hkv] scale."""
    s = scale.to(dtype)
    if s.dim() == 3:
        s = s.unsqueeze(-1)
    elif s.dim() == 2:
        s = s[:, :, None, None]
    else:
        s = s[None, :, None, None]
    return xq.to(dtype) * s


def decode_attention_quant_reference(q: torch.Tensor, k_mem: torch.Tensor, v_mem: torch.Tensor,
                                     k_scale: torch.Tensor, v_scale: torch.Tensor, k_tail: torch.Tensor,
                                     v_tail: torch.Tensor, mem_lens: torch.Tensor | None = None,
                                     tail_lens: torch.Tensor | None = None, scale: float | None = None,
                                     return_lse: bool = False):
    """Decode over [quantised memory prefix | fp16/bf16 tail].

    q [B, Hq, D]; k_mem/v_mem [B, Hkv, Nm, D] int8 or float8_e4m3fn with scales (see quantize_kv);
    k_tail/v_tail [B, Hkv, Nt, D] in q's dtype; mem_lens/tail_lens int32 [B] (defaults Nm, Nt).
    Sequence b attends to memory[:mem_lens[b]] followed by tail[:tail_lens[b]]. -> out [B, Hq, D] (+ lse [B, Hq]).
    """
    check_tensor("q", q, ndim=3, last_dim_contiguous=False)
    cdt = _compute_dtype(q.dtype)
    batch = q.shape[0]
    km, vm = dequantize_kv(k_mem, k_scale, cdt), dequantize_kv(v_mem, v_scale, cdt)
    k = torch.cat([km, k_tail.to(cdt)], dim=2)
    v = torch.cat([vm, v_tail.to(cdt)], dim=2)
    visible = torch.cat([_length_mask(mem_lens, batch, k_mem.shape[2], q.device),
                         _length_mask(tail_lens, batch, k_tail.shape[2], q.device)], dim=1)
    check_gqa(q.shape[1], k.shape[1])
    out, lse = _decode_from_dense(q.to(cdt), k, v, visible, default_scale(scale, q.shape[-1]), return_lse)
    return (out.to(q.dtype), lse) if return_lse else out.to(q.dtype)


def cascade_decode_reference(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                             k_suffix: torch.Tensor, v_suffix: torch.Tensor, suffix_lens: torch.Tensor | None = None,
                             scale: float | None = None) -> torch.Tensor:
    """Decode where every sequence shares one memory prefix: q [B, Hq, D], k/v_prefix [Hkv, Np, D],
    k/v_suffix [B, Hkv, Ns, D], suffix_lens int32 [B] -> out [B, Hq, D]."""
    batch = q.shape[0]
    k = torch.cat([k_prefix.unsqueeze(0).expand(batch, -1, -1, -1), k_suffix], dim=2)
    v = torch.cat([v_prefix.unsqueeze(0).expand(batch, -1, -1, -1), v_suffix], dim=2)
    visible = torch.cat([_length_mask(None, batch, k_prefix.shape[1], q.device),
                         _length_mask(suffix_lens, batch, k_suffix.shape[2], q.device)], dim=1)
    cdt = _compute_dtype(q.dtype)
    out, _ = _decode_from_dense(q.to(cdt), k.to(cdt), v.to(cdt), visible, default_scale(scale, q.shape[-1]), False)
    return out.to(q.dtype)


def merge_states_reference(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over disjoint key sets: outs [..., D] (each normalised over its keys), lses [...] natural log.

    out = sum_i exp(lse_i - lse) * out_i with lse = logsumexp_i(lse_i); all -inf -> zeros, -inf.
    """
    lse_all = torch.stack([l.to(torch.float64) for l in lses])
    lse = torch.logsumexp(lse_all, dim=0)
    w = torch.exp(lse_all - lse.nan_to_num(neginf=0.0)).nan_to_num(0.0)
    out = sum(w[i].unsqueeze(-1) * outs[i].to(torch.float64) for i in range(len(outs)))
    return out.to(outs[0].dtype), lse
