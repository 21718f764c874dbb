"""Writing files so that a reader, or a crash, never sees half of one: checkpoints, exported and
quantized graphs, metrics and configs all go through ``atomic_path``."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path next to ``path`` for the block to write; it becomes ``path`` (synced, with
    ``mode``) only when the block succeeds, and is removed otherwise.

    ``mode`` defaults to world-readable: the temporary file is private, and a model file is meant to
    be read by a server running as another user (the container's uid 10001).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
