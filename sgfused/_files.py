"""File helpers shared by the data, evaluation and checkpoint code: atomic writes and checked json reads."""

from __future__ import annotations

import glob
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through a temporary file in the same folder and ``os.replace``.

    A reader (or a run killed mid-write) sees the old file or the new one, never
    half of one; the temporary file is removed if ``write`` fails (a killed
    process leaves it: :func:`remove_stale_temporaries`). The file gets the mode
    ``open()`` would give it under the process umask (``mkstemp`` alone gives 600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path.name), suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_prefix(name: str) -> str:
    return f".{name}."


def _umask() -> int:
    """The process umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike[str], names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` left in ``folder`` for ``names`` when killed mid-write.

    Call it only where no other process writes these files at the same time
    (a training run owns its output folder). Returns the files removed.
    """
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f"{glob.escape(_temporary_prefix(name))}*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def read_json(path: str | os.PathLike[str], what: str, error: type[Exception] = ValueError) -> Any:
    """The json value in ``path``; ``FileNotFoundError`` or ``error`` naming the file (``what``: its kind)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {os.fspath(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} file {os.fspath(path)!r} is not readable json: {e}") from None
