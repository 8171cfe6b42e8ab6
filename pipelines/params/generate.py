"""Parameters of `generate`: a few normal images per category -> more normal images, text-guided
(CVPR 2024 "Text-Guided Variational Image Generation"; docs/methods.md#text-guided-normal-generation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.errors import SpecError
from pipelines.spec_fields import (
    DatasetInputSpec,
    DatasetOutputSpec,
    ModelInputSpec,
    ResourcesSpec,
    check_name,
    check_positive,
    normalize_uri,
)

Relation = Literal["synonyms", "hypernyms", "hyponyms", "meronyms"]


@dataclass(frozen=True)
class ObjectWordSpec:
    """Which category is generated, and the WordNet noun that names what its images show."""

    category: str
    word: str  # e.g. "solar cell", "hazelnut", "fabric"

    def validate(self, path: str) -> ObjectWordSpec:
        check_name(self.category, f"{path}.category")
        if not self.word.strip() or len(self.word) > 64:
            raise SpecError(f"{path}.word", f"must be a WordNet noun of at most 64 characters, got {self.word!r}")
        return self


@dataclass(frozen=True)
class PromptSearchSpec:
    """The `prompts:` block: candidate words from WordNet, prompt templates, outlier removal."""

    relations: tuple[Relation, ...] = ("synonyms", "hypernyms", "hyponyms", "meronyms")
    depth: int = 1  # relation hops from the object's synsets (2: hypernyms of hypernyms, ...)
    max_words: int = 32
    templates: tuple[str, ...] = ("a photo of a {object} with {word}",)
    outlier_mads: float = 3.0  # robust standard deviations above the median L2 distance

    def validate(self, path: str) -> PromptSearchSpec:
        if not self.relations or len(set(self.relations)) != len(self.relations):
            raise SpecError(f"{path}.relations", f"must list distinct relations, got {list(self.relations)}")
        check_positive(self.depth, f"{path}.depth")
        if self.depth > 4:
            raise SpecError(f"{path}.depth", f"at most 4 hops (the candidates grow exponentially), got {self.depth}")
        check_positive(self.max_words, f"{path}.max_words")
        if not self.templates:
            raise SpecError(f"{path}.templates", "give at least one template")
        for index, template in enumerate(self.templates):
            if "{object}" not in template or "{word}" not in template:
                raise SpecError(f"{path}.templates[{index}]", f"must contain {{object}} and {{word}}, got {template!r}")
            try:
                template.format(object="x", word="y")
            except (KeyError, IndexError, ValueError):
                raise SpecError(f"{path}.templates[{index}]", "may hold only the fields {object} and {word}, "
                                                              f"got {template!r}") from None
        if not self.outlier_mads > 0:
            raise SpecError(f"{path}.outlier_mads", f"must be > 0, got {self.outlier_mads}")
        return self


@dataclass(frozen=True)
class ClipSpec:
    """The `clip:` block: an open_clip model from a local checkpoint (no weights can be downloaded)."""

    model: str  # an open_clip architecture name (open_clip.list_models()), e.g. ViT-B-32
    checkpoint: str  # file:// or s3:// URI of safetensors or open_clip's .pt
    model_config: str | None = None  # URI of an open_clip model-config JSON, for an architecture open_clip lacks

    def validate(self, path: str) -> ClipSpec:
        if not self.model.strip() or len(self.model) > 128 or any(c.isspace() for c in self.model):
            raise SpecError(f"{path}.model", f"must be an open_clip model name (e.g. ViT-B-32), got {self.model!r}")
        config = normalize_uri(self.model_config, f"{path}.model_config") if self.model_config else None
        return ClipSpec(self.model, normalize_uri(self.checkpoint, f"{path}.checkpoint"), config)


@dataclass(frozen=True)
class IntegratorSpec:
    """The `generator:` block: variance-aware decoding and the knowledge integrator."""

    copies: int = 8  # augmented copies of an image whose per-patch mean latent is decoded
    rounds: int = 4  # candidate image sets generated and compared
    adapt_steps: int = 10  # Adam steps of MSE toward the category's images before each round
    adapt_lr: float = 1e-4
    # selection: features: score = -(distance of the set's mean feature to the real images') +
    # diversity_weight x (mean pairwise feature distance within the set)
    diversity_weight: float = 0.1

    def validate(self, path: str) -> IntegratorSpec:
        for name in ("copies", "rounds"):
            check_positive(getattr(self, name), f"{path}.{name}")
        check_positive(self.adapt_steps, f"{path}.adapt_steps", allow_zero=True)
        if not 0 < self.adapt_lr < 1:
            raise SpecError(f"{path}.adapt_lr", f"must be in (0, 1), got {self.adapt_lr}")
        check_positive(self.diversity_weight, f"{path}.diversity_weight", allow_zero=True)
        return self


@dataclass(frozen=True)
class GenerateParams:
    inputs: DatasetInputSpec  # its normal training rows (split train, label 0) of the listed categories
    model: ModelInputSpec  # a trained generator with the "generate" capability (method: vqgan)
    outputs: DatasetOutputSpec
    objects: tuple[ObjectWordSpec, ...]  # the categories generated, each with its object word
    selection: Literal["clip", "features"] = "clip"
    clip: ClipSpec | None = None  # selection: clip
    prompts: PromptSearchSpec = PromptSearchSpec()
    generator: IntegratorSpec = IntegratorSpec()
    shots: int | None = None  # normal images per category to start from (a seeded choice); default all
    per_image: int = 4  # generated images per starting image
    seed: int = 0
    resources: ResourcesSpec = ResourcesSpec(workers=1, batch_size=16)

    def validate(self, path: str) -> GenerateParams:
        prefix = f"{path}." if path else ""
        if not self.objects:
            raise SpecError(f"{prefix}objects", "name at least one category and its object word, e.g. "
                                                "[{category: mono, word: solar cell}]")
        categories = [o.category for o in self.objects]
        if len(set(categories)) != len(categories):
            raise SpecError(f"{prefix}objects", f"lists a category twice: {categories}")
        if self.selection == "clip" and self.clip is None:
            raise SpecError(f"{prefix}clip", "selection: clip needs a clip: {model, checkpoint} block with a local "
                                             "checkpoint (none can be downloaded here); or use selection: features")
        if self.selection == "features" and self.clip is not None:
            raise SpecError(f"{prefix}clip", "is used only with selection: clip; remove it")
        if self.shots is not None:
            check_positive(self.shots, f"{prefix}shots")
        check_positive(self.per_image, f"{prefix}per_image")
        check_positive(self.seed, f"{prefix}seed", allow_zero=True)
        if self.outputs.rows_per_part is not None:
            raise SpecError(f"{prefix}outputs.rows_per_part", "does not apply to generate: each category is one "
                                                              "output part; remove it")
        return self
