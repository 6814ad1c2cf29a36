"""Faster training kernels for the seed model's convolution blocks (conv -> 2x2 max-pool -> ReLU).

Each block is one autograd Function:

- forward: convolution, pooling and ReLU in one pass (FUSED; or torch's convolution, then
  pooling and ReLU in one pass) that writes the pooled map and a uint8 window index, never the
  full-size map, `max_pool2d_with_indices`' int64 indices or a separate ReLU;
- backward, from the pooled gradient: only one position in four of the convolution's output
  gets a gradient (and none where the ReLU is closed), so the weight, bias and input gradients
  are gather/scatter loops over those positions, never the dense (B, C, 24, 24) gradient map
  and a dense convolution backward.

The loops are C (`kernels.c`), compiled at first use with the system's C compiler
(`cc -O3 -march=native`), cached under the user cache directory and called through ctypes.
No compiler, a failed build or an unsupported platform means the reference torch ops, always
correct. A run's `kernels` setting (TrainConfig, `--kernels`; recorded in config.json and the
checkpoint) chooses: `torch` (the reference ops), `custom` (these kernels wherever they
apply), `auto` (these kernels where they were measured faster; see DEFAULT_ON);
$MNIST_CNN_KERNELS, when set, overrides it. The training loop builds its model with
`build_training_model`, which gives the seed model the kernels as `KernelSeedCNN`;
mnist_cnn.model stays plain torch. The kernels serve training only (grad enabled, float32
on the CPU, no autocast); evaluation, export and tracing use the reference ops.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mnist_cnn import MnistCnnError
from mnist_cnn.config import KERNELS as CHOICES
from mnist_cnn.model import MODELS, SeedCNN, build_model

ENV = "MNIST_CNN_KERNELS"
SOURCE = Path(__file__).with_name("kernels.c")
CFLAGS = ("-O3", "-march=native", "-fPIC", "-shared", "-pthread", "-std=c11")

# Where `auto` uses the kernels: measured faster (forward + backward of each block at batch 128
# and 256, the whole step, and an epoch; channels-last, interleaved with the reference ops)
# - on an Intel Xeon with AVX-512 (KVM guest, 2 cores), 2026-11-30, with 1 thread: the cores were
#   shared with other jobs, which makes 2-thread timings scatter 2x (see benchmarks/kernels.py);
# - on an AMD EPYC (Zen 5, AVX-512; KVM guest, 2 cores), 2026-12-01, shared with 6 other jobs:
#   the whole step 2.5-2.9x faster with 1 thread, 1.4-1.8x with 2 (torch's ops suffer most from
#   the contention there), each fused block 2.3-5x (docs/performance-round3.md).
# Other vendors keep the reference ops until someone measures them (`--kernels custom` to try).
# Concurrent trainings, in threads or processes, are safe: the worker pool in kernels.c starts
# each worker knowing the job generation at its creation (it spins briefly, then sleeps); a
# concurrent caller starts its own threads; a fork()ed child starts new workers.
DEFAULT_ON: dict[str, dict[str, bool]] = {"GenuineIntel": {"conv1": True, "conv2": True, "head": True},
                                          "AuthenticAMD": {"conv1": True, "conv2": True, "head": True}}
# The block's convolution computed inside the kernel (no full-size map) rather than by torch
# (oneDNN), where measured faster (same machine and runs as DEFAULT_ON).
FUSED = {"conv1": True, "conv2": True}


class KernelError(MnistCnnError):
    """A bad MNIST_CNN_KERNELS value."""


@dataclass(frozen=True)
class Block:
    """One conv -> pool -> ReLU block the C code is specialised for."""

    name: str
    in_channels: int
    out_channels: int
    size: int  # input height = width
    kernel: int = 5

    @property
    def pooled(self) -> int:
        return (self.size - self.kernel + 1) // 2


BLOCKS = {"conv1": Block("conv1", 1, 6, 28), "conv2": Block("conv2", 6, 16, 12)}


# ---------------------------------------------------------------- building the C library

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_failure: str | None = None


@functools.lru_cache(maxsize=None)
def _cpu_signature() -> str:
    # Read once per process: wanted() asks for the vendor on every training step, and reading
    # /proc/cpuinfo took 37 us on 2 cores (it grows with the core count: ~1 KB per core).
    try:
        with open("/proc/cpuinfo") as handle:
            lines = [line for line in handle if line.startswith(("vendor_id", "model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cpu_vendor() -> str:
    for line in _cpu_signature().splitlines():
        if line.startswith("vendor_id"):
            return line.split(":", 1)[1].strip()
    return ""


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def library_path(compiler: str) -> Path:
    """Cached build: one per source, compiler, flags and CPU (for -march=native)."""
    from mnist_cnn.catalog import user_cache_dir

    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), compiler.encode(), " ".join(CFLAGS).encode(), _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return user_cache_dir() / "kernels" / key.hexdigest()[:16] / "libmnistcnn_kernels.so"


def _build(compiler: str) -> Path:
    target = library_path(compiler)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a concurrent process sees the whole file or none.
    handle, partial = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(handle)
    try:
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", partial], check=True,
                       capture_output=True, timeout=120)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)
    return target


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.conv1_fused_fwd.argtypes = [p, p, p, p, p, i64, i32]
    lib.conv1_fused_fwd.restype = None
    lib.conv2_fused_fwd.argtypes = [p, p, p, p, p, i64, i64, i64, i64, i64, i32]
    lib.conv2_fused_fwd.restype = None
    for name in BLOCKS:
        forward = getattr(lib, f"{name}_pool_relu_fwd")
        forward.argtypes = [p, p, p, i64, i64, i64, i64, i64, i32]
        forward.restype = None
        backward = getattr(lib, f"{name}_conv_pool_bwd")
        backward.argtypes = [p, i64, i64, i64, i64, p, p, p, p, p, p, i64, i32]
        backward.restype = i32
    lib.head_fwd.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.head_fwd.restype = i32
    lib.head_bwd.argtypes = [p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, i64, i32]
    lib.head_bwd.restype = i32


def load_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (and `failure()` says why) if they
    cannot be built or loaded here."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            compiler = _compiler()
            if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
                _failure = f"kernels are built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
            elif compiler is None:
                _failure = "no C compiler found (set CC or install cc)"
            else:
                try:
                    lib = ctypes.CDLL(str(_build(compiler)))
                    _declare(lib)
                    _library = lib
                except (OSError, subprocess.SubprocessError, AttributeError) as error:
                    detail = getattr(error, "stderr", b"") or b""
                    _failure = f"building the kernels failed: {error} {detail.decode(errors='replace')[:500]}".strip()
    return _library


def failure() -> str | None:
    """Why the kernels are unavailable, or None."""
    return _failure


# ---------------------------------------------------------------- choosing

def mode(configured: str = "auto") -> str:
    """The kernels to use: $MNIST_CNN_KERNELS when set (an override, e.g. for a benchmark),
    else `configured` (a run's `kernels` setting)."""
    value = os.environ.get(ENV, "").strip().lower() or configured
    if value not in CHOICES:
        raise KernelError(f"{ENV}={value!r} is not one of: {', '.join(CHOICES)}")
    return value


def wanted(name: str, choice: str | None = None) -> bool:
    """Whether block `name` should use the custom kernels under `choice` (default: mode())
    and DEFAULT_ON, and they can be built here."""
    choice = mode() if choice is None else choice
    if choice == "torch":
        return False
    if choice == "auto" and not DEFAULT_ON.get(_cpu_vendor(), {}).get(name, False):
        return False
    return load_library() is not None


def applies(x: torch.Tensor, weight: torch.Tensor, block: Block) -> bool:
    """Whether the kernels can compute this call: CPU float32 training-shaped inputs, no autocast."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.dim() == 4 and x.shape[0] > 0
            and tuple(x.shape[1:]) == (block.in_channels, block.size, block.size)
            and tuple(weight.shape) == (block.out_channels, block.in_channels, block.kernel, block.kernel)
            and not torch.is_autocast_enabled("cpu"))


# ---------------------------------------------------------------- threads

_kernel_threads: int | None = None  # set by training_threads(); None: torch's thread count


def kernel_threads() -> int:
    """Threads the kernels split a batch over."""
    return _kernel_threads or torch.get_num_threads()


@contextlib.contextmanager
def training_threads(active: bool = True):
    """Within: torch's own ops on one thread, the kernels on the threads torch had. In the seed
    model's training step the kernels do the heavy work; torch's remaining ops (loss, Adam,
    dropout's mask) are too small to gain from a second thread, and on a machine shared with
    other jobs their OpenMP threads wait on each other: measured 2026-12-01 on a busy 2-core
    AMD EPYC, 26-37 ms a step with torch on 2 threads against 1.9-4.6 ms with torch on 1 and
    the kernels on 1 or 2. Process-wide, like torch.set_num_threads: not for concurrent
    trainings in threads of one process."""
    global _kernel_threads
    if not active:
        yield
        return
    previous_torch, previous = torch.get_num_threads(), _kernel_threads
    _kernel_threads = kernel_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous_torch)
        _kernel_threads = previous


# ---------------------------------------------------------------- the autograd Function

def _bhwc_strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    b, c, h, w = t.stride()
    return b, h, w, c


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _empty_channels_last(batch: int, channels: int, size: int, *, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(batch, size, size, channels, dtype=dtype).permute(0, 3, 1, 2)


class ConvPoolReLU(torch.autograd.Function):
    """relu(max_pool2d(conv2d(x, weight, bias), 2)) with the kernels above."""

    @staticmethod
    def forward(ctx, x, weight, bias, block: Block, flat_output: bool, fused: bool):
        lib = load_library()
        x = _channels_last(x)
        weight_cl = _channels_last(weight)
        batch, pooled, co = x.shape[0], block.pooled, block.out_channels
        # `flat_output`: the plain (B, Co, h, w) layout, so that a following flatten is a view.
        out = (torch.empty(batch, co, pooled, pooled) if flat_output
               else _empty_channels_last(batch, co, pooled))
        idx = torch.empty(batch, pooled, pooled, co, dtype=torch.uint8)
        threads = kernel_threads()
        if fused and block.name == "conv1" and not flat_output:
            lib.conv1_fused_fwd(x.data_ptr(), weight_cl.data_ptr(), bias.contiguous().data_ptr(),
                                out.data_ptr(), idx.data_ptr(), batch, threads)
        elif fused and block.name == "conv2":
            lib.conv2_fused_fwd(x.data_ptr(), weight_cl.data_ptr(), bias.contiguous().data_ptr(),
                                out.data_ptr(), idx.data_ptr(), batch, *_bhwc_strides(out), threads)
        else:
            y = _channels_last(F.conv2d(x, weight_cl, bias))  # (B, Co, H, W); oneDNN writes it channels-last
            getattr(lib, f"{block.name}_pool_relu_fwd")(
                y.data_ptr(), out.data_ptr(), idx.data_ptr(), batch, *_bhwc_strides(out), threads)
        ctx.block = block
        ctx.save_for_backward(x, weight_cl, idx)
        return out

    @staticmethod
    def backward(ctx, grad):
        lib = load_library()
        x, weight_cl, idx = ctx.saved_tensors
        block: Block = ctx.block
        batch = x.shape[0]
        k, ci, co = block.kernel, block.in_channels, block.out_channels
        grad_w = torch.empty(co, k, k, ci).permute(0, 3, 1, 2)  # (Co, Ci, K, K) channels-last
        grad_b = torch.empty(co)
        grad_x = _empty_channels_last(batch, ci, block.size) if ctx.needs_input_grad[0] else None
        if grad.stride(1) == 0 or grad.dtype != torch.float32:  # expanded or cast gradients
            grad = grad.float().contiguous()
        status = getattr(lib, f"{block.name}_conv_pool_bwd")(
            grad.data_ptr(), *_bhwc_strides(grad), idx.data_ptr(), x.data_ptr(), weight_cl.data_ptr(),
            grad_w.data_ptr(), grad_b.data_ptr(), grad_x.data_ptr() if grad_x is not None else None,
            batch, kernel_threads())
        if status != 0:
            raise MemoryError("mnist-cnn kernels: out of memory in the convolution backward")
        return grad_x, grad_w, grad_b, None, None, None


def pool_relu(y: torch.Tensor, *, block: str, force: bool | None = None) -> torch.Tensor:
    """relu(max_pool2d(y, 2)) of block `block`'s convolution output y, for inference (no
    autograd): the kernels' pooling where wanted and it applies (CPU float32, grad off), else
    torch's. Max and ReLU are exact, so both give the same values bit for bit (NaN aside: the
    kernel's ReLU turns a NaN maximum into 0); the kernel is ~5x faster than torch's channels-last
    max-pool at evaluation's batch of 1000."""
    spec = BLOCKS[block]
    size, pooled, channels = spec.size - spec.kernel + 1, spec.pooled, spec.out_channels
    if (not torch.is_grad_enabled() and y.device.type == "cpu" and y.dtype == torch.float32
            and y.dim() == 4 and y.shape[0] > 0 and tuple(y.shape[1:]) == (channels, size, size)
            and (wanted(block) if force is None else force and load_library() is not None)):
        y = _channels_last(y)
        out = _empty_channels_last(y.shape[0], channels, pooled)
        idx = torch.empty(y.shape[0], pooled, pooled, channels, dtype=torch.uint8)
        getattr(load_library(), f"{block}_pool_relu_fwd")(
            y.data_ptr(), out.data_ptr(), idx.data_ptr(), y.shape[0], *_bhwc_strides(out), kernel_threads())
        return out
    return F.relu(F.max_pool2d(y, 2, 2))


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The same block with torch's ops (ReLU after the pool: both monotone, so they commute)."""
    return F.relu(F.max_pool2d(F.conv2d(x, weight, bias), 2, 2))


def conv_pool_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, block: str,
                   flat_output: bool = False, force: bool | None = None,
                   fused: bool | None = None) -> torch.Tensor:
    """relu(max_pool2d(conv2d(x, weight, bias), 2)) for the seed model's block `block`
    (`conv1` or `conv2`): the custom kernels when `force` (or, if None, `wanted(block)`) and
    they apply to these inputs, else the reference torch ops. `fused` (default: FUSED[block])
    computes the convolution in the kernel too, instead of torch's. `flat_output` asks the
    kernels for the contiguous layout (for a flatten that follows); the values are the same."""
    spec = BLOCKS[block]
    use = wanted(block) if force is None else (force and load_library() is not None)
    if use and bias is not None and applies(x, weight, spec):
        return ConvPoolReLU.apply(x, weight, bias, spec, flat_output, FUSED[block] if fused is None else fused)
    return reference(x, weight, bias)


