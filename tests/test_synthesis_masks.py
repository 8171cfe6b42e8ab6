"""Anomaly-synthesis compute (pipelines.synthesis): Perlin masks, foreground masks, blending.

Each piece is checked against an independent reference: a naive per-pixel Perlin noise written
here, scikit-image's rotation and thresholds, and hand-computed blends.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.filters import threshold_otsu, threshold_triangle
from skimage.transform import rotate

from pipelines.errors import InputError, SpecError
from pipelines.synthesis.blend import blend, changed_pixels
from pipelines.synthesis.foreground import foreground_mask, otsu_threshold, triangle_threshold
from pipelines.synthesis.perlin import (
    PerlinConfig,
    draw_perlin_masks,
    perlin_masks,
    perlin_noise_from_gradients,
    rotate_noise,
)

# ---- Perlin noise ------------------------------------------------------------------------------


def naive_perlin(gradients: np.ndarray, height: int, width: int) -> np.ndarray:
    """Textbook 2-D Perlin noise, one pixel at a time, times sqrt(2) (range [-1, 1]).

    gradients: (res_y + 1, res_x + 1, 2) unit vectors (g_x, g_y); pixel (i, j) at lattice
    position (i * res_y / height, j * res_x / width).
    """
    res_y, res_x = gradients.shape[0] - 1, gradients.shape[1] - 1

    def fade(t: float) -> float:
        return 6 * t**5 - 15 * t**4 + 10 * t**3

    out = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            y, x = i * res_y / height, j * res_x / width
            y0, x0 = math.floor(y), math.floor(x)
            corners = {}
            for dy in (0, 1):
                for dx in (0, 1):
                    gx, gy = gradients[y0 + dy, x0 + dx]
                    corners[dy, dx] = gx * (x - x0 - dx) + gy * (y - y0 - dy)
            u, v = fade(x - x0), fade(y - y0)
            top = corners[0, 0] + u * (corners[0, 1] - corners[0, 0])
            bottom = corners[1, 0] + u * (corners[1, 1] - corners[1, 0])
            out[i, j] = math.sqrt(2) * (top + v * (bottom - top))
    return out


def random_gradients(count: int, rows: int, cols: int, seed: int) -> torch.Tensor:
    angles = torch.rand(count, rows, cols, generator=torch.Generator().manual_seed(seed)) * (2 * math.pi)
    return torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)


@pytest.mark.parametrize(("res_y", "res_x", "height", "width"),
                         [(2, 2, 16, 16), (4, 4, 16, 16), (2, 4, 16, 16), (4, 1, 16, 16), (3, 5, 16, 13), (1, 1, 7, 9)])
def test_perlin_noise_matches_naive_per_pixel_reference(res_y, res_x, height, width):
    gradients = random_gradients(3, res_y + 1, res_x + 1, seed=res_y * 10 + res_x)
    noise = perlin_noise_from_gradients(gradients, (height, width))
    assert noise.shape == (3, height, width) and noise.dtype == torch.float32
    for b in range(3):
        expected = naive_perlin(gradients[b].double().numpy(), height, width)
        np.testing.assert_allclose(noise[b].numpy(), expected, atol=2e-6)
    assert noise.abs().max() <= 1 + 1e-5


def test_perlin_noise_is_zero_on_lattice_points_and_float64_works():
    gradients = random_gradients(2, 5, 5, seed=3).double()
    noise = perlin_noise_from_gradients(gradients, (16, 16))
    assert noise.dtype == torch.float64
    assert torch.equal(noise[:, ::4, ::4], torch.zeros(2, 4, 4, dtype=torch.float64))


def test_perlin_noise_rejects_bad_shapes():
    with pytest.raises(ValueError, match="gradients"):
        perlin_noise_from_gradients(torch.zeros(1, 1, 3, 2), (8, 8))
    with pytest.raises(ValueError, match="shape"):
        perlin_noise_from_gradients(random_gradients(1, 3, 3, 0), (0, 8))


# ---- rotation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 90.0, -90.0, 37.5, -61.0, 180.0])
def test_rotate_noise_matches_skimage_rotate(angle):
    images = np.random.default_rng(1).normal(size=(2, 24, 24))
    rotated = rotate_noise(torch.from_numpy(images).float(), torch.full((2,), angle))
    for b in range(2):
        expected = rotate(images[b], angle, order=1, mode="constant", cval=0.0)  # counter-clockwise
        np.testing.assert_allclose(rotated[b].numpy(), expected, atol=1e-4)


def test_rotate_noise_by_90_degrees_is_rot90():
    images = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    rotated = rotate_noise(images, torch.tensor([90.0, -90.0]))
    torch.testing.assert_close(rotated[0], torch.rot90(images[0], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated[1], torch.rot90(images[1], -1), atol=1e-5, rtol=0)


# ---- masks -------------------------------------------------------------------------------------


def recompute_mask(draws, i: int, size: int, config: PerlinConfig) -> torch.Tensor:
    """Mask i from its recorded draws, through the public single-image pieces."""
    k_y, k_x = draws.scale_exponents[i].tolist()
    gradients = draws.gradients[i, : 2**k_y + 1, : 2**k_x + 1][None]
    noise = perlin_noise_from_gradients(gradients, (size, size))
    noise = rotate_noise(noise, draws.angles[i : i + 1])
    return (noise > config.threshold)[0]


def test_masks_are_reproducible_never_empty_and_seed_dependent():
    first = perlin_masks(32, 64, torch.Generator().manual_seed(7))
    again = perlin_masks(32, 64, torch.Generator().manual_seed(7))
    other = perlin_masks(32, 64, torch.Generator().manual_seed(8))
    assert first.shape == (32, 64, 64) and first.dtype == torch.bool
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.flatten(1).any(1).all() and other.flatten(1).any(1).all()


@pytest.mark.parametrize("size", [64, 48])  # 48: lattices of 32 and 16 cells do not divide it
def test_masks_are_what_their_recorded_draws_give(size):
    config = PerlinConfig()
    draws = draw_perlin_masks(48, size, torch.Generator().manual_seed(3), config)
    exponents = draws.scale_exponents
    assert exponents.min() >= config.min_scale_exponent and exponents.max() <= config.max_scale_exponent
    assert len({tuple(e) for e in exponents.tolist()}) > 5  # a mixed batch: the grouping is exercised
    assert draws.angles.abs().max() <= config.max_rotation
    assert (draws.rounds >= 1).all()
    gradient_norms = draws.gradients.norm(dim=-1)
    torch.testing.assert_close(gradient_norms, torch.ones_like(gradient_norms))
    for i in range(48):
        expected = recompute_mask(draws, i, size, config)
        # Same maths, another order of float sums: a pixel within ~1e-6 of the threshold may flip.
        assert (expected != draws.masks[i]).sum() <= 2, i


def test_redrawn_masks_record_their_final_draw():
    config = PerlinConfig(min_scale_exponent=0, max_scale_exponent=1, threshold=0.6, max_rotation=90.0)
    draws = draw_perlin_masks(64, 32, torch.Generator().manual_seed(0), config)
    redrawn = (draws.rounds > 1).nonzero().flatten().tolist()
    assert redrawn, "this configuration empties some first draws"
    assert draws.masks.flatten(1).any(1).all()
    for i in redrawn:
        assert (recompute_mask(draws, i, 32, config) != draws.masks[i]).sum() <= 2


def test_rotation_happens():
    size = 64
    still = draw_perlin_masks(64, size, torch.Generator().manual_seed(5), PerlinConfig(max_rotation=0.0))
    turned = draw_perlin_masks(64, size, torch.Generator().manual_seed(5), PerlinConfig(max_rotation=90.0))
    # Same generator stream: the same lattices were drawn in round 1, only the angles differ.
    both_first = (still.rounds == 1) & (turned.rounds == 1)
    assert torch.equal(still.scale_exponents[both_first], turned.scale_exponents[both_first])
    assert torch.equal(still.angles, torch.zeros(64))
    assert turned.angles.min() < -45 and turned.angles.max() > 45
    assert not torch.equal(still.masks, turned.masks)
    # Without rotation the mask is the thresholded noise itself.
    for i in range(8):
        k_y, k_x = still.scale_exponents[i].tolist()
        noise = perlin_noise_from_gradients(still.gradients[i, : 2**k_y + 1, : 2**k_x + 1][None], (size, size))
        assert ((noise[0] > 0.5) != still.masks[i]).sum() <= 2
    # Rotated by 10 degrees or more, the image corners come from outside the noise image (0): empty.
    corners = turned.masks[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    tilted = turned.angles.abs() >= 10
    assert tilted.sum() > 40 and not corners[tilted].any()
    assert still.masks[:, [0, -1, -1], [-1, 0, -1]].any()  # unrotated masks do reach the corners


def test_mask_fraction_is_plausible():
    masks = perlin_masks(256, 64, torch.Generator().manual_seed(11))
    fraction = masks.float().mean().item()
    # sqrt(2)-scaled Perlin noise above 0.5, rotation zeroing the corners: a few percent of the image.
    assert 0.02 < fraction < 0.15, fraction
    per_mask = masks.flatten(1).float().mean(1)
    assert per_mask.max() < 0.6 and per_mask.std() > 0.01


def test_foreground_restricts_masks_and_a_tiny_foreground_still_gets_pixels():
    size = 48
    foreground = torch.zeros(16, size, size, dtype=torch.bool)
    foreground[:, 10:40, 5:30] = True
    foreground[3] = False
    foreground[3, 20:22, 30:32] = True  # 2 x 2 pixels
    draws = draw_perlin_masks(16, size, torch.Generator().manual_seed(2), foreground=foreground)
    assert not (draws.masks & ~foreground).any()
    assert draws.masks.flatten(1).any(1).all()
    assert draws.masks[3].sum() >= 1


def test_a_foreground_noise_cannot_reach_is_a_clear_error_after_the_cap():
    foreground = torch.zeros(2, 32, 32, dtype=torch.bool)
    foreground[:, 0, 0] = True  # a lattice point: unrotated noise there is exactly 0
    with pytest.raises(InputError, match="still empty after 5 rounds"):
        draw_perlin_masks(2, 32, torch.Generator().manual_seed(0), PerlinConfig(max_rotation=0.0),
                          foreground=foreground, max_rounds=5)
    with pytest.raises(InputError, match="empty"):
        perlin_masks(2, 32, torch.Generator().manual_seed(0), foreground=torch.zeros(2, 32, 32, dtype=torch.bool))


def test_zero_masks_and_bad_arguments():
    assert perlin_masks(0, 32, torch.Generator()).shape == (0, 32, 32)
    with pytest.raises(ValueError, match="foreground"):
        perlin_masks(2, 32, torch.Generator(), foreground=torch.ones(2, 16, 16, dtype=torch.bool))
    with pytest.raises(SpecError, match="max_scale_exponent"):
        perlin_masks(1, 16, torch.Generator())  # 2**5 cells > 16 pixels


# ---- PerlinConfig.validate ---------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "field"), [
    ({"min_scale_exponent": -1}, "min_scale_exponent"),
    ({"max_scale_exponent": 11}, "max_scale_exponent"),
    ({"min_scale_exponent": 4, "max_scale_exponent": 3}, "min_scale_exponent"),
    ({"min_scale_exponent": 1.5}, "min_scale_exponent"),
    ({"max_scale_exponent": True}, "max_scale_exponent"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.0}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"max_rotation": -1.0}, "max_rotation"),
    ({"max_rotation": 181.0}, "max_rotation"),
    ({"max_rotation": "90"}, "max_rotation"),
])
def test_validate_names_the_bad_field(changes, field):
    with pytest.raises(SpecError) as caught:
        PerlinConfig(**changes).validate("steps[0].params.perlin")
    assert caught.value.field == f"steps[0].params.perlin.{field}"


def test_validate_accepts_defaults_and_checks_the_image_size():
    config = PerlinConfig()
    assert config.validate("perlin") is config
    assert config.validate("perlin", image_size=32) is config
    with pytest.raises(SpecError) as caught:
        config.validate("perlin", image_size=31)
    assert caught.value.field == "perlin.max_scale_exponent"


# ---- foreground --------------------------------------------------------------------------------


def bimodal_image(rng: np.random.Generator) -> np.ndarray:
    height, width = rng.integers(20, 80, size=2)
    fraction = rng.uniform(0.05, 0.95)
    means, spreads = rng.uniform(0, 255, size=2), rng.uniform(2, 40, size=2)
    which = rng.random((height, width)) < fraction
    values = np.where(which, rng.normal(means[0], spreads[0], (height, width)),
                      rng.normal(means[1], spreads[1], (height, width)))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def test_otsu_and_triangle_match_skimage_on_random_bimodal_images():
    rng = np.random.default_rng(0)
    for _ in range(60):
        image = bimodal_image(rng)
        histogram = np.bincount(image.ravel(), minlength=256)
        assert otsu_threshold(histogram) == threshold_otsu(image)
        assert triangle_threshold(histogram) == threshold_triangle(image)
        mask = foreground_mask(image, "otsu", closing=0, opening=0)
        expected = image > threshold_otsu(image)
        assert np.array_equal(mask, expected if expected.any() else np.ones_like(expected))
        mask = foreground_mask(image, "triangle", invert=True, closing=1, opening=0)
        expected = image <= threshold_triangle(image)
        assert np.array_equal(mask, expected if expected.any() else np.ones_like(expected))


def disc_image(size: int, radius: float, inside: int, outside: int, noise: float, seed: int):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.3) ** 2 <= radius**2
    values = np.where(disc, inside, outside) + np.random.default_rng(seed).normal(0, noise, disc.shape)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8), disc


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize("method", ["otsu", "triangle"])
def test_bright_disc_on_dark_background_gives_the_disc(method):
    gray, disc = disc_image(96, 25, inside=200, outside=40, noise=12, seed=1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    mask = foreground_mask(rgb, method)
    assert mask.shape == (96, 96) and mask.dtype == bool
    assert iou(mask, disc) > 0.97
    clean, disc = disc_image(96, 25, inside=200, outside=40, noise=0, seed=1)
    mask = foreground_mask(clean, method)
    assert not (mask & ~disc).any() and iou(mask, disc) > 0.98


def test_dark_object_with_invert_and_border_kept():
    gray, disc = disc_image(64, 18, inside=30, outside=220, noise=5, seed=2)
    assert iou(foreground_mask(gray, invert=True), disc) > 0.95
    half = np.zeros((40, 40), dtype=np.uint8)
    half[:, :17] = 250  # an object touching three image borders
    assert np.array_equal(foreground_mask(half, closing=5, opening=5), half > 0)


def test_blank_image_gives_all_true_and_speck_is_opened_away():
    assert foreground_mask(np.full((20, 30), 128, dtype=np.uint8)).all()
    speck = np.zeros((30, 30), dtype=np.uint8)
    speck[15, 15] = 255
    assert foreground_mask(speck).all()  # the opening removes the one pixel: empty -> all True
    with pytest.raises(ValueError):
        foreground_mask(speck.astype(np.float32))
    with pytest.raises(ValueError):
        foreground_mask(speck, method="mean")  # type: ignore[arg-type]


# ---- blend -------------------------------------------------------------------------------------


def blend_inputs(seed: int = 0, size: int = 24):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    source = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = rng.random((size, size)) < 0.3
    return image, mask, source


@pytest.mark.parametrize("opacity", [0.0, 0.2, 0.5, 0.73, 1.0])
def test_blend_leaves_outside_bit_identical(opacity):
    image, mask, source = blend_inputs()
    out = blend(image, mask, source, opacity)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out[~mask], image[~mask])
    assert not changed_pixels(image, out)[~mask].any()


def test_blend_extremes():
    image, mask, source = blend_inputs(1)
    assert np.array_equal(blend(image, mask, source, 1.0)[mask], source[mask])
    assert np.array_equal(blend(image, mask, source, 0.0), image)
    assert np.array_equal(blend(image, np.zeros_like(mask), source, 0.9), image)


def test_blend_hand_computed():
    image = np.array([[[100, 1, 3], [0, 10, 255]]], dtype=np.uint8)
    source = np.array([[[200, 2, 4], [1, 20, 0]]], dtype=np.uint8)
    mask = np.array([[True, True]])
    # 0.75 * 100 + 0.25 * 200 = 125; (1 + 2) / 2 = 1.5 -> 2 and (3 + 4) / 2 = 3.5 -> 4 (half to even);
    # 0.5 -> 0; 15 exact; 127.5 -> 128.
    assert blend(image, mask, source, 0.25)[0, 0, 0] == 125
    assert blend(image, mask, source, 0.5).tolist() == [[[150, 2, 4], [0, 15, 128]]]
    out = blend(image, np.array([[False, True]]), source, 0.5)
    assert out.tolist() == [[[100, 1, 3], [0, 15, 128]]]
    assert changed_pixels(image, out).tolist() == [[False, True]]


def test_blend_rejects_bad_inputs():
    image, mask, source = blend_inputs()
    with pytest.raises(ValueError, match="opacity"):
        blend(image, mask, source, 1.5)
    with pytest.raises(ValueError, match="mask"):
        blend(image, mask.astype(np.uint8), source, 0.5)
    with pytest.raises(ValueError, match="uint8"):
        blend(image.astype(np.float32), mask, source, 0.5)
    with pytest.raises(ValueError, match="shape"):
        changed_pixels(image, image[:-1])
