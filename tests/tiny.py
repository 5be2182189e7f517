"""Tiny, randomly initialised models and a tiny tokenizer, built in-process (no files, no network)."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, Phi3Config, PreTrainedTokenizerFast,
                          Qwen2Config)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('system role not supported') }}{% endif %}"
                "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %}{{ m['content'] }}"
                "{{ eos_token }}{% endif %}{% endfor %}")
CORPUS = [
    "The Eiffel Tower is in Paris, the capital of France.",
    "Mount Everest is the highest mountain above sea level.",
    "Water boils at 100 degrees Celsius at sea level.",
    "Question: who wrote Hamlet? Answer: William Shakespeare.",
    "Background: documents about history, science, geography and art.",
] * 4

_TOKENIZER: Tokenizer | None = None


def tiny_tokenizer(template: str = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~300 entries) with ChatML-style special tokens."""
    global _TOKENIZER
    if _TOKENIZER is None:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        _TOKENIZER = tok
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_TOKENIZER.to_str()), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = template
    return fast


FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "phi3": Phi3Config,
}


def tiny_causal_lm(family: str = "llama", vocab_size: int = 320, seed: int = 0, **overrides):
    cls = FAMILIES[family]
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=(family == "llama"))
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cls(**kwargs)).eval()


def tiny_clara(family: str = "llama", compression_rate: int = 16, doc_max_length: int = 64, seed: int = 0,
               template: str = CHATML, **lora):
    from clara_edge.model import ClaraConfig, ClaraModel

    config = ClaraConfig(base_model=f"tiny-{family}", compression_rate=compression_rate,
                         doc_max_length=doc_max_length, lora_r=lora.get("lora_r", 4), lora_alpha=8,
                         lora_dropout=0.0, target_modules=lora.get("target_modules", "all-linear"))
    model = ClaraModel(tiny_causal_lm(family, seed=seed), tiny_tokenizer(template), config, seed=seed)
    return model.eval()


def randomize_adapters(model, scale: float = 0.2, seed: int = 1) -> None:
    """LoRA B starts at zero (adapter = identity); give every adapter weight random values to test it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