# ---------------------------------------------------------------- the model the training loop uses


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export()


class KernelSeedCNN(SeedCNN):
    """SeedCNN whose conv -> pool -> ReLU blocks and head named in `blocks` run on the custom
    kernels while it trains (grad enabled, not traced or exported), and whose pooling does in
    its test passes (grad off). Same layers, parameters and
    state dict as SeedCNN, whose own forward runs in every other case (evaluation,
    inference, export), so a checkpoint neither knows nor cares which one trained it."""

    def __init__(self, blocks: frozenset[str], num_classes: int = 10, dropout: float = 0.2):
        super().__init__(num_classes=num_classes, dropout=dropout)
        self.blocks = blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing():
            return super().forward(x)
        if self.training and torch.is_grad_enabled():
            x = conv_pool_relu(x, self.conv1.weight, self.conv1.bias, block="conv1",
                               force="conv1" in self.blocks)  # (b, 6, 12, 12)
            x = conv_pool_relu(x, self.conv2.weight, self.conv2.bias, block="conv2",
                               force="conv2" in self.blocks, flat_output=True)  # (b, 16, 4, 4)
            # lin1 -> dropout -> ReLU -> lin2 as one step each way (the same dropout mask)
            return head(self.flatten(x), self.lin1.weight, self.lin1.bias, self.lin2.weight, self.lin2.bias,
                        p=self.drop1.p, force="head" in self.blocks)  # (b, 10) logits
        if not torch.is_grad_enabled():
            # The test pass during training: torch's convolutions, pooling and ReLU by the kernels
            # (the same values bit for bit, ~5x faster than torch's max-pool at a batch of 1000)
            x = pool_relu(self.conv1(x), block="conv1", force="conv1" in self.blocks)  # (b, 6, 12, 12)
            x = pool_relu(self.conv2(x), block="conv2", force="conv2" in self.blocks)  # (b, 16, 4, 4)
            return self.head(x)
        return super().forward(x)


