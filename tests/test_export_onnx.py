"""ONNX export and the ONNX Runtime backend, on tiny random models (one trace shared by the module)."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from tiny import randomize_adapters, tiny_clara  # noqa: E402

from clara_edge.backend import EXPORT_MANIFEST, EXPORTER_REVISION, open_backend  # noqa: E402
from clara_edge.errors import ClaraError  # noqa: E402
from clara_edge.export.onnx_export import LORA_MODES, trace_graphs, write_onnx_export  # noqa: E402
from clara_edge.export.parity import export_forced_logits, torch_forced_logits  # noqa: E402
from clara_edge.onnx_backend import CENTRE_FILE, KVCache, OnnxBackend  # noqa: E402
from clara_edge.prefix_cache import PrefixCache  # noqa: E402

DOCS = ["The Eiffel Tower is in Paris, the capital of France.",
        "Water boils at 100 degrees Celsius at sea level.",
        "Mount Everest is the highest mountain above sea level, in Asia, between Nepal and China."]
QUESTIONS = ["who wrote Hamlet?", "where is the tower?", "what boils at sea level?"]
DEFAULT_LORA = LORA_MODES[0]
_TMP = Path(tempfile.mkdtemp(prefix="clara-onnx-tests-"))
atexit.register(shutil.rmtree, _TMP, True)


@functools.lru_cache(maxsize=None)
def tiny_traced(family: str = "llama", lora: str = DEFAULT_LORA):
    """A tiny random model (non-trivial adapters) and its three traced fp32 graphs."""
    model = tiny_clara(family)
    randomize_adapters(model, scale=0.05)
    return model, trace_graphs(model, lora)


@functools.lru_cache(maxsize=None)
def tiny_onnx_export(quant: str = "fp32", family: str = "llama", lora: str = DEFAULT_LORA):
    """(model, export dir) for the tiny model at `quant` (written once per test session)."""
    model, traced = tiny_traced(family, lora)
    return model, write_onnx_export(model, traced, _TMP / f"{family}-{lora}-{quant}", quant)


def _copy_export(quant: str, tmp_path: Path) -> Path:
    _, src = tiny_onnx_export(quant)
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    return dst


def _max_abs(a, b) -> float:
    return float((torch.as_tensor(a).detach() - torch.as_tensor(b).detach()).abs().max())


# ------------------------------------------------------------------------------------------ fp32 parity
def test_fp32_encoders_match_torch():
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    ref, got = model.compress(DOCS, batch_size=3), backend.compress(DOCS, batch_size=3)  # one padded batch
    assert got.shape == ref.shape == (3, model.config.n_mem, model.hidden_size)
    assert _max_abs(ref, got) < 1e-4
    assert _max_abs(model.encode_query(QUESTIONS), backend.encode_query(QUESTIONS)) < 1e-4


def test_sessions_take_the_process_thread_setting_unless_given():
    _, path = tiny_onnx_export("fp32")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what `clara-edge --threads 1` sets (configure_threads)
        assert OnnxBackend(path).session("query").get_session_options().intra_op_num_threads == 1
        assert OnnxBackend(path, threads=2).session("query").get_session_options().intra_op_num_threads == 2
    finally:
        torch.set_num_threads(threads)


def test_fp32_generator_matches_torch_through_kv_cache_steps():
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    mem = model.compress(DOCS[:2])
    embeds, mask = model.generation_inputs([QUESTIONS[1]], [mem])
    forced = [5, 17, 42, 99, 7, 250]  # arbitrary tokens: prefill + 5 decode steps
    ref = torch_forced_logits(model, embeds, mask, forced)
    got = export_forced_logits(backend, embeds, mask, forced)
    assert got.shape == ref.shape == (len(forced), backend.manifest["vocab_size"])
    assert np.abs(ref - got).max() < 1e-4


def test_decode_steps_reuse_one_binding_until_the_cache_grows():
    """The KV buffers are bound once per capacity (rebinding them every step cost 3 % of a decode step); growth
    moves them, so the binding is rebuilt (stepping across growth: test_fused_generator_computes_what_torch_traces)."""
    backend = OnnxBackend(tiny_onnx_export("fp32")[1])
    session, state = backend.session("generator"), backend._generator_state(1)
    first = state.binding(session)
    assert state.binding(session) is first
    state.reserve(state.capacity + 1)
    assert state.binding(session) is not first


def test_fp32_generate_equals_torch_batched_left_padded():
    model, path = tiny_onnx_export("fp32")
    backend = open_backend(str(path))
    mem = model.compress(DOCS)
    memories = [mem[:1], mem, mem[1:2]]  # different prompt lengths: left padding in one batch
    ref = model.generate(QUESTIONS, memories, max_new_tokens=12)
    got = backend.generate(QUESTIONS, memories, max_new_tokens=12)
    assert got.token_ids == ref.token_ids
    assert got.texts == ref.texts
    assert got.context_positions == ref.context_positions and got.decode_steps == ref.decode_steps
    assert got.prefill_s > 0 and got.decode_s >= 0


def test_row_by_row_generation_matches_batched():
    """The path Core ML takes (one sequence per cache state) gives the batched tokens."""
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    mem = model.compress(DOCS)
    memories = [mem[:1], mem, mem[1:2]]
    batched = backend.generate(QUESTIONS, memories, max_new_tokens=8)
    backend.max_batch = 1
    rows = backend.generate(QUESTIONS, memories, max_new_tokens=8)
    assert rows.token_ids == batched.token_ids and rows.context_positions == batched.context_positions


def test_prefix_cache_reuses_the_head_and_answers_as_torch():
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    mem = model.compress(DOCS)
    cache = PrefixCache()
    head = model.prompt_ids("?", 1).index(int(model.mem_ids[0]))
    for question, memories, reused in [(QUESTIONS[0], mem[:1], 0), (QUESTIONS[1], mem[1:], head),
                                       (QUESTIONS[2], mem[1:], None)]:
        got = backend.generate([question], [memories], max_new_tokens=8, prefix_cache=cache)
        assert got.token_ids == model.generate([question], [memories], max_new_tokens=8).token_ids
        assert got.reused_positions == reused if reused is not None else got.reused_positions > head


def test_streaming_and_sampling():
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    mem = model.compress(DOCS[:1])
    pieces: list[tuple[int, str]] = []
    gen = backend.generate([QUESTIONS[0]], [mem], max_new_tokens=6, on_token=lambda r, s: pieces.append((r, s)))
    assert len(pieces) == len(gen.token_ids[0])
    a = backend.generate([QUESTIONS[0]], [mem], max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    b = backend.generate([QUESTIONS[0]], [mem], max_new_tokens=6, do_sample=True, temperature=0.8, top_p=0.9, seed=3)
    assert a.token_ids == b.token_ids


def test_graph_optimisations_do_not_change_results():
    model, path = tiny_onnx_export("fp32")
    full, none = OnnxBackend(path, optimization="all"), OnnxBackend(path, optimization="none")
    assert _max_abs(full.compress(DOCS), none.compress(DOCS)) < 1e-5
    mem = model.compress(DOCS[:1])
    assert full.generate(QUESTIONS[:1], [mem], 8).token_ids == none.generate(QUESTIONS[:1], [mem], 8).token_ids


# ------------------------------------------------------------------------------------------ the directory
def test_manifest_and_backend():
    model, path = tiny_onnx_export("fp32")
    m = json.loads((path / EXPORT_MANIFEST).read_text())
    assert m["format"] == "onnx" and m["quant"] == "fp32" and m["lora"] == "merged-generator"
    assert m["fingerprint"] == model.fingerprint()
    assert m["special_ids"] == {t: model.special_ids[t] for t in m["special_ids"]}
    assert m["eos_ids"] == model.eos_ids()
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"]) == (2, 2, 8)
    assert {"compressor.onnx", "query.onnx", "generator.onnx", "weights.bin", "embeddings.npy"} <= set(m["files"])
    assert m["generator_graph"] == "fused"
    backend = open_backend(str(path))
    assert isinstance(backend, OnnxBackend) and backend.name == "onnx"
    assert backend.fingerprint() == model.fingerprint()
    assert backend.config == model.config
    assert backend.describe() == {"path": str(path), "format": "onnx", "quant": "fp32", "lora": "merged-generator",
                                  "generator_graph": "fused", "size_mb": m["size_mb"],
                                  "exporter_revision": m["exporter_revision"]}


def test_info_shows_what_an_export_is(capsys):
    from clara_edge.cli import main

    _, path = tiny_onnx_export("int8")
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["backend"], info["quant"], info["accuracy_level"], info["outlier_channels"]) == ("onnx", "int8", 4, 4)
    assert info["lora"] == "merged-generator" and info["size_mb"] > 0 and info["compression_rate"] == 16


def test_lora_modes_trade_size_for_generator_nodes():
    import onnx

    model = tiny_traced("llama", DEFAULT_LORA)[0]
    unique, referenced, lora_inputs = {}, {}, {}
    for lora in LORA_MODES:
        _, path = tiny_onnx_export("fp32", "llama", lora)
        m = json.loads((path / EXPORT_MANIFEST).read_text())
        unique[lora], referenced[lora] = m["weights_unique_bytes"], m["weights_referenced_bytes"]
        graph = onnx.load(str(path / "generator.onnx"), load_external_data=False).graph
        lora_inputs[lora] = sum(".lora_" in name for node in graph.node for name in node.input)
    base = sum(p.numel() * 4 for n, p in model.lm.named_parameters() if "base_layer" in n)  # adapted projections
    assert referenced["shared"] - unique["shared"] >= 2 * base  # three roles, one stored copy of the base
    # the generator's own merged copy of the adapted projections, less its LoRA matrices; the encoders share
    assert unique["shared"] < unique["merged-generator"] <= unique["shared"] + base < unique["merged"]
    assert lora_inputs["shared"] > 0 and lora_inputs["merged-generator"] == lora_inputs["merged"] == 0


def test_the_retrieval_centre_travels_with_the_export(tmp_path):
    from clara_edge.export.api import export_model

    model, traced = tiny_traced("llama", DEFAULT_LORA)
    assert OnnxBackend(tiny_onnx_export("fp32")[1]).retrieval_centre is None
    centre = torch.randn(model.config.n_mem, model.hidden_size)
    model.retrieval_centre = centre
    try:
        path = write_onnx_export(model, traced, tmp_path / "centred", "fp32")
    finally:
        model.retrieval_centre = None
    assert torch.equal(OnnxBackend(path).retrieval_centre, centre)
    requantised = export_model(OnnxBackend(path), "onnx", "int8", tmp_path / "int8")
    assert torch.equal(OnnxBackend(requantised).retrieval_centre, centre)
    np.save(path / CENTRE_FILE, np.zeros((2, 3), np.float32))
    with pytest.raises(ClaraError, match="retrieval_centre.npy"):
        OnnxBackend(path)


def test_embedding_lookup_matches_model():
    model, path = tiny_onnx_export("fp32")
    backend = OnnxBackend(path)
    ids = torch.tensor([[0, 5, model.special_ids["<ENC>"], model.special_ids["<MEM0>"], 300, 319]])
    assert _max_abs(model.embed(ids), backend.embed(ids)) == 0.0


def test_backend_choice_must_match_the_export():
    _, path = tiny_onnx_export("fp32")
    with pytest.raises(ClaraError, match="onnx model"):
        open_backend(str(path), backend="torch")


# ------------------------------------------------------------------------------------------ quantised exports
@pytest.mark.parametrize("quant,cos_min,agree_min", [("fp16", 0.9999, 0.95), ("int8", 0.999, 0.9),
                                                     ("int4", 0.98, 0.6)])
def test_quantised_exports_run_and_agree(quant, cos_min, agree_min):
    from clara_edge.export.parity import graph_and_token_parity

    model, path = tiny_onnx_export(quant)
    backend = OnnxBackend(path)
    result = graph_and_token_parity(backend, model, [(q, [d]) for q, d in zip(QUESTIONS, DOCS)], max_new_tokens=12)
    for graph in ("compressor", "query", "generator"):
        assert result["graphs"][graph]["cosine_min"] > cos_min, (graph, result["graphs"][graph])
    assert result["token_agreement"] >= agree_min
    fp32 = json.loads((tiny_onnx_export("fp32")[1] / EXPORT_MANIFEST).read_text())
    assert backend.manifest["files"]["weights.bin"] < fp32["files"]["weights.bin"]


def test_int4_uses_matmulnbits_with_8bit_head_and_lora():
    import onnx

    def generator_bits(lora: str) -> dict[str, int]:
        """{quantised weight: bits} of the int4 generator graph; asserts nothing is left in fp32."""
        graph = onnx.load(str(tiny_onnx_export("int4", "llama", lora)[1] / "generator.onnx"),
                          load_external_data=False).graph
        nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
        assert {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nbits} == {4}
        assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in {t.name for t in graph.initializer}]
        return {n.input[1]: next(a.i for a in n.attribute if a.name == "bits") for n in nbits}

    shared = generator_bits("shared")  # the base at 4 bits (the gguf grid), LoRA and lm_head at 8
    assert {b for w, b in shared.items() if ".lora_" in w or "lm_head" in w} == {8}
    assert {b for w, b in shared.items() if ".lora_" not in w and "lm_head" not in w} == {4}
    merged = generator_bits("merged-generator")  # a merged adapter leaves the grid: its weights stay at 8 bits
    assert {b for w, b in merged.items() if ".merged." in w} == {8}
    assert not [w for w in merged if ".lora_" in w]


def _matmul_model(*weights: np.ndarray):
    """x [b, t, K] -> y_i = x @ weights[i] for each weight (all read the same input)."""
    from onnx import TensorProto, helper, numpy_helper

    k = weights[0].shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}") for i in range(len(weights))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", k])],
        [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", "t", w.shape[1]])
         for i, w in enumerate(weights)],
        [numpy_helper.from_array(w.astype(np.float32), f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _gguf_q4_1(rng, k: int, n: int) -> np.ndarray:
    """A [k, n] weight on a Q4_1 grid: per block of 32 along k, min + q * step with float min and step."""
    d = rng.uniform(0.01, 0.03, (k // 32, 1, n))
    m = -d * rng.uniform(2, 13, (k // 32, 1, n))  # blocks straddle zero, as trained weights' blocks do
    q = rng.integers(0, 16, (k // 32, 32, n))
    q[:, 0], q[:, 1] = 0, 15  # every block spans its 16 levels, as Q4_1 blocks usually do
    return (m + q * d).reshape(k, n).astype(np.float32)


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_block_offsets_bring_gguf_grids_back(quant):
    """A weight already block-quantised with a float offset (gguf Q4_1, like the built-in base) comes back to
    1e-3 of the output's range once each block's offset is folded into the node; integer zero points alone
    leave a bias per block."""
    from clara_edge.export.quantize import _nbits, quantize_graph

    rng = np.random.default_rng(0)
    weight = _gguf_q4_1(rng, 128, 48)
    x = rng.standard_normal((2, 3, 128)).astype(np.float32)
    ref = x @ weight
    (folded,) = _run(quantize_graph(_matmul_model(weight), quant, accuracy_level=1), x)
    (plain,) = _run(_nbits(_matmul_model(weight), 4 if quant == "int4" else 8, set(), 1), x)  # zero points only
    assert np.abs(folded - ref).max() < 1e-3 * np.abs(ref).max()
    assert np.abs(plain - ref).max() > 10 * np.abs(folded - ref).max()


def test_nodes_reading_one_input_share_its_block_sums():
    """Two weights on one input: one Reshape / ReduceSum / Pad / Concat, both nodes read it; K grows by the
    4-bit nodes' two levels of offset rows (the first padded to a whole block)."""
    import onnx

    from clara_edge.export.quantize import quantize_graph

    rng = np.random.default_rng(1)
    weights = [_gguf_q4_1(rng, 64, 24), _gguf_q4_1(rng, 64, 40)]
    model = quantize_graph(_matmul_model(*weights), "int4", accuracy_level=1)
    onnx.checker.check_model(model)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    ops = [n.op_type for n in model.graph.node]
    assert [ops.count(op) for op in ("Reshape", "ReduceSum", "Pad", "Concat", "MatMulNBits")] == [1, 1, 1, 1, 2]
    assert {n.input[0] for n in nbits} == {next(n for n in model.graph.node if n.op_type == "Concat").output[0]}
    assert {next(a.i for a in n.attribute if a.name == "K") for n in nbits} == {64 + 32 + 2}
    x = rng.standard_normal((1, 5, 64)).astype(np.float32)
    for out, weight in zip(_run(model, x), weights):
        assert np.abs(out - x @ weight).max() < 1e-3 * np.abs(x @ weight).max()


