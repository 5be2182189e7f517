"""Directories written whole: the old version or the new one, never half, whatever interrupts the swap."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from clara_edge import atomic
from clara_edge.atomic import replace_dir, staging_dir


def write(final, text: str) -> None:
    staged = staging_dir(final)
    (staged / "sub").mkdir()
    (staged / "sub" / "a.txt").write_text(text)
    replace_dir(staged, final)


def test_a_new_version_replaces_the_old_and_leaves_nothing_beside_it(tmp_path):
    final = tmp_path / "ckpt"
    write(final, "one")
    write(final, "two")
    assert (final / "sub" / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_an_interrupted_swap_gives_the_old_version_back(tmp_path, monkeypatch):
    final = tmp_path / "ckpt"
    write(final, "one")
    staged = staging_dir(final)
    (staged / "a.txt").write_text("two")
    real = os.replace
    calls = []

    def second_rename_fails(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt  # between moving the old one aside and moving the new one in
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_rename_fails)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(staged, final)
    monkeypatch.undo()
    assert not final.exists()
    staging_dir(final)  # the next write (or run) finds the old version moved aside by a process now gone
    assert (final / "sub" / "a.txt").read_text() == "one"


def test_leftovers_of_dead_processes_go_and_those_of_live_ones_stay(tmp_path):
    final = tmp_path / "export"
    write(final, "one")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ours = [f".export.clara-tmp-{dead}", f".export.clara-old-{dead}"]
    kept = [".export.clara-tmp-1", "export.tmp" + dead, "export.old" + dead, ".other.clara-tmp-" + dead]
    for name in ours + kept:  # pid 1 is alive; the rest are not names this module gives
        (tmp_path / name).mkdir()
    staged = staging_dir(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", staged.name, *kept])


def test_a_linked_folder_is_written_where_it_points(tmp_path):
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "ckpt").symlink_to(tmp_path / "big-disk" / "ckpt", target_is_directory=True)
    for text in ("one", "two", "three"):  # training saves again and again
        write(tmp_path / "ckpt", text)
    assert (tmp_path / "ckpt").is_symlink() and (tmp_path / "ckpt" / "sub" / "a.txt").read_text() == "three"
    assert sorted(p.name for p in (tmp_path / "big-disk").iterdir()) == ["ckpt"]
