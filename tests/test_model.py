"""ClaraModel on tiny random configs of every supported family."""
import pytest
import torch

from clara_edge import prompt as prompts
from clara_edge.errors import ClaraError
from clara_edge.model import ClaraConfig, ClaraModel
from clara_edge.prefix_cache import PrefixCache
from tiny import FAMILIES, MISTRAL_LIKE, randomize_adapters, tiny_causal_lm, tiny_clara, tiny_tokenizer

DOCS = ["The Eiffel Tower is in Paris, the capital of France.", "Water boils at 100 degrees.",
        "Mount Everest is the highest mountain above sea level. " * 3]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    m = tiny_clara(request.param)
    randomize_adapters(m)
    return m


def test_compress_shape_dtype_and_finite(model):
    mem = model.compress(DOCS)
    assert mem.shape == (3, model.config.n_mem, model.hidden_size)
    assert torch.isfinite(mem).all()


def test_compress_is_batch_invariant(model):
    """Left padding with mask-derived positions: a document's memory does not depend on its batch."""
    together = model.compress(DOCS, batch_size=3)
    alone = torch.cat([model.compress([d]) for d in DOCS])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_compress_reads_final_norm_hidden_states_at_mem_slots(model):
    seqs = model.tokenize_documents(DOCS[:1])
    assert seqs[0][0] == model.special_ids["<ENC>"]
    assert seqs[0][-model.config.n_mem:] == model.mem_ids.tolist()
    ids, mask = model.pad_left(seqs)
    model._activate("compressor")
    with torch.no_grad():
        out = model.lm(inputs_embeds=model.embed(ids), attention_mask=mask, output_hidden_states=True)
        # The LM head applied to our memories must reproduce the model's logits at the MEM slots,
        # which holds only if the memories are the hidden states after the final norm.
        head = model.lm.get_base_model().get_output_embeddings()
        logits = head(model.compress(DOCS[:1]))
    torch.testing.assert_close(logits, out.logits[:, -model.config.n_mem:], atol=1e-4, rtol=1e-4)


def test_truncation_to_doc_max_length(model):
    long_doc = "word " * 1000
    seq = model.tokenize_documents([long_doc])[0]
    # <ENC> BOS doc EOS MEM*n
    assert len(seq) == model.config.doc_max_length + 3 + model.config.n_mem


def test_roles_use_different_adapters(model):
    doc = model.compress(DOCS[:1])
    query = model.encode_query(DOCS[:1])
    assert query.shape == doc.shape
    assert not torch.allclose(doc, query)


def test_added_tokens_read_special_embeddings(model):
    ids = torch.tensor([[model.special_ids["<SEP>"], 5]])
    emb = model.embed(ids)
    sep_row = list(model.special_ids).index("<SEP>")
    torch.testing.assert_close(emb[0, 0], model.special_embeddings[sep_row])
    torch.testing.assert_close(emb[0, 1], model.input_embeddings.weight[5])


def test_generation_splices_memories_and_is_deterministic(model):
    mem = model.compress(DOCS[:2])
    a = model.generate(["Where is the tower?"], [mem], max_new_tokens=6)
    b = model.generate(["Where is the tower?"], [mem], max_new_tokens=6)
    assert a.token_ids == b.token_ids and len(a.token_ids[0]) <= 6
    embeds, mask = model.generation_inputs(["Where is the tower?"], [mem])
    noisy, _ = model.generation_inputs(["Where is the tower?"], [torch.randn_like(mem)])
    causal = model.lm.get_base_model()
    with torch.no_grad():
        model._activate("generator")
        assert not torch.allclose(causal(inputs_embeds=embeds, attention_mask=mask).logits[:, -1],
                                  causal(inputs_embeds=noisy, attention_mask=mask).logits[:, -1])
    slots = torch.isin(model.pad_left([model.prompt_ids("Where is the tower?", 2)])[0], model.mem_ids)[0]
    torch.testing.assert_close(embeds[0, slots], mem.reshape(-1, model.hidden_size))
    n_prompt = len(model.prompt_ids("Where is the tower?", 2))
    assert a.context_positions == [n_prompt]


