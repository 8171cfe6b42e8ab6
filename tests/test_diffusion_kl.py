"""`method: diffusion_kl` (noise-removal scoring, Lu et al. ICCV 2023): the per-pixel KL of a reverse
step checked against the two Gaussians computed independently (float64 numpy, torch.distributions),
the per-image noise, the train state's statistics and checkpoints, spec errors, and the whole path
on real Ray (train on brick crops, score local defects, rerun byte-identical, error rows for bad bytes)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from texture_defects import patched, png, texture_crops

from imagefiles import corrupt_png, publish_archive, truncated_png, write
from pipelines import datasets
from pipelines.errors import SpecError
from pipelines.evaluation.metrics import auroc
from pipelines.models.anomaly_maps import gaussian_blur
from pipelines.models.backbones import FeatureExtractor
from pipelines.models.diffusion.config import DdpmConfig, OptimConfig
from pipelines.models.diffusion.samplers import respaced
from pipelines.models.diffusion.scoring import noise_for, noised, posterior_kl_maps
from pipelines.models.diffusion.unet import build_unet
from pipelines.models.diffusion_kl import DiffusionKlConfig, DiffusionKlParams, DiffusionKlScoring, FeatureHead
from pipelines.models.diffusion_kl.model import IMPLEMENTATION as DIFFUSION_KL
from pipelines.models.diffusion_kl.model import class_map_sums, moments
from pipelines.models.inference import score_in_slots
from pipelines.models.methods import GradientTrainingSpec, TrainingBatch, TrainingContext
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.storage import Location

TINY = DdpmConfig(image_size=16, block_out_channels=(16, 32), attention_blocks=(), learned_variance=True)


def quiet(*_args, **_kwargs) -> None:
    pass


def _reference_kl(output: np.ndarray, x0: np.ndarray, xt: np.ndarray, ab: float, ab_prev: float) -> np.ndarray:
    """KL(q(x_{i-1}|x_i,x0) || p(x_{i-1}|x_i)) per element, from first principles in float64: the
    respaced step's beta from the cumulative products; the posterior by Gaussian conditioning
    (precisions add); the model's mean as the posterior's with x0 predicted from eps; its log
    variance interpolated between log beta and log beta~ by (v + 1) / 2; the KL by torch.distributions."""
    beta = 1.0 - ab / ab_prev
    precision = 1.0 / (1.0 - ab_prev) + (1.0 - beta) / beta
    true_variance = 1.0 / precision

    def posterior_mean(x_start):
        return true_variance * (np.sqrt(ab_prev) * x_start / (1.0 - ab_prev) + np.sqrt(1.0 - beta) * xt / beta)

    eps, v = output[:, :3], output[:, 3:]
    x0_predicted = (xt - np.sqrt(1.0 - ab) * eps) / np.sqrt(ab)
    log_variance = (v + 1) / 2 * np.log(beta) + (1 - (v + 1) / 2) * np.log(true_variance)
    q = torch.distributions.Normal(torch.from_numpy(posterior_mean(x0)), float(np.sqrt(true_variance)))
    p = torch.distributions.Normal(torch.from_numpy(posterior_mean(x0_predicted)),
                                   torch.from_numpy(np.exp(0.5 * log_variance)))
    return torch.distributions.kl_divergence(q, p).numpy()


def test_the_kl_of_a_step_is_the_kl_of_the_two_gaussians():
    torch.manual_seed(0)
    model = build_unet(TINY).eval()
    diffusion, timesteps = respaced(TINY, 250)
    assert timesteps[:3] == [0, 4, 8]
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    indices = (5, 50, 100)
    noise = torch.randn(2, 3, 3, 16, 16, generator=g)
    got = posterior_kl_maps(model, diffusion, timesteps, x0, indices, noise)
    assert got.shape == (2, 3, 16, 16) and got.dtype == torch.float32
    ab_kept = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))[timesteps]  # the linear schedule, independently
    for k, index in enumerate(indices):
        ab, ab_prev = ab_kept[index], ab_kept[index - 1]
        xt = np.sqrt(ab) * x0.double().numpy() + np.sqrt(1 - ab) * noise[:, k].double().numpy()
        np.testing.assert_allclose(noised(diffusion, x0, indices, noise)[:, k].numpy(), xt, atol=1e-5)
        with torch.no_grad():
            output = model(torch.from_numpy(xt).float(), torch.full((2,), timesteps[index])).sample.double().numpy()
        expected = _reference_kl(output, x0.double().numpy(), xt, ab, ab_prev).mean(axis=1) / np.log(2)
        np.testing.assert_allclose(got[:, k].numpy(), expected, rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="indices must be in 1..249"):
        posterior_kl_maps(model, diffusion, timesteps, x0, (0,), noise[:, :1])


def test_noise_is_fixed_by_the_image_id_whatever_its_batch():
    first = noise_for(["a", "b", "c"], "p", 0, (2, 3, 4, 4))
    again = noise_for(["c", "a"], "p", 0, (2, 3, 4, 4))
    torch.testing.assert_close(first[0], again[1], rtol=0, atol=0)
    torch.testing.assert_close(first[2], again[0], rtol=0, atol=0)
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], noise_for(["a"], "p", 1, (2, 3, 4, 4))[0])  # the seed redraws


def _params(steps: int = 6, statistics_steps: int = 3, head: bool = False, alpha: float = 0.5,
            stage: int = 1) -> DiffusionKlParams:
    return DiffusionKlParams(model=TINY, optim=OptimConfig(lr=1e-3, ema_decay=0.5),
                             training=GradientTrainingSpec(steps=steps), statistics_steps=statistics_steps,
                             scoring=DiffusionKlScoring(timesteps=(5, 50), map_sigma=1.0, top_pixels=8, alpha=alpha),
                             feature_head=FeatureHead(enabled=head, stage=stage)).validate("p")


def _batch(seed: int) -> TrainingBatch:
    rng = np.random.default_rng(seed)
    return TrainingBatch(pixels=rng.integers(90, 160, (4, 16, 16, 3), dtype=np.uint8), categories=np.array(["a"] * 4))


@pytest.mark.parametrize("head", [False, True], ids=["kl", "feature-head"])
def test_the_last_steps_gather_the_kl_moments_and_a_resumed_state_steps_identically(head):
    context = TrainingContext(class_names=("a",), device="cpu", seed=0)
    params = _params(head=head)
    state = DIFFUSION_KL.training_state(params, context)
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        metrics = state.train_batch(_batch(step), generator, None)
        assert ("feature_mse" in metrics) == head
        gathered = state.kl_sums[0, 0].item()
        assert gathered == (0 if step < 3 else (step - 2) * 4 * 16 * 16), step  # count of map values
    tensors, meta = state.state_tensors()
    published = DIFFUSION_KL.published(params, context, tensors, meta)
    [model_tensors] = published.tensors.values()
    np.testing.assert_allclose(model_tensors["kl_moments"].numpy(), moments(state.kl_sums).numpy())
    assert (model_tensors["kl_moments"][:, 1] > 0).all()
    assert ("feature_moments" in model_tensors) == head and any(k.startswith("head/") for k in model_tensors) == head
    if head:
        np.testing.assert_allclose(model_tensors["feature_moments"].numpy(), moments(state.sums["feature"]).numpy())

    # A checkpoint mid-window resumes to the same weights and the same sums.
    runs = []
    for resume in (False, True):
        state = DIFFUSION_KL.training_state(params, context)
        generator = torch.Generator().manual_seed(0)
        for step in range(4):
            state.train_batch(_batch(step), generator, None)
        if resume:
            tensors, meta = state.state_tensors()
            generator_state = generator.get_state()
            state = DIFFUSION_KL.training_state(params, context)
            state.load_state_tensors(tensors, meta)
            generator = torch.Generator()
            generator.set_state(generator_state)
        for step in range(4, 6):
            state.train_batch(_batch(step), generator, None)
        runs.append(state.state_tensors()[0])
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key
    other = DIFFUSION_KL.training_state(_params(statistics_steps=2, head=head), context)
    with pytest.raises(ValueError, match="statistics_steps"):
        other.load_state_tensors(*state.state_tensors())
    other = DIFFUSION_KL.training_state(_params(head=not head), context)
    with pytest.raises(ValueError, match="feature_head"):
        other.load_state_tensors(*state.state_tensors())


def test_scoring_is_deterministic_and_finds_a_bright_square():
    context = TrainingContext(class_names=("a",), device="cpu", seed=0)
    params = _params(steps=40, statistics_steps=5)
    state = DIFFUSION_KL.training_state(params, context)
    generator = torch.Generator().manual_seed(0)
    for step in range(40):
        state.train_batch(_batch(step), generator, None)
    published = DIFFUSION_KL.published(params, context, *state.state_tensors())
    [tensors] = published.tensors.values()
    model = DIFFUSION_KL.build(published.config, tensors)
    images = torch.from_numpy(_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    images[3, :, 4:8, 4:8] = 1.0
    result = model.score(images, ["a", "b", "c", "d"])
    assert result.scores.shape == (4,) and result.maps.shape == (4, 16, 16)
    assert int(result.scores.argmax()) == 3
    peak = divmod(int(result.maps[3].argmax()), 16)
    assert 3 <= peak[0] <= 8 and 3 <= peak[1] <= 8, peak
    again = model.score(images, ["a", "b", "c", "d"])
    assert torch.equal(result.scores, again.scores) and torch.equal(result.maps, again.maps)
    rebuilt = DIFFUSION_KL.build(published.config, model.tensors())
    assert torch.equal(rebuilt.score(images, ["a", "b", "c", "d"]).scores, result.scores)
    # bf16 autocast as the score stage uses it on GPUs (CPU autocast here), through the stage's own
    # batching: the U-Net runs in bf16, the maps move a little, the square is still found.
    slots, ids = np.arange(4), ["a", "b", "c", "d"]
    pixels = (images.permute(0, 2, 3, 1) * 255).round().byte().numpy()
    exact_scores, exact_maps = score_in_slots(model, pixels, slots, 4, row_ids=ids)
    low = [score_in_slots(model, pixels, slots, 4, row_ids=ids, autocast_dtype=torch.bfloat16) for _ in range(2)]
    assert low[0][1].dtype == np.float32 and not np.array_equal(low[0][1], exact_maps)
    np.testing.assert_array_equal(low[0][1], low[1][1])  # a rerun is identical
    assert int(np.argmax(low[0][0])) == int(np.argmax(exact_scores)) == 3
    assert np.corrcoef(low[0][1].ravel(), exact_maps.ravel())[0, 1] > 0.95
    with pytest.raises(ValueError, match="16x16"):
        model.score(torch.zeros(1, 3, 32, 32), [""])


def _trained_with_head(steps: int = 40, alpha: float = 0.5):
    context = TrainingContext(class_names=("a",), device="cpu", seed=0)
    params = _params(steps=steps, statistics_steps=5, head=True, alpha=alpha)
    state = DIFFUSION_KL.training_state(params, context)
    generator = torch.Generator().manual_seed(0)
    history = [state.train_batch(_batch(step), generator, None) for step in range(steps)]
    published = DIFFUSION_KL.published(params, context, *state.state_tensors())
    [tensors] = published.tensors.values()
    return state, history, published.config, tensors


def _features_by_hand(unet, head_weight, head_bias, x_t, t, size):
    """The head's prediction recomputed outside `UNetWithFeatureHead`: a hook of the test's own on
    decoder block 0, the 1x1 convolution as a matrix product, a mean over each feature cell."""
    caught = []
    handle = unet.up_blocks[0].register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        with torch.no_grad():
            unet(x_t, t)
    finally:
        handle.remove()
    [hidden] = caught
    projected = torch.einsum("oc,bchw->bohw", head_weight[:, :, 0, 0], hidden) + head_bias[None, :, None, None]
    cell = projected.shape[-1] // size
    return projected.unflatten(2, (size, cell)).unflatten(4, (size, cell)).mean(dim=(3, 5))


def test_the_feature_head_learns_and_its_map_is_the_error_of_the_predicted_features():
    state, history, config, tensors = _trained_with_head()
    # The head's loss falls as it learns the features of the training images.
    assert np.mean([h["feature_mse"] for h in history[-5:]]) < 0.7 * np.mean([h["feature_mse"] for h in history[:5]])
    model = DIFFUSION_KL.build(config, tensors)
    images = torch.from_numpy(_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    ids = ["a", "b", "c", "d"]
    maps = model.raw_maps(images, ids)
    assert maps["kl"].shape == maps["feature"].shape == (4, 2, 16, 16)

    # The feature-error map from first principles: x_i as q(x_i | x0) with the image's noise, the
    # backbone's features scaled to unit RMS per position, the squared error averaged over channels.
    diffusion, timesteps = respaced(TINY, 250)
    x0 = images * 2 - 1
    noise = noise_for(ids, "diffusion_kl:noise", 0, (2, 3, 16, 16))
    extractor = FeatureExtractor("efficientnet_lite0", (1,))
    with torch.no_grad():
        [target] = extractor(images)
    target = target / target.pow(2).mean(dim=1, keepdim=True).sqrt()
    for k, index in enumerate((5, 50)):
        x_t = noised(diffusion, x0, (index,), noise[:, k:k + 1])[:, 0]
        predicted = _features_by_hand(model.unet, tensors["head/weight"], tensors["head/bias"], x_t,
                                      torch.full((4,), timesteps[index]), size=4)
        error = (predicted - target).pow(2).mean(dim=1, keepdim=True)
        expected = torch.nn.functional.interpolate(error, size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        torch.testing.assert_close(maps["feature"][:, k], expected, rtol=1e-4, atol=1e-5)

    # The EMA copy (what is published) predicts with its own weights: its hook is its own.
    ema = state.ddpm.state.ema
    x_t = noised(diffusion, x0, (5,), noise[:, :1])[:, 0]
    t = torch.full((4,), timesteps[5])
    with torch.no_grad():
        got = ema(x_t, t).features
    expected = _features_by_hand(ema.unet, ema.head.weight, ema.head.bias, x_t, t, size=4)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    # The map: alpha x standardised KL + (1 - alpha) x standardised feature error, averaged over the
    # timesteps, smoothed; alpha = 1 is exactly the KL-only detector on the same U-Net.
    kl_m, feature_m = tensors["kl_moments"].numpy(), tensors["feature_moments"].numpy()
    standard = ((maps["kl"].numpy() - kl_m[None, :, 0, None, None]) / kl_m[None, :, 1, None, None],
                (maps["feature"].numpy() - feature_m[None, :, 0, None, None]) / feature_m[None, :, 1, None, None])
    mixed = torch.from_numpy((0.5 * standard[0] + 0.5 * standard[1]).mean(axis=1))
    torch.testing.assert_close(model.score(images, ids).maps, gaussian_blur(mixed, 1.0), rtol=1e-4, atol=1e-4)
    kl_only_config = DiffusionKlConfig(model=config.model, scoring=config.scoring)
    kl_only = DIFFUSION_KL.build(kl_only_config, {k: v for k, v in tensors.items()
                                                  if not k.startswith("head/") and k != "feature_moments"})
    alpha_one = DIFFUSION_KL.build(DiffusionKlConfig(model=config.model, feature_head=config.feature_head,
                                                     scoring=DiffusionKlScoring(**{**vars(config.scoring),
                                                                                   "alpha": 1.0})), tensors)
    torch.testing.assert_close(alpha_one.score(images, ids).maps, kl_only.score(images, ids).maps, rtol=0, atol=0)


def test_a_model_with_a_feature_head_round_trips_and_finds_a_bright_square():
    _, _, config, tensors = _trained_with_head()
    model = DIFFUSION_KL.build(config, tensors)
    images = torch.from_numpy(_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    images[3, :, 4:8, 4:8] = 1.0
    ids = ["a", "b", "c", "d"]
    result = model.score(images, ids)
    assert int(result.scores.argmax()) == 3
    peak = divmod(int(result.maps[3].argmax()), 16)
    assert 3 <= peak[0] <= 9 and 3 <= peak[1] <= 9, peak
    rebuilt = DIFFUSION_KL.build(config, model.tensors())
    assert model.tensors().keys() == tensors.keys()
    again = rebuilt.score(images, ids)
    assert torch.equal(again.scores, result.scores) and torch.equal(again.maps, result.maps)
    # The feature error alone also ranks the square first: the head's half of the map finds it too.
    feature_only = DIFFUSION_KL.build(DiffusionKlConfig(model=config.model, feature_head=config.feature_head,
                                                        scoring=DiffusionKlScoring(**{**vars(config.scoring),
                                                                                      "alpha": 0.0})), tensors)
    assert int(feature_only.score(images, ids).scores.argmax()) == 3


def test_class_map_sums_give_each_class_the_mean_and_spread_of_its_own_maps():
    rng = np.random.default_rng(0)
    maps = torch.from_numpy(rng.standard_normal((6, 2, 4, 4)))
    labels = torch.tensor([2, 0, 2, 2, 0, 1])
    maps[labels == 2] = maps[labels == 2] * 3 + 5  # class 2's maps have another mean and spread
    got = moments(class_map_sums(maps, labels, 3), ("a", "b", "c")).numpy()
    assert got.shape == (3, 2, 2)
    for label in range(3):
        values = maps[labels == label].transpose(0, 1).flatten(1).numpy()  # (K, pixels of that class)
        np.testing.assert_allclose(got[label, :, 0], values.mean(axis=1), rtol=1e-5)
        np.testing.assert_allclose(got[label, :, 1], values.std(axis=1, ddof=1), rtol=1e-5)
    with pytest.raises(ValueError, match=r"class\(es\) \['b'\]"):  # class 1 ("b") never drawn
        moments(class_map_sums(maps[labels != 1], labels[labels != 1], 3), ("a", "b", "c"))


def _two_class_batch(seed: int) -> TrainingBatch:
    """Dark "a" cells and bright "b" cells, two of each."""
    rng = np.random.default_rng(seed)
    pixels = np.concatenate([rng.integers(20, 80, (2, 16, 16, 3)), rng.integers(170, 230, (2, 16, 16, 3))])
    return TrainingBatch(pixels=pixels.astype(np.uint8), categories=np.array(["a", "a", "b", "b"]))


def test_a_class_conditional_model_scores_each_category_with_its_class_and_its_moments(file_root):
    from dataclasses import replace

    from pipelines.models.artifacts import ModelCard, save_artifact
    from pipelines.models.diffusion.scoring import kl_from_outputs

    context = TrainingContext(class_names=("a", "b"), device="cpu", seed=0)
    params = replace(_params(steps=30, statistics_steps=10), class_conditional=True).validate("p")
    state = DIFFUSION_KL.training_state(params, context)
    generator = torch.Generator().manual_seed(0)
    for step in range(30):
        state.train_batch(_two_class_batch(step), generator, None)
    assert state.kl_sums.shape == (2, 2, 3)
    assert state.kl_sums[:, 0, 0].tolist() == [10 * 2 * 16 * 16] * 2  # each class's pixels, counted apart
    published = DIFFUSION_KL.published(params, context, *state.state_tensors())
    assert published.config.class_names == ("a", "b") and published.config.model.num_classes == 2
    assert "class-conditional over 2 classes" in published.summary
    [tensors] = published.tensors.values()
    assert tensors["kl_moments"].shape == (2, 2, 2)  # the network once, the moments per class
    whole = DIFFUSION_KL.build(published.config, tensors)
    views = DIFFUSION_KL.category_models(published.config, {"*": whole})
    assert sorted(views) == ["a", "b"]
    for label, name in enumerate(("a", "b")):
        assert views[name].network is whole.network  # shared, not copied
        torch.testing.assert_close(views[name].map_moments("kl"), tensors["kl_moments"][label])
    # The bright cells' KL is not the dark cells': the moments differ by class.
    assert not torch.allclose(tensors["kl_moments"][0], tensors["kl_moments"][1])

    images = torch.from_numpy(_two_class_batch(99).pixels).permute(0, 3, 1, 2).float() / 255
    ids = ["p", "q", "r", "s"]
    # A view's raw maps are the U-Net's called with that class, computed here without the view.
    x0 = images * 2 - 1
    noise = noise_for(ids, "diffusion_kl:noise", params.scoring.seed, (2, 3, 16, 16))
    xt = noised(whole.diffusion, x0, (5, 50), noise).flatten(0, 1)
    index = torch.tensor([5, 50] * 4)
    model_t = torch.tensor([whole.timesteps[i] for i in (5, 50)] * 4)
    for label, name in enumerate(("a", "b")):
        with torch.no_grad():
            output = whole.unet(xt, model_t, class_labels=torch.full((8,), label)).sample
        expected = kl_from_outputs(whole.diffusion, x0, xt, index, output)
        torch.testing.assert_close(views[name].kl_maps(images, ids), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(views["a"].kl_maps(images, ids), views["b"].kl_maps(images, ids))  # the class matters
    with pytest.raises(ValueError, match="scores through a category's model"):
        whole.score(images, ids)
    with pytest.raises(ValueError, match="save the whole model"):
        views["a"].tensors()

    # Saved once, loaded as one model per category that scores as the in-memory one; other
    # categories have no model.
    folder = Location.parse(file_root).join("models", "kl-classes", "1")
    save_artifact(folder, "diffusion_kl", published.config, published.tensors, thresholds={"a": 1.0, "b": 2.0})
    loaded = ModelCard.read(folder).load()
    assert sorted(loaded.models) == ["a", "b"] and loaded.key_for("c") is None
    assert loaded.config.class_names == ("a", "b")
    for name in ("a", "b"):
        expected, got = views[name].score(images, ids), loaded.models[name].score(images, ids)
        assert torch.equal(got.scores, expected.scores) and torch.equal(got.maps, expected.maps)
    # A loaded model saves again as it was saved: the whole network once, not a view per class.
    again = Location.parse(file_root).join("models", "kl-classes", "2")
    loaded.save(again)
    assert again.join("model.safetensors").read_bytes() == folder.join("model.safetensors").read_bytes()
    assert ModelCard.read(again).categories == ModelCard.read(folder).categories
    reloaded = ModelCard.read(again).load()
    for name in ("a", "b"):
        assert torch.equal(reloaded.models[name].score(images, ids).maps, views[name].score(images, ids).maps)


def test_bad_parameters_are_refused_naming_the_field(file_root):
    def spec(block: dict) -> dict:
        return {"kind": "train", "name": "kl-bad", "storage": {"root": file_root}, "method": "diffusion_kl",
                "inputs": {"dataset": f"{file_root}/datasets/x/1"}, "outputs": {"model": "m"}, "diffusion_kl": block}

    cases = [({"scoring": {"timesteps": [0, 5]}}, r"diffusion_kl\.scoring\.timesteps\[0\]: must be an index in 1..249"),
             ({"scoring": {"timesteps": [5, 300]}}, r"diffusion_kl\.scoring\.timesteps\[1\]"),
             ({"scoring": {"timesteps": [5, 5]}}, r"diffusion_kl\.scoring\.timesteps: has duplicates"),
             ({"scoring": {"timesteps": []}}, r"diffusion_kl\.scoring\.timesteps"),
             ({"scoring": {"respaced_steps": 2000}}, r"diffusion_kl\.scoring\.respaced_steps"),
             ({"scoring": {"normalisation": "none"}}, r"diffusion_kl\.scoring\.normalisation"),
             ({"scoring": {"top_pixels": 0}}, r"diffusion_kl\.scoring\.top_pixels"),
             ({"statistics_steps": 5000}, r"diffusion_kl\.statistics_steps: must be at most training\.steps"),
             ({"model": {"num_classes": 3}}, r"diffusion_kl\.model\.num_classes"),
             ({"model": {"image_size": 15}}, r"diffusion_kl\.model\.image_size"),
             ({"class_conditional": "yes"}, r"diffusion_kl\.class_conditional"),
             ({"class_conditonal": True}, r"diffusion_kl\.class_conditonal"),
             ({"scoring": {"alpha": 1.5}}, r"diffusion_kl\.scoring\.alpha: must be in \[0, 1\]"),
             ({"feature_head": {"enabled": True, "stage": 7}}, r"diffusion_kl\.feature_head\.stage"),
             ({"feature_head": {"enabled": True, "backbone": "resnet50"}}, r"diffusion_kl\.feature_head\.backbone"),
             ({"feature_head": {"enabled": True, "weight": -1}}, r"diffusion_kl\.feature_head\.weight"),
             ({"feature_head": {"enabled": True, "wieght": 1}}, r"diffusion_kl\.feature_head\.wieght"),
             ({"feature_head": {"enabled": True, "decoder_block": 3}},
              r"diffusion_kl\.feature_head\.decoder_block: must be a decoder block of the U-Net, 0..2"),
             ({"model": {"image_size": 16, "block_out_channels": [16, 32]},
               "feature_head": {"enabled": True, "stage": 4}},
              r"diffusion_kl\.feature_head\.stage: stage 4 has stride 32")]
    for block, message in cases:
        with pytest.raises(SpecError, match=message):
            parse_spec(spec(block))


# ---- the whole path on real Ray ----------------------------------------------------------------

SIZE = 32  # the model's px: the 128 px crops are resized when decoded


def write_archive(folder) -> None:
    """MVTec layout: 40 brick crops to train on; 10 good test crops, 10 with a grass patch, and
    one test file that is not an image (ingest refuses it by name)."""
    for i, pixels in enumerate(texture_crops(40, 128, seed=0, rows=slice(0, 256))):
        write(folder / "brick" / "train" / "good" / f"{i:03d}.png", png(pixels))
    test = texture_crops(20, 128, seed=1, rows=slice(256, None))
    for i in range(10):
        write(folder / "brick" / "test" / "good" / f"{i:03d}.png", png(test[i]))
        write(folder / "brick" / "test" / "patch" / f"{i:03d}.png", png(patched(test[10 + i], i)))
    write(folder / "brick" / "test" / "patch" / "broken.png", b"not a png")


def kl_pipeline(root: str, images) -> dict:
    return {
        "kind": "pipeline", "name": "kl-test", "storage": {"root": root}, "ray": {"address": "local"},
        "steps": [
            {"name": "ingest", "kind": "ingest", "source": {"type": "mvtec", "uri": str(images)},
             "outputs": {"dataset": "brick"}},
            {"name": "train", "kind": "train", "method": "diffusion_kl", "inputs": {"dataset": "step:ingest"},
             "outputs": {"model": "kl-brick", "version": "1"},
             "diffusion_kl": {
                 "model": {"image_size": SIZE, "block_out_channels": [16, 32], "attention_blocks": [],
                           "learned_variance": True},
                 "optim": {"lr": 2e-3, "ema_decay": 0.99, "warmup_steps": 10},
                 "training": {"steps": 300, "checkpoint_every": 150, "log_every": 50, "max_rotation": 0},
                 "scoring": {"timesteps": [5], "map_sigma": 2.0, "top_pixels": 16},
                 "statistics_steps": 10},
             "threshold": {"method": "normal_quantile", "quantile": 0.9, "holdout_fraction": 0.2},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
            {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:train"},
             "split": "test", "outputs": {"anomaly_maps": True},
             "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}},
        ],
    }


def test_diffusion_kl_trains_on_ray_scores_every_row_and_reruns_byte_identically(ray_session, s3_root, tmp_path):
    write_archive(tmp_path / "archive")
    outcome = run_job(parse_spec(kl_pipeline(s3_root, tmp_path / "archive")), run_id="kl-1", echo=quiet)
    model = Location.parse(outcome.results["train"].output)
    config = model.join("config.json").read_json()
    assert config["method"] == "diffusion_kl" and config["config"]["scoring"]["timesteps"] == [5]
    images = Location.parse(outcome.results["ingest"].output)
    assert datasets.read_manifest(images).extra["rejected"]["rows"] == 1
    rejected = pq.read_table(pa.BufferReader(images.join("rejected.parquet").read_bytes())).to_pylist()
    assert [r["image_id"] for r in rejected] == ["brick/test/patch/broken.png"]  # refused at ingest, named
    scored = Location.parse(outcome.results["score"].output)
    rows = datasets.read_table(scored).to_pylist()
    assert len(rows) == 20 and not any(r["error"] for r in rows)
    good = [r["score"] for r in rows if "/good/" in r["image_id"]]
    bad = [r["score"] for r in rows if "/patch/" in r["image_id"]]
    # A 32 px U-Net trained 300 steps on 2 CPUs finds the grass patches at t = 5: out of Ray, on these
    # images, training seeds 0-3 gave 0.99, 0.99, 0.95, 0.98 (200 steps: 0.80-0.97). The paper's
    # timesteps 50 and 100 need a better-trained model (README, "diffusion_kl").
    assert auroc(np.r_[np.zeros(10), np.ones(10)], np.r_[good, bad]) >= 0.85

    rerun = {"kind": "score", "name": "rescore", "storage": {"root": s3_root}, "split": "test",
             "inputs": {"dataset": outcome.results["ingest"].output}, "model": {"uri": outcome.results["train"].output},
             "outputs": {"anomaly_maps": True}, "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}}
    again = run_job(parse_spec(rerun), run_id="kl-2", echo=quiet).results["rescore"]
    columns = ["image_id", "score", "anomaly_map", "error", "label_pred"]
    first = datasets.read_table(scored, columns=columns).sort_by("image_id")
    second = datasets.read_table(Location.parse(again.output), columns=columns).sort_by("image_id")
    assert first.equals(second)

    # An archive another system wrote, unchecked: bad bytes get error rows, every row gets a row.
    test_rows = datasets.read_table(Location.parse(outcome.results["ingest"].output)).to_pylist()
    entries = [(r["image_id"], r["image"], "brick", "test", r["label"]) for r in test_rows if r["split"] == "test"]
    odd = publish_archive(Location.parse(s3_root).join("datasets", "odd-brick", "1"),
                          [entries[:3] + [("bad/corrupt.png", corrupt_png(), "brick", "test", 1)],
                           [("bad/truncated.png", truncated_png(), "brick", "test", 0)] + entries[3:5]])
    result = run_job(parse_spec({**rerun, "inputs": {"dataset": odd.uri}, "split": None}), run_id="kl-3",
                     echo=quiet).results["rescore"]
    odd_rows = {r["image_id"]: r for r in datasets.read_table(Location.parse(result.output)).to_pylist()}
    assert len(odd_rows) == 7
    assert {i for i, r in odd_rows.items() if r["error"]} == {"bad/corrupt.png", "bad/truncated.png"}
    assert all(r["score"] is None for i, r in odd_rows.items() if i.startswith("bad/"))
    assert all(np.isfinite(r["score"]) for i, r in odd_rows.items() if not i.startswith("bad/"))


def test_top_mean_is_the_mean_of_the_highest_pixels():
    from pipelines.models.anomaly_maps import top_mean

    maps = torch.from_numpy(np.random.default_rng(0).standard_normal((3, 8, 8)).astype(np.float32))
    expected = np.sort(maps.numpy().reshape(3, -1), axis=1)[:, -5:].mean(axis=1)
    np.testing.assert_allclose(top_mean(maps, 5).numpy(), expected, rtol=1e-6)
    torch.testing.assert_close(top_mean(maps, 1), maps.amax(dim=(1, 2)))
    torch.testing.assert_close(top_mean(maps, 1000), maps.mean(dim=(1, 2)))


def test_the_small_cpu_spec_trains_one_class_conditional_model_with_a_threshold_per_cell_type(ray_session, s3_root):
    """jobs/train-diffusion-detector-small.yaml's diffusion_kl half as users run it (real ELPV cells
    of both types -> one class-conditional U-Net on Ray Train -> every test cell scored and
    evaluated), on the test's S3 prefix; then a category the model never learnt gets an error row."""
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parent.parent / "jobs" / "train-diffusion-detector-small.yaml")
                          .read_text())
    spec["storage"]["root"] = s3_root
    spec["steps"] = [s for s in spec["steps"] if s["name"] in ("ingest-elpv", "train-kl", "score-kl", "evaluate-kl")]
    train = spec["steps"][1]["diffusion_kl"]
    assert train["class_conditional"] is True
    # The suite's time budget: a 32 px U-Net for 40 steps instead of the shipped 64 px one for 500;
    # every stage and every other setting is as shipped.
    train["model"] = {**train["model"], "image_size": SIZE, "block_out_channels": [16, 32], "attention_blocks": []}
    train["training"] = {**train["training"], "steps": 40, "checkpoint_every": 20, "log_every": 20}
    train["statistics_steps"] = 10
    outcome = run_job(parse_spec(spec), run_id="kl-small-1", echo=quiet)

    model = Location.parse(outcome.results["train-kl"].output)
    config = model.join("config.json").read_json()
    assert config["categories"] == ["*"]  # the network is saved once
    assert config["config"]["class_names"] == ["mono", "poly"] and config["config"]["model"]["num_classes"] == 2
    assert sorted(config["thresholds"]) == ["mono", "poly"]  # calibrated per cell type
    assert any("class-conditional over 2 classes" in line for line in outcome.results["train-kl"].summary)
    images = datasets.read_table(Location.parse(outcome.results["ingest-elpv"].output), columns=["split"])
    rows = datasets.read_table(Location.parse(outcome.results["score-kl"].output)).to_pylist()
    assert len(rows) == images.column("split").to_pylist().count("test") and not any(r["error"] for r in rows)
    assert {r["category"] for r in rows} == {"mono", "poly"}
    for row in rows:
        threshold = config["thresholds"][row["category"]]
        assert row["threshold"] == pytest.approx(threshold) and row["label_pred"] == (row["score"] > threshold)
    per_category = outcome.results["evaluate-kl"].details["per_category"]
    assert sorted(per_category) == ["mono", "poly"]
    assert all(0 <= per_category[c]["image_auroc"] <= 1 for c in per_category)

    cells = [(r["image_id"], r["image"], r["category"], "test", r["label"])
             for r in datasets.read_table(Location.parse(outcome.results["ingest-elpv"].output)).to_pylist()[:2]]
    odd = publish_archive(Location.parse(s3_root).join("datasets", "other-cells", "1"),
                          [cells + [("thin-film/000.png", cells[0][1], "thin-film", "test", 0)]])
    rescore = {"kind": "score", "name": "rescore", "storage": {"root": s3_root}, "inputs": {"dataset": odd.uri},
               "model": {"uri": model.uri}, "resources": {"workers": 1, "cpus_per_worker": 1, "batch_size": 8}}
    result = run_job(parse_spec(rescore), run_id="kl-small-2", echo=quiet).results["rescore"]
    scored = {r["image_id"]: r for r in datasets.read_table(Location.parse(result.output)).to_pylist()}
    assert scored["thin-film/000.png"]["error"] == "no model for category 'thin-film'"
    assert all(not scored[image_id]["error"] for image_id, *_ in cells)
