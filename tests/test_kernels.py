"""The custom training kernels against torch's reference ops: values, gradients, determinism,
the run's `kernels` setting (recorded, with MNIST_CNN_KERNELS as an override), and the
fallback when they cannot be built."""

from __future__ import annotations

import json
import os
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import missing
from mnist_cnn import kernels
from mnist_cnn.config import TrainConfig
from mnist_cnn.data import load_dataset, scale
from mnist_cnn.losses import kl_loss
from mnist_cnn.model import SeedCNN, build_model, to_device
from mnist_cnn.train import train


def kernels_expected() -> bool:
    """Where the kernels must build: x86-64 Linux with a C compiler (kernels.load_library)."""
    return (platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")
            and shutil.which(os.environ.get("CC", "cc")) is not None)


@pytest.fixture
def kernel_library():
    """The compiled kernels; where they should build but do not, a failure in CI (a skip
    would hide it) and a skip elsewhere; on other platforms, a skip."""
    if kernels.load_library() is None:
        reason = f"custom kernels unavailable: {kernels.failure()}"
        if kernels_expected():
            missing(reason)
        pytest.skip(reason)


needs_library = pytest.mark.usefixtures("kernel_library")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def block_inputs(block: str, x: torch.Tensor, seed: int = 0):
    spec = kernels.BLOCKS[block]
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(spec.in_channels, spec.out_channels, spec.kernel)
    conv = conv.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    return x, conv.weight, conv.bias


def run_block(block, x, weight, bias, grad, *, force, fused=False):
    out = kernels.conv_pool_relu(x, weight, bias, block=block, force=force, fused=fused,
                                 flat_output=block == "conv2")
    return (out, *torch.autograd.grad(out, (x, weight, bias), grad))


def assert_matches_reference(block, x, weight, bias, grad):
    reference = run_block(block, x, weight, bias, grad, force=False)
    for fused in (False, True):
        ours = run_block(block, x, weight, bias, grad, force=True, fused=fused)
        assert ours[0].grad_fn.name() == "ConvPoolReLUBackward"
        if fused:  # its own convolution: the same sums in another order
            torch.testing.assert_close(ours[0], reference[0], rtol=1e-5, atol=1e-5 * reference[0].abs().max().item())
        else:  # torch's convolution, then max and ReLU, which are exact
            assert torch.equal(ours[0], reference[0])
        for name, a, b in zip(("input", "weight", "bias"), ours[1:], reference[1:]):
            assert a.shape == b.shape
            assert relative_error(a, b) <= 1e-5, (name, fused)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def mnist_batch(count: int) -> torch.Tensor:
    images = load_dataset("mnist", splits=("test",))["test"].images[:count]
    return scale(images)


@needs_library
@pytest.mark.parametrize("batch", [1, 2, 7, 33])
@pytest.mark.parametrize("block", ["conv1", "conv2"])
def test_random_inputs_match_torch(block, batch):
    spec = kernels.BLOCKS[block]
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, spec.in_channels, spec.size, spec.size, generator=generator)
    grad = torch.randn(batch, spec.out_channels, spec.pooled, spec.pooled, generator=generator)
    assert_matches_reference(block, *block_inputs(block, x), grad)


@needs_library
@pytest.mark.parametrize("batch", [1, 65])
def test_mnist_inputs_match_torch(batch):
    # Real digits: the blank background gives conv outputs equal to the bias, so every pooling
    # window there is a tie, and the gradient must go where torch's max_pool2d sends it.
    x1, w1, b1 = block_inputs("conv1", mnist_batch(batch))
    generator = torch.Generator().manual_seed(1)
    grad1 = torch.randn(batch, 6, 12, 12, generator=generator)
    assert_matches_reference("conv1", x1, w1, b1, grad1)
    with torch.no_grad():
        hidden = kernels.reference(x1, w1, b1)
    x2, w2, b2 = block_inputs("conv2", hidden)
    grad2 = torch.randn(batch, 16, 4, 4, generator=generator)
    assert_matches_reference("conv2", x2, w2, b2, grad2)


@needs_library
def test_ties_and_closed_relu_follow_torch():
    # All-equal windows (gradient to the top-left) and all-negative ones (no gradient).
    x, weight, bias = block_inputs("conv1", torch.zeros(3, 1, 28, 28))
    with torch.no_grad():
        bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0, -1.0, 2.0]))
    grad = torch.ones(3, 6, 12, 12)
    assert_matches_reference("conv1", x, weight, bias, grad)
    _, _, grad_w, grad_b = run_block("conv1", x, weight, bias, grad, force=True, fused=True)
    assert grad_b.tolist() == [432.0, 0.0, 0.0, 432.0, 0.0, 432.0]  # 3 images x 144 windows, open only


