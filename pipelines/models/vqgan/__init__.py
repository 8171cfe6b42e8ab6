"""VQGAN, the variance-aware generator of "Text-Guided Variational Image Generation for Industrial
Anomaly Detection and Segmentation" (Lee & Choi, CVPR 2024; no official code). A vector-quantised
autoencoder (diffusers' `VQModel`) is trained on a category's few normal images under heavy
photometric and translation augmentation. It then makes new normal images from a real one: it
encodes `copies` augmented copies of the image, snaps each to its nearest codebook entries, takes
the per-patch mean of the copies' code vectors and decodes that mean, which is generally no
codebook entry (the paper's variance-aware generation, `model.VqganGenerator.mean_latent_decode`).
Before generating, the generator adapts toward the category's images for a few Adam steps of MSE
(`model.adapt`). Trained by gradient descent (`pipelines.stages.train_gradient`); a generator
with the "generate" capability (the generate stage's integrator calls `adapt` and `vary`).

Losses: L1 reconstruction, a perceptual term (squared distance of channel-normalised frozen
EfficientNet-Lite0 features, LPIPS-like) and the quantiser's codebook/commitment loss. The
adversarial loss of a full VQGAN (a patch discriminator) is left out: it doubles the cost of a
step and needs its own warm-up schedule, and on a few-shot set of normal images, which the
generator reproduces and varies rather than invents, the L1 + perceptual objective was enough.

This module is torch-free: the parameters (validated by the job spec) and the method record.
The model is `pipelines.models.vqgan.model`, imported when a VQGAN is trained or loaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.errors import SpecError
from pipelines.models.backbone_channels import check_stages
from pipelines.models.methods import AdamSpec, GradientTrainingSpec, MethodRecord, register
from pipelines.spec_fields import check_image_size, check_positive, short_repr


@dataclass(frozen=True)
class VqganJitter:
    """The heavy augmentation: applied to every training image, and drawn again for each copy whose
    latents mean-latent decoding averages (so generation varies an image the way training did).
    The train stage's own rotation/flip (`training:`) comes on top of it in training only."""

    brightness: float = 0.25  # multiply by a factor drawn uniformly from [1 - b, 1 + b]
    contrast: float = 0.25  # scale the deviation from the image's mean grey by [1 - c, 1 + c]
    saturation: float = 0.25  # blend with its grey image by [1 - s, 1 + s] (nothing on grey ELPV cells)
    # shift by up to this fraction of the side in x and y (bilinear, reflected border): 4 px at 64 px
    translate: float = 0.0625
    noise: float = 0.02  # std of Gaussian pixel noise, on the [0, 1] scale

    def validate(self, path: str) -> VqganJitter:
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise SpecError(f"{path}.{name}", f"must be in [0, 1] (a factor of 1 +- it), got {value}")
        if not 0 <= self.translate <= 0.5:
            raise SpecError(f"{path}.translate", f"must be a fraction of the image side in [0, 0.5], "
                                                 f"got {self.translate}")
        if not 0 <= self.noise <= 1:
            raise SpecError(f"{path}.noise", f"must be a pixel-noise std in [0, 1], got {self.noise}")
        return self


@dataclass(frozen=True)
class VqganConfig:
    """The network, and the augmentation its generation draws: what is saved with the weights.

    Small CPU defaults: a few-shot normal set (tens of images of one category) does not need the
    width of taming's VQGAN (128-512 channels), and a train step at 64 px stays well under a
    second on two cores. Three levels (factor 4) give a 16 x 16 grid of codes at 64 px, each
    covering a 4 x 4 patch: fine enough for ELPV's busbars and cracks, coarse enough that a code is
    a pattern (not a pixel colour) and averaging codes makes a plausible variation, not a blur."""

    image_size: int = 64
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # one level each; downsampling 2 ** (levels - 1)
    layers_per_block: int = 1  # ResNet blocks per encoder level (the decoder has one more, as diffusers)
    # The code vectors: 4 channels, as latent-diffusion's VQ-f4/f8 models (3-4); a few-shot set
    # uses few patterns, and a codebook much larger than 256 would mostly stay unused.
    latent_channels: int = 4
    vq_embed_dim: int = 4
    num_vq_embeddings: int = 256
    norm_num_groups: int = 16  # GroupNorm groups; must divide every level's channels (32: 2 per group)
    mid_block_attention: bool = True  # the self-attention of the encoder's and decoder's middle blocks
    jitter: VqganJitter = VqganJitter()

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def validate(self, path: str) -> VqganConfig:
        channels = list(self.block_out_channels)
        if not 1 <= len(channels) <= 6 or any(not isinstance(c, int) or c <= 0 for c in channels):
            raise SpecError(f"{path}.block_out_channels", f"must be 1 to 6 positive channel counts (one per level), "
                                                          f"got {short_repr(channels)}")
        check_positive(self.norm_num_groups, f"{path}.norm_num_groups")
        if any(c % self.norm_num_groups for c in channels):
            raise SpecError(f"{path}.norm_num_groups", f"must divide every level's channels {channels} "
                                                       f"(GroupNorm), got {self.norm_num_groups}")
        for name in ("layers_per_block", "latent_channels", "vq_embed_dim"):
            check_positive(getattr(self, name), f"{path}.{name}")
        if not self.num_vq_embeddings >= 2:
            raise SpecError(f"{path}.num_vq_embeddings", f"must be at least 2 codes, got {self.num_vq_embeddings}")
        check_image_size(self.image_size, f"{path}.image_size", minimum=max(16, 2 * self.downsampling),
                         multiple=self.downsampling)
        return self


