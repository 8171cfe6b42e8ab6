"""RealNet (Zhang et al., CVPR 2024, "RealNet: A Feature Selection Network with Realistic Synthetic
Anomaly for Anomaly Detection"): learns from synthetic anomalies what an anomaly does to a frozen
network's features, then finds real ones.

- AFS (anomaly-aware feature selection): per feature level, the channels whose change under a
  synthetic anomaly best matches the anomaly's mask; chosen once, on the first `afs_steps`
  training batches, and stored with the model.
- Reconstruction: per level a small U-Net maps the selected features of an image (normal or with a
  synthetic anomaly) onto those of its clean version; the residual (input - reconstruction)^2 is
  large where the image is unlike normal.
- RRS (reconstruction residual selection): the residuals of all levels, upsampled to one grid;
  per image the top-k channels by global *max* pooling (local anomalies) and the top-k by global
  *average* pooling (global anomalies: a whole-image change lifts a channel's mean without a
  peak anywhere) go to a small discriminator that outputs a 2-class segmentation.
- Image score: the max of the anomaly map average-pooled over `score_pool` x `score_pool` px.

Trained by gradient descent (`pipelines.stages.train_gradient`) on a 50/50 mix of normal images
and synthetic anomalies, with their masks and clean source images: the output of a `synthesize`
step written with `include_normals: true` (`training_data="synthetic_pairs"`).

This module is torch-free: the parameters and the method record; the model is
`pipelines.models.realnet.model`. Here the backbone is EfficientNet-Lite (the paper's is WRN50-2,
not available offline), and the residuals are of unit-RMS-normalised features rather than
batch-normalised ones: batch-norm statistics would differ between DDP ranks and between batches
at score time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import STAGE_CHANNELS, check_backbone, check_stages
from pipelines.models.methods import AdamSpec, GradientTrainingSpec, MethodRecord, register
from pipelines.spec_fields import check_image_size, check_positive


@dataclass(frozen=True)
class RealnetConfig:
    """The network and its scoring: what is saved with the weights."""

    backbone: str = "efficientnet_lite0"
    stages: tuple[int, ...] = (1, 2, 3)  # strides 4, 8, 16
    # AFS: channels kept per stage, about half of each (Lite0 has 24, 40, 112), as the paper keeps
    # 256/512/512/256 of WRN50's 256/512/1024/2048.
    afs_channels: tuple[int, ...] = (16, 24, 64)
    reconstruction_width: int = 64  # hidden channels of each level's reconstruction U-Net
    rrs_channels: int = 32  # k: top-k residual channels by max pooling, and k more by mean pooling
    discriminator_width: int = 64
    image_size: int = 256
    score_pool: int = 16  # px: the image score is the max of the map average-pooled this wide

    def validate(self, path: str) -> RealnetConfig:
        check_backbone(self.backbone, f"{path}.backbone")
        stages = check_stages(self.stages, f"{path}.stages")
        available = [STAGE_CHANNELS[self.backbone][s] for s in stages]
        if len(self.afs_channels) != len(stages) or any(
                not 0 < k <= c for k, c in zip(self.afs_channels, available, strict=False)):
            raise SpecError(f"{path}.afs_channels", f"needs one count per stage, each in 1..the stage's channels "
                                                    f"{available}, got {list(self.afs_channels)}")
        for name in ("reconstruction_width", "rrs_channels", "discriminator_width", "score_pool"):
            check_positive(getattr(self, name), f"{path}.{name}")
        if self.rrs_channels > sum(self.afs_channels):
            raise SpecError(f"{path}.rrs_channels", f"must be at most the selected channels of all stages "
                                                    f"({sum(self.afs_channels)}), got {self.rrs_channels}")
        # the deepest stage's stride must divide the image, and its grid must halve once more
        check_image_size(self.image_size, f"{path}.image_size", minimum=64, multiple=2 ** (max(stages) + 2))
        if self.score_pool > self.image_size:
            raise SpecError(f"{path}.score_pool", f"must be at most image_size ({self.image_size}), "
                                                  f"got {self.score_pool}")
        return self


@dataclass(frozen=True)
class RealnetParams:
    """The train step's `realnet:` block."""

    model: RealnetConfig = RealnetConfig()
    optim: AdamSpec = AdamSpec()  # lr: the authors use 1e-4 for 1000s of epochs; 1e-3 reaches as far in a CPU budget
    training: GradientTrainingSpec = GradientTrainingSpec(steps=600, checkpoint_every=100)
    afs_steps: int = 16  # the first batches only choose the AFS channels (the code uses 64)
    feature_loss_weight: float = 1.0  # loss = segmentation cross-entropy + weight x feature MSE

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self, path: str) -> RealnetParams:
        check_positive(self.afs_steps, f"{path}.afs_steps")
        if self.afs_steps >= self.training.steps:
            raise SpecError(f"{path}.afs_steps", f"must be less than training.steps ({self.training.steps}): the "
                                                 f"first afs_steps batches choose channels, the rest train; "
                                                 f"got {self.afs_steps}")
        check_positive(self.feature_loss_weight, f"{path}.feature_loss_weight", allow_zero=True)
        return self


METHOD = register(MethodRecord(
    name="realnet", role="detector", fit="gradient", params=RealnetParams, artifact_config=RealnetConfig,
    implementation="pipelines.models.realnet.model:IMPLEMENTATION", training_data="synthetic_pairs",
    summary="feature selection + reconstruction + residual selection, trained on synthetic anomalies",
    paper="Zhang et al., RealNet, CVPR 2024"))