@needs_library
def test_expanded_and_plain_gradients():
    x, weight, bias = block_inputs("conv2", torch.randn(5, 6, 12, 12))
    ours = torch.autograd.grad(kernels.conv_pool_relu(x, weight, bias, block="conv2", force=True).sum(), (x, weight))
    ref = torch.autograd.grad(kernels.reference(x, weight, bias).sum(), (x, weight))
    for a, b in zip(ours, ref):
        assert relative_error(a, b) <= 1e-5


@needs_library
def test_deterministic():
    x, weight, bias = block_inputs("conv1", mnist_batch(64))
    grad = torch.randn(64, 6, 12, 12, generator=torch.Generator().manual_seed(0))
    for fused in (False, True):
        first = run_block("conv1", x, weight, bias, grad, force=True, fused=fused)
        second = run_block("conv1", x, weight, bias, grad, force=True, fused=fused)
        for a, b in zip(first, second):
            assert torch.equal(a, b)
    x, weight, bias = block_inputs("conv2", torch.randn(64, 6, 12, 12))
    grad = torch.randn(64, 16, 4, 4)
    for fused in (False, True):
        first = run_block("conv2", x, weight, bias, grad, force=True, fused=fused)
        second = run_block("conv2", x, weight, bias, grad, force=True, fused=fused)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


def run_head(x, params, grad, *, force, seed=5, p=0.2):
    torch.manual_seed(seed)  # the dropout mask comes from the global generator in both
    out = kernels.head(x, *params, p=p, force=force)
    return (out, *torch.autograd.grad(out, (x, *params), grad))


def head_inputs(batch: int, classes: int = 10):
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 256, generator=generator).requires_grad_()
    lin1, lin2 = torch.nn.Linear(256, 96), torch.nn.Linear(96, classes)
    grad = torch.randn(batch, classes, generator=generator)
    return x, (lin1.weight, lin1.bias, lin2.weight, lin2.bias), grad


@needs_library
@pytest.mark.parametrize("batch", [1, 2, 7, 33, 128])
def test_head_matches_torch(batch):
    x, params, grad = head_inputs(batch)
    ours = run_head(x, params, grad, force=True)
    reference = run_head(x, params, grad, force=False)
    assert ours[0].grad_fn.name() == "HeadBackward"
    assert reference[0].grad_fn.name() == "AddmmBackward0"
    for name, a, b in zip(("logits", "input", "w1", "b1", "w2", "b2"), ours, reference):
        assert a.shape == b.shape
        assert relative_error(a, b) <= 1e-5, name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    # (values within 1e-5: the same dropout mask; another would differ by far more)


@needs_library
def test_head_is_deterministic_and_draws_like_dropout():
    x, params, grad = head_inputs(64)
    first, second = run_head(x, params, grad, force=True), run_head(x, params, grad, force=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    other = run_head(x, params, grad, force=True, seed=6)  # another mask, other values
    assert not torch.equal(first[0], other[0])
    # after the head, the global generator stands where torch's dropout leaves it
    torch.manual_seed(5)
    kernels.head(x, *params, p=0.2, force=True)
    after_ours = torch.rand(3)
    torch.manual_seed(5)
    kernels.head(x, *params, p=0.2, force=False)
    assert torch.equal(after_ours, torch.rand(3))


@needs_library
def test_head_falls_back_where_it_does_not_apply():
    x, params, grad = head_inputs(4)
    for p in (0.0, 1.0):  # no mask to draw: torch's ops (which draw none either)
        out = kernels.head(x, *params, p=p, force=True)
        assert out.grad_fn.name() == "AddmmBackward0"
    wide = torch.nn.Linear(256, 64)  # another hidden size
    out = kernels.head(x, wide.weight, wide.bias, torch.randn(10, 64), torch.randn(10), p=0.2, force=True)
    assert out.grad_fn.name() == "AddmmBackward0"
    x17, params17, _ = head_inputs(3, classes=17)  # more classes than the kernel's 16 lanes
    assert kernels.head(x17, *params17, p=0.2, force=True).grad_fn.name() == "AddmmBackward0"


def training_model(choice: str):
    return to_device(kernels.build_training_model("seed", num_classes=10, choice=choice), "cpu").train()


def seed_step(images, labels, choice: str):
    torch.manual_seed(0)
    model = training_model(choice)
    logits = model(images)
    kl_loss(logits, labels).backward()
    return logits, model


@needs_library
def test_seed_model_training_step_matches():
    images = mnist_batch(37)
    labels = torch.arange(37) % 10
    logits, ours = seed_step(images, labels, "custom")
    ref_logits, reference = seed_step(images, labels, "torch")
    assert isinstance(ours, kernels.KernelSeedCNN) and type(reference) is SeedCNN
    assert logits.grad_fn is not None
    # same dropout mask; conv1's fused convolution sums in another order
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5 * ref_logits.abs().max().item())
    for (name, a), b in zip(ours.named_parameters(), reference.parameters()):
        assert relative_error(a.grad, b.grad) <= 1e-5, name
    assert list(ours.state_dict()) == list(reference.state_dict())


