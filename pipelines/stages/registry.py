"""Registry of stage kinds: each kind's runtime (`KIND = StageKind(...)` in its module here), paired
with its parameter class in `pipelines.params.STAGE_PARAMS`, the one list of kind names (and their
order). A new kind is a params module there and a module in this package, added below; the
registry refuses a kind that is not in STAGE_PARAMS, or whose `params` is another class.
"""

from __future__ import annotations

from types import ModuleType

from pipelines.params import STAGE_PARAMS
from pipelines.stages import describe, evaluate, generate, ingest, nightly, sample, score, synthesize, train
from pipelines.stages.base import StageKind, StepContext, StepResult


def _registry(*modules: ModuleType) -> dict[str, StageKind]:
    registry: dict[str, StageKind] = {}
    for module in modules:
        kind: StageKind = module.KIND
        if kind.name in registry or kind.name == "pipeline":
            raise RuntimeError(f"stage kind {kind.name!r} registered twice")
        if kind.name not in STAGE_PARAMS:
            raise RuntimeError(f"stage kind {kind.name!r} ({module.__name__}) is not in pipelines.params.STAGE_PARAMS")
        expected = STAGE_PARAMS[kind.name]
        if kind.params is not expected:
            raise RuntimeError(f"stage kind {kind.name!r} ({module.__name__}) takes {kind.params.__module__}."
                               f"{kind.params.__qualname__}, but STAGE_PARAMS says {expected.__module__}."
                               f"{expected.__qualname__}")
        registry[kind.name] = kind
    missing = [name for name in STAGE_PARAMS if name not in registry]
    if missing:
        raise RuntimeError(f"no stage module registered for {', '.join(map(repr, missing))} of STAGE_PARAMS")
    return {name: registry[name] for name in STAGE_PARAMS}


STAGE_KINDS = _registry(ingest, describe, train, sample, synthesize, generate, score, evaluate, nightly)

__all__ = ["STAGE_KINDS", "StageKind", "StepContext", "StepResult"]
