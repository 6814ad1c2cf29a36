"""Crash-safe file writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from mnist_cnn import MnistCnnError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary file beside `path`, fsync, then rename over `path`:
    a crash at any moment leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o666 & ~_umask())  # NamedTemporaryFile makes 0600 files
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def read_file(path: str | Path, *, error: type[MnistCnnError] = MnistCnnError,
              max_bytes: int | None = None) -> bytes:
    """A file's bytes; a missing, unreadable, directory or (with `max_bytes`) oversized path
    raises `error` with a one-line message that names the path."""
    try:
        if max_bytes is not None and Path(path).stat().st_size > max_bytes:
            raise error(f"{path}: larger than {max_bytes:,} bytes; refused")
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a directory, expected a file") from None
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
