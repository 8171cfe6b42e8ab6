"""Batched Perlin-noise masks for anomaly synthesis (RealNet / DRAEM style), in torch.

A mask is drawn in four steps (RealNet's "Perlin masks", docs/methods.md#perlin-masks):

1. lattice: `2**k_y` cells down and `2**k_x` cells across, `k_y` and `k_x` drawn independently and
   uniformly from `[min_scale_exponent, max_scale_exponent]`, one random unit gradient per lattice
   point;
2. noise: 2-D gradient (Perlin) noise with the quintic fade `6t^5 - 15t^4 + 10t^3`, scaled by
   `sqrt(2)` so that its range is [-1, 1] (the convention of DRAEM's, RealNet's and anomalib's code,
   so that `threshold: 0.5` means what it means there);
3. rotation: the noise image is rotated about its centre by an angle drawn from
   `U(-max_rotation, max_rotation)` degrees (bilinear `grid_sample` on the rotated sampling grid,
   the grid `affine_grid` would give, built more cheaply; what comes from outside the image is 0,
   i.e. below any threshold in (0, 1)); `max_rotation: 0` skips this step;
4. mask: `noise > threshold`, intersected with the object's foreground when one is given.

Masks that come out empty are drawn again (only those, as a batch) up to `max_rounds` times.

How the noise is computed. Pixel `i` of an axis of length `L` with `r` lattice cells sits at
`i * r / L` lattice units (cell `floor(i * r / L)`, fraction `f`), so any `L` works, divisible by
`r` or not: no padding, no cropping. The noise is separable per term:

    n(y, x) = sqrt(2) * sum_{j,i} ( a_j(y) g^x_{j,i} b_i(x) + b_j(y) g^y_{j,i} a_i(x) )

with the interpolation weights `a` (`1 - fade(f)` on the cell's left corner, `fade(f)` on its right
one) and the weights times the displacement `b` (`(1 - fade(f)) f` and `fade(f) (f - 1)`), so a noise
image is matrix products, with no per-pixel gathers: `[a_y G_x | b_y G_y]` (H, 2px) times
`[b_x ; a_x]^T` (2px, W). Images with the same number of x cells share the right factor, so after
sorting a batch by it each group is one large GEMM written straight into the output. Masks of
different lattice sizes share one batch: each image's gradients sit in the top-left corner of a
`(P, P)` lattice, P = 2**max + 1, and the weights of the unused lattice points are zero.

All randomness comes from the `torch.Generator` passed in, on its device (CPU or GPU): the same
seed gives the same masks. Per round of `n` masks the draws are, in this order: the exponents
`(n, 2)` (k_y, k_x), the angles `(n,)`, the gradient angles `(n, P, P)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.errors import InputError
from pipelines.synthesis.config import PerlinConfig

# Work in pieces of about this many pixels (float32: 2 MB of noise, 1 MB + a 2 MB grid to rotate):
# buffers that stay in the allocator's reuse range, and rotation working sets near the L2 cache size,
# instead of tens of MB per batch freshly page-faulted in and streamed through memory.
NOISE_CHUNK_PIXELS = 2**19
ROTATE_CHUNK_PIXELS = 2**18


@dataclass(frozen=True)
class PerlinMasks:
    """What `draw_perlin_masks` drew, mask by mask (enough to recompute every mask)."""

    masks: Tensor  # (count, size, size) bool
    scale_exponents: Tensor  # (count, 2) int64: (k_y, k_x), the lattice has 2**k cells per axis
    angles: Tensor  # (count,) float32, degrees, counter-clockwise as displayed (row 0 at the top)
    gradients: Tensor  # (count, P, P, 2) float32 (x, y) unit vectors; mask i uses [:2**k_y + 1, :2**k_x + 1]
    rounds: Tensor  # (count,) int64: the round that produced the mask (1 = first draw)


# ---- noise -------------------------------------------------------------------------------------


def _fade(t: Tensor) -> Tensor:
    return t * t * t * (t * (t * 6 - 15) + 10)


def _axis_weights(cells: Tensor, length: int, lattice: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per image, the (length, lattice) weights of one axis: interpolation `a` and `a * displacement` `b`.

    cells: (n,) int64 lattice cells along the axis (each <= lattice - 1).
    """
    n = cells.shape[0]
    steps = torch.arange(length, device=cells.device, dtype=torch.int64)
    scaled = steps[None, :] * cells[:, None]  # (n, L): pixel position times L, exact in integers
    corner = torch.div(scaled, length, rounding_mode="floor")
    frac = (scaled - corner * length).to(dtype) / length
    fade = _fade(frac)
    index = torch.stack((corner, corner + 1), dim=-1)  # (n, L, 2)
    interp = torch.stack((1 - fade, fade), dim=-1)
    shifted = torch.stack(((1 - fade) * frac, fade * (frac - 1)), dim=-1)
    a = torch.zeros(n, length, lattice, dtype=dtype, device=cells.device).scatter_(2, index, interp)
    b = torch.zeros(n, length, lattice, dtype=dtype, device=cells.device).scatter_(2, index, shifted)
    return a, b


