#!/usr/bin/env python3
"""Golden outputs for annotation agreement and consensus (tests/golden/annotate-reference.json).

Inputs are generated here from a fixed seed and written into the golden file beside what the
references compute from them, so the Rust tests read both and compare:

- Cohen's kappa (unweighted, linear, quadratic) and Fleiss' kappa (Fleiss and Randolph chance):
  statsmodels.stats.inter_rater;
- Krippendorff's alpha (nominal, ordinal, interval, ratio; missing ratings): krippendorff;
- Dice and IoU: SimpleITK LabelOverlapMeasuresImageFilter; Hausdorff distance: SimpleITK
  HausdorffDistanceImageFilter; HD95 and ASSD: medpy.metric.binary (hd95, assd), with the
  voxel spacing;
- majority vote, STAPLE and multi-label STAPLE: SimpleITK LabelVoting, STAPLE,
  MultiLabelSTAPLE.

Masks are stored as the flat indices (Fortran order: i fastest) of their voxels. The script
prints the JSON; scripts/test.sh checks the committed file is still what it prints.
"""

import json
import sys
from importlib.metadata import version

import numpy as np

import krippendorff
import SimpleITK as sitk
import statsmodels
import statsmodels.stats.inter_rater as ir
from medpy.metric import binary as mb


def ellipsoid(shape, centre, radii):
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d = sum(((a - c) / r) ** 2 for a, c, r in zip((i, j, k), centre, radii))
    return d <= 1.0


def indices(mask):
    return [int(x) for x in np.flatnonzero(mask.ravel(order="F"))]


def to_sitk(arr, spacing):
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return img


def from_sitk(img):
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0)


def main():
    rng = np.random.default_rng(20261206)
    out = {
        "generator": "scripts/reference/annotate_reference.py",
        "versions": {
            "numpy": np.__version__,
            "statsmodels": statsmodels.__version__,
            "krippendorff": version("krippendorff"),
            "medpy": version("medpy"),
            "SimpleITK": sitk.Version.VersionString(),
        },
    }

    # Two raters, 40 items, 4 ordered categories, mostly agreeing.
    a = rng.integers(0, 4, 40)
    b = np.where(rng.random(40) < 0.7, a, rng.integers(0, 4, 40))
    table = np.zeros((4, 4))
    for x, y in zip(a, b):
        table[x, y] += 1
    out["cohen"] = {
        "a": a.tolist(),
        "b": b.tolist(),
        "categories": 4,
        "none": ir.cohens_kappa(table).kappa,
        "linear": ir.cohens_kappa(table, wt="linear").kappa,
        "quadratic": ir.cohens_kappa(table, wt="quadratic").kappa,
    }

    # Five raters on 30 items, 3 categories.
    truth = rng.integers(0, 3, 30)
    ratings = np.array(
        [np.where(rng.random(30) < 0.75, truth, rng.integers(0, 3, 30)) for _ in range(5)]
    )
    counts = np.zeros((30, 3), dtype=int)
    for r in ratings:
        for u, c in enumerate(r):
            counts[u, c] += 1
    out["fleiss"] = {
        "counts": counts.tolist(),
        "fleiss": ir.fleiss_kappa(counts, method="fleiss"),
        "randolph": ir.fleiss_kappa(counts, method="randolph"),
    }

    # Krippendorff: four raters, 25 units, values 1..5, about 20 % missing.
    base = rng.integers(1, 6, 25).astype(float)
    data = np.array(
        [np.where(rng.random(25) < 0.8, base, rng.integers(1, 6, 25)).astype(float) for _ in range(4)]
    )
    data[rng.random(data.shape) < 0.2] = np.nan
    out["krippendorff"] = {
        "data": [[None if np.isnan(x) else x for x in row] for row in data],
        **{
            level: krippendorff.alpha(reliability_data=data, level_of_measurement=level)
            for level in ("nominal", "ordinal", "interval", "ratio")
        },
    }

    # Masks: pairs of ellipsoids on an anisotropic grid, including touching the grid's edge.
    shape = (26, 22, 12)
    spacing = (0.8, 1.1, 2.5)
    pairs = []
    for n in range(6):
        c = [rng.uniform(6, s - 6) + 0.37 for s in shape]
        r = [rng.uniform(3, 7), rng.uniform(3, 6), rng.uniform(2, 4)]
        d = [rng.uniform(-2, 2) for _ in range(3)]
        ma = ellipsoid(shape, c, r)
        mb_ = ellipsoid(shape, [c[0] + d[0], c[1] + d[1], c[2] + d[2] * 0.5], [x * rng.uniform(0.8, 1.2) for x in r])
        if n == 5:
            ma |= ellipsoid(shape, (0.2, 10.3, 6.1), (3, 3, 2))
        overlap = sitk.LabelOverlapMeasuresImageFilter()
        overlap.Execute(to_sitk(ma.astype(np.uint8), spacing), to_sitk(mb_.astype(np.uint8), spacing))
        hd = sitk.HausdorffDistanceImageFilter()
        hd.Execute(to_sitk(ma.astype(np.uint8), spacing), to_sitk(mb_.astype(np.uint8), spacing))
        pairs.append({
            "a": indices(ma),
            "b": indices(mb_),
            "dice": overlap.GetDiceCoefficient(),
            "iou": overlap.GetJaccardCoefficient(),
            "hausdorff": hd.GetHausdorffDistance(),
            "hd95": float(mb.hd95(ma, mb_, voxelspacing=spacing)),
            "assd": float(mb.assd(ma, mb_, voxelspacing=spacing)),
        })
    out["masks"] = {"shape": shape, "spacing": spacing, "pairs": pairs}

    # Consensus: three raters' binary masks and multi-label maps.
    c = (12.4, 10.6, 6.2)
    raters = [ellipsoid(shape, [x + rng.uniform(-1.5, 1.5) for x in c], (6 * rng.uniform(0.8, 1.2), 5, 3)) for _ in range(3)]
    staple = sitk.STAPLEImageFilter()
    staple.SetForegroundValue(1)
    prob = from_sitk(staple.Execute(*[to_sitk(m.astype(np.uint8), spacing) for m in raters]))
    labelmaps = []
    for m in raters:
        lm = m.astype(np.uint16)
        inner = ellipsoid(shape, [x + rng.uniform(-1, 1) for x in c], (3, 2.5, 1.5))
        lm[inner] = 2
        labelmaps.append(lm)
    voting = from_sitk(sitk.LabelVoting([to_sitk(m, spacing) for m in labelmaps]))
    mls = sitk.MultiLabelSTAPLEImageFilter()
    multi = from_sitk(mls.Execute(*[to_sitk(m, spacing) for m in labelmaps]))
    out["consensus"] = {
        "binary": [indices(m) for m in raters],
        "staple_probability": [float(x) for x in prob.ravel(order="F")],
        "staple_sensitivity": list(staple.GetSensitivity()),
        "staple_specificity": list(staple.GetSpecificity()),
        "labelmaps": [[int(x) for x in m.ravel(order="F")] for m in labelmaps],
        "voting": [int(x) for x in voting.ravel(order="F")],
        "multi_label_staple": [int(x) for x in multi.ravel(order="F")],
    }
    json.dump(out, sys.stdout, indent=None, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