def block_backends(model, images):
    """grad_fn names of the model's pooled feature maps (via the flatten's input)."""
    seen = []
    handle = model.flatten.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].grad_fn))
    try:
        model(images)
    finally:
        handle.remove()
    return seen[0].name() if seen[0] is not None else None


@needs_library
def test_setting_chooses_and_evaluation_uses_torch_ops(monkeypatch):
    images = mnist_batch(4)
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert block_backends(training_model("torch"), images) == "ReluBackward0"
    model = training_model("custom")
    assert block_backends(model, images) == "ConvPoolReLUBackward"
    assert kernels.kernel_blocks(model) == ["conv1", "conv2", "head"]
    monkeypatch.setenv(kernels.ENV, "custom")  # mnist_cnn.model is plain torch: no switch there
    assert block_backends(to_device(build_model("seed"), "cpu").train(), images) == "ReluBackward0"
    model.eval()  # evaluation and export run the plain ops, in any mode
    assert block_backends(model, images) == "ReluBackward0"
    with torch.inference_mode():
        assert block_backends(model, images) is None
    model.train()
    with torch.no_grad():
        assert block_backends(model, images) is None
    bn = kernels.build_training_model("bn", num_classes=10, choice="custom")
    assert type(bn).__name__ == "BNCNN" and kernels.kernel_blocks(bn) == []


@needs_library
@pytest.mark.parametrize("vendor, expected", [("GenuineIntel", True), ("AuthenticAMD", True),
                                              ("SomeOtherVendor", False)])
def test_auto_uses_the_kernels_on_both_measured_vendors(monkeypatch, vendor, expected):
    monkeypatch.setattr(kernels, "_cpu_vendor", lambda: vendor)
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert [kernels.wanted(block) for block in kernels.BLOCKS] == [expected, expected]
    monkeypatch.setenv(kernels.ENV, "torch")
    assert not any(kernels.wanted(block) for block in kernels.BLOCKS)


def test_the_cpu_is_read_once_per_process(monkeypatch):
    # wanted() runs on every training step: /proc/cpuinfo (~1 KB per core) is read once
    monkeypatch.delenv(kernels.ENV, raising=False)  # auto: the vendor decides
    kernels._cpu_signature()
    before = kernels._cpu_signature.cache_info()
    for _ in range(3):
        kernels.wanted("conv1")
    after = kernels._cpu_signature.cache_info()
    assert after.misses == before.misses and after.hits >= before.hits + 3


@needs_library
def test_inference_pooling_gives_torchs_values_bit_for_bit(monkeypatch):
    # evaluation (inference_mode / no_grad) pools with the kernels: exact, so the recorded
    # test accuracy is what `mnist-cnn evaluate` with torch's ops reports for the same weights
    images = torch.cat([mnist_batch(300), torch.rand(20, 1, 28, 28), torch.zeros(3, 1, 28, 28)])
    outputs = {}
    for choice in ("custom", "torch"):
        torch.manual_seed(0)  # the same weights: KernelSeedCNN and SeedCNN draw alike
        model = training_model(choice).eval()
        assert kernels.kernel_blocks(model) == (["conv1", "conv2", "head"] if choice == "custom" else [])
        with torch.inference_mode():
            outputs[choice] = model(images)
        with torch.no_grad():
            assert torch.equal(model(images), outputs[choice])
    assert torch.equal(outputs["custom"], outputs["torch"])
    y = torch.randn(5, 6, 24, 24)
    monkeypatch.setenv(kernels.ENV, "custom")
    with torch.no_grad():
        pooled = kernels.pool_relu(y, block="conv1")
        assert torch.equal(pooled, F.relu(F.max_pool2d(y, 2)))
        assert not pooled.is_contiguous()  # the kernel's channels-last output: it ran
    assert kernels.pool_relu(y.requires_grad_(), block="conv1").grad_fn.name() == "ReluBackward0"  # grad on: torch's


