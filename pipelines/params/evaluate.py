"""Parameters of `evaluate`: a scores dataset (and the images it was made from) -> metrics and report."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.spec_fields import DatasetInputSpec, check_positive


@dataclass(frozen=True)
class EvaluateParams:
    inputs: DatasetInputSpec  # a scores dataset
    images: DatasetInputSpec | None = None  # default: the images dataset the scores were made from
    fpr_limit: float = 0.3
    anomalous_examples: int = 8
    normal_examples: int = 4
    seed: int = 0

    def validate(self, path: str) -> EvaluateParams:
        prefix = f"{path}." if path else ""
        if not 0.0 < self.fpr_limit <= 1.0:
            raise SpecError(f"{prefix}fpr_limit", f"must be in (0, 1], got {self.fpr_limit}")
        for name in ("anomalous_examples", "normal_examples", "seed"):  # 0 examples: none in the report
            check_positive(getattr(self, name), f"{prefix}{name}", allow_zero=True)
        return self
