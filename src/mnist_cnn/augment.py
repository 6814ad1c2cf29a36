"""Augmentation on the device: random rotation, scale and shift of a whole batch in one
`affine_grid` + `grid_sample`, drawn from the global torch RNG (saved in every checkpoint,
so a resumed run draws the same transforms).

The integer `--shift` alone keeps its exact pixel-gather path (`random_shift`), so recipes
without rotation or scale (`--preset fast`) train bit-identically to before.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random whole-pixel (dx, dy) in [-max_shift, max_shift],
    filling with background (0). One gather for the whole batch; uses the global RNG."""
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), device=x.device)
    rows = offsets[0] + torch.arange(height, device=x.device)  # (n, height)
    cols = offsets[1] + torch.arange(width, device=x.device)  # (n, width)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def affine_matrices(angle: torch.Tensor, scale: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor,
                    *, size: int) -> torch.Tensor:
    """(N, 2, 3) matrices for `affine_grid` that turn each image by `angle` radians
    (clockwise as displayed, rows growing downwards), scale it by `scale` about its centre,
    then move it `dx` pixels right and `dy` pixels down.

    `affine_grid` maps each output position to the input position it samples, in coordinates
    where the image spans [-1, 1] (so one pixel is 2 / size): the inverse of the forward map
    p_out = scale * R(angle) p_in + d, i.e. p_in = R(-angle) (p_out - d) / scale.
    """
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    tx, ty = dx * (2.0 / size), dy * (2.0 / size)
    # R(-angle) / scale = [[cos, sin], [-sin, cos]]; translation = -(R(-angle) / scale) d
    row_x = torch.stack([cos, sin, -(cos * tx + sin * ty)], dim=1)
    row_y = torch.stack([-sin, cos, sin * tx - cos * ty], dim=1)
    return torch.stack([row_x, row_y], dim=1)


def apply_affine(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Resample each image of (N, 1, H, W) `x` through its matrix: bilinear, background (0)
    outside the image."""
    grid = F.affine_grid(matrices.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(x: torch.Tensor, *, rotate: float, scale: float, shift: float) -> torch.Tensor:
    """Each image turned by a uniform angle in [-rotate, rotate] degrees, scaled by a uniform
    factor in [1 - scale, 1 + scale] and shifted by uniform (dx, dy) in [-shift, shift]
    pixels (sub-pixel), all drawn at once from the global RNG."""
    u = torch.rand(4, x.shape[0], device=x.device) * 2 - 1  # (4, N) in [-1, 1)
    angle = u[0] * math.radians(rotate)
    return apply_affine(x, affine_matrices(angle, 1 + u[1] * scale, u[2] * shift, u[3] * shift,
                                           size=x.shape[-1]))


def random_flip(x: torch.Tensor, probability: float) -> torch.Tensor:
    """Each image mirrored left to right with `probability` (drawn from the global RNG)."""
    mirrored = torch.rand(x.shape[0], device=x.device) < probability
    return torch.where(mirrored[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, *, rotate: float = 0.0, scale: float = 0.0, shift: int = 0,
            flip: float = 0.0) -> torch.Tensor:
    """The training batch's augmentation as a recipe asks for it (x float in [0, 1])."""
    if rotate or scale:
        x = random_affine(x, rotate=rotate, scale=scale, shift=shift)
    elif shift:
        x = random_shift(x, shift)
    return random_flip(x, flip) if flip else x
