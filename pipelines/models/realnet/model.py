"""RealNet's networks, training step and scoring (pure torch; see `pipelines.models.realnet`).

Shapes, for a batch of B images of S x S px and feature levels l with AFS channels k_l on grids
h_l x h_l (h_l = S / stride_l):

- features: the frozen backbone's maps, each normalised per position to unit RMS over its
  channels (so that residuals of different channels and levels are on one scale), then the
  level's AFS channels: (B, k_l, h_l, h_l);
- reconstruction: one small U-Net per level, same shape out;
- residuals: (features - reconstruction)^2, upsampled to the first level's grid and concatenated:
  (B, sum k_l, h_0, h_0); RRS keeps 2k of those channels per image; the discriminator gives
  (B, 2, h_0, h_0) logits; the map is the anomaly class's probability upsampled to S x S.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.artifacts import ALL_CATEGORIES, renamed
from pipelines.models.backbone_channels import STAGE_CHANNELS
from pipelines.models.backbones import shared_feature_extractor, unit_rms
from pipelines.models.methods import Published, ScoreBatch, TrainingBatch, TrainingContext
from pipelines.models.optimizer_state import optimizer_tensors, restore_optimizer
from pipelines.models.realnet import RealnetConfig, RealnetParams

_META_FORMAT = "adpipe-realnet-training/1"


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, kernel_size=3, stride=stride, padding=1)


class LevelReconstructor(nn.Module):
    """A two-scale U-Net on one level's selected features: (B, k, h, w) -> (B, k, h, w)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.encode = nn.Sequential(_conv(channels, width), nn.SiLU(), _conv(width, width), nn.SiLU())
        self.down = nn.Sequential(_conv(width, 2 * width, stride=2), nn.SiLU(), _conv(2 * width, 2 * width), nn.SiLU())
        self.up = nn.Sequential(_conv(2 * width, width), nn.SiLU())
        self.decode = nn.Sequential(_conv(2 * width, width), nn.SiLU(), nn.Conv2d(width, channels, kernel_size=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        near = self.encode(features)
        far = self.up(F.interpolate(self.down(near), size=near.shape[-2:], mode="nearest"))
        return self.decode(torch.cat([near, far], 1))


def residual_selection(residuals: torch.Tensor, k: int) -> torch.Tensor:
    """RRS: per image, the k channels with the largest spatial max and the k with the largest
    spatial mean (a channel may be in both), in that order: (B, C, H, W) -> (B, 2k, H, W)."""
    by_max = residuals.amax(dim=(2, 3)).topk(k, dim=1).indices
    by_mean = residuals.mean(dim=(2, 3)).topk(k, dim=1).indices
    index = torch.cat([by_max, by_mean], 1)[:, :, None, None].expand(-1, -1, *residuals.shape[-2:])
    return torch.gather(residuals, 1, index)


class RealnetNetwork(nn.Module):
    """The trainable part (what DDP wraps): reconstructions and the discriminator."""

    def __init__(self, config: RealnetConfig):
        super().__init__()
        self.rrs_channels = config.rrs_channels
        self.reconstructors = nn.ModuleList(LevelReconstructor(k, config.reconstruction_width)
                                            for k in config.afs_channels)
        width = config.discriminator_width
        # No normalisation layer: a per-image one would cancel exactly the whole-image rise of the
        # residuals that a global defect causes; a batch one would make scores depend on the batch.
        self.discriminator = nn.Sequential(
            _conv(2 * config.rrs_channels, width), nn.ReLU(), _conv(width, width // 2 or 1), nn.ReLU(),
            nn.Conv2d(width // 2 or 1, 2, kernel_size=1))

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Selected features per level -> (reconstructions per level, logits (B, 2, h_0, w_0))."""
        reconstructions = [net(f) for net, f in zip(self.reconstructors, features, strict=True)]
        grid = features[0].shape[-2:]
        residuals = torch.cat([F.interpolate((f - r).pow(2), size=grid, mode="bilinear", align_corners=False)
                               for f, r in zip(features, reconstructions, strict=True)], 1)
        return reconstructions, self.discriminator(residual_selection(residuals, self.rrs_channels))


def build_network(config: RealnetConfig, seed: int) -> RealnetNetwork:
    # On the CPU from the seed, in a fork of the global generator: every rank starts from the same
    # weights and the caller's random state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return RealnetNetwork(config)


def afs_mismatch(anomalous: torch.Tensor, clean: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """AFS criterion of one level: per image and channel, the mean squared difference between the
    channel's min-max-normalised squared change (anomalous vs clean features) and the mask
    area-downsampled to the level's grid. (B, C, h, w) x2, (B, S, S) -> (B, C); lower is better."""
    change = (anomalous - clean).pow(2).flatten(2)
    low, high = change.amin(-1, keepdim=True), change.amax(-1, keepdim=True)
    normalised = (change - low) / (high - low).clamp_min(1e-12)
    target = F.interpolate(masks[:, None].float(), size=anomalous.shape[-2:], mode="area").flatten(2)
    return (normalised - target).pow(2).mean(-1)


def choose_channels(mismatch_sums: torch.Tensor, k: int) -> torch.Tensor:
    """The k channels of lowest summed mismatch, in channel order (ties: the lower index)."""
    order = torch.argsort(mismatch_sums, stable=True)[:k]
    return order.sort().values.to(torch.int64)


def segmentation_target(masks: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, S, S) bool -> (B, h, w) class indices: anomalous where the mask covers most of a cell."""
    return (F.interpolate(masks[:, None].float(), size=tuple(grid), mode="area")[:, 0] > 0.5).long()


class Realnet(nn.Module):
    """A trained RealNet: backbone + AFS channels + network; `score` is the contract's call."""

    def __init__(self, config: RealnetConfig, network: RealnetNetwork, selected: Sequence[torch.Tensor]):
        super().__init__()
        self.config = config
        self.extractor = shared_feature_extractor(config.backbone, config.stages)
        self.network = network.eval().requires_grad_(False)
        self.selected = [s.to(torch.int64) for s in selected]

    def to(self, *args: Any, **kwargs: Any) -> Realnet:  # the shared extractor and the indices move too
        super().to(*args, **kwargs)
        device = next(self.network.parameters()).device
        self.extractor.to(device)
        self.selected = [s.to(device) for s in self.selected]
        return self

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image scores (B,), anomaly maps (B, S, S)) in [0, 1], float32."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"RealNet expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        features = [unit_rms(f)[:, index] for f, index in zip(self.extractor(images), self.selected, strict=True)]
        with torch.autocast(images.device.type, enabled=False):  # residuals are small differences
            _, logits = self.network(features)
            probability = logits.float().softmax(1)[:, 1:]
            maps = F.interpolate(probability, size=(size, size), mode="bilinear", align_corners=False)
            pool = min(self.config.score_pool, size)
            scores = F.avg_pool2d(maps, kernel_size=pool, stride=1).amax(dim=(1, 2, 3))
        return scores, maps[:, 0].contiguous()

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        """RealNet draws no noise: the row ids are not used."""
        scores, maps = self(images)
        return ScoreBatch(scores, maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"network/{k}": v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
                **{f"afs/{stage}": s.cpu() for stage, s in zip(self.config.stages, self.selected, strict=True)}}


class RealnetTrainingState:
    """`TrainingState` of the method contract. Steps 0..afs_steps-1 only add up the AFS criterion
    over the batches' synthetic anomalies; then the channels are chosen (summed over the DDP ranks
    first, so every rank chooses the same) and the network trains on them."""

    def __init__(self, params: RealnetParams, context: TrainingContext):
        self.params = params
        self.config = params.model
        self.device = torch.device(context.device)
        self.extractor = shared_feature_extractor(self.config.backbone, self.config.stages).to(self.device)
        self.module: RealnetNetwork = build_network(self.config, params.training.seed).to(self.device).train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=params.optim.lr,
                                          weight_decay=params.optim.weight_decay)
        self.step = 0
        channels = [STAGE_CHANNELS[self.config.backbone][s] for s in self.config.stages]
        self.mismatch_sums = [torch.zeros(c, dtype=torch.float64) for c in channels]
        self.mismatch_images = 0
        self.selected: list[torch.Tensor] | None = None

    def features(self, images: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """The frozen backbone's unit-RMS features of images in [0, 1] (all channels)."""
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return [unit_rms(f) for f in self.extractor(images)]

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        """One step on pairs (image, clean image, mask). Nothing is random here (the generator is unused)."""
        if batch.clean is None or batch.masks is None:
            raise ValueError("RealNet trains on synthetic pairs: the batch needs clean images and masks")

        def tensor(pixels: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device).permute(0, 3, 1, 2).float().div(255)

        count = len(batch.pixels)
        both = self.features(torch.cat([tensor(batch.pixels), tensor(batch.clean)]), autocast_dtype)
        masks = torch.from_numpy(np.ascontiguousarray(batch.masks)).to(self.device)
        return self.train_features([f[:count] for f in both], [f[count:] for f in both], masks)

    def train_features(self, features: list[torch.Tensor], clean: list[torch.Tensor],
                       masks: torch.Tensor) -> dict[str, float]:
        """One step on the normalised backbone features (`features`) of the images and of their clean
        versions, and the masks (B, S, S): for a caller that computes features once per image."""
        if self.step < self.params.afs_steps:
            self._add_mismatch(features, clean, masks)
            self.step += 1
            return {"afs_images": float(self.mismatch_images), "lr": self.params.optim.lr}
        if self.selected is None:
            self._choose()
        assert self.selected is not None
        features = [f[:, index] for f, index in zip(features, self.selected, strict=True)]
        clean = [f[:, index] for f, index in zip(clean, self.selected, strict=True)]
        self.optimizer.zero_grad(set_to_none=True)
        reconstructions, logits = self.forward_model(features)
        segmentation = F.cross_entropy(logits.float(), segmentation_target(masks, logits.shape[-2:]))
        feature = sum((F.mse_loss(r.float(), c) for r, c in zip(reconstructions, clean, strict=True)),
                      start=torch.zeros((), device=self.device)) / len(clean)
        loss = segmentation + self.params.feature_loss_weight * feature
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return {"loss": float(loss.item()), "segmentation_loss": float(segmentation.item()),
                "feature_loss": float(feature.item()), "lr": self.params.optim.lr}

    @torch.no_grad()
    def _add_mismatch(self, features: list[torch.Tensor], clean: list[torch.Tensor], masks: torch.Tensor) -> None:
        anomalous = masks.flatten(1).any(1)
        if not anomalous.any():
            return
        for level, (a, c) in enumerate(zip(features, clean, strict=True)):
            mismatch = afs_mismatch(a[anomalous], c[anomalous], masks[anomalous])
            self.mismatch_sums[level] += mismatch.double().sum(0).cpu()
        self.mismatch_images += int(anomalous.sum())

    def _choose(self) -> None:
        import torch.distributed as dist

        sums = [s.clone() for s in self.mismatch_sums]
        images = torch.tensor([float(self.mismatch_images)], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            for tensor in (*sums, images):
                moved = tensor.to(self.device)
                dist.all_reduce(moved)
                tensor.copy_(moved.cpu())
        if float(images) == 0:
            raise ValueError(f"RealNet's feature selection saw no synthetic anomaly in its first "
                             f"{self.params.afs_steps} batches (afs_steps); is the input a synthesize output?")
        self.selected = [choose_channels(s, k).to(self.device) for s, k in zip(sums, self.config.afs_channels,
                                                                                 strict=True)]

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model/{k}": v.detach().to("cpu", copy=True).contiguous()
                   for k, v in self.module.state_dict().items()}
        tensors.update({f"mismatch/{stage}": s.clone() for stage, s in zip(self.config.stages, self.mismatch_sums,
                                                                            strict=True)})
        if self.selected is not None:
            tensors.update({f"afs/{stage}": s.cpu().clone() for stage, s in zip(self.config.stages, self.selected,
                                                                                strict=True)})
        optimizer_state, adam_steps = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        return tensors, {"format": _META_FORMAT, "step": self.step, "adam_steps": adam_steps,
                         "mismatch_images": self.mismatch_images, "steps": self.params.training.steps,
                         "afs_steps": self.params.afs_steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != _META_FORMAT:
            raise ValueError(f"not a RealNet training checkpoint: format {meta.get('format')!r}")
        for key, mine in (("steps", self.params.training.steps), ("afs_steps", self.params.afs_steps)):
            if meta.get(key) != mine:
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's ({mine})")
        self.module.load_state_dict(renamed(tensors, "model/"))
        self.mismatch_sums = [tensors[f"mismatch/{stage}"].clone() for stage in self.config.stages]
        self.mismatch_images = int(meta["mismatch_images"])
        self.selected = ([tensors[f"afs/{stage}"].clone().to(self.device) for stage in self.config.stages]
                         if f"afs/{self.config.stages[0]}" in tensors else None)
        restore_optimizer(self.optimizer, tensors, meta["adam_steps"])
        self.step = int(meta["step"])


class RealnetImplementation:
    """What `pipelines.models.realnet`'s record names."""

    @staticmethod
    def describe(config: RealnetConfig) -> str:
        return (f"realnet ({config.backbone} stages {list(config.stages)}, AFS {list(config.afs_channels)} "
                f"channels, RRS 2x{config.rrs_channels}, {config.image_size}px)")

    @staticmethod
    def build(config: RealnetConfig, tensors: dict[str, torch.Tensor] | None) -> Realnet:
        network = RealnetNetwork(config)
        if tensors is None:  # untrained: the first channels of each level
            return Realnet(config, network, [torch.arange(k) for k in config.afs_channels])
        network.load_state_dict(renamed(tensors, "network/"), strict=True)
        return Realnet(config, network, [tensors[f"afs/{stage}"] for stage in config.stages])

    @staticmethod
    def training_state(params: RealnetParams, context: TrainingContext) -> RealnetTrainingState:
        return RealnetTrainingState(params, context)

    @staticmethod
    def published(params: RealnetParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """The network and the AFS channels of the last checkpoint, one model for every category."""
        network = renamed(tensors, "model/", "network/")
        selected = {k: v for k, v in tensors.items() if k.startswith("afs/")}
        return Published(
            config=params.model, tensors={ALL_CATEGORIES: {**network, **selected}},
            info={"class_names": list(context.class_names), "steps": meta["step"], "afs_steps": params.afs_steps,
                  "afs_images": meta["mismatch_images"],
                  "afs_channels": {k: v.tolist() for k, v in selected.items()}},
            summary=RealnetImplementation.describe(params.model))


IMPLEMENTATION = RealnetImplementation()
