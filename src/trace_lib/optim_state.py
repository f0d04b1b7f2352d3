"""A torch optimizer's state as flat tensors plus JSON, so checkpoints are safetensors files (no pickle).

``opt.<param index>.<key>`` holds each per-parameter state entry (Adam's ``exp_avg``, ``exp_avg_sq``,
``step``); the parameter groups (learning rate, betas, ...) travel as JSON in the file's metadata.
"""

from __future__ import annotations

import json

import torch

PREFIX = "opt."


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], str]:
    """(``opt.<i>.<key>`` tensors on the CPU, the param groups as JSON) for :func:`load_optimizer`."""
    sd = opt.state_dict()
    tensors = {f"{PREFIX}{idx}.{key}": (v if isinstance(v, torch.Tensor) else torch.tensor(v)).cpu().contiguous()
               for idx, st in sd["state"].items() for key, v in st.items()}
    return tensors, json.dumps(sd["param_groups"])


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: str) -> None:
    """Restore what :func:`optimizer_tensors` wrote (other keys in ``tensors`` are ignored). The kernel choice
    (``fused`` / ``foreach``) stays this optimizer's, so a state saved by one kernel resumes on the other."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(PREFIX):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    groups = json.loads(param_groups)
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        for key in ("fused", "foreach"):
            if key in opt.defaults:
                g[key] = opt.defaults[key]
    opt.load_state_dict({"state": state, "param_groups": groups})
