"""Where code runs: device choice and a record of the machine for every run folder."""

from __future__ import annotations

import os
import platform
import sys

import torch

from mnist_cnn import MnistCnnError, __version__


def resolve_device(name: str = "auto") -> torch.device:
    """auto → cuda, then mps, then cpu; an explicit device must exist."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not cuda:
            raise MnistCnnError(f"--device {name}: CUDA is not available on this machine; "
                                "use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        if not mps:
            raise MnistCnnError("--device mps: Apple MPS is not available; use --device cpu or auto")
        return torch.device("mps")
    raise MnistCnnError(f"unknown device {name!r}; choose auto, cpu, cuda or mps")


def cpu_model() -> str:
    """The CPU's model name, for the record of where a run ran."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    """Versions and hardware, saved beside every result so numbers carry their context."""
    info = {
        "mnist_cnn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
