"""The evaluate step's `explain:` block: gradient-denoising reconstructions
(`pipelines.models.explanation`) of the report's most anomalous images, with the PaDiM and diffusion
models the spec names. Runs in the driver: a handful of images, a few seconds each on a CPU.

Written to `<step folder>/explanations/<n>.gif` and `<n>.png` (the strip); the report shows the
strip next to the heatmap. A category neither model serves is named in the summary, not skipped
silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.data.preprocess import decode_rgb
from pipelines.errors import InputError
from pipelines.models.artifacts import ModelCard
from pipelines.models.diffusion.config import DdpmConfig
from pipelines.params.evaluate import ExplainSpec
from pipelines.stages.base import StepContext
from pipelines.storage import Location

DIFFUSION_METHODS = ("cgddm", "ddpm", "diffusion_kl")  # artifacts with a U-Net that denoises


@dataclass(frozen=True)
class Explained:
    image_id: str
    strip_png: bytes
    gif_uri: str
    strip_uri: str
    distances: tuple[float, ...]  # PaDiM's mean distance at each frame, the input first
    steps: tuple[int, ...]


def unet_config(method: str, config: Any) -> DdpmConfig:
    """The U-Net's config of a diffusion artifact: a ddpm's is its config, a detector's sits under `.model`."""
    return config if method == "ddpm" else config.model


def check_models(spec: ExplainSpec, context: StepContext) -> tuple[ModelCard, ModelCard]:
    """Both models' cards, refused early (before any image is read) when they are not what `explain` needs."""
    padim = ModelCard.read(context.input_dataset(spec.padim))
    if padim.method != "padim":
        raise InputError(f"explain.padim: {padim.folder.uri} is a {padim.method!r} model; gradient denoising "
                         "descends PaDiM's Mahalanobis distance and needs a 'padim' model")
    diffusion = ModelCard.read(context.input_dataset(spec.diffusion))
    if diffusion.method not in DIFFUSION_METHODS:
        raise InputError(f"explain.diffusion: {diffusion.folder.uri} is a {diffusion.method!r} model; the "
                         f"denoising step needs one of {', '.join(DIFFUSION_METHODS)}")
    network = unet_config(diffusion.method, diffusion.config)
    if network.num_classes:
        raise InputError(f"explain.diffusion: {diffusion.folder.uri} is class-conditional; gradient denoising "
                         "needs an unconditional model")
    if not 1 <= spec.respaced_steps <= network.num_train_timesteps:
        raise InputError(f"explain.respaced_steps: must be at most the model's {network.num_train_timesteps} "
                         f"training timesteps, got {spec.respaced_steps}")
    return padim, diffusion


def explain(spec: ExplainSpec, cards: tuple[ModelCard, ModelCard], chosen: list[tuple[str, str | None, bytes]],
            out: Location) -> tuple[list[Explained], list[str]]:
    """(explanations, notes) of `chosen` (image id, category, encoded image), in order, with the
    (PaDiM, diffusion) models of `check_models`."""
    import numpy as np
    import torch

    from pipelines.evaluation.report import array_png
    from pipelines.models.explanation import GradientDenoising, denoiser, gif, gradient_denoise, strip

    padims, diffusions = cards[0].load(), cards[1].load()
    settings = GradientDenoising(steps=spec.steps, step_size=spec.step_size, denoise_every=spec.denoise_every,
                                 respaced_steps=spec.respaced_steps, denoise_index=spec.denoise_index,
                                 frames=spec.frames)
    size = diffusions.image_size
    explained, notes = [], []
    for number, (image_id, category, encoded) in enumerate(chosen):
        padim_key, diffusion_key = padims.key_for(category), diffusions.key_for(category)
        if padim_key is None or diffusion_key is None:
            missing = "padim" if padim_key is None else "diffusion"
            notes.append(f"{image_id}: not explained, the {missing} model has no model for category {category!r}")
            continue
        padim, network = padims.models[padim_key], diffusions.models[diffusion_key]
        unet = network if diffusions.method == "ddpm" else network.unet
        config = unet_config(diffusions.method, diffusions.config)
        pixels = torch.from_numpy(np.array(decode_rgb(encoded, size))).permute(2, 0, 1)[None].float() / 255
        result = gradient_denoise(pixels, padim.mean_distance, denoiser(unet, config, settings), settings)
        frames = result.frames[:, 0]
        strip_png = array_png(strip(frames))
        gif_location, strip_location = out.join(f"{number:03d}.gif"), out.join(f"{number:03d}.png")
        gif_location.write_bytes(gif(frames))
        strip_location.write_bytes(strip_png)
        explained.append(Explained(image_id=image_id, strip_png=strip_png, gif_uri=gif_location.uri,
                                   strip_uri=strip_location.uri,
                                   distances=tuple(float(d) for d in result.distances[:, 0]), steps=result.steps))
    return explained, notes