def _noise(gradients: Tensor, cells_y: Tensor, cells_x: Tensor, shape: tuple[int, int],
           out: Tensor | None = None) -> Tensor:
    """(n, Py, Px, 2) gradients, per-image lattice cells (n,) -> (n, H, W) noise in [-1, 1].

    `cells_x` must be non-decreasing: images with the same number of x cells then form one
    contiguous group that shares the x weights. Per group, after the small per-image products
    `m_x = a_y @ G_x` and `m_y = b_y @ G_y` (H x px each), the noise is one GEMM written straight
    into the group's slice of the output (`out` if given, contiguous (n, H, W)):

    - W divisible by the x cells (cell width w): the x weights repeat in every cell, so
      `noise[y, c w + t] = [m_x[y, c], m_x[y, c+1], m_y[y, c], m_y[y, c+1]] . K[:, t]` is a
      `(g H cells, 4) @ (4, w)` product;
    - otherwise `[m_x | m_y] @ [b_x ; a_x]^T`, a `(g H, 2 px) @ (2 px, W)` product.
    """
    height, width = shape
    count = gradients.shape[0]
    dtype, device = gradients.dtype, gradients.device
    noise = torch.empty(count, height, width, dtype=dtype, device=device) if out is None else out
    a_y, b_y = _axis_weights(cells_y, height, gradients.shape[1], dtype)
    values, counts = torch.unique_consecutive(cells_x, return_counts=True)
    if count and not bool((values[1:] > values[:-1]).all()):
        raise ValueError("cells_x must be sorted")
    root2 = math.sqrt(2.0)
    start = 0
    for cells, group in zip(values.tolist(), counts.tolist(), strict=True):
        stop = start + group
        px = cells + 1
        py = int(cells_y[start:stop].max()) + 1
        grads = gradients[start:stop, :py, :px]
        m_x = a_y[start:stop, :, :py] @ grads[..., 0]  # (g, H, px): the x components meet the x displacements
        m_y = b_y[start:stop, :, :py] @ grads[..., 1]
        target = noise[start:stop]
        if width % cells == 0:
            cell_width = width // cells
            frac = torch.arange(cell_width, device=device, dtype=dtype) / cell_width
            fade = _fade(frac)
            kernel = torch.stack(((1 - fade) * frac, fade * (frac - 1), 1 - fade, fade)).mul_(root2)  # (4, w)
            corners = torch.stack((m_x[..., :-1], m_x[..., 1:], m_y[..., :-1], m_y[..., 1:]), dim=-1)
            torch.mm(corners.view(-1, 4), kernel, out=target.view(-1, cell_width))
        else:
            a_x, b_x = _axis_weights(values.new_full((1,), cells), width, px, dtype)
            right = torch.cat((b_x[0].T, a_x[0].T), dim=0).mul_(root2)  # (2px, W)
            torch.mm(torch.cat((m_x, m_y), dim=2).view(-1, 2 * px), right, out=target.view(-1, width))
        start = stop
    return noise


def perlin_noise_from_gradients(gradients: Tensor, shape: tuple[int, int]) -> Tensor:
    """Perlin noise on a (H, W) pixel grid from given lattice gradients.

    gradients: (B, res_y + 1, res_x + 1, 2) floating, unit vectors `(g_x, g_y)` at the lattice
    points (row = y, column = x). Returns (B, H, W) of the gradients' dtype:
    `sqrt(2) * classic 2-D Perlin noise` (range [-1, 1]) with the quintic fade, pixel (i, j) at
    lattice position `(i * res_y / H, j * res_x / W)`; H need not be divisible by res_y (nor W by
    res_x). Pure and deterministic.
    """
    if gradients.ndim != 4 or gradients.shape[-1] != 2 or min(gradients.shape[1:3]) < 2:
        raise ValueError(f"gradients must be (B, res_y + 1, res_x + 1, 2) with res >= 1, got {tuple(gradients.shape)}")
    if not gradients.is_floating_point():
        raise ValueError(f"gradients must be floating point, got {gradients.dtype}")
    height, width = (int(v) for v in shape)
    if height < 1 or width < 1:
        raise ValueError(f"shape must be positive, got {shape}")
    count = gradients.shape[0]
    cells_y = torch.full((count,), gradients.shape[1] - 1, dtype=torch.int64, device=gradients.device)
    cells_x = torch.full((count,), gradients.shape[2] - 1, dtype=torch.int64, device=gradients.device)
    return _noise(gradients, cells_y, cells_x, (height, width))


