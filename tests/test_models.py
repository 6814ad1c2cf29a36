"""The registry's batch-norm model: shapes, train/eval behaviour, its summary."""

from __future__ import annotations

import torch

from conftest import cli
from mnist_cnn.explain import layer_rows, multiply_adds
from mnist_cnn.model import MODELS, BNCNN, build_model, count_parameters


def test_bn_is_registered_beside_seed_which_stays_the_default():
    assert list(MODELS)[:2] == ["seed", "bn"]
    assert isinstance(build_model("bn"), BNCNN)
    assert build_model().__class__.__name__ == "SeedCNN"


def test_bn_shapes_classes_and_size():
    model = build_model("bn", num_classes=7).eval()
    assert model(torch.zeros(5, 1, 28, 28)).shape == (5, 7)
    rows = {row.name: row for row in layer_rows(build_model("bn"))}
    assert rows["conv1"].output == (24, 24, 24) and rows["pool2"].output == (48, 6, 6)
    assert rows["conv3"].output == (64, 4, 4) and rows["flatten"].output == (1024,)
    assert rows["bn4"].kind == "BatchNorm1d" and rows["bn4"].channels == "128"
    # conv 24*24*24*25 + 12*12*48*24*9 + 4*4*64*48*9, linear 1024*128 + 128*10
    assert multiply_adds(build_model("bn")) == 345_600 + 1_492_992 + 442_368 + 131_072 + 1_280
    assert multiply_adds(build_model("seed")) == 86_400 + 153_600 + 24_576 + 960
    assert count_parameters(build_model("bn")) == 171_506


def test_bn_wide_is_bn_twice_as_wide():
    model = build_model("bn-wide", num_classes=10).eval()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    rows = {row.name: row for row in layer_rows(model)}
    assert rows["conv1"].output == (48, 24, 24) and rows["pool2"].output == (96, 6, 6)
    assert rows["conv3"].output == (128, 4, 4) and rows["flatten"].output == (2048,)
    # conv 24*24*48*25 + 12*12*96*48*9 + 4*4*128*96*9, linear 2048*256 + 256*10
    assert multiply_adds(model) == 691_200 + 5_971_968 + 1_769_472 + 524_288 + 2_560
    # weights 1*48*25 + 48*96*9 + 96*128*9 + 2048*256 + 256*10 + 10, batch norms 2*(48+96+128+256)
    assert count_parameters(model) == 1_200 + 41_472 + 110_592 + 524_288 + 2_570 + 1_056


def test_batch_norm_uses_batch_statistics_in_training_and_running_ones_in_eval():
    torch.manual_seed(0)
    model = build_model("bn")
    x = torch.rand(32, 1, 28, 28)
    model.train()
    model(x)
    assert model.bn1.num_batches_tracked == 1 and not torch.equal(model.bn1.running_mean, torch.zeros(24))
    model.eval()
    with torch.inference_mode():  # eval: each image's output does not depend on the others
        alone = model(x[:1])
        together = model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)


def test_summary_of_bn_shows_batch_norm_rows_and_multiply_adds():
    result = cli("summary", "--model", "bn")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "model 'bn'"
    rows = {line.split()[0]: line for line in lines[3:]}
    assert "BatchNorm2d" in rows["bn1"] and "(b, 24, 24, 24)" in rows["bn1"]
    assert rows["total"].split()[-1] == "171,506"
    assert lines[-1] == "multiply-adds per image: 2,413,312"
    assert cli("summary", "--list").stdout.split()[:2] == ["seed", "bn"]


def test_the_new_presets_are_valid_recipes_for_the_new_model():
    from mnist_cnn.config import resolve_train_config, validate_train_config

    best = resolve_train_config("best", {"seed": 2})
    validate_train_config(best)
    assert (best.model, best.val_size, best.seed, best.preset) == ("bn-wide", 5000, 2, "best")
    assert best.rotate > 0 and best.scale > 0 and best.shift > 0
    fashion = resolve_train_config("best-fashion", {})
    validate_train_config(fashion)
    assert fashion.dataset == "fashion-mnist" and fashion.model == "bn-wide" and fashion.flip == 0.5
