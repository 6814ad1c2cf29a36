"""The IDX file format: magic numbers, header and size checks, gzip detection, parsing.

Every check names the file and what was expected, so a wrong or damaged file is refused
where it enters with a message that says what to fix.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import numpy as np

from mnist_cnn import MnistCnnError
from mnist_cnn.fileio import read_file

IMAGE_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
INT_LABEL_MAGIC = 3074  # 0x00000C02: big-endian int32, 2 dimensions (QMNIST's extended labels)
IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}  # the IDX type codes we read
IMAGE_SIZE = 28
MAX_IDX_BYTES = 1 << 30  # an IDX file, raw or after gunzip (MNIST's largest: 47,040,016)


class DataError(MnistCnnError):
    """Missing, corrupt or mismatched data files."""


def read_bytes(path: Path, *, max_bytes: int | None = None) -> bytes:
    """The file's bytes, gunzipped when it is gzip (detected by content, not by name); the
    file and its decompressed content are refused over `max_bytes` (default MAX_IDX_BYTES)."""
    limit = MAX_IDX_BYTES if max_bytes is None else max_bytes
    raw = read_file(path, error=DataError, max_bytes=limit)
    if raw[:2] != b"\x1f\x8b":
        return raw
    chunks, total = [], 0
    try:
        # Decompressed a chunk at a time: a small gzip bomb must not inflate without bound.
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
            while chunk := stream.read(1 << 20):
                total += len(chunk)
                if total > limit:
                    raise DataError(f"{path}: decompresses to more than {limit:,} bytes; "
                                    "refused (not an MNIST-size data file)")
                chunks.append(chunk)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path}: corrupt or truncated gzip file ({error}); "
                        "delete it and fetch it again") from None
    return b"".join(chunks)


def parse_idx(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Decode IDX bytes of unsigned bytes (type 0x08) or big-endian int32 (type 0x0C) into
    an array of the header's shape: uint8, or int32 in native byte order."""
    if len(data) < 4:
        raise DataError(f"{source}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype_code not in IDX_DTYPES or ndim == 0:
        magic = int.from_bytes(data[:4], "big")
        raise DataError(f"{source}: not an IDX file of unsigned bytes or int32 (magic number "
                        f"{magic}, expected {IMAGE_MAGIC} for images or {LABEL_MAGIC} or "
                        f"{INT_LABEL_MAGIC} for labels)")
    dtype = IDX_DTYPES[dtype_code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: IDX header truncated")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize  # exact: int64 would wrap around
    if len(data) != expected:
        raise DataError(f"{source}: header says shape {shape} ({expected} bytes) "
                        f"but the file has {len(data)} bytes (truncated or corrupt)")
    try:
        array = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    except ValueError as error:  # over numpy's 32/64 dimensions, or 0 x huge dimensions
        raise DataError(f"{source}: IDX shape {shape} cannot be held in an array ({error})") from None
    return array if dtype == np.uint8 else array.astype(np.int32)


def _magic(data: bytes) -> int:
    return int.from_bytes(data[:4], "big") if len(data) >= 4 else -1


def parse_images(data: bytes, *, source: str = "<bytes>") -> np.ndarray:
    """Images (N, 28, 28) uint8 from IDX bytes: magic number 2051 and 28x28 checked."""
    if _magic(data) != IMAGE_MAGIC:
        raise DataError(f"{source}: magic number {_magic(data)}, expected {IMAGE_MAGIC} "
                        "(an IDX file of images)")
    images = parse_idx(data, source=source)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images are {images.shape[1]}x{images.shape[2]}, "
                        f"expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    return images


def parse_labels(data: bytes, *, source: str = "<bytes>", num_classes: int = 10,
                 column: int | None = None) -> np.ndarray:
    """Class labels (N,): from an IDX file of unsigned bytes (N,), or with `column` from
    column `column` of an IDX file of int32 (N, K), as QMNIST's extended labels."""
    magic = LABEL_MAGIC if column is None else INT_LABEL_MAGIC
    if _magic(data) != magic:
        kind = "labels" if column is None else "int32 labels of 2 dimensions"
        raise DataError(f"{source}: magic number {_magic(data)}, expected {magic} "
                        f"(an IDX file of {kind})")
    labels = parse_idx(data, source=source)
    if column is not None:
        if labels.shape[1] <= column:
            raise DataError(f"{source}: labels have {labels.shape[1]} columns, expected the "
                            f"class in column {column}")
        labels = labels[:, column]
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels.max()) if labels.max() >= num_classes else int(labels.min())
        raise DataError(f"{source}: label {bad} found, expected 0..{num_classes - 1}")
    return labels


def load_idx(path: Path) -> np.ndarray:
    """Read any IDX file of unsigned bytes or int32, gzip or raw."""
    return parse_idx(read_bytes(path), source=str(path))
