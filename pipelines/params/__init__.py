"""The parameter classes of the stage kinds, one module per kind: what a step of that kind takes in
a job spec, and its checks. `STAGE_PARAMS` (kind name -> class) is the one list of kind names:
`pipelines.spec` parses steps by it and `pipelines.stages.registry` pairs each kind with its runtime.

Nothing here imports torch, Ray, pyarrow or YAML (only the standard library, `pipelines.errors`,
`pipelines.spec_fields` and torch-free config modules such as `pipelines.models.padim`,
`pipelines.models.diffusion.config` and `pipelines.synthesis.config`), so `adpipe validate`
never does.

Adding a kind `foo`:

1. `pipelines/params/foo.py`: a frozen dataclass `FooParams`, its fields typed (`str`, `int`,
   `float`, `bool`, `Literal[...]`, `tuple[X, ...]`, `X | None`, nested dataclasses, unions of
   dataclasses told apart by a `type: Literal[...]` field), with `validate(path) -> FooParams`
   for the checks the types cannot say (build on `pipelines.spec_fields`). A class whose fields
   depend on one another's values may parse itself instead: `from_spec_data(data, path)` and
   `to_spec_data()` (see `pipelines.spec_fields`).
2. Add `"foo": foo.FooParams` to `STAGE_PARAMS` below, where it should appear in messages.
3. `pipelines/stages/foo.py`: `KIND = StageKind(name="foo", params=FooParams, run=..., published_record=...)`,
   added to `pipelines.stages.registry`, which refuses a kind whose class is not the one here.
"""

from __future__ import annotations

from pipelines.params import describe, evaluate, generate, ingest, nightly, sample, score, synthesize, train

STAGE_PARAMS: dict[str, type] = {
    "ingest": ingest.IngestParams,
    "describe": describe.DescribeParams,
    "train": train.TrainParams,
    "sample": sample.SampleParams,
    "synthesize": synthesize.SynthesizeParams,
    "generate": generate.GenerateParams,
    "score": score.ScoreParams,
    "evaluate": evaluate.EvaluateParams,
    "nightly": nightly.NightlyParams,
}

__all__ = ["STAGE_PARAMS"]
