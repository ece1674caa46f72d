#!/usr/bin/env python3
"""Read the node's DICOM SEG with highdicom and dcmqi and compare it with the label map.

Usage: annotate_seg_check.py SEG.dcm LABELS.nii.gz WORKDIR

For every label of the label map (nibabel), the world positions (LPS, mm, rounded to 0.01)
of its voxels are compared with those of the matching segment as
- highdicom reads it (`segread`, then `get_volume` of that segment, combined: the indices
  holding its segment number, through the volume's affine), and
- dcmqi reconstructs it (`segimage2itkimage` to NIfTI, one file per group of segments, each
  segment's voxels valued its labelID, cropped to the slices with frames: compared in world
  coordinates, through nibabel's RAS affine).
Prints one JSON object: per segment label, voxel counts and whether the positions are equal.
"""

import json
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np


def positions(indices, affine, ras_to_lps):
    if len(indices) == 0:
        return set()
    homo = np.c_[indices, np.ones(len(indices))]
    world = homo @ affine.T
    if ras_to_lps:
        world[:, 0] *= -1
        world[:, 1] *= -1
    return {tuple(np.round(p[:3], 2)) for p in world}


def main():
    seg_path, labels_path, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    img = nib.load(str(labels_path))
    data = np.asarray(img.dataobj)
    ours = {int(v): positions(np.argwhere(data == v), img.affine, True) for v in np.unique(data) if v != 0}

    seg = hd.seg.segread(str(seg_path))
    out = {"sop_class": seg.SOPClassUID, "frames": int(seg.NumberOfFrames), "segments": {}}
    labels = {}
    for desc in seg.SegmentSequence:
        labels[int(desc.SegmentNumber)] = desc.SegmentLabel
    sidecar = json.loads(labels_path.with_name(labels_path.name.replace(".nii.gz", ".json")).read_text())
    value_of = {l["name"]: int(v) for v, l in sidecar["labels"].items()}

    for number, label in labels.items():
        # Combined, a voxel's value is its segment's number (label-map SEG stores them so).
        vol = seg.get_volume(segment_numbers=[number], combine_segments=True)
        theirs = positions(np.argwhere(vol.array == number), vol.affine, False)
        mine = ours.get(value_of[label], set())
        out["segments"][label] = {
            "ours": len(mine),
            "highdicom": len(theirs),
            "highdicom_same_positions": theirs == mine,
        }

    # dcmqi: one NIfTI per segment.
    d = work / "dcmqi"
    d.mkdir(parents=True, exist_ok=True)
    binary = Path(sys.executable).parent / "segimage2itkimage"
    run = subprocess.run(
        [str(binary), "--inputDICOM", str(seg_path), "--outputDirectory", str(d), "-t", "nifti", "-p", "seg"],
        capture_output=True, text=True,
    )
    if run.returncode != 0 or not list(d.glob("seg-*.nii.gz")):
        # dcmqi 1.5 reads binary and fractional SEG; what it says about anything else is kept.
        out["dcmqi_error"] = (run.stdout + run.stderr).strip().splitlines()[-3:] or [f"exit {run.returncode}, no output"]
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return
    meta = json.loads((d / "seg-meta.json").read_text())
    # One NIfTI per group of segments (seg-1.nii.gz, ...); within it, each segment's voxels
    # carry its labelID.
    for g, group in enumerate(meta["segmentAttributes"]):
        m = nib.load(str(d / f"seg-{g + 1}.nii.gz"))
        arr = np.asarray(m.dataobj)
        for attrs in group:
            label = attrs["SegmentLabel"]
            theirs = positions(np.argwhere(arr == attrs["labelID"]), m.affine, True)
            mine = ours.get(value_of[label], set())
            out["segments"][label]["dcmqi"] = len(theirs)
            out["segments"][label]["dcmqi_same_positions"] = theirs == mine
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
