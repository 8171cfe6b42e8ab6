"""PaDiM's model: a Gaussian per feature position, Mahalanobis distance as the map.

Pure torch. Fitting is streamed: `PadimStatistics` keeps the count, the per-position sum and the
per-position sum of outer products of the embeddings, so memory does not grow with the number
of images, and partial statistics from several workers merge by addition. The random channel
subset is drawn once from the seed and saved with the model, so a reload scores identically.

Embedding: features of the configured backbone stages, each upsampled (nearest) to the first
stage's grid and concatenated, then `kept_channels` of them chosen at random.
Covariance: unbiased sample covariance + `covariance_epsilon * I`. Map: Mahalanobis distance per
position, bilinearly upsampled to the input size and smoothed with a Gaussian (sigma 4), as in
the reference implementation; image score: the map's maximum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.anomaly_maps import gaussian_blur, image_scores
from pipelines.models.backbones import shared_feature_extractor
from pipelines.models.methods import ScoreBatch
from pipelines.models.padim import PadimConfig


class PadimStatistics:
    """Sufficient statistics of the embeddings, per position; float64 so that sums stay exact."""

    def __init__(self, channels: int, positions: int):
        self.count = 0
        self.sum = torch.zeros(positions, channels, dtype=torch.float64)
        self.sum_outer = torch.zeros(positions, channels, channels, dtype=torch.float64)

    def update(self, embedding: torch.Tensor) -> None:
        """embedding: (B, D, H, W)."""
        b, d, h, w = embedding.shape
        flat = embedding.reshape(b, d, h * w).permute(2, 0, 1).to(torch.float64)  # (P, B, D)
        self.count += b
        self.sum += flat.sum(dim=1)
        self.sum_outer += torch.bmm(flat.transpose(1, 2), flat)

    def merge(self, other: PadimStatistics) -> PadimStatistics:
        self.count += other.count
        self.sum += other.sum
        self.sum_outer += other.sum_outer
        return self

    def gaussian(self, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, D), inverse covariance (P, D, D)), both float32."""
        if self.count < 2:
            raise ValueError(f"PaDiM needs at least 2 training images, got {self.count}")
        mean = self.sum / self.count
        covariance = (self.sum_outer - self.count * mean[:, :, None] * mean[:, None, :]) / (self.count - 1)
        covariance += epsilon * torch.eye(covariance.shape[-1], dtype=torch.float64)
        # Cholesky, not torch.linalg.inv: a covariance + epsilon*I is symmetric positive definite,
        # and the CPU's batched LU runs MKL's dgetrf on several threads at once for matrices above
        # ~128 channels, which fails ("Parameter 6 was incorrect on entry to DLASWP") and hangs
        # (pytorch/pytorch#141358). Cholesky fails only on a non-finite or degenerate covariance,
        # which gets an error that says so.
        factor, info = torch.linalg.cholesky_ex(covariance)
        if bool((info != 0).any()) or not bool(torch.isfinite(self.sum).all()):
            bad = int(((info != 0) | ~torch.isfinite(self.sum).all(dim=1)).sum())
            raise ValueError(f"PaDiM: the feature covariance is not positive definite at {bad} of "
                             f"{covariance.shape[0]} positions (non-finite features?)")
        # contiguous: the inverse comes back column-major, and bmm's kernel (so the last bits of a
        # score) depends on the layout; saved-and-reloaded tensors must compute the same.
        return mean.float().contiguous(), torch.cholesky_inverse(factor).float().contiguous()


