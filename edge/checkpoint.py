"""Building, saving and loading CLaRa models; importing Apple's released CLaRa checkpoints.

Our format (a directory):
    clara_config.json             ClaraConfig + format version + base fingerprint + model fingerprint
    adapters.safetensors          "{role}.{peft key}" -> LoRA tensors, for role in compressor/query/generator
    special_embeddings.safetensors  "special_embeddings" [n_special, H] (+ "override.{param}" base rows, if any;
                                  + "retrieval_centre" [n_mem, H] fp32, if the model has one)
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import replace_dir, staging_dir
from .base_models import DEFAULT_BASE, cache_root, resolve_base
from .devices import keep_cudnn_out_of_sdpa, resolve_device, resolve_dtype
from .errors import ClaraError
from .model import ROLES, ClaraConfig, ClaraModel, weights_fingerprint

FORMAT_VERSION = 1
CONFIG_FILE = "clara_config.json"
ADAPTERS_FILE = "adapters.safetensors"
EMBEDDINGS_FILE = "special_embeddings.safetensors"
CENTRE_KEY = "retrieval_centre"
WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped, trained defaults

DEFAULT_COMPRESSION = 16
log = logging.getLogger("clara_edge")


def build_model(config: ClaraConfig, device: str | None = None, dtype: str | None = None,
                seed: int = 0) -> ClaraModel:
    """A fresh ClaraModel (untrained adapters: LoRA B = 0, so every role starts as the base LM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_base(config.base_model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        # fp16 loads go through the stored dtype: the base fingerprint digests bf16-rounded weights, and fp32
        # rounded to fp16 first would round twice and give another fingerprint than fp32 and bf16 loads give
        lm = AutoModelForCausalLM.from_pretrained(str(folder), dtype="auto" if torch_dtype == torch.float16
                                                  else torch_dtype)
    except (OSError, ValueError, SafetensorError) as e:
        raise ClaraError(f"cannot load base model from {folder}: {str(e).splitlines()[0][:200]}"
                         + (" (a damaged cache: delete the folder, then `clara-edge models fetch`)"
                            if folder.resolve().is_relative_to(cache_root().resolve()) else "")) from None
    model = ClaraModel(lm.eval(), tokenizer, config, seed=seed)
    with torch.no_grad():  # parameters only: buffers such as the rotary frequencies keep their fp32
        for p in model.parameters():
            p.data = p.data.to(torch_dtype)
    model = model.to(dev).eval()
    _configure_attention(model)
    return model


def _configure_attention(model: ClaraModel) -> None:
    """CLARA_EDGE_ATTENTION=sdpa (default) | triton | auto picks the attention implementation.

    The Triton kernels (clara_edge.kernels) stay opt-in until they are verified and timed on a GPU; on
    the CPU every setting resolves to SDPA.
    """
    keep_cudnn_out_of_sdpa(model.device)
    choice = os.environ.get("CLARA_EDGE_ATTENTION", "sdpa")
    if choice not in ("sdpa", "triton", "auto"):
        raise ClaraError(f"CLARA_EDGE_ATTENTION must be sdpa, triton or auto, not {choice!r}")
    if choice != "sdpa":
        from clara_edge.kernels.hf_attention import configure
        configure(model.lm.get_base_model(), choice if model.device.type == "cuda" else "sdpa")


def _peft_state(model: ClaraModel, role: str) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(model.lm, adapter_name=role)


def _apply_overrides(model: ClaraModel, overrides: dict[str, torch.Tensor]) -> None:
    """Replace base parameters (e.g. a fine-tuned embedding table) and refresh the base fingerprint."""
    if not overrides:
        return
    params = dict(model.lm.get_base_model().named_parameters())
    with torch.no_grad():
        for name, value in overrides.items():
            if name not in params or params[name].shape != value.shape:
                raise ClaraError(f"checkpoint override {name} {tuple(value.shape)} does not fit the base model")
            params[name].copy_(value)
    model.base_overrides = sorted(overrides)
    model.base_fingerprint = weights_fingerprint(list(params.items()))


def save_checkpoint(model: ClaraModel, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                    overrides: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapters + special embeddings + config atomically (a crash leaves the old checkpoint intact)."""
    out = Path(out_dir)
    tmp = staging_dir(out)
    tensors = {f"{role}.{key}": t.detach().to("cpu", dtype).contiguous()
               for role in ROLES for key, t in _peft_state(model, role).items()}
    save_file(tensors, tmp / ADAPTERS_FILE)
    embeds = {"special_embeddings": model.special_embeddings.detach().to("cpu", dtype).contiguous()}
    base_params = dict(model.lm.get_base_model().named_parameters())
    for name in getattr(model, "base_overrides", []):
        embeds[f"override.{name}"] = base_params[name].detach().to("cpu", dtype).contiguous()
    for name, value in (overrides or {}).items():
        embeds[f"override.{name}"] = value.detach().to("cpu", dtype).contiguous()
    if model.retrieval_centre is not None:
        embeds[CENTRE_KEY] = model.retrieval_centre.detach().to("cpu", torch.float32).contiguous()
    save_file(embeds, tmp / EMBEDDINGS_FILE)
    meta = {"format": "clara-edge", "format_version": FORMAT_VERSION, "config": model.config.to_dict(),
            "base_fingerprint": model.base_fingerprint, "fingerprint": model.fingerprint(as_saved=dtype),
            "roles": list(ROLES), "dtype": str(dtype).removeprefix("torch."), "eos_ids": model.eos_ids()}
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return replace_dir(tmp, out)


def is_checkpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file()


def read_checkpoint_config(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
        if meta.get("format") != "clara-edge":
            raise ClaraError(f"{path / CONFIG_FILE} is not a clara-edge checkpoint config")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ClaraError(f"checkpoint {path} has format version {meta['format_version']}; this clara-edge "
                             f"reads up to {FORMAT_VERSION}: upgrade clara-edge")
        return meta
    except FileNotFoundError:
        raise ClaraError(f"{path} is not a clara-edge checkpoint (no {CONFIG_FILE})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ClaraError(f"corrupted checkpoint config {path / CONFIG_FILE}: {e}") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except FileNotFoundError:
        raise ClaraError(f"checkpoint file missing: {path}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ClaraError(f"corrupted checkpoint file {path}: {str(e).splitlines()[0][:160]}") from None


def load_checkpoint(path: str | Path, device: str | None = None, dtype: str | None = None,
                    base: str | None = None) -> ClaraModel:
    """Load one of our checkpoints; `base` overrides where the base model comes from (same weights required)."""
    path = Path(path)
    meta = read_checkpoint_config(path)
    try:
        config = ClaraConfig(**meta["config"])
    except TypeError as e:
        raise ClaraError(f"corrupted checkpoint config {path / CONFIG_FILE}: {e}") from None
    if base:
        config.base_model = base
    model = build_model(config, device, dtype)
    embeds = _load_tensors(path / EMBEDDINGS_FILE)
    _apply_overrides(model, {k.removeprefix("override."): v for k, v in embeds.items() if k.startswith("override.")})
    if model.base_fingerprint != meta.get("base_fingerprint"):
        raise ClaraError(f"checkpoint {path} was trained on a different base model than {config.base_model!r} "
                         f"(fingerprint {meta.get('base_fingerprint')} vs {model.base_fingerprint})")
    adapters = _load_tensors(path / ADAPTERS_FILE)
    _load_roles(model, {role: {k.removeprefix(role + "."): v for k, v in adapters.items() if k.startswith(role + ".")}
                        for role in ROLES})
    special = embeds.get("special_embeddings")
    if special is None or special.shape != model.special_embeddings.shape:
        raise ClaraError(f"checkpoint {path}: special embeddings missing or of the wrong shape")
    with torch.no_grad():
        model.special_embeddings.copy_(special)
    centre = embeds.get(CENTRE_KEY)
    if centre is not None and tuple(centre.shape) != (config.n_mem, model.hidden_size):
        raise ClaraError(f"checkpoint {path}: retrieval centre of shape {tuple(centre.shape)}, expected "
                         f"{(config.n_mem, model.hidden_size)}")
    model.retrieval_centre = None if centre is None else centre.float()
    eos = meta.get("eos_ids", [])
    if not (isinstance(eos, list) and all(isinstance(i, int) and 0 <= i < model.base_vocab for i in eos)):
        raise ClaraError(f"corrupted checkpoint config {path / CONFIG_FILE}: eos_ids {eos!r}")
    model.trained_eos_ids = eos
    return model.eval()


def _load_roles(model: ClaraModel, states: dict[str, dict[str, torch.Tensor]]) -> None:
    for role, state in states.items():
        if not state:
            raise ClaraError(f"checkpoint holds no weights for the {role} adapter")
        expected = set(_peft_state(model, role))
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ClaraError(f"{role} adapter does not fit the base model ({len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors, e.g. {sorted(missing | unexpected)[0]})")
        set_peft_model_state_dict(model.lm, state, adapter_name=role)


# ------------------------------------------------------------------------------------------ CLaRa import
CLARA_ADAPTER_ROLES = {"encoder_adapter": "compressor", "query_reasoner_adapter": "query",
                       "decoder_adapter": "generator"}


def _torch_load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ClaraError(f"CLaRa checkpoint file missing: {path}") from None
    except Exception as e:  # unpickling errors come in many types
        raise ClaraError(f"cannot read {path} safely (weights_only): {str(e).splitlines()[0][:160]}") from None


def _lora_targets(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in state if ".lora_A" in k})


def import_clara(folder: str | Path, base: str, device: str | None = None, dtype: str | None = None) -> ClaraModel:
    """Import an apple/CLaRa-7B-* `compression-N/` folder onto `base` (the base model's own weights).

    Every adapter present is used (the reference loader drops the Instruct generator unless told not to).
    A checkpoint without a query adapter (stages 1-2) encodes queries with its compressor, as CLaRa does
    before end-to-end training.
    """
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise ClaraError(f"{folder} is not a CLaRa checkpoint folder (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ClaraError(f"corrupted {folder / 'config.json'}: {e}") from None
    adapters = _torch_load(folder / "adapters.pth")
    states = {CLARA_ADAPTER_ROLES[name]: sd for name, sd in adapters.items() if name in CLARA_ADAPTER_ROLES}
    unknown = set(adapters) - set(CLARA_ADAPTER_ROLES)
    if unknown or "compressor" not in states or "generator" not in states:
        raise ClaraError(f"{folder / 'adapters.pth'}: expected encoder/decoder(/query_reasoner) adapters, "
                         f"found {sorted(adapters)}")
    states.setdefault("query", states["compressor"])
    lora_r = int(cfg.get("lora_r", 16))
    config = ClaraConfig(base_model=base, compression_rate=int(cfg["compr_rate"]),
                         doc_max_length=int(cfg.get("doc_max_length", 256)), lora_r=lora_r,
                         lora_alpha=int(cfg.get("lora_alpha", 2 * lora_r)), lora_dropout=0.0,
                         target_modules=_lora_targets(states["compressor"]),
                         extra={"imported_from": str(folder), "training_stage": cfg.get("training_stage"),
                                "decoder_model_name": cfg.get("decoder_model_name")})
    model = build_model(config, device, dtype)
    prefix = "base_model.model."
    _load_roles(model, {role: {k if k.startswith(prefix) else prefix + k: v for k, v in sd.items()}
                        for role, sd in states.items()})
    _import_embeddings(model, _torch_load(folder / "decoder_first_last_layers.pth"))
    return model.eval()


def _import_embeddings(model: ClaraModel, tables: dict[str, torch.Tensor]) -> None:
    """Take the added-token rows of the resized embedding table; keep changed base rows as overrides."""
    embed = next((v for k, v in tables.items() if "embed_tokens" in k), None)
    if embed is None:
        raise ClaraError("decoder_first_last_layers.pth holds no embed_tokens table")
    n_special, vocab = model.special_embeddings.shape[0], model.base_vocab
    if embed.shape[0] < vocab + n_special or embed.shape[1] != model.hidden_size:
        raise ClaraError(f"embedding table {tuple(embed.shape)} does not extend the base vocabulary {vocab} by "
                         f"{n_special} special tokens of width {model.hidden_size}")
    with torch.no_grad():
        model.special_embeddings.copy_(embed[vocab:vocab + n_special])
    base_params = dict(model.lm.get_base_model().named_parameters())
    overrides = {}
    for key, table in tables.items():
        name = next((n for n in base_params if n.endswith(("embed_tokens.weight", "lm_head.weight"))
                     and n.split(".")[-2] in key), None)
        if name is None:
            continue
        rows = table[: base_params[name].shape[0]].to(base_params[name].dtype)
        if not torch.equal(rows, base_params[name].detach().cpu()):
            overrides[name] = rows
    if overrides:
        warnings.warn(f"CLaRa checkpoint changes base rows of {sorted(overrides)}; kept as overrides", stacklevel=2)
    _apply_overrides(model, overrides)


# ------------------------------------------------------------------------------------------ one entry point
def default_checkpoint(compression: int) -> Path:
    return WEIGHTS_DIR / f"{DEFAULT_BASE}-cr{compression}"


def load_model(spec: str | None = None, compression: int | None = None, device: str | None = None,
               dtype: str | None = None, base: str | None = None) -> ClaraModel:
    """Whatever a user names as a model -> ClaraModel.

    None/"default": the shipped trained default for `compression` (16 if not given), else an untrained
    model on the default base; a clara-edge checkpoint directory; a CLaRa `compression-N/` folder (needs
    `base`); a base model (built-in name, HF folder, .gguf) -> untrained adapters at `compression`.
    """
    if compression is not None and compression < 1:  # 0 used to fall back to 16 unnoticed
        raise ClaraError(f"compression must be a positive rate, got {compression}")
    rate = DEFAULT_COMPRESSION if compression is None else compression
    if spec in (None, "", "default"):
        shipped = default_checkpoint(rate)
        if is_checkpoint(shipped):
            return load_checkpoint(shipped, device, dtype, base)
        shipped_rates = sorted(int(m[1]) for p in WEIGHTS_DIR.iterdir() if is_checkpoint(p)
                               and (m := re.fullmatch(rf"{re.escape(DEFAULT_BASE)}-cr(\d+)", p.name)))
        log.warning("no trained weights ship for compression %d (they do for %s): its adapters are untrained and "
                    "it answers as the base model would", rate, ", ".join(map(str, shipped_rates)))
        return build_model(ClaraConfig(base_model=base or DEFAULT_BASE, compression_rate=rate), device, dtype)
    path = Path(spec).expanduser()
    if path.is_dir() and is_checkpoint(path):
        model = load_checkpoint(path, device, dtype, base)
    elif path.is_dir() and (path / "adapters.pth").is_file():
        if not base:
            raise ClaraError(f"{path} is a CLaRa checkpoint: name its base model folder with --base")
        model = import_clara(path, base, device, dtype)
    else:
        return build_model(ClaraConfig(base_model=spec, compression_rate=rate), device, dtype)
    if compression is not None and compression != model.config.compression_rate:
        raise ClaraError(f"model {spec} is trained for compression {model.config.compression_rate}, "
                         f"not {compression}")
    return model
