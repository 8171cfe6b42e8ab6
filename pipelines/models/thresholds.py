"""Decision thresholds, calibrated once at fit time and stored with the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Calibration:
    threshold: float
    method: str  # f1_max | normal_quantile
    normal_images: int
    anomalous_images: int
    f1: float | None = None


def calibrate(normal_scores: np.ndarray, anomalous_scores: np.ndarray | None, method: str,
              quantile: float) -> Calibration:
    """F1-max when labelled anomalies are available (and asked for), else a quantile of normals."""
    normal_scores = np.asarray(normal_scores, dtype=np.float64)
    anomalous = np.asarray(anomalous_scores if anomalous_scores is not None else [], dtype=np.float64)
    if len(normal_scores) == 0:
        raise ValueError("threshold calibration needs held-out normal images; none were given")
    if method == "f1_max":
        if len(anomalous) == 0:
            raise ValueError("threshold method f1_max needs labelled anomalous validation images")
        from pipelines.evaluation.metrics import f1_max

        labels = np.concatenate([np.zeros(len(normal_scores)), np.ones(len(anomalous))])
        best = f1_max(labels, np.concatenate([normal_scores, anomalous]))
        return Calibration(float(best.threshold), method, len(normal_scores), len(anomalous), float(best.f1))
    if method == "normal_quantile":
        return Calibration(float(np.quantile(normal_scores, quantile)), method, len(normal_scores), len(anomalous))
    raise ValueError(f"unknown threshold method {method!r}")
