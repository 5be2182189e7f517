"""Core ML export: the traced wrappers against torch (anywhere), conversion + spec checks (where coremltools
installs), predictions (macOS only; scripts/coreml_mac_check.py runs the full parity gate on a Mac)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from tiny import randomize_adapters, tiny_clara

from clara_edge.backend import EXPORT_MANIFEST, open_backend
from clara_edge.coreml_backend import causal_mask
from clara_edge.errors import ClaraError
from clara_edge.export.coreml_export import CoreMLEncoder, CoreMLGenerator, coreml_unavailable
from clara_edge.export.parity import torch_forced_logits

DOCS = ["The Eiffel Tower is in Paris, the capital of France.", "Water boils at 100 degrees Celsius at sea level."]
needs_coremltools = pytest.mark.skipif(coreml_unavailable() is not None, reason=str(coreml_unavailable()))


@pytest.fixture(scope="module")
def model():
    m = tiny_clara("llama")
    randomize_adapters(m, scale=0.05)
    return m


@pytest.fixture(scope="module")
def coreml_export(model, tmp_path_factory):
    from clara_edge.export.coreml_export import export_coreml

    return export_coreml(model, tmp_path_factory.mktemp("coreml") / "int4", "int4", max_context=256)


def test_causal_mask():
    m = causal_mask(2, 3)
    assert m.shape == (1, 1, 2, 5)
    assert (m[0, 0, 0] == [0, 0, 0, 0, -1e4]).all() and (m[0, 0, 1] == 0).all()


def test_encoder_wrapper_matches_compress(model):
    with torch.no_grad():
        ref = model.compress(DOCS, batch_size=1)
        ids = model.tokenize_documents(DOCS)
        enc = CoreMLEncoder(model, "compressor").eval()
        got = torch.cat([enc(model.embed(torch.tensor([s]))) for s in ids])
    assert float((ref - got).abs().max()) < 1e-5


def test_stateful_generator_wrapper_matches_torch(model):
    """Prefill then single-token steps through the in-place cache give torch's logits."""
    mem = model.compress(DOCS)
    with torch.no_grad():
        embeds, mask = model.generation_inputs(["where is the tower?"], [mem])
        forced = [5, 17, 42, 99]
        ref = torch_forced_logits(model, embeds, mask, forced)
        gen = CoreMLGenerator(model, 2, 2, 8, max_context=256).eval()
        t = embeds.shape[1]
        rows = [gen(embeds, torch.from_numpy(causal_mask(t, 0)))]
        for i, tid in enumerate(forced[:-1]):
            rows.append(gen(model.embed(torch.tensor([[tid]])), torch.from_numpy(causal_mask(1, t + i))))
    assert np.abs(ref - torch.cat(rows).numpy()).max() < 1e-4


def test_stateful_generator_rewinds_to_a_shared_prefix(model):
    """What the Core ML backend's prefix reuse relies on: after one prompt, a second one that shares its first n
    positions runs from n (mask n + T wide) over the stale cache and gets a fresh run's logits."""
    mem = model.compress(DOCS)
    with torch.no_grad():
        first, _ = model.generation_inputs(["where is the tower?"], [mem])
        second, _ = model.generation_inputs(["what boils?"], [mem])
        n = int((first[0, :second.shape[1]] == second[0, :first.shape[1]]).all(-1).logical_not().nonzero()[0, 0])
        gen = CoreMLGenerator(model, 2, 2, 8, max_context=256).eval()
        gen(first, torch.from_numpy(causal_mask(first.shape[1], 0)))
        t = second.shape[1] - n
        reused = gen(second[:, n:], torch.from_numpy(causal_mask(t, n)))
        fresh = CoreMLGenerator(model, 2, 2, 8, max_context=256).eval()(second, torch.from_numpy(causal_mask(t + n, 0)))
    assert n > 2 * model.config.n_mem and float((reused - fresh).abs().max()) < 1e-4


