#!/usr/bin/env python3
"""A stand-in segmentation model for the tests: labels every voxel brighter than the image's
mean as class 1, on the image's own grid. Usage: threshold.py IMAGE.nii.gz OUTPUT.nii.gz"""

import sys

import nibabel as nib
import numpy as np

image = nib.load(sys.argv[1])
data = np.asarray(image.dataobj, dtype=np.float64)
labels = (data > data.mean()).astype(np.uint8)
out = nib.Nifti1Image(labels, image.affine)
out.set_data_dtype(np.uint8)
nib.save(out, sys.argv[2])
