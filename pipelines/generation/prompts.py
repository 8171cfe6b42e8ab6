"""Keyword-to-prompt search (CVPR 2024 text-guided generation, METHODS: section 5), in numpy.

From a category's object word, WordNet gives related words (`pipelines.generation.wordnet`); each
word fills each template ("a photo of a {object} with {word}"), and the plain "a photo of a
{object}" is always a candidate too. Then, with a model that embeds text and images in one space
(CLIP):

1. **outlier removal**: a prompt whose text embedding is far from the category's images (mean L2
   distance between the raw embeddings) is dropped when that distance exceeds the median of all
   candidates by more than `outlier_mads` robust standard deviations (1.4826 x the median absolute
   deviation). Robust statistics, because the planted or nonsense prompts are the few we look for
   and must not inflate the spread that judges them.
2. **selection**: of the prompts kept, the one with the highest mean cosine similarity to the
   images. Ties go to the earlier candidate (the order is fixed), so the search is deterministic.

Without a text embedder (`selection: features`) there is nothing to score prompts with: every
candidate is kept for the record and the plain prompt labels the provenance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipelines.generation.wordnet import Candidate

BASE_TEMPLATE = "a photo of a {object}"
DEFAULT_TEMPLATES = ("a photo of a {object} with {word}",)


@dataclass(frozen=True)
class Prompt:
    text: str
    word: str | None  # None: the plain prompt
    relation: str | None
    depth: int | None
    synset: str | None
    template: str


def prompts_from_words(object_word: str, candidates: Sequence[Candidate],
                       templates: Sequence[str] = DEFAULT_TEMPLATES) -> list[Prompt]:
    """The plain prompt first, then every template with every candidate word, in candidate order."""
    prompts = [Prompt(BASE_TEMPLATE.format(object=object_word), None, None, None, None, BASE_TEMPLATE)]
    for template in templates:
        for candidate in candidates:
            prompts.append(Prompt(template.format(object=object_word, word=candidate.word), candidate.word,
                                  candidate.relation, candidate.depth, candidate.synset, template))
    return prompts


@dataclass(frozen=True)
class PromptScores:
    l2_distance: np.ndarray  # (P,) mean L2 distance of each prompt's text embedding to the images'
    cosine: np.ndarray  # (P,) mean cosine similarity of each prompt to the images
    outlier: np.ndarray  # (P,) bool
    best: int  # index of the chosen prompt


def select_prompt(text_embeddings: np.ndarray, image_embeddings: np.ndarray, outlier_mads: float = 3.0
                  ) -> PromptScores:
    """text_embeddings (P, D), image_embeddings (N, D), raw (not normalised) model outputs."""
    text = np.asarray(text_embeddings, np.float64)
    images = np.asarray(image_embeddings, np.float64)
    if text.ndim != 2 or images.ndim != 2 or text.shape[1] != images.shape[1] or not len(text) or not len(images):
        raise ValueError(f"need (P, D) text and (N, D) image embeddings, got {text.shape} and {images.shape}")
    distance = np.linalg.norm(text[:, None, :] - images[None, :, :], axis=-1).mean(axis=1)
    median = float(np.median(distance))
    spread = 1.4826 * float(np.median(np.abs(distance - median)))
    outlier = distance > median + outlier_mads * spread + 1e-9 * max(1.0, median)
    unit_text = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    unit_images = images / np.maximum(np.linalg.norm(images, axis=1, keepdims=True), 1e-12)
    cosine = (unit_text @ unit_images.T).mean(axis=1)
    kept = np.flatnonzero(~outlier)
    best = int(kept[np.argmax(cosine[kept])])  # argmax takes the first of equal values
    return PromptScores(distance.astype(np.float32), cosine.astype(np.float32), outlier, best)
