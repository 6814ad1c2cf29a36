"""Processes: who this one is under torchrun, and the few collective steps training needs.

The one module that knows how many processes there are. `torchrun` sets RANK, WORLD_SIZE,
LOCAL_RANK and LOCAL_WORLD_SIZE (and MASTER_ADDR/MASTER_PORT); without them the world is one
process, every helper here is a plain call, and `mnist-cnn train` runs exactly as before.

Under torchrun: gloo on the CPU, NCCL on `cuda:LOCAL_RANK` (one process per GPU); rank 0
alone evaluates and writes the run folder (`on_main`), the others wait for it; every wait
has a timeout ($MNIST_CNN_DIST_TIMEOUT seconds), so a rank that never comes or dies gives a
one-line error instead of a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch

from mnist_cnn import MnistCnnError, exits
from mnist_cnn.runtime import resolve_device

TIMEOUT_ENV = "MNIST_CNN_DIST_TIMEOUT"
THREADS_ENV = "MNIST_CNN_THREADS"  # torch threads per process under torchrun
DEFAULT_TIMEOUT = 300.0  # seconds: rank 0's evaluation and checkpoint of a full epoch fit well
T = TypeVar("T")


class DistributedError(MnistCnnError):
    """The processes of a torchrun job could not start or lost each other."""


def launched() -> bool:
    """True under torchrun (or anything else that sets RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_seconds() -> float:
    """How long to wait for the other processes to join ($MNIST_CNN_DIST_TIMEOUT, else
    DEFAULT_TIMEOUT)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: expected a positive number of seconds")
    return value


def threads_per_process(local_size: int) -> int:
    """$MNIST_CNN_THREADS, else this machine's cores shared among its local processes. The
    count changes the order of floating-point sums: bit-identical runs need the same."""
    text = os.environ.get(THREADS_ENV, "")
    if not text:
        return max(1, usable_cores() // max(1, local_size))
    if not text.isdigit() or int(text) < 1:
        raise DistributedError(f"{THREADS_ENV}={text!r}: expected a positive number of threads")
    return int(text)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset
    limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def stream_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, rank, ...): distinct streams per rank that never
    coincide with rank 0's own `torch.manual_seed(seed)`."""
    digest = hashlib.sha256(("mnist-cnn:" + ":".join(map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None and default is not None:
        return default
    try:
        return int(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DistributedError(f"{name}={text!r} in the environment: expected an integer "
                               "(set by torchrun)") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def is_communication_error(error: BaseException) -> bool:
    """An error of torch.distributed (gloo reports a dead peer as a plain RuntimeError)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(
        marker in str(error) for marker in ("gloo", "NCCL", "Connection closed", "Connection reset"))


@dataclass
class World:
    """This process's place among the processes of one training run (default: alone)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1  # WORLD_SIZE: processes in all
    local_size: int = 1  # processes on this machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    grouped: bool = False  # a process group was initialised (under torchrun, even for 1)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, evaluates and writes the run folder."""
        return self.rank == 0

    def main_only(self, log: Callable[[str], None]) -> Callable[[str], None]:
        return log if self.is_main else (lambda message: None)

    # ------------------------------------------------------------ collectives

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any: decisions all ranks must share."""
        if self.size == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over all ranks (a new tensor), e.g. a step's loss over every
        rank's images: the same on all ranks, so a NaN on one stops all."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        total = value.detach().clone()
        dist.all_reduce(total)
        return total

    def objective(self, loss: torch.Tensor, *, images: int, share: int, mean: bool) -> torch.Tensor:
        """What this rank backpropagates so that DistributedDataParallel's gradient average
        over the W ranks equals one process's gradient on the whole step: `loss` is this
        rank's loss over its `share` of the step's `images` images, its mean (`mean`, as ce)
        or its sum (as kl)."""
        return loss * (self.size * share / images if mean else self.size)

    def gather(self, value: T) -> list[T]:
        """`value` from every rank, in rank order, on every rank (small picklable objects)."""
        if self.size == 1:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def on_main(self, action: Callable[[], T]) -> T:
        """`action()` on rank 0 alone (evaluating, writing the run folder) while the others
        wait; its result reaches every rank, and so does its failure."""
        if self.size == 1:
            return action()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.is_main:
            try:
                payload[0] = ("ok", action())
            except (MnistCnnError, OSError) as error:
                payload[0] = ("error", _first_line(error))
                dist.broadcast_object_list(payload, src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            raise DistributedError(f"rank {self.rank}: stopped because rank 0 failed: {value}")
        return value

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """The model under DistributedDataParallel (None alone): it averages gradients
        across ranks during backward and starts every rank from rank 0's weights."""
        if self.size == 1:
            return None
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def seed_rank(self, seed: int) -> None:
        """Give each rank > 0 its own random stream (dropout, augmentation) after the shared
        initialisation; rank 0 keeps the one-process stream."""
        if self.rank > 0:
            torch.manual_seed(stream_seed(seed, self.rank))

    def close(self, *, finished: bool = False, peers_lost: bool = False) -> None:
        """Leave the process group: after a barrier when the run `finished` (no rank tears
        down while another still talks to it), and once the DistributedDataParallel wrapper,
        which holds the group, is gone (collected here if it sits in a reference cycle).
        Destroying the group while the wrapper still lived, and freeing the wrapper after,
        ended one rank with SIGABRT ("terminate called without an active exception") once in
        about a dozen runs of the test suite, after a run had finished and saved its model.
        So the training code must not hold the wrapper by now (its frames have returned).
        When the peers are lost, the group is only dropped: freeing it waits on gloo's
        threads, which may still wait on the dead peers, and this process is on its way out."""
        if self.grouped:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                if finished and self.size > 1:
                    try:
                        dist.barrier()
                    except RuntimeError:  # a peer gone after the end: the launcher says so
                        pass
                if not peers_lost:
                    gc.collect()
                dist.destroy_process_group()
            self.grouped = False


def start(device: str = "auto") -> World:
    """This process's World: alone unless torchrun's variables are set; then the process
    group is formed (gloo, or NCCL on cuda:LOCAL_RANK) within the timeout, and torch uses
    this machine's cores divided among its local ranks (or $MNIST_CNN_THREADS)."""
    target = resolve_device(device)  # the one place training turns --device into a device
    if not launched():
        return World(device=target)
    rank, size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank, local_size = _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1)
    if not 0 <= rank < size:
        raise DistributedError(f"RANK={rank} is not in 0..WORLD_SIZE-1 ({size - 1})")
    if target.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(f"local rank {local_rank} needs GPU {local_rank}, but this machine "
                                   f"has {count}: start one process per GPU (--nproc-per-node {count})")
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    elif target.type != "cpu":
        raise DistributedError(f"--device {device}: several processes run on cpu (gloo) or cuda (NCCL) only")
    torch.set_num_threads(threads_per_process(local_size))
    world = World(rank, local_rank, size, local_size, target)
    _init_process_group(world)
    return world


def _init_process_group(world: World) -> None:
    import torch.distributed as dist

    seconds = timeout_seconds()
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    try:
        if backend == "nccl":
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds), device_id=world.device)
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=seconds))
    except (RuntimeError, ValueError) as error:  # DistStoreError, DistNetworkError, bad env
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(
            f"rank {world.rank} of {world.size}: could not form the process group at {where} "
            f"within {seconds:g} s ({_first_line(error)}); start every rank, check the address "
            f"(GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), or raise {TIMEOUT_ENV}") from None
    world.grouped = True


