"""Parameters of the synthesis compute that a job spec sets, with their checks: `PerlinConfig`.

Torch-free (only the standard library and `pipelines.errors`), so that a job spec parses and
validates without importing torch; the compute that uses them is `pipelines.synthesis.perlin`.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError

# More lattice cells than this per axis is white noise at any image size adpipe handles.
MAX_SCALE_EXPONENT = 10


@dataclass(frozen=True)
class PerlinConfig:
    """Parameters of the Perlin masks (RealNet's defaults).

    The lattice has `2**k` cells per axis, `k` drawn independently for y and x from
    `[min_scale_exponent, max_scale_exponent]`. `validate` cannot know the image size; pass it
    (`image_size=`) where it is known: more cells than pixels along an axis gives aliased white
    noise rather than blobs, so `2**max_scale_exponent > image_size` is an error then.
    """

    min_scale_exponent: int = 0
    max_scale_exponent: int = 5
    threshold: float = 0.5  # on noise in [-1, 1]; must be in (0, 1)
    max_rotation: float = 90.0  # degrees, rotation drawn from U(-max_rotation, max_rotation)

    def validate(self, path: str, image_size: int | None = None) -> PerlinConfig:
        prefix = f"{path}." if path else ""
        for name in ("min_scale_exponent", "max_scale_exponent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"{prefix}{name}", f"must be an integer, got {value!r}")
            if not 0 <= value <= MAX_SCALE_EXPONENT:
                raise SpecError(f"{prefix}{name}", f"must be in [0, {MAX_SCALE_EXPONENT}], got {value}")
        if self.min_scale_exponent > self.max_scale_exponent:
            raise SpecError(f"{prefix}min_scale_exponent",
                            f"must be <= max_scale_exponent ({self.max_scale_exponent}), "
                            f"got {self.min_scale_exponent}")
        if image_size is not None and 2**self.max_scale_exponent > image_size:
            raise SpecError(f"{prefix}max_scale_exponent",
                            f"2**{self.max_scale_exponent} = {2**self.max_scale_exponent} lattice cells is "
                            f"more than the image size {image_size}")
        for name in ("threshold", "max_rotation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"{prefix}{name}", f"must be a number, got {value!r}")
        if not 0 < self.threshold < 1:  # written so that NaN fails too
            raise SpecError(f"{prefix}threshold", f"must be in (0, 1), got {self.threshold}")
        if not 0 <= self.max_rotation <= 180:
            raise SpecError(f"{prefix}max_rotation", f"must be in [0, 180] degrees, got {self.max_rotation}")
        return self
