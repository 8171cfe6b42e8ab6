"""Anomaly sources: the image P that a mask M blends into a normal image I.

The blend itself (docs/methods.md#the-blend, `A = (1-M)*I + (1-delta)*(M*I) + delta*(M*P)`) lives
elsewhere; this module only produces P, and for the methods that define their own region, M too.

- `texture_source`: DRAEM / RealNet texture source, a random crop of a texture image (e.g. DTD).
- `cutpaste_source`: CutPaste (Li et al., CVPR 2021), a jittered, rotated patch of the same image.
- `poisson_source` / `poisson_patch_source`: NSA (Schlueter et al., ECCV 2022), a patch of another
  normal image cloned seamlessly by solving a Poisson equation (Perez et al. 2003).

All functions take and return uint8 (H, W, 3) images, accept (H, W) grayscale by stacking it to
three channels, never modify their inputs, and draw every random choice from the
`numpy.random.Generator` passed in, so a seed gives the same output. Pure numpy / PIL / scipy.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage, sparse
from scipy.sparse import linalg as sparse_linalg

# ITU-R 601 luma weights, as PIL and torchvision use for grayscale (contrast / saturation jitter).
_LUMA = np.array([0.299, 0.587, 0.114])

# A rotated-patch pixel counts as "from the patch" when its bilinear weights sum to 1 within this
# tolerance: all four input samples it interpolates lie inside the patch (none is fill).
_FOOTPRINT_TOL = 1e-6


# --------------------------------------------------------------------------------------------------
# input checks


def _as_rgb(image: np.ndarray, name: str) -> np.ndarray:
    """A uint8 (H, W, 3) view or stacked copy of `image`; grayscale (H, W) or (H, W, 1) is stacked."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8, got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"{name} must have shape (H, W) or (H, W, 3), got {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> tuple[float, float]:
    """A (lo, hi) pair with low < lo <= hi <= high."""
    try:
        lo, hi = (float(v) for v in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (lo, hi), got {bounds!r}") from None
    if not (low < lo <= hi <= high):
        raise ValueError(f"{name} must satisfy {low} < lo <= hi <= {high}, got {bounds!r}")
    return lo, hi


def _rectangle_size(
    height: int,
    width: int,
    rng: np.random.Generator,
    area_fraction: tuple[float, float],
    aspect_ratio: tuple[float, float],
    max_height: int,
    max_width: int,
) -> tuple[int, int]:
    """(h, w) of a rectangle: area ~ U(area_fraction) * H * W, h / w log-uniform in aspect_ratio.

    Clamped to [1, max_height] x [1, max_width]; clamping only matters for extreme aspect ratios on
    small images (then the area falls short of the requested fraction)."""
    area = rng.uniform(*area_fraction) * height * width
    aspect = math.exp(rng.uniform(math.log(aspect_ratio[0]), math.log(aspect_ratio[1])))
    patch_h = int(round(math.sqrt(area * aspect)))
    patch_w = int(round(math.sqrt(area / aspect)))
    return min(max(patch_h, 1), max_height), min(max(patch_w, 1), max_width)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize (PIL) of a uint8 (h, w, 3) array to `size` = (H, W)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return np.array(image, dtype=np.uint8)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (width, height), resample=Image.Resampling.BILINEAR
    )
    return np.array(resized, dtype=np.uint8)


# --------------------------------------------------------------------------------------------------
# texture source (DRAEM, RealNet)


def texture_source(
    texture: np.ndarray,
    size: tuple[int, int],
    rng: np.random.Generator,
    min_crop_fraction: float = 0.5,
) -> np.ndarray:
    """A random crop of `texture`, randomly rotated by a multiple of 90 degrees and flipped,
    resized to `size` = (H, W). Returns uint8 (H, W, 3).

    The crop is square, its side drawn uniformly (integers) from
    [ceil(min_crop_fraction * s), s] with s the texture's shorter side, at a uniform position.
    Square crops are resized to any `size`, so a non-square `size` stretches the texture (as DRAEM
    does when it resizes whole DTD images). Resizing is PIL's antialiased bilinear filter, whose
    weights are non-negative, so output values stay within the texture's value range.
    """
    tex = _as_rgb(texture, "texture")
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair (H, W), got {size!r}") from None
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    if not 0.0 < min_crop_fraction <= 1.0:
        raise ValueError(f"min_crop_fraction must be in (0, 1], got {min_crop_fraction}")

    tex_h, tex_w = tex.shape[:2]
    short = min(tex_h, tex_w)
    min_side = min(max(1, math.ceil(min_crop_fraction * short)), short)
    side = int(rng.integers(min_side, short + 1))
    y0 = int(rng.integers(0, tex_h - side + 1))
    x0 = int(rng.integers(0, tex_w - side + 1))
    quarter_turns = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))

    crop = np.rot90(tex[y0 : y0 + side, x0 : x0 + side], k=quarter_turns)
    if flip:
        crop = crop[:, ::-1]
    return _resize(crop, (height, width))


