"""The VQGAN generator (`pipelines.models.vqgan`) on real ELPV cells, without Ray: what training
learns, what mean-latent decoding makes, the artifact round trip and exact resume, adaptation,
and the spec checks.

One small VQGAN (32 px, two levels of 16/32 channels, 64 codes) is trained once for the module
through `VqganTrainingState.train_batch` on 8 real normal monocrystalline cells, with the train
stage's per-step generator seeds. What the checks mean:

- *It learnt its training images.* Mono cells are so alike that a model can reconstruct other
  mono cells about as well as its own (0.0017 vs 0.0015 MSE in a trial run), so "training vs
  other cells" would compare how hard the cells are, not what was learnt. Instead the training
  cells are compared with the same cells rotated by 90 degrees: exactly the same pixel values,
  in an orientation (vertical busbars) the model never saw. Measured here 0.0023 vs 0.0175 MSE
  (7.5x; 1.8-11x in trial runs with other training seeds); the test asks 1.5x, and 10x below
  the untrained model (0.055). Other mono cells, never seen (0.0036), are also far better than
  before training and better than the rotated cells: it learnt the category, not only 8 images.
- *Mean-latent decoding makes variations that stay normal.* Its output equals the decoding of
  the mean of the copies' nearest codes, recomputed here from the model's pieces with the same
  draws; those means are mostly no codebook entry (94% of the patches measured); the output
  differs from the nearest-code reconstruction (mean abs difference measured 0.047, floor 0.01).
  In pooled EfficientNet-Lite0 features (stages 3-4, unit-normalised, as the generate stage's
  `features` embedding), the outputs' mean distance to the real cells' mean feature (measured
  0.25; the real cells themselves: 0.12) is below that of images decoded from a uniformly random
  code per patch (0.33: what the decoder makes of latents that are no image's) and at most 1.5x
  the nearest-code reconstruction's (0.22): the jitter's variation is meant, a drift away from
  the cells is not.
- *Adaptation* (15 Adam steps toward 8 unseen cells) lowers their MSE (measured 0.0036 ->
  0.0023; asked: by 10%), changes only the decoder side, and leaves the given model as it was.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.data.preprocess import decode_rgb
from pipelines.data.sources import elpv_labels, elpv_package_root
from pipelines.errors import SpecError
from pipelines.models import methods
from pipelines.models.artifacts import ModelCard, save_artifact
from pipelines.models.backbones import shared_feature_extractor
from pipelines.models.methods import AdamSpec, GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.models.vqgan import VqganConfig, VqganJitter, VqganLoss, VqganParams
from pipelines.models.vqgan.model import IMPLEMENTATION as VQGAN
from pipelines.models.vqgan.model import VqganGenerator, jitter_images
from pipelines.spec import parse_spec
from pipelines.storage import Location

SIZE = 32
CONFIG = VqganConfig(image_size=SIZE, block_out_channels=(16, 32), norm_num_groups=8, num_vq_embeddings=64,
                     mid_block_attention=False)
PARAMS = VqganParams(model=CONFIG, optim=AdamSpec(lr=1e-3), training=GradientTrainingSpec(steps=250, seed=0))
CONTEXT = TrainingContext(class_names=("mono",), device="cpu", seed=0)


def elpv_cells(start: int, count: int) -> np.ndarray:
    """(count, SIZE, SIZE, 3) uint8: normal mono cells `start`.. of the installed ELPV, decoded as ingest does."""
    root = elpv_package_root()
    normals = [path for path, probability, kind in elpv_labels(root) if kind == "mono" and probability == 0.0]
    return np.stack([decode_rgb(root.join(path).read_bytes(), SIZE) for path in normals[start:start + count]])


def as_images(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255


def step_generator(step: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009)  # the train stage's, rank 0


def train(state, pixels: np.ndarray, steps: int) -> list[dict[str, float]]:
    categories = np.array(["mono"] * len(pixels))
    return [state.train_batch(TrainingBatch(pixels, categories), step_generator(state.step), None)
            for _ in range(steps)]


def mse(model: VqganGenerator, images: torch.Tensor) -> float:
    return float((model.reconstruct(images) - images).pow(2).mean())


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(1234)  # nothing may draw from it; a draw would show as a changed result
    state = VQGAN.training_state(PARAMS, CONTEXT)
    before = VQGAN.build(CONFIG, state.module.tensors())
    pixels = elpv_cells(0, 8)
    history = train(state, pixels, PARAMS.training.steps)
    return {"state": state, "before": before, "model": VQGAN.build(CONFIG, state.module.tensors()),
            "history": history, "train": as_images(pixels), "unseen": as_images(elpv_cells(8, 8))}


def test_training_learns_its_cells(trained):
    model, before, cells, unseen = trained["model"], trained["before"], trained["train"], trained["unseen"]
    rotated = cells.rot90(1, (2, 3)).contiguous()  # the same pixels, busbars vertical: never seen
    own, other, turned = mse(model, cells), mse(model, unseen), mse(model, rotated)
    assert own < mse(before, cells) / 10, (own, mse(before, cells))
    assert turned > 1.5 * own, (own, turned)
    assert other < mse(before, unseen) / 10 and other < turned, (other, turned)

    history = trained["history"]
    assert set(history[0]) == {"loss", "reconstruction", "perceptual", "codebook", "codes_used", "lr"}
    w = PARAMS.loss
    for metrics in history:
        assert metrics["loss"] == pytest.approx(w.reconstruction * metrics["reconstruction"] + w.perceptual
                                                * metrics["perceptual"] + w.codebook * metrics["codebook"], rel=1e-5)
    first, last = (float(np.mean([m["loss"] for m in part])) for part in (history[:20], history[-20:]))
    assert last < first / 3, (first, last)
    assert history[-1]["codes_used"] >= CONFIG.num_vq_embeddings // 2  # the codebook did not collapse
    assert history[-1]["lr"] == PARAMS.optim.lr


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    extractor = shared_feature_extractor("efficientnet_lite0", (3, 4))
    with torch.no_grad():
        return F.normalize(torch.cat([f.mean((2, 3)) for f in extractor(images)], 1), dim=1)


def distance_to(real: torch.Tensor, images: torch.Tensor) -> float:
    return float((pooled_features(images) - pooled_features(real).mean(0)).norm(dim=1).mean())


def test_mean_latent_decoding_varies_images_and_stays_near_the_cells(trained):
    model, cells = trained["model"], trained["train"]
    copies = 8
    generated = torch.cat([model.mean_latent_decode(cells[i:i + 1], copies, torch.Generator().manual_seed(i))
                           for i in range(len(cells))])
    assert generated.shape == cells.shape and float(generated.min()) >= 0 and float(generated.max()) <= 1

    # Against the recipe, recomputed from the model's pieces with the same draws.
    image, generator = cells[:1], torch.Generator().manual_seed(0)
    augmented = jitter_images(image.repeat(copies, 1, 1, 1), CONFIG.jitter, generator)
    with torch.no_grad():
        codes, _, indices = model.quantize(augmented)
        mean = codes.mean(0, keepdim=True)
        expected = model.decode_latents(mean).clamp(0, 1)
        assert torch.equal(generated[:1], expected)
        codebook = model.vqmodel.quantize.embedding.weight
        # the copies were snapped to codes; their mean is generally none of them
        snapped = codebook[indices].permute(0, 3, 1, 2)  # (copies, h, w, D) -> (copies, D, h, w)
        assert torch.allclose(codes, snapped, atol=1e-6)
        nearest = torch.cdist(mean.permute(0, 2, 3, 1).reshape(-1, CONFIG.vq_embed_dim), codebook).min(1).values
        assert float((nearest > 1e-4).float().mean()) > 0.5
    assert torch.equal(VQGAN.vary(model, image, copies, torch.Generator().manual_seed(0)), generated[:1])
    again = model.mean_latent_decode(image, copies, torch.Generator().manual_seed(0))
    other_seed = model.mean_latent_decode(image, copies, torch.Generator().manual_seed(99))
    assert torch.equal(again, generated[:1]) and not torch.equal(other_seed, again)

    reconstructed = model.reconstruct(cells)
    assert float((generated - reconstructed).abs().mean()) > 0.01
    random_codes = torch.randint(0, CONFIG.num_vq_embeddings, (len(cells), *model.latent_grid),
                                 generator=torch.Generator().manual_seed(0))
    scrambled = model.decode_indices(random_codes)
    d_generated, d_reconstructed, d_random = (distance_to(cells, x) for x in (generated, reconstructed, scrambled))
    assert d_generated < d_random, (d_generated, d_random)
    assert d_generated < 1.5 * d_reconstructed, (d_generated, d_reconstructed)

    # An explicit jitter replaces the config's: none at all averages identical copies, the
    # nearest-code reconstruction again (up to the straight-through estimator's rounding).
    still = VqganJitter(brightness=0, contrast=0, saturation=0, translate=0, noise=0)
    plain = model.mean_latent_decode(image, 3, torch.Generator().manual_seed(0), jitter=still)
    assert torch.allclose(plain, reconstructed[:1], atol=1e-5)


def test_saved_model_is_identical_and_a_resumed_state_steps_identically(trained, tmp_path):
    state, cells = trained["state"], trained["train"]
    tensors, meta = state.state_tensors()
    published = VQGAN.published(PARAMS, CONTEXT, tensors, meta)
    assert published.config == CONFIG and set(published.tensors) == {"*"}
    assert published.info["steps"] == PARAMS.training.steps and published.info["class_names"] == ["mono"]
    folder = Location.parse(tmp_path.as_uri())
    save_artifact(folder, "vqgan", published.config, published.tensors, info=published.info)
    card = ModelCard.read(folder).require("generator", "generation", capability="generate")
    loaded = card.load().models["*"]
    rebuilt = VQGAN.build(published.config, trained["model"].tensors())
    for model in (loaded, rebuilt):
        assert torch.equal(model.reconstruct(cells), trained["model"].reconstruct(cells))
        assert torch.equal(model.mean_latent_decode(cells[:2], 4, torch.Generator().manual_seed(5)),
                           trained["model"].mean_latent_decode(cells[:2], 4, torch.Generator().manual_seed(5)))

    # Resume: a state restored from step 3's checkpoint takes the same step 4 as one that ran on.
    small = dataclasses.replace(PARAMS, training=GradientTrainingSpec(steps=4, seed=3))
    pixels = elpv_cells(0, 4)
    ran_on, restored = VQGAN.training_state(small, CONTEXT), VQGAN.training_state(small, CONTEXT)
    train(ran_on, pixels, 3)
    restored.load_state_tensors(*ran_on.state_tensors())
    assert restored.step == 3
    for each in (ran_on, restored):
        train(each, pixels, 1)
    (a, meta_a), (b, meta_b) = ran_on.state_tensors(), restored.state_tensors()
    assert meta_a == meta_b and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    checkpoint, checkpoint_meta = ran_on.state_tensors()
    with pytest.raises(ValueError, match="not a VQGAN training checkpoint"):
        restored.load_state_tensors(checkpoint, {**checkpoint_meta, "format": "adpipe.pfm-train/1"})
    longer = VQGAN.training_state(dataclasses.replace(small, training=GradientTrainingSpec(steps=5)), CONTEXT)
    with pytest.raises(ValueError, match="checkpoint steps"):
        longer.load_state_tensors(checkpoint, checkpoint_meta)
    wider = VQGAN.training_state(dataclasses.replace(small, model=dataclasses.replace(CONFIG, num_vq_embeddings=32)),
                                 CONTEXT)
    with pytest.raises(ValueError, match="checkpoint config"):
        wider.load_state_tensors(checkpoint, checkpoint_meta)


def test_adapting_lowers_the_error_on_its_inputs_and_leaves_the_model_alone(trained):
    model, unseen = trained["model"], trained["unseen"]
    original = model.tensors()
    with torch.inference_mode():  # as a caller holding a loaded model may call it
        # 1e-4, the stage's default rate. At 1e-3 the gain was only 9% for the model trained with one
        # torch thread (as in the full suite; threads change float sums, so the trajectory):
        # 0.00155 -> 0.00140; at 1e-4 it is 0.00155 -> 0.00062 (1 thread), 0.00362 -> 0.00104 (2).
        adapted = VQGAN.adapt(model, unseen, 15, 1e-4, seed=0)
    assert mse(adapted, unseen) < 0.8 * mse(model, unseen), (mse(adapted, unseen), mse(model, unseen))
    for name, tensor in model.tensors().items():
        assert torch.equal(tensor, original[name]), name
    changed = {name for name, tensor in adapted.tensors().items() if not torch.equal(tensor, original[name])}
    assert changed and all(name.startswith(("vqmodel.decoder.", "vqmodel.post_quant_conv.")) for name in changed)
    assert torch.equal(VQGAN.adapt(model, unseen, 15, 1e-4, seed=0).tensors()["vqmodel.decoder.conv_out.weight"],
                       adapted.tensors()["vqmodel.decoder.conv_out.weight"])  # deterministic
    assert not any(p.requires_grad for p in adapted.parameters())


def test_the_vqgan_block_parses_and_bad_values_name_their_field(file_root):
    def spec(vqgan: dict) -> dict:
        return {"kind": "train", "name": "vqgan-spec", "storage": {"root": file_root}, "method": "vqgan",
                "inputs": {"dataset": f"{file_root}/datasets/x/1"}, "outputs": {"model": "m"}, "vqgan": vqgan}

    good = parse_spec(spec({"model": {"image_size": 32, "block_out_channels": [16, 32], "norm_num_groups": 8,
                                      "jitter": {"translate": 0.1}},
                            "loss": {"perceptual": 0.2}, "training": {"steps": 10}})).steps[0].params.method_params
    assert good == VqganParams(model=VqganConfig(image_size=32, block_out_channels=(16, 32), norm_num_groups=8,
                                                 jitter=VqganJitter(translate=0.1)),
                               loss=VqganLoss(perceptual=0.2), training=GradientTrainingSpec(steps=10))
    cases = [({"model": {"latent_chanels": 8}}, r"vqgan\.model\.latent_chanels.*did you mean 'latent_channels'"),
             ({"modle": {}}, r"vqgan\.modle.*did you mean 'model'"),
             ({"model": {"image_size": 66}}, r"vqgan\.model\.image_size: must be a multiple of 4"),
             ({"model": {"image_size": 8}}, r"vqgan\.model\.image_size"),
             ({"model": {"norm_num_groups": 24}}, r"vqgan\.model\.norm_num_groups: must divide"),
             ({"model": {"block_out_channels": []}}, r"vqgan\.model\.block_out_channels"),
             ({"model": {"num_vq_embeddings": 1}}, r"vqgan\.model\.num_vq_embeddings"),
             ({"model": {"jitter": {"translate": 0.7}}}, r"vqgan\.model\.jitter\.translate"),
             ({"model": {"jitter": {"brightness": -0.1}}}, r"vqgan\.model\.jitter\.brightness"),
             ({"loss": {"codebook": 0}}, r"vqgan\.loss\.codebook: must be > 0"),
             ({"loss": {"reconstruction": 0, "perceptual": 0}}, r"vqgan\.loss\.reconstruction"),
             ({"loss": {"perceptual_stages": [2, 1]}}, r"vqgan\.loss\.perceptual_stages"),
             ({"model": {"image_size": 16, "block_out_channels": [16, 32]}, "loss": {"perceptual_stages": [4]}},
              r"vqgan\.loss\.perceptual_stages: stage 4 has stride 32"),
             ({"optim": {"lr": 0}}, r"vqgan\.optim\.lr")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))
    with pytest.raises(SpecError, match=r"per_category.*vqgan"):
        parse_spec({**spec({}), "per_category": True})

    record = methods.method("vqgan")
    assert "vqgan" in methods.method_names()
    assert (record.role, record.fit, record.capabilities) == ("generator", "gradient", frozenset({"generate"}))
    assert record.config_class is VqganConfig
