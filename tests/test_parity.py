"""The parity gate (`clara-edge export --check`) and the memory-store quantisation gate, on tiny models."""
from __future__ import annotations

import json
import statistics

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from test_export_onnx import DOCS, QUESTIONS, tiny_onnx_export  # noqa: E402
from tiny import tiny_clara  # noqa: E402

from clara_edge.backend import open_backend  # noqa: E402
from clara_edge.errors import ClaraError  # noqa: E402
from clara_edge.export.api import check_bnb, check_export, check_memory_quant, export_model  # noqa: E402
from clara_edge.export.parity import agreement_questions, f1_parity, tensor_error  # noqa: E402

FIXED = [(q, [d]) for q, d in zip(QUESTIONS, DOCS)]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    """A 4-row dev JSONL in the shared eval format (question, golden_answers, docs, pos_index)."""
    rows = [{"id": f"d{i}", "dataset": "tiny", "question": q, "golden_answers": [a],
             "docs": [{"title": "T", "text": d}, {"title": "X", "text": "Unrelated text."}], "pos_index": [0]}
            for i, (q, a, d) in enumerate(zip(QUESTIONS + ["what is high?"], ["Shakespeare", "Paris", "water", "Everest"],
                                              DOCS + [DOCS[2]]))]
    path = tmp_path_factory.mktemp("dev") / "dev.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_tensor_error():
    a = np.ones((2, 3, 4), dtype=np.float32)
    assert tensor_error(a, a) == {"max_abs": 0.0, "cosine": pytest.approx(1.0), "cosine_min": pytest.approx(1.0)}
    err = tensor_error(a, -a)
    assert err["max_abs"] == 2.0 and err["cosine"] == pytest.approx(-1.0)


def test_fp32_export_passes_the_gate(tmp_path, dev_file):
    model, path = tiny_onnx_export("fp32")
    out = tmp_path / "parity.json"
    result = check_export(path, reference_model=model, questions=FIXED, dev_file=dev_file, n_dev=4, json_out=out,
                          max_new_tokens=10)
    assert result["token_agreement"] == 1.0 and result["sequence_match"] == 1.0
    assert result["f1_delta"] == 0.0 and result["n_dev"] == 4
    assert result["f1_delta_se"] == 0.0 and result["f1_rows_changed"] == 0
    for graph in ("compressor", "query", "generator", "retrieval"):
        assert result["graphs"][graph]["max_abs"] < 1e-4
        assert result["graphs"][graph]["cosine_min"] > 0.99999
    assert result["same_centre"] is True and result["passed"] is True
    written = json.loads(out.read_text())
    for key in ("token_agreement", "f1_delta", "size_mb", "peak_rss_mb", "tokens_per_s"):
        assert key in written
    assert written["peak_rss_mb"] > 0 and written["tokens_per_s"] > 0 and written["size_mb"] > 0


def test_int4_export_is_measured_against_its_own_targets():
    model, path = tiny_onnx_export("int4")
    result = check_export(path, reference_model=model, questions=FIXED, probe=False, max_new_tokens=10)
    assert result["targets"] == {"token_agreement": None, "abs_f1_delta": 1.5, "retrieval_agreement": 0.9}
    assert result["graphs"]["generator"]["max_abs"] > 0  # quantised: not bit-exact
    # without a dev file int4 is held to its ranking alone (no token-agreement target)
    assert result["f1_delta"] is None and result["passed"] is (result["retrieval_agreement"] >= 0.9)


@pytest.mark.parametrize("quant, measured, passed", [
    ("fp32", {"token_agreement": 0.95, "f1_delta": -0.5}, True),     # both at their bounds
    ("int8", {"token_agreement": 0.949, "f1_delta": 0.0}, False),
    ("fp16", {"token_agreement": 1.0, "f1_delta": 0.51}, False),
    ("int4", {"token_agreement": 0.1, "f1_delta": 1.5}, True),       # int4: no agreement target
    ("int4", {"token_agreement": 1.0, "f1_delta": -1.51}, False),
    ("int4", {"token_agreement": 1.0, "f1_delta": None}, None),      # nothing the targets name was measured
    ("int8", {"token_agreement": 1.0, "f1_delta": 0.0, "retrieval_agreement": 0.9}, True),
    ("int4", {"token_agreement": 1.0, "f1_delta": None, "retrieval_agreement": 0.89}, False),
    ("fp32", {"token_agreement": 1.0, "f1_delta": 0.0, "same_centre": False}, False),
    ("fp32", {"token_agreement": 1.0, "f1_delta": None, "same_centre": True}, True),
])
def test_gate_thresholds(quant, measured, passed):
    from clara_edge.export.parity import _gate

    assert _gate(dict(measured), quant)["passed"] is passed


def test_same_centre_compares_values_and_shapes():
    from clara_edge.export.parity import _same_centre

    centre = torch.randn(4, 8)
    assert _same_centre(None, None) and _same_centre(centre, centre.clone())
    assert not _same_centre(centre, centre + 0.1) and not _same_centre(centre, centre[:2])
    assert not _same_centre(centre, None) and not _same_centre(None, centre)


