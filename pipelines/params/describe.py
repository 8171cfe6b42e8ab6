"""Parameters of `describe`: the dataset whose rows are counted."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.spec_fields import DatasetInputSpec


@dataclass(frozen=True)
class DescribeParams:
    inputs: DatasetInputSpec
