"""The method contract: a detector defined here, in the test, plugs into the stages unchanged.

The detector is small but real: the distance from an image's pooled EfficientNet-Lite0 features
(stage 4, ImageNet weights) to the nearest of the fitted normal images' features. It is registered
at run time, then a pipeline of real stages (ingest -> train -> score -> evaluate) runs it on real
ELPV cells on the embedded Ray; no stage module knows about it.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from imagefiles import small_elpv
from pipelines import datasets
from pipelines.errors import InputError, SpecError
from pipelines.models import methods
from pipelines.models.artifacts import ModelCard
from pipelines.models.backbones import shared_feature_extractor
from pipelines.models.methods import MethodRecord, ScoreBatch
from pipelines.orchestrator import run_job
from pipelines.spec import parse_spec
from pipelines.spec_fields import check_image_size
from pipelines.storage import Location

pytestmark = pytest.mark.integration
NAME = "test-nearest-neighbour"


@dataclass(frozen=True)
class NearestNeighbourParams:
    image_size: int = 64
    seed: int = 0  # the hold-out draw

    def validate(self, path: str) -> NearestNeighbourParams:
        check_image_size(self.image_size, f"{path}.image_size", minimum=32, multiple=32)
        return self


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return shared_feature_extractor("efficientnet_lite0", (4,))(images)[0].mean(dim=(2, 3))


class FeatureBank:
    def __init__(self) -> None:
        self.features: list[torch.Tensor] = []
        self.count = 0


class NearestNeighbour(nn.Module):
    def __init__(self, bank: torch.Tensor):
        super().__init__()
        self.register_buffer("bank", bank)

    def score(self, images: torch.Tensor, row_ids: Sequence[str]) -> ScoreBatch:
        distances = torch.cdist(pooled_features(images), self.bank).min(dim=1).values
        maps = distances[:, None, None].expand(-1, *images.shape[-2:]).contiguous()
        return ScoreBatch(distances, maps)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"bank": self.bank}


class NearestNeighbourFitter:
    def new_statistics(self) -> FeatureBank:
        return FeatureBank()

    def update(self, statistics: FeatureBank, images: torch.Tensor) -> None:
        statistics.features.append(pooled_features(images))
        statistics.count += len(images)

    def merge(self, a: FeatureBank, b: FeatureBank) -> FeatureBank:
        a.features += b.features
        a.count += b.count
        return a

    def model(self, statistics: FeatureBank) -> NearestNeighbour:
        return NearestNeighbour(torch.cat(statistics.features)).eval()


class NearestNeighbourImplementation:
    def plan(self, config: NearestNeighbourParams) -> None:
        return None

    def fitter(self, config: NearestNeighbourParams, plan: None) -> NearestNeighbourFitter:
        return NearestNeighbourFitter()

    def build(self, config: NearestNeighbourParams, tensors: dict[str, torch.Tensor] | None) -> NearestNeighbour:
        return NearestNeighbour(tensors["bank"] if tensors is not None else torch.zeros(0, 320))


@pytest.fixture(scope="module")
def nearest_neighbour():
    """Registered for this module; Ray workers get the record by value (this file is not a
    module they can import)."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    record = methods.register(MethodRecord(
        name=NAME, role="detector", fit="statistics", params=NearestNeighbourParams,
        implementation=NearestNeighbourImplementation, summary="nearest pooled Lite0 feature"))
    yield record
    methods.unregister(NAME)
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def pipeline(root: str, source: str, method: str, block: dict) -> dict:
    return {"kind": "pipeline", "name": "contract", "storage": {"root": root}, "steps": [
        {"name": "ingest", "kind": "ingest", "source": {"type": "elpv", "uri": source, "normal_train_fraction": 0.6},
         "outputs": {"dataset": "cells", "rows_per_part": 16}},
        {"name": "fit", "kind": "train", "method": method, "inputs": {"dataset": "step:ingest"},
         "outputs": {"model": "nn"}, method: block, "threshold": {"holdout_fraction": 0.25},
         "resources": {"workers": 2, "batch_size": 8}},
        {"name": "score", "kind": "score", "inputs": {"dataset": "step:ingest"}, "model": {"uri": "step:fit"},
         "split": "test", "resources": {"workers": 1, "batch_size": 8}},
        {"name": "evaluate", "kind": "evaluate", "inputs": {"dataset": "step:score"}},
    ]}


