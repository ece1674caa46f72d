#!/usr/bin/env python3
"""Time intensity-normalization 2.2.4 on this machine, on 256^3 float32 volumes like the ones
`fedcurate-node bench --harmonise 256` uses (a sphere of three tissue shells with noise), so
the two can be compared as ratios measured on the same machine.

    OMP_NUM_THREADS=1 python3 scripts/reference/bench_reference.py [N]
"""
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from intensity_normalization.normalize.kde import KDENormalize  # noqa: E402
from intensity_normalization.normalize.nyul import NyulNormalize  # noqa: E402
from intensity_normalization.normalize.whitestripe import WhiteStripeNormalize  # noqa: E402
from intensity_normalization.normalize.zscore import ZScoreNormalize  # noqa: E402
from intensity_normalization.typing import Modality  # noqa: E402


def volume(n, scale, seed):
    rng = np.random.default_rng(seed)
    c = (n - 1) / 2.0
    i, j, k = np.ogrid[:n, :n, :n]
    r2 = (i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2
    r = n * 0.45
    base = np.where(r2 < (r * 0.43) ** 2, 900.0, np.where(r2 < (r * 0.71) ** 2, 600.0, 300.0))
    noise = rng.integers(0, 1001, size=(n, n, n)) / 10.0 - 50.0
    noise += rng.integers(0, 1001, size=(n, n, n)) / 10.0 - 50.0
    v = np.where(r2 < r * r, (base + noise) * scale, 0.0)
    return v.astype(np.float32)


def timed(name, f, runs=3):
    # The best of three runs, as fedcurate-node times its own (noise only ever adds time).
    best = float("inf")
    for _ in range(runs):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    print(f"{name:<24} {best:8.3f} s")


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    vols = [volume(n, s, seed) for s, seed in [(1.0, 1), (1.2, 2), (0.9, 3)]]
    v0 = vols[0]
    mask = v0 > 0
    print(f"intensity-normalization 2.2.4, {n}^3 float32, one thread, best of 3")
    timed("z-score", lambda: ZScoreNormalize()(v0, mask))
    timed("KDE (T1)", lambda: KDENormalize()(v0, mask, modality=Modality.T1))
    timed("WhiteStripe (T1)", lambda: WhiteStripeNormalize()(v0, mask, modality=Modality.T1))

    def nyul():
        nn = NyulNormalize()
        nn.fit(vols, masks=[v > 0 for v in vols])
        nn(v0, mask)

    timed("Nyul fit on 3 + apply", nyul)


if __name__ == "__main__":
    main()
