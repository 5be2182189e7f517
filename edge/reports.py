"""JSON reports (`eval --json`, `export --check --json`): the path is checked before the work, written after."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ClaraError


def report_path(json_out: str | Path | None, what: str) -> Path | None:
    """`json_out` as a Path, refused up front when it cannot be written, so hours of evaluation are not lost."""
    if json_out is None:
        return None
    out = Path(json_out).expanduser()
    if out.is_dir():
        raise ClaraError(f"cannot write the {what} report to {out}: it is a directory")
    parent = next((p for p in out.parents if p.exists()), Path("."))  # the folder the new ones would go in
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ClaraError(f"cannot write the {what} report to {out}: {parent} is not a writable folder")
    return out


def write_report(report: dict, json_out: str | Path | None, what: str) -> None:
    """Write `report` as indented JSON to `json_out` (its folders created); nothing when `json_out` is None."""
    out = report_path(json_out, what)
    if out is None:
        return
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        raise ClaraError(f"cannot write the {what} report to {out}: {e.strerror}") from None
