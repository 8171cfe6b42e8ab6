"""ResAD's networks, training step and scoring (pure torch; see `pipelines.models.resad`).

Shapes, for a batch of B images of S x S px and feature levels l with C_l channels on grids
h_l x h_l (h_l = S / stride_l):

- features: the frozen backbone's maps, unit-RMS per position: (B, C_l, h_l, h_l);
- references: per level the features of the class's `shots` reference images, flattened to
  (shots * h_l * h_l, C_l) positions;
- residuals: feature minus its cosine-nearest reference position, same shape as the features;
- constraintor: (B, C_l, h_l, h_l) -> same; the flow sees each position's C_l-vector with a
  positional encoding and gives its negative log-likelihood per channel: (B, h_l, h_l);
- map: per level (nll - mean_l) / std_l (fit-time statistics), upsampled to S x S, averaged over
  levels, smoothed: (B, S, S); image score: its max (or mean).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.models.anomaly_maps import gaussian_blur, image_scores
from pipelines.models.artifacts import renamed
from pipelines.models.backbones import shared_feature_extractor, unit_rms
from pipelines.models.methods import Published, ScoreBatch, TrainingBatch, TrainingContext
from pipelines.models.optimizer_state import optimizer_tensors, restore_optimizer
from pipelines.models.resad import ResadConfig, ResadParams

_META_FORMAT = "adpipe-resad-training/1"
_NEAREST_CHUNK = 2048  # query positions per similarity block: 2048 x (4 shots x 64 x 64) floats = 128 MiB


def nearest_residuals(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Each position's feature minus its nearest reference position by cosine similarity
    (ties: the lower index). (B, C, h, w), (M, C) -> (B, C, h, w)."""
    batch, channels, height, width = features.shape
    queries = features.permute(0, 2, 3, 1).reshape(-1, channels)
    unit_references = F.normalize(references.float(), dim=1)
    nearest = torch.empty(len(queries), dtype=torch.int64, device=features.device)
    for start in range(0, len(queries), _NEAREST_CHUNK):
        block = F.normalize(queries[start:start + _NEAREST_CHUNK].float(), dim=1)
        nearest[start:start + _NEAREST_CHUNK] = (block @ unit_references.T).argmax(1)
    residuals = queries - references[nearest].to(queries.dtype)
    return residuals.reshape(batch, height, width, channels).permute(0, 3, 1, 2).contiguous()


