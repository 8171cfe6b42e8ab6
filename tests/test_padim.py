"""PaDiM compute code against independent references (numpy / scipy), and its artifact round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage
import scipy.spatial.distance
import torch

from pipelines.models.anomaly_maps import gaussian_blur
from pipelines.models.artifacts import TrainedModels
from pipelines.models.inference import decode_map, encode_map, score_in_slots
from pipelines.models.padim import PadimConfig
from pipelines.models.padim.model import Padim, PadimStatistics
from pipelines.storage import Location

SMALL = PadimConfig(stages=(1, 2), kept_channels=12, image_size=64, seed=3)


def random_embeddings(count: int, channels: int = 6, size: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(channels, channels, generator=generator)
    return torch.einsum("bchw,cd->bdhw", torch.randn(count, channels, size, size, generator=generator), mix)


def test_streamed_statistics_match_numpy_covariance():
    embeddings = random_embeddings(40)
    streamed = PadimStatistics(6, 9)
    for chunk in embeddings.split(7):  # uneven chunks, as workers would see them
        streamed.update(chunk)
    halves = PadimStatistics(6, 9)
    halves.update(embeddings[:25])
    other = PadimStatistics(6, 9)
    other.update(embeddings[25:])
    halves.merge(other)
    epsilon = 0.01
    mean, inverse = streamed.gaussian(epsilon)
    flat = embeddings.numpy().reshape(40, 6, 9)
    for position in range(9):
        samples = flat[:, :, position].astype(np.float64)
        np.testing.assert_allclose(mean[position].numpy(), samples.mean(0), rtol=1e-5, atol=1e-5)
        reference = np.linalg.inv(np.cov(samples, rowvar=False) + epsilon * np.eye(6))
        np.testing.assert_allclose(inverse[position].numpy(), reference, rtol=1e-4, atol=1e-4)
    merged_mean, merged_inverse = halves.gaussian(epsilon)
    torch.testing.assert_close(merged_mean, mean)
    torch.testing.assert_close(merged_inverse, inverse, rtol=1e-4, atol=1e-4)


def test_gaussian_with_many_channels_on_several_threads_matches_numpy():
    # torch's batched LU inverse hangs in MKL above ~128 channels on more than one thread
    # (pytorch/pytorch#141358); 176 = every channel of Lite0 stages 1-3. A child process with a
    # timeout turns such a hang into a failure.
    script = """
import numpy as np, torch
from pipelines.models.padim.model import PadimStatistics
torch.set_num_threads(2)
generator = torch.Generator().manual_seed(0)
embeddings = torch.randn(200, 176, 4, 4, generator=generator) * torch.rand(176, 1, 1, generator=generator)
statistics = PadimStatistics(176, 16)
statistics.update(embeddings)
mean, inverse = statistics.gaussian(0.01)
samples = embeddings.numpy().reshape(200, 176, 16).astype(np.float64)
for position in (0, 7, 15):
    reference = np.linalg.inv(np.cov(samples[:, :, position], rowvar=False) + 0.01 * np.eye(176))
    np.testing.assert_allclose(inverse[position].numpy(), reference, rtol=1e-4, atol=1e-3)
