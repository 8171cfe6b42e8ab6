"""The contract between the orchestrator and a stage kind.

A stage kind is a parameter dataclass (in `pipelines.params`, validated by `pipelines.spec`) plus
`run(step, context)`.
The orchestrator resolves references, decides whether a step is already done and records results;
the stage only does its work and says what it published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import SpecError
from pipelines.runs import RunRecord
from pipelines.spec import StepSpec
from pipelines.spec_fields import DatasetInputSpec, DatasetOutputSpec, ModelInputSpec
from pipelines.storage import Location


@dataclass(frozen=True)
class StepResult:
    output: str | None  # URI of what the step published
    rows: int | None = None
    rejected: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # counts worth keeping in status.json
    summary: tuple[str, ...] = ()  # lines for people, printed by the CLI

    def to_status(self) -> dict[str, Any]:
        return {"output": self.output, "rows": self.rows, "rejected": self.rejected,
                "details": self.details, "summary": list(self.summary)}


@dataclass
class StepContext:
    run_id: str
    step: StepSpec
    root: Location
    fingerprint: str  # of the step's resolved spec: stored in what it publishes
    step_outputs: dict[str, str]  # earlier step name -> output URI
    record: RunRecord

    def log(self, message: str, **fields: Any) -> None:
        self.record.event(message, step=self.step.name, **fields)

    def dataset_folder(self, output: DatasetOutputSpec) -> Location:
        return self.root.join("datasets", output.dataset, output.version or self.run_id)

    def input_dataset(self, spec: DatasetInputSpec | ModelInputSpec) -> Location:
        """Where an input lives: an earlier step's output, or the URI given."""
        reference = spec.step_reference
        if reference is None:
            return Location.parse(spec.dataset if isinstance(spec, DatasetInputSpec) else spec.uri,
                                  self.root.settings)
        if reference not in self.step_outputs:
            raise SpecError(f"steps.{self.step.name}", f"step {reference!r} has no output to read")
        return Location.parse(self.step_outputs[reference], self.root.settings)

    def lineage(self, **fields: Any) -> dict[str, Any]:
        return {"run_id": self.run_id, "step": self.step.name, "kind": self.step.kind,
                "step_fingerprint": self.fingerprint, **fields}


@dataclass(frozen=True)
class StageKind:
    name: str
    params: type  # pipelines.params.STAGE_PARAMS[name] (the registry checks)
    run: Callable[[StepSpec, StepContext], StepResult]
    # Where the step's published output records its fingerprint (a manifest or summary JSON);
    # the orchestrator skips a step whose output there carries the same fingerprint. None: never
    # skipped (the stage itself finds out what is left to do: `nightly`).
    published_record: Callable[[StepSpec, StepContext], Location | None]