def test_a_query_graph_that_ranks_otherwise_fails_the_gate():
    """Same compressor, same generator, a query encoder that ranks at random: the gate must not pass it."""
    from clara_edge.export.parity import graph_and_token_parity

    model, path = tiny_onnx_export("fp32")
    backend = open_backend(str(path))
    questions = [(f"question {i} about {w}?", [f"{w} is a word number {i}."])
                 for i, w in enumerate(["river", "castle", "engine", "violin", "harbour", "glacier", "orchid",
                                        "lantern"])]
    honest = graph_and_token_parity(backend, model, questions, max_new_tokens=2)
    assert honest["retrieval_agreement"] == 1.0
    generator = torch.Generator().manual_seed(0)
    backend.encode_query = lambda qs: torch.randn(len(qs), model.config.n_mem, model.hidden_size,
                                                  generator=generator)
    shuffled = graph_and_token_parity(backend, model, questions, max_new_tokens=2)
    assert shuffled["retrieval_agreement"] < 0.9 and shuffled["token_agreement"] == 1.0


def test_an_export_without_its_models_retrieval_centre_fails(monkeypatch):
    """Same graphs, same answers, another ranking: the gate must not pass it."""
    model, path = tiny_onnx_export("fp32")
    monkeypatch.setattr(model, "retrieval_centre", torch.randn(model.config.n_mem, model.hidden_size))
    result = check_export(path, reference_model=model, questions=FIXED, probe=False, max_new_tokens=4)
    assert result["token_agreement"] == 1.0 and result["graphs"]["query"]["max_abs"] < 1e-4
    assert result["same_centre"] is False and result["passed"] is False
    assert result["graphs"]["retrieval"]["max_abs"] > 1e-3


def test_reference_must_be_the_source_model():
    _, path = tiny_onnx_export("fp32")
    other = tiny_clara("llama", seed=5)
    with pytest.raises(ClaraError, match="not the one this export was made from"):
        check_export(path, reference_model=other, questions=FIXED, probe=False)


def test_check_needs_an_export(tmp_path):
    with pytest.raises(ClaraError):
        check_export(tmp_path / "missing", probe=False)


def test_export_model_dispatch(tmp_path):
    model = tiny_onnx_export("fp32")[0]
    with pytest.raises(ClaraError, match="unknown export format"):
        export_model(model, "tflite", "fp32", tmp_path / "x")
    with pytest.raises(ClaraError, match="unknown quantisation"):
        export_model(model, "onnx", "int3", tmp_path / "x")
    with pytest.raises(ClaraError, match="needs a torch model"):
        export_model(object(), "onnx", "fp32", tmp_path / "x")


def test_agreement_adds_the_first_dev_questions_with_their_gold_documents(dev_file, monkeypatch):
    from clara_edge.datasets import document_text

    fixed = [(q, list(ds)) for q, ds in FIXED]
    assert agreement_questions(None, 100, FIXED) == fixed
    questions = agreement_questions(dev_file, 100, FIXED)
    assert questions[:len(fixed)] == fixed
    assert questions[len(fixed):] == [(q, [document_text(("T", d))])
                                      for q, d in zip(QUESTIONS + ["what is high?"], DOCS + [DOCS[2]])]
    assert len(agreement_questions(dev_file, 2, FIXED)) == len(fixed) + 2  # no more than the F1 probe reads
    monkeypatch.setattr("clara_edge.export.parity.AGREEMENT_DEV_ROWS", 1)
    assert len(agreement_questions(dev_file, 100, FIXED)) == len(fixed) + 1


def test_f1_delta_comes_with_its_paired_standard_error(dev_file, monkeypatch):
    per_question = {"torch": [0.0, 50.0, 100.0, 0.0], "export": [0.0, 100.0, 100.0, 50.0]}

    def fake_evaluate(model, rows, **kw):
        f1 = per_question[model]
        return {"f1": sum(f1) / len(f1), "rows": [{"f1": v} for v in f1]}

    monkeypatch.setattr("clara_edge.evaluate.evaluate", fake_evaluate)
    result = f1_parity("export", "torch", dev_file, n_dev=4)
    assert result["f1_delta"] == 25.0 and result["f1_rows_changed"] == 2
    assert result["f1_delta_se"] == pytest.approx(statistics.stdev([0, 50, 0, 50]) / 2, abs=1e-4)


def test_store_int8_vectors_against_fp16(dev_file):
    model = tiny_onnx_export("fp32")[0]
    result = check_memory_quant(model, "int8", questions=FIXED, dev_file=dev_file, n_dev=4, max_new_tokens=10)
    assert result["memories"]["cosine_min"] > 0.999
    assert result["token_agreement"] >= 0.9
    assert result["n_dev"] == 4 and result["targets"] == {"token_agreement": 0.95, "abs_f1_delta": 0.5}
    assert result["passed"] is (result["token_agreement"] >= 0.95 and abs(result["f1_delta"]) <= 0.5)


