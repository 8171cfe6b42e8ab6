"""An Adam(W) optimizer's state as flat tensors + JSON, for the safetensors checkpoints of every
gradient-trained method (no pickle): keys "optim/<param index>/<exp_avg|exp_avg_sq|...>", and the
per-parameter step counts (Adam keeps them as scalar tensors) in the JSON meta."""

from __future__ import annotations

from typing import Any

import torch


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(independent contiguous CPU tensors, {param index: step}) of the optimizer's state."""
    tensors: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if name == "step":
                steps[str(index)] = float(value)
            else:
                tensors[f"optim/{index}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, steps


def optimizer_tensor_names(steps: dict[str, float]) -> set[str]:
    """The tensor keys `optimizer_tensors` writes for Adam with these step counts."""
    return {f"optim/{index}/{name}" for index in steps for name in ("exp_avg", "exp_avg_sq")}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], steps: dict[str, float],
                      param_groups: list[dict[str, Any]] | None = None) -> None:
    """Load what `optimizer_tensors` saved (other keys of `tensors` are ignored). `param_groups`:
    the saved groups' hyper-parameters, where they are not the optimizer's own."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/")
            # Clone: the optimizer may keep the given tensors as its state and update them in place.
            state.setdefault(int(index), {})[name] = value.clone()
    for index, step in steps.items():
        state[int(index)]["step"] = torch.tensor(step, dtype=torch.float32)
    groups = param_groups if param_groups is not None else optimizer.state_dict()["param_groups"]
    # load_state_dict moves the state onto each parameter's device
    optimizer.load_state_dict({"state": state, "param_groups": groups})
