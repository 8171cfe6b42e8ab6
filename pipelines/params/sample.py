"""Parameters of `sample`: images drawn from a generative model artifact (a DDPM today)."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.spec_fields import DatasetOutputSpec, ModelInputSpec, ResourcesSpec, check_names, check_positive


@dataclass(frozen=True)
class SampleParams:
    model: ModelInputSpec
    outputs: DatasetOutputSpec
    count: int = 16
    steps: int = 20  # respaced reverse steps (DiffAD samples with 250; 20 is RealNet's SDAS)
    categories: tuple[str, ...] | None = None  # class-conditional models: which classes (default all)
    variance_scale: float = 0.0  # SDAS strength s: noise x sqrt(1 + s); 0 samples normal images
    seed: int = 0
    resources: ResourcesSpec = ResourcesSpec(workers=1, batch_size=16)

    def validate(self, path: str) -> SampleParams:
        prefix = f"{path}." if path else ""
        check_positive(self.count, f"{prefix}count")
        check_positive(self.steps, f"{prefix}steps")
        check_positive(self.variance_scale, f"{prefix}variance_scale", allow_zero=True)
        check_positive(self.seed, f"{prefix}seed", allow_zero=True)
        check_names(self.categories, f"{prefix}categories")
        return self
