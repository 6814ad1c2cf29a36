"""Reading is bounded (pipes, devices, endless streams, oversized files are refused in one
line), and an atomic write that fails — the disk full — leaves the previous file intact."""

from __future__ import annotations

import errno
import gzip
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import uid_mapped, write_dataset
from mnist_cnn import MnistCnnError, fileio
from mnist_cnn.idx import DataError, read_bytes
from mnist_cnn.fileio import atomic_write, atomic_write_bytes, read_file, read_stream, require_regular_file
from mnist_cnn.preprocess import ImageError, open_image, preprocess, preprocess_file

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need POSIX")


@contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: a hang is exactly the bug these tests look for."""
    def expire(signum, frame):
        raise TimeoutError(f"still reading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def odd_files(tmp_path) -> dict[str, Path]:
    """A named pipe nobody writes to, a link to /dev/zero, a folder."""
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {"a named pipe": fifo, "a character device": zero, "a directory": folder}


def test_pipes_devices_and_folders_are_refused_without_reading(odd_files):
    for kind, path in odd_files.items():
        message = (f"{path}: is a directory, expected a file" if kind == "a directory"
                   else f"{path}: not a regular file ({kind}); refused")
        for read, error in ((lambda p: read_file(p, error=DataError), DataError),
                            (lambda p: read_file(p, error=DataError, max_bytes=10), DataError),
                            (read_bytes, DataError), (open_image, ImageError),
                            (preprocess_file, ImageError), (require_regular_file, MnistCnnError)):
            with deadline(5), pytest.raises(error) as caught:
                read(path)
            assert str(caught.value) == message


def test_missing_and_oversized_files(tmp_path):
    path = tmp_path / "ten.bin"
    path.write_bytes(b"0123456789")
    assert read_file(path, max_bytes=10) == b"0123456789"
    assert read_file(path) == b"0123456789"
    assert require_regular_file(path, max_bytes=10) == path
    with pytest.raises(DataError, match=r"ten.bin: larger than 9 bytes; refused"):
        read_file(path, error=DataError, max_bytes=9)
    with pytest.raises(ImageError, match=r"ten.bin: larger than 9 bytes; refused"):
        require_regular_file(path, error=ImageError, max_bytes=9)
    with pytest.raises(DataError, match=r"ten.bin: larger than 9 bytes; refused"):
        read_bytes(path, max_bytes=9)
    for check in (read_file, require_regular_file):
        with pytest.raises(MnistCnnError, match="nope.bin: file not found"):
            check(tmp_path / "nope.bin")
    with pytest.raises(MnistCnnError, match="invalid path"):
        read_file("a\0b")


def test_unreadable_file_is_one_line():
    """A file its reader may not open is refused in one line. Root reads any file, so as root
    (which CI is) the check runs in a forked child that first becomes the user nobody."""
    folder = Path(tempfile.mkdtemp(prefix="mnist-cnn-unreadable-"))  # not under pytest's 0700 tmp
    try:
        folder.chmod(0o755)
        path = folder / "secret.png"
        path.write_bytes(b"x")
        path.chmod(0)
        expected = f"{path}: cannot read (Permission denied)"
        if os.geteuid() != 0:
            with pytest.raises(ImageError) as raised:
                open_image(path)
            assert str(raised.value) == expected
            return
        if not uid_mapped(65534):
            pytest.skip("root here cannot become nobody (a user namespace that maps only root)")
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never returns to pytest
            try:
                os.close(reader)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)  # nobody, for good: root cannot come back
                try:
                    open_image(path)
                    message = "read it"
                except ImageError as error:
                    message = str(error)
                os.write(writer, message.encode())
            finally:
                os._exit(0)
        os.close(writer)
        with os.fdopen(reader, "rb") as pipe:
            message = pipe.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert message == expected
    finally:
        shutil.rmtree(folder)


class Endless(io.RawIOBase):
    """A stream that never ends, counting what was read from it."""

    def __init__(self):
        self.served = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        buffer[:] = bytes(len(buffer))
        self.served += len(buffer)
        return len(buffer)


def test_endless_stream_stops_at_the_cap():
    stream = Endless()
    with deadline(10), pytest.raises(ImageError, match=r"^-: more than 5,000,000 bytes; refused$"):
        read_stream(stream, name="-", error=ImageError, max_bytes=5_000_000)
    assert stream.served <= 5_000_000 + (1 << 20)  # one chunk past the cap, not more
    assert read_stream(io.BytesIO(b"abc"), name="-", max_bytes=3) == b"abc"


def test_gzip_bomb_is_refused_at_the_decompressed_cap(tmp_path):
    bomb = tmp_path / "train-images-idx3-ubyte.gz"
    bomb.write_bytes(gzip.compress(bytes(32 << 20), mtime=0))  # 32 MiB of zeros in ~32 kB
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"decompresses to more than 1,048,576 bytes; refused"):
            read_bytes(bomb, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the cap and a chunk or two, not the 32 MiB it inflates to
    assert read_bytes(bomb) == bytes(32 << 20)  # the default cap (1 GiB) lets it through


def png_bytes() -> bytes:
    array = np.zeros((40, 30), np.uint8)
    array[8:32, 12:18] = 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def test_standard_input_is_read_with_the_cap(monkeypatch):
    data = png_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert np.array_equal(preprocess_file("-"), preprocess_file(data))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"")))
    with pytest.raises(ImageError, match=r"^-: not an image mnist-cnn reads \(send PNG, JPEG, GIF, BMP, TIFF, WebP or PNM\)$"):
        preprocess_file("-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(Endless())))
    monkeypatch.setattr("mnist_cnn.preprocess.MAX_FILE_BYTES", 3_000_000)
    with deadline(10), pytest.raises(ImageError, match=r"^-: more than 3,000,000 bytes; refused$"):
        preprocess_file(Path("-"))


# ---------------------------------------------------------------- disk full


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_disk_full_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    path = tmp_path / "checkpoint.pt"
    old = {"epoch": 1, "weights": torch.arange(6.0)}
    atomic_write(path, lambda handle: torch.save(old, handle))
    before = path.read_bytes()
    new = {"epoch": 2, "weights": torch.zeros(1000)}

    def write(handle):
        if failing == "write":  # part of the new bytes went out, then the disk filled up
            handle.write(b"half a checkpoint")
            enospc()
        torch.save(new, handle)

    if failing != "write":
        monkeypatch.setattr(fileio.os, failing, enospc)
    with pytest.raises(OSError) as caught:
        atomic_write(path, write)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["weights"], old["weights"])
    assert leftovers(tmp_path) == ["checkpoint.pt"]  # the temporary file is gone
    atomic_write_bytes(path, b"room again")  # and writing works once there is room
    assert path.read_bytes() == b"room again" and leftovers(tmp_path) == ["checkpoint.pt"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, mnist) -> Path:
    """A 'custom' data set of 512 train and 256 test images of real MNIST: epochs in a blink."""
    return write_dataset(tmp_path_factory.mktemp("tiny-data"), {
        "train": (mnist["train"][0][:512], mnist["train"][1][:512]),
        "test": (mnist["test"][0][:256], mnist["test"][1][:256]),
    })


def test_disk_full_during_a_checkpoint_is_one_line_from_the_cli(tmp_path, monkeypatch, capsys,
                                                                  tiny_data):
    """`mnist-cnn train` when the disk fills while epoch 2's checkpoint is written: exit 1,
    one line naming the file, epoch 1's checkpoint intact."""
    from mnist_cnn.cli import main

    run = tmp_path / "run"
    written: dict[str, bytes] = {}
    replace = os.replace

    def full_on_second_checkpoint(source, target):
        if Path(target).name == "checkpoint.pt" and Path(target).exists():
            written["previous"] = Path(target).read_bytes()
            enospc()
        replace(source, target)

    monkeypatch.setattr(fileio.os, "replace", full_on_second_checkpoint)
    code = main(["train", "--dataset", "custom", "--data-dir", str(tiny_data), "--epochs", "2",
                 "--run-dir", str(run), "--no-progress", "--no-report", "--device", "cpu"])
    monkeypatch.undo()
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1, lines
    assert lines[-1] == f"mnist-cnn train: error: No space left on device: {run / 'checkpoint.pt'}"
    assert "Traceback" not in "\n".join(lines)
    assert (run / "checkpoint.pt").read_bytes() == written["previous"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert isinstance(state, dict)
    assert not [name for name in leftovers(run) if name.startswith(".checkpoint.pt.")]


# ---------------------------------------------------------------- the CLI, as a user runs it


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    from mnist_cnn.config import TrainConfig
    from mnist_cnn.train import train

    run = tmp_path_factory.mktemp("tiny") / "run"
    train(TrainConfig(dataset="custom", epochs=1), run_dir=run, data_dir=str(tiny_data),
          progress=False, log=lambda message: None)
    return run


def predict(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mnist_cnn", "predict", *args], input=stdin,
                          capture_output=True, env=env, timeout=60)


def test_cli_predict_refuses_a_pipe_and_a_device_quickly_and_reads_stdin(tiny_run, odd_files,
                                                                        tmp_path):
    """One `mnist-cnn predict` as a user runs it: a pipe nobody writes to and a link to
    /dev/zero are one-line errors (not a hang, not a memory blow-up), the others predicted,
    and "-" reads the image from standard input."""
    digit = tmp_path / "digit.png"
    digit.write_bytes(png_bytes())
    started = time.monotonic()
    result = predict("--model", str(tiny_run), str(odd_files["a named pipe"]),
                     str(odd_files["a character device"]), str(digit), "-", stdin=digit.read_bytes())
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr  # some images failed, the others predicted
    errors = result.stderr.decode().strip().splitlines()
    assert errors == [f"{odd_files['a named pipe']}: error: not a regular file (a named pipe); refused",
                      f"{odd_files['a character device']}: error: not a regular file (a character device); refused"]
    from_file, from_stdin = result.stdout.decode().strip().splitlines()
    assert from_file.startswith(f"{digit}: ")
    assert from_stdin == "-" + from_file.removeprefix(str(digit))  # the same digit, the same figures


# ---------------------------------------------------------------- image formats and decoding cost
EPS = b"""%!PS-Adobe-3.0 EPSF-3.0
%%BoundingBox: 0 0 28 28
%%EndComments
newpath 10 4 moveto 10 24 lineto 6 setlinewidth stroke
showpage
%%EOF
"""



def test_an_eps_file_never_runs_ghostscript(fake_ghostscript, tmp_path, shipped_model):
    from conftest import cli

    for data in (EPS, b"\xc5\xd0\xd3\xc6" + bytes(26) + EPS):  # plain and DOS-binary EPS
        with pytest.raises(ImageError, match=r"^image: EPS(/PostScript)? files are not supported \(send PNG"):
            preprocess_file(data)
    hand = tmp_path / "hand.eps"
    hand.write_bytes(EPS)
    result = cli("predict", "--model", str(shipped_model), str(hand))
    assert result.returncode == 1  # a bad image, as for any other file predict cannot read
    assert result.stderr.strip().splitlines() == [f"{hand}: error: EPS/PostScript files are not supported "
                                                  "(send PNG, JPEG, GIF, BMP, TIFF, WebP or PNM)"]
    from mnist_cnn import predict_images

    hand.rename(tmp_path / "hand.png")  # the Python API, and a name that lies
    for image in (tmp_path / "hand.png", EPS):
        with pytest.raises(ImageError, match="EPS/PostScript files are not supported"):
            predict_images([image], model=shipped_model)
    assert not fake_ghostscript.exists()
    # The fake is found: an open without the allowlist would have run it.
    with Image.open(io.BytesIO(EPS)) as image, pytest.raises(Exception):
        image.load()
    assert fake_ghostscript.exists()


def test_containers_and_other_formats_are_refused_before_decoding(monkeypatch):
    digit = Image.fromarray(np.pad(np.full((20, 20), 255, np.uint8), 4))
    ico = io.BytesIO()
    digit.save(ico, "ICO", sizes=[(28, 28)])
    decoded = []
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", lambda self: decoded.append(self.format))
    tga = io.BytesIO()
    digit.save(tga, "TGA")
    for data, kind in ((ico.getvalue(), "ICO files are"), (b"%PDF-1.4\n", "PDF files are"),
                       (tga.getvalue(), "not an image mnist-cnn reads"), (b"BM" + bytes(3), "not an image")):
        with pytest.raises(ImageError, match=kind):
            open_image(data)
    assert decoded == []
    open_image(png_bytes())
    assert decoded and set(decoded) == {"PNG"}  # the same check sees an allowed format decode


def header_bomb(width: int = 6000, height: int = 6600) -> bytes:
    """A few hundred bytes of JPEG whose header claims width x height (39.6 megapixels:
    under the per-image limit, so only reduced decoding and the budgets keep its cost down)."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 255).save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"\xff\xc0")  # SOF0: length, precision, height, width
    data[start + 5:start + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_jpeg_header_bombs_are_decoded_at_reduced_scale():
    data = header_bomb()
    assert len(data) < 1000 and Image.open(io.BytesIO(data)).size == (6000, 6600)
    charged = []
    began = time.perf_counter()
    for _ in range(8):  # (64 of them in one batch: tests/test_serve_hardening.py)
        with pytest.raises(ImageError, match="no digit found"):
            preprocess_file(data, charge=charged.append)
    elapsed = time.perf_counter() - began
    # 1/4 scale: 1500 x 1650 pixels each (the 1/8 scale would be under DECODE_PIXELS).
    assert charged == [1500 * 1650] * 8
    assert elapsed < 5, elapsed  # ~0.5 s on a busy 2-core machine; ~13 s when decoded in full


def phone_photo(seven: np.ndarray, size=(4032, 3024)) -> bytes:
    """A 12-megapixel JPEG: dark digit on light paper, as a phone photographs a note."""
    page = Image.new("L", size, 225)
    ink = Image.fromarray(255 - seven).resize((1400, 1400), Image.Resampling.BILINEAR)
    page.paste(ink.point(lambda v: 30 + v * 195 // 255), (1300, 800))
    buffer = io.BytesIO()
    page.convert("RGB").save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def test_phone_photos_work_and_are_decoded_smaller(mnist):
    images, labels = mnist["test"]
    seven = images[int(np.flatnonzero(labels == 7)[0])]
    data = phone_photo(seven)
    charged = []
    digit = preprocess_file(data, charge=charged.append)
    assert charged == [2016 * 1512]  # 1/2 scale: 3 megapixels decoded, not 12
    full = preprocess(open_image(data))
    overlap = np.minimum(digit, full).sum() / np.maximum(digit, full).sum()
    assert overlap > 0.9, overlap  # the same digit as from the full-size decode
    budget_left = [2_000_000]

    def charge(pixels):
        if pixels > budget_left[0]:
            raise ImageError(f"image: {pixels:,} pixels over the budget")
    with pytest.raises(ImageError, match="3,048,192 pixels over the budget"):
        preprocess_file(data, charge=charge)


@pytest.mark.parametrize("mode", ["RGBA", "P", "1", "L"])
def test_large_images_of_any_format_are_shrunk_before_the_float_work(mode):
    """A 3000x2000 page (6 MP) reaches the float steps at about DECODE_PIXELS (1/2 of each side),
    not as several float copies at full size."""
    page = np.full((2000, 3000), 255, np.uint8)
    page[500:1500, 1400:1600] = 0  # a "1", 1000 pixels tall
    image = Image.fromarray(page).convert(mode)
    if mode == "P":
        image.info["transparency"] = 7
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    small = open_image(buffer.getvalue(), decode_pixels=1_000_000)
    assert small.size == (1500, 1000) and small.mode == {"1": "L", "P": "RGBA"}.get(mode, mode)
    digit = preprocess(small)
    assert digit.max() == 255 and digit[:, 14].sum() > 20 * 200  # a vertical stroke, mid-canvas