def test_training_threads_give_torchs_threads_to_the_kernels():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with kernels.training_threads():
            assert (torch.get_num_threads(), kernels.kernel_threads()) == (1, 2)
        assert (torch.get_num_threads(), kernels.kernel_threads()) == (2, 2)
        with kernels.training_threads(False):  # another model, or a GPU: nothing changes
            assert (torch.get_num_threads(), kernels.kernel_threads()) == (2, 2)
    finally:
        torch.set_num_threads(previous)


def test_the_seed_models_training_runs_torch_on_one_thread(tmp_path, small_data, monkeypatch):
    from mnist_cnn import train as training
    from mnist_cnn.config import TrainConfig

    seen = []
    real_loss, real_evaluate = training.batch_loss, training.evaluate

    def spy(*args, **kwargs):
        seen.append((torch.get_num_threads(), kernels.kernel_threads()))
        return real_loss(*args, **kwargs)

    def evaluate_spy(*args, **kwargs):  # the test passes too
        seen.append((torch.get_num_threads(), kernels.kernel_threads()))
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "batch_loss", spy)
    monkeypatch.setattr(training, "evaluate", evaluate_spy)
    monkeypatch.setenv(kernels.ENV, "custom")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for model in ("seed", "bn"):
            seen.clear()
            training.train(TrainConfig(dataset="custom", model=model, epochs=1), run_dir=tmp_path / model,
                           data_dir=str(small_data), progress=False, log=lambda m: None)
            assert set(seen) == ({(1, 2)} if model == "seed" else {(2, 2)}), model
            assert torch.get_num_threads() == 2  # restored after the run
    finally:
        torch.set_num_threads(previous)


