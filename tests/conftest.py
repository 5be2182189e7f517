import os
import sys
import warnings
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton reads this when it is first imported, which transformers or torch may do before a kernel test
# module runs: set it here, first. On a GPU run the compiled kernels with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def tiny_base_dir(tmp_path):
    """A tiny random Llama + tokenizer saved as a local Hugging Face folder (a base model on disk)."""
    from tiny import tiny_causal_lm, tiny_tokenizer

    folder = tmp_path / "tiny-base"
    tiny_causal_lm("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