@contextlib.contextmanager
def session(device: str = "auto") -> Iterator[World]:
    """start(device) for the length of a training run; a lost peer becomes one line. The
    body should return from a function of its own, so that the training state (and its
    DistributedDataParallel wrapper) is gone before the group is left (World.close)."""
    world = start(device)
    try:
        yield world
    except Exception as error:
        if world.size == 1 or not is_communication_error(error):
            if world.size > 1:  # the traceback's frames hold the wrapper: let close() free it
                traceback.clear_frames(error.__traceback__)
            world.close()
            raise
        world.close(peers_lost=True)
        raise DistributedError(
            f"rank {world.rank}: lost contact with the other processes ({_first_line(error)}); "
            "the run folder keeps its last checkpoint: continue with --resume RUN_DIR") from None
    except BaseException:  # KeyboardInterrupt, SystemExit
        world.close(peers_lost=True)
        raise
    world.close(finished=True)


# ---------------------------------------------------------------- mnist-cnn train --nproc


def loopback_interface() -> str | None:
    """This machine's loopback interface name (lo, lo0), for traffic that stays on it."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    return next((name for name in names if name.startswith("lo")), None)


def _describe_failure(rank: int, failure: Any) -> str:
    code = failure.exitcode
    how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with status {code}"
    return f"rank {rank} (pid {failure.pid}) {how}"


def launch(nproc: int, argv: list[str]) -> int:
    """`mnist-cnn train --nproc P ARGS`: `torchrun --standalone --nproc-per-node P -m
    mnist_cnn ARGS` on this machine, through torch.distributed.run itself; returns the
    exit status (0, 130 after Ctrl-C with a checkpoint saved, 2 after a user error)."""
    if launched():
        raise DistributedError("--nproc starts torchrun itself; under torchrun leave it out")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # Defaults for the workers: their share of the cores (torchrun would say 1 and warn),
    # and gloo on the loopback interface, whatever the host name resolves to.
    defaults = {"OMP_NUM_THREADS": str(max(1, usable_cores() // nproc)),
                "GLOO_SOCKET_IFNAME": loopback_interface()}
    added = [name for name, value in defaults.items() if value and name not in os.environ]
    os.environ.update({name: defaults[name] for name in added})  # type: ignore[misc]
    # The launcher installs its own signal handlers (to pass Ctrl-C on to the workers);
    # put ours back afterwards, for callers that live on (tests, notebooks).
    handled = [getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
               if hasattr(signal, name)]
    saved = {signum: signal.getsignal(signum) for signum in handled}
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "mnist_cnn", *argv])
    try:
        run(args)
    except SignalException:  # Ctrl-C or SIGTERM here: the launcher passed it on and waited
        return exits.INTERRUPTED
    except ChildFailedError as error:
        codes = {failure.exitcode for failure in error.failures.values()}
        if codes <= {exits.INTERRUPTED, -signal.SIGTERM, -signal.SIGINT}:
            return exits.INTERRUPTED  # stopped on request; rank 0 said where it saved
        if codes <= {exits.USAGE}:
            return exits.USAGE  # a user error each rank has explained
        rank, failure = error.get_first_failure()
        raise DistributedError(f"{_describe_failure(rank, failure)}; the others were stopped "
                               "(the run folder keeps its last checkpoint)") from None
    finally:
        for name in added:
            os.environ.pop(name, None)
        for signum, handler in saved.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread
                signal.signal(signum, handler)
    return exits.OK