def test_batched_generation_equals_single(model):
    mem = model.compress(DOCS)
    questions = ["Where is the tower?", "What boils?"]
    batch = model.generate(questions, [mem[:1], mem[1:3]], max_new_tokens=5)
    singles = [model.generate([q], [m], max_new_tokens=5).token_ids[0] for q, m in zip(questions, [mem[:1], mem[1:3]])]
    assert batch.token_ids == singles


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_prefix_cache_prefills_only_what_changed_and_answers_the_same(model):
    """Question after question: the reused KV covers the shared head, through equal memories, and no answer
    differs from a fresh decode; another role (text RAG reads without adapters) reuses nothing."""
    mem = model.compress(DOCS)
    cache = PrefixCache()
    asks = [("Where is the tower?", mem[:2]), ("What boils?", mem[1:3]), ("What boils here?", mem[1:3])]
    head = model.prompt_ids("?", 1).index(int(model.mem_ids[0]))  # positions before the first memory slot
    expected = [0, head, _common_prefix(model.prompt_ids(*asks[1][:1], 2), model.prompt_ids(*asks[2][:1], 2))]
    assert expected[2] > head + 2 * model.config.n_mem  # the third question shares the second one's memories
    for (question, memories), reused in zip(asks, expected):
        cached = model.generate([question], [memories], max_new_tokens=6, prefix_cache=cache)
        fresh = model.generate([question], [memories], max_new_tokens=6)
        assert cached.reused_positions == reused and fresh.reused_positions == 0
        assert cached.token_ids == fresh.token_ids
    docs = [[("Tower", DOCS[0])]]
    text = model.generate_text_rag(["Where is the tower?"], docs, max_new_tokens=4, prefix_cache=cache)
    assert text.reused_positions == 0
    again = model.generate_text_rag(["Where is it?"], docs, max_new_tokens=4, prefix_cache=cache)
    assert again.reused_positions > head
    assert again.token_ids == model.generate_text_rag(["Where is it?"], docs, max_new_tokens=4).token_ids
    with pytest.raises(ValueError, match="one sequence"):
        model.generate(["a?", "b?"], [mem[:1], mem[:1]], prefix_cache=cache)


def test_streaming_callback_sees_every_token(model):
    mem = model.compress(DOCS[:1])
    pieces = []
    out = model.generate(["Where?"], [mem], max_new_tokens=5, on_token=lambda row, text: pieces.append(text))
    assert len(pieces) == len(out.token_ids[0])


def test_a_stream_joins_into_the_answer_and_never_splits_a_character():
    """Byte-level BPE splits "日" and "😀" across tokens: decoded one by one they stream as U+FFFD."""
    from clara_edge.model import TokenStream

    tok = tiny_tokenizer()
    text = "日本の首都は東京です 😀 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert "\ufffd" in "".join(tok.decode([i]) for i in ids)  # what streaming token by token printed
    pieces: list[str] = []
    stream = TokenStream(tok, 1, lambda row, piece: pieces.append(piece))
    for i in ids:
        stream.push(0, i)
    assert len(pieces) == len(ids) and "".join(pieces) == text and stream.answers() == [text]


def test_sampling_is_seeded(model):
    mem = model.compress(DOCS[:1])
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9)
    a = model.generate(["Where?"], [mem], seed=3, **kw)
    b = model.generate(["Where?"], [mem], seed=3, **kw)
    assert a.token_ids == b.token_ids


def test_eos_stops_generation_and_is_not_emitted(model):
    """Force the LM head to emit two ordinary tokens, then EOS: the answer is exactly those two tokens."""
    eos, calls = model.eos_ids()[0], []

    def force(module, inputs, logits):
        forced = torch.full_like(logits, -1e9)
        forced[..., eos if len(calls) >= 2 else 7] = 0.0
        calls.append(1)
        return forced

    handle = model.lm.get_base_model().get_output_embeddings().register_forward_hook(force)
    try:
        out = model.generate(["Where?"], [model.compress(DOCS[:1])], max_new_tokens=8)
    finally:
        handle.remove()
    assert out.token_ids == [[7, 7]]
    assert out.decode_steps == 2  # the second token's forward and the EOS's: decode tok/s counts both


def test_max_new_tokens_stops_generation_without_a_wasted_forward(model):
    """Three tokens take three forwards (the prefill and two steps): none runs after the last pick."""
    mem, forwards = model.compress(DOCS[:1]), []

    def no_eos(module, inputs, logits):
        forwards.append(1)
        forced = torch.full_like(logits, -1e9)
        forced[..., 7] = 0.0
        return forced

    handle = model.lm.get_base_model().get_output_embeddings().register_forward_hook(no_eos)
    try:
        out = model.generate(["Where?"], [mem], max_new_tokens=3)
    finally:
        handle.remove()
    assert out.token_ids == [[7, 7, 7]] and len(forwards) == 3 and out.decode_steps == 2


def test_text_rag_mode_runs_without_adapters(model):
    out = model.generate_text_rag(["Where is the tower?"], [[("Tower", DOCS[0])]], max_new_tokens=4)
    assert len(out.texts) == 1 and out.context_positions[0] > 10