def positional_encoding(height: int, width: int, channels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(height * width, channels) sinusoidal encoding of each position's (y, x) in [0, 1), a quarter
    of the channels each for sin(y), cos(y), sin(x), cos(x) at geometric frequencies."""
    if channels == 0:
        return torch.zeros(height * width, 0, device=device)
    quarter = channels // 4
    frequencies = math.pi * torch.pow(2.0, torch.arange(quarter, dtype=torch.float32, device=device))
    y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
    ys, xs = torch.meshgrid(y, x, indexing="ij")
    angles_y = ys.reshape(-1, 1) * frequencies
    angles_x = xs.reshape(-1, 1) * frequencies
    return torch.cat([angles_y.sin(), angles_y.cos(), angles_x.sin(), angles_x.cos()], 1)


class AffineCoupling(nn.Module):
    """x = [a, b] -> [a, b * exp(s) + t], (s, t) = subnet(a, condition); s soft-clamped to
    (-clamp, clamp) so that a coupling cannot blow up. The last layer starts at zero: identity."""

    def __init__(self, channels: int, condition: int, hidden: int, clamp: float):
        super().__init__()
        self.kept = channels // 2
        self.changed = channels - self.kept
        self.clamp = clamp
        last = nn.Linear(hidden, 2 * self.changed)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.subnet = nn.Sequential(nn.Linear(self.kept + condition, hidden), nn.ReLU(), last)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kept, changed = x[:, :self.kept], x[:, self.kept:]
        raw_scale, shift = self.subnet(torch.cat([kept, condition], 1)).chunk(2, dim=1)
        log_scale = self.clamp * torch.tanh(raw_scale / self.clamp)
        return torch.cat([kept, changed * log_scale.exp() + shift], 1), log_scale.sum(1)


class LevelFlow(nn.Module):
    """A normalizing flow on one level's C-vectors: couplings with fixed channel permutations
    between them (drawn from the block's index, stored as buffers)."""

    def __init__(self, channels: int, condition: int, hidden: int, blocks: int, clamp: float):
        super().__init__()
        self.couplings = nn.ModuleList(AffineCoupling(channels, condition, hidden, clamp) for _ in range(blocks))
        for block in range(blocks):
            order = torch.randperm(channels, generator=torch.Generator().manual_seed(block))
            self.register_buffer(f"permutation{block}", order)

    def negative_log_likelihood(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """(N, C), (N, P) -> (N,) NLL per channel (nats) under a standard normal base."""
        log_det = torch.zeros(len(x), device=x.device, dtype=torch.float32)
        for block, coupling in enumerate(self.couplings):
            x, block_log_det = coupling(x[:, getattr(self, f"permutation{block}")], condition)
            log_det = log_det + block_log_det
        channels = x.shape[1]
        nll = 0.5 * x.pow(2).sum(1) + 0.5 * channels * math.log(2 * math.pi) - log_det
        return nll / channels


class Constraintor(nn.Module):
    """Conv + BN + ReLU, then a linear 1x1 conv: the flow gets a continuous distribution (a ReLU
    output would put mass on exact zeros, where a density is unbounded)."""

    def __init__(self, channels: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(),
                                    nn.Conv2d(channels, channels, 1))

    def forward(self, residuals: torch.Tensor) -> torch.Tensor:
        return self.layers(residuals)


class ResadNetwork(nn.Module):
    """The trainable part (what DDP wraps): per level a constraintor and a flow."""

    def __init__(self, config: ResadConfig):
        super().__init__()
        self.positional_channels = config.positional_channels
        self.constraintors = nn.ModuleList(Constraintor(c) for c in config.channels)
        self.flows = nn.ModuleList(LevelFlow(c, config.positional_channels, config.flow_hidden,
                                             config.coupling_blocks, config.clamp) for c in config.channels)

    def forward(self, residuals: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Residuals per level -> per level (constrained residuals (B, C, h, w), NLL per channel
        (B, h, w)). The flow sees the constrained residuals detached: its loss trains the flow only."""
        out = []
        for constraintor, flow, residual in zip(self.constraintors, self.flows, residuals, strict=True):
            constrained = constraintor(residual)
            batch, channels, height, width = constrained.shape
            vectors = constrained.detach().permute(0, 2, 3, 1).reshape(-1, channels)
            condition = positional_encoding(height, width, self.positional_channels, residual.device).repeat(batch, 1)
            nll = cast(LevelFlow, flow).negative_log_likelihood(vectors, condition).reshape(batch, height, width)
            out.append((constrained, nll))
        return out


def build_network(config: ResadConfig, seed: int) -> ResadNetwork:
    # On the CPU from the seed, in a fork of the global generator: every rank starts from the same
    # weights and the caller's random state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ResadNetwork(config)


def level_masks(masks: torch.Tensor, grid: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, S) bool -> (normal, anomalous) (B, h, w) bool: a cell is normal if no mask pixel
    falls in it, anomalous if most do; cells in between train neither term."""
    covered = F.interpolate(masks[:, None].float(), size=tuple(grid), mode="area")[:, 0]
    return covered == 0, covered > 0.5


def flatten_references(features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per level (shots, C, h, w) -> (shots * h * w, C) reference positions."""
    return [f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]).contiguous() for f in features]


class Resad(nn.Module):
    """A trained ResAD for one class: backbone + networks + that class's reference positions +
    the fit-time NLL statistics; `score` is the contract's call."""

    def __init__(self, config: ResadConfig, network: ResadNetwork, references: Sequence[torch.Tensor],
                 statistics: torch.Tensor):
        super().__init__()
        self.config = config
        self.extractor = shared_feature_extractor(config.backbone, config.stages)
        self.network = network.eval().requires_grad_(False)
        self.references = [r.float() for r in references]  # per level (M, C)
        self.statistics = statistics.float()  # (levels, 2): mean and std of the normals' NLL per channel

    def to(self, *args: Any, **kwargs: Any) -> Resad:  # the shared extractor and the references move too
        super().to(*args, **kwargs)
        device = next(self.network.parameters()).device
        self.extractor.to(device)
        self.references = [r.to(device) for r in self.references]
        self.statistics = self.statistics.to(device)
        return self

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            raise ValueError(f"ResAD expects {size}x{size} inputs, got {tuple(images.shape[-2:])}")
        return [unit_rms(f) for f in self.extractor(images)]

    def with_references(self, images: torch.Tensor) -> Resad:
        """The same networks with another class's references: `shots` normal images (K, 3, S, S)."""
        device = next(self.network.parameters()).device
        return Resad(self.config, self.network, flatten_references(self.features(images.to(device))),
                     self.statistics).to(device)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (image scores (B,), anomaly maps (B, S, S)), float32."""
        size = self.config.image_size
        features = self.features(images)
        with torch.autocast(images.device.type, enabled=False):  # residuals are small differences
            residuals = [nearest_residuals(f, r) for f, r in zip(features, self.references, strict=True)]
            levels = self.network(residuals)
            maps = torch.zeros(len(images), 1, size, size, device=images.device)
            for (_, nll), (mean, std) in zip(levels, self.statistics, strict=True):
                standardised = ((nll - mean) / std)[:, None]
                maps += F.interpolate(standardised, size=(size, size), mode="bilinear", align_corners=False)
            maps = gaussian_blur(maps[:, 0] / len(levels), self.config.map_sigma)
        return image_scores(maps, self.config.image_score), maps.contiguous()

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        """ResAD draws no noise: the row ids are not used."""
        scores, maps = self(images)
        return ScoreBatch(scores, maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"network/{k}": v.detach().cpu().contiguous() for k, v in self.network.state_dict().items()},
                **{f"references/{stage}": r.cpu().contiguous() for stage, r in zip(self.config.stages, self.references,
                                                                                    strict=True)},
                "statistics": self.statistics.cpu().contiguous()}


class ResadTrainingState:
    """`TrainingState` of the method contract.

    Per class a buffer of the most recent `reference_buffer` normal training images' features
    (FIFO); each step draws `shots` of them as the class's references (seeded by the step's
    generator), so residuals are always against images other than the row's own in this step.
    A class whose buffer holds fewer than `shots` images does not train yet. The last
    `statistics_steps` steps also add up the normals' NLL per level (summed over DDP ranks), the
    statistics scores are standardised by. DDP: every rank runs a forward and backward every
    step, on a zero residual with zero loss where it has nothing to train on, so that the
    gradient all-reduce never waits for a rank that skipped. Each rank's buffer is its own; the
    published references are rank 0's (the weights are the same on every rank)."""

    def __init__(self, params: ResadParams, context: TrainingContext):
        self.params = params
        self.config = params.model
        self.device = torch.device(context.device)
        self.extractor = shared_feature_extractor(self.config.backbone, self.config.stages).to(self.device)
        self.module: ResadNetwork = build_network(self.config, params.training.seed).to(self.device).train()
        self.forward_model: nn.Module = self.module  # the Ray glue swaps in a DDP wrapper
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=params.optim.lr,
                                          weight_decay=params.optim.weight_decay)
        self.step = 0
        self.class_names = tuple(context.class_names)
        self.buffers: dict[str, list[torch.Tensor]] = {}  # class -> per level (n, C, h, w), oldest first
        self.nll_sums = torch.zeros(len(self.config.stages), 3, dtype=torch.float64)  # count, sum, sum of squares

    def features(self, images: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        autocast = (torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                    else contextlib.nullcontext())
        with torch.no_grad(), autocast:
            return [unit_rms(f) for f in self.extractor(images)]

    def train_batch(self, batch: TrainingBatch, generator: torch.Generator,
                    autocast_dtype: torch.dtype | None) -> dict[str, float]:
        if batch.masks is None:
            raise ValueError("ResAD trains on synthetic pairs: the batch needs masks")
        pixels = torch.from_numpy(np.ascontiguousarray(batch.pixels)).to(self.device).permute(0, 3, 1, 2).float() / 255
        masks = torch.from_numpy(np.ascontiguousarray(batch.masks)).to(self.device)
        return self.train_features(self.features(pixels, autocast_dtype), [str(c) for c in batch.categories],
                                   masks, generator)

    def train_features(self, features: list[torch.Tensor], categories: Sequence[str], masks: torch.Tensor,
                       generator: torch.Generator) -> dict[str, float]:
        """One step on the unit-RMS features of the batch's images, their classes and masks (B, S, S)."""
        residuals: list[list[torch.Tensor]] = [[] for _ in features]
        rows: list[int] = []
        names = np.asarray(categories, object)
        for category in sorted(set(categories)):
            buffer = self.buffers.get(category)
            if buffer is None or len(buffer[0]) < self.config.shots:
                continue
            chosen = torch.randperm(len(buffer[0]), generator=generator, device=generator.device)[:self.config.shots]
            members = np.flatnonzero(names == category)
            for level, (f, stored) in enumerate(zip(features, buffer, strict=True)):
                references = flatten_references([stored[chosen.to(stored.device)]])[0]
                residuals[level].append(nearest_residuals(f[members], references))
            rows.extend(members.tolist())

        self.optimizer.zero_grad(set_to_none=True)
        if rows:
            index = torch.as_tensor(rows, device=self.device)
            loss, metrics = self._loss([torch.cat(r) for r in residuals], masks[index])
            loss.backward()
        else:  # nothing to train on yet: a zero-loss pass keeps DDP's collectives in step
            self._idle_pass(features)
            metrics = {}
        self.optimizer.step()
        self._remember_normals(features, categories, masks)
        self.step += 1
        return {**metrics, "trained_rows": float(len(rows)), "lr": self.params.optim.lr}

    def _loss(self, residuals: list[torch.Tensor], masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        radius, margin = self.params.sphere_radius, self.params.flow_margin
        one_class = torch.zeros((), device=self.device)
        flow = torch.zeros((), device=self.device)
        gather = self.step >= self.params.training.steps - self.params.statistics_steps
        gathered = torch.zeros_like(self.nll_sums)
        for level, (constrained, nll) in enumerate(self.forward_model(residuals)):
            normal, anomalous = level_masks(masks, nll.shape[-2:])
            rms = constrained.float().pow(2).mean(1).clamp_min(1e-12).sqrt()
            if not normal.any():  # a level where every cell touches an anomaly: nothing to fit to
                continue
            one_class = one_class + F.relu(rms[normal] - radius).mean()
            normal_nll = nll[normal]
            flow = flow + normal_nll.mean()
            if anomalous.any():
                one_class = one_class + F.relu(2 * radius - rms[anomalous]).mean()
                flow = flow + F.relu(normal_nll.mean().detach() + margin - nll[anomalous]).mean()
            if gather:
                values = normal_nll.detach().double()
                gathered[level] = torch.stack([values.new_tensor(float(len(values))), values.sum(),
                                               values.pow(2).sum()]).cpu()
        if gather:
            self._add_statistics(gathered)
        levels = len(residuals)
        loss = (one_class + flow) / levels
        return loss, {"loss": float(loss.item()), "one_class_loss": float(one_class.item()) / levels,
                      "flow_loss": float(flow.item()) / levels}

    def _idle_pass(self, features: list[torch.Tensor]) -> None:
        """Backward of zero times a forward pass on zero residuals; the batch-norm running
        statistics that pass moved are put back."""
        saved = {k: v.clone() for k, v in self.module.state_dict().items() if "running_" in k or "num_batches" in k}
        zeros = [torch.zeros(2, f.shape[1], 2, 2, device=self.device) for f in features]
        loss = sum((0.0 * (c.sum() + n.sum()) for c, n in self.forward_model(zeros)),
                   start=torch.zeros((), device=self.device))
        loss.backward()
        with torch.no_grad():
            for key, value in self.module.state_dict().items():
                if key in saved:
                    value.copy_(saved[key])

    def _add_statistics(self, gathered: torch.Tensor) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            moved = gathered.to(self.device)
            dist.all_reduce(moved)
            gathered = moved.cpu()
        self.nll_sums += gathered

    @torch.no_grad()
    def _remember_normals(self, features: list[torch.Tensor], categories: Sequence[str], masks: torch.Tensor) -> None:
        normal = ~masks.flatten(1).any(1)
        names = np.asarray(categories, object)
        capacity = self.params.reference_buffer
        for category in sorted(set(categories)):
            members = torch.as_tensor(np.flatnonzero(names == category), device=self.device)
            members = members[normal[members]]
            if not len(members):
                continue
            new = [f[members].detach().clone() for f in features]
            old = self.buffers.get(category)
            merged = new if old is None else [torch.cat([o, n]) for o, n in zip(old, new, strict=True)]
            self.buffers[category] = [m[-capacity:] for m in merged]

    def statistics(self) -> torch.Tensor:
        """(levels, 2): mean and std of the normals' NLL per channel over the gathering steps."""
        return statistics_from_sums(self.nll_sums)

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {f"model/{k}": v.detach().to("cpu", copy=True).contiguous()
                   for k, v in self.module.state_dict().items()}
        for category, buffer in self.buffers.items():
            for stage, stored in zip(self.config.stages, buffer, strict=True):
                tensors[f"buffer/{category}/{stage}"] = stored.cpu().clone().contiguous()
        tensors["nll_sums"] = self.nll_sums.clone()
        optimizer_state, adam_steps = optimizer_tensors(self.optimizer)
        tensors.update(optimizer_state)
        return tensors, {"format": _META_FORMAT, "step": self.step, "adam_steps": adam_steps,
                         "buffered_classes": sorted(self.buffers), "steps": self.params.training.steps,
                         "statistics_steps": self.params.statistics_steps}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("format") != _META_FORMAT:
            raise ValueError(f"not a ResAD training checkpoint: format {meta.get('format')!r}")
        for key, mine in (("steps", self.params.training.steps), ("statistics_steps", self.params.statistics_steps)):
            if meta.get(key) != mine:
                raise ValueError(f"checkpoint {key} {meta.get(key)} differs from this run's ({mine})")
        self.module.load_state_dict(renamed(tensors, "model/"))
        self.buffers = {category: [tensors[f"buffer/{category}/{stage}"].clone().to(self.device)
                                   for stage in self.config.stages] for category in meta["buffered_classes"]}
        self.nll_sums = tensors["nll_sums"].clone()
        restore_optimizer(self.optimizer, tensors, meta["adam_steps"])
        self.step = int(meta["step"])


def statistics_from_sums(sums: torch.Tensor) -> torch.Tensor:
    count = sums[:, 0].clamp_min(1)
    mean = sums[:, 1] / count
    variance = (sums[:, 2] / count - mean.pow(2)).clamp_min(0)
    return torch.stack([mean, variance.sqrt().clamp_min(1e-6)], 1).float()


class ResadImplementation:
    """What `pipelines.models.resad`'s record names."""

    @staticmethod
    def describe(config: ResadConfig) -> str:
        return (f"resad ({config.backbone} stages {list(config.stages)}, {config.shots} shots, "
                f"{config.coupling_blocks} couplings per level, {config.image_size}px)")

    @staticmethod
    def build(config: ResadConfig, tensors: dict[str, torch.Tensor] | None) -> Resad:
        network = ResadNetwork(config)
        if tensors is None:  # untrained: references of zeros, unit statistics
            size = config.image_size
            references = [torch.zeros(config.shots * (size // 2 ** (s + 1)) ** 2, c)
                          for s, c in zip(config.stages, config.channels, strict=True)]
            return Resad(config, network, references, torch.tensor([[0.0, 1.0]] * len(config.stages)))
        network.load_state_dict(renamed(tensors, "network/"), strict=True)
        return Resad(config, network, [tensors[f"references/{stage}"] for stage in config.stages],
                     tensors["statistics"])

    @staticmethod
    def with_references(model: Resad, images: torch.Tensor) -> Resad:
        """The contract's "references" capability: `model` applied to another class, given (K, 3, S, S)
        normal images of it in [0, 1]."""
        return model.with_references(images)

    @staticmethod
    def training_state(params: ResadParams, context: TrainingContext) -> ResadTrainingState:
        return ResadTrainingState(params, context)

    @staticmethod
    def published(params: ResadParams, context: TrainingContext, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Published:
        """One model per trained class: the shared networks, the class's newest `shots` buffered
        images as its references, and the fit-time statistics."""
        config = params.model
        network = renamed(tensors, "model/", "network/")
        sums = tensors["nll_sums"]
        if float(sums[:, 0].min()) == 0:
            raise ValueError("ResAD gathered no NLL statistics in its last statistics_steps steps: no class had "
                             f"{config.shots} buffered normal images (model.shots); train longer")
        statistics = statistics_from_sums(sums)
        per_class, missing = {}, []
        for category in context.class_names:
            if category not in meta["buffered_classes"]:
                missing.append(category)
                continue
            references = flatten_references([tensors[f"buffer/{category}/{stage}"][-config.shots:]
                                             for stage in config.stages])
            if len(references[0]) < config.shots * tensors[f"buffer/{category}/{config.stages[0]}"][0, 0].numel():
                missing.append(category)
                continue
            per_class[category] = {**network, "statistics": statistics,
                                   **{f"references/{stage}": r for stage, r in zip(config.stages, references,
                                                                                   strict=True)}}
        if missing:
            raise ValueError(f"ResAD saw fewer than {config.shots} normal images (model.shots) of classes {missing}")
        return Published(
            config=config, tensors=per_class,
            info={"class_names": list(context.class_names), "steps": meta["step"],
                  "statistics": {"mean": statistics[:, 0].tolist(), "std": statistics[:, 1].tolist()}},
            summary=ResadImplementation.describe(config))


IMPLEMENTATION = ResadImplementation()
