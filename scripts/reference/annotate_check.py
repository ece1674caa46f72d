#!/usr/bin/env python3
"""Read what the node exported with the reference tools, and write it back with them.

Usage: annotate_check.py DIR, where DIR holds `coco.json` (the node's COCO export of one
case), `labels.nii.gz` and `labels.json` (the node's label map and sidecar of that case).
Prints one JSON object:

- `nifti`: shape, affine and voxels per label of the label map as nibabel reads it;
- `rle`: for every RLE annotation, whether pycocotools decodes it to exactly the label map's
  slice for that class (`equal`, `different`), and its area as pycocotools computes it;
- `polygons`: pycocotools' area of every polygon annotation, by annotation id;
- `boxes`: the bbox of every box annotation as pycocotools' COCO API loads it.

It also writes `DIR/pycocotools.json`: a COCO file whose masks pycocotools encoded from the
label map nibabel read, for the node to import.
"""

import contextlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from pycocotools import mask as cmask
from pycocotools.coco import COCO


def main():
    d = Path(sys.argv[1])
    img = nib.load(str(d / "labels.nii.gz"))
    data = np.asarray(img.dataobj)
    sidecar = json.loads((d / "labels.json").read_text())
    values, counts = np.unique(data, return_counts=True)
    out = {
        "nifti": {
            "shape": list(data.shape),
            "dtype": str(data.dtype),
            "affine": img.affine.tolist(),
            "counts": {str(int(v)): int(c) for v, c in zip(values, counts) if v != 0},
            "sidecar_labels": sorted(sidecar["labels"].keys()),
        },
        "rle": {"equal": 0, "different": 0, "areas": {}},
        "polygons": {},
        "boxes": {},
    }
    with contextlib.redirect_stdout(sys.stderr):  # COCO() prints progress
        coco = COCO(str(d / "coco.json"))
    for ann in coco.dataset["annotations"]:
        image = coco.imgs[ann["image_id"]]
        k = image["slice"]
        seg = ann.get("segmentation")
        if isinstance(seg, dict):
            # pycocotools masks are [height, width] = [j, i]; ours are [i, j].
            m = cmask.decode(seg).T.astype(bool)
            expected = data[:, :, k] == ann["category_id"]
            out["rle"]["equal" if np.array_equal(m, expected) else "different"] += 1
            out["rle"]["areas"][str(ann["id"])] = int(cmask.area(seg))
        elif isinstance(seg, list) and seg:
            rles = cmask.frPyObjects(seg, image["height"], image["width"])
            out["polygons"][str(ann["id"])] = float(sum(cmask.area(rles)))
        elif "keypoints" not in ann:
            out["boxes"][str(ann["id"])] = ann["bbox"]

    # Encode the label map's masks with pycocotools, slice by slice, for the node to import.
    images, annotations = [], []
    ni, nj, nk = data.shape
    case = coco.dataset["images"][0]["case"]
    next_id = 1
    for k in range(nk):
        images.append({"id": k + 1, "width": ni, "height": nj, "file_name": f"{case}/slice-{k:04}.png"})
        for v in sorted(int(x) for x in np.unique(data[:, :, k]) if x != 0):
            rle = cmask.encode(np.asfortranarray((data[:, :, k] == v).T.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": next_id, "image_id": k + 1, "category_id": v, "segmentation": rle,
                "area": int(cmask.area(rle)), "bbox": [float(x) for x in cmask.toBbox(rle)], "iscrowd": 0,
            })
            next_id += 1
    categories = [{"id": int(v), "name": l["name"]} for v, l in sidecar["labels"].items()]
    (d / "pycocotools.json").write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
