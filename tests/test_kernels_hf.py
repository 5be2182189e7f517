"""The "clara_triton" transformers attention implementation on a tiny Llama: SDPA fallback on CPU, and the
kernel path forced onto the CPU through the Triton interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton / the kernel modules are imported: read at decoration time

import importlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import tiny_causal_lm  # noqa: E402

from clara_edge.kernels import hf_attention  # noqa: E402


@pytest.fixture
def model():
    # head_dim 16, GQA 4 q / 2 kv heads
    m = tiny_causal_lm("llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    yield m
    hf_attention.FORCE_KERNELS_ON_CPU = False


@pytest.fixture
def kernel_calls(monkeypatch):
    """Count how often each kernel is entered from the attention function."""
    dec = importlib.import_module("clara_edge.kernels.decode_attention")
    pre = importlib.import_module("clara_edge.kernels.prefill_attention")

    calls = {"decode": 0, "prefill": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dec, "decode_attention", counting("decode", dec.decode_attention))
    monkeypatch.setattr(pre, "prefill_attention_batched", counting("prefill", pre.prefill_attention_batched))
    return calls


def _generate(m, ids, mask=None):
    out = m.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, output_logits=True,
                     return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.logits)


def test_enable_disable_switch_the_implementation(model):
    assert model.config._attn_implementation == "sdpa"
    hf_attention.enable(model)
    assert hf_attention.is_enabled(model) and model.config._attn_implementation == "clara_triton"
    hf_attention.disable(model)
    assert model.config._attn_implementation == "sdpa" and not hf_attention.is_enabled(model)
    assert hf_attention.configure(model, "auto").config._attn_implementation == "sdpa"     # CPU model
    assert hf_attention.configure(model, "triton").config._attn_implementation == "clara_triton"
    assert hf_attention.configure(model, "eager").config._attn_implementation == "eager"


def _sdpa_then_clara(model, seed, force_kernels):
    """(logits, generated ids, generation logits) with SDPA, then the same with "clara_triton" enabled."""
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(seed))
    results = []
    with torch.no_grad():
        for enabled in (False, True):
            if enabled:
                hf_attention.enable(model)
                hf_attention.FORCE_KERNELS_ON_CPU = force_kernels
            results.append((model(ids).logits, *_generate(model, ids)))
    return results


def test_cpu_fallback_equals_sdpa(model, kernel_calls):
    (ref_logits, ref_seq, ref_gen), (logits, seq, gen) = _sdpa_then_clara(model, 0, force_kernels=False)
    assert torch.equal(logits, ref_logits)            # same function, same arguments: bit-identical
    assert torch.equal(seq, ref_seq) and torch.equal(gen, ref_gen)
    assert kernel_calls == {"decode": 0, "prefill": 0}


def test_kernel_path_matches_sdpa(model, kernel_calls):
    """Forced onto the CPU (interpreter), prefill and decode go through the kernels and match SDPA."""
    (ref_logits, ref_seq, ref_gen), (logits, seq, gen) = _sdpa_then_clara(model, 1, force_kernels=True)
    assert (logits - ref_logits).abs().max() < 1e-4
    assert torch.equal(seq, ref_seq)
    assert (gen - ref_gen).abs().max() < 1e-4
    n_layers = model.config.num_hidden_layers
    assert kernel_calls["prefill"] == 2 * n_layers              # the forward + generate's prefill
    assert kernel_calls["decode"] == 2 * n_layers               # 2 decode steps after the prefill


def test_padding_mask_takes_the_sdpa_path(model, kernel_calls):
    """A left-padded batch has an explicit mask: the kernels must not be used, results equal SDPA."""
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        hf_attention.enable(model)
        hf_attention.FORCE_KERNELS_ON_CPU = True
        out = model(ids, attention_mask=mask).logits
    assert torch.equal(out, ref)
    assert kernel_calls["prefill"] == 0


def test_unsupported_reasons():
    q = torch.zeros(1, 4, 1, 16)
    kv = torch.zeros(1, 2, 5, 16)
    module = torch.nn.Module()
    assert hf_attention.kernel_unsupported_reason(module, q, kv, kv, None, 0.0, {}) == "device cpu"
    hf_attention.FORCE_KERNELS_ON_CPU = True
    try:
        assert hf_attention.kernel_unsupported_reason(module, q, kv, kv, None, 0.0, {}) is None
        assert "mask" in hf_attention.kernel_unsupported_reason(module, q, kv, kv, torch.ones(1), 0.0, {})
        assert "softcap" in hf_attention.kernel_unsupported_reason(module, q, kv, kv, None, 0.0, {"softcap": 30.0})
        assert "sliding" in hf_attention.kernel_unsupported_reason(module, q, kv, kv, None, 0.0,
                                                                    {"sliding_window": 4})
        assert "dtype" in hf_attention.kernel_unsupported_reason(module, q.double(), kv, kv, None, 0.0, {})
        # causal prefill over fewer keys than queries: SDPA's mask is top-left, the kernel's bottom-right
        prefill = torch.zeros(1, 4, 8, 16)
        assert "fewer keys" in hf_attention.kernel_unsupported_reason(module, prefill, kv, kv, None, 0.0, {})
        assert hf_attention.kernel_unsupported_reason(module, prefill, kv, kv, None, 0.0, {"is_causal": False}) is None
    finally:
        hf_attention.FORCE_KERNELS_ON_CPU = False
