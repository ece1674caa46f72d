//! Volumes: voxel data with a world-space affine. The type curation, harmonisation and
//! export work on.
//!
//! Data is stored as `f32` indexed `[i, j, k, c]` (NIfTI order: `i` fastest in files), with
//! `c` the channel (1, or 3 for RGB). The affine maps voxel indices to RAS millimetres, as in
//! NIfTI's sform.

pub mod deid;
pub mod gz;
pub mod nifti;
pub mod series;

use ndarray::Array4;

/// A 4×4 affine (row-major), voxel index → RAS mm.
pub type Affine = [[f64; 4]; 4];

/// The storage type a volume came in (and is written back as when possible).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    F32,
    F64,
    Rgb24,
}

impl StoredType {
    /// NIfTI datatype code.
    pub fn code(self) -> i16 {
        match self {
            Self::U8 => 2,
            Self::I16 => 4,
            Self::I32 => 8,
            Self::F32 => 16,
            Self::F64 => 64,
            Self::Rgb24 => 128,
            Self::I8 => 256,
            Self::U16 => 512,
            Self::U32 => 768,
        }
    }

    /// From a NIfTI/Analyze datatype code.
    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => Self::U8,
            4 => Self::I16,
            8 => Self::I32,
            16 => Self::F32,
            64 => Self::F64,
            128 => Self::Rgb24,
            256 => Self::I8,
            512 => Self::U16,
            768 => Self::U32,
            _ => return None,
        })
    }

    /// Bits per voxel (all channels).
    pub fn bits(self) -> i16 {
        match self {
            Self::U8 | Self::I8 => 8,
            Self::I16 | Self::U16 => 16,
            Self::I32 | Self::U32 | Self::F32 => 32,
            Self::F64 => 64,
            Self::Rgb24 => 24,
        }
    }
}

/// A volume.
#[derive(Clone, Debug)]
pub struct Volume {
    /// Voxel values (after scaling: HU for CT), `[i, j, k, channel]`.
    pub data: Array4<f32>,
    /// Voxel → RAS mm.
    pub affine: Affine,
    /// Preferred storage type.
    pub stored: StoredType,
}

impl Volume {
    /// `(ni, nj, nk)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        let s = self.data.shape();
        (s[0], s[1], s[2])
    }

    /// Number of channels (1, or 3 for RGB).
    pub fn channels(&self) -> usize {
        self.data.shape()[3]
    }

    /// Voxel spacing: the length of each affine column.
    pub fn spacing(&self) -> [f64; 3] {
        let a = &self.affine;
        let col = |j: usize| (a[0][j].powi(2) + a[1][j].powi(2) + a[2][j].powi(2)).sqrt();
        [col(0), col(1), col(2)]
    }

    /// World (RAS mm) position of a voxel.
    pub fn world(&self, i: f64, j: f64, k: f64) -> [f64; 3] {
        let a = &self.affine;
        [
            a[0][0] * i + a[0][1] * j + a[0][2] * k + a[0][3],
            a[1][0] * i + a[1][1] * j + a[1][2] * k + a[1][3],
            a[2][0] * i + a[2][1] * j + a[2][2] * k + a[2][3],
        ]
    }
}