def test_environment_overrides_the_setting_and_a_bad_value_is_one_line_error(monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    assert kernels.mode("custom") == "custom"
    monkeypatch.setenv(kernels.ENV, "torch")
    assert kernels.mode("custom") == "torch"
    monkeypatch.setenv(kernels.ENV, "fast")
    with pytest.raises(kernels.KernelError, match="MNIST_CNN_KERNELS='fast' is not one of: auto, torch, custom"):
        kernels.mode("auto")


def test_a_run_records_its_kernels_and_the_override(tmp_path, small_data, monkeypatch):
    monkeypatch.delenv(kernels.ENV, raising=False)
    config = TrainConfig(dataset="custom", epochs=1, kernels="torch")
    quiet = {"data_dir": str(small_data), "progress": False, "log": lambda message: None}
    run = train(config, run_dir=tmp_path / "torch", **quiet).run_dir
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["config"]["kernels"] == "torch" and recorded["kernel_blocks"] == []
    assert torch.load(run / "checkpoint.pt", weights_only=True)["config"]["kernels"] == "torch"
    assert json.loads((run / "model.json").read_text())["config"]["kernels"] == "torch"
    monkeypatch.setenv(kernels.ENV, "custom")  # the override is what ran, so it is what is recorded
    lines: list[str] = []
    run = train(config, run_dir=tmp_path / "custom", **{**quiet, "log": lines.append}).run_dir
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["config"]["kernels"] == "custom"
    assert recorded["kernel_blocks"] == (["conv1", "conv2", "head"] if kernels.load_library() else [])
    assert "MNIST_CNN_KERNELS=custom overrides the run's kernels setting (torch)" in lines


def test_failed_build_falls_back_to_torch(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_failure", None)
    monkeypatch.setenv("MNIST_CNN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert kernels.load_library() is None
    assert "building the kernels failed" in kernels.failure()
    assert not list(tmp_path.rglob("*.so"))  # no half-built library left in the cache
    x, weight, bias = block_inputs("conv1", torch.randn(2, 1, 28, 28))
    out = kernels.conv_pool_relu(x, weight, bias, block="conv1", force=True)
    assert out.grad_fn.name() == "ReluBackward0"
    assert torch.equal(out, kernels.reference(x, weight, bias))


@needs_library
def test_threads_and_fork():
    # The kernels' worker threads do not survive fork(): a child must start new ones, not hang.
    # (The child calls the C library only: torch's own OpenMP pool may hang after a fork.)
    import os

    x, weight, bias = block_inputs("conv2", torch.randn(8, 6, 12, 12))
    grad = torch.randn(8, 16, 4, 4)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = run_block("conv2", x, weight, bias, grad, force=True)
        y = torch.randn(4, 8, 8, 16)
        expected = F.max_pool2d(y.permute(0, 3, 1, 2), 2).relu().permute(0, 2, 3, 1).numpy()
        out = torch.zeros(4, 4, 4, 16)
        idx = torch.empty(4, 4, 4, 16, dtype=torch.uint8)
        lib = kernels.load_library()
        pid = os.fork()
        if pid == 0:  # leave without pytest's teardown either way
            lib.conv2_pool_relu_fwd(y.data_ptr(), out.data_ptr(), idx.data_ptr(), 4, 256, 64, 16, 1, 2)
            os._exit(0 if (out.numpy() == expected).all() else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        torch.set_num_threads(1)
        one = run_block("conv2", x, weight, bias, grad, force=True)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(one, two):  # weight gradients summed per fixed chunk: any thread count, same bits
        assert torch.equal(a, b)


@needs_library
def test_the_worker_pool_under_concurrent_callers_and_fork(monkeypatch):
    # The kernels' kept worker threads: two Python threads calling at once (one gets the pool,
    # the other starts threads of its own), thread counts that change between calls, and a
    # fork()ed child that must start workers afresh. Same bits everywhere (per-image outputs,
    # weight gradients summed per fixed chunk), no hang.
    import os
    import threading

    x, weight, bias = block_inputs("conv2", torch.randn(16, 6, 12, 12))
    grad = torch.randn(16, 16, 4, 4)
    monkeypatch.setattr(kernels, "_kernel_threads", 1)
    expected = run_block("conv2", x, weight, bias, grad, force=True, fused=True)
    failures: list[str] = []

    def calls(counts):
        for count in counts:
            kernels._kernel_threads = count  # a plain global: both threads set it, either value is fine
            got = run_block("conv2", x, weight, bias, grad, force=True, fused=True)
            if not all(torch.equal(a, b) for a, b in zip(got, expected)):
                failures.append(f"threads {count}: other values")

    workers = [threading.Thread(target=calls, args=([2, 3, 1, 2] * 10,), daemon=True) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers), "a kernel call hung"
    assert not failures, failures
    y = torch.randn(4, 8, 8, 16)
    expected_out = F.max_pool2d(y.permute(0, 3, 1, 2), 2).relu().permute(0, 2, 3, 1).numpy()
    out = torch.zeros(4, 4, 4, 16)
    idx = torch.empty(4, 4, 4, 16, dtype=torch.uint8)
    lib = kernels.load_library()
    pid = os.fork()
    if pid == 0:  # the child calls the C library only (torch's OpenMP pool may hang after fork)
        lib.conv2_pool_relu_fwd(y.data_ptr(), out.data_ptr(), idx.data_ptr(), 4, 256, 64, 16, 1, 2)
        os._exit(0 if (out.numpy() == expected_out).all() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


TRAIN_STEPS = """
import torch
from mnist_cnn import kernels
from mnist_cnn.losses import kl_loss
from mnist_cnn.model import to_device

torch.set_num_threads(2)
assert kernels.load_library() is not None, kernels.failure()
torch.manual_seed(0)
model = to_device(kernels.build_training_model("seed", num_classes=10, choice=kernels.mode()), "cpu").train()
assert kernels.kernel_blocks(model) == ["conv1", "conv2", "head"]
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
for _ in range(3):
    optimizer.zero_grad()
    loss = kl_loss(model(x), y)
    loss.backward()
    optimizer.step()
print(repr(loss.item()))
"""


@needs_library
def test_concurrent_trainings_finish_and_agree(tmp_path):
    # Two training processes at once, each building the kernels into the same empty cache and
    # training with two threads: both finish (no hang: a timeout fails the test) with the same
    # loss, and one whole library is left in the cache.
    import os
    import subprocess
    import sys

    env = {**os.environ, "MNIST_CNN_KERNELS": "custom", "MNIST_CNN_CACHE": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", TRAIN_STEPS], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    try:
        for run in runs:
            stdout, stderr = run.communicate(timeout=120)
            assert run.returncode == 0, stderr[-2000:]
            outputs.append(stdout.strip())
    finally:
        for run in runs:
            run.kill()
    assert outputs[0] == outputs[1] and float(outputs[0]) > 0
    assert len(list(tmp_path.rglob("*.so"))) == 1


@needs_library
def test_concurrent_threads_in_one_process():
    import threading

    images = mnist_batch(32)
    labels = torch.arange(32) % 10
    losses: dict[int, list[float]] = {}
    models = []
    for _ in range(2):  # built here: the threads share torch's random generator
        torch.manual_seed(0)
        models.append(training_model("custom"))
        models[-1].drop1.p = 0.0

    def train(worker: int) -> None:
        model = models[worker]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses[worker] = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = kl_loss(model(images), labels)
            loss.backward()
            optimizer.step()
            losses[worker].append(loss.item())

    workers = [threading.Thread(target=train, args=(i,), daemon=True) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not any(worker.is_alive() for worker in workers), "a training thread hung"
    assert losses[0] == losses[1]
