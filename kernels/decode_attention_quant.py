"""Decode attention over [int8 / fp8 memory prefix | fp16/bf16 tail], dequantisation fused.

The memory slots of CLaRa (a few vectors per retrieved document) are written once and read at every decode
step, so storing their K/V in 8 bits halves the dominant HBM traffic; the prompt/answer tail keeps the model's
dtype. The sequence of sequence b is memory[:mem_lens[b]] followed by tail[:tail_lens[b]].

Dequantisation costs no extra pass and almost no arithmetic: int8 and e4m3 values convert exactly to fp16/bf16
(|int8| <= 127 < 2^8; e4m3 has 3 mantissa bits and a range inside both), and the scales are applied to the
scores and the probabilities instead of the [N, D] tiles:
    q . (k_q * s_k[n]) = (q . k_q) * s_k[n]      and      sum_n p[n] (v_q[n] * s_v[n]) = sum_n (p[n] s_v[n]) v_q[n]
so a per-token scale is one multiply per key, and a per-head scale one multiply per tile.

Split-KV and GQA packing as in decode_attention.py; splits cut the concatenated [memory | tail] index space,
and the partial states go through the same merge kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import (_load_q_group, _store_decode_state, check_decode_query, check_kv_pair,
                               choose_num_splits, decode_config, group_block, merge_partials, partial_buffers,
                               partial_strides, split_chunk)
from .prefill_attention import LOG2E, _attend_range, _empty_state, _load_rows, _softmax_probs, block_d, dot_precision
from .reference import QUANT_DTYPES, check_lengths, check_scale_tensor, default_scale, per_head_scale_strides


@triton.jit
def _decode_quant_split_kernel(
    Q, KM, VM, KS, VS, KT, VT, MEM_LENS, TAIL_LENS, O, O_PART, LSE_PART,
    stride_qb, stride_qh,                       # Q [B, Hq, D] (fp16/bf16/fp32)
    stride_kmb, stride_kmh, stride_kmn,         # KM/VM [B, Hkv, Nm, D] int8 or float8e4nv
    stride_vmb, stride_vmh, stride_vmn,
    stride_ksb, stride_ksh, stride_ksn,         # KS/VS per token [B, Hkv, Nm] or per head (stride_n unused)
    stride_vsb, stride_vsh, stride_vsn,
    stride_ktb, stride_kth, stride_ktn,         # KT/VT [B, Hkv, Nt, D] in Q's dtype
    stride_vtb, stride_vth, stride_vtn,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    n_mem, n_tail, chunk, slot_offset, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PER_TOKEN: tl.constexpr, HAS_MEM_LENS: tl.constexpr, HAS_TAIL_LENS: tl.constexpr,
    WRITE_FINAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (num_splits, Hkv, B). Split s covers positions [s * chunk, (s + 1) * chunk) of the padded index space
    [0, n_mem) memory, [n_mem, n_mem + n_tail) tail; positions past a sequence's lengths are skipped."""
    split = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    mem_len = n_mem
    tail_len = n_tail
    if HAS_MEM_LENS:
        mem_len = tl.minimum(tl.load(MEM_LENS + batch), n_mem)
    if HAS_TAIL_LENS:
        tail_len = tl.minimum(tl.load(TAIL_LENS + batch), n_tail)
    lo = split * chunk
    hi = lo + chunk

    q = _load_q_group(Q, batch, kv_head, stride_qb, stride_qh, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    b64 = batch.to(tl.int64)
    m_i, l_i, acc = _empty_state(BLOCK_G, BLOCK_D)

    # ---- quantised memory prefix: positions [lo, min(hi, mem_len)) ----
    km_base = KM + b64 * stride_kmb + kv_head * stride_kmh
    vm_base = VM + b64 * stride_vmb + kv_head * stride_vmh
    ks_base = KS + b64 * stride_ksb + kv_head * stride_ksh
    vs_base = VS + b64 * stride_vsb + kv_head * stride_vsh
    if not PER_TOKEN:                            # one scale per (sequence, head): fold it into the constants
        k_scale_h = tl.load(ks_base).to(tl.float32)
        v_scale_h = tl.load(vs_base).to(tl.float32)
    mem_hi = tl.minimum(hi, mem_len)
    for start_n in range(lo, mem_hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < mem_hi
        k = _load_rows(km_base, cols.to(tl.int64) * stride_kmn, n_ok, HEAD_DIM, BLOCK_D, True)
        v = _load_rows(vm_base, cols.to(tl.int64) * stride_vmn, n_ok, HEAD_DIM, BLOCK_D, True)
        qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        if PER_TOKEN:
            k_scale = tl.load(ks_base + cols * stride_ksn, mask=n_ok, other=0.0).to(tl.float32)
            v_scale = tl.load(vs_base + cols * stride_vsn, mask=n_ok, other=0.0).to(tl.float32)
            qk = qk * (k_scale * qk_scale)[None, :]
        else:
            qk = qk * (k_scale_h * qk_scale)
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_i, l_i, alpha, p = _softmax_probs(m_i, l_i, qk)
        # Scale V through the probabilities: p[:, n] * s_v[n] (per token) or s_v * (p @ v) (per head).
        if PER_TOKEN:  # relative to the tile's largest scale: p * s_v alone sinks into fp16 subnormals for small V
            vs_max = tl.maximum(tl.max(v_scale, 0), 1e-30)
            pv = tl.dot((p * (v_scale / vs_max)[None, :]).to(q.dtype), v.to(q.dtype),
                        input_precision=DOT_PRECISION) * vs_max
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION) * v_scale_h
        acc = acc * alpha[:, None] + pv

    # ---- fp16/bf16 tail: positions [max(lo, n_mem), min(hi, n_mem + tail_len)) -> tail index t = pos - n_mem ----
    m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, KT + b64 * stride_ktb + kv_head * stride_kth,
                                  VT + b64 * stride_vtb + kv_head * stride_vth, tl.maximum(lo, n_mem) - n_mem,
                                  tl.minimum(hi - n_mem, tail_len), stride_ktn, stride_vtn, qk_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)

    _store_decode_state(O, O_PART, LSE_PART, batch, kv_head, slot_offset + split, m_i, l_i, acc,
                        stride_ob, stride_oh, stride_pb, stride_ph, stride_ps,
                        GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, WRITE_FINAL)


