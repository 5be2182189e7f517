"""Device and dtype selection, in one place. Nothing else in clara_edge calls `.cuda()`."""
from __future__ import annotations

import torch

from .errors import ClaraError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_device(name: str | None = None) -> torch.device:
    """`auto` (or None) picks CUDA, then MPS, then CPU; an explicit name must be available."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClaraError(f"unknown device {name!r}: use auto, cpu, cuda[:N] or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClaraError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ClaraError(f"device {name!r} requested but MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ClaraError(f"unknown device {name!r}: use auto, cpu, cuda[:N] or mps")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto` gives bf16 on CUDA (fp16 where bf16 is unsupported), fp16 on MPS, fp32 on CPU."""
    if name in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ClaraError(f"unknown dtype {name!r}: use auto, fp32, fp16 or bf16")
    return DTYPES[name]


def keep_cudnn_out_of_sdpa(device: torch.device) -> None:
    """On CUDA, take cuDNN out of SDPA's backends (process-wide): flash / memory-efficient / math remain.

    Why: torch 2.11 tries cuDNN first for SDPA on Hopper and Blackwell (pytorch#162073), and with an explicit
    mask cuDNN builds an execution plan for every new shape (~0.4 s each, as reported upstream). Shapes here
    are new all the time: a prompt that reuses a cached prefix (explicit mask: queries shorter than keys) or a
    padded batch. The bench measured a prefix-reused prefill at 0.55 s against 0.08 s for the whole prompt
    (H200, clara k=20), before this; the likely cause, to be re-measured on a GPU.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads: `threads`, else $CLARA_EDGE_THREADS, else all cores but one.

    Leaving a core free matters: a parallel region waits for its slowest thread, so one thread descheduled by
    another process stalls every small op (measured on a busy 2-core box: decode 0.3 tok/s with 2 threads,
    10.5 tok/s with 1).
    """
    import os
    if threads is None:
        env = os.environ.get("CLARA_EDGE_THREADS", "").strip()
        if env and not env.isdigit():
            raise ClaraError(f"CLARA_EDGE_THREADS must be a whole number of threads, got {env!r}")
        threads = int(env) if env else max(1, (os.cpu_count() or 2) - 1)
    if threads < 1:
        raise ClaraError(f"threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