def test_outlier_channels_read_as_a_block_of_their_own():
    """Four input channels 30x larger than the rest: at int8 (int8 activations) the node reads them as one extra
    block and errs ~3x less; at int4 (4-bit nodes) and for an input without outliers nothing changes."""
    from clara_edge.export.quantize import quantize_graph

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((128, 48)).astype(np.float32) * 0.05
    scale = np.ones(128, np.float32)
    scale[[5, 40, 77, 120]] = 30
    x_cal, x = (rng.standard_normal((1, n, 128)).astype(np.float32) * scale for n in (64, 9))
    ref = x @ weight

    def quantised(quant: str, calibration):
        model = quantize_graph(_matmul_model(weight), quant, calibration=calibration)
        isolated = [n for n in model.graph.node if n.name.endswith("_outliers_isolated")]
        k = {next(a.i for a in n.attribute if a.name == "K") for n in model.graph.node if n.op_type == "MatMulNBits"}
        return np.linalg.norm(_run(model, x)[0] - ref) / np.linalg.norm(ref), len(isolated), k

    with_block, groups, k = quantised("int8", {"x": x_cal})
    without, _, k_plain = quantised("int8", None)
    assert groups == 1 and k == {128 + 32 + 5} and k_plain == {128 + 4}  # + the outliers' block, + block sums
    assert with_block * 2 < without, (with_block, without)
    assert quantised("int4", {"x": x_cal})[1] == 0
    assert quantised("int8", {"x": x_cal / scale})[1] == 0