def test_a_detector_defined_in_a_test_runs_through_every_stage(nearest_neighbour, ray_session, tmp_path):
    root = f"file://{tmp_path}/store"
    spec = parse_spec(pipeline(root, small_elpv(tmp_path / "elpv"), NAME, {"image_size": 64}))
    outcome = run_job(spec, echo=lambda *a, **k: None)

    model = Location.parse(outcome.results["fit"].output)
    card = ModelCard.read(model)
    assert card.method == NAME and card.config == NearestNeighbourParams(image_size=64)
    assert card.categories == ("mono",) and card.thresholds["mono"] > 0
    # All 24 normal training cells fitted: the held-out ones joined the fit after calibration.
    assert card.info["fitted_images"] == {"mono": 24}
    bank = card.load().models["mono"].bank
    assert tuple(bank.shape) == (24, 320)

    scores = datasets.read_table(Location.parse(outcome.results["score"].output))
    assert scores.num_rows == 26 and set(scores["split"].to_pylist()) == {"test"}
    assert all(e is None for e in scores["error"].to_pylist())
    # Independent of the stages: the same distances computed here from the images and the bank.
    images = datasets.read_table(Location.parse(outcome.results["ingest"].output), columns=["image_id", "image"])
    from pipelines.data.preprocess import decode_rgb
    from pipelines.models.inference import to_tensor

    by_id = dict(zip(images["image_id"].to_pylist(), images["image"].to_pylist()))
    ids = scores["image_id"].to_pylist()
    pixels = np.stack([decode_rgb(by_id[i], 64) for i in ids])
    expected = torch.cdist(pooled_features(to_tensor(pixels)), bank).min(dim=1).values.numpy()
    np.testing.assert_allclose(np.asarray(scores["score"].to_pylist()), expected, rtol=1e-4, atol=1e-5)

    metrics = Location.parse(outcome.results["evaluate"].output).join("metrics.json").read_json()
    mono = metrics["per_category"]["mono"]
    assert mono["images"] == 26 and mono["anomalous"] == 10
    assert 0.0 <= mono["image_auroc"] <= 1.0


def test_the_method_block_is_the_registered_params(nearest_neighbour, file_root):
    base = pipeline(file_root, "/nowhere", NAME, {"image_size": 64})
    fit = parse_spec(base).step("fit").params
    assert fit.method_params == NearestNeighbourParams(image_size=64)
    wrong = pipeline(file_root, "/nowhere", NAME, {"image_size": 60})
    with pytest.raises(SpecError, match=rf"steps\[1\]\.{NAME}\.image_size"):
        parse_spec(wrong)
    padim_block = pipeline(file_root, "/nowhere", NAME, {"image_size": 64})
    padim_block["steps"][1]["padim"] = {"image_size": 64}
    with pytest.raises(SpecError, match=r"steps\[1\]\.padim.*the 'padim' method's block"):
        parse_spec(padim_block)


def test_a_generator_is_refused_as_a_detector_by_its_record(nearest_neighbour, file_root):
    generator = dataclasses.replace(nearest_neighbour, name="test-generator", role="generator")
    methods.register(generator)
    try:
        folder = Location.parse(file_root).join("models", "g", "1")
        from pipelines.models.artifacts import save_artifact

        save_artifact(folder, "test-generator", NearestNeighbourParams(), {"*": {"bank": torch.zeros(1, 320)}})
        with pytest.raises(InputError, match="is a 'test-generator' model, which is a generator; scoring needs a "
                                             "detector"):
            ModelCard.read(folder).require("detector", "scoring")
    finally:
        methods.unregister("test-generator")
