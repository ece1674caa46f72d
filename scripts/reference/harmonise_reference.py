#!/usr/bin/env python3
"""Golden outputs of intensity-normalization 2.2.4 for fedcurate's harmonisation tests.

Regenerate with:
    pip install intensity-normalization==2.2.4
    python3 scripts/reference/harmonise_reference.py > tests/golden/harmonise-2.2.4.json

The synthetic volumes are defined by integer arithmetic and exactly rounded float operations,
so the Rust test (tests/it/harmonise.rs) rebuilds them bit for bit: a sphere of three tissue
shells (CSF, GM, WM) with Irwin-Hall noise from a 64-bit LCG, per volume scale and offset.
"""
import json
import sys

import numpy as np
import intensity_normalization
from intensity_normalization.normalize.fcm import FCMNormalize
from intensity_normalization.normalize.kde import KDENormalize
from intensity_normalization.normalize.nyul import NyulNormalize
from intensity_normalization.normalize.whitestripe import WhiteStripeNormalize
from intensity_normalization.normalize.zscore import ZScoreNormalize
from intensity_normalization.typing import Modality, TissueType

N = 32
MASK64 = (1 << 64) - 1
VOLUMES = [(1.0, 0.0, 1), (1.3, 25.0, 2), (0.8, -10.0, 3)]  # scale, offset, seed


def volume(scale, offset, seed):
    state = seed
    out = np.zeros((N, N, N), dtype=np.float64)
    c = (N - 1) / 2.0
    for i in range(N):
        for j in range(N):
            for k in range(N):
                r2 = (i - c) ** 2 + (j - c) ** 2 + (k - c) ** 2
                if r2 >= 14.0 * 14.0:
                    continue
                base = 900.0 if r2 < 6.0 * 6.0 else (600.0 if r2 < 10.0 * 10.0 else 300.0)
                noise = 0.0
                for _ in range(4):
                    state = (state * 6364136223846793005 + 1442695040888963407) & MASK64
                    noise += ((state >> 33) % 1001) / 10.0 - 50.0
                out[i, j, k] = (base + noise) * scale + offset
    return out


SAMPLES = [(15, 15, 15), (16, 14, 15), (10, 15, 15), (5, 15, 15), (3, 16, 16), (15, 8, 20),
           (20, 20, 20), (0, 0, 0), (15, 15, 3), (22, 9, 15), (12, 18, 7), (26, 15, 15)]


def at(img):
    return [float(img[s]) for s in SAMPLES]


def main():
    vols = [volume(*v) for v in VOLUMES]
    out = {"version": intensity_normalization.__version__, "n": N, "volumes": VOLUMES, "samples": SAMPLES, "methods": {}}
    m = out["methods"]
    m["zscore"] = [at(ZScoreNormalize()(v)) for v in vols]
    m["kde_t1"] = [at(KDENormalize()(v, modality=Modality.T1)) for v in vols]
    m["whitestripe_t1"] = [at(WhiteStripeNormalize()(v, modality=Modality.T1)) for v in vols]
    m["fcm_t1"] = [at(FCMNormalize(tissue_type=TissueType.WM)(v, modality=Modality.T1)) for v in vols]
    nyul = NyulNormalize()
    nyul.fit(vols)
    m["nyul_standard_scale"] = [float(x) for x in nyul.standard_scale]
    m["nyul"] = [at(nyul(v)) for v in vols]
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
