"""Anomaly sources (texture, CutPaste, Poisson/NSA), checked against hand-derived values and an
independent dense solve of the discrete Poisson problem, not against their own output."""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
from numpy.lib.stride_tricks import sliding_window_view

from pipelines.synthesis.sources import cutpaste_source, poisson_patch_source, poisson_source, texture_source


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _noise(height: int, width: int, seed: int = 0, low: int = 0, high: int = 256) -> np.ndarray:
    return _rng(seed).integers(low, high, (height, width, 3), dtype=np.uint8)


def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations / flips of an (h, w, ...) array."""
    out = []
    for k in range(4):
        rotated = np.rot90(array, k)
        out += [rotated, rotated[:, ::-1]]
    return out


# --------------------------------------------------------------------------------------------------
# texture_source


def test_texture_shape_dtype_and_seed():
    brick = skimage.data.brick()  # grayscale (512, 512)
    out = texture_source(brick, (48, 64), _rng(1))
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    # grayscale in: three equal channels out
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert np.array_equal(out, texture_source(brick, (48, 64), _rng(1)))
    assert not np.array_equal(out, texture_source(brick, (48, 64), _rng(2)))


def test_texture_colour_texture_keeps_colour():
    coffee = skimage.data.coffee()  # (400, 600, 3) colour
    before = coffee.copy()
    out = texture_source(coffee, (32, 32), _rng(0))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(coffee, before)  # input untouched
    assert not (out[..., 0] == out[..., 2]).all()


def test_texture_full_crop_same_size_is_a_dihedral_transform():
    """With min_crop_fraction=1 and the texture's own (square) size, no resampling happens: the
    output is exactly one of the 8 rotations/flips of the texture, and all 8 occur across seeds."""
    texture = _noise(16, 16, seed=3)
    candidates = _dihedral(texture)
    seen = set()
    for seed in range(60):
        out = texture_source(texture, (16, 16), _rng(seed), min_crop_fraction=1.0)
        matches = [i for i, c in enumerate(candidates) if np.array_equal(out, c)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == set(range(8))


def test_texture_crop_of_rectangular_texture_is_a_window():
    """A 20x32 texture with min_crop_fraction=1 gives a 20x20 window (rotated/flipped)."""
    texture = _noise(20, 32, seed=4)
    out = texture_source(texture, (20, 20), _rng(5), min_crop_fraction=1.0)
    windows = sliding_window_view(texture, (20, 20, 3))[:, :, 0]  # (1, 13, 20, 20, 3)
    found = any(
        np.array_equal(candidate, windows[0, x]) for x in range(windows.shape[1]) for candidate in _dihedral(out)
    )
    assert found


def test_texture_two_colours_interpolate_between_them():
    """A texture of two colours c0, c1: bilinear antialiased resizing has non-negative weights
    summing to 1, so each output pixel is c0 + t (c1 - c0) with one t in [0, 1] for all channels,
    up to rounding: PIL resizes in two separable passes, each rounding to uint8, so a channel is off
    by at most 0.5 + 0.5 = 1 grey level, i.e. t_c by at most 1 / |c1_c - c0_c|."""
    c0 = np.array([10, 200, 40], dtype=np.float64)
    c1 = np.array([240, 30, 190], dtype=np.float64)
    pattern = (np.indices((37, 53)).sum(axis=0) // 3) % 2 == 0  # stripes
    texture = np.where(pattern[..., None], c0, c1).astype(np.uint8)
    for seed, size in [(0, (64, 64)), (1, (20, 50)), (2, (97, 31))]:
        out = texture_source(texture, size, _rng(seed)).astype(np.float64)
        t = (out - c0) / (c1 - c0)  # per channel
        # values stay between the two colours exactly (non-negative weights, no overshoot)
        assert (out >= np.minimum(c0, c1)).all() and (out <= np.maximum(c0, c1)).all()
        per_channel = 1.0 / np.abs(c1 - c0)
        spread = np.sort(per_channel)[-2:].sum() + 1e-9  # two channels off in opposite directions
        assert (t.max(axis=2) - t.min(axis=2)).max() <= spread
        assert 0 < t.mean() < 1  # both colours present


def test_texture_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        texture_source(np.zeros((8, 8), np.float32), (4, 4), _rng(0))
    with pytest.raises(ValueError, match="min_crop_fraction"):
        texture_source(np.zeros((8, 8), np.uint8), (4, 4), _rng(0), min_crop_fraction=0.0)


# --------------------------------------------------------------------------------------------------
# cutpaste_source


def _rect_area_bounds(height, width, area_fraction, aspect_ratio):
    """Bounds on h * w when h = round(sqrt(A a)), w = round(sqrt(A / a)), A in area_fraction * H W:
    each side is off by at most 0.5, and sqrt(A a) + sqrt(A / a) is largest at the extreme aspect."""
    a = max(aspect_ratio[1], 1 / aspect_ratio[0])
    spread = math.sqrt(a) + 1 / math.sqrt(a)
    lo_area = area_fraction[0] * height * width
    hi_area = area_fraction[1] * height * width
    return lo_area - 0.5 * math.sqrt(lo_area) * spread + 0.25, hi_area + 0.5 * math.sqrt(hi_area) * spread + 0.25


def test_cutpaste_outside_mask_unchanged_and_mask_nonempty():
    image = _noise(64, 64, seed=0)
    before = image.copy()
    for seed in range(40):
        source, mask = cutpaste_source(image, _rng(seed))
        assert source.shape == image.shape and source.dtype == np.uint8
        assert mask.shape == (64, 64) and mask.dtype == bool and mask.any()
        assert np.array_equal(source[~mask], image[~mask])
    assert np.array_equal(image, before)


def test_cutpaste_area_within_configured_range():
    """Unrotated: the mask is an h x w rectangle with h * w inside the rounding bounds of the
    configured area. Rotated (same seed, hence same h, w): the footprint counts the grid points
    inside the rotated rectangle of pixel centres, whose area is (h - 1)(w - 1); the count differs
    from that area by at most half the patch perimeter, h + w (tolerance documented here)."""
    height, width = 96, 80
    area_fraction, aspect_ratio = (0.02, 0.15), (0.3, 3.3)
    low, high = _rect_area_bounds(height, width, area_fraction, aspect_ratio)
    image = _noise(height, width, seed=1)
    non_rectangular = 0
    for seed in range(60):
        _, flat = cutpaste_source(image, _rng(seed), area_fraction, aspect_ratio, max_rotation=0.0)
        ys, xs = np.nonzero(flat)
        h, w = np.ptp(ys) + 1, np.ptp(xs) + 1
        assert flat.sum() == h * w  # a full rectangle
        assert low <= h * w <= high
        _, rotated = cutpaste_source(image, _rng(seed), area_fraction, aspect_ratio, max_rotation=45.0)
        assert rotated.any()
        assert abs(int(rotated.sum()) - (h - 1) * (w - 1)) <= h + w
        ys, xs = np.nonzero(rotated)
        non_rectangular += rotated.sum() < (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
    assert non_rectangular > 30  # rotation does change the footprint's shape


def test_cutpaste_without_jitter_or_rotation_pastes_an_exact_copy():
    image = _noise(48, 56, seed=2)  # noise: a block matches only where it was cut
    windows_cache = {}
    for seed in range(10):
        source, mask = cutpaste_source(image, _rng(seed), color_jitter=0.0, max_rotation=0.0)
        ys, xs = np.nonzero(mask)
        box = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
        pasted = source[box]
        h, w = pasted.shape[:2]
        if (h, w) not in windows_cache:
            windows_cache[(h, w)] = sliding_window_view(image, (h, w, 3))[:, :, 0]
        windows = windows_cache[(h, w)]
        hits = np.argwhere((windows == pasted).all(axis=(2, 3, 4)))
        assert len(hits) == 1, f"seed {seed}: pasted block found {len(hits)} times in the image"


def test_cutpaste_jitter_is_a_colour_transform_of_the_same_block():
    """Same seed draws the same geometry whatever the jitter; without clipping, brightness,
    contrast and saturation compose to an affine colour map y = A x + t, so a least-squares fit
    of the jittered block on the unjittered one leaves only rounding residuals."""
    image = _noise(64, 64, seed=3, low=70, high=186)  # mid-range: a 10% jitter never clips
    for seed in range(5):
        plain, mask = cutpaste_source(image, _rng(seed), color_jitter=0.0, max_rotation=0.0)
        jittered, mask_j = cutpaste_source(image, _rng(seed), color_jitter=0.1, max_rotation=0.0)
        assert np.array_equal(mask, mask_j)
        x = plain[mask].astype(np.float64)
        y = jittered[mask].astype(np.float64)
        assert not np.array_equal(x, y)
        design = np.hstack([x, np.ones((len(x), 1))])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        assert np.abs(design @ coef - y).max() <= 1.0


def test_cutpaste_rotated_values_come_from_the_image_range():
    image = _noise(64, 64, seed=4, low=50, high=201)
    source, mask = cutpaste_source(image, _rng(7), color_jitter=0.0, max_rotation=45.0)
    assert source[mask].min() >= 50 and source[mask].max() <= 200


def test_cutpaste_deterministic_and_grayscale():
    image = _noise(40, 40, seed=5)
    a = cutpaste_source(image, _rng(11))
    b = cutpaste_source(image, _rng(11))
    c = cutpaste_source(image, _rng(12))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not (np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1]))
    gray = image[..., 0].copy()
    source, mask = cutpaste_source(gray, _rng(3))
    assert source.shape == (40, 40, 3) and mask.any()
    assert (source[..., 0] == source[..., 1]).all() and (source[..., 1] == source[..., 2]).all()
    assert np.array_equal(source[~mask][:, 0], gray[~mask])


def test_cutpaste_rejects_bad_ranges():
    image = _noise(16, 16)
    with pytest.raises(ValueError, match="area_fraction"):
        cutpaste_source(image, _rng(0), area_fraction=(0.3, 0.1))
    with pytest.raises(ValueError, match="color_jitter"):
        cutpaste_source(image, _rng(0), color_jitter=1.5)


# --------------------------------------------------------------------------------------------------
# poisson_source


def _dense_poisson_reference(image, donor, mask):
    """The discrete Poisson problem written out pixel by pixel with a dense matrix: for each mask
    pixel p and each in-image 4-neighbour q, add (f_p - f_q) = (g_p - g_q); f_q is unknown when q is
    in the mask and image_q otherwise. Returns float64 (H, W, 3)."""
    image = image.astype(np.float64)
    donor = donor.astype(np.float64)
    height, width = mask.shape
    pixels = [(y, x) for y in range(height) for x in range(width) if mask[y, x]]
    number = {p: i for i, p in enumerate(pixels)}
    a = np.zeros((len(pixels), len(pixels)))
    b = np.zeros((len(pixels), 3))
    for i, (y, x) in enumerate(pixels):
        for qy, qx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if not (0 <= qy < height and 0 <= qx < width):
                continue
            a[i, i] += 1
            b[i] += donor[y, x] - donor[qy, qx]
            if (qy, qx) in number:
                a[i, number[(qy, qx)]] -= 1
            else:
                b[i] += image[qy, qx]
    f = np.linalg.solve(a, b)
    out = image.copy()
    for i, (y, x) in enumerate(pixels):
        out[y, x] = f[i]
    return out


def _blob_mask(height, width, cy, cx, ry, rx):
    yy, xx = np.indices((height, width))
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def test_poisson_donor_equal_to_image_gives_image():
    image = _noise(40, 40, seed=6)
    before = image.copy()
    for mask in (_blob_mask(40, 40, 20, 18, 9, 13), _blob_mask(40, 40, 3, 4, 8, 10)):  # 2nd touches border
        out = poisson_source(image, image, mask)
        assert np.array_equal(out, image)
    assert np.array_equal(image, before)


def test_poisson_constant_image_and_constant_donor():
    image = np.full((30, 30, 3), 77, np.uint8)
    donor = np.full((30, 30, 3), 201, np.uint8)
    mask = _blob_mask(30, 30, 15, 15, 8, 10)
    out = poisson_source(image, donor, mask)
    assert (out == 77).all()


def test_poisson_linear_ramp_donor_with_constant_boundary_is_constant():
    """The 5-point Laplacian of a linear ramp is zero, so the solution is harmonic with constant
    boundary values: the constant."""
    image = np.full((24, 24), 90, np.uint8)
    yy, xx = np.indices((24, 24))
    donor = (3 * xx + 2 * yy + 20).astype(np.uint8)
    mask = np.zeros((24, 24), bool)
    mask[5:19, 4:20] = True
    out = poisson_source(image, donor, mask)
    assert (out == 90).all()


@pytest.mark.parametrize("case", ["quadratic", "random", "border"])
def test_poisson_matches_dense_reference(case):
    height = width = 10
    mask = np.zeros((height, width), bool)
    if case == "border":
        mask[0:6, 0:6] = True  # touches two borders: those neighbours are absent
        mask[7, 7] = True  # an isolated pixel too
    else:
        mask[2:8, 2:8] = True  # the 6x6 mask
    yy, xx = np.indices((height, width))
    image = np.full((height, width, 3), 100, np.uint8)
    if case == "quadratic":
        image = np.repeat((100 + 2 * xx)[..., None], 3, axis=2).astype(np.uint8)
        donor = np.stack([0.5 * xx**2, 0.5 * yy**2 + 10, xx * yy], axis=2).astype(np.uint8)
    else:
        donor = _noise(height, width, seed=8, low=60, high=140)
        image = _noise(height, width, seed=9, low=80, high=160)
    reference = _dense_poisson_reference(image, donor, mask)
    assert reference.min() > 0 and reference.max() < 255  # no clipping in this case
    out = poisson_source(image, donor, mask)
    assert np.array_equal(out[~mask], image[~mask])
    np.testing.assert_allclose(out.astype(np.float64), reference, atol=0.5 + 1e-6)


def test_poisson_laplacian_matches_donor_inside_mask():
    """At every mask pixel the result's 5-point Laplacian equals the donor's up to rounding the
    result to integers: five values each off by at most 0.5, weighted 4, 1, 1, 1, 1 -> at most 4."""
    height = width = 64
    yy, xx = np.indices((height, width)).astype(np.float64)
    donor = np.repeat((128 + 40 * np.sin(xx / 5) * np.cos(yy / 7))[..., None], 3, axis=2)
    donor[..., 1] = 128 + 30 * np.cos(xx / 4 + yy / 9)
    donor = np.rint(donor).astype(np.uint8)
    image = np.rint(np.repeat((90 + 0.8 * xx + 0.5 * yy)[..., None], 3, axis=2)).astype(np.uint8)
    mask = _blob_mask(height, width, 30, 33, 16, 21)
    out = poisson_source(image, donor, mask)
    assert 0 < out[mask].min() and out[mask].max() < 255  # nothing clipped

    def laplacian(a):
        a = a.astype(np.float64)
        return 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]

    inner = mask[1:-1, 1:-1]
    difference = np.abs(laplacian(out) - laplacian(donor))[inner]
    assert difference.max() <= 4.0
    assert difference.mean() < 1.5
    assert not np.array_equal(out[mask], image[mask])  # something was cloned


def test_poisson_rejects_bad_masks():
    image = _noise(8, 8)
    with pytest.raises(ValueError, match="empty"):
        poisson_source(image, image, np.zeros((8, 8), bool))
    with pytest.raises(ValueError, match="whole image"):
        poisson_source(image, image, np.ones((8, 8), bool))
    with pytest.raises(ValueError, match="same"):
        poisson_source(image, image, np.ones((8, 9), bool))
    with pytest.raises(ValueError, match="bool"):
        poisson_source(image, image, np.ones((8, 8), np.uint8))


# --------------------------------------------------------------------------------------------------
# poisson_patch_source


@pytest.mark.parametrize("shape", ["rectangle", "ellipse"])
def test_poisson_patch_mask_inside_and_off_border(shape):
    image = _noise(48, 48, seed=10, low=60, high=200)
    donor = skimage.data.brick()  # other size, grayscale: resized and stacked
    before = image.copy()
    for seed in range(8):
        out, mask = poisson_patch_source(image, donor, _rng(seed), shape=shape)
        assert out.shape == image.shape and out.dtype == np.uint8
        assert mask.shape == (48, 48) and mask.any()
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert np.array_equal(out[~mask], image[~mask])
        assert not np.array_equal(out[mask], image[mask])
    assert np.array_equal(image, before)


def test_poisson_patch_deterministic_and_flat_case():
    image = _noise(32, 32, seed=12)
    donor = _noise(32, 32, seed=13)
    a = poisson_patch_source(image, donor, _rng(4))
    b = poisson_patch_source(image, donor, _rng(4))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # a flat donor has no gradients: cloning it into a flat image changes nothing
    flat = np.full((32, 32, 3), 140, np.uint8)
    out, mask = poisson_patch_source(flat, np.full((50, 40), 30, np.uint8), _rng(4))
    assert mask.any() and (out == 140).all()
