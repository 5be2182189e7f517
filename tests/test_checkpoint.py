"""Our checkpoint format, the one model-loading entry point, and the CLaRa-layout importer."""
import json

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from clara_edge.checkpoint import (ADAPTERS_FILE, CONFIG_FILE, EMBEDDINGS_FILE, build_model, import_clara,
                                   load_checkpoint, load_model, save_checkpoint)
from clara_edge.errors import ClaraError
from clara_edge.model import ClaraConfig
from tiny import randomize_adapters, tiny_causal_lm, tiny_tokenizer

DOCS = ["The Eiffel Tower is in Paris.", "Water boils at 100 degrees Celsius."]


def _base(tmp_path, family="llama"):
    folder = tmp_path / f"base-{family}"
    tiny_causal_lm(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _model(base, rate=16):
    config = ClaraConfig(base_model=str(base), compression_rate=rate, doc_max_length=64, lora_r=4, lora_alpha=8,
                         lora_dropout=0.0)
    m = build_model(config, device="cpu", dtype="fp32")
    randomize_adapters(m)
    with torch.no_grad():
        m.special_embeddings.normal_()
    return m


def _assert_same_outputs(a, b):
    torch.testing.assert_close(a.compress(DOCS), b.compress(DOCS), atol=0, rtol=0)
    torch.testing.assert_close(a.encode_query(DOCS), b.encode_query(DOCS), atol=0, rtol=0)
    mem = a.compress(DOCS)
    assert a.generate(["Where?"], [mem], max_new_tokens=6).token_ids == \
        b.generate(["Where?"], [mem], max_new_tokens=6).token_ids
    assert a.fingerprint() == b.fingerprint()


def test_save_load_round_trip_is_exact(tmp_path):
    m = _model(_base(tmp_path))
    out = save_checkpoint(m, tmp_path / "ck", dtype=torch.float32)
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTERS_FILE, CONFIG_FILE, EMBEDDINGS_FILE])
    _assert_same_outputs(m, load_model(str(out)))


def test_fp16_checkpoint_is_close_and_opens_in_every_dtype_with_the_fingerprint_it_records(tmp_path):
    """An fp32 base loaded in fp16 (a Mac's default) used to round twice and refuse the checkpoint."""
    import json

    m = _model(_base(tmp_path))
    saved = save_checkpoint(m, tmp_path / "ck")  # fp16, from an fp32 model
    loaded = load_checkpoint(saved)
    torch.testing.assert_close(m.compress(DOCS), loaded.compress(DOCS), atol=2e-2, rtol=2e-2)
    recorded = json.loads((saved / CONFIG_FILE).read_text())["fingerprint"]
    for dtype in ("fp32", "bf16", "fp16"):
        again = load_checkpoint(saved, device="cpu", dtype=dtype)
        assert again.fingerprint() == recorded and again.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16,
                                                                   "fp16": torch.float16}[dtype]
    rotary = [b for n, b in again.named_buffers() if n.endswith("inv_freq")]
    assert rotary and all(b.dtype == torch.float32 for b in rotary)  # only parameters take the load dtype


def test_the_retrieval_centre_round_trips_in_fp32(tmp_path):
    m = _model(_base(tmp_path))
    assert load_checkpoint(save_checkpoint(m, tmp_path / "plain")).retrieval_centre is None
    m.retrieval_centre = torch.randn(m.config.n_mem, m.hidden_size) * 1e-3 + 1.0  # not representable in fp16
    out = save_checkpoint(m, tmp_path / "centred")  # an fp16 checkpoint: the centre stays exact
    assert torch.equal(load_checkpoint(out).retrieval_centre, m.retrieval_centre)
    tensors = load_file(out / EMBEDDINGS_FILE)
    save_file({**tensors, "retrieval_centre": torch.zeros(2, 3)}, out / EMBEDDINGS_FILE)
    with pytest.raises(ClaraError, match="retrieval centre of shape"):
        load_checkpoint(out)


def test_the_eos_a_generator_was_trained_with_stops_it_after_loading(tmp_path):
    """A checkpoint records the eos ids of its training; loaded where the tokenizer names another eos (transformers'
    gguf conversion changed SmolLM2's between versions), generation still stops on the trained one."""
    m = _model(_base(tmp_path))
    out = save_checkpoint(m, tmp_path / "ck", dtype=torch.float32)
    meta = json.loads((out / CONFIG_FILE).read_text())
    assert meta["eos_ids"] == m.eos_ids() == [2]
    free = m.generate(["Where?"], [m.compress(DOCS[:1])], max_new_tokens=8).token_ids[0]
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])
    meta["eos_ids"] = [free[cut]]  # as if training had ended answers with this token
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    loaded = load_checkpoint(out)
    assert loaded.eos_ids() == sorted({2, free[cut]})
    assert loaded.generate(["Where?"], [loaded.compress(DOCS[:1])], max_new_tokens=8).token_ids[0] == free[:cut]
    meta["eos_ids"] = [10**9]
    (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ClaraError, match="eos_ids"):
        load_checkpoint(out)


def test_load_model_rejects_wrong_compression(tmp_path):
    out = save_checkpoint(_model(_base(tmp_path)), tmp_path / "ck")
    with pytest.raises(ClaraError, match="compression 16, not 64"):
        load_model(str(out), compression=64)


