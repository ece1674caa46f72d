"""fedcurate's client for training jobs.

A training script talks only to its own site node, over the node's Unix-domain socket; the
node checks the update, protects it (clipping, noise, secure aggregation, as the consortium's
job says) and exchanges it with the coordinator. The loop::

    import fedcurate

    fedcurate.init()                        # FEDCURATE_TRAINER_SOCKET, or socket=...
    while (weights := fedcurate.receive()) is not None:
        model.load_state_dict(fedcurate.torch.to_state_dict(weights))   # or numpy as it is
        train_one_round(model, mu=fedcurate.param("fedprox_mu", 0.0))
        fedcurate.send(fedcurate.torch.from_module(model), samples=len(train_set),
                       metrics={"loss": last_loss})

``receive`` blocks until the node holds the next round's global model and returns its tensors
(a dict of numpy arrays), or ``None`` once the job is finished (``final_model()`` then gives
the last global model). ``send`` hands in the model after local training (or ``kind="delta"``:
the change); the node refuses an update that does not fit the job with the precise reason
(:class:`fedcurate.NodeError`).
"""

import os
import time

import numpy as np
from safetensors.numpy import load as _load, save as _save

from ._http import NodeError, call, call_json

__all__ = ["init", "receive", "send", "final_model", "status", "param", "job",
           "current_round", "report", "NodeError", "Client"]

DEFAULT_SOCKET = os.environ.get("FEDCURATE_TRAINER_SOCKET", "")


class Client:
    """One trainer's connection to its node."""

    def __init__(self, socket=None):
        self.socket = socket or os.environ.get("FEDCURATE_TRAINER_SOCKET")
        if not self.socket:
            raise ValueError("give the node's trainer socket (init(socket=...) or "
                             "FEDCURATE_TRAINER_SOCKET; `fedcurate-node train serve` prints it)")
        self.round = 0
        self.revision = None
        self.job = {}
        self.finished = False
        self._global = None

    def status(self):
        return call_json(self.socket, "GET", "/v1/status")[1]

    def _model(self, revision):
        status, data = call(self.socket, "GET", f"/v1/model/{revision}")
        if status != 200:
            raise NodeError(status, data.decode("utf-8", "replace"))
        return _load(data)

    def receive(self, timeout=None):
        """The next round's global model (dict of numpy arrays), or None when finished."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 60 if deadline is None else max(0, min(60, int(deadline - time.monotonic())))
            status, v = call_json(self.socket, "GET",
                                  f"/v1/round?after={self.round}&timeout={wait}")
            if status == 200:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no round opened in time (node: {v.get('phase')})")
        self.job = v.get("job", {})
        self.revision = v["revision"]
        if v.get("finished"):
            self.finished = True
            return None
        self.round = v["round"]
        self._global = self._model(self.revision)
        return {k: a.copy() for k, a in self._global.items()}

    def final_model(self):
        """The last global model (after receive() returned None)."""
        if self.revision is None:
            self.status()
        return self._model(self.revision)

    def send(self, params, samples=1, metrics=None, kind="weights"):
        """Hand in this round's update; returns the node's answer (its norm)."""
        if self.round == 0:
            raise RuntimeError("receive() a round first")
        like = self._global or {}
        tensors = {}
        for name, a in params.items():
            a = np.ascontiguousarray(np.asarray(a))
            if name in like:
                a = a.astype(like[name].dtype, copy=False)
            tensors[name] = a
        query = f"/v1/update?round={self.round}&samples={int(samples)}&kind={kind}"
        for k, val in (metrics or {}).items():
            query += f"&metric={k}:{float(val)!r}"
        return call_json(self.socket, "POST", query, body=_save(tensors))[1]

    def report(self, metrics, round=None):
        """Metrics kept in the node's local log (not sent anywhere)."""
        query = f"/v1/metrics?round={self.round if round is None else round}"
        for k, val in metrics.items():
            query += f"&metric={k}:{float(val)!r}"
        return call_json(self.socket, "POST", query)[1]

    def param(self, name, default=None):
        return self.job.get("trainer", {}).get(name, default)


_client = None


def init(socket=None):
    global _client
    _client = Client(socket)
    return _client


def _c():
    if _client is None:
        init()
    return _client


def receive(timeout=None):
    return _c().receive(timeout)


def send(params, samples=1, metrics=None, kind="weights"):
    return _c().send(params, samples, metrics, kind)


def final_model():
    return _c().final_model()


def status():
    return _c().status()


def report(metrics, round=None):
    return _c().report(metrics, round)


def param(name, default=None):
    return _c().param(name, default)


def job():
    return _c().job


def current_round():
    return _c().round
