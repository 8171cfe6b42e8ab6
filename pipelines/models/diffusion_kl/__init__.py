"""Noise-removal scoring (Lu et al., ICCV 2023, "Removing Anomalies as Noises for Industrial Defect
Localization"), `method: diffusion_kl`: a DDPM trained on normal images scores an image by how
far the network's reverse step from a noised copy of it is from the true posterior, per pixel
(`pipelines.models.diffusion.scoring`). A detector trained by gradient descent: the same U-Net,
loss and train step as `method: ddpm` (`pipelines.models.diffusion`); the last `statistics_steps`
steps also measure the KL maps of the training images, which fix each timestep's normalisation.

Scoring, per image: for each index i of `timesteps` in the `respaced_steps`-step chain (the
paper's code: {5, 50, 100} of 250), x_i from q(x_i | x0) with noise seeded by the image's id;
the KL map of that step, standardised by the mean and standard deviation of the training maps
at i (`normalisation: fit`) or by the image's own (`per_image`, the authors' code; it makes every
image's map look equally anomalous, so image scores compare images less well); the mean over
timesteps, smoothed; image score = mean of the `top_pixels` highest pixels (64, the code's).

The feature head (`feature_head: {enabled: true}`, the paper's second branch): a 1x1 convolution
on one decoder block of the same U-Net predicts the frozen backbone's features of x0 from x_i
(trained with an extra MSE, weight 1), and the error of that prediction is a second map, normalised
as the KL is; the map is `alpha` x KL + (1 - alpha) x feature error (alpha 0.5, the paper's). The
KL sees pixel-level changes the network "removes"; the feature error sees changes of texture and
structure the backbone's receptive field spans. Without the head the map is the KL alone.

Class-conditional (`class_conditional: true`, the paper's unified model): one U-Net over all the
training categories, each embedded as a class, with the map moments gathered per class. The artifact
holds the network once; loading it gives every category a model of its own (`category_models`):
the shared network called with that category's class and standardised by that class's moments, so
calibration sets a threshold per category and a category the model never learnt gets an error row.

Torch-free: the parameters and the method record; the model is `pipelines.models.diffusion_kl.model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import STAGE_CHANNELS, check_backbone
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.methods import GradientTrainingSpec, MethodRecord, register
from pipelines.spec_fields import check_image_size, check_positive

Normalisation = Literal["fit", "per_image"]


@dataclass(frozen=True)
class DiffusionKlScoring:
    """How a trained network scores (saved with the weights)."""

    respaced_steps: int = 250  # the chain the timesteps index, as the paper's sampler
    timesteps: tuple[int, ...] = (5, 50, 100)  # indices into that chain: small, medium, larger noise
    normalisation: Normalisation = "fit"
    top_pixels: int = 64  # image score: the mean of this many highest pixels of the map
    map_sigma: float = 4.0  # Gaussian smoothing of the map in pixels: one noise draw's KL is speckled
    seed: int = 0  # with the image id, seeds the noise of x_i: a rerun draws the same x_i
    # With a feature head: the weight of the KL map against the feature-error map (the paper's 0.5);
    # both are standardised first, so 0.5 weighs them equally. Unused without a head.
    alpha: float = 0.5

    def validate(self, path: str, num_train_timesteps: int = 1000) -> DiffusionKlScoring:
        if not 2 <= self.respaced_steps <= num_train_timesteps:
            raise SpecError(f"{path}.respaced_steps", f"must be in 2..{num_train_timesteps} (the model's "
                                                      f"num_train_timesteps), got {self.respaced_steps}")
        if not self.timesteps:
            raise SpecError(f"{path}.timesteps", "needs at least one timestep")
        for k, index in enumerate(self.timesteps):
            if not 1 <= index < self.respaced_steps:
                raise SpecError(f"{path}.timesteps[{k}]", f"must be an index in 1..{self.respaced_steps - 1} "
                                                          f"of the respaced chain, got {index}")
        if len(set(self.timesteps)) != len(self.timesteps):
            raise SpecError(f"{path}.timesteps", f"has duplicates: {list(self.timesteps)}")
        if self.normalisation not in ("fit", "per_image"):
            raise SpecError(f"{path}.normalisation", f"expected 'fit' or 'per_image', got {self.normalisation!r}")
        check_positive(self.top_pixels, f"{path}.top_pixels")
        check_positive(self.map_sigma, f"{path}.map_sigma", allow_zero=True)
        check_positive(self.seed, f"{path}.seed", allow_zero=True)
        if not 0 <= self.alpha <= 1:
            raise SpecError(f"{path}.alpha", f"must be in [0, 1] (1: the KL map alone), got {self.alpha}")
        return self


@dataclass(frozen=True)
class FeatureHead:
    """The U-Net's second output: the frozen backbone's features of x0 at `stage`, predicted from
    x_i by a 1x1 convolution on the output of decoder block `decoder_block` (0 = the deepest),
    resampled to the feature map's size. Targets are unit-RMS per position (every channel vector
    scaled to root-mean-square 1), so that the MSE's `weight` means the same for any backbone or stage."""

    enabled: bool = False
    backbone: str = "efficientnet_lite0"
    stage: int = 2  # timm feature index; 2 = stride 8, 40 channels on Lite0: 8x8 at 64 px
    decoder_block: int = 0
    weight: float = 1.0  # of the feature MSE in the loss, beside the noise MSE (the paper's 1)

    @property
    def channels(self) -> int:
        return STAGE_CHANNELS[self.backbone][self.stage]

    @property
    def stride(self) -> int:
        return 2 ** (self.stage + 1)

    def validate(self, path: str) -> FeatureHead:
        check_backbone(self.backbone, f"{path}.backbone")
        if self.stage not in range(5):
            raise SpecError(f"{path}.stage", f"must be a feature stage in 0..4 (strides 2..32), got {self.stage}")
        check_positive(self.weight, f"{path}.weight", allow_zero=True)
        return self

    def check_fits(self, model: DdpmConfig, path: str) -> None:
        """The head needs a decoder block to sit on and a feature map of at least 1x1."""
        if not 0 <= self.decoder_block < len(model.block_out_channels):
            last = len(model.block_out_channels) - 1
            raise SpecError(f"{path}.decoder_block", f"must be a decoder block of the U-Net, 0..{last} "
                                                     f"(0 = the deepest), got {self.decoder_block}")
        if model.image_size < self.stride:
            raise SpecError(f"{path}.stage", f"stage {self.stage} has stride {self.stride}, more than the "
                                             f"{model.image_size} px image: pick a smaller stage")


