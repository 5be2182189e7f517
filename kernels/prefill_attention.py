"""Prefill attention over [memory slots | prompt]: FlashAttention-2 forward in Triton.

Causal masking aligned to the bottom right, GQA, and variable lengths in one batch (packed sequences with
cu_seqlens), or a padded batch in transformers' [B, H, T, D] layout. Follows the structure of the Triton
fused-attention tutorial: one program owns BLOCK_M query rows of one head and streams the keys in BLOCK_N blocks
with an online softmax (base-2 exponentials, scale folded into log2(e)).

Two loop stages per program: keys that every row of the block sees (no mask needed, the common case for long
sequences) and the diagonal/edge blocks (causal + length masks). With bottom-right alignment and Lk = Nmem + Lq,
the memory slots are all in the first stage.

The `_softmax_step` helper is the FlashAttention inner step shared by every kernel in this package.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_cu_seqlens, check_qkv, check_same_dtype, default_scale

LOG2E = 1.4426950408889634
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _patch_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar tensor into a Python int with int(array), where scalars are 1-element
    1-d arrays; NumPy >= 2.4 refuses that, which breaks `range(lo, hi)` over loaded bounds. Use .item() instead.
    Only touches the interpreter (TRITON_INTERPRET=1); compiled kernels never go through this path."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_clara_scalar_index", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._clara_scalar_index = True
    interpreter._patch_lang_tensor = patched


if triton.knobs.runtime.interpret:
    _patch_interpreter_scalar_index()


@triton.jit
def _softmax_probs(m_i, l_i, qk):
    """Online-softmax bookkeeping for one tile of scores qk [M, N] in log2 units (masked entries -inf).

    Returns (m_new [M], l_new [M], alpha [M], p [M, N]): the caller rescales its accumulator by alpha and adds
    p @ v. A row whose scores are all -inf so far keeps m = -inf; the `m_safe` substitution avoids the
    (-inf) - (-inf) = NaN that would otherwise poison it.
    """
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk - m_safe[:, None])
    return m_new, l_i * alpha + tl.sum(p, 1), alpha, p


@triton.jit
def _softmax_step(m_i, l_i, acc, qk, v, DOT_PRECISION: tl.constexpr):
    """One FlashAttention inner step: the softmax update of qk [M, N] and acc [M, D] += p @ v [N, D]."""
    m_i, l_i, alpha, p = _softmax_probs(m_i, l_i, qk)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """Normalise the accumulator and return (out [M, D] fp32, lse [M] in log2 units, -inf for empty rows)."""
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    return out, lse2


@triton.jit
def _load_rows(base, row_offsets, row_ok, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """[R, BLOCK_D] tile: row r starts at base + row_offsets[r] (elements), the head dim is contiguous. Rows with
    row_ok False (when CHECK_ROWS) and the padding columns HEAD_DIM..BLOCK_D read as 0. Masks that are known to be
    all-true at compile time are left out, so full tiles of a power-of-two head dim load unmasked."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + row_offsets[:, None] + offs_d[None, :]
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def _attend_block(q, m_i, l_i, acc, k_base, v_base, cols, stride_kn, stride_vn, n_ok, visible, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attend the query tile q [M, BLOCK_D] to keys `cols` [N] of one head (k/v_base point at key 0, keys are
    stride_kn / stride_vn apart) and update the online-softmax state. With MASKED, keys with n_ok False are not
    loaded and scores where `visible` ([M, N] or [1, N]) is False are excluded."""
    k = _load_rows(k_base, cols.to(tl.int64) * stride_kn, n_ok, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_rows(v_base, cols.to(tl.int64) * stride_vn, n_ok, HEAD_DIM, BLOCK_D, MASKED)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        qk = tl.where(visible, qk, float("-inf"))
    return _softmax_step(m_i, l_i, acc, qk, v, DOT_PRECISION)


@triton.jit
def _empty_state(M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax state of M rows before any key: (running max -inf, sum 0, accumulator 0)."""
    return (tl.full([M], float("-inf"), dtype=tl.float32), tl.zeros([M], dtype=tl.float32),
            tl.zeros([M, BLOCK_D], dtype=tl.float32))


@triton.jit
def _attend_range(q, m_i, l_i, acc, k_base, v_base, lo, hi, stride_kn, stride_vn, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Attend q to keys [lo, hi) of one head in BLOCK_N tiles (the last one masked), no other masking."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < hi
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_base, v_base, cols, stride_kn, stride_vn, n_ok,
                                      n_ok[None, :], qk_scale, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def _prefill_fwd_kernel(
    Q, K, V, O, LSE,                  # Q [.., Hq, D], K/V [.., Hkv, D], O like Q, LSE [B?, Hq, T] fp32
    CU_Q, CU_K,                       # int32 [B + 1] (VARLEN) or unused
    stride_qb, stride_qt, stride_qh,  # strides in elements; the head dim is contiguous
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k,               # per-sequence lengths when not VARLEN
    qk_scale,                         # softmax scale * log2(e)
    GROUP: tl.constexpr,              # Hq // Hkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, CAUSAL: tl.constexpr, STORE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(max_seqlen_q, BLOCK_M), Hq, B). Query row i of sequence b sees key j iff
    j < Lk and (not CAUSAL or j <= i + Lk - Lq)."""
    # Heaviest (last, most keys under causal masking) query blocks first: better tail balance across SMs.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    batch = tl.program_id(2)
    kv_head = head // GROUP

    if VARLEN:
        # int64: token offsets times strides overflow int32 for long packed batches
        q_start = tl.load(CU_Q + batch).to(tl.int64)
        q_len = tl.load(CU_Q + batch + 1).to(tl.int64) - q_start
        k_start = tl.load(CU_K + batch).to(tl.int64)
        k_len = tl.load(CU_K + batch + 1).to(tl.int64) - k_start
    else:
        q_start = 0
        q_len = seqlen_q
        k_start = 0
        k_len = seqlen_k
    start_m = pid_m * BLOCK_M
    if start_m >= q_len:
        return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)     # BLOCK_D is HEAD_DIM rounded up to a power of two
    m_ok = offs_m < q_len
    rows = q_start + offs_m.to(tl.int64)

    b64 = batch.to(tl.int64)           # batch offsets overflow int32 for large KV caches
    q = _load_rows(Q + b64 * stride_qb + head * stride_qh, rows * stride_qt, m_ok, HEAD_DIM, BLOCK_D, True)
    k_base = K + b64 * stride_kb + kv_head * stride_kh + k_start * stride_kt
    v_base = V + b64 * stride_vb + kv_head * stride_vh + k_start * stride_vt

    m_i, l_i, acc = _empty_state(BLOCK_M, BLOCK_D)

    # [0, full): keys every row of this block sees -> no masks. [full, hi): diagonal and length edge.
    if CAUSAL:
        diag = k_len - q_len                                        # bottom-right alignment
        hi = tl.maximum(tl.minimum(k_len, start_m + BLOCK_M + diag), 0)
        full = tl.maximum(tl.minimum(k_len, start_m + diag + 1), 0)
    else:
        diag = 0
        hi = k_len
        full = k_len
    full = (full // BLOCK_N) * BLOCK_N

    for start_n in range(0, full, BLOCK_N):
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_base, v_base, start_n + offs_n, stride_kt, stride_vt,
                                      m_ok, m_ok, qk_scale, HEAD_DIM, BLOCK_D, False, DOT_PRECISION)
    for start_n in range(full, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < k_len
        visible = n_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + diag)
        m_i, l_i, acc = _attend_block(q, m_i, l_i, acc, k_base, v_base, cols, stride_kt, stride_vt, n_ok, visible,
                                      qk_scale, HEAD_DIM, BLOCK_D, True, DOT_PRECISION)

    out, lse2 = _finish(m_i, l_i, acc)
    o_ptrs = O + b64 * stride_ob + head * stride_oh + rows[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if STORE_LSE:
        tl.store(LSE + b64 * stride_lb + head * stride_lh + rows, lse2 * LN2, mask=m_ok)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs must not be silently rounded to tf32 by tl.dot; fp16/bf16 are exact products either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {head_dim}")


def _prefill_config(head_dim: int, device: torch.device) -> dict:
    """Tile sizes. Under the interpreter (CPU tensors) the smallest legal tiles are also the fastest."""
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ndim: int) -> int:
    """Common launcher checks; returns the GQA group size."""
    group = check_qkv(q, k, v, ndim, dtypes=KERNEL_DTYPES, last_dim_contiguous=True)
    check_same_dtype("q", q, k=k, v=v)
    check_head_dim(q.shape[-1])
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    return group


def _launch(q, k, v, out, lse, cu_q, cu_k, strides, seqlen_q, seqlen_k, batch, max_seqlen_q, group, causal, scale,
            config):
    cfg = {**_prefill_config(q.shape[-1], q.device), **(config or {})}
    grid = (triton.cdiv(max_seqlen_q, cfg["BLOCK_M"]), q.shape[1], batch)
    _prefill_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else out, cu_q, cu_k, *strides, seqlen_q, seqlen_k,
        default_scale(scale, q.shape[-1]) * LOG2E,
        GROUP=group, HEAD_DIM=q.shape[-1], BLOCK_D=block_d(q.shape[-1]), VARLEN=cu_q is not None, CAUSAL=causal,
        STORE_LSE=lse is not None, DOT_PRECISION=dot_precision(q.dtype), **cfg)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, causal: bool = True,
                      scale: float | None = None, return_lse: bool = False, config: dict | None = None):
    """Packed variable-length prefill (flash_attn_varlen_func's layout).

    q [total_q, Hq, D], k/v [total_k, Hkv, D] (fp16/bf16/fp32, last dim contiguous), cu_seqlens_q/k int32 [B + 1]
    on q's device, max_seqlen_q >= every query length (sizes the grid; not checked, to avoid a device sync).
    Returns out [total_q, Hq, D] and, with return_lse, lse [Hq, total_q] float32 (natural log).
    `config` overrides the tile sizes (BLOCK_M, BLOCK_N, num_warps, num_stages), for tuning.
    """
    group = _check_qkv(q, k, v, ndim=3)
    batch = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device)
    if check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device) != batch:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length, got {cu_seqlens_q.shape[0]} "
                         f"and {cu_seqlens_k.shape[0]}")
    if max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    out = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device) if return_lse else None
    if q.shape[0] == 0 or max_seqlen_q == 0:
        return (out, lse) if return_lse else out
    strides = (0, q.stride(0), q.stride(1), 0, k.stride(0), k.stride(1), 0, v.stride(0), v.stride(1),
               0, out.stride(0), out.stride(1), 0, q.shape[0])
    _launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, strides, 0, 0, batch, max_seqlen_q, group, causal, scale,
            config)
    return (out, lse) if return_lse else out


def prefill_attention_batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                              scale: float | None = None, return_lse: bool = False, config: dict | None = None):
    """Padded-batch prefill in transformers' layout (any strides, head dim contiguous).

    q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D] -> out [B, Tq, Hq, D] (the attention-interface output layout, written
    directly, no transpose copy) and, with return_lse, lse [B, Hq, Tq] float32.
    """
    group = _check_qkv(q, k, v, ndim=4)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    batch, hq, tq, d = q.shape
    out = torch.empty((batch, tq, hq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, tq), dtype=torch.float32, device=q.device) if return_lse else None
    if q.numel() == 0:
        return (out, lse) if return_lse else out
    strides = (q.stride(0), q.stride(2), q.stride(1), k.stride(0), k.stride(2), k.stride(1),
               v.stride(0), v.stride(2), v.stride(1), out.stride(0), out.stride(1), out.stride(2), hq * tq, tq)
    _launch(q, k, v, out, lse, None, None, strides, tq, k.shape[2], batch, tq, group, causal, scale, config)
    return (out, lse) if return_lse else out


__all__ = ["prefill_attention", "prefill_attention_batched"]
