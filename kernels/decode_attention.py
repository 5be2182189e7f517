"""Decode attention (one new token per sequence) with split-KV (flash-decoding) and a log-sum-exp merge.

Decode is memory bound: every byte of K and V is read once per step and the arithmetic intensity is ~GROUP
flop/byte. Two decisions follow:

* GQA packing: one program serves all `GROUP = Hq // Hkv` query heads of a KV head, as the rows of a
  [BLOCK_G, D] query tile (padded to 16 rows for tl.dot), so each K/V tile is loaded from HBM exactly once.
* Split-KV: with few (batch, KV head) pairs (e.g. B=1 with 3 KV heads) one program per pair would leave most SMs
  idle; the KV sequence is cut into `num_splits` chunks, each program writes a partial (normalised output, LSE)
  and `_merge_kernel` combines them. With enough pairs to fill the GPU, num_splits = 1 and the split kernel
  writes the final output directly (no second launch, no partial traffic).

The partial-state buffers ([B, Hq, S, D] and [B, Hq, S] float32) and the merge kernel are shared with the
quantised-KV and cascade kernels, which write their partials into other slots of the same buffers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prefill_attention import (KERNEL_DTYPES, LN2, LOG2E, _attend_range, _empty_state, _finish, _load_rows,
                                block_d, check_head_dim, dot_precision)
from .reference import check_gqa, check_lengths, check_same_dtype, check_tensor, default_scale


@triton.jit
def _load_q_group(Q, batch, kv_head, stride_qb, stride_qh,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """The GROUP query heads of one KV head as a [BLOCK_G, BLOCK_D] tile (padding rows and columns are zero)."""
    offs_g = tl.arange(0, BLOCK_G)
    heads = kv_head * GROUP + offs_g
    return _load_rows(Q + batch.to(tl.int64) * stride_qb, heads * stride_qh, offs_g < GROUP, HEAD_DIM, BLOCK_D, True)


@triton.jit
def _store_partial(O_PART, LSE_PART, row_index, row_ok, out, lse2, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial state of some rows: row_index [M] int64 = b * stride_pb + h * stride_ph + slot * stride_ps indexes
    LSE_PART [B, Hq, S] and, times HEAD_DIM, O_PART [B, Hq, S, D] (both contiguous float32)."""
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(O_PART + row_index[:, None] * HEAD_DIM + offs_d[None, :], out,
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE_PART + row_index, lse2, mask=row_ok)


