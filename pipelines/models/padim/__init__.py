"""PaDiM (Defard et al., ICPR 2020, "PaDiM: a Patch Distribution Modeling Framework for Anomaly
Detection and Localization"): one Gaussian per feature position of a frozen pretrained backbone,
the Mahalanobis distance as the anomaly map. Fitted by streamed statistics, no gradients.

This module is torch-free: the parameters (validated by the job spec) and the method record.
The model is `pipelines.models.padim.model`, imported when a PaDiM is fitted or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import STAGE_CHANNELS, check_backbone
from pipelines.models.methods import MethodRecord, check_image_score, register
from pipelines.spec_fields import check_image_size, check_positive, short_repr


@dataclass(frozen=True)
class PadimConfig:
    backbone: str = "efficientnet_lite0"
    stages: tuple[int, ...] = (1, 2, 3)
    kept_channels: int = 100
    image_size: int = 256
    covariance_epsilon: float = 0.01
    map_sigma: float = 4.0
    seed: int = 0
    # "max" (the paper's): the most anomalous position; "mean": the map's average, which also sees
    # a whole-image change (README "Global defects")
    image_score: str = "max"

    def validate(self, path: str) -> PadimConfig:
        """The job spec's check (`path` is e.g. `steps[4].padim`), from a table: no backbone is built."""
        check_backbone(self.backbone, f"{path}.backbone")
        channels = STAGE_CHANNELS[self.backbone]
        stages = list(self.stages)
        if not stages or stages != sorted(set(stages)) or any(s not in range(len(channels)) for s in stages):
            raise SpecError(f"{path}.stages", f"must be increasing indices in 0..{len(channels) - 1}, "
                                              f"got {short_repr(stages)}")
        check_positive(self.kept_channels, f"{path}.kept_channels")
        total = sum(channels[s] for s in stages)
        if self.kept_channels > total:  # a subset of the concatenated stage features
            raise SpecError(f"{path}.kept_channels",
                            f"must be at most {total}, the channels of {self.backbone} stages {stages} "
                            f"({' + '.join(str(channels[s]) for s in stages)}), got {self.kept_channels}")
        check_image_size(self.image_size, f"{path}.image_size", minimum=32, multiple=32)  # stride 32 at stage 4
        check_positive(self.covariance_epsilon, f"{path}.covariance_epsilon")
        check_positive(self.map_sigma, f"{path}.map_sigma", allow_zero=True)
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        check_image_score(self.image_score, f"{path}.image_score")
        return self


METHOD = register(MethodRecord(
    name="padim", role="detector", fit="statistics", params=PadimConfig,
    implementation="pipelines.models.padim.model:IMPLEMENTATION",
    summary="Gaussian per position of pretrained features; Mahalanobis distance",
    paper="Defard et al., PaDiM, ICPR 2020"))
