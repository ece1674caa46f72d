"""Federated training of a small numpy MLP on scikit-learn's bundled digits (real, offline data),
split non-IID across sites by Dirichlet label skew — the fedcurate demonstration and test.

    digits_mlp.py init --out init.safetensors          # the initial model (seeded)
    digits_mlp.py job --rounds 100 > job.toml          # the job's settings (the coordinator adds the layout)
    digits_mlp.py train --site-index 0 --socket S      # one site's trainer, through its node
    digits_mlp.py evaluate --model final.safetensors --rounds 100   # federated vs centralised vs local-only

Everything is deterministic (seeded splits, initialisation and shuffles), so the same global
models give the same updates whether or not the rounds are secure.
"""

import argparse
import hashlib
import json
import sys

import numpy as np
from safetensors.numpy import load_file, save_file

SITES = 3
HIDDEN = 64
ALPHA = 0.5


def data():
    from sklearn.datasets import load_digits
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    cut = int(0.75 * len(y))
    return x[:cut], y[:cut], x[cut:], y[cut:]


def split(y, sites=SITES, alpha=ALPHA, seed=1):
    """Dirichlet label skew: each class's samples divided among the sites by Dir(alpha)."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(sites)]
    for c in range(10):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        p = rng.dirichlet([alpha] * sites)
        cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
        for s, chunk in enumerate(np.split(idx, cuts)):
            parts[s].extend(chunk.tolist())
    return [np.array(sorted(p)) for p in parts]


def init_params(seed=42):
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": (rng.standard_normal((64, HIDDEN)) * np.sqrt(2 / 64)).astype(np.float32),
        "fc1.bias": np.zeros(HIDDEN, np.float32),
        "fc2.weight": (rng.standard_normal((HIDDEN, 10)) * np.sqrt(2 / HIDDEN)).astype(np.float32),
        "fc2.bias": np.zeros(10, np.float32),
    }


def forward(p, x):
    h = np.maximum(x @ p["fc1.weight"] + p["fc1.bias"], 0)
    z = h @ p["fc2.weight"] + p["fc2.bias"]
    return h, z


def accuracy(p, x, y):
    return float((forward(p, x)[1].argmax(1) == y).mean())


def epoch(p, x, y, lr, seed, mu=0.0, anchor=None, batch=32):
    """One epoch of SGD on softmax cross-entropy (FedProx's proximal term when mu > 0)."""
    p = {k: v.copy() for k, v in p.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    losses = []
    for i in range(0, len(y), batch):
        b = order[i:i + batch]
        xb, yb = x[b], y[b]
        h, z = forward(p, xb)
        z = z - z.max(1, keepdims=True)
        e = np.exp(z)
        prob = e / e.sum(1, keepdims=True)
        losses.append(float(-np.log(prob[np.arange(len(yb)), yb] + 1e-12).mean()))
        g = prob
        g[np.arange(len(yb)), yb] -= 1
        g /= len(yb)
        grads = {"fc2.weight": h.T @ g, "fc2.bias": g.sum(0)}
        gh = (g @ p["fc2.weight"].T) * (h > 0)
        grads["fc1.weight"] = xb.T @ gh
        grads["fc1.bias"] = gh.sum(0)
        for k in p:
            step = grads[k]
            if mu > 0 and anchor is not None:
                step = step + mu * (p[k] - anchor[k])
            p[k] = (p[k] - lr * step).astype(np.float32)
    return p, float(np.mean(losses))


def seed_of(*parts):
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


def cmd_init(a):
    save_file(init_params(), a.out)


def cmd_job(a):
    secure = "true" if a.secure else "false"
    print(f"""id = "digits-mlp"
rounds = {a.rounds}
min_sites = {SITES}
round_deadline_seconds = 600
secure_aggregation = {secure}
max_update_norm = 50.0
max_samples = 100000
metrics = ["loss", "accuracy"]

[aggregator]
method = "{a.aggregator}"

[trainer]
learning_rate = 0.1
local_epochs = 1
fedprox_mu = 0.0
""")


def cmd_train(a):
    if a.api == "flare":
        return train_flare(a)
    import fedcurate
    x, y, _, _ = data()
    idx = split(y)[a.site_index]
    xs, ys = x[idx], y[idx]
    client = fedcurate.init(a.socket)
    while (weights := client.receive()) is not None:
        lr = client.param("learning_rate", 0.1)
        mu = client.param("fedprox_mu", 0.0)
        p, loss = weights, 0.0
        for e in range(int(client.param("local_epochs", 1))):
            p, loss = epoch(p, xs, ys, lr, seed_of(a.site_index, client.round, e), mu, weights)
        client.send(p, samples=len(ys), metrics={"loss": loss, "accuracy": accuracy(p, xs, ys)})
    final = client.final_model()
    if a.out:
        save_file(final, a.out)
    print(json.dumps({"site": a.site_index, "samples": int(len(ys)), "rounds": client.round}))


def train_flare(a):
    """The same trainer written for NVFlare's Client API: only the import differs from a
    script that runs under NVFlare (`import nvflare.client as flare`)."""
    import fedcurate.flare as flare
    from fedcurate.flare import FLModel
    x, y, _, _ = data()
    idx = split(y)[a.site_index]
    xs, ys = x[idx], y[idx]
    flare.init(socket=a.socket)
    last = None
    while flare.is_running():
        model = flare.receive()
        if model is None:
            break
        job = model.meta["job"]["trainer"]
        rnd = model.current_round + 1
        p, loss = model.params, 0.0
        for e in range(int(job.get("local_epochs", 1))):
            p, loss = epoch(p, xs, ys, job.get("learning_rate", 0.1),
                            seed_of(a.site_index, rnd, e), job.get("fedprox_mu", 0.0),
                            model.params)
        flare.send(FLModel(params=p, metrics={"loss": loss, "accuracy": accuracy(p, xs, ys)},
                           meta={"NUM_STEPS_CURRENT_ROUND": len(ys)}))
        last = rnd
    import fedcurate
    final = fedcurate.final_model()
    if a.out:
        save_file(final, a.out)
    print(json.dumps({"site": a.site_index, "samples": int(len(ys)), "rounds": last,
                      "api": "flare", "site_name": flare.get_site_name()}))


def cmd_evaluate(a):
    x, y, xt, yt = data()
    parts = split(y)
    fed = accuracy(load_file(a.model), xt, yt)
    init = init_params()
    central = init
    for r in range(a.rounds):
        central, _ = epoch(central, x, y, 0.1, seed_of("central", r))
    local = []
    for s, idx in enumerate(parts):
        p = init
        for r in range(a.rounds):
            p, _ = epoch(p, x[idx], y[idx], 0.1, seed_of(s, r + 1, 0))
        local.append(accuracy(p, xt, yt))
    print(json.dumps({
        "federated": fed,
        "centralised": accuracy(central, xt, yt),
        "local": local,
        "site_samples": [int(len(i)) for i in parts],
        "site_classes": [sorted(set(int(c) for c in y[i])) for i in parts],
    }))


def cmd_simulate(a):
    """FedAvg without the nodes (what the federation must reproduce), for comparison."""
    x, y, xt, yt = data()
    parts = split(y)
    g = init_params()
    for r in range(1, a.rounds + 1):
        ups = []
        for s, idx in enumerate(parts):
            p, _ = epoch(g, x[idx], y[idx], 0.1, seed_of(s, r, 0))
            ups.append((p, len(idx)))
        n = sum(w for _, w in ups)
        g = {k: (g[k] + sum(w * (p[k] - g[k]) for p, w in ups) / n).astype(np.float32) for k in g}
    print(json.dumps({"federated_simulated": accuracy(g, xt, yt)}))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init"); p.add_argument("--out", required=True)
    p = sub.add_parser("job"); p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--secure", action="store_true"); p.add_argument("--aggregator", default="fedavg")
    p = sub.add_parser("train"); p.add_argument("--site-index", type=int, required=True)
    p.add_argument("--socket"); p.add_argument("--out")
    p.add_argument("--api", choices=["fedcurate", "flare"], default="fedcurate")
    p = sub.add_parser("evaluate"); p.add_argument("--model", required=True)
    p.add_argument("--rounds", type=int, default=100)
    p = sub.add_parser("simulate"); p.add_argument("--rounds", type=int, default=100)
    a = ap.parse_args()
    {"init": cmd_init, "job": cmd_job, "train": cmd_train, "evaluate": cmd_evaluate,
     "simulate": cmd_simulate}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
