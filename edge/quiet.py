"""Quiet library output for command-line and benchmark processes."""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Library warnings and progress bars are noise on a CLI; CLARA_EDGE_DEBUG=1 brings them back."""
    if os.environ.get("CLARA_EDGE_DEBUG"):
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # (optional) bitsandbytes: CPU-kernel fallbacks
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