def test_store_vector_check_from_the_command_line(tmp_path, dev_file, capsys):
    from tiny import tiny_causal_lm, tiny_tokenizer

    from clara_edge.checkpoint import build_model, save_checkpoint
    from clara_edge.cli import main
    from clara_edge.model import ClaraConfig

    base = tmp_path / "base"
    tiny_causal_lm("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = build_model(ClaraConfig(base_model=str(base), doc_max_length=64, lora_r=4, lora_alpha=8), "cpu", "fp32")
    ck = save_checkpoint(model, tmp_path / "ck")
    out = tmp_path / "store.json"
    assert main(["export", "--check", "store-int4", "--model", str(ck), "--data", str(dev_file), "--limit", "4",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["store_dtype"] == "int4" and result["reference_dtype"] == "fp16" and result["n_dev"] == 4
    assert result["targets"]["abs_f1_delta"] == 1.5
    assert result["passed"] is (abs(result["f1_delta"]) <= 1.5)
    assert json.loads(capsys.readouterr().out)["store_dtype"] == "int4"


def test_bitsandbytes_reports_unavailability_in_one_line():
    from clara_edge.export.bnb import bnb_unavailable, quantize_bnb

    reason = bnb_unavailable("cpu")
    if reason is None:
        pytest.skip("bitsandbytes runs here")
    assert "\n" not in reason
    with pytest.raises(ClaraError):
        quantize_bnb(tiny_clara("llama"), "nf4", "cpu")
    assert torch.__version__  # torch untouched


def test_bitsandbytes_check_is_one_clear_line_where_it_cannot_run(capsys):
    from clara_edge.cli import main
    from clara_edge.export.bnb import bnb_unavailable

    if bnb_unavailable("cpu") is None:
        pytest.skip("bitsandbytes runs here")
    assert main(["export", "--check", "bnb-nf4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("clara-edge: error:") and "bitsandbytes" in err and "\n" not in err


def test_bitsandbytes_gate_with_a_lossless_stand_in(dev_file, monkeypatch):
    """The gate's plumbing without bitsandbytes: a quantiser that changes nothing must pass with agreement 1."""
    import clara_edge.export.bnb as bnb

    model = tiny_clara("llama")
    monkeypatch.setattr(bnb, "quantize_bnb", lambda m, mode, device: m)
    result = check_bnb(model, "int8", "cpu", questions=FIXED, dev_file=dev_file, n_dev=4, max_new_tokens=10)
    assert result["token_agreement"] == 1.0 and result["f1_delta"] == 0 and result["passed"] is True
    assert result["graphs"]["compressor"]["max_abs"] == 0 and result["weights_mb"] == result["weights_mb_fp32"]
    nf4 = check_bnb(model, "nf4", "cpu", questions=FIXED[:2], max_new_tokens=6)
    assert nf4["targets"] == {"token_agreement": None, "abs_f1_delta": 1.5} and nf4["passed"] is None


def test_bitsandbytes_takes_every_base_linear_whatever_the_adapters_wrap():
    """The shipped adapters sit on attention only: the MLP (most of the weights) must be quantised too."""
    from clara_edge.export.bnb import base_linears

    for targets in ("all-linear", ["q_proj", "k_proj", "v_proj", "o_proj"]):
        decoder = tiny_clara("llama", target_modules=targets).lm.get_base_model().get_decoder()
        names = [name for name, _ in base_linears(decoder)]
        layers = len(decoder.layers)
        assert len(names) == 7 * layers and not any("lora" in n for n in names), names
        assert sum(".mlp.down_proj" in n for n in names) == layers
        assert sum(n.endswith("self_attn.q_proj.base_layer") for n in names) == layers


def test_bitsandbytes_int8_weights_through_the_gate(dev_file):
    from clara_edge.export.bnb import bnb_unavailable

    reason = bnb_unavailable("cpu")
    if reason is not None:
        pytest.skip(reason)
    result = check_bnb(tiny_clara("llama"), "int8", "cpu", questions=FIXED, dev_file=dev_file, n_dev=4,
                       max_new_tokens=10)
    assert result["bnb"] == "int8" and result["targets"] == {"token_agreement": 0.95, "abs_f1_delta": 0.5}
    assert result["graphs"]["compressor"]["cosine"] > 0.9 and 0 <= result["token_agreement"] <= 1
    assert result["weights_mb"] < result["weights_mb_fp32"] and result["f1_delta"] is not None


def test_agreement_counts_each_flipped_token():
    """A candidate that differs from torch at one teacher-forced step only: agreement (n - 1) / n."""
    from clara_edge.export.parity import _agreement

    model = tiny_clara("llama")
    questions = [("Where is the tower?", ["The tower is in Paris."])]
    memories = model.compress(questions[0][1])
    vocab = len(model.tokenizer)

    def forced(question, mem, targets):
        logits = np.zeros((len(targets), vocab), np.float32)
        logits[np.arange(len(targets)), targets] = 1.0
        logits[0] = 0.0
        logits[0, (targets[0] + 1) % vocab] = 1.0  # the first step predicts another token
        return logits

    result = _agreement(model, questions, memories, memories, forced, lambda q, mem: [[-1]], max_new_tokens=6)
    n = result["token_steps"]
    assert n >= 2 and result["token_agreement"] == round((n - 1) / n, 4) and result["sequence_match"] == 0.0