@needs_coremltools
def test_coreml_export_spec(model, coreml_export):
    from clara_edge.export.coreml_export import check_spec

    spec = check_spec(coreml_export)
    assert spec["problems"] == []
    assert spec["specification_version"] >= 9  # iOS 18 / macOS 15: states, multifunction
    assert set(spec["functions"]) == {"compressor", "query", "generator"}
    assert spec["weight_ops"].get("constexpr_blockwise_shift_scale", 0) > 0  # int4 blocks (+ int8 head)
    m = json.loads((coreml_export / EXPORT_MANIFEST).read_text())
    assert m["format"] == "coreml" and m["quant"] == "int4" and m["fingerprint"] == model.fingerprint()
    assert m["multifunction_mb"] < m["separate_mb"]  # the shared base is stored once


@needs_coremltools
def test_a_sliding_window_base_is_refused_and_phi3_converts_at_int4(tmp_path):
    """Core ML functions take a plain causal mask (no window); Phi-3's fused gate_up LoRA used to be taken for the
    lm_head of its encoders and crash int4 quantisation; longrope Phi-3 (128k, 3.5) traces with its original RoPE
    frequencies, which serve up to original_max_position_embeddings."""
    from clara_edge.export.coreml_export import export_coreml
    from clara_edge.model import ClaraConfig, ClaraModel
    from tiny import tiny_causal_lm, tiny_tokenizer

    config = ClaraConfig(base_model="tiny-mistral", doc_max_length=64, lora_r=4)
    windowed = ClaraModel(tiny_causal_lm("mistral", sliding_window=16), tiny_tokenizer(), config)
    with pytest.raises(ClaraError, match="sliding window of 16 positions.*use --format onnx"):
        export_coreml(windowed, tmp_path / "w", "int4", max_context=64)
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0, 4.0, 8.0, 16.0]}
    lm = tiny_causal_lm("phi3", rope_scaling=rope, original_max_position_embeddings=256)
    phi3 = ClaraModel(lm, tiny_tokenizer(), ClaraConfig(
        base_model="tiny-phi3", doc_max_length=64, lora_r=4,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]))
    randomize_adapters(phi3, scale=0.05)
    with pytest.raises(ClaraError, match="max_context 512 is past the 256 positions"):
        export_coreml(phi3, tmp_path / "long", "int4", max_context=512)
    out = export_coreml(phi3, tmp_path / "phi3", "int4", max_context=64)
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    assert (manifest["quant"], manifest["kv_dtype"]) == ("int4", "float16")  # the states' dtype, at any precision


@needs_coremltools
@pytest.mark.skipif(sys.platform == "darwin", reason="Linux behaviour")
def test_coreml_backend_refuses_off_macos(coreml_export):
    with pytest.raises(ClaraError, match="Core ML runs only on macOS"):
        open_backend(str(coreml_export))


@needs_coremltools
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_predictions_match_torch(model, coreml_export):
    from clara_edge.export.parity import check_export

    result = check_export(coreml_export, reference_model=model, probe=False, max_new_tokens=10)
    assert result["graphs"]["compressor"]["cosine_min"] > 0.98
    assert result["token_agreement"] >= 0.6


@needs_coremltools
@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predictions need macOS")
def test_coreml_prefix_cache_answers_as_a_fresh_state(model, coreml_export):
    from clara_edge.prefix_cache import PrefixCache

    backend, cache, mem = open_backend(str(coreml_export)), PrefixCache(), model.compress(DOCS)
    for question in ("where is the tower?", "what boils?"):
        got = backend.generate([question], [mem], max_new_tokens=8, prefix_cache=cache)
        assert got.token_ids == backend.generate([question], [mem], max_new_tokens=8).token_ids
    assert got.reused_positions > 2 * model.config.n_mem


@needs_coremltools
@pytest.mark.slow
def test_palettized_export(model, tmp_path):
    pytest.importorskip("sklearn")  # coremltools' k-means
    from clara_edge.export.coreml_export import check_spec, export_coreml

    out = export_coreml(model, tmp_path / "pal", "int4", max_context=64, palettize=True)
    spec = check_spec(out)
    assert spec["problems"] == [] and spec["weight_ops"].get("constexpr_lut_to_dense", 0) > 0