/// Diffusion gradients as FSL's `.bvec` wants them (dcm2niix writes the same): each direction
/// (DICOM LPS) in the image's own voxel axes, with the first axis negated when the affine's
/// determinant is positive (FSL's radiological convention). Rows are x, y, z.
pub fn fsl_bvecs(affine: &Affine, gradients: &[[f64; 3]]) -> [Vec<f64>; 3] {
    let mut r = [[0.0; 3]; 3];
    for col in 0..3 {
        let n = (0..3)
            .map(|row| affine[row][col].powi(2))
            .sum::<f64>()
            .sqrt();
        for row in 0..3 {
            r[row][col] = if n > 0.0 { affine[row][col] / n } else { 0.0 };
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for g in gradients {
        let ras = [-g[0], -g[1], g[2]];
        // The columns are orthonormal: the inverse is the transpose.
        let mut v = [0.0; 3];
        for (axis, o) in v.iter_mut().enumerate() {
            *o = (0..3).map(|row| r[row][axis] * ras[row]).sum();
        }
        if det > 0.0 {
            v[0] = -v[0];
        }
        for (axis, o) in out.iter_mut().enumerate() {
            // No negative zeros in the text.
            o.push(if v[axis].abs() < 1e-12 { 0.0 } else { v[axis] });
        }
    }
    out
}

/// `.bval` and `.bvec` text for a diffusion series (one line of b-values; three lines of
/// directions, FSL convention).
pub fn fsl_text(affine: &Affine, diffusion: &[(f64, [f64; 3])]) -> (String, String) {
    let fmt = |x: f64| {
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.').to_owned();
        if s == "-0" { "0".to_owned() } else { s }
    };
    let bval = diffusion
        .iter()
        .map(|(b, _)| fmt(*b))
        .collect::<Vec<_>>()
        .join(" ");
    let g: Vec<[f64; 3]> = diffusion.iter().map(|(_, g)| *g).collect();
    let rows = fsl_bvecs(affine, &g);
    let bvec = rows
        .iter()
        .map(|r| r.iter().map(|x| fmt(*x)).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n");
    (format!("{bval}\n"), format!("{bvec}\n"))
}

/// The affine of a diagonal spacing with the origin at zero.
pub fn diagonal(spacing: [f64; 3]) -> Affine {
    [
        [spacing[0], 0.0, 0.0, 0.0],
        [0.0, spacing[1], 0.0, 0.0],
        [0.0, 0.0, spacing[2], 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// NIfTI quaternion parameters (b, c, d, qfac) of the rotation part of an affine, and the
/// spacing, following the standard `mat44_to_quatern` construction.
pub fn to_quaternion(a: &Affine) -> ([f64; 3], f64, [f64; 3]) {
    let mut m = [[0.0f64; 3]; 3];
    let mut spacing = [0.0f64; 3];
    for j in 0..3 {
        let len = (a[0][j].powi(2) + a[1][j].powi(2) + a[2][j].powi(2)).sqrt();
        let len = if len == 0.0 { 1.0 } else { len };
        spacing[j] = len;
        for i in 0..3 {
            m[i][j] = a[i][j] / len;
        }
    }
    let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
    let qfac = if det < 0.0 {
        for row in &mut m {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    let trace = m[0][0] + m[1][1] + m[2][2] + 1.0;
    let (a_, b, c, d);
    if trace > 0.5 {
        a_ = 0.5 * trace.sqrt();
        b = 0.25 * (m[2][1] - m[1][2]) / a_;
        c = 0.25 * (m[0][2] - m[2][0]) / a_;
        d = 0.25 * (m[1][0] - m[0][1]) / a_;
    } else {
        let xd = 1.0 + m[0][0] - (m[1][1] + m[2][2]);
        let yd = 1.0 + m[1][1] - (m[0][0] + m[2][2]);
        let zd = 1.0 + m[2][2] - (m[0][0] + m[1][1]);
        let (mut aa, mut bb, mut cc, mut dd);
        if xd > 1.0 {
            bb = 0.5 * xd.sqrt();
            cc = 0.25 * (m[0][1] + m[1][0]) / bb;
            dd = 0.25 * (m[0][2] + m[2][0]) / bb;
            aa = 0.25 * (m[2][1] - m[1][2]) / bb;
        } else if yd > 1.0 {
            cc = 0.5 * yd.sqrt();
            bb = 0.25 * (m[0][1] + m[1][0]) / cc;
            dd = 0.25 * (m[1][2] + m[2][1]) / cc;
            aa = 0.25 * (m[0][2] - m[2][0]) / cc;
        } else {
            dd = 0.5 * zd.sqrt();
            bb = 0.25 * (m[0][2] + m[2][0]) / dd;
            cc = 0.25 * (m[1][2] + m[2][1]) / dd;
            aa = 0.25 * (m[1][0] - m[0][1]) / dd;
        }
        if aa < 0.0 {
            aa = -aa;
            bb = -bb;
            cc = -cc;
            dd = -dd;
        }
        a_ = aa;
        b = bb;
        c = cc;
        d = dd;
    }
    let _ = a_;
    ([b, c, d], qfac, spacing)
}

/// The affine of NIfTI quaternion parameters.
pub fn from_quaternion(q: [f64; 3], qfac: f64, spacing: [f64; 3], offset: [f64; 3]) -> Affine {
    let [b, c, d] = q;
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if qfac < 0.0 { -1.0 } else { 1.0 };
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        m[i][0] = r[i][0] * spacing[0];
        m[i][1] = r[i][1] * spacing[1];
        m[i][2] = r[i][2] * spacing[2] * qfac;
        m[i][3] = offset[i];
    }
    m[3][3] = 1.0;
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &Affine, b: &Affine) -> bool {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn quaternion_round_trip_for_oblique_and_flipped_affines() {
        let (s, c) = (0.3f64.sin(), 0.3f64.cos());
        let cases: [Affine; 3] = [
            diagonal([0.7, 0.8, 2.5]),
            [
                [-0.7 * c, 0.0, 2.5 * s, 10.0],
                [0.0, -0.7, 0.0, 20.0],
                [0.7 * s, 0.0, 2.5 * c, -5.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            [
                [0.5, 0.0, 0.0, 1.0],
                [0.0, 0.5, 0.0, 2.0],
                [0.0, 0.0, -3.0, 3.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        ];
        for a in cases {
            let (q, qfac, spacing) = to_quaternion(&a);
            let back = from_quaternion(q, qfac, spacing, [a[0][3], a[1][3], a[2][3]]);
            assert!(close(&a, &back), "{a:?} -> {back:?}");
        }
    }
}