def build_training_model(name: str, *, num_classes: int, choice: str) -> nn.Module:
    """build_model(name), for training under the kernels `choice` (a run's `kernels` setting;
    see mode()): the seed model with the blocks the choice wants on the custom kernels, if
    any; every other model as build_model makes it. Both draw the same initial weights."""
    if MODELS.get(name) is SeedCNN:
        blocks = frozenset(block for block in (*BLOCKS, "head") if wanted(block, choice))
        if blocks:
            return KernelSeedCNN(blocks, num_classes=num_classes)
    return build_model(name, num_classes=num_classes)


def kernel_blocks(model: nn.Module) -> list[str]:
    """The blocks of `model` that train on the custom kernels (for the run's record)."""
    return sorted(model.blocks) if isinstance(model, KernelSeedCNN) else []


# ---------------------------------------------------------------- the head: linear -> dropout -> ReLU -> linear


def dropout_noise(like: torch.Tensor, p: float) -> torch.Tensor:
    """The scaled mask torch's dropout multiplies by on the CPU, drawn as it draws it (same
    random stream): bernoulli(1 - p), divided by 1 - p."""
    noise = torch.empty_like(like).bernoulli_(1 - p)
    return noise.div_(1 - p)


# The head's sizes the C code handles (the seed model's: 256 -> 96 -> 10), and its threads: one,
# as its work (~0.1 ms a step at batch 128) is no larger than starting and joining a thread.
HEAD_HIDDEN, HEAD_IN_MULTIPLE, HEAD_MAX_CLASSES, HEAD_THREADS = 96, 128, 16, 1


