"""Atomic file writes: readers (and a crash) see the old file or the new one, never a part;
and file names made from user-typed names (samplers such as `rti-renoise-40,15,0`)."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, Callable, Iterator


def safe_filename(name: str) -> str:
    """`name` with every run of characters outside [A-Za-z0-9_.-] made one underscore."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_atomic(path: str | os.PathLike, data: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write `data` (or let `data(file)` write) to a temporary file beside `path`, fsync it,
    then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike, overwrite: bool = False, tag: str = "new") -> Iterator[Path]:
    """Yield an empty directory `.NAME.<tag>-<id>.partial` beside `path`; when the block succeeds it
    becomes `path`, when it fails it is removed. With `overwrite` an existing `path` is renamed
    aside (`.NAME.old-<id>`), the new one renamed in, then the old one deleted: a crash at any
    point leaves a complete directory under `path` or, between the two renames, under the old name."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not overwrite:
        raise FileExistsError(f"{path} already exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}") if path.exists() else None
        if old is not None:
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
