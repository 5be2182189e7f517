"""Cascade decode attention: a memory prefix shared by a batch of queries is read once, merged by log-sum-exp.

When B decode queries (e.g. many questions over the same retrieved documents) share the memory prefix, plain
decode reads the prefix K/V B times. Here the prefix pass treats the B * GROUP query rows of a KV head as the
M dimension of a FlashAttention tile: each [BLOCK_N, D] prefix tile is loaded once per BLOCK_M rows (and stays in
L2 across the few row blocks), turning B GEMVs into one GEMM. The per-sequence suffix (prompt/answer KV) runs
through the decode split kernel, both write partial states into one buffer, and the decode merge kernel combines
them (FlashInfer's cascade attention, specialised to decode).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import (_store_partial, check_decode_query, check_kv_pair, choose_num_splits, decode_config,
                               launch_decode_split, merge_partials, partial_buffers, partial_strides,
                               split_chunk)
from .prefill_attention import LOG2E, _attend_range, _empty_state, _finish, _load_rows, block_d, dot_precision
from .reference import check_lengths, check_same_dtype, check_tensor, default_scale


@triton.jit
def _cascade_prefix_kernel(
    Q, KP, VP, O_PART, LSE_PART,
    stride_qb, stride_qh,                  # Q [B, Hq, D]
    stride_kh, stride_kn,                  # KP/VP [Hkv, Np, D], shared by the batch
    stride_vh, stride_vn,
    stride_pb, stride_ph, stride_ps,       # partial buffers (see decode_attention._store_partial)
    batch_size, n_prefix, chunk, qk_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(B * GROUP, BLOCK_M), num_splits, Hkv). Row r of KV head h is query head h * GROUP + r % GROUP
    of sequence r // GROUP; split s covers prefix keys [s * chunk, min((s + 1) * chunk, Np)) and writes slot s."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    kv_head = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < batch_size * GROUP
    seq = (rows // GROUP).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP
    q = _load_rows(Q, seq * stride_qb + head * stride_qh, row_ok, HEAD_DIM, BLOCK_D, True)
    lo = split * chunk
    m_i, l_i, acc = _empty_state(BLOCK_M, BLOCK_D)
    m_i, l_i, acc = _attend_range(q, m_i, l_i, acc, KP + kv_head * stride_kh, VP + kv_head * stride_vh, lo,
                                  tl.minimum(lo + chunk, n_prefix), stride_kn, stride_vn, qk_scale,
                                  HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    out, lse2 = _finish(m_i, l_i, acc)
    _store_partial(O_PART, LSE_PART, seq * stride_pb + head * stride_ph + split * stride_ps, row_ok, out, lse2,
                   HEAD_DIM, BLOCK_D)


def _prefix_config(rows: int, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    block_m = 64 if rows >= 64 else max(16, triton.next_power_of_2(rows))
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=3)


def cascade_decode_attention(q: torch.Tensor, k_prefix: torch.Tensor, v_prefix: torch.Tensor,
                             k_suffix: torch.Tensor, v_suffix: torch.Tensor, suffix_lens: torch.Tensor | None = None,
                             scale: float | None = None, prefix_splits: int | None = None,
                             suffix_splits: int | None = None, prefix_config: dict | None = None,
                             suffix_config: dict | None = None) -> torch.Tensor:
    """Decode where all B sequences share one memory prefix.

    q [B, Hq, D] fp16/bf16/fp32; k_prefix/v_prefix [Hkv, Np, D] (q's dtype, D contiguous) shared by the batch;
    k_suffix/v_suffix [B, Hkv, Ns, D] per sequence (Ns may be 0); suffix_lens int32 [B] (default Ns).
    Returns out [B, Hq, D]: attention of each query over prefix followed by suffix[:suffix_lens[b]].
    """
    check_decode_query(q)
    check_tensor("k_prefix", k_prefix, ndim=3, device=q.device)
    check_tensor("v_prefix", v_prefix, ndim=3, device=q.device)
    check_same_dtype("q", q, k_prefix=k_prefix, v_prefix=v_prefix)
    if k_prefix.shape != v_prefix.shape:
        raise ValueError(f"k_prefix and v_prefix must have the same shape, got {tuple(k_prefix.shape)} and "
                         f"{tuple(v_prefix.shape)}")
    group = check_kv_pair(q, k_suffix, v_suffix, ("k_suffix", "v_suffix"), dtype_check=True)
    if k_prefix.shape[0] != k_suffix.shape[1] or k_prefix.shape[2] != q.shape[2]:
        raise ValueError(f"k_prefix must be [Hkv={k_suffix.shape[1]}, Np, D={q.shape[2]}], got "
                         f"{tuple(k_prefix.shape)}")
    batch, hq, d = q.shape
    hkv, n_prefix, n_suffix = k_prefix.shape[0], k_prefix.shape[1], k_suffix.shape[2]
    check_lengths("suffix_lens", suffix_lens, batch, n_suffix, q.device)
    if batch == 0:
        return torch.empty_like(q)

    pcfg = {**_prefix_config(batch * group, q.device), **(prefix_config or {})}
    row_blocks = triton.cdiv(batch * group, pcfg["BLOCK_M"])
    p_splits = (prefix_splits if prefix_splits is not None
                else choose_num_splits(row_blocks * hkv, n_prefix, pcfg["BLOCK_N"], q.device))
    scfg = {**decode_config(d, q.device), **(suffix_config or {})}
    s_splits = ((suffix_splits if suffix_splits is not None
                 else choose_num_splits(batch * hkv, n_suffix, scfg["BLOCK_N"], q.device)) if n_suffix > 0 else 0)
    if p_splits < 1 or s_splits < 0:
        raise ValueError(f"split counts must be positive, got {p_splits} and {s_splits}")
    out = torch.empty_like(q)
    o_part, lse_part = partial_buffers(batch, hq, d, p_splits + s_splits, q.device)
    _cascade_prefix_kernel[(row_blocks, p_splits, hkv)](
        q, k_prefix, v_prefix, o_part, lse_part, q.stride(0), q.stride(1),
        k_prefix.stride(0), k_prefix.stride(1), v_prefix.stride(0), v_prefix.stride(1), *partial_strides(lse_part),
        batch, n_prefix, split_chunk(n_prefix, p_splits, pcfg["BLOCK_N"]), default_scale(scale, d) * LOG2E,
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d(d), DOT_PRECISION=dot_precision(q.dtype), **pcfg)
    if s_splits:
        launch_decode_split(q, k_suffix, v_suffix, suffix_lens, out, o_part, lse_part, s_splits, p_splits, False,
                            scale, scfg)
    merge_partials(o_part, lse_part, out)
    return out


__all__ = ["cascade_decode_attention"]
