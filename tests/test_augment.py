"""Augmentation on the device: geometry of the affine transform, bounds, seeded
determinism, the exact integer-shift path, and bit-identical resume with it on."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from mnist_cnn import train as train_module
from mnist_cnn.augment import affine_matrices, apply_affine, augment, random_affine, random_shift
from mnist_cnn.config import TrainConfig
from mnist_cnn.data import hold_out, load_dataset
from mnist_cnn.train import resume, train


def dot(row: int, col: int, n: int = 1) -> torch.Tensor:
    x = torch.zeros(n, 1, 28, 28)
    x[:, 0, row, col] = 1.0
    return x


def centre_of_mass(x: torch.Tensor) -> tuple[float, float]:
    image = x[0, 0]
    total = image.sum()
    rows = (image.sum(dim=1) * torch.arange(28.0)).sum() / total
    cols = (image.sum(dim=0) * torch.arange(28.0)).sum() / total
    return float(rows), float(cols)


def one(value: float) -> torch.Tensor:
    return torch.tensor([value])


def transform(x, *, angle=0.0, scale=1.0, dx=0.0, dy=0.0):
    return apply_affine(x, affine_matrices(one(math.radians(angle)), one(scale), one(dx), one(dy), size=28))


def test_identity_matrix_leaves_the_image_unchanged():
    x = torch.rand(3, 1, 28, 28)
    same = apply_affine(x, affine_matrices(torch.zeros(3), torch.ones(3), torch.zeros(3), torch.zeros(3), size=28))
    assert torch.allclose(same, x, atol=1e-5)


def test_whole_pixel_shift_moves_a_dot_right_and_down():
    moved = transform(dot(10, 12), dx=3, dy=-2)  # 3 px right, 2 px up
    assert moved[0, 0, 8, 15] == pytest.approx(1.0, abs=1e-5)
    assert moved.sum() == pytest.approx(1.0, abs=1e-5)


def test_quarter_turn_is_clockwise_about_the_centre():
    # The image centre is at (13.5, 13.5) in pixel indices; a dot 3.5 px right of it, on row
    # 13.5 (spread over rows 13 and 14), turns a quarter clockwise to 3.5 px below it.
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 13:15, 17] = 0.5
    turned = transform(x, angle=90)
    row, col = centre_of_mass(turned)
    assert (row, col) == (pytest.approx(17.0, abs=1e-4), pytest.approx(13.5, abs=1e-4))
    assert turned[0, 0, 17, 13] == pytest.approx(0.5, abs=1e-5)
    assert turned.sum() == pytest.approx(1.0, abs=1e-4)


def test_scale_moves_points_away_from_the_centre():
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 13:15, 19:21] = 0.25  # centre of mass (13.5, 19.5): 6 px right of the centre
    row, col = centre_of_mass(transform(x, scale=1.5))
    assert row == pytest.approx(13.5, abs=1e-4) and col == pytest.approx(13.5 + 9, abs=1e-3)


def test_random_affine_stays_within_its_bounds():
    torch.manual_seed(0)
    x = torch.zeros(256, 1, 28, 28)
    x[:, 0, 13:15, 13:15] = 0.25  # a 2x2 blob at the exact centre: rotation and scale keep it there
    out = random_affine(x, rotate=30, scale=0.2, shift=3)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    masses = out.sum(dim=(1, 2, 3))
    assert (masses > 0.5).all()  # nothing pushed out of the frame at these distances
    image = out[:, 0]
    rows = (image.sum(dim=2) * torch.arange(28.0)).sum(dim=1) / masses
    cols = (image.sum(dim=1) * torch.arange(28.0)).sum(dim=1) / masses
    assert ((rows - 13.5).abs() <= 3 + 1e-3).all() and ((cols - 13.5).abs() <= 3 + 1e-3).all()
    assert (rows - 13.5).abs().max() > 2  # the shifts do use their range
    # rotation and scale only: a centred blob's centre stays put
    still = random_affine(x, rotate=30, scale=0.2, shift=0)[:, 0]
    still_rows = (still.sum(dim=2) * torch.arange(28.0)).sum(dim=1) / still.sum(dim=(1, 2))
    assert torch.allclose(still_rows, torch.full((256,), 13.5), atol=1e-3)


def test_augmentation_is_seeded_by_the_global_rng():
    x = torch.rand(16, 1, 28, 28)
    torch.manual_seed(5)
    a = augment(x, rotate=15, scale=0.1, shift=2)
    torch.manual_seed(5)
    b = augment(x, rotate=15, scale=0.1, shift=2)
    torch.manual_seed(6)
    c = augment(x, rotate=15, scale=0.1, shift=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shift_alone_keeps_the_exact_integer_path():
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(3)
    expected = random_shift(x, 2)
    torch.manual_seed(3)
    assert torch.equal(augment(x, shift=2), expected)
    assert augment(x) is x


def test_validation_split_is_a_pure_function_of_the_seed(small_data):
    data = load_dataset("custom", small_data, splits=("train",))["train"]
    rest, held = hold_out(data, 300, seed=1)
    rest_again, held_again = hold_out(data, 300, seed=1)
    _, other = hold_out(data, 300, seed=2)
    assert len(rest) == 2700 and len(held) == 300
    assert torch.equal(held.images, held_again.images) and torch.equal(rest.labels, rest_again.labels)
    assert not torch.equal(held.images, other.images)
    # disjoint and complete: every training image is in exactly one part
    key = lambda split: {bytes(image.numpy().tobytes()) for image in split.images}  # noqa: E731
    assert not key(rest) & key(held)
    assert len(key(rest) | key(held)) == len(key(data))


def test_resume_mid_epoch_with_augmentation_and_validation_is_bit_identical(tmp_path, small_data, monkeypatch):
    config = TrainConfig(dataset="custom", model="seed", epochs=2, batch_size=256, lr=3e-3, loss="ce",
                         schedule="onecycle", rotate=12, scale=0.1, shift=2, val_size=400, seed=4)
    quiet = dict(data_dir=str(small_data), progress=False, log=lambda message: None)
    whole = train(config, run_dir=tmp_path / "whole", **quiet)
    records = [json.loads(line) for line in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_total"] for r in records] == [400, 400]
    assert all(0 < r["val_accuracy"] <= 1 and r["val_loss"] > 0 for r in records)
    assert records[-1]["val_correct"] == round(records[-1]["val_accuracy"] * 400)

    calls = {"n": 0}
    real_augment = train_module.augment

    def interrupting(x, **kwargs):
        calls["n"] += 1
        if calls["n"] == 13:  # epoch 2, step 2 (11 steps per epoch): Ctrl-C mid-epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_augment(x, **kwargs)

    monkeypatch.setattr(train_module, "augment", interrupting)
    stopped = train(config, run_dir=tmp_path / "split", **quiet)
    assert not stopped.completed
    monkeypatch.setattr(train_module, "augment", real_augment)
    resumed = resume(tmp_path / "split", **quiet)
    assert resumed.completed
    a, b = load_file(str(whole.run_dir / "model.safetensors")), load_file(str(resumed.run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    split_records = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_correct"] for r in split_records] == [r["val_correct"] for r in records]


def test_flip_mirrors_each_image_with_the_given_probability():
    x = torch.rand(400, 1, 28, 28)
    assert torch.equal(augment(x, flip=1.0), x.flip(-1))
    assert torch.equal(augment(x, flip=0.0), x)
    torch.manual_seed(0)
    out = augment(x, flip=0.5)
    mirrored = torch.tensor([torch.equal(o, m) for o, m in zip(out, x.flip(-1))])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert torch.all(mirrored ^ kept)  # each image one or the other
    assert 150 < int(mirrored.sum()) < 250
    torch.manual_seed(0)
    assert torch.equal(augment(x, flip=0.5), out)  # drawn from the global RNG: a resume repeats it
