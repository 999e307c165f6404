"""Atomic file writes: a crash never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def checkpoint_identity(path: str | None) -> dict[str, Any]:
    """Name, size and modification time of each file of a local checkpoint (a Hub id or an
    asset name as given)."""
    if not path or not Path(path).is_dir():
        return {"name": path}
    return {
        "name": str(Path(path).resolve()),
        "files": {
            f.name: [f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(Path(path).iterdir())
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".model")
        },
    }


class PartReport:
    """A benchmark's report that never loses a measured result: `data` is written to
    `<stem>.json` and `render(data)` to `<stem>.md` (atomically) at the start and after every
    `part`; a part that raises is recorded under `data["errors"][name]` and the run goes on
    (the caller's exit status says so). `prepare(data)`, when given, runs before each write
    (e.g. ratios derived from the times measured so far)."""

    def __init__(self, stem: Path, data: dict, render, prepare=None):
        self.stem, self.data, self.render, self.prepare = Path(stem), data, render, prepare
        self.data.setdefault("errors", {})
        self.save()

    def save(self) -> None:
        if self.prepare is not None:
            self.prepare(self.data)
        atomic_write_json(self.stem.with_suffix(".json"), self.data)
        atomic_write_text(self.stem.with_suffix(".md"), self.render(self.data))

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Run one part; on an error print it, record it under `errors[name]`, and go on."""
        try:
            yield
        except Exception as error:  # noqa: BLE001 - recorded, and the caller reports it
            traceback.print_exc()
            self.data["errors"][name] = f"{type(error).__name__}: {error}"
        self.save()