@dataclass(frozen=True)
class VqganLoss:
    """Weights of the training loss: reconstruction * L1 + perceptual * feature distance + codebook * VQ loss.

    - reconstruction 1.0: the L1 pixel error (images in [0, 1]) is the term the others are scaled to.
    - perceptual 0.1: per stage, the squared distance of the channel-normalised Lite0 feature
      vectors averaged over positions (LPIPS without its learned channel weights), averaged over
      stages. Measured on ELPV cells it falls from 0.7-0.9 to 0.15-0.3 while the L1 falls to
      0.03-0.05 (3-10x smaller), so 0.1 keeps it a sharpening term that does not outweigh the
      pixels on small images, where an ImageNet network's features are coarse (taming's 1.0 is
      for LPIPS at 256 px, with L1 on [-1, 1]).
    - codebook 1.0: the quantiser's loss as in the VQ-VAE paper, weight 1. diffusers' (legacy)
      `VectorQuantizer` already weighs inside it: ||sg[z_q] - z||^2 + 0.25 ||z_q - sg[z]||^2.
    """

    reconstruction: float = 1.0
    perceptual: float = 0.1
    codebook: float = 1.0
    # EfficientNet-Lite0 feature stages of the perceptual term (timm indices; 1, 2: strides 4, 8)
    perceptual_stages: tuple[int, ...] = (1, 2)

    def validate(self, path: str) -> VqganLoss:
        check_positive(self.reconstruction, f"{path}.reconstruction", allow_zero=True)
        check_positive(self.perceptual, f"{path}.perceptual", allow_zero=True)
        # zero would leave the codebook without gradients: it would never move from its random start
        check_positive(self.codebook, f"{path}.codebook")
        if not self.reconstruction + self.perceptual > 0:
            raise SpecError(f"{path}.reconstruction", "reconstruction and perceptual are both 0: nothing would "
                                                      "train the decoder")
        check_stages(self.perceptual_stages, f"{path}.perceptual_stages")
        return self

    @property
    def perceptual_stride(self) -> int:
        return 2 ** (max(self.perceptual_stages) + 1)


@dataclass(frozen=True)
class VqganParams:
    """The train step's `vqgan:` block."""

    model: VqganConfig = VqganConfig()
    loss: VqganLoss = VqganLoss()
    # 2e-4: within taming's range (4.5e-6 x batch size: 1e-4 to 4.5e-4); Adam's default betas,
    # since without a discriminator there is no adversarial game for taming's (0.5, 0.9) to steady.
    optim: AdamSpec = AdamSpec(lr=2e-4)
    # At batch 8, 2000 steps are ~300 passes over a 50-image category: the few-shot regime.
    training: GradientTrainingSpec = GradientTrainingSpec(steps=2000, checkpoint_every=250)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def validate(self, path: str) -> VqganParams:
        if self.loss.perceptual > 0 and self.model.image_size < self.loss.perceptual_stride:
            raise SpecError(f"{path}.loss.perceptual_stages",
                            f"stage {max(self.loss.perceptual_stages)} has stride {self.loss.perceptual_stride}, "
                            f"more than the {self.model.image_size} px image: use earlier stages")
        return self


METHOD = register(MethodRecord(
    name="vqgan", role="generator", fit="gradient", params=VqganParams, artifact_config=VqganConfig,
    capabilities=frozenset({"generate"}),
    implementation="pipelines.models.vqgan.model:IMPLEMENTATION",
    summary="vector-quantised autoencoder; variance-aware generation by decoding mean latents of augmented copies",
    paper="Lee & Choi, Text-Guided Variational Image Generation for Industrial Anomaly Detection and "
          "Segmentation, CVPR 2024"))