class Padim(nn.Module):
    channel_indices: torch.Tensor  # buffers (registered in __init__)
    mean: torch.Tensor
    inverse_covariance: torch.Tensor

    def __init__(self, config: PadimConfig, channel_indices: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        # One frozen backbone per process, shared by every category's model (a per-category copy
        # would cost its weights and activations once per category in each scorer).
        self.extractor = shared_feature_extractor(config.backbone, config.stages)
        total = sum(info.channels for info in self.extractor.feature_info)
        if not 0 < config.kept_channels <= total:
            raise ValueError(f"kept_channels must be in 1..{total} for stages {list(config.stages)}, "
                             f"got {config.kept_channels}")
        if channel_indices is None:
            generator = torch.Generator().manual_seed(config.seed)
            channel_indices = torch.randperm(total, generator=generator)[: config.kept_channels].sort().values
        self.register_buffer("channel_indices", channel_indices.long())
        self.grid = config.image_size // self.extractor.feature_info[0].stride
        self.register_buffer("mean", torch.empty(0))
        self.register_buffer("inverse_covariance", torch.empty(0))

    @property
    def fitted(self) -> bool:
        return self.mean.numel() > 0

    def new_statistics(self) -> PadimStatistics:
        return PadimStatistics(self.config.kept_channels, self.grid * self.grid)

    @torch.inference_mode()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [0, 1] -> embedding (B, kept_channels, S/stride, S/stride)."""
        return self.embed_differentiably(images)

    def embed_differentiably(self, images: torch.Tensor) -> torch.Tensor:
        """`embed` outside inference mode: gradients reach the images (the backbone stays frozen)."""
        if images.shape[-2:] != (self.config.image_size, self.config.image_size):
            raise ValueError(f"PaDiM expects {self.config.image_size}x{self.config.image_size} inputs, "
                             f"got {tuple(images.shape[-2:])}")
        features = self.extractor(images)
        size = features[0].shape[-2:]
        stacked = torch.cat([features[0]] + [F.interpolate(f, size=size, mode="nearest") for f in features[1:]], 1)
        return stacked.index_select(1, self.channel_indices.to(stacked.device)).float()

    def set_gaussian(self, statistics: PadimStatistics) -> None:
        mean, inverse = statistics.gaussian(self.config.covariance_epsilon)
        self.mean = mean.to(self.channel_indices.device)
        self.inverse_covariance = inverse.to(self.channel_indices.device)

    def squared_distances(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w) float32 squared Mahalanobis distance of each position's embedding to its
        Gaussian, from `embed`'s (B, D, h, w). Always in float32: it subtracts nearly equal numbers."""
        with torch.autocast(embedding.device.type, enabled=False):
            b, d, h, w = embedding.shape
            delta = embedding.float().reshape(b, d, h * w).permute(2, 0, 1) - self.mean[:, None, :]  # (P, B, D)
            squared = (torch.bmm(delta, self.inverse_covariance) * delta).sum(-1).clamp_min(0)  # (P, B)
            return squared.T.reshape(b, 1, h, w)

    def mean_distance(self, images: torch.Tensor) -> torch.Tensor:
        """(B,) mean Mahalanobis distance over the positions, differentiable in the images (in [0, 1],
        any size: resized to the model's bilinearly): what gradient denoising descends."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        squared = self.squared_distances(self.embed_differentiably(images))
        return squared.clamp_min(1e-12).sqrt().flatten(1).mean(dim=1)  # clamped: sqrt's gradient at 0

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image scores (B,), anomaly maps (B, S, S)), float32."""
        if not self.fitted:
            raise RuntimeError("PaDiM model is not fitted")
        embedding = self.embed(images)  # under the caller's autocast, if any (e.g. bf16 on a GPU)
        with torch.autocast(embedding.device.type, enabled=False):
            distance = self.squared_distances(embedding).sqrt()
            maps = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            maps = gaussian_blur(maps, self.config.map_sigma)
        return image_scores(maps, self.config.image_score), maps

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        """The method contract's scoring call: PaDiM draws no noise, so the row ids are not used."""
        scores, maps = self(images)
        return ScoreBatch(scores, maps)

    # ---- what is saved: config + tensors ------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"channel_indices": self.channel_indices.cpu(), "mean": self.mean.cpu().contiguous(),
                "inverse_covariance": self.inverse_covariance.cpu().contiguous()}

    @classmethod
    def from_tensors(cls, config: PadimConfig, tensors: dict[str, torch.Tensor]) -> Padim:
        model = cls(config, channel_indices=tensors["channel_indices"])
        model.mean = tensors["mean"].float().contiguous()
        model.inverse_covariance = tensors["inverse_covariance"].float().contiguous()
        return model


class PadimStatisticsFitter:
    """The statistics fit of the method contract: embed, accumulate, merge, invert."""

    def __init__(self, config: PadimConfig, channel_indices: torch.Tensor):
        self.config = config
        self.embedder = Padim(config, channel_indices=channel_indices)

    def new_statistics(self) -> PadimStatistics:
        return self.embedder.new_statistics()

    def update(self, statistics: PadimStatistics, images: torch.Tensor) -> None:
        statistics.update(self.embedder.embed(images))

    def merge(self, a: PadimStatistics, b: PadimStatistics) -> PadimStatistics:
        return a.merge(b)

    def model(self, statistics: PadimStatistics) -> Padim:
        model = Padim(self.config, channel_indices=self.embedder.channel_indices)
        model.set_gaussian(statistics)
        return model.eval()


class PadimImplementation:
    """What `pipelines.models.padim`'s record names: the torch side of PaDiM."""

    @staticmethod
    def plan(config: PadimConfig) -> torch.Tensor:
        """The random channel subset, drawn once from the seed, shared by every worker's fit."""
        return Padim(config).channel_indices

    @staticmethod
    def fitter(config: PadimConfig, plan: torch.Tensor) -> PadimStatisticsFitter:
        return PadimStatisticsFitter(config, plan)

    @staticmethod
    def describe(config: PadimConfig) -> str:
        return (f"padim ({config.backbone}, stages {list(config.stages)}, {config.kept_channels} channels, "
                f"{config.image_size}px)")

    @staticmethod
    def build(config: PadimConfig, tensors: dict[str, torch.Tensor] | None) -> Padim:
        return Padim.from_tensors(config, tensors) if tensors is not None else Padim(config)


IMPLEMENTATION = PadimImplementation()
