"""PFM (Wan et al., IEEE TII 2022, "Unsupervised Image Anomaly Detection and Segmentation Based on
Pre-trained Feature Mapping"): two different frozen ImageNet networks look at the same image; per
feature level a small network of 1x1 convolutions learns, on normal images only, to map one
network's features onto the other's and back. Where the image is unlike the training images the
mapping fails, and its error is the anomaly map. Trained by gradient descent
(`pipelines.stages.train_gradient`), a detector.

This module is torch-free: the parameters (validated by the job spec) and the method record.
The model is `pipelines.models.pfm.model`, imported when a PFM is trained or loaded.

Here the two networks are EfficientNet-Lite1 (source) and EfficientNet-Lite2 (target); the paper's
code uses ResNet34 and ResNet50, which have no ImageNet weights offline. Of the pairs tried on
ELPV split 0 (Lite0, Lite1 or MobileNetV2 as source; README "PFM's two networks") Lite1 -> Lite2
was best and held on splits 1-4, which it was not chosen on. All Lite networks have the same strides per stage
(stage s: stride 2^(s+1)), so their grids line up.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import STAGE_CHANNELS, check_backbone, check_stages
from pipelines.models.methods import GradientTrainingSpec, MethodRecord, check_image_score, register
from pipelines.spec_fields import check_image_size, check_positive

# The bottleneck's width over the target network's channels per stage, as in the authors' code.
LATENT_RATIO = 0.8


@dataclass(frozen=True)
class PfmConfig:
    """The network and its scoring: what is saved with the weights."""

    source_backbone: str = "efficientnet_lite1"
    target_backbone: str = "efficientnet_lite2"
    stages: tuple[int, ...] = (1, 2, 3)  # strides 4, 8, 16, as the paper's three levels
    # The shared middle layer's width per stage; empty: LATENT_RATIO x the target network's
    # channels at that stage, the ratio of the authors' code (200 / 400 / 900 for ResNet50's
    # 256 / 512 / 1024): a bottleneck narrower than the features, so the mapping cannot copy them.
    latent_channels: tuple[int, ...] = ()
    image_size: int = 256
    map_sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in pixels (0: none)
    # "max": the paper's (the most anomalous spot); "mean": the whole map's average, which sees a
    # small change everywhere (a global defect) that no single spot shows (README: "PFM").
    image_score: str = "max"

    def validate(self, path: str) -> PfmConfig:
        for name in ("source_backbone", "target_backbone"):
            value = getattr(self, name)
            check_backbone(value, f"{path}.{name}")
        if self.source_backbone == self.target_backbone:
            raise SpecError(f"{path}.target_backbone", "must differ from source_backbone: PFM maps between two "
                                                       f"different networks, got {self.target_backbone!r} twice")
        stages = check_stages(self.stages, f"{path}.stages")
        if self.latent_channels and (len(self.latent_channels) != len(stages)
                                     or any(not isinstance(c, int) or c < 1 for c in self.latent_channels)):
            raise SpecError(f"{path}.latent_channels", f"needs one width >= 1 per stage ({len(stages)} stages "
                                                       f"{list(stages)}), got {list(self.latent_channels)}")
        # the deepest stage's stride must divide the image
        check_image_size(self.image_size, f"{path}.image_size", minimum=32, multiple=2 ** (max(stages) + 1))
        check_positive(self.map_sigma, f"{path}.map_sigma", allow_zero=True)
        check_image_score(self.image_score, f"{path}.image_score")
        return self

    def channels(self, backbone: str) -> tuple[int, ...]:
        return tuple(STAGE_CHANNELS[backbone][s] for s in self.stages)

    def latents(self) -> tuple[int, ...]:
        """The middle layer's width per stage (`latent_channels`, or its default)."""
        if self.latent_channels:
            return tuple(self.latent_channels)
        return tuple(max(1, round(LATENT_RATIO * c)) for c in self.channels(self.target_backbone))


@dataclass(frozen=True)
class PfmOptim:
    """Adam per level, as the authors' code: a larger learning rate for the first (widest-grid) level."""

    lr: tuple[float, ...] = (3e-3, 3e-4, 3e-4)  # one per stage
    weight_decay: float = 1e-5

    def validate(self, path: str) -> PfmOptim:
        if not self.lr or any(not (lr > 0) or lr != lr or lr == float("inf") for lr in self.lr):
            raise SpecError(f"{path}.lr", f"must be one finite learning rate > 0 per stage, got {list(self.lr)}")
        check_positive(self.weight_decay, f"{path}.weight_decay", allow_zero=True)
        return self


@dataclass(frozen=True)
class PfmParams:
    """The train step's `pfm:` block."""

    model: PfmConfig = PfmConfig()
    optim: PfmOptim = PfmOptim()
    training: GradientTrainingSpec = GradientTrainingSpec(steps=400, checkpoint_every=100)
    # The per-channel variance of the mapping errors that scales the map is measured over the
    # last `variance_steps` training steps (on the training images, after most of the learning).
    variance_steps: int = 50

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self, path: str) -> PfmParams:
        if len(self.optim.lr) != len(self.model.stages):
            raise SpecError(f"{path}.optim.lr", f"needs one learning rate per stage: {len(self.model.stages)} "
                                                f"stages {list(self.model.stages)}, got {len(self.optim.lr)} rates")
        check_positive(self.variance_steps, f"{path}.variance_steps")
        if self.variance_steps > self.training.steps:
            raise SpecError(f"{path}.variance_steps", f"must be at most training.steps ({self.training.steps}), "
                                                      f"got {self.variance_steps}")
        return self


METHOD = register(MethodRecord(
    name="pfm", role="detector", fit="gradient", params=PfmParams, artifact_config=PfmConfig,
    implementation="pipelines.models.pfm.model:IMPLEMENTATION",
    summary="bidirectional feature mapping between two pretrained networks; the mapping error",
    paper="Wan et al., PFM, IEEE TII 2022"))
