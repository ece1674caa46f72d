"""NVFlare's Client API on a fedcurate node: a script written for

    import nvflare.client as flare

runs unchanged with

    import fedcurate.flare as flare

``flare.init()``, ``flare.is_running()``, ``flare.receive()`` (an :class:`FLModel` with
``params``, ``current_round``, ``total_rounds``), ``flare.send(FLModel(params=..., metrics=...,
meta={"NUM_STEPS_CURRENT_ROUND": n}))``, ``flare.get_site_name()``, ``flare.get_job_id()``.
``params_type="DIFF"`` sends the change instead of the weights. Torch tensors in ``params``
are converted to numpy (on the CPU).
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import fedcurate

__all__ = ["FLModel", "ParamsType", "init", "is_running", "receive", "send",
           "get_site_name", "get_job_id", "system_info", "log"]


class ParamsType:
    FULL = "FULL"
    DIFF = "DIFF"


@dataclass
class FLModel:
    params_type: Optional[str] = None
    params: Dict[str, Any] = field(default_factory=dict)
    optimizer_params: Dict[str, Any] = field(default_factory=dict)
    metrics: Optional[Dict[str, Any]] = None
    start_round: int = 0
    current_round: Optional[int] = None
    total_rounds: Optional[int] = None
    meta: Dict[str, Any] = field(default_factory=dict)


_state = {"model": None, "done": False}


def init(rank=None, socket=None, **_):
    fedcurate.init(socket)


def _numpy(v):
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy()
    return v


def receive(timeout=None):
    weights = fedcurate.receive(timeout)
    if weights is None:
        _state["done"] = True
        return None
    c = fedcurate._c()
    m = FLModel(params_type=ParamsType.FULL, params=weights,
                current_round=c.round - 1, total_rounds=c.job.get("rounds"),
                meta={"job": c.job})
    _state["model"] = m
    return m


def is_running():
    if _state["done"]:
        return False
    if _state["model"] is None:
        return True
    return not fedcurate._c().finished


def send(model, clear_cache=True):
    params = {k: _numpy(v) for k, v in (model.params or {}).items()}
    kind = "delta" if model.params_type == ParamsType.DIFF else "weights"
    samples = int((model.meta or {}).get("NUM_STEPS_CURRENT_ROUND", 1) or 1)
    fedcurate.send(params, samples=samples, metrics=model.metrics or {}, kind=kind)
    if clear_cache:
        _state["model"] = None


def get_site_name():
    return fedcurate.status().get("site")


def get_job_id():
    return (fedcurate.status().get("job") or {}).get("id")


def system_info():
    return {"site_name": get_site_name(), "job_id": get_job_id()}


def log(key, value, data_type=None, **_):
    fedcurate.report({key: value})