@dataclass(frozen=True)
class DiffusionKlConfig:
    """What the artifact's config.json holds: the U-Net and how it scores."""

    model: DdpmConfig = DdpmConfig()
    scoring: DiffusionKlScoring = DiffusionKlScoring()
    feature_head: FeatureHead = FeatureHead()
    # A class-conditional model's categories, class index = position (model.num_classes of them);
    # empty for an unconditional one.
    class_names: tuple[str, ...] = ()

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def class_conditional(self) -> bool:
        return self.model.num_classes > 0


@dataclass(frozen=True)
class DiffusionKlParams:
    """The train step's `diffusion_kl:` block."""

    model: DdpmConfig = DdpmConfig()
    optim: OptimConfig = OptimConfig()
    training: GradientTrainingSpec = GradientTrainingSpec()
    scoring: DiffusionKlScoring = DiffusionKlScoring()
    feature_head: FeatureHead = FeatureHead()
    # One U-Net over every category, the category embedded as a class (the paper's unified model),
    # its map moments per class; false: one unconditional U-Net over all of them.
    class_conditional: bool = False
    # The last `statistics_steps` training steps also compute the KL maps of their batch with the
    # EMA network (the one published) for the `fit` normalisation (and the feature-error maps,
    # with a head).
    statistics_steps: int = 20

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def artifact(self, class_names: tuple[str, ...]) -> DiffusionKlConfig:
        """The saved config of a model trained on `class_names` (the sorted training categories)."""
        if not self.class_conditional:
            return DiffusionKlConfig(model=self.model, scoring=self.scoring, feature_head=self.feature_head)
        return DiffusionKlConfig(model=dataclasses.replace(self.model, num_classes=len(class_names)),
                                 scoring=self.scoring, feature_head=self.feature_head,
                                 class_names=tuple(class_names))

    def validate(self, path: str) -> DiffusionKlParams:
        check_image_size(self.model.image_size, f"{path}.model.image_size", minimum=8)
        if self.model.num_classes:
            raise SpecError(f"{path}.model.num_classes", "is set from the dataset's categories: "
                                                         f"use {path}.class_conditional: true instead")
        self.scoring.validate(f"{path}.scoring", self.model.num_train_timesteps)
        if self.feature_head.enabled:
            self.feature_head.check_fits(self.model, f"{path}.feature_head")
        check_positive(self.statistics_steps, f"{path}.statistics_steps")
        if self.statistics_steps > self.training.steps:
            raise SpecError(f"{path}.statistics_steps", f"must be at most training.steps ({self.training.steps}), "
                                                        f"got {self.statistics_steps}")
        return self


METHOD = register(MethodRecord(
    name="diffusion_kl", role="detector", fit="gradient", params=DiffusionKlParams, artifact_config=DiffusionKlConfig,
    implementation="pipelines.models.diffusion_kl.model:IMPLEMENTATION", capabilities=frozenset({"bf16"}),
    summary="DDPM on normal images; the per-pixel KL of a reverse step from a noised copy of the image",
    paper="Lu et al., Removing Anomalies as Noises for Industrial Defect Localization, ICCV 2023"))
