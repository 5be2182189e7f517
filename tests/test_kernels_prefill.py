"""Prefill kernel (varlen, causal bottom-right, GQA) on the CPU through the Triton interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel modules are imported: read at decoration time

import importlib  # noqa: E402
import itertools  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clara_edge.kernels.prefill_attention import prefill_attention, prefill_attention_batched  # noqa: E402
from clara_edge.kernels.reference import (poisoned_allocations, prefill_attention_batched_reference,  # noqa: E402
                                          prefill_attention_reference, rel_error)

prefill_module = importlib.import_module("clara_edge.kernels.prefill_attention")
assert type(prefill_module._prefill_fwd_kernel).__name__ == "InterpretedFunction", (
    "clara_edge.kernels.prefill_attention was imported before TRITON_INTERPRET=1 was set")

BOUND = {torch.float16: 2e-3, torch.float32: 1e-5}


def _cu(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _packed(q_lens, k_lens, hq, hkv, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), hq, d, generator=gen).to(dtype)
    k = torch.randn(sum(k_lens), hkv, d, generator=gen).to(dtype)
    v = torch.randn(sum(k_lens), hkv, d, generator=gen).to(dtype)
    return q, k, v, _cu(q_lens), _cu(k_lens)


# (query lengths, key lengths = memory slots + prompt, Hq, Hkv, D, causal)
CASES = [
    pytest.param([7, 33, 1], [12, 33, 13], 9, 3, 16, True, id="smollm-heads-memory-prefix"),
    pytest.param([5, 2, 0, 17], [3, 9, 4, 17], 4, 1, 24, True, id="mqa-odd-D-short-kv-empty-seq"),
    pytest.param([3, 9], [19, 9], 32, 8, 16, True, id="mistral-heads-small-D"),
    pytest.param([9, 16], [13, 5], 2, 2, 32, False, id="mha-noncausal"),
    # diagonals 14 and 30: the last unmasked key sits one before a key-tile edge
    pytest.param([4, 2], [18, 32], 2, 2, 16, True, id="causal-diagonal-on-tile-edge"),
    pytest.param([3, 20], [11, 20], 14, 2, 80, True, id="gqa7-D80-padded-to-128"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("q_lens,k_lens,hq,hkv,d,causal", CASES)
def test_prefill_varlen_matches_float64_reference(q_lens, k_lens, hq, hkv, d, causal, dtype):
    q, k, v, cu_q, cu_k = _packed(q_lens, k_lens, hq, hkv, d, dtype, seed=sum(q_lens) * 31 + d)
    with poisoned_allocations():
        out, lse = prefill_attention(q, k, v, cu_q, cu_k, max(q_lens), causal=causal, return_lse=True)
    ref, ref_lse = prefill_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k, causal=causal,
                                               return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_error(out, ref) < BOUND[dtype]
    # LSE: same -inf pattern (rows that see no key), close elsewhere
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double()[finite] - ref_lse[finite]).abs().max() < 1e-4


def test_rows_without_keys_are_zero():
    """Lq > Lk with bottom-right alignment: the first Lq - Lk rows see nothing -> zeros, not NaN."""
    q, k, v, cu_q, cu_k = _packed([6], [2], 2, 1, 16, torch.float32, seed=3)
    with poisoned_allocations():
        out = prefill_attention(q, k, v, cu_q, cu_k, 6)
    assert torch.all(out[:4] == 0)
    assert rel_error(out, prefill_attention_reference(q.double(), k.double(), v.double(), cu_q, cu_k)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prefill_batched_hf_layout_non_contiguous(dtype):
    """transformers' layout: q/k/v [B, H, T, D] views of [B, T, H, D] buffers; out [B, T, Hq, D]."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 13, 6, 16, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(2, 20, 2, 16, generator=gen).to(dtype).transpose(1, 2)
    v = torch.randn(2, 20, 2, 16, generator=gen).to(dtype).transpose(1, 2)
    with poisoned_allocations():
        out = prefill_attention_batched(q, k, v, causal=True)
    ref = prefill_attention_batched_reference(q.double(), k.double(), v.double(), causal=True)
    assert out.shape == (2, 13, 6, 16)
    assert rel_error(out, ref) < BOUND[dtype]


def test_reference_agrees_with_sdpa():
    """The float64 reference itself, against torch SDPA (causal, Lq == Lk, where top-left == bottom-right)."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = prefill_attention_batched_reference(q, k, v, causal=True)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    assert rel_error(ref, sdpa) < 1e-12
    # and the memory-prefix case: bottom-right == an explicit mask where query i sees keys <= i + (Lk - Lq)
    k2, v2 = torch.cat([k, k[:, :, :3]], 2), torch.cat([v, v[:, :, :3]], 2)
    mask = torch.ones(9, 12, dtype=torch.bool).tril(diagonal=3)
    sdpa2 = F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask).transpose(1, 2)
    assert rel_error(prefill_attention_batched_reference(q, k2, v2), sdpa2) < 1e-12


def test_launcher_rejects_bad_inputs():
    q, k, v, cu_q, cu_k = _packed([4], [4], 4, 2, 16, torch.float16, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        prefill_attention(q.to(torch.float64), k, v, cu_q, cu_k, 4)
    with pytest.raises(ValueError, match="must match"):
        prefill_attention(q, k.float(), v, cu_q, cu_k, 4)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        prefill_attention(q[:, :3].contiguous(), k, v, cu_q, cu_k, 4)
    with pytest.raises(ValueError, match="contiguous"):
        prefill_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, cu_q, cu_k, 4)
    with pytest.raises(ValueError, match="int32"):
        prefill_attention(q, k, v, cu_q.long(), cu_k, 4)
    with pytest.raises(ValueError, match="same length"):
        prefill_attention(q, k, v, cu_q, _cu([2, 2]), 4)
    with pytest.raises(ValueError, match="head dims"):
        prefill_attention(q, k[..., :8].contiguous(), v[..., :8].contiguous(), cu_q, cu_k, 4)
    with pytest.raises(ValueError, match="4 dims"):
        prefill_attention_batched(q, k, v)