def test_int8_export_isolates_a_residual_streams_outliers(tmp_path, monkeypatch):
    """Four large residual channels (large norm weights, as trained models have): the int8 export's calibration
    finds them, every layer's attention and MLP inputs read them as a block of their own, and its generator errs
    less than the same export without calibration."""
    import onnx

    from clara_edge.export import onnx_export
    from clara_edge.export.parity import graph_and_token_parity
    from clara_edge.model import ClaraConfig, ClaraModel
    from tiny import CHATML, tiny_causal_lm, tiny_tokenizer

    config = ClaraConfig(base_model="tiny-llama", compression_rate=16, doc_max_length=64, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0)
    model = ClaraModel(tiny_causal_lm("llama", hidden_size=64, intermediate_size=128), tiny_tokenizer(CHATML),
                       config, seed=0).eval()
    randomize_adapters(model, scale=0.05)
    layers = model.lm.get_base_model().model.layers
    with torch.no_grad():
        for layer in layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[[3, 17, 40, 58]] = 25.0
    traced = trace_graphs(model)

    def generator_error(name: str) -> tuple[float, int]:
        path = write_onnx_export(model, traced, tmp_path / name, "int8")
        graph = onnx.load(str(path / "generator.onnx"), load_external_data=False).graph
        result = graph_and_token_parity(OnnxBackend(path), model, [(q, [d]) for q, d in zip(QUESTIONS, DOCS)],
                                        max_new_tokens=12)
        return 1 - result["graphs"]["generator"]["cosine"], sum(n.name.endswith("_outliers_isolated")
                                                                for n in graph.node)

    error, isolated = generator_error("calibrated")
    monkeypatch.setattr(onnx_export, "calibration_feeds", lambda role, embeds, manifest: None)
    plain_error, plain_isolated = generator_error("plain")
    assert isolated >= 2 * len(layers) and plain_isolated == 0
    assert error * 2 < plain_error, (error, plain_error)