def _scale_strides(s: torch.Tensor, per_token: bool) -> tuple[int, int, int]:
    if per_token:
        return s.stride(0), s.stride(1), s.stride(2)
    return (*per_head_scale_strides(s), 0)


def decode_attention_quant(q: torch.Tensor, k_mem: torch.Tensor, v_mem: torch.Tensor, k_scale: torch.Tensor,
                           v_scale: torch.Tensor, k_tail: torch.Tensor, v_tail: torch.Tensor,
                           mem_lens: torch.Tensor | None = None, tail_lens: torch.Tensor | None = None,
                           scale: float | None = None, return_lse: bool = False, num_splits: int | None = None,
                           config: dict | None = None):
    """Decode over a quantised memory prefix followed by an fp16/bf16 tail.

    q [B, Hq, D] fp16/bf16/fp32; k_mem/v_mem [B, Hkv, Nm, D] int8 or float8_e4m3fn (D contiguous);
    k_scale/v_scale float per token [B, Hkv, Nm] or per head [Hkv] / [B, Hkv] (both the same granularity);
    k_tail/v_tail [B, Hkv, Nt, D] in q's dtype (Nt may be 0); mem_lens/tail_lens int32 [B] (defaults Nm, Nt).
    Returns out [B, Hq, D] and, with return_lse, lse [B, Hq] float32.
    See reference.quantize_kv for producing k_mem/k_scale.
    """
    check_decode_query(q)
    group = check_kv_pair(q, k_mem, v_mem, ("k_mem", "v_mem"), dtype_check=False)
    if k_mem.dtype not in QUANT_DTYPES:
        raise ValueError(f"k_mem/v_mem must be int8 or float8_e4m3fn, got {k_mem.dtype}")
    if check_kv_pair(q, k_tail, v_tail, ("k_tail", "v_tail"), dtype_check=True) != group:
        raise ValueError(f"k_tail has {k_tail.shape[1]} heads but k_mem has {k_mem.shape[1]}")
    batch, hq, d = q.shape
    hkv, n_mem, n_tail = k_mem.shape[1], k_mem.shape[2], k_tail.shape[2]
    per_token = check_scale_tensor("k_scale", k_scale, batch, hkv, n_mem, q.device)
    if check_scale_tensor("v_scale", v_scale, batch, hkv, n_mem, q.device) != per_token:
        raise ValueError("k_scale and v_scale must both be per token or both per head")
    check_lengths("mem_lens", mem_lens, batch, n_mem, q.device)
    check_lengths("tail_lens", tail_lens, batch, n_tail, q.device)

    if batch == 0:
        out = torch.empty_like(q)
        return (out, torch.empty((0, hq), dtype=torch.float32, device=q.device)) if return_lse else out
    cfg = {**decode_config(d, q.device, quantised=True), **(config or {})}
    total = n_mem + n_tail
    splits = (num_splits if num_splits is not None
              else choose_num_splits(batch * hkv, total, cfg["BLOCK_N"], q.device))
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {splits}")
    final = splits == 1 and not return_lse
    out = torch.empty_like(q)
    o_part, lse_part = partial_buffers(batch, hq, d, 1 if final else splits, q.device)
    _decode_quant_split_kernel[(splits, hkv, batch)](
        q, k_mem, v_mem, k_scale, v_scale, k_tail, v_tail,
        mem_lens if mem_lens is not None else q, tail_lens if tail_lens is not None else q, out, o_part, lse_part,
        q.stride(0), q.stride(1),
        k_mem.stride(0), k_mem.stride(1), k_mem.stride(2), v_mem.stride(0), v_mem.stride(1), v_mem.stride(2),
        *_scale_strides(k_scale, per_token), *_scale_strides(v_scale, per_token),
        k_tail.stride(0), k_tail.stride(1), k_tail.stride(2), v_tail.stride(0), v_tail.stride(1), v_tail.stride(2),
        out.stride(0), out.stride(1), *partial_strides(lse_part),
        n_mem, n_tail, split_chunk(total, splits, cfg["BLOCK_N"]), 0, default_scale(scale, d) * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_G=group_block(group), BLOCK_D=block_d(d), PER_TOKEN=per_token,
        HAS_MEM_LENS=mem_lens is not None, HAS_TAIL_LENS=tail_lens is not None, WRITE_FINAL=final,
        DOT_PRECISION=dot_precision(q.dtype), **cfg)
    if final:
        return out
    lse = torch.empty((batch, hq), dtype=torch.float32, device=q.device) if return_lse else None
    merge_partials(o_part, lse_part, out, lse)
    return (out, lse) if return_lse else out


__all__ = ["decode_attention_quant"]
