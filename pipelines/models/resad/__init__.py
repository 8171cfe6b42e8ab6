"""ResAD (Yao et al., NeurIPS 2024, "ResAD: A Simple Framework for Class Generalizable Anomaly
Detection"): a detector that, once trained on some product classes, detects anomalies in a class
it never saw from a few normal images of it ("shots"), with no retraining.

- Residual features: each position's frozen backbone feature minus its nearest neighbour (by
  cosine) among the features of the class's reference images. Normal positions leave a small
  residual whatever the class looks like; that class-invariance is the whole idea.
- Feature constraintor: per level a 1x1 conv + batch norm + ReLU + 1x1 conv on the residuals,
  trained with a one-class loss: normal residuals inside a hypersphere of radius `sphere_radius`
  (RMS over channels) around 0, synthetic anomalies outside twice that radius.
- Feature distribution estimator: per level a normalizing flow (affine couplings conditioned on a
  2-D positional encoding) fitted to the normal constrained residuals; an anomaly's are pushed
  `flow_margin` nats per channel below the normals' likelihood. The map is the per-channel
  negative log-likelihood, standardised per level by statistics fixed at fit time (the last
  `statistics_steps` training steps), upsampled, averaged over levels and smoothed.

Trained by gradient descent (`pipelines.stages.train_gradient`) on a `synthesize` output written
with include_normals (`training_data="synthetic_pairs"`): the paper trains on seen classes with
their anomalies; here those are synthetic. During training the references of a class are
`shots` images drawn (per step, seeded) from a buffer of its recent normal training images, so
the model learns residuals against ever-different shots, as it will meet them. The published
model keeps `shots` references per trained class; a `score` job with
`references: {dataset, category, count}` scores a new class against that many of its normal images.

This module is torch-free: the parameters and the method record; the model is
`pipelines.models.resad.model`. Differences from the paper, and why: EfficientNet-Lite, not WRN50
(offline weights); residuals of unit-RMS-normalised features (one scale for every class and
level); the constraintor and flow are trained with the constraintor's output detached from the
flow loss (a flow could otherwise shrink its own input to lower the likelihood it is scored on);
no normalisation with test-set statistics (the authors' code does, a streaming scorer cannot).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import STAGE_CHANNELS, check_backbone, check_stages
from pipelines.models.methods import AdamSpec, GradientTrainingSpec, MethodRecord, check_image_score, register
from pipelines.spec_fields import check_image_size, check_positive


@dataclass(frozen=True)
class ResadConfig:
    """The networks and their scoring: what is saved with the weights."""

    backbone: str = "efficientnet_lite0"
    stages: tuple[int, ...] = (1, 2, 3)  # strides 4, 8, 16, as the paper's three WRN50 levels
    shots: int = 4  # reference images per class (training draws this many; scoring keeps this many)
    coupling_blocks: int = 8  # per level (the authors' code: 10)
    flow_hidden: int = 128  # hidden width of each coupling's subnet
    positional_channels: int = 32  # the flows' condition: a 2-D sinusoidal encoding of the position
    clamp: float = 1.9  # soft bound of a coupling's log-scale, as the authors' code
    image_size: int = 256
    map_sigma: float = 4.0  # Gaussian smoothing of the upsampled map, in pixels (0: none)
    # "max": the most anomalous spot (local defects); "mean": the whole map, whose every position
    # rises when the image as a whole differs from the references (a global defect).
    image_score: str = "max"

    def validate(self, path: str) -> ResadConfig:
        check_backbone(self.backbone, f"{path}.backbone")
        stages = check_stages(self.stages, f"{path}.stages")
        for name in ("shots", "coupling_blocks", "flow_hidden"):
            check_positive(getattr(self, name), f"{path}.{name}")
        if self.positional_channels % 4:
            raise SpecError(f"{path}.positional_channels", f"must be a multiple of 4 (sine and cosine of y and x), "
                                                           f"got {self.positional_channels}")
        check_positive(self.positional_channels, f"{path}.positional_channels", allow_zero=True)
        if not 0 < self.clamp <= 10:
            raise SpecError(f"{path}.clamp", f"must be in (0, 10], got {self.clamp}")
        check_image_size(self.image_size, f"{path}.image_size", minimum=32, multiple=2 ** (max(stages) + 1))
        check_positive(self.map_sigma, f"{path}.map_sigma", allow_zero=True)
        check_image_score(self.image_score, f"{path}.image_score")
        return self

    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(STAGE_CHANNELS[self.backbone][s] for s in self.stages)


@dataclass(frozen=True)
class ResadParams:
    """The train step's `resad:` block."""

    model: ResadConfig = ResadConfig()
    optim: AdamSpec = AdamSpec()
    training: GradientTrainingSpec = GradientTrainingSpec(steps=600, checkpoint_every=100)
    reference_buffer: int = 16  # recent normal images kept per class to draw training shots from
    sphere_radius: float = 0.5  # one-class loss: normal residuals within this RMS of 0, anomalies beyond 2x
    flow_margin: float = 1.0  # nats per channel an anomaly's NLL is pushed above the normals' mean
    statistics_steps: int = 20  # the last steps gather the per-level NLL statistics scores are standardised by

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self, path: str) -> ResadParams:
        check_positive(self.reference_buffer, f"{path}.reference_buffer")
        if self.reference_buffer < self.model.shots:
            raise SpecError(f"{path}.reference_buffer", f"must hold at least model.shots ({self.model.shots}) "
                                                        f"images, got {self.reference_buffer}")
        check_positive(self.sphere_radius, f"{path}.sphere_radius")
        check_positive(self.flow_margin, f"{path}.flow_margin", allow_zero=True)
        check_positive(self.statistics_steps, f"{path}.statistics_steps")
        if self.statistics_steps >= self.training.steps:
            raise SpecError(f"{path}.statistics_steps", f"must be less than training.steps ({self.training.steps}), "
                                                        f"got {self.statistics_steps}")
        return self


METHOD = register(MethodRecord(
    name="resad", role="detector", fit="gradient", params=ResadParams, artifact_config=ResadConfig,
    implementation="pipelines.models.resad.model:IMPLEMENTATION", training_data="synthetic_pairs",
    capabilities=frozenset({"references"}),
    summary="residuals against a few normal shots + one-class constraintor + normalizing flow; scores unseen "
            "classes from a few normal images",
    paper="Yao et al., ResAD, NeurIPS 2024"))