@pytest.mark.parametrize("rate", [1, 2, 16, 64, 256])
def test_compression_rates(rate):
    m = tiny_clara("llama", compression_rate=rate, doc_max_length=256)
    assert m.config.n_mem == 256 // rate
    assert m.compress(DOCS[:1]).shape == (1, 256 // rate, m.hidden_size)


@pytest.mark.parametrize("rate,length", [(0, 256), (257, 256), (64, 32)])
def test_bad_compression_rates_are_clear_errors(rate, length):
    with pytest.raises(ClaraError):
        ClaraConfig(compression_rate=rate, doc_max_length=length)


def test_prompt_uses_chat_template_and_mem_blocks():
    """CLaRa's generator prompt, and its text twin the same frame with the documents written out."""
    m = tiny_clara("llama")
    frame = ("<|im_start|>system\n" + prompts.SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\nBackground:\n{}"
             "\n\nQuestion:Who?<|im_end|>\n<|im_start|>assistant\n")
    assert m.tokenizer.decode(m.prompt_ids("Who?", 2)) == frame.format("<MEM0><MEM1><MEM2><MEM3><SEP>" * 2)
    assert m.tokenizer.decode(m.text_prompt_ids("Who?", [("T", "a b"), ("", "c")])) == frame.format("T: a b\nc")


def test_control_tokens_in_user_text_stay_words(model):
    """A question or document quoting <MEM0>, <SEP> or <|im_end|> reads as those characters, not as slots or turns."""
    question, doc = "What do <MEM0> and <SEP> mean?", "A chat turn ends with <|im_end|> and <MEM10>."
    ids = model.prompt_ids(question, 2)
    assert sum(i in model.mem_ids.tolist() for i in ids) == 2 * model.config.n_mem
    assert ids.count(model._special("<SEP>")) == 2
    memories = model.compress([doc, DOCS[0]])
    assert len(model.generate([question], [memories], max_new_tokens=2).texts) == 1
    body = model.tokenize_documents([doc])[0][:-model.config.n_mem]
    assert not set(body) & set(model.mem_ids.tolist()) and body.count(model.tokenizer.eos_token_id) == 1  # its own EOS
    text_ids = model.text_prompt_ids(question, [("<|im_start|>", doc)])
    assert text_ids.count(model.tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2  # system and user turns only
    assert model.tokenizer.decode(ids).replace(prompts.WORD_JOINER, "").count(question) == 1


def test_lora_targets_name_fused_projections_and_refuse_missing_ones():
    """Phi-3 fuses q/k/v and gate/up: a recipe's q_proj used to leave only o_proj adapted, silently."""
    qkvo = ["q_proj", "k_proj", "v_proj", "o_proj"]
    for family, expect in [("phi3", {"qkv_proj", "o_proj"}), ("llama", set(qkvo))]:
        m = tiny_clara(family, target_modules=qkvo)
        adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in m.lm.named_parameters() if "lora_A" in n}
        assert adapted == expect
    with pytest.raises(ClaraError, match="'qkv' is not in this base model .*its linear layers: down_proj"):
        tiny_clara("llama", target_modules=["qkv"])


def test_prompt_folds_system_into_user_for_templates_without_system_role():
    m = tiny_clara("mistral", template=MISTRAL_LIKE)
    text = m.tokenizer.decode(m.prompt_ids("Who?", 1))
    assert "[INST] " + prompts.SYSTEM_PROMPT + "\n\nBackground:" in text


def test_trainable_roles_and_copy_adapter():
    m = tiny_clara("llama")
    m.set_trainable(["query"], special_embeddings=True)
    m._activate("generator")  # switching adapters must not change what trains
    trainable = {n for n, p in m.lm.named_parameters() if p.requires_grad}
    assert trainable and all(".query." in n for n in trainable)
    assert m.special_embeddings.requires_grad
    randomize_adapters(m)
    m.copy_adapter("compressor", "query")
    torch.testing.assert_close(m.compress(DOCS[:1]), m.encode_query(DOCS[:1]))


def test_fingerprint_tracks_compressor_weights_only():
    m = tiny_clara("llama")
    before = m.fingerprint()
    with torch.no_grad():
        m.adapter_parameters("generator")[0].add_(1.0)
    assert m.fingerprint() == before
    with torch.no_grad():
        m.adapter_parameters("compressor")[0].add_(1.0)
    assert m.fingerprint() != before
    assert tiny_clara("llama", compression_rate=32).fingerprint() != before


def test_base_weights_are_frozen_and_untouched():
    lm = tiny_causal_lm("qwen2")
    reference = {n: p.detach().clone() for n, p in lm.named_parameters()}
    m = ClaraModel(lm, tiny_tokenizer(), ClaraConfig(base_model="x", doc_max_length=64, lora_r=4))
    base = {n.replace("base_model.model.", "").replace(".base_layer", ""): p
            for n, p in m.lm.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for p in base.values())
    for name, value in reference.items():
        torch.testing.assert_close(base[name], value)
