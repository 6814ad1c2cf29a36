"""A faithful re-creation of the tutorial's own training pipeline, to measure against.

Everything the tutorial does per epoch, minus torchvision (which we do not install):
a per-sample Dataset that turns each uint8 image into a PIL image and then into a float
tensor (what `transforms.ToTensor()` does), `DataLoader(batch_size=128, shuffle=True)`,
a model whose forward ends in softmax, the loss `sum(p * log(p / q + 1e-15))`, `loss.item()`
every step, and a test pass with autograd left on.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


def to_tensor(picture: Image.Image) -> torch.Tensor:
    """What torchvision's `transforms.ToTensor()` does to a PIL image, step for step."""
    mode_to_nptype = {"I": np.int32, "I;16": np.int16, "F": np.float32}
    tensor = torch.from_numpy(np.array(picture, mode_to_nptype.get(picture.mode, np.uint8), copy=True))
    if picture.mode == "1":
        tensor = 255 * tensor
    tensor = tensor.view(picture.size[1], picture.size[0], len(picture.getbands()))
    tensor = tensor.permute((2, 0, 1)).contiguous()
    if isinstance(tensor, torch.ByteTensor):
        return tensor.to(dtype=torch.get_default_dtype()).div(255)
    return tensor


class PilDataset(torch.utils.data.Dataset):
    """What `torchvision.datasets.MNIST(transform=ToTensor())` does, sample by sample: the
    data held as torch tensors, each item indexed, made a PIL image, then a float tensor."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.data = torch.from_numpy(images)
        self.targets = torch.from_numpy(labels.astype(np.int64))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        image, target = self.data[index], int(self.targets[index])
        image = Image.fromarray(image.numpy(), mode="L")
        return to_tensor(image), target


class CNN_MNIST(nn.Module):  # noqa: N801 - the tutorial's name
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, 1)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5, 1)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.lin1 = nn.Linear(16 * 4 * 4, 96)
        self.drop1 = nn.Dropout(0.2)
        self.lin2 = nn.Linear(96, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.pool1(x)
        x = F.relu(self.conv2(x))
        x = self.pool2(x)
        x = x.view(x.shape[0], -1)
        x = F.relu(self.drop1(self.lin1(x)))
        return F.softmax(self.lin2(x))  # the tutorial leaves dim implicit (it resolves to 1)


def kl_div(prob1, prob2):
    return torch.sum(prob1 * torch.log(prob1 / prob2 + 1e-15))


def one_hot(labels: torch.Tensor, device: torch.device) -> torch.Tensor:
    label = torch.zeros((labels.shape[0], 10)).to(device)
    label[range(labels.shape[0]), labels] = 1
    return label


def make_loaders(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]):
    train_loader = torch.utils.data.DataLoader(PilDataset(*train), batch_size=128, shuffle=True,
                                               drop_last=False)
    test_loader = torch.utils.data.DataLoader(PilDataset(*test), batch_size=128, shuffle=False,
                                              drop_last=False)
    return train_loader, test_loader


def run_epoch(model, optimizer, train_loader, test_loader, device=torch.device("cpu")) -> dict:
    """One epoch exactly as the tutorial's loop runs it (training pass, then a test pass that
    only sums the loss, autograd on); returns its seconds."""
    started = time.perf_counter()
    model.train()
    train_loss = 0.0
    for x, y in train_loader:
        x, y = x.to(device), y.to(device)
        y_infer = model(x)
        loss = kl_div(one_hot(y, device), y_infer)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train_loss += loss.item()
    model.eval()
    test_loss = 0.0
    for x, y in test_loader:
        x, y = x.to(device), y.to(device)
        y_infer = model(x)
        loss = kl_div(one_hot(y, device), y_infer)
        test_loss += loss.item()
    return {"seconds": time.perf_counter() - started, "train_loss": train_loss / len(train_loader),
            "test_loss": test_loss / len(test_loader)}


def accuracy(model, test_loader, device=torch.device("cpu")) -> float:
    """The tutorial's final check, counted exactly (correct / total) instead of its mean of
    per-batch means; not part of the timed epoch, as in the tutorial."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in test_loader:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / len(test_loader.dataset)