def _check(status: int, where: str) -> None:
    if status == 1:
        raise MemoryError(f"mnist-cnn kernels: out of memory in the head's {where}")
    if status:
        raise RuntimeError(f"mnist-cnn kernels: the head's {where} does not handle these sizes")


class Head(torch.autograd.Function):
    """relu(dropout(linear(x, w1, b1))) -> linear(., w2, b2) with one C call each way."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float):
        lib = load_library()
        x, w1, b1, w2, b2 = (t.contiguous() for t in (x, w1, b1, w2, b2))
        batch, (hidden, features), classes = x.shape[0], w1.shape, w2.shape[0]
        noise = dropout_noise(torch.empty(batch, hidden), p)
        dropped = torch.empty(batch, hidden)  # (B, H) dropout's output, before the ReLU
        logits = torch.empty(batch, classes)
        _check(lib.head_fwd(x.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
                            noise.data_ptr(), dropped.data_ptr(), logits.data_ptr(),
                            batch, features, hidden, classes, HEAD_THREADS), "forward")
        ctx.save_for_backward(x, w1, w2, noise, dropped)
        return logits

    @staticmethod
    def backward(ctx, grad):
        lib = load_library()
        x, w1, w2, noise, dropped = ctx.saved_tensors
        grad = grad.float().contiguous()
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w1, grad_b1 = torch.empty_like(w1), torch.empty(w1.shape[0])
        grad_w2, grad_b2 = torch.empty_like(w2), torch.empty(w2.shape[0])
        _check(lib.head_bwd(grad.data_ptr(), x.data_ptr(), w1.data_ptr(), w2.data_ptr(), noise.data_ptr(),
                            dropped.data_ptr(), grad_w1.data_ptr(), grad_b1.data_ptr(), grad_w2.data_ptr(),
                            grad_b2.data_ptr(), grad_x.data_ptr() if grad_x is not None else None,
                            x.shape[0], x.shape[1], w1.shape[0], w2.shape[0], HEAD_THREADS), "backward")
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None


def reference_head(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """The same head with torch's ops (dropout before the ReLU, as the tutorial has it)."""
    return F.linear(F.relu(F.dropout(F.linear(x, w1, b1), p, training)), w2, b2)


def head(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
         p: float, force: bool | None = None) -> torch.Tensor:
    """The seed model's training head, linear(relu(dropout(linear(x, w1, b1), p)), w2, b2), for
    (B, I) x: the custom kernel when `force` (or, if None, `wanted("head")`) and it applies
    (CPU float32, the seed's hidden size, 0 < p < 1, no autocast), else torch's ops. Both draw dropout's mask from the
    global generator the same way, so they train alike."""
    use = wanted("head") if force is None else (force and load_library() is not None)
    tensors = (x, w1, b1, w2, b2)
    if (use and 0.0 < p < 1.0 and x.dim() == 2 and x.shape[0] > 0 and b1 is not None and b2 is not None
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and w1.shape == (HEAD_HIDDEN, x.shape[1]) and x.shape[1] % HEAD_IN_MULTIPLE == 0
            and w2.shape[1] == HEAD_HIDDEN and 1 <= w2.shape[0] <= HEAD_MAX_CLASSES
            and not torch.is_autocast_enabled("cpu")):
        return Head.apply(x, w1, b1, w2, b2, float(p))
    return reference_head(x, w1, b1, w2, b2, p)
