"""Directories written whole: checkpoints, exports, the converted base model and training state are built in a
staging sibling and swapped in, so a reader (or the next run after a crash) finds the old directory or the new
one, never half of either."""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(final: Path) -> Path:
    """A new empty sibling of `final` (of its target, when `final` is a link) to build its next version in.
    Siblings left by processes that died mid-write go first; a `final` lost between the two renames of
    `replace_dir` gets its previous version back."""
    final = _real(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for sibling in final.parent.iterdir():
        left = re.fullmatch(rf"\.{re.escape(final.name)}\.clara-(tmp|old)-(\d+)", sibling.name)
        if left is None or _alive(int(left[2])):
            continue
        if left[1] == "old" and not final.exists():
            os.replace(sibling, final)
        else:
            shutil.rmtree(sibling, ignore_errors=True)
    staged = _sibling(final, "tmp")
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    return staged


def replace_dir(staged: Path, final: Path) -> Path:
    """Make the finished `staged` directory `final`, durably, replacing any earlier version. Directories cannot be
    swapped in one rename, so the old one moves aside first and goes last: an interruption leaves it whole."""
    for path in sorted(staged.rglob("*"), reverse=True):  # files before the folders that hold them
        _fsync(path)
    _fsync(staged)
    final = _real(final)
    old = _sibling(final, "old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _real(final: Path) -> Path:
    """Where a link points (a checkpoint folder linked to a larger disk is written there), else `final`."""
    return final.resolve() if final.is_symlink() else final


def _sibling(final: Path, kind: str) -> Path:
    """A hidden name no user would give a folder of their own, so only leftovers of ours are ever removed."""
    return final.with_name(f".{final.name}.clara-{kind}-{os.getpid()}")


def _fsync(path: Path) -> None:
    if path.is_dir():
        fsync_dir(path)
        return
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftover from an earlier, failed write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
