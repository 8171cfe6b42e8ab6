"""CGDDM, `method: cgddm`: conditioned-guided denoising diffusion for texture anomalies (METHODS:
CGDDM, a Korean conference paper; the blur guidance is Hong et al., ICCV 2023). A DDPM trained
on normal images, exactly as `method: ddpm` is (`pipelines.models.diffusion`), reconstructs each
scored image from a partially noised copy of it (`pipelines.models.diffusion.reconstruction`):
deterministic DDIM over `respaced_steps` timesteps, started at index `start_step` (t0 < T), each
step conditioned toward the input (`condition_scale`) and, at small t, blur-guided
(`guidance_scale`, `blur_sigma`, `guidance_below`). The anomaly map is the pixel difference between
input and reconstruction plus `feature_weight` times their feature difference (1 - cosine
similarity of a frozen ImageNet backbone's features, per stage, upsampled, averaged), smoothed;
image score = the mean of the `top_pixels` highest pixels.

Defaults and why: the paper gives the guidance range (s about 1.01-1.5, blur sigma 3-9, active
for small t) but not t0 or the chain; here 50 DDIM steps, start at index 10 (t0 = 200 of 1000: the
noise hides a defect's texture, not the image's layout), s = 1.2 and sigma 3 for the last 5 steps,
w = 1. A 256 px image then takes 11 + 6 = 17 U-Net calls, not hundreds.

Torch-free: the parameters and the method record; the model is `pipelines.models.cgddm.model`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import check_backbone, check_stages
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.methods import GradientTrainingSpec, MethodRecord, register
from pipelines.spec_fields import check_image_size, check_positive


@dataclass(frozen=True)
class CgddmScoring:
    """How a trained network reconstructs and scores (saved with the weights)."""

    respaced_steps: int = 50  # the DDIM chain over the training timesteps
    start_step: int = 10  # its index to start from: t0 = the chain's timestep there
    condition_scale: float = 1.0  # w: pull toward the input per step (0: plain DDIM)
    guidance_scale: float = 1.2  # s: blur guidance strength (1: off)
    blur_sigma: float = 3.0  # px
    guidance_below: int = 5  # blur guidance at chain indices <= this (small t)
    feature_backbone: str = "efficientnet_lite0"
    feature_stages: tuple[int, ...] = (1, 2)  # strides 4 and 8: texture-scale features
    feature_weight: float = 1.0  # map = pixel difference + this x feature difference
    top_pixels: int = 64  # image score: the mean of this many highest pixels of the map
    map_sigma: float = 4.0  # Gaussian smoothing of the map, px
    seed: int = 0  # with the image id, seeds the starting noise: a rerun reconstructs the same

    def validate(self, path: str, num_train_timesteps: int = 1000) -> CgddmScoring:
        if not 2 <= self.respaced_steps <= num_train_timesteps:
            raise SpecError(f"{path}.respaced_steps", f"must be in 2..{num_train_timesteps} (the model's "
                                                      f"num_train_timesteps), got {self.respaced_steps}")
        if not 1 <= self.start_step < self.respaced_steps:
            raise SpecError(f"{path}.start_step", f"must be an index in 1..{self.respaced_steps - 1} of the "
                                                  f"respaced chain, got {self.start_step}")
        for name in ("condition_scale", "guidance_scale", "blur_sigma", "feature_weight", "map_sigma"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise SpecError(f"{path}.{name}", f"must be a finite number >= 0, got {value}")
        if self.guidance_scale < 1:
            raise SpecError(f"{path}.guidance_scale", f"must be >= 1 (1: no blur guidance), got {self.guidance_scale}")
        if self.guidance_scale > 1 and not self.blur_sigma > 0:
            raise SpecError(f"{path}.blur_sigma", "must be > 0 when guidance_scale > 1")
        check_positive(self.guidance_below, f"{path}.guidance_below", allow_zero=True)
        check_backbone(self.feature_backbone, f"{path}.feature_backbone")
        check_stages(self.feature_stages, f"{path}.feature_stages")
        check_positive(self.top_pixels, f"{path}.top_pixels")
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        return self


@dataclass(frozen=True)
class CgddmConfig:
    """What the artifact's config.json holds: the U-Net and how it reconstructs and scores."""

    model: DdpmConfig = DdpmConfig()
    scoring: CgddmScoring = CgddmScoring()

    @property
    def image_size(self) -> int:
        return self.model.image_size


@dataclass(frozen=True)
class CgddmParams:
    """The train step's `cgddm:` block."""

    model: DdpmConfig = DdpmConfig()
    optim: OptimConfig = OptimConfig()
    training: GradientTrainingSpec = GradientTrainingSpec()
    scoring: CgddmScoring = CgddmScoring()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def artifact(self) -> CgddmConfig:
        return CgddmConfig(model=self.model, scoring=self.scoring)

    def validate(self, path: str) -> CgddmParams:
        check_image_size(self.model.image_size, f"{path}.model.image_size", minimum=16)
        if self.model.num_classes:
            raise SpecError(f"{path}.model.num_classes", "class-conditional cgddm models are not supported "
                                                         "yet: one unconditional model over the categories")
        self.scoring.validate(f"{path}.scoring", self.model.num_train_timesteps)
        return self


METHOD = register(MethodRecord(
    name="cgddm", role="detector", fit="gradient", params=CgddmParams, artifact_config=CgddmConfig,
    implementation="pipelines.models.cgddm.model:IMPLEMENTATION", capabilities=frozenset({"bf16"}),
    summary="DDPM on normal images; reconstruction from a partially noised copy, conditioned and blur-guided; "
            "pixel + feature difference",
    paper="CGDDM, conditioned-guided denoising diffusion for texture anomalies; Hong et al., "
          "self-attention guidance, ICCV 2023"))