def test_requantise_an_fp32_export(tmp_path):
    import onnx

    from clara_edge.export.api import export_model

    model, path = tiny_onnx_export("fp32", "llama", "shared")  # LoRA branches in every graph
    out = export_model(OnnxBackend(path), "onnx", "int4", tmp_path / "int4")
    m = json.loads((out / EXPORT_MANIFEST).read_text())
    assert m["quant"] == "int4" and m["fingerprint"] == model.fingerprint() and m["requantized_from"] == str(path.resolve())
    older = shutil.copytree(path, tmp_path / "older")  # an older exporter's trace: its revision stays on record
    source_manifest = json.loads((older / EXPORT_MANIFEST).read_text())
    (older / EXPORT_MANIFEST).write_text(json.dumps({**source_manifest, "exporter_revision": 1}))
    old = json.loads((export_model(OnnxBackend(older), "onnx", "int8", tmp_path / "old") / EXPORT_MANIFEST).read_text())
    assert (old["exporter_revision"], old["traced_by_exporter_revision"]) == (EXPORTER_REVISION, 1)
    (older / EXPORT_MANIFEST).write_text(json.dumps({**source_manifest, "exporter_revision": 1, "quant": "fp32"}))
    chain = export_model(OnnxBackend(export_model(OnnxBackend(older), "onnx", "fp32", tmp_path / "b")), "onnx",
                         "int8", tmp_path / "c")  # requantised twice: the trace's revision is still the first's
    assert json.loads((chain / EXPORT_MANIFEST).read_text())["traced_by_exporter_revision"] == 1
    graph = onnx.load(str(out / "generator.onnx"), load_external_data=False).graph  # no exporter metadata left:
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits == {4, 8}  # LoRA and lm_head found by shape
    backend = OnnxBackend(out)
    assert float(torch.nn.functional.cosine_similarity(model.compress(DOCS).flatten(1), backend.compress(DOCS).flatten(1)).min()) > 0.98
    with pytest.raises(ClaraError, match="quantise from an fp32 export"):
        export_model(backend, "onnx", "int8", tmp_path / "again")
    with pytest.raises(ClaraError, match="a 'shared' export: requantising keeps its LoRA layout"):
        export_model(OnnxBackend(path), "onnx", "int8", tmp_path / "again", lora="merged")


