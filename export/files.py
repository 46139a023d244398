"""Writing a file so that a reader, or a process killed halfway, sees the old file or the whole new one.

The one way every layer writes a file others may read at any moment: a device's progress and pending
update, cached tokenized data and frozen-block features, the broker's ACL. (The coordinator's store
batches many files per flush and has its own writer, :mod:`coordinator.store`.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(
    path: Path | str,
    data: bytes | Callable[[Path], None],
    *,
    sync: bool = True,
    before_replace: Callable[[Path], None] | None = None,
) -> None:
    """Write ``data`` (bytes, or a function that writes the file at the path it is given) to ``path``
    atomically: to a temporary file beside it, flushed to the disk (``sync``), then renamed over it.

    ``before_replace`` sees the finished temporary file (to set its mode or owner) before the rename.
    The temporary file is removed when anything fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if callable(data):
            data(tmp)
            if sync:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        else:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