# --------------------------------------------------------------------------------------------------
# CutPaste


def _color_jitter(patch: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Brightness, contrast, saturation (in that order) by the given factors, torchvision-style:
    each is a blend `f * x + (1 - f) * reference`, clipped to [0, 255]. Factor 1 is the identity
    exactly. `patch` is float64 (h, w, 3)."""
    brightness, contrast, saturation = (float(f) for f in factors)
    out = np.clip(brightness * patch, 0.0, 255.0)  # reference: black
    mean = float((out @ _LUMA).mean())  # reference: mean gray level of the patch
    out = np.clip(contrast * out + (1.0 - contrast) * mean, 0.0, 255.0)
    gray = (out @ _LUMA)[:, :, None]  # reference: the patch in grayscale
    return np.clip(saturation * out + (1.0 - saturation) * gray, 0.0, 255.0)


def _rotate_patch(patch: np.ndarray, angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Rotate a float (h, w, 3) patch about its centre by `angle_deg` (bilinear).

    Returns (values, footprint), cropped to the footprint's bounding box; the footprint holds the
    output pixels whose four interpolation samples all lie inside the patch (no fill mixed in)."""
    patch_h, patch_w = patch.shape[:2]
    theta = math.radians(angle_deg)
    cos, sin = math.cos(theta), math.sin(theta)
    out_h = int(math.ceil((patch_h - 1) * abs(cos) + (patch_w - 1) * abs(sin))) + 3
    out_w = int(math.ceil((patch_h - 1) * abs(sin) + (patch_w - 1) * abs(cos))) + 3
    # output (row, col) -> input (row, col): inverse rotation about the two centres
    matrix = np.array([[cos, -sin], [sin, cos]])
    centre_in = np.array([(patch_h - 1) / 2.0, (patch_w - 1) / 2.0])
    centre_out = np.array([(out_h - 1) / 2.0, (out_w - 1) / 2.0])
    offset = centre_in - matrix @ centre_out

    def warp(plane: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(
            plane, matrix, offset=offset, output_shape=(out_h, out_w), order=1, mode="constant", cval=0.0
        )

    weight = warp(np.ones((patch_h, patch_w)))
    footprint = weight >= 1.0 - _FOOTPRINT_TOL
    values = np.stack([warp(patch[:, :, c]) for c in range(3)], axis=2)
    rows = np.flatnonzero(footprint.any(axis=1))
    cols = np.flatnonzero(footprint.any(axis=0))
    if rows.size == 0:
        return values[:0, :0], footprint[:0, :0]
    box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return values[box], footprint[box]


def cutpaste_source(
    image: np.ndarray,
    rng: np.random.Generator,
    area_fraction: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: tuple[float, float] = (0.3, 3.3),
    color_jitter: float = 0.1,
    max_rotation: float = 45.0,
) -> tuple[np.ndarray, np.ndarray]:
    """CutPaste: a patch cut from `image`, jittered, rotated, and pasted at a random place.

    The patch has area U(area_fraction) * H * W and height / width log-uniform in `aspect_ratio`
    (clamped to the image). Brightness, contrast and saturation factors are each drawn from
    U(1 - color_jitter, 1 + color_jitter). The patch is rotated by U(-max_rotation, max_rotation)
    degrees (bilinear); the mask is the rotated patch's footprint, only pixels interpolated wholly
    from patch pixels, so rotation trims about a pixel along the edges. If the rotated footprint
    does not fit inside the image (large patches on small images) or is empty (1-pixel patches),
    the patch is pasted unrotated. The paste position is uniform among positions that keep the
    footprint's bounding box inside the image.

    Returns (P, M): P is a copy of `image` (as uint8 RGB) with the patch pasted, equal to `image`
    outside M; M is the (H, W) bool footprint, never empty.
    """
    img = _as_rgb(image, "image")
    area_fraction = _check_range("area_fraction", area_fraction, 0.0, 1.0)
    aspect_ratio = _check_range("aspect_ratio", aspect_ratio, 0.0, math.inf)
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    if not 0.0 <= max_rotation <= 180.0:
        raise ValueError(f"max_rotation must be in [0, 180] degrees, got {max_rotation}")
    height, width = img.shape[:2]

    # 1. cut
    patch_h, patch_w = _rectangle_size(height, width, rng, area_fraction, aspect_ratio, height, width)
    y0 = int(rng.integers(0, height - patch_h + 1))
    x0 = int(rng.integers(0, width - patch_w + 1))
    patch = img[y0 : y0 + patch_h, x0 : x0 + patch_w].astype(np.float64)

    # 2. colour jitter
    factors = rng.uniform(1.0 - color_jitter, 1.0 + color_jitter, size=3)
    patch = _color_jitter(patch, factors)

    # 3. rotate; the footprint is the mask
    angle = float(rng.uniform(-max_rotation, max_rotation))
    values, footprint = (patch, np.ones((patch_h, patch_w), dtype=bool))
    if angle != 0.0:
        rotated, rotated_footprint = _rotate_patch(patch, angle)
        fits = rotated_footprint.shape[0] <= height and rotated_footprint.shape[1] <= width
        if rotated_footprint.any() and fits:
            values, footprint = rotated, rotated_footprint

    # 4. paste
    foot_h, foot_w = footprint.shape
    y1 = int(rng.integers(0, height - foot_h + 1))
    x1 = int(rng.integers(0, width - foot_w + 1))
    source = img.copy()
    mask = np.zeros((height, width), dtype=bool)
    region = source[y1 : y1 + foot_h, x1 : x1 + foot_w]
    region[footprint] = np.clip(np.rint(values[footprint]), 0, 255).astype(np.uint8)
    mask[y1 : y1 + foot_h, x1 : x1 + foot_w] = footprint
    return source, mask


# --------------------------------------------------------------------------------------------------
# Poisson (seamless) cloning, NSA


def _poisson_solve(image: np.ndarray, donor: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The float64 (H, W, 3) seamless-cloning solution; equals `image` outside `mask`.

    Discrete Poisson equation of Perez et al. (2003), eq. (7), guidance v_pq = g_p - g_q from the
    donor g, with N_p the 4-neighbours of p that lie inside the image:
        |N_p| f_p - sum_{q in N_p, q in mask} f_q
            = sum_{q in N_p, q not in mask} image_q + sum_{q in N_p} (g_p - g_q)
    """
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    n = ys.size
    index = np.full((height, width), -1, dtype=np.int64)
    index[ys, xs] = np.arange(n)
    img = image.astype(np.float64)
    don = donor.astype(np.float64)

    diagonal = np.zeros(n)
    rhs = np.zeros((n, 3))
    rows, cols = [], []
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        ny, nx = ys + dy, xs + dx
        inside = (ny >= 0) & (ny < height) & (nx >= 0) & (nx < width)
        p = np.flatnonzero(inside)  # unknowns that have this neighbour
        qy, qx = ny[inside], nx[inside]
        diagonal[p] += 1.0
        rhs[p] += don[ys[p], xs[p]] - don[qy, qx]  # guidance
        q_index = index[qy, qx]
        unknown = q_index >= 0
        rows.append(p[unknown])
        cols.append(q_index[unknown])
        known = ~unknown
        rhs[p[known]] += img[qy[known], qx[known]]  # Dirichlet boundary
    rows_all = np.concatenate([np.arange(n), *rows])
    cols_all = np.concatenate([np.arange(n), *cols])
    data = np.concatenate([diagonal, -np.ones(rows_all.size - n)])
    matrix = sparse.csc_matrix((data, (rows_all, cols_all)), shape=(n, n))
    # The matrix is symmetric positive definite (each unknown has a Dirichlet neighbour somewhere in
    # its component), so LU needs no pivoting: symmetric ordering, diagonal pivots, one
    # factorisation shared by the three channels.
    factor = sparse_linalg.splu(
        matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True}
    )
    solution = factor.solve(rhs)

    result = img.copy()
    result[ys, xs] = solution
    return result


def poisson_source(image: np.ndarray, donor: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seamless cloning: inside `mask` the result has the donor's discrete Laplacian and meets
    `image` on the mask's outer boundary; outside the mask it equals `image`.

    Per channel, solves the 5-point discrete Poisson equation over the masked pixels with guidance
    field = donor gradients (so the donor must be meaningful on the one-pixel ring around the mask
    too) and Dirichlet boundary = image values on that ring (sparse LU, float64), then rounds and
    clips to uint8. A mask may touch the image border: out-of-image neighbours are simply absent
    from a pixel's equation (a zero-flux condition there). The mask must be non-empty and must not
    cover the whole image (no boundary values: the solution would not be unique). `donor` has the
    image's size; callers align it (e.g. place a patch of another image at the mask's location).
    """
    img = _as_rgb(image, "image")
    don = _as_rgb(donor, "donor")
    region = np.asarray(mask)
    if region.dtype != bool:
        raise ValueError(f"mask must be a bool array, got dtype {region.dtype}")
    if region.shape != img.shape[:2] or don.shape != img.shape:
        raise ValueError(
            f"image {img.shape[:2]}, donor {don.shape[:2]} and mask {region.shape} must have the same (H, W)"
        )
    if not region.any():
        raise ValueError("mask is empty: nothing to clone")
    if region.all():
        raise ValueError("mask covers the whole image: no boundary values for the Poisson equation")
    result = _poisson_solve(img, don, region)
    return np.clip(np.rint(result), 0, 255).astype(np.uint8)


def poisson_patch_source(
    image: np.ndarray,
    donor_image: np.ndarray,
    rng: np.random.Generator,
    area_fraction: tuple[float, float] = (0.02, 0.15),
    aspect_ratio: tuple[float, float] = (0.3, 3.3),
    shape: str = "rectangle",
) -> tuple[np.ndarray, np.ndarray]:
    """NSA-style source: a patch of another normal image cloned seamlessly into `image`.

    `donor_image` is first resized to the image's size (antialiased bilinear). A rectangle of area
    U(area_fraction) * H * W and aspect (height / width) log-uniform in `aspect_ratio` is drawn; the
    region is that rectangle or (`shape="ellipse"`) the ellipse inscribed in it. The patch is taken
    at a uniform position of the donor and cloned at a uniform position of the image; both keep a
    one-pixel margin from the border, so the mask never touches the border and the guidance field
    across the mask's edge comes from the donor's own neighbouring pixels. Needs H, W >= 3.

    Returns (P, M): P = poisson_source(image, canvas, M) with the donor patch (and its one-pixel
    ring) placed in `canvas` at the destination; M is the (H, W) bool region, never empty.
    """
    img = _as_rgb(image, "image")
    donor = _as_rgb(donor_image, "donor_image")
    area_fraction = _check_range("area_fraction", area_fraction, 0.0, 1.0)
    aspect_ratio = _check_range("aspect_ratio", aspect_ratio, 0.0, math.inf)
    if shape not in ("rectangle", "ellipse"):
        raise ValueError(f"shape must be 'rectangle' or 'ellipse', got {shape!r}")
    height, width = img.shape[:2]
    if height < 3 or width < 3:
        raise ValueError(f"image must be at least 3x3 to keep the patch off the border, got {img.shape[:2]}")
    donor = _resize(donor, (height, width))

    patch_h, patch_w = _rectangle_size(
        height, width, rng, area_fraction, aspect_ratio, height - 2, width - 2
    )
    src_y = int(rng.integers(1, height - patch_h))
    src_x = int(rng.integers(1, width - patch_w))
    dst_y = int(rng.integers(1, height - patch_h))
    dst_x = int(rng.integers(1, width - patch_w))

    if shape == "ellipse":
        yy = (np.arange(patch_h) - (patch_h - 1) / 2.0) / (patch_h / 2.0)
        xx = (np.arange(patch_w) - (patch_w - 1) / 2.0) / (patch_w / 2.0)
        region = yy[:, None] ** 2 + xx[None, :] ** 2 <= 1.0
    else:
        region = np.ones((patch_h, patch_w), dtype=bool)

    canvas = img.copy()
    canvas[dst_y - 1 : dst_y + patch_h + 1, dst_x - 1 : dst_x + patch_w + 1] = donor[
        src_y - 1 : src_y + patch_h + 1, src_x - 1 : src_x + patch_w + 1
    ]
    mask = np.zeros((height, width), dtype=bool)
    mask[dst_y : dst_y + patch_h, dst_x : dst_x + patch_w] = region
    return poisson_source(img, canvas, mask), mask