print("ok")
"""
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                               cwd=Path(__file__).resolve().parents[1])
    assert completed.returncode == 0 and "ok" in completed.stdout, completed.stderr[-2000:]


def test_non_finite_features_are_named():
    statistics = PadimStatistics(6, 9)
    embeddings = random_embeddings(10)
    embeddings[3, 2, 1, 1] = float("nan")
    statistics.update(embeddings)
    with pytest.raises(ValueError, match="not positive definite at 1 of 9 positions"):
        statistics.gaussian(0.01)


def test_too_few_images_is_refused():
    statistics = PadimStatistics(6, 9)
    statistics.update(random_embeddings(1))
    with pytest.raises(ValueError, match="at least 2"):
        statistics.gaussian(0.01)


def test_gaussian_blur_matches_scipy():
    maps = torch.rand(2, 37, 41)
    ours = gaussian_blur(maps, 4.0).numpy()
    for i in range(2):
        # torch's "reflect" padding is scipy's "mirror" (the edge pixel is not repeated)
        reference = scipy.ndimage.gaussian_filter(maps[i].numpy().astype(np.float64), 4.0, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(ours[i], reference, atol=1e-5)


@pytest.fixture(scope="module")
def fitted() -> Padim:
    model = Padim(SMALL)
    statistics = model.new_statistics()
    generator = torch.Generator().manual_seed(0)
    statistics.update(model.embed(torch.rand(12, 3, 64, 64, generator=generator)))
    model.set_gaussian(statistics)
    return model.eval()


def test_map_is_the_mahalanobis_distance_per_position(fitted):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    raw = Padim(PadimConfig(**{**SMALL.__dict__, "map_sigma": 0.0}), channel_indices=fitted.channel_indices)
    raw.mean, raw.inverse_covariance = fitted.mean, fitted.inverse_covariance
    embedding = raw.embed(image)[0].numpy()  # (D, 16, 16)
    grid = embedding.shape[-1]
    distances = np.array([[scipy.spatial.distance.mahalanobis(
        embedding[:, y, x], raw.mean[y * grid + x].numpy(), raw.inverse_covariance[y * grid + x].numpy())
        for x in range(grid)] for y in range(grid)])
    _, maps = raw(image)
    low_res = torch.nn.functional.interpolate(torch.from_numpy(distances)[None, None].float(), size=(64, 64),
                                              mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps[0], low_res, rtol=1e-3, atol=1e-3)


def test_channel_subset_is_seeded_and_saved(fitted, tmp_path):
    assert torch.equal(Padim(SMALL).channel_indices, fitted.channel_indices)
    assert not torch.equal(Padim(PadimConfig(**{**SMALL.__dict__, "seed": 4})).channel_indices,
                           fitted.channel_indices)
    folder = Location.parse(str(tmp_path / "model"))
    TrainedModels("padim", SMALL, {"a": fitted, "b": fitted}, {"a": 1.5, "b": 2.5}).save(folder)
    loaded = TrainedModels.load(folder)
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(9))
    for key in ("a", "b"):
        torch.testing.assert_close(loaded.models[key](images)[1], fitted(images)[1], rtol=0, atol=0)
    assert loaded.thresholds == {"a": 1.5, "b": 2.5}
    assert loaded.key_for("a") == "a" and loaded.key_for("zzz") is None


def test_scores_do_not_depend_on_how_rows_are_grouped(fitted):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    rows = np.arange(10)
    together, maps_together = score_in_slots(fitted, pixels, rows, batch_size=4)
    apart = np.concatenate([score_in_slots(fitted, pixels[i:i + 3], rows[i:i + 3], batch_size=4)[0]
                            for i in range(0, 10, 3)])
    assert together.tobytes() == apart.tobytes()  # bit for bit
    order = rng.permutation(10)
    shuffled, _ = score_in_slots(fitted, pixels[order], rows[order], batch_size=4)
    assert shuffled.tobytes() == together[order].tobytes()


def test_anomaly_map_png_round_trip_is_within_one_level():
    anomaly_map = np.random.default_rng(1).normal(5, 2, (64, 64)).astype(np.float32)
    data, low, high = encode_map(anomaly_map)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    restored = decode_map(data, low, high)
    assert np.abs(restored - anomaly_map).max() <= (high - low) / 255 / 2 + 1e-5


def test_image_score_max_finds_a_local_defect_and_mean_a_global_one_on_a_real_texture():
    """PaDiM's map is per position, so its `max` image score sees a spot unlike the training
    patches (a grass patch in brick) but not a whole weave rescaled 1.6x, whose every patch is
    still brick-like at some offset; `mean` adds up the small rise everywhere (README "Global
    defects"). Fitted on real brick crops (scikit-image), defects made by the test."""
    from texture_defects import SIZE, patched, rescaled, texture_crops

    from pipelines.evaluation.metrics import auroc

    def tensor(pixels: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255

    config = PadimConfig(image_size=SIZE)
    model = Padim(config)
    statistics = model.new_statistics()
    statistics.update(model.embed(tensor(texture_crops(40, SIZE, seed=0, rows=slice(0, 256)))))
    model.set_gaussian(statistics)
    test = texture_crops(30, SIZE, seed=1, rows=slice(256, None))
    good = tensor(test[:10])
    local = tensor(np.stack([patched(test[10 + i], seed=i) for i in range(10)]))
    whole = tensor(np.stack([rescaled(test[20 + i]) for i in range(10)]))
    labels = np.r_[np.zeros(10), np.ones(10)]
    found = {}
    for reduction in ("max", "mean"):
        scorer = Padim(PadimConfig(**{**config.__dict__, "image_score": reduction}),
                       channel_indices=model.channel_indices)
        scorer.mean, scorer.inverse_covariance = model.mean, model.inverse_covariance
        scores = {name: scorer.eval()(images)[0].numpy() for name, images in
                  (("good", good), ("local", local), ("global", whole))}
        found[reduction] = {kind: auroc(labels, np.r_[scores["good"], scores[kind]]) for kind in ("local", "global")}
    print(found)
    assert found["max"]["local"] >= 0.9 and found["mean"]["global"] >= 0.9, found
