"""`train`: fit a method on the normal training images of a dataset -> a model artifact.

The method's record (`pipelines.models.methods`) says how it fits: by streamed statistics
(`pipelines.stages.train_statistics`) or by gradient descent with Ray Train
(`pipelines.stages.train_gradient`). Row selection, hold-out, threshold calibration and
publishing are the same for every method (`pipelines.stages.calibration`).
"""

from __future__ import annotations

from pipelines.params.train import TrainParams
from pipelines.spec import StepSpec
from pipelines.stages import calibration, train_gradient, train_statistics
from pipelines.stages.base import StageKind, StepContext, StepResult

FIT_PATHS = {"statistics": train_statistics.fit, "gradient": train_gradient.fit}


def run(step: StepSpec, context: StepContext) -> StepResult:
    params: TrainParams = step.params
    return FIT_PATHS[params.record.fit](params, context)


KIND = StageKind(name="train", params=TrainParams, run=run, published_record=calibration.published_record)
