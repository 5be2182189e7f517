"""Training (export/train*.py) on a tiny random base model and a tiny data set in the training-file formats."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import load_file

from clara_edge.checkpoint import ADAPTERS_FILE, EMBEDDINGS_FILE, build_model, load_checkpoint
from clara_edge.errors import ClaraError
from clara_edge.model import ClaraConfig
from clara_edge.export import train_data as data
from clara_edge.export.train import STAGE_DEFAULTS, StageModule, collate, load_recipe, train
from clara_edge.export.train_losses import bank_nce, left_pad_labels, straight_through_topk

from tiny import tiny_causal_lm, tiny_clara, tiny_tokenizer

SHARED_TRAIN = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train"
FACTS = [("Paris", "The Eiffel Tower is in Paris, the capital of France.", "Where is the Eiffel Tower?", "Paris"),
         ("Everest", "Mount Everest is the highest mountain above sea level.", "What is the highest mountain?",
          "Mount Everest"),
         ("Water", "Water boils at 100 degrees Celsius at sea level.", "When does water boil?", "100 degrees"),
         ("Hamlet", "William Shakespeare wrote Hamlet. It is a tragedy.", "Who wrote Hamlet?", "William Shakespeare"),
         ("Art", "The Mona Lisa hangs in the Louvre in Paris.", "Where is the Mona Lisa?", "the Louvre"),
         ("Moon", "The Moon orbits the Earth every 27 days.", "What orbits the Earth?", "the Moon")]
STAGES = ("1-scp", "2-instruct", "3-e2e", "4-retrieval")


@pytest.fixture(scope="module", autouse=True)
def isolated():
    """One intra-op thread (the test machine is small and shared: several times faster for tiny ops), and
    accelerate's process-wide state reset around this module (train() initialises it for the CPU)."""
    from accelerate.state import AcceleratorState

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A tiny base model folder (initializer_range 0.2: logits large enough to learn) and a data folder."""
    root = tmp_path_factory.mktemp("train")
    base = root / "base"
    tiny_causal_lm("llama", max_position_embeddings=4096, initializer_range=0.2).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    folder = root / "data"
    folder.mkdir()
    with open(folder / "clara_pretrain_sample1000.jsonl", "w") as f:
        for title, text, q, a in FACTS:
            f.write(json.dumps({"data_type": "qa", "question": [q, "What is the document about?"],
                                "answers": [a, title], "docs": [text]}) + "\n")
    for name, n_docs in (("hotpotqa_train100.jsonl", 4), ("musique_train100.jsonl", 5)):
        with open(folder / name, "w") as f:
            for i, (_, _, q, a) in enumerate(FACTS):
                docs = [{"title": FACTS[(i + j) % len(FACTS)][0], "text": FACTS[(i + j) % len(FACTS)][1]}
                        for j in range(n_docs)]
                f.write(json.dumps({"id": str(i), "question": q, "golden_answers": [a], "docs": docs,
                                    "pos_index": [0]}) + "\n")
    return {"base_model": str(base), "data_dir": str(folder), "root": root}


def overrides(env: dict, **more) -> dict:
    return {"base_model": env["base_model"], "data_dir": env["data_dir"], **more}


def run(env: dict, out: Path, recipe: str = "tiny", **kw) -> Path | None:
    extra = kw.pop("overrides", {})
    return train(recipe, out, overrides=overrides(env, **extra), device="cpu", progress=False, **kw)


@pytest.fixture(scope="module")
def full_run(env) -> Path:
    out = env["root"] / "full"
    final = run(env, out)
    assert final == out / "final"
    return out


def logged(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (stage_dir / "log.jsonl").read_text().splitlines()]


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {**load_file(checkpoint / ADAPTERS_FILE), **load_file(checkpoint / EMBEDDINGS_FILE)}


# ------------------------------------------------------------------------------------------ pieces
def test_straight_through_topk_forward_is_hard_topk():
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    weights = straight_through_topk(scores.requires_grad_(), k=3)
    top = scores.detach().topk(3, dim=-1).indices
    assert torch.equal(weights.detach(), torch.nn.functional.one_hot(top, 7).float())
    assert STAGE_DEFAULTS["e2e"]["temperature"] == 0.02


def test_straight_through_topk_gradient_by_hand():
    """d/ds of sum(W * C): row i is softmax(s / t) over the candidates not chosen in rows < i."""
    s = torch.tensor([[0.3, 1.2, -0.4, 0.9, float("-inf")]])
    c = torch.tensor([[[1.0, -2.0, 0.5, 3.0, 7.0], [0.2, 0.4, -1.0, 2.0, 5.0]]])
    t = 0.5
    scores = s.clone().requires_grad_()
    (straight_through_topk(scores, k=2, temperature=t) * c).sum().backward()
    expected = [0.0] * 5
    available = [0, 1, 2, 3]  # candidate 4 is padding (-inf)
    for row in range(2):
        z = [pow(2.718281828459045, s[0, j].item() / t) for j in available]
        p = {j: zj / sum(z) for j, zj in zip(available, z)}
        mean = sum(p[j] * c[0, row, j].item() for j in available)
        for j in available:
            expected[j] += p[j] * (c[0, row, j].item() - mean) / t
        available.remove(max(available, key=lambda j: s[0, j].item()))  # the hard choice of this row
    assert torch.allclose(scores.grad, torch.tensor([expected]), atol=1e-5)
    with pytest.raises(ValueError):
        straight_through_topk(s, k=5)


def test_bank_nce_by_hand():
    """-log of the softmax mass on the gold rows, cosine over flattened memories; the gradient reaches the query."""
    gen = torch.Generator().manual_seed(0)
    query, bank = torch.randn(2, 3, 4, generator=gen).requires_grad_(), torch.randn(5, 3, 4, generator=gen)
    gold, tau = [[1], [0, 4]], 0.1
    cos = torch.nn.functional.cosine_similarity(query.detach().flatten(1)[:, None], bank.flatten(1)[None], dim=-1)
    p = (cos / tau).softmax(-1)
    expected = -(p[0, 1].log() + (p[1, 0] + p[1, 4]).log()) / 2
    loss = bank_nce(query, bank, gold, tau)
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert query.grad is not None and query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gold"):
        bank_nce(query, bank, [[1], []], tau)


def test_bank_nce_over_the_questions_own_candidates_by_hand():
    gen = torch.Generator().manual_seed(2)
    query, bank = torch.randn(2, 3, 4, generator=gen), torch.randn(6, 3, 4, generator=gen)
    gold, cands, tau = [[1], [0, 4]], [[1, 2, 5], [0, 3, 4]], 0.1
    cos = torch.nn.functional.cosine_similarity(query.flatten(1)[:, None], bank.flatten(1)[None], dim=-1)
    p0, p1 = (cos[0, cands[0]] / tau).softmax(-1), (cos[1, cands[1]] / tau).softmax(-1)
    in_set = -(p0[0].log() + (p1[0] + p1[2]).log()) / 2
    torch.testing.assert_close(bank_nce(query, bank, gold, tau, None, cands, 0.5),
                               bank_nce(query, bank, gold, tau) + 0.5 * in_set)
    with pytest.raises(ValueError, match="among its candidates"):
        bank_nce(query, bank, gold, tau, None, [[2, 5], [0, 3, 4]], 1.0)


def test_centred_losses_are_the_raw_ones_of_centred_memories():
    """Training scores exactly what retrieval scores: cosine of (x - centre) on both sides."""
    from clara_edge.export.train_losses import cosine_scores as candidate_scores
    from clara_edge.retrieval import cosine_scores
    gen = torch.Generator().manual_seed(1)
    query, bank, centre = torch.randn(2, 3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    gold = [[1], [0, 4]]
    assert torch.allclose(bank_nce(query, bank, gold, 0.1, centre), bank_nce(query - centre, bank - centre, gold, 0.1))
    assert not torch.allclose(bank_nce(query, bank, gold, 0.1, centre), bank_nce(query, bank, gold, 0.1))
    valid = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(candidate_scores(query, bank.expand(2, -1, -1, -1), valid, centre),
                               cosine_scores(query, bank, centre))


def test_labels_cover_only_the_target():
    labels = left_pad_labels([[5, 6, 7, 8], [9, 10]], [2, 1], "cpu")
    assert labels.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 10]]


def test_target_logits_read_the_position_before_each_target():
    """Position t predicts token t+1: the head sees the hidden states just before the labelled tokens."""
    from types import SimpleNamespace

    from clara_edge.export.train_losses import IGNORE, target_logits

    head = torch.nn.Linear(3, 7, bias=False)
    lm = SimpleNamespace(get_base_model=lambda: SimpleNamespace(get_output_embeddings=lambda: head))
    hidden = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 4, 6]])
    logits, targets = target_logits(SimpleNamespace(lm=lm), hidden, labels)
    assert targets.tolist() == [4, 6]
    torch.testing.assert_close(logits, head(hidden[0, 2:4]))


def test_memory_mse_by_hand_ignores_padding():
    from clara_edge.export.train_losses import memory_mse

    hidden = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding; the last 2 positions are MEM
    doc = torch.stack([hidden[0, 2:4].mean(0), hidden[1, :4].mean(0)])
    torch.testing.assert_close(memory_mse(hidden, mask, 2), ((hidden[:, 4:].mean(1) - doc) ** 2).mean())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_to_teacher_by_hand(temperature):
    from clara_edge.export.train_losses import kl_to_teacher

    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    p = torch.softmax(teacher / temperature, -1)
    expect = (p * (p.log() - torch.log_softmax(student / temperature, -1))).sum(-1).mean() * temperature ** 2
    torch.testing.assert_close(kl_to_teacher(student, teacher, temperature), expect)


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from clara_edge.export.train import _lr_at

    stage = {"lr": 1.0, "schedule": "cosine", "warmup_ratio": 0.1, "min_lr_ratio": 0.1}
    steps = [0, 9, 10, 55, 100]
    assert [_lr_at(stage, s, 100) for s in steps] == pytest.approx([0.1, 1.0, 1.0, 0.1 + 0.9 * 0.5, 0.1])
    assert [_lr_at({**stage, "schedule": "constant"}, s, 100) for s in steps] == [1.0] * 5


def test_kl_to_the_teacher_trains_the_student_only(env):
    """The KL option: teacher = base LM on the text prompt; gradients reach the trained adapters only, and
    the adapter switches inside the forward leave requires_grad as set_trainable put it."""
    model = tiny_clara(doc_max_length=64)
    model.set_trainable(["compressor", "generator"], special_embeddings=True)
    model.train()
    sources = data.load_sources(Path(env["data_dir"]), ["clara_pretrain_sample1000.jsonl"], [])
    samples = data.with_targets(data.qa_samples(sources, seed=0, k=2)[:3], "gold")
    batch = collate([data.encode(model, s, "memory", 8, with_teacher=True) for s in samples])
    stage = {**load_recipe("tiny")["stages"][1], "kl_weight": 0.5}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    out = StageModule(model, stage)(batch)
    assert out["kl"] > 0 and torch.isfinite(out["loss"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    out["loss"].backward()
    grads = {n.split(".lora_")[1].split(".")[1] for n, p in model.lm.named_parameters()
             if "lora_B" in n and p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {"compressor", "generator"}
    with pytest.raises(ClaraError, match="kl_weight"):
        load_recipe("tiny", {"stages.2.kl_weight": 0.5})


def test_samples_are_deterministic_and_refuse_eval(env, tmp_path):
    sources = data.load_sources(Path(env["data_dir"]), ["clara_pretrain_sample1000.jsonl"],
                                ["hotpotqa_train100.jsonl", "musique_train100.jsonl"])
    scp = data.scp_samples(sources, seed=0)
    assert scp == data.scp_samples(sources, seed=0)
    assert {s.task for s in scp} == {"qa_pairs", "reconstruct", "restate"}
    qa = next(s for s in scp if s.task == "qa_pairs")
    assert qa.target.startswith("Question: Where is the Eiffel Tower?\nAnswer: Paris\nQuestion:")
    picked = data.qa_samples(sources, seed=0, k=3)
    assert all(len(s.docs) == 3 for s in picked)
    gold = [s for s in picked if s.prompt == FACTS[0][2] and s.docs[0][0]]  # multi-hop rows (titled docs)
    assert len(gold) == 2 and all((FACTS[0][0], FACTS[0][1]) in s.docs for s in gold)
    offered = data.qa_samples(sources, seed=0, k=1, candidates=2)
    gold_rows = [s for s in offered if s.prompt == FACTS[0][2] and s.docs[0][0]]
    assert all(len(s.docs) == 2 and (FACTS[0][0], FACTS[0][1]) in s.docs for s in gold_rows)
    assert all(s.gold and set(s.gold) <= set(s.docs) for s in offered)  # the retrieval stage's positives
    five = [s for s in data.qa_samples(sources, seed=0, k=5, candidates=5) if s.docs[0][0]]
    assert len(five) == len(FACTS) and all(len(s.docs) == 5 for s in five)  # the 4-document rows are left out
    short = [s for s in data.qa_samples(sources, seed=0, k=3, max_answer_words=1) if not s.docs[0][0]]
    assert sorted(s.answers[0] for s in short) == sorted(["Paris"] + [f[0] for f in FACTS])  # one-word answers only
    every = [s for s in data.qa_samples(sources, seed=0, k=3, questions_per_passage=None) if not s.docs[0][0]]
    assert len(every) == 2 * len(FACTS)  # None: every QA pair of each pretraining passage
    some = data.subset(scp, 3, seed=0)
    assert len(some) == 3 and some == data.subset(scp, 3, seed=0) and some == [s for s in scp if s in some]
    assert data.subset(scp, None, seed=0) == scp and data.subset(scp, 3, seed=1) != some
    both = data.with_targets(picked, "both", {picked[0].key(): "teacher says"})
    assert [s.target for s in both[:2]] == [picked[0].answers[0], "teacher says"]
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "x.jsonl").write_text("{}\n")
    with pytest.raises(ClaraError, match="eval"):
        data.load_sources(tmp_path / "eval", ["x.jsonl"], [])


@pytest.mark.skipif(not SHARED_TRAIN.is_dir(), reason="shared training data not present")
def test_samples_from_the_shared_training_files():
    recipe = load_recipe("default")
    spec = recipe["data"]
    sources = data.load_sources(SHARED_TRAIN, spec["pretrain"], spec["multihop"])
    assert len(sources.pretrain) == 1000 and len(sources.multihop) == 200
    scp = data.scp_samples(sources, seed=0)
    assert sum(s.task == "qa_pairs" for s in scp) == 1000 and len(scp) > 3000
    qa = data.qa_samples(sources, 0, k=5, questions_per_passage=2, multihop_repeat=4)
    assert len(qa) == 200 * 4 + sum(min(2, len(r["question"])) for r in sources.pretrain)


def test_recipes_resolve():
    default = load_recipe("default", {"compression": 64, "max_steps": 3})
    assert default["model"]["compression_rate"] == 64
    assert [s["kind"] for s in default["stages"]] == ["scp", "instruct", "e2e", "retrieval"]
    assert all(s["max_steps"] == 3 for s in default["stages"]) and default["stages"][0]["betas"] == [0.9, 0.95]
    hybrid = load_recipe("hybrid")  # its GPU stage must be the default's, so a default run's stage 1 can continue as hybrid
    assert hybrid["stages"][0] == load_recipe("default")["stages"][0] and hybrid["data"] == load_recipe("default")["data"]
    gpu = load_recipe("gpu")  # sized for a GPU: one micro-batch per step (dispatch, not arithmetic, bounds a step)
    assert [s["kind"] for s in gpu["stages"]] == ["scp", "e2e", "retrieval"]
    assert all(s["micro_batch"] == s["batch_size"] for s in gpu["stages"]) and gpu["data"]["limit"] is None
    short = load_recipe("cpu-short")  # continues the shipped cpu run: its first three stages must stay cpu's
    assert short["stages"][:3] == load_recipe("cpu")["stages"] and short["data"] == load_recipe("cpu")["data"]
    assert short["stages"][3]["trainable"] == ["generator"] and short["stages"][3]["init_query_from"] is None
    retrieval = load_recipe("retrieval")  # continues the shipped cpu weights (--init): same model fields
    assert retrieval["model"] == load_recipe("cpu")["model"] and [s["kind"] for s in retrieval["stages"]] == ["retrieval"]
    reader = load_recipe("reader")  # the cpu recipe's stage 3 again, generator only, keeping the --init query adapter
    assert reader["model"] == load_recipe("cpu")["model"] and reader["data"] == load_recipe("cpu")["data"]
    cpu_e2e = {k: v for k, v in load_recipe("cpu")["stages"][1].items() if k not in ("name", "trainable", "init_query_from")}
    assert {k: v for k, v in reader["stages"][0].items() if k in cpu_e2e} == cpu_e2e
    assert reader["stages"][0]["trainable"] == ["generator"] and reader["stages"][0]["init_query_from"] is None
    text = load_recipe("text")
    assert text["name"] == "text" and [s["kind"] for s in text["stages"]] == ["text"]
    instruct = default["stages"][1]
    assert all(text["stages"][0][k] == instruct[k] for k in ("epochs", "k", "targets", "questions_per_passage",
                                                             "multihop_repeat", "max_target_tokens", "max_answer_words"))
    with pytest.raises(ClaraError, match="unknown fields"):
        load_recipe("tiny", {"stages.0.lrr": 1.0})
    with pytest.raises(ClaraError, match="not found"):
        load_recipe("no-such-recipe")


@pytest.mark.parametrize("override,message", [
    ({"max_steps": 0}, "max_steps must be a whole number of at least 1, got 0"),  # it ran whole epochs
    ({"stages.0.batch_size": 0}, "batch_size must be a whole number of at least 1"),
    ({"stages.1.micro_batch": 2.5}, "micro_batch must be a whole number of at least 1"),
    ({"stages.0.lr": "fast"}, "lr must be a number above 0, got 'fast'"),
    ({"stages.0.weight_decay": -1}, "weight_decay must be a number of at least 0"),
    ({"stages.9.lr": 1.0}, "'9' is not one of the"),
    ({"stages.x.lr": 1.0}, "'x' is not one of the"),
    ({"seed.x": 1}, "goes below a value that has no fields"),
])
def test_bad_recipe_values_are_one_clear_line(override, message):
    with pytest.raises(ClaraError, match=message):
        load_recipe("tiny", override)


def test_a_recipe_that_is_not_json_is_one_clear_line(tmp_path):
    (tmp_path / "broken.json").write_text('{"stages": [')
    with pytest.raises(ClaraError, match="is not readable JSON"):
        load_recipe(tmp_path / "broken.json")


# ------------------------------------------------------------------------------------------ runs
def test_full_run_writes_every_stage(full_run):
    for name in STAGES:
        assert len(logged(full_run / name)) == 4
        assert not (full_run / name / "state").exists()
    model = load_checkpoint(full_run / "final")
    assert model.config.extra["command"] == "clara-edge train --recipe tiny --compression 16"
    assert load_checkpoint(full_run / "3-e2e" / "model").retrieval_centre is None  # set by the centred retrieval stage
    assert model.retrieval_centre.shape == (model.config.n_mem, model.hidden_size)
    assert next(iter(load_file(full_run / "final" / ADAPTERS_FILE).values())).dtype == torch.float16
    answer = model.generate(["Where is the Eiffel Tower?"], [model.compress([FACTS[0][1], FACTS[1][1]])],
                            max_new_tokens=4)
    assert len(answer.texts) == 1


def test_trained_parameters_change_and_frozen_ones_do_not(env):
    """One optimizer step per stage: every trained adapter moves; frozen adapters and the base do not (with
    gradient checkpointing on, which must not cut any gradient path)."""
    out = env["root"] / "one-step"
    run(env, out, overrides={"max_steps": 1, "gradient_checkpointing": True})
    recipe = load_recipe("tiny", overrides(env))
    initial = build_model(ClaraConfig(**recipe["model"]), "cpu", "fp32", seed=0)
    before = {f"{role}.{k}": v for role in ("compressor", "query", "generator")
              for k, v in get_peft_model_state_dict(initial.lm, adapter_name=role).items()}
    before["special_embeddings"] = initial.special_embeddings.detach()
    expected = {"1-scp": {"compressor", "generator", "special_embeddings"},
                "2-instruct": {"compressor", "generator", "special_embeddings"},
                "3-e2e": {"query", "generator"}, "4-retrieval": {"query", "retrieval_centre"}}
    for stage in STAGES:
        after = tensors(out / stage / "model")
        moved = {name.split(".")[0] for name in after if name not in before or not torch.equal(after[name], before[name])}
        assert moved == expected[stage], stage
        assert load_checkpoint(out / stage / "model").base_fingerprint == initial.base_fingerprint
        before = after
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    query, compressor = after[f"query.{key}"], after[f"compressor.{key}"]
    assert not torch.equal(query, compressor)  # started as a copy of the compressor, then trained


def test_loss_decreases_in_every_stage(env):
    out = env["root"] / "overfit"
    lr = {f"stages.{i}.lr": 1e-2 for i in range(len(STAGES))}
    run(env, out, overrides={"max_steps": 10, "model.lora_dropout": 0.0, **lr})
    text = run(env, env["root"] / "overfit-text", recipe="text", overrides={
        "max_steps": 10, "model.doc_max_length": 64, "model.lora_r": 4, "data.limit": 4, "teacher.max_new_tokens": 8,
        "stages.0.batch_size": 4, "stages.0.micro_batch": 2, "stages.0.lr": 1e-2, "model.lora_dropout": 0.0})
    for stage_dir in [out / name for name in STAGES] + [text.parent / "1-text"]:
        losses = [row["loss"] for row in logged(stage_dir)]
        assert sum(losses[-3:]) / 3 < sum(losses[:2]) / 2 - 0.1, (stage_dir.name, losses)
    model = load_checkpoint(text)
    assert model.generate_text_rag(["Who wrote Hamlet?"], [[("Hamlet", FACTS[3][1])]], role="generator",
                                   max_new_tokens=3).texts


def test_resume_after_stops_matches_uninterrupted_run(env, full_run):
    out = env["root"] / "resumed"
    assert run(env, out, stop_after=3) is None          # inside stage 1 (a state saved at step 2, stop at 3)
    assert (out / "1-scp" / "state").is_dir()
    with open(out / "1-scp" / "log.jsonl", "a") as log:  # a hard kill after the state: a step logged, half a line
        log.write('{"step": 4, "loss": 0.0}\n{"step": 5, "lo')
    assert run(env, out, stop_after=3) is None          # finishes stage 1, stops inside stage 2
    assert (out / "2-instruct" / "state").is_dir() and not (out / "1-scp" / "state").exists()
    assert run(env, out) == out / "final"
    for stage in STAGES:
        a, b = tensors(full_run / stage / "model"), tensors(out / stage / "model")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
        without_speed = [[{k: v for k, v in row.items() if k != "tok_s"} for row in logged(d / stage)]
                         for d in (full_run, out)]
        assert without_speed[0] == without_speed[1], stage  # each step logged once, as the uninterrupted run did
    with pytest.raises(ClaraError, match="different recipe"):
        run(env, out, overrides={"seed": 1})


def test_resume_keeps_the_fp16_loss_scale(env, monkeypatch):
    """fp16 mixed precision (CUDA) scales the loss; a resumed run continues from the saved scale. Here a CPU
    GradScaler that doubles its scale after every step stands in for CUDA's."""
    import accelerate

    plain_init = accelerate.Accelerator.__init__

    def with_scaler(self, *args, **kwargs):
        plain_init(self, *args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    out = env["root"] / "scaled"
    assert run(env, out, stop_after=3) is None      # stage 1, 3 steps
    scale = lambda stage: torch.load(out / stage / "state" / "scaler.pt", weights_only=True)["scale"]
    assert scale("1-scp") == 2.0 ** 13
    assert run(env, out, stop_after=3) is None      # stage 1's last step, stage 2's first two
    assert scale("2-instruct") == 2.0 ** 16          # a scale restarted at 2^10 would read 2^13


def test_a_folder_that_is_not_a_run_is_refused_and_kept(env, tmp_path):
    """--out pointing at a store or notes folder (or a file) is refused; --no-resume must not empty it."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "store.sqlite").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for out, resume in ((notes, True), (notes, False), (tmp_path / "file", True)):
        with pytest.raises(ClaraError, match="exists and is not a training run directory"):
            run(env, out, resume=resume)
    assert (notes / "store.sqlite").read_text() == "keep me" and sorted(p.name for p in notes.iterdir()) == [
        "store.sqlite"]
    assert (tmp_path / "file").read_text() == "keep me too"


def test_init_continues_a_trained_checkpoint(env, full_run):
    """`retrieval` from a trained checkpoint: only the query adapter and the retrieval centre move; the chain of
    runs is recorded; a checkpoint of another shape, or a resume from another init, is refused."""
    tiny_fit = {"model.doc_max_length": 64, "model.lora_r": 4, "model.lora_alpha": 8, "data.limit": 4,
                "max_steps": 2, "stages.0.batch_size": 4, "stages.0.micro_batch": 2, "stages.0.candidates": 3}
    init, out = full_run / "final", env["root"] / "continued"
    final = run(env, out, recipe="retrieval", overrides=tiny_fit, init=init)
    before, after = tensors(init), tensors(final)
    assert before.keys() == after.keys()
    moved = {name.split(".")[0] for name in after if not torch.equal(after[name], before[name])}
    assert moved == {"query", "retrieval_centre"}
    extra = load_checkpoint(final).config.extra
    assert extra["init"]["recipe"] == "tiny" and extra["init"]["from"] is None
    assert extra["command"].endswith(f"--init {init}") and extra["stages"] == ["retrieval"]
    with pytest.raises(ClaraError, match="started from a different --init"):
        run(env, out, recipe="retrieval", overrides=tiny_fit, init=full_run / "1-scp" / "model")
    with pytest.raises(ClaraError, match="does not fit recipe retrieval: compression_rate 16 .recipe: 64."):
        run(env, env["root"] / "misfit", recipe="retrieval", overrides={**tiny_fit, "compression": 64}, init=init)
    with pytest.raises(ClaraError, match="not a clara-edge checkpoint"):
        run(env, env["root"] / "misfit", recipe="retrieval", overrides=tiny_fit, init=env["root"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_through_accelerate(env):
    """`accelerate launch --multi_gpu` is accelerate's torchrun launcher; with `--device cpu` (or on a machine
    without GPUs) it runs DDP over gloo. (`accelerate launch --cpu --num_processes 2` starts ONE process.)
    Two processes split each global batch: without dropout their losses are one process's, to rounding."""
    one = run(env, env["root"] / "one-proc", overrides={"model.lora_dropout": 0.0}).parent
    out = env["root"] / "two-procs"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()),
           "-m", "clara_edge.cli", "train", "--recipe", "tiny", "--out", str(out), "--device", "cpu",
           "--data", env["data_dir"], "--set", f"model.base_model={env['base_model']}",
           "--set", "model.lora_dropout=0.0", "--no-progress"]
    env_vars = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env_vars)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in STAGES:
        single, split = logged(one / stage), logged(out / stage)
        assert [r["step"] for r in split] == [r["step"] for r in single]
        # stage 1 starts from the same weights; later ones from weights that differ by reduction order
        tol = 1e-4 if stage == STAGES[0] else 1e-2
        assert split[0]["loss"] == pytest.approx(single[0]["loss"], rel=tol), stage
        assert [r["tokens"] for r in split] == [r["tokens"] for r in single], stage  # each sample read once
    ranks = {part.stem.rsplit("-", 1)[-1] for part in (out / "teacher").glob("*/part-*")}
    assert ranks == {"0", "1"}  # both processes computed their share of the teacher answers
    assert load_checkpoint(out / "final").config.compression_rate == 16
