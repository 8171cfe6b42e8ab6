"""`method: cgddm`: the detector and its side of the method contract. Pure torch; no Ray. Training,
checkpoints and the published EMA weights are the DDPM's (`pipelines.models.diffusion`); what is
added is the reconstruction (`pipelines.models.diffusion.reconstruction`) and the map made from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

from pipelines.models.anomaly_maps import gaussian_blur, top_mean
from pipelines.models.artifacts import ALL_CATEGORIES
from pipelines.models.backbones import shared_feature_extractor
from pipelines.models.cgddm import CgddmConfig, CgddmParams
from pipelines.models.diffusion.config import DdpmParams
from pipelines.models.diffusion.method import IMPLEMENTATION as DDPM
from pipelines.models.diffusion.method import DdpmTrainingState, ema_weights, unet_from
from pipelines.models.diffusion.reconstruction import Guidance, reconstruct
from pipelines.models.diffusion.samplers import respaced
from pipelines.models.diffusion.scoring import noise_for
from pipelines.models.methods import Published, ScoreBatch, TrainingContext

_NOISE_PURPOSE = "cgddm:start"  # with the scoring seed and the image id: the starting noise


class Cgddm(nn.Module):
    """A trained detector: the U-Net (EMA weights) and the frozen feature backbone of the map."""

    def __init__(self, config: CgddmConfig, unet: UNet2DModel):
        super().__init__()
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        scoring = config.scoring
        self.features = shared_feature_extractor(scoring.feature_backbone, scoring.feature_stages)
        self.diffusion, self.timesteps = respaced(config.model, scoring.respaced_steps)
        self.guidance = Guidance(condition_scale=scoring.condition_scale, guidance_scale=scoring.guidance_scale,
                                 blur_sigma=scoring.blur_sigma, guidance_below=scoring.guidance_below)

    def to(self, *args: Any, **kwargs: Any) -> Cgddm:  # the shared extractor moves too
        super().to(*args, **kwargs)
        self.features.to(next(self.unet.parameters()).device)
        return self

    def reconstructions(self, images: torch.Tensor, row_ids: Sequence[str],
                        autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, int]:
        """(reconstructions in [0, 1], U-Net calls) of images in [0, 1]."""
        x = images.float() * 2 - 1
        noise = noise_for(row_ids, _NOISE_PURPOSE, self.config.scoring.seed, tuple(x.shape[1:])).to(x.device)
        rebuilt, calls = reconstruct(self.unet, self.diffusion, self.timesteps, x, noise,
                                     self.config.scoring.start_step, self.guidance, autocast_dtype)
        return (rebuilt + 1) / 2, calls

    def difference_maps(self, images: torch.Tensor, rebuilt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel, feature) maps (B, S, S): the mean absolute difference over colour channels (in
        [0, 1]); 1 - cosine similarity of the backbone's features per stage, upsampled, averaged."""
        pixel = (images.float() - rebuilt).abs().mean(dim=1)
        size = images.shape[-2:]
        levels = [F.interpolate((1 - F.cosine_similarity(a.float(), b.float(), dim=1))[:, None], size=size,
                                mode="bilinear", align_corners=False)[:, 0]
                  for a, b in zip(self.features(images), self.features(rebuilt), strict=True)]
        return pixel, torch.stack(levels).mean(dim=0)

    @torch.inference_mode()
    def score(self, images: torch.Tensor, row_ids: Sequence[str],
              autocast_dtype: torch.dtype | None = None) -> ScoreBatch:
        """`autocast_dtype` (the "bf16" capability): the U-Net calls only run under autocast."""
        size = self.config.model.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"cgddm expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        rebuilt, _ = self.reconstructions(images, row_ids, autocast_dtype)
        pixel, feature = self.difference_maps(images, rebuilt)
        maps = gaussian_blur(pixel + self.config.scoring.feature_weight * feature, self.config.scoring.map_sigma)
        return ScoreBatch(top_mean(maps, self.config.scoring.top_pixels), maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"unet/{k}": v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}


class CgddmImplementation:
    """What `pipelines.models.cgddm`'s record names."""

    @staticmethod
    def describe(config: CgddmConfig) -> str:
        scoring = config.scoring
        return (f"cgddm ({config.model.image_size}px, channels {list(config.model.block_out_channels)}; DDIM "
                f"{scoring.respaced_steps} steps from index {scoring.start_step}, w {scoring.condition_scale}, "
                f"blur guidance s {scoring.guidance_scale}; {scoring.feature_backbone} stages "
                f"{list(scoring.feature_stages)})")

    @staticmethod
    def build(config: CgddmConfig, tensors: dict[str, torch.Tensor] | None) -> Cgddm:
        if tensors is None:
            return Cgddm(config, DDPM.build(config.model, None))
        return Cgddm(config, unet_from(config.model, tensors, "unet/"))

    @staticmethod
    def training_state(params: CgddmParams, context: TrainingContext) -> DdpmTrainingState:
        return DdpmTrainingState(DdpmParams(model=params.model, optim=params.optim, training=params.training),
                                 context)

    @staticmethod
    def published(params: CgddmParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The EMA U-Net of the last checkpoint, one model for every category."""
        return Published(
            config=params.artifact, tensors={ALL_CATEGORIES: ema_weights(tensors, "unet/")},
            info={"class_names": list(context.class_names), "steps": meta["step"], "weights": "ema"},
            summary=CgddmImplementation.describe(params.artifact))


IMPLEMENTATION = CgddmImplementation()
