"""Crash-safe file writes and bounded reads of the files users name."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from mnist_cnn import MnistCnnError

_CHUNK = 1 << 20  # bytes per read when a size cap applies


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
    except BaseException as failure:
        Path(handle.name).unlink(missing_ok=True)
        if isinstance(failure, OSError) and failure.errno and not failure.filename:
            # "No space left on device" alone does not say which write failed.
            raise OSError(failure.errno, failure.strerror or str(failure), str(path)) from failure
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see atomic_write)."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (see atomic_write)."""
    atomic_write_bytes(path, text.encode())


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unusual file type"


def _check(path: str | Path, info: os.stat_result, *, error: type[MnistCnnError],
           max_bytes: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise error(f"{path}: is a directory, expected a file")
    if not stat.S_ISREG(info.st_mode):
        # A pipe nobody writes to blocks forever, /dev/zero never ends: refuse, don't read.
        raise error(f"{path}: not a regular file ({_kind(info.st_mode)}); refused")
    if max_bytes is not None and info.st_size > max_bytes:
        raise error(f"{path}: larger than {max_bytes:,} bytes; refused")


def _stat(path: str | Path, *, error: type[MnistCnnError]) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    except ValueError as failure:  # a NUL byte in the name
        raise error(f"{path}: invalid path ({failure})") from None


def require_regular_file(path: str | Path, *, error: type[MnistCnnError] = MnistCnnError,
                         max_bytes: int | None = None) -> Path:
    """`path`, checked to be an existing regular file (not a pipe, device or directory) of at
    most `max_bytes`, for libraries that open a path themselves (safetensors, torch.load,
    onnxruntime); anything else raises `error` with a one-line message naming the path."""
    _check(path, _stat(path, error=error), error=error, max_bytes=max_bytes)
    return Path(path)


def read_stream(stream: BinaryIO, *, name: str, error: type[MnistCnnError] = MnistCnnError,
                max_bytes: int | None = None) -> bytes:
    """Everything `stream` holds up to EOF, refused with `error` past `max_bytes` (read in
    chunks, so an endless stream costs at most `max_bytes` of memory)."""
    chunks, total = [], 0
    try:
        while chunk := stream.read(_CHUNK):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise error(f"{name}: more than {max_bytes:,} bytes; refused")
            chunks.append(chunk)
    except OSError as failure:
        raise error(f"{name}: cannot read ({failure.strerror or failure})") from None
    return b"".join(chunks)


def read_file(path: str | Path, *, error: type[MnistCnnError] = MnistCnnError,
              max_bytes: int | None = None) -> bytes:
    """A regular file's bytes; a missing, unreadable or oversized path, a directory, a named
    pipe or a device raises `error` with a one-line message that names the path."""
    _check(path, _stat(path, error=error), error=error, max_bytes=max_bytes)
    try:
        # O_NONBLOCK: should the path become a FIFO after the check above, opening it
        # must not wait for a writer; fstat of the open descriptor is the final word.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except OSError as failure:
        raise error(f"{path}: cannot read ({failure.strerror})") from None
    with os.fdopen(descriptor, "rb", buffering=0) as handle:
        _check(path, os.fstat(descriptor), error=error, max_bytes=max_bytes)
        # A regular file may still grow while it is read: the cap holds for what is read.
        return read_stream(handle, name=str(path), error=error, max_bytes=max_bytes)
