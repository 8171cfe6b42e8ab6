"""Parameters of `evaluate`: a scores dataset (and the images it was made from) -> metrics and report."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.spec_fields import DatasetInputSpec, ModelInputSpec, check_positive


@dataclass(frozen=True)
class ExplainSpec:
    """`explain:` gradient-denoising reconstructions (diffusion_kl's paper) of the most anomalous
    images the report shows: PaDiM's distance descended, a diffusion U-Net's reverse step every
    `denoise_every` steps. Shown in the report next to the heatmap, and written as GIFs."""

    padim: ModelInputSpec  # a `method: padim` model: its Mahalanobis distance is what is descended
    diffusion: ModelInputSpec  # an unconditional ddpm, diffusion_kl or cgddm model: its U-Net denoises
    count: int = 4  # the `count` highest-scored anomalous images of the report
    steps: int = 100
    step_size: float = 0.02
    denoise_every: int = 5  # 0: gradient steps only
    respaced_steps: int = 250
    denoise_index: int = 5
    frames: int = 6

    def validate(self, path: str) -> ExplainSpec:
        for name in ("count", "steps", "frames", "respaced_steps"):
            check_positive(getattr(self, name), f"{path}.{name}")
        check_positive(self.denoise_every, f"{path}.denoise_every", allow_zero=True)
        if not 0 < self.step_size < 1:
            raise SpecError(f"{path}.step_size", f"must be in (0, 1), got {self.step_size}")
        if self.frames < 2:
            raise SpecError(f"{path}.frames", f"must be at least 2 (the input and the last step), got {self.frames}")
        if not 1 <= self.denoise_index < self.respaced_steps:
            raise SpecError(f"{path}.denoise_index", f"must be an index in 1..{self.respaced_steps - 1} of the "
                                                     f"respaced chain, got {self.denoise_index}")
        return self


@dataclass(frozen=True)
class EvaluateParams:
    inputs: DatasetInputSpec  # a scores dataset
    images: DatasetInputSpec | None = None  # default: the images dataset the scores were made from
    fpr_limit: float = 0.3
    anomalous_examples: int = 8
    normal_examples: int = 4
    seed: int = 0
    explain: ExplainSpec | None = None

    def validate(self, path: str) -> EvaluateParams:
        prefix = f"{path}." if path else ""
        if not 0.0 < self.fpr_limit <= 1.0:
            raise SpecError(f"{prefix}fpr_limit", f"must be in (0, 1], got {self.fpr_limit}")
        for name in ("anomalous_examples", "normal_examples", "seed"):  # 0 examples: none in the report
            check_positive(getattr(self, name), f"{prefix}{name}", allow_zero=True)
        if self.explain is not None and self.explain.count > self.anomalous_examples:
            raise SpecError(f"{prefix}explain.count", f"explains images the report shows: at most "
                                                      f"anomalous_examples ({self.anomalous_examples}), "
                                                      f"got {self.explain.count}")
        return self
