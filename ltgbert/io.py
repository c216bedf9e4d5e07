"""Atomic file writes: the one place where ltgbert writes a JSON (or text) file that others read.

A reader (a resumed run, the SLURM template deciding whether a run finished, a sweep gatherer) must never see
a half-written file, and a crash must never leave a good file damaged. So every writer goes through a
temporary file in the same directory (same filesystem, so the rename is atomic), fsynced, then renamed over
the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["append_jsonl", "write_json", "write_lines", "write_text"]


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Writes ``lines`` (each with its newline) to ``path`` atomically (temporary sibling, fsync, rename),
    streaming them: a large predictions file is never held in memory whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` to ``path`` atomically; creates parent directories."""
    return write_lines(path, [text])


def write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = False) -> Path:
    """Writes ``obj`` as indented JSON, atomically; values JSON does not know (paths, enums) become strings."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Appends one JSON line (a log record: a reader tolerates a torn last line, so no rename is needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
