"""The VQGAN's model, its train step, its adaptation and its side of the method contract. Pure
torch (and diffusers); no Ray.

Network: diffusers' `VQModel` (encoder of `DownEncoderBlock2D` levels, a 1x1 conv to the code
dimension, `VectorQuantizer`, a 1x1 conv back, decoder of `UpDecoderBlock2D` levels), 3 channels
in and out, on images scaled to [-1, 1]. Everything outside this module speaks (B, 3, S, S)
floats in [0, 1]; `VqganGenerator` converts at its boundary.

Training (`VqganTrainingState`): each batch of normal images is jittered (`jitter_images`:
brightness, contrast, saturation, translation, pixel noise, all drawn from the step's generator);
the loss is `reconstruction * L1 + perceptual * feature distance + codebook * VQ loss` of the
nearest-code reconstruction of the jittered image against the jittered image. Adam.

Generation (`VqganGenerator.mean_latent_decode`): `copies` jittered copies of an image, each
encoded and snapped to its nearest codes; the per-patch mean of the copies' code vectors is
decoded as it is (`force_not_quantize`), so the decoder sees a latent between codes and renders a
variation of the image that keeps its natural variance instead of snapping back to one of the
codebook's patterns. `adapt` fine-tunes a copy of the decoder toward given images first.

Every random draw comes from an explicit `torch.Generator`; on one device a seed gives the same
bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import VQModel
from torch import nn

from pipelines.models.artifacts import ALL_CATEGORIES, renamed
from pipelines.models.backbones import FeatureExtractor, shared_feature_extractor
from pipelines.models.methods import Published, TrainingBatch, TrainingContext
from pipelines.models.optimizer_state import optimizer_tensors, restore_optimizer
from pipelines.models.vqgan import VqganConfig, VqganJitter, VqganLoss, VqganParams

_META_FORMAT = "adpipe.vqgan-train/1"
PERCEPTUAL_BACKBONE = "efficientnet_lite0"
# ITU-R BT.601 luma: the grey image that contrast and saturation are taken about
_LUMA = (0.299, 0.587, 0.114)


def build_vqmodel(config: VqganConfig, seed: int = 0) -> VQModel:
    """The diffusers `VQModel` of a config, with initial weights drawn from `seed`: built on the CPU
    in a fork of the global generator, so that every rank starts from the same weights and the
    caller's random state is left alone."""
    levels = len(config.block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VQModel(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            act_fn="silu", latent_channels=config.latent_channels, sample_size=config.image_size,
            num_vq_embeddings=config.num_vq_embeddings, norm_num_groups=config.norm_num_groups,
            vq_embed_dim=config.vq_embed_dim, mid_block_add_attention=config.mid_block_attention)


def jitter_images(images: torch.Tensor, jitter: VqganJitter, generator: torch.Generator) -> torch.Tensor:
    """The heavy augmentation of (B, 3, S, S) images in [0, 1] -> the same shape, in [0, 1].

    Per image, in this order (each clamped to [0, 1], as torchvision's ColorJitter): brightness
    (x * f), contrast (about the image's mean grey), saturation (about each pixel's grey), a
    translation of up to `translate` of the side in x and y (bilinear, reflected border), then
    Gaussian noise. The draws are 5 uniforms per image, then one normal per pixel, from
    `generator` (on its own device) whatever the settings, so changing one setting leaves the
    other draws alone; images are drawn in batch order (one generator per image for per-image seeds)."""
    b = images.shape[0]
    draw_device = generator.device
    signed = (torch.rand(b, 5, generator=generator, device=draw_device) * 2 - 1).to(images.device, images.dtype)
    noise = torch.randn(images.shape, generator=generator, device=draw_device).to(images.device, images.dtype)
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)

    def factor(amount: float, column: int) -> torch.Tensor:
        return (1 + amount * signed[:, column]).view(b, 1, 1, 1)

    x = (images * factor(jitter.brightness, 0)).clamp(0, 1)
    mean_grey = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - mean_grey) * factor(jitter.contrast, 1) + mean_grey).clamp(0, 1)
    grey = (x * luma).sum(1, keepdim=True)
    x = ((x - grey) * factor(jitter.saturation, 2) + grey).clamp(0, 1)
    if jitter.translate > 0:
        theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1
        # normalised coordinates span 2 per side: a shift of `translate * u` of the side
        theta[:, 0, 2] = 2 * jitter.translate * signed[:, 3]
        theta[:, 1, 2] = 2 * jitter.translate * signed[:, 4]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return (x + jitter.noise * noise).clamp(0, 1)


