"""diffusion_kl's feature head (Lu et al. 2023): the U-Net, besides the noise, predicts the frozen
backbone's features of the clean image x0 from the noised x_i, through a 1x1 convolution on the
output of one decoder block. Trained on normal images only, the head learns what the features of a
normal image look like given a noisy view of it; on a defect it predicts the normal features the
noise hides, so its error there is high. Pure torch; no Ray.

The decoder block's output is caught by a forward hook, so the U-Net stays a stock diffusers
`UNet2DModel` (its weights load in diffusers as they are) and one U-Net call gives both outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.utils import BaseOutput
from torch import nn

from pipelines.models.backbones import FeatureExtractor, shared_feature_extractor, unit_rms
from pipelines.models.diffusion.config import DdpmConfig
from pipelines.models.diffusion_kl import FeatureHead


@dataclass
class FeatureHeadOutput(BaseOutput):
    """`.sample` as the U-Net's own output; `.features` the predicted (B, C, h, w) features. A
    diffusers `BaseOutput`, so DistributedDataParallel passes it through as it does the U-Net's."""

    sample: torch.Tensor
    features: torch.Tensor


def resample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size): area average when shrinking (a decoder block finer than
    the feature map), bilinear when growing."""
    if maps.shape[-1] == size:
        return maps
    if maps.shape[-1] > size:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=(size, size), mode="bilinear", align_corners=False)


def decoder_block_channels(model: DdpmConfig, block: int) -> int:
    """Output channels of `UNet2DModel.up_blocks[block]` (deepest first, as the decoder runs)."""
    return tuple(reversed(model.block_out_channels))[block]


class UNetWithFeatureHead(nn.Module):
    """The U-Net and its feature head, trained, averaged (EMA) and checkpointed as one module:
    state-dict names `unet.*` and `head.*`."""

    def __init__(self, unet: UNet2DModel, model: DdpmConfig, head: FeatureHead):
        super().__init__()
        self.unet = unet
        self.head = nn.Conv2d(decoder_block_channels(model, head.decoder_block), head.channels, kernel_size=1)
        self.feature_size = model.image_size // head.stride
        self._caught: torch.Tensor | None = None
        # A bound method: deep-copying the module (the EMA copy) rebinds it to the copy.
        unet.up_blocks[head.decoder_block].register_forward_hook(self._catch)

    def _catch(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self._caught = output

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> FeatureHeadOutput:
        output = self.unet(sample, timestep, class_labels=class_labels).sample
        hidden, self._caught = self._caught, None
        if hidden is None:
            raise RuntimeError("the feature head's decoder block did not run")
        return FeatureHeadOutput(sample=output, features=resample(self.head(hidden), self.feature_size))


def feature_extractor(head: FeatureHead) -> FeatureExtractor:
    return shared_feature_extractor(head.backbone, (head.stage,))


@torch.no_grad()
def feature_targets(extractor: FeatureExtractor, x0: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) float32 unit-RMS backbone features of x0 in [-1, 1]: what the head learns to predict."""
    [features] = extractor((x0.float() + 1) / 2)
    return unit_rms(features)


def feature_mse(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The training loss: the mean squared error over every element, in float32."""
    return (predicted.float() - targets).pow(2).mean()


def feature_error_maps(predicted: torch.Tensor, targets: torch.Tensor, size: int) -> torch.Tensor:
    """(B, K, size, size) float32: the squared error per position, averaged over channels, of the
    head's predictions (B*K rows, image-major as `scoring.reverse_step_outputs`) against each image's
    targets (B rows), upsampled bilinearly to the image."""
    batch = targets.shape[0]
    count = predicted.shape[0] // batch
    error = (predicted.float() - targets.repeat_interleave(count, dim=0)).pow(2).mean(dim=1, keepdim=True)
    error = F.interpolate(error, size=(size, size), mode="bilinear", align_corners=False)
    return error.view(batch, count, size, size)
