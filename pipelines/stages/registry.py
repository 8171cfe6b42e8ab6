"""Registry of stage kinds. A new kind is a module in this package with `KIND = StageKind(...)`, added below."""

from __future__ import annotations

from pipelines.stages import describe, evaluate, ingest, sample, score, synthesize, train
from pipelines.stages.base import StageKind, StepContext, StepResult


def _registry(*kinds: StageKind) -> dict[str, StageKind]:
    registry: dict[str, StageKind] = {}
    for kind in kinds:
        if kind.name in registry or kind.name == "pipeline":
            raise RuntimeError(f"stage kind {kind.name!r} registered twice")
        registry[kind.name] = kind
    return registry


STAGE_KINDS = _registry(ingest.KIND, describe.KIND, train.KIND, sample.KIND, synthesize.KIND, score.KIND,
                        evaluate.KIND)

__all__ = ["STAGE_KINDS", "StageKind", "StepContext", "StepResult"]