class VqganGenerator(nn.Module):
    """A VQGAN: the `VQModel` and its config. Images in and out are (B, 3, S, S) floats in [0, 1]."""

    def __init__(self, config: VqganConfig, vqmodel: VQModel):
        super().__init__()
        self.config = config
        self.vqmodel = vqmodel

    @property
    def latent_grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.downsampling
        return side, side

    def _check(self, images: torch.Tensor) -> None:
        size = self.config.image_size
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (size, size):
            raise ValueError(f"the VQGAN expects (B, 3, {size}, {size}) images, got {tuple(images.shape)}")

    def quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (nearest-code latents (B, D, h, w) with straight-through gradients to the encoder,
        the quantiser's loss (a scalar), code indices (B, h, w))."""
        self._check(images)
        latents = self.vqmodel.encode(images * 2 - 1).latents
        quantized, codebook_loss, (_, _, indices) = self.vqmodel.quantize(latents)
        return quantized, codebook_loss, indices.view(images.shape[0], *quantized.shape[-2:])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) latents decoded as they are (no snapping to codes) -> images, not clamped."""
        decoded = self.vqmodel.decode(latents, force_not_quantize=True).sample
        return (decoded + 1) / 2

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Nearest-code reconstruction with gradients (what training and DDP call) -> (images, not
        clamped; the quantiser's loss; code indices (B, h, w))."""
        quantized, codebook_loss, indices = self.quantize(images)
        return self.decode_latents(quantized), codebook_loss, indices

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """The ordinary VQGAN: encode, snap every patch to its nearest code, decode -> [0, 1]."""
        return self(images)[0].clamp(0, 1)

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) code indices -> the decoded images in [0, 1]."""
        b, h, w = indices.shape
        latents = self.vqmodel.quantize.get_codebook_entry(indices.reshape(-1), (b, h, w, self.config.vq_embed_dim))
        return self.decode_latents(latents).clamp(0, 1)

    @torch.no_grad()
    def mean_latent_decode(self, images: torch.Tensor, copies: int, generator: torch.Generator,
                           jitter: VqganJitter | None = None) -> torch.Tensor:
        """The paper's variance-aware generation, one new image per input -> (B, 3, S, S) in [0, 1].

        Each image is jittered `copies` times (`jitter`, default the config's: the training
        augmentation; drawn from `generator`, image by image), every copy is encoded and snapped to
        its nearest codes, and the per-patch mean of the copies' code vectors is decoded without
        quantising it again. The mean is generally no codebook entry."""
        if copies < 1:
            raise ValueError(f"copies must be >= 1, got {copies}")
        b = images.shape[0]
        augmented = jitter_images(images.repeat_interleave(copies, 0), jitter or self.config.jitter, generator)
        quantized, _, _ = self.quantize(augmented)
        mean = quantized.view(b, copies, *quantized.shape[1:]).mean(1)
        return self.decode_latents(mean).clamp(0, 1)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.state_dict().items()}


def perceptual_distance(features: FeatureExtractor, images: torch.Tensor, target_features: list[torch.Tensor]
                        ) -> torch.Tensor:
    """LPIPS-like, without learned channel weights: per stage the squared distance between the
    channel-normalised feature vectors, averaged over positions; averaged over stages (float32)."""
    distances = [(F.normalize(a.float(), dim=1) - F.normalize(b.float(), dim=1)).pow(2).sum(1).mean()
                 for a, b in zip(features(images), target_features, strict=True)]
    return torch.stack(distances).mean()


def pixels_to_images(pixels: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(0, 3, 1, 2).float().div(255)


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


class VqganTrainingState:
    """`TrainingState` of the method contract: one Adam step of the VQGAN loss on jittered normal
    images; what a checkpoint holds (weights, Adam's state, the step)."""

    def __init__(self, params: VqganParams, context: TrainingContext):
        self.params = params
        self.config = params.model
        self.loss_weights: VqganLoss = params.loss
        self.device = torch.device(context.device)
        self.module = VqganGenerator(self.config, build_vqmodel(self.config, params.training.seed)).to(self.device)
        self.module.train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.features = (shared_feature_extractor(PERCEPTUAL_BACKBONE, self.loss_weights.perceptual_stages)
                         .to(self.device) if self.loss_weights.perceptual > 0 else None)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=params.optim.lr,
                                          weight_decay=params.optim.weight_decay)
        self.step = 0

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """One step: jitter the batch (from `generator`), reconstruct it through the nearest codes,
        step Adam on the weighted loss."""
        images = pixels_to_images(batch.pixels, self.device)
        with torch.no_grad():
            target = jitter_images(images, self.config.jitter, generator)
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        weights = self.loss_weights
        self.optimizer.zero_grad(set_to_none=True)
        with autocast:
            reconstruction, codebook_loss, indices = self.forward_model(target)
            reconstruction = reconstruction.float()
            l1 = (reconstruction - target).abs().mean()
            if self.features is not None:
                with torch.no_grad():
                    target_features = [f.detach() for f in self.features(target)]
                perceptual = perceptual_distance(self.features, reconstruction, target_features)
            else:
                perceptual = torch.zeros((), device=self.device)
        codebook_loss = codebook_loss.float()
        loss = weights.reconstruction * l1 + weights.perceptual * perceptual + weights.codebook * codebook_loss
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.item()), "reconstruction": float(l1.item()), "perceptual": float(perceptual.item()),
                "codebook": float(codebook_loss.item()), "codes_used": float(indices.unique().numel()),
                "lr": float(self.params.optim.lr)}

    def _meta_identity(self) -> dict[str, Any]:
        """What must match for a checkpoint to continue this run."""
        return {"steps": self.params.training.steps, "config": _json(dataclasses.asdict(self.config)),
                "loss": _json(dataclasses.asdict(self.loss_weights)),
                "optim": _json(dataclasses.asdict(self.params.optim))}

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model/{k}": v for k, v in self.module.tensors().items()}
        optimizer_state, adam_steps = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        return tensors, {"format": _META_FORMAT, "step": self.step, "adam_steps": adam_steps, **self._meta_identity()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != _META_FORMAT:
            raise ValueError(f"not a VQGAN training checkpoint: format {meta.get('format')!r}")
        for key, value in self._meta_identity().items():
            if meta.get(key) != value:
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's {value}")
        self.module.load_state_dict(renamed(tensors, "model/"), strict=True)
        restore_optimizer(self.optimizer, tensors, meta["adam_steps"])
        self.step = int(meta["step"])


def adapt(model: VqganGenerator, images: torch.Tensor, steps: int, lr: float, seed: int = 0) -> VqganGenerator:
    """A copy of `model` whose decoder (post-quantisation conv + decoder) took `steps` Adam steps of
    MSE between the nearest-code reconstructions of `images` ((B, 3, S, S) in [0, 1]) and the
    images: the paper's generator keeps adapting toward its inputs. The encoder and the codebook
    stay as they are, so the latent space that mean-latent decoding averages in does not move;
    the codes of the images are computed once. `model` is left unchanged.

    Full-batch steps with nothing random in them (no augmentation, no dropout): `seed` is accepted
    for the contract and does not change the result. Runs with gradients even when called under
    `torch.inference_mode()`."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = next(model.parameters()).device
    with torch.inference_mode(False), torch.enable_grad():
        adapted = VqganGenerator(model.config, build_vqmodel(model.config, seed)).to(device)
        adapted.load_state_dict(model.state_dict(), strict=True)  # copies: also from inference tensors
        adapted.eval().requires_grad_(False)
        images = images.to(device).float().clone()
        with torch.no_grad():
            quantized, _, _ = adapted.quantize(images)
        trained = [*adapted.vqmodel.post_quant_conv.parameters(), *adapted.vqmodel.decoder.parameters()]
        for parameter in trained:
            parameter.requires_grad_(True)
        optimizer = torch.optim.Adam(trained, lr=lr)
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss = F.mse_loss(adapted.decode_latents(quantized), images)
            loss.backward()
            optimizer.step()
    return adapted.requires_grad_(False)


class VqganImplementation:
    """What `pipelines.models.vqgan`'s record names."""

    @staticmethod
    def describe(config: VqganConfig) -> str:
        side = config.image_size // config.downsampling
        return (f"vqgan ({config.image_size}px, channels {list(config.block_out_channels)}, "
                f"{config.num_vq_embeddings} codes of {config.vq_embed_dim} dims on a {side}x{side} grid)")

    @staticmethod
    def build(config: VqganConfig, tensors: dict[str, torch.Tensor] | None) -> VqganGenerator:
        model = VqganGenerator(config, build_vqmodel(config))
        if tensors is not None:
            model.load_state_dict(tensors, strict=True)
        return model.eval()

    @staticmethod
    def training_state(params: VqganParams, context: TrainingContext) -> VqganTrainingState:
        return VqganTrainingState(params, context)

    @staticmethod
    def published(params: VqganParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The weights of the last checkpoint, one model for every category."""
        return Published(
            config=params.model, tensors={ALL_CATEGORIES: renamed(tensors, "model/")},
            info={"class_names": list(context.class_names), "steps": meta["step"],
                  "loss": dataclasses.asdict(params.loss), "optim": dataclasses.asdict(params.optim)},
            summary=VqganImplementation.describe(params.model))

    # ---- the "generate" capability (the generate stage's integrator) ---------------------------

    @staticmethod
    def adapt(model: VqganGenerator, images: torch.Tensor, steps: int, lr: float, seed: int = 0) -> VqganGenerator:
        return adapt(model, images, steps, lr, seed)

    @staticmethod
    def vary(model: VqganGenerator, images: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
        """One variation per image: `mean_latent_decode` with the jitter the model was trained with."""
        return model.mean_latent_decode(images, copies, generator)


IMPLEMENTATION = VqganImplementation()