def test_a_rate_without_shipped_weights_says_so_and_zero_is_refused(tmp_path, caplog):
    base = str(_base(tmp_path))
    with caplog.at_level("WARNING", logger="clara_edge"):
        model = load_model(None, compression=8, base=base)
    assert model.config.compression_rate == 8
    assert "no trained weights ship for compression 8 (they do for 16, 64)" in caplog.text
    for rate in (0, -4):  # 0 used to become 16 silently
        with pytest.raises(ClaraError, match=f"compression must be a positive rate, got {rate}"):
            load_model(None, compression=rate, base=base)
    out = save_checkpoint(_model(base, rate=64), tmp_path / "ck64")
    assert load_model(str(out)).config.compression_rate == 64  # no --compression: the checkpoint's own rate


def test_a_damaged_cached_base_model_says_how_to_recover(tmp_path, monkeypatch):
    monkeypatch.setenv("CLARA_EDGE_HOME", str(tmp_path / "home"))
    cached = tmp_path / "home" / "models" / "tiny"
    tiny_causal_lm("llama").save_pretrained(cached)
    tiny_tokenizer().save_pretrained(cached)
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ClaraError, match=r"cannot load base model .*\(a damaged cache: delete the folder"):
        load_model(str(cached))


def test_checkpoint_on_another_base_is_a_clear_error(tmp_path):
    out = save_checkpoint(_model(_base(tmp_path)), tmp_path / "ck")
    other = tmp_path / "other"
    tiny_causal_lm("llama", seed=5).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    with pytest.raises(ClaraError, match="different base model"):
        load_checkpoint(out, base=str(other))


@pytest.mark.parametrize("damage", ["config", "adapters", "embeddings", "missing", "future"])
def test_corrupted_checkpoints_are_clear_errors(tmp_path, damage):
    out = save_checkpoint(_model(_base(tmp_path)), tmp_path / "ck")
    if damage == "config":
        (out / CONFIG_FILE).write_text("{not json")
    elif damage == "adapters":
        data = (out / ADAPTERS_FILE).read_bytes()
        (out / ADAPTERS_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "embeddings":
        (out / EMBEDDINGS_FILE).write_bytes(b"\x00" * 64)
    elif damage == "missing":
        (out / ADAPTERS_FILE).unlink()
    else:
        meta = json.loads((out / CONFIG_FILE).read_text())
        meta["format_version"] = 99
        (out / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ClaraError):
        load_checkpoint(out)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ClaraError, match="not found"):
        load_model(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------ CLaRa import
def _write_clara_layout(model, folder, with_query=True):
    """Write `model` in the layout of apple/CLaRa-7B-*/compression-N/ (config.json, adapters.pth,
    decoder_first_last_layers.pth), key names included."""
    folder.mkdir(parents=True)
    names = {"compressor": "encoder_adapter", "generator": "decoder_adapter", "query": "query_reasoner_adapter"}
    adapters = {}
    for role, name in names.items():
        if role == "query" and not with_query:
            continue
        state = get_peft_model_state_dict(model.lm, adapter_name=role)
        adapters[name] = {k.removeprefix("base_model.model."): v.clone() for k, v in state.items()}
    assert all(k.startswith("model.layers.") for k in adapters["encoder_adapter"])
    torch.save(adapters, folder / "adapters.pth")
    base = model.lm.get_base_model()
    embed = torch.cat([base.get_input_embeddings().weight.detach(), model.special_embeddings.detach()])
    lm_head = torch.cat([base.get_output_embeddings().weight.detach(),
                         torch.randn(model.special_embeddings.shape)])
    torch.save({"model.embed_tokens.weight": embed, "lm_head.weight": lm_head},
               folder / "decoder_first_last_layers.pth")
    config = {"compr_rate": model.config.compression_rate, "doc_max_length": model.config.doc_max_length,
              "generation_top_k": 5, "training_stage": "stage1_2", "lora_r": model.config.lora_r, "sep": True,
              "different_mem_tokens": True, "decoder_model_name": "tiny-mistral"}
    (folder / "config.json").write_text(json.dumps(config))


def test_clara_import_round_trip_is_exact(tmp_path):
    base = _base(tmp_path, "mistral")
    source = _model(base)
    _write_clara_layout(source, tmp_path / "compression-16")
    imported = load_model(str(tmp_path / "compression-16"), base=str(base))
    _assert_same_outputs(source, imported)
    assert imported.config.extra["training_stage"] == "stage1_2"
    # and it survives our own format
    _assert_same_outputs(source, load_checkpoint(save_checkpoint(imported, tmp_path / "ours", torch.float32)))


def test_clara_import_without_query_adapter_uses_compressor(tmp_path):
    base = _base(tmp_path, "mistral")
    source = _model(base)
    _write_clara_layout(source, tmp_path / "c16", with_query=False)
    imported = import_clara(tmp_path / "c16", str(base))
    torch.testing.assert_close(imported.encode_query(DOCS), source.compress(DOCS), atol=0, rtol=0)


def test_clara_import_needs_base_and_safe_files(tmp_path):
    base = _base(tmp_path, "mistral")
    _write_clara_layout(_model(base), tmp_path / "c16")
    with pytest.raises(ClaraError, match="--base"):
        load_model(str(tmp_path / "c16"))
    (tmp_path / "c16" / "adapters.pth").write_bytes(b"not a torch file")
    with pytest.raises(ClaraError, match="weights_only"):
        import_clara(tmp_path / "c16", str(base))