def test_an_exporter_failure_names_its_cause_in_one_line():
    from clara_edge.errors import cause_line

    onnx_text = ("Failed to export the model with torch.export.\n## Exception summary\n\n"
                 "<class 'AssertionError'>: expected compiled_fn to be GraphModule\n\n"
                 "(Refer to the full stack trace above for more information.)")
    assert cause_line(RuntimeError(onnx_text)) == \
        "RuntimeError: <class 'AssertionError'>: expected compiled_fn to be GraphModule"
    assert cause_line(ValueError("first\nlast line\n")) == "ValueError: last line"


# ------------------------------------------------------------------------------------------ bad input
def test_missing_directory(tmp_path):
    with pytest.raises(ClaraError, match="not found"):
        OnnxBackend(tmp_path / "nope")


def test_truncated_weights(tmp_path):
    path = _copy_export("fp32", tmp_path)
    data = (path / "weights.bin").read_bytes()
    (path / "weights.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ClaraError, match="corrupted or truncated") as e:
        open_backend(str(path))
    assert "\n" not in str(e.value)


def test_corrupted_graph(tmp_path):
    path = _copy_export("fp32", tmp_path)
    size = (path / "query.onnx").stat().st_size
    (path / "query.onnx").write_bytes(b"\x07garbage" * (size // 8) + b"\0" * (size % 8))
    backend = open_backend(str(path))  # sizes still match: the graph fails when its session opens
    with pytest.raises(ClaraError, match="cannot load .*query.onnx") as e:
        backend.encode_query(["anything"])
    assert "\n" not in str(e.value)


def test_manifest_from_a_newer_version(tmp_path):
    path = _copy_export("fp32", tmp_path)
    m = json.loads((path / EXPORT_MANIFEST).read_text())
    m["format_version"] = 99
    (path / EXPORT_MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ClaraError, match="format version 99"):
        open_backend(str(path))


def test_corrupted_manifest(tmp_path):
    path = _copy_export("fp32", tmp_path)
    (path / EXPORT_MANIFEST).write_text("{not json")
    with pytest.raises(ClaraError, match="corrupted export manifest"):
        open_backend(str(path))
    (path / EXPORT_MANIFEST).write_text(json.dumps({"format": "onnx", "format_version": 1}))
    with pytest.raises(ClaraError, match="lacks"):
        open_backend(str(path))


def test_out_dir_that_is_not_an_export(tmp_path):
    model, traced = tiny_traced("llama", DEFAULT_LORA)
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ClaraError, match="not an export directory"):
        write_onnx_export(model, traced, tmp_path, "fp32")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("fmt", ["onnx", "coreml"])
def test_export_refuses_a_bad_out_before_tracing(tmp_path, monkeypatch, fmt):
    """A store, notes folder or file as --out is refused at once, not after minutes of tracing."""
    from clara_edge.export import api, onnx_export
    monkeypatch.setattr(onnx_export, "trace_graphs", lambda *a, **k: pytest.fail("traced before checking --out"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "precious.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for out in (tmp_path / "notes", tmp_path / "file"):
        with pytest.raises(ClaraError, match="not an export directory"):
            api.export_model(tiny_clara("llama"), fmt, "int4", out)
    with pytest.raises(ClaraError, match="unknown quantisation 'int3'"):
        api.export_model(tiny_clara("llama"), fmt, "int3", tmp_path / "new")
    assert (tmp_path / "notes" / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    assert not (tmp_path / "new").exists()


def test_reexport_replaces_atomically(tmp_path):
    model, traced = tiny_traced("llama", DEFAULT_LORA)
    out = write_onnx_export(model, traced, tmp_path / "x", "fp32")
    out = write_onnx_export(model, traced, tmp_path / "x", "int8")
    assert json.loads((out / EXPORT_MANIFEST).read_text())["quant"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


# ------------------------------------------------------------------------------------------ slower variants
@pytest.mark.slow
def test_merged_lora_matches_torch_and_is_larger():
    model, path = tiny_onnx_export("fp32", lora="merged")
    backend = OnnxBackend(path)
    assert _max_abs(model.compress(DOCS), backend.compress(DOCS)) < 1e-4
    mem = model.compress(DOCS[:1])
    assert backend.generate(QUESTIONS[:1], [mem], 10).token_ids == model.generate(QUESTIONS[:1], [mem], 10).token_ids
    shared = json.loads((tiny_onnx_export("fp32")[1] / EXPORT_MANIFEST).read_text())
    assert backend.manifest["files"]["weights.bin"] > shared["files"]["weights.bin"]


@pytest.mark.slow
def test_merged_weights_of_traced_graphs_stay_at_8_bits_under_int4(tmp_path):
    """A merged adapter moves a weight off the base's grid: int4 keeps those weights at 8 bits in traced graphs
    too (it only recognised the fused generator's names)."""
    import onnx

    from clara_edge.export.onnx_export import export_onnx

    model = tiny_clara("llama", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    randomize_adapters(model)
    out = export_onnx(model, tmp_path / "merged", "int4", lora="merged")
    graph = onnx.load(str(out / "compressor.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"]
    layers = model.lm.get_base_model().config.num_hidden_layers
    assert (bits.count(8), bits.count(4)) == (4 * layers, 3 * layers)  # q/k/v/o merged, the MLP not adapted


def test_the_fused_generator_is_not_used_where_it_would_drop_an_adapter_or_a_window():
    from clara_edge.export.onnx_fused import fused_support
    from clara_edge.model import ClaraConfig, ClaraModel
    from tiny import tiny_causal_lm, tiny_tokenizer

    assert fused_support(tiny_clara("llama")) is None
    assert fused_support(tiny_clara("llama", target_modules=["q_proj", "v_proj", "lm_head"])) == "LoRA on lm_head"
    config = ClaraConfig(base_model="tiny-mistral", doc_max_length=64, lora_r=4)
    windowed = ClaraModel(tiny_causal_lm("mistral", sliding_window=16), tiny_tokenizer(), config)
    assert windowed.sliding_window == 16 and fused_support(windowed) == "a sliding window of 16 positions"


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "phi3", "mistral"])
def test_other_families_fp32(family):
    model, path = tiny_onnx_export("fp32", family=family)
    backend = OnnxBackend(path)
    assert backend.manifest["generator_graph"].startswith("traced (model type" if family == "phi3" else "fused")
    assert _max_abs(model.compress(DOCS), backend.compress(DOCS)) < 1e-4
    mem = model.compress(DOCS[:2])
    ref = model.generate(QUESTIONS[:2], [mem[:1], mem], max_new_tokens=8)
    assert backend.generate(QUESTIONS[:2], [mem[:1], mem], max_new_tokens=8).token_ids == ref.token_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_generator_computes_what_torch_traces(family, monkeypatch):
    """The exported generator (ORT fused operators, extending its KV buffers in place) against torch.onnx's trace
    of the same model: a left-padded batch prefill, decode steps, then prompts on top of a past (one row, and a
    batch the backend splits into rows, which GroupQueryAttention cannot take at once); logits and caches alike
    (qwen2 adds q/k/v biases). Buffers grow every few positions here, so growth is crossed mid-sequence."""
    import onnxruntime as ort

    monkeypatch.setattr(KVCache, "GROWTH", 4)
    model, path = tiny_onnx_export("fp32", family=family)
    backend = OnnxBackend(path)
    assert backend.manifest["generator_graph"] == "fused"
    traced = ort.InferenceSession(trace_graphs(model, fused=False).protos["generator"].SerializeToString(),
                                  providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    mask = np.zeros((2, 0), np.int64)
    state = backend._generator_state(2)
    for i, (rows, step) in enumerate((([0, 1], 5), ([0, 1], 1), ([0, 1], 1), ([1], 3), ([0, 1], 3))):
        new = np.ones((2, step), np.int64)
        new[0, :2 if i == 0 else 0] = 0  # row 0 starts with two pad positions
        total = np.concatenate([mask, new], axis=1)
        embeds = rng.standard_normal((len(rows), step, model.hidden_size)).astype(np.float32)
        positions = np.clip(total.cumsum(-1) - 1, 0, None)[rows, -step:]
        past = KVCache({name: a[rows] for name, a in state.arrays.items()}, state.length)  # those rows, copied
        ref = traced.run(None, {"inputs_embeds": embeds, "attention_mask": total[rows], "position_ids": positions,
                                **past.filled()})
        logits, present = backend._generator_step(embeds, total[rows], positions, past)
        assert present.length == total.shape[1] and present.capacity >= present.length
        assert _max_abs(logits, ref[0]) < 1e-4
        real = total[rows].astype(bool)  # pad positions hold no-one's keys (each graph fills them its own way)
        assert all(_max_abs(present.filled()[n][j][:, real[j]], r[j][:, real[j]]) < 1e-4
                   for n, r in zip(present.arrays, ref[1:]) for j in range(len(rows)))
        if rows == [0, 1]:
            state, mask = present, total


@pytest.mark.parametrize("family", ["phi3", "llama"])  # a traced generator, a fused one
def test_switching_rope_exports_with_its_original_frequencies(family, tmp_path):
    """Longrope (Phi-3-128k, Phi-3.5) switches its RoPE frequencies in place past original_max_position_embeddings,
    which torch.export cannot trace: the export holds the original ones, as torch runs them up to that length,
    and serves no more positions than that."""
    from tiny import tiny_causal_lm, tiny_tokenizer

    from clara_edge.export.api import check_export, export_model
    from clara_edge.model import ClaraConfig, ClaraModel

    rope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0, 4.0, 8.0, 16.0],
            "original_max_position_embeddings": 256}
    lm = tiny_causal_lm(family, rope_scaling=rope, max_position_embeddings=512, original_max_position_embeddings=256)
    config = ClaraConfig(base_model=f"tiny-{family}", doc_max_length=64, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = ClaraModel(lm, tiny_tokenizer(), config, seed=0).eval()
    randomize_adapters(model, scale=0.05)
    assert model.fixed_rope_positions == 256
    path = export_model(model, "onnx", "fp32", tmp_path / "export")
    rotary = lm.model.rotary_emb
    assert rotary.rope_type == "longrope"  # the caller's model is left switching
    assert OnnxBackend(path).max_positions == 256
    questions = [(QUESTIONS[0], [DOCS[0]])]
    assert len(model.prompt_ids(QUESTIONS[0], 1)) + 8 < 256
    result = check_export(path, reference_model=model, questions=questions, probe=False, max_new_tokens=8)
    assert result["graphs"]["generator"]["max_abs"] < 1e-4 and result["token_agreement"] == 1.0
