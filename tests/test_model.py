"""The model is the tutorial's, layer for layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mnist_cnn import MnistCnnError
from mnist_cnn.model import SeedCNN, build_model, count_parameters


def test_output_shapes_per_layer_match_the_tutorials_table():
    model = build_model("seed").eval()
    x = torch.zeros(3, 1, 28, 28)
    shapes = []
    for name in ("conv1", "pool1", "conv2", "pool2"):
        x = getattr(model, name)(x)
        shapes.append((name, tuple(x.shape)))
    x = x.flatten(1)
    shapes.append(("flatten", tuple(x.shape)))
    x = model.lin1(x)
    shapes.append(("lin1", tuple(x.shape)))
    shapes.append(("lin2", tuple(model.lin2(x).shape)))
    assert shapes == [("conv1", (3, 6, 24, 24)), ("pool1", (3, 6, 12, 12)),
                      ("conv2", (3, 16, 8, 8)), ("pool2", (3, 16, 4, 4)),
                      ("flatten", (3, 256)), ("lin1", (3, 96)), ("lin2", (3, 10))]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_layers_and_parameter_count():
    model = SeedCNN()
    assert (model.conv1.kernel_size, model.conv1.in_channels, model.conv1.out_channels) == ((5, 5), 1, 6)
    assert (model.conv2.kernel_size, model.conv2.in_channels, model.conv2.out_channels) == ((5, 5), 6, 16)
    assert model.drop1.p == 0.2
    # 6*25+6 + 16*150+16 + 256*96+96 + 96*10+10
    assert count_parameters(model) == 156 + 2416 + 24672 + 970


def seed_forward(model: SeedCNN, x: torch.Tensor) -> torch.Tensor:
    """The tutorial's forward order (ReLU then pool), without its final softmax."""
    x = model.pool1(F.relu(model.conv1(x)))
    x = model.pool2(F.relu(model.conv2(x)))
    x = x.view(x.shape[0], -1)
    x = F.relu(model.drop1(model.lin1(x)))
    return model.lin2(x)


def test_pooling_before_relu_gives_the_tutorials_outputs_and_gradients():
    torch.manual_seed(0)
    model = SeedCNN().eval()
    x = torch.rand(16, 1, 28, 28)
    ours, theirs = model(x), seed_forward(model, x)
    assert torch.equal(ours, theirs)
    grads = []
    for forward in (model, lambda inp: seed_forward(model, inp)):
        model.zero_grad()
        forward(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for ours_grad, theirs_grad in zip(*grads):
        torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-5, atol=1e-6)


def test_unknown_model_name_is_a_user_error():
    with pytest.raises(MnistCnnError, match="unknown model 'resnet'; choose one of: seed"):
        build_model("resnet")
