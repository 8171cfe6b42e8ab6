"""DDPM (Ho et al. 2020) with the improved-DDPM learned variance (Nichol & Dhariwal 2021), in plain
torch. The Ray Train glue lives in `pipelines/stages`; nothing in this package knows about Ray.

Laid out like diffusers (models / schedulers / pipelines), so that a new way to sample or to score
is a new module here, not a branch in an existing one:

- `config`: the parameter dataclasses `DdpmConfig` (the network and its noise schedule, saved with
  the weights), `OptimConfig` and `DdpmParams` (the train step's `ddpm:` block), with their
  checks. Torch-free, so specs parse and validate without importing torch.
- `unet`: the diffusers `UNet2DModel` and `DDPMScheduler` built from a `DdpmConfig`, and the
  class-label check shared by training and sampling.
- `process`: `Diffusion`, the forward process q, the posterior, the reverse-process
  parameterisation p and the training losses (noise MSE + variational bound).
- `samplers`: ways to draw images from a trained network; today ancestral sampling over respaced
  timesteps with RealNet's SDAS variance scale. A new sampler (DDIM, guided) is a new module next
  to it that builds on `process.Diffusion`.
- `training`: `TrainingState`, the one train step and what a checkpoint holds, with its
  learning-rate schedule.
- `method`: the method contract's implementation (`pipelines.models.methods`): building a U-Net
  from an artifact, the train state the gradient train path drives, what is published.
- `scoring`: anomaly maps from a trained network, the per-pixel KL of a reverse step (the
  `diffusion_kl` detector, `pipelines.models.diffusion_kl`, is built on it). Another way to
  score (CGDDM's reconstruction) is a module beside it.

This file registers the `ddpm` method (a generator: SDAS anomalies and samples, not a detector)
and imports only torch-free modules.
"""

from pipelines.models.diffusion.config import DdpmConfig, DdpmParams
from pipelines.models.methods import MethodRecord, register

METHOD = register(MethodRecord(
    name="ddpm", role="generator", fit="gradient", params=DdpmParams, artifact_config=DdpmConfig,
    capabilities=frozenset({"sample", "sdas"}),
    implementation="pipelines.models.diffusion.method:IMPLEMENTATION",
    summary="denoising diffusion U-Net (improved-DDPM learned variance optional)",
    paper="Ho et al., DDPM, NeurIPS 2020; Nichol & Dhariwal, improved DDPM, ICML 2021"))