@triton.jit
def _store_decode_state(O, O_PART, LSE_PART, batch, kv_head, slot, m_i, l_i, acc,
                        stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        WRITE_FINAL: tl.constexpr):
    """Write the GROUP rows of a decode program: the final output O [B, Hq, D] when the KV was not split, else the
    normalised partial output and its log2-domain LSE at `slot` of the partial buffers."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_g
    g_ok = offs_g < GROUP
    out, lse2 = _finish(m_i, l_i, acc)
    b64 = batch.to(tl.int64)
    if WRITE_FINAL:
        tl.store(O + b64 * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=g_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    else:
        _store_partial(O_PART, LSE_PART, b64 * stride_pb + heads * stride_ph + slot * stride_ps, g_ok, out, lse2,
                       HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_split_kernel(
    Q, K, V, KV_LENS, O, O_PART, LSE_PART,
    stride_qb, stride_qh,                     # Q [B, Hq, D]
    stride_kb, stride_kh, stride_kn,          # K [B, Hkv, N, D] (any strides, D contiguous)
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh,                     # O [B, Hq, D]
    stride_pb, stride_ph, stride_ps,          # LSE_PART [B, Hq, S]; O_PART is the same index * HEAD_DIM + d
    seqlen_k, chunk, slot_offset,             # chunk: keys per split, a multiple of BLOCK_N
    qk_scale,                                 # softmax scale * log2(e)
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENS: tl.constexpr, WRITE_FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (num_splits, Hkv, B). Program (s, h, b) attends the GROUP query heads of KV head h of sequence b to
    keys [s * chunk, min((s + 1) * chunk, kv_len)); an empty range writes LSE = -inf and zeros."""
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_len = seqlen_k
    if HAS_LENS:
        kv_len = tl.minimum(tl.load(KV_LENS + batch), seqlen_k)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, kv_len)

    q = _load_q_group(Q, batch, kv_head, stride_qb, stride_qh, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    b64 = batch.to(tl.int64)
    m_i, l_i, acc = _empty_state(BLOCK_G, BLOCK_D)
    m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, K + b64 * stride_kb + kv_head * stride_kh,
                                  V + b64 * stride_vb + kv_head * stride_vh, lo, hi, stride_kn, stride_vn, qk_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    _store_decode_state(O, O_PART, LSE_PART, batch, kv_head, slot_offset + split, m_i, l_i, acc,
                        stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                        GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, WRITE_FINAL)


@triton.jit
def _merge_kernel(
    O_PART, LSE_PART, O, LSE,
    stride_ob, stride_oh,                 # O [B, Hq, D]
    num_heads, num_slots,                 # O_PART [B, Hq, S, D], LSE_PART [B, Hq, S] float32, contiguous
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """grid = (B * Hq,). out = sum_s 2^(lse_s - lse) * out_s with lse = log2 sum_s 2^lse_s (all -inf -> 0)."""
    row = tl.program_id(0)
    batch = row // num_heads
    head = row % num_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_slots
    base = row.to(tl.int64) * num_slots
    lse = tl.load(LSE_PART + base + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m_safe)                                            # 0 for empty or padding slots
    denom = tl.sum(w, 0)
    parts = tl.load(O_PART + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    out = tl.sum(w[:, None] * parts, 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(O + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    if STORE_LSE:
        lse_all = tl.where(denom == 0.0, float("-inf"), m_safe + tl.log2(tl.where(denom == 0.0, 1.0, denom)))
        tl.store(LSE + row, lse_all * LN2)


# ---------------------------------------------------------------------------------------------------------------
# Launch helpers shared with decode_attention_quant.py and cascade_attention.py
# ---------------------------------------------------------------------------------------------------------------
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_config(head_dim: int, device: torch.device, quantised: bool = False) -> dict:
    """Tile sizes for the decode kernels. CPU (interpreter): small tiles, fastest to interpret."""
    if device.type != "cuda":
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if quantised:       # int8/fp8 tiles are half the bytes: take twice the keys per iteration
        return dict(BLOCK_N=128 if head_dim <= 64 else 64, num_warps=4, num_stages=4)
    return dict(BLOCK_N=128 if head_dim <= 64 else 64, num_warps=4, num_stages=3)


def choose_num_splits(pairs: int, seqlen_k: int, block_n: int, device: torch.device,
                      min_chunk: int = 256) -> int:
    """Enough programs to fill the GPU (about 2 waves), no chunk shorter than `min_chunk` keys."""
    target = 2 * num_sms(device)
    if pairs >= target:
        return 1
    max_splits = max(1, triton.cdiv(seqlen_k, max(min_chunk, block_n)))
    return max(1, min(triton.cdiv(target, pairs), max_splits))


def split_chunk(seqlen_k: int, num_splits: int, block_n: int) -> int:
    """Keys per split, rounded up to whole BLOCK_N tiles (so a split never shares a tile with the next)."""
    return triton.cdiv(triton.cdiv(max(seqlen_k, 1), num_splits), block_n) * block_n


def partial_buffers(batch: int, hq: int, head_dim: int, num_slots: int, device: torch.device):
    """(O_PART [B, Hq, S, D], LSE_PART [B, Hq, S]) float32; every slot is written by exactly one program."""
    o_part = torch.empty((batch, hq, num_slots, head_dim), dtype=torch.float32, device=device)
    lse_part = torch.empty((batch, hq, num_slots), dtype=torch.float32, device=device)
    return o_part, lse_part


def partial_strides(lse_part: torch.Tensor) -> tuple[int, int, int]:
    return lse_part.stride(0), lse_part.stride(1), lse_part.stride(2)


def merge_partials(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor | None = None) -> None:
    """Combine the S partial states of every (sequence, query head) into out [B, Hq, D] (and lse [B, Hq])."""
    batch, hq, slots, d = o_part.shape
    _merge_kernel[(batch * hq,)](o_part, lse_part, out, lse if lse is not None else lse_part,
                                 out.stride(0), out.stride(1), hq, slots, HEAD_DIM=d,
                                 BLOCK_S=max(2, triton.next_power_of_2(slots)), BLOCK_D=block_d(d),
                                 STORE_LSE=lse is not None, num_warps=1 if d <= 64 else 2)


def group_block(group: int) -> int:
    """Query rows per decode program: the GQA group padded to tl.dot's minimum of 16."""
    return max(16, triton.next_power_of_2(group))


def check_decode_query(q: torch.Tensor) -> None:
    check_tensor("q", q, ndim=3, dtypes=KERNEL_DTYPES)
    check_head_dim(q.shape[-1])


def check_kv_pair(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str], dtype_check: bool):
    """k/v [B, Hkv, N, D] for decode query q [B, Hq, D]; returns the GQA group size."""
    check_tensor(names[0], k, ndim=4, device=q.device)
    check_tensor(names[1], v, ndim=4, device=q.device)
    if dtype_check:
        check_same_dtype("q", q, **{names[0]: k, names[1]: v})
    elif k.dtype != v.dtype:
        raise ValueError(f"{names[0]} and {names[1]} must have the same dtype, got {k.dtype} and {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[2]:
        raise ValueError(f"{names[0]} must be [B={q.shape[0]}, Hkv, N, D={q.shape[2]}] for q of shape "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    return check_gqa(q.shape[1], k.shape[1])


def launch_decode_split(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
                        out: torch.Tensor, o_part: torch.Tensor, lse_part: torch.Tensor, splits: int,
                        slot_offset: int, final: bool, scale: float | None, cfg: dict) -> None:
    """Run the split kernel on validated inputs: the final output into `out` (final, one split), else partial
    states into slots [slot_offset, slot_offset + splits) of (o_part, lse_part)."""
    group = q.shape[1] // k.shape[1]
    n, d = k.shape[2], q.shape[2]
    _decode_split_kernel[(splits, k.shape[1], q.shape[0])](
        q, k, v, kv_lens if kv_lens is not None else q, out, o_part, lse_part,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), *partial_strides(lse_part),
        n, split_chunk(n, splits, cfg["BLOCK_N"]), slot_offset, default_scale(scale, d) * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_G=group_block(group), BLOCK_D=block_d(d), HAS_LENS=kv_lens is not None,
        WRITE_FINAL=final, DOT_PRECISION=dot_precision(q.dtype), **cfg)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None = None,
                     scale: float | None = None, return_lse: bool = False, num_splits: int | None = None,
                     config: dict | None = None, out: torch.Tensor | None = None):
    """Split-KV decode attention.

    q [B, Hq, D] (fp16/bf16/fp32), k/v [B, Hkv, N, D] (q's dtype; any strides with D contiguous, e.g. a slice
    of a larger static cache), kv_lens int32 [B] (keys per sequence, default N; values are not checked).
    Returns out [B, Hq, D] and, with return_lse, lse [B, Hq] float32 (natural log, -inf for an empty sequence).
    `num_splits` / `config` (BLOCK_N, num_warps, num_stages) override the heuristics; `out` may be given
    (e.g. a view into transformers' [B, 1, Hq, D] output).
    """
    check_decode_query(q)
    check_kv_pair(q, k, v, ("k", "v"), dtype_check=True)
    batch, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    check_lengths("kv_lens", kv_lens, batch, n, q.device)
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, ndim=3, dtypes=(q.dtype,), device=q.device)
        if out.shape != q.shape:
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if batch == 0:
        return (out, torch.empty((0, hq), dtype=torch.float32, device=q.device)) if return_lse else out
    cfg = {**decode_config(d, q.device), **(config or {})}
    splits = num_splits if num_splits is not None else choose_num_splits(batch * hkv, n, cfg["BLOCK_N"], q.device)
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    # An LSE is only produced by the merge kernel, so a caller asking for it gets the split path.
    final = splits == 1 and not return_lse
    o_part, lse_part = partial_buffers(batch, hq, d, 1 if final else splits, q.device)
    launch_decode_split(q, k, v, kv_lens, out, o_part, lse_part, splits, 0, final, scale, cfg)
    if final:
        return out
    lse = torch.empty((batch, hq), dtype=torch.float32, device=q.device) if return_lse else None
    merge_partials(o_part, lse_part, out, lse)
    return (out, lse) if return_lse else out


__all__ = ["decode_attention", "merge_partials"]