def _rotate(noise: Tensor, angles: Tensor, planes: Tensor) -> Tensor:
    """`noise` (b, H, W) rotated by `angles` (b,) degrees; `planes` is a (2, >= b, H, W) work buffer.

    Output pixel p samples the input at R(-angle) p in pixel units, about the centre. In
    grid_sample's normalised coordinates (pixel centres, align_corners=False; x in units of W/2,
    y of H/2) the off-diagonal terms carry the aspect ratio. Each coordinate plane is an outer sum
    written into the buffer, viewed as the (b, H, W, 2) grid: affine_grid's batched
    (H*W, 3) @ (3, 2) products are several times slower on CPU.
    """
    count, height, width = noise.shape
    radians = torch.deg2rad(angles.to(device=noise.device, dtype=noise.dtype))
    cos, sin = torch.cos(radians)[:, None, None], torch.sin(radians)[:, None, None]
    xs = ((torch.arange(width, device=noise.device, dtype=noise.dtype) * 2 + 1) / width - 1)[None, None, :]
    ys = ((torch.arange(height, device=noise.device, dtype=noise.dtype) * 2 + 1) / height - 1)[None, :, None]
    grid = planes[:, :count]
    torch.add(cos * xs, (-(height / width) * sin) * ys, out=grid[0])
    torch.add(((width / height) * sin) * xs, cos * ys, out=grid[1])
    rotated = F.grid_sample(noise[:, None], grid.permute(1, 2, 3, 0), mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return rotated[:, 0]


def _chunk(height: int, width: int, pixels: int) -> int:
    return max(1, pixels // (height * width))


def rotate_noise(noise: Tensor, angles: Tensor) -> Tensor:
    """Rotate each (H, W) image of `noise` (B, H, W) about its centre by `angles` (B,) degrees,
    counter-clockwise as displayed (row 0 at the top); bilinear, 0 outside the image."""
    if noise.ndim != 3 or angles.shape != noise.shape[:1]:
        raise ValueError(f"noise must be (B, H, W) and angles (B,), got {tuple(noise.shape)}, {tuple(angles.shape)}")
    count, height, width = noise.shape
    chunk = min(count, _chunk(height, width, ROTATE_CHUNK_PIXELS))
    planes = noise.new_empty(2, chunk, height, width)
    rotated = torch.empty_like(noise)
    for start in range(0, count, chunk):
        rotated[start : start + chunk] = _rotate(noise[start : start + chunk], angles[start : start + chunk], planes)
    return rotated


# ---- masks -------------------------------------------------------------------------------------


def _draw_round(count: int, size: int, generator: torch.Generator, config: PerlinConfig,
                lattice: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    device = generator.device
    exponents = torch.randint(config.min_scale_exponent, config.max_scale_exponent + 1, (count, 2),
                              generator=generator, device=device)
    angles = (torch.rand(count, generator=generator, device=device) * 2 - 1) * config.max_rotation
    phase = torch.rand(count, lattice, lattice, generator=generator, device=device) * (2 * math.pi)
    gradients = torch.stack((torch.cos(phase), torch.sin(phase)), dim=-1)
    cells = torch.pow(2, exponents)
    used = int(cells.max()) + 1  # lattice points any image of this round uses
    # Computed in the order of the x cells (contiguous GEMM groups), chunk by chunk (noise,
    # rotation, threshold), the masks put back in draw order.
    order = torch.argsort(cells[:, 1], stable=True)
    sorted_gradients = gradients[order, :used, :used]
    cells_y, cells_x, sorted_angles = cells[order, 0], cells[order, 1], angles[order]
    masks = torch.empty(count, size, size, dtype=torch.bool, device=device)
    chunk = min(count, _chunk(size, size, NOISE_CHUNK_PIXELS))
    step = min(chunk, _chunk(size, size, ROTATE_CHUNK_PIXELS))
    planes = torch.empty(2, step, size, size, device=device) if config.max_rotation > 0 else None
    buffer = torch.empty(chunk, size, size, device=device)  # one noise buffer for all the chunks
    for start in range(0, count, chunk):
        part = slice(start, start + chunk)
        noise = _noise(sorted_gradients[part], cells_y[part], cells_x[part], (size, size),
                       out=buffer[: min(chunk, count - start)])
        if planes is None:
            masks[order[part]] = noise > config.threshold
            continue
        for first in range(start, min(start + chunk, count), step):
            piece = slice(first, min(first + step, start + chunk, count))
            rotated = _rotate(noise[piece.start - start : piece.stop - start], sorted_angles[piece], planes)
            masks[order[piece]] = rotated > config.threshold
    return masks, exponents, angles, gradients


def _nonempty(masks: Tensor) -> Tensor:
    """(n, H, W) bool -> (n,) bool: any pixel set. Reads the bytes 8 at a time where it can."""
    flat = masks.reshape(masks.shape[0], -1)
    if flat.shape[1] % 8 == 0 and flat.is_contiguous():
        return flat.view(torch.uint8).view(torch.int64).ne(0).any(1)
    return flat.any(1)


def draw_perlin_masks(count: int, size: int, generator: torch.Generator, config: PerlinConfig = PerlinConfig(),
                      foreground: Tensor | None = None, *, max_rounds: int = 100) -> PerlinMasks:
    """`count` Perlin masks of `size` x `size` on the generator's device, with what was drawn.

    foreground: optional (count, size, size) bool; each mask is intersected with its own. A mask
    that comes out empty is drawn again (all of them at once, as a batch) for up to `max_rounds`
    rounds; after that `InputError` (a foreground too small for the threshold). An all-False
    foreground is refused at once (`InputError`). The config is validated against `size`
    (`SpecError` naming `perlin.<field>`); stages validate their spec earlier, with its own path.
    """
    config.validate("perlin", image_size=size)
    if count < 0 or size < 1 or max_rounds < 1:
        raise ValueError(f"need count >= 0, size >= 1, max_rounds >= 1; got {count}, {size}, {max_rounds}")
    device = generator.device
    if foreground is not None:
        if foreground.shape != (count, size, size) or foreground.dtype != torch.bool:
            raise ValueError(f"foreground must be bool ({count}, {size}, {size}), "
                             f"got {foreground.dtype} {tuple(foreground.shape)}")
        foreground = foreground.to(device)
        blank = (~foreground.flatten(1).any(1)).nonzero().flatten()
        if blank.numel():
            raise InputError(f"perlin masks: the foreground of masks {blank[:10].tolist()} is empty")
    lattice = 2**config.max_scale_exponent + 1
    if count == 0:
        return PerlinMasks(masks=torch.zeros(0, size, size, dtype=torch.bool, device=device),
                           scale_exponents=torch.zeros(0, 2, dtype=torch.int64, device=device),
                           angles=torch.zeros(0, device=device),
                           gradients=torch.zeros(0, lattice, lattice, 2, device=device),
                           rounds=torch.zeros(0, dtype=torch.int64, device=device))
    # Round 1 draws all the masks; later rounds only the ones still empty.
    masks, exponents, angles, gradients = _draw_round(count, size, generator, config, lattice)
    if foreground is not None:
        masks &= foreground
    rounds = torch.ones(count, dtype=torch.int64, device=device)
    todo = (~_nonempty(masks)).nonzero().flatten()
    for round_number in range(2, max_rounds + 1):
        if todo.numel() == 0:
            break
        drawn, drawn_exponents, drawn_angles, drawn_gradients = _draw_round(
            todo.numel(), size, generator, config, lattice)
        if foreground is not None:
            drawn &= foreground[todo]
        masks[todo], exponents[todo], angles[todo], gradients[todo] = (
            drawn, drawn_exponents, drawn_angles, drawn_gradients)
        rounds[todo] = round_number
        todo = todo[~_nonempty(drawn)]
    if todo.numel():
        sizes = foreground[todo].flatten(1).sum(1).tolist() if foreground is not None else None
        raise InputError(
            f"perlin masks: {todo.numel()} of {count} masks still empty after {max_rounds} rounds "
            f"(masks {todo[:10].tolist()}; threshold {config.threshold}"
            + (f"; their foreground has {sizes[:10]} pixels: too small?)" if sizes is not None else ")"))
    return PerlinMasks(masks=masks, scale_exponents=exponents, angles=angles, gradients=gradients, rounds=rounds)


def perlin_masks(count: int, size: int, generator: torch.Generator, config: PerlinConfig = PerlinConfig(),
                 foreground: Tensor | None = None) -> Tensor:
    """(count, size, size) bool Perlin masks, none empty; see `draw_perlin_masks`."""
    return draw_perlin_masks(count, size, generator, config, foreground).masks
