//! Label maps on the image's own grid: integer volumes (uint8, or uint16 past 255 classes),
//! written as NIfTI with a JSON sidecar naming the labels, read back with the grid checked.

use fc_volume::{Affine, StoredType, Volume, nifti};
use ndarray::{Array3, Array4, ArrayView3, ShapeBuilder};
use serde::{Deserialize, Serialize};

use crate::model::Project;

/// A voxel grid: shape and voxel → RAS mm affine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub shape: [usize; 3],
    pub affine: Affine,
}

impl Grid {
    /// The grid of a volume.
    pub fn of(v: &Volume) -> Grid {
        let (i, j, k) = v.shape();
        Grid {
            shape: [i, j, k],
            affine: v.affine,
        }
    }

    /// Voxel spacing (mm).
    pub fn spacing(&self) -> [f64; 3] {
        let a = &self.affine;
        let col = |j: usize| (a[0][j].powi(2) + a[1][j].powi(2) + a[2][j].powi(2)).sqrt();
        [col(0), col(1), col(2)]
    }

    /// A continuous voxel position in RAS mm.
    pub fn to_mm(&self, v: [f64; 3]) -> [f64; 3] {
        let a = &self.affine;
        std::array::from_fn(|r| a[r][0] * v[0] + a[r][1] * v[1] + a[r][2] * v[2] + a[r][3])
    }

    /// Same shape, and affines within `tolerance` mm at every corner of the grid.
    pub fn matches(&self, other: &Grid, tolerance: f64) -> Result<(), String> {
        if self.shape != other.shape {
            return Err(format!(
                "the label map is {:?} voxels and the image {:?}",
                other.shape, self.shape
            ));
        }
        for corner in 0..8u8 {
            let v: [f64; 3] = std::array::from_fn(|a| {
                if corner & (1 << a) != 0 {
                    (self.shape[a].max(1) - 1) as f64
                } else {
                    0.0
                }
            });
            let (p, q) = (self.to_mm(v), other.to_mm(v));
            let d = ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2)).sqrt();
            if d > tolerance || !d.is_finite() {
                return Err(format!(
                    "the label map's geometry differs from the image's by {d:.3} mm at a corner of the grid (allowed {tolerance} mm)"
                ));
            }
        }
        Ok(())
    }

    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A label map: values in Fortran order (i fastest), as NIfTI stores them.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMap {
    pub grid: Grid,
    pub data: Array3<u16>,
}

/// Why a label map is refused.
#[derive(Debug, thiserror::Error)]
pub enum LabelMapError {
    #[error("not a readable NIfTI label map: {0}")]
    Nifti(String),
    #[error("the label map has {0} channels or time points; it must be one 3D volume")]
    Channels(usize),
    #[error("voxel values must be whole numbers 0..=65535; found {0}")]
    Value(f64),
    #[error("{0}")]
    Grid(String),
    #[error("label value {0} is not a class of project {1}")]
    Label(u16, String),
}

impl LabelMap {
    /// An empty (all background) label map on `grid`.
    pub fn empty(grid: Grid) -> LabelMap {
        let [i, j, k] = grid.shape;
        LabelMap {
            grid,
            data: Array3::zeros((i, j, k).f()),
        }
    }

    /// The mask of one label.
    pub fn mask(&self, value: u16) -> Array3<bool> {
        self.data.mapv(|v| v == value)
    }

    /// Voxels per value, 0 included, counted in memory order.
    fn histogram(&self) -> Vec<u64> {
        let mut h = vec![0u64; 1 << 16];
        match self.data.as_slice_memory_order() {
            Some(s) => s.iter().for_each(|&v| h[usize::from(v)] += 1),
            None => self.data.iter().for_each(|&v| h[usize::from(v)] += 1),
        }
        h
    }

    /// The labels present (without 0).
    pub fn present(&self) -> Vec<u16> {
        self.counts().into_keys().collect()
    }

    /// Voxels per label (without 0).
    pub fn counts(&self) -> std::collections::BTreeMap<u16, u64> {
        self.histogram()
            .into_iter()
            .enumerate()
            .skip(1)
            .filter(|(_, n)| *n > 0)
            .map(|(v, n)| (v as u16, n))
            .collect()
    }

    /// Read a NIfTI label map (gzipped or not). Unscaled uint8 and uint16 maps (what viewers
    /// and this node write) are read straight into place; any other type is decoded and
    /// checked voxel by voxel.
    pub fn from_nifti(bytes: &[u8]) -> Result<LabelMap, LabelMapError> {
        let (header, data) =
            nifti::read_raw(bytes).map_err(|e| LabelMapError::Nifti(e.to_string()))?;
        let unscaled = (header.scl_slope == 0.0 || !header.scl_slope.is_finite())
            || (header.scl_slope == 1.0 && header.scl_inter == 0.0);
        let d = &header.dims;
        let three_d = (d.len() == 3 || (d.len() == 4 && d[3] == 1)) && d.iter().all(|&x| x >= 1);
        let bytes_per = match header.datatype {
            StoredType::U8 => 1,
            StoredType::U16 => 2,
            _ => 0,
        };
        if unscaled && three_d && bytes_per > 0 {
            let shape = [d[0] as usize, d[1] as usize, d[2] as usize];
            let n = shape[0] * shape[1] * shape[2];
            if data.len() < n * bytes_per {
                return Err(LabelMapError::Nifti(format!(
                    "the voxel data is cut short: {} bytes of {}",
                    data.len(),
                    n * bytes_per
                )));
            }
            // NIfTI stores i fastest: Fortran order, the map's own layout.
            let values: Vec<u16> = if bytes_per == 1 {
                data[..n].iter().map(|&b| u16::from(b)).collect()
            } else {
                data[..2 * n]
                    .chunks_exact(2)
                    .map(|c| {
                        if header.big_endian {
                            u16::from_be_bytes([c[0], c[1]])
                        } else {
                            u16::from_le_bytes([c[0], c[1]])
                        }
                    })
                    .collect()
            };
            let data = Array3::from_shape_vec((shape[0], shape[1], shape[2]).f(), values)
                .map_err(|e| LabelMapError::Nifti(e.to_string()))?;
            return Ok(LabelMap {
                grid: Grid {
                    shape,
                    affine: header.affine,
                },
                data,
            });
        }
        let v = nifti::decode(&header, &data).map_err(|e| LabelMapError::Nifti(e.to_string()))?;
        if v.channels() != 1 {
            return Err(LabelMapError::Channels(v.channels()));
        }
        let grid = Grid::of(&v);
        let [i, j, k] = grid.shape;
        let mut data = Array3::zeros((i, j, k).f());
        for (out, &x) in data.iter_mut().zip(v.data.iter()) {
            let x = f64::from(x);
            if !(0.0..=65535.0).contains(&x) || x.fract() != 0.0 {
                return Err(LabelMapError::Value(x));
            }
            *out = x as u16;
        }
        Ok(LabelMap { grid, data })
    }

    /// Check the map against the image grid and the project's classes.
    pub fn check(&self, image: &Grid, project: &Project) -> Result<(), LabelMapError> {
        image
            .matches(&self.grid, 1e-3)
            .map_err(LabelMapError::Grid)?;
        for v in self.present() {
            if project.label(v).is_none() {
                return Err(LabelMapError::Label(v, project.id.clone()));
            }
        }
        Ok(())
    }

    /// As a volume (uint8 when every value fits, else uint16).
    pub fn to_volume(&self) -> Volume {
        let [i, j, k] = self.grid.shape;
        let mut data = Array4::<f32>::zeros((i, j, k, 1).f());
        // Both in Fortran order: Zip walks them in memory order.
        ndarray::Zip::from(data.index_axis_mut(ndarray::Axis(3), 0))
            .and(&self.data)
            .for_each(|out, &v| *out = f32::from(v));
        let max = self.max();
        Volume {
            data,
            affine: self.grid.affine,
            stored: if max > 255 {
                StoredType::U16
            } else {
                StoredType::U8
            },
        }
    }

    /// NIfTI-1, gzipped: the same bytes as encoding [`Self::to_volume`], written straight
    /// from the values in NIfTI's order.
    pub fn to_nifti_gz(&self) -> std::io::Result<Vec<u8>> {
        // The transpose's logical order is the map's i-fastest order, whatever its layout.
        let values = self.data.t();
        let wide = self.max() > 255;
        let mut voxels = Vec::with_capacity(self.grid.voxels() * if wide { 2 } else { 1 });
        if wide {
            values
                .iter()
                .for_each(|v| voxels.extend_from_slice(&v.to_le_bytes()));
        } else {
            voxels.extend(values.iter().map(|&v| v as u8));
        }
        let stored = if wide {
            StoredType::U16
        } else {
            StoredType::U8
        };
        let raw = nifti::encode_raw(self.grid.shape, &self.grid.affine, stored, &voxels);
        nifti::gzip(&raw, 6)
    }

    /// The largest value.
    fn max(&self) -> u16 {
        match self.data.as_slice_memory_order() {
            Some(s) => s.iter().copied().max().unwrap_or(0),
            None => self.data.iter().copied().max().unwrap_or(0),
        }
    }

    /// A view of the values.
    pub fn view(&self) -> ArrayView3<'_, u16> {
        self.data.view()
    }
}

/// The JSON sidecar of an exported label map: which value means what.
pub fn sidecar(project: &Project) -> serde_json::Value {
    let labels: serde_json::Map<String, serde_json::Value> = project
        .labels
        .iter()
        .map(|l| {
            let mut entry = serde_json::json!({
                "name": l.name,
                "colour": format!("#{:02x}{:02x}{:02x}", l.colour[0], l.colour[1], l.colour[2]),
            });
            if let Some(c) = &l.category {
                entry["category"] = serde_json::json!(c);
            }
            if let Some(t) = &l.property_type {
                entry["type"] = serde_json::json!(t);
            }
            (l.value.to_string(), entry)
        })
        .collect();
    serde_json::json!({
        "project": project.id,
        "background": 0,
        "labels": labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(wide: bool) -> LabelMap {
        let grid = Grid {
            shape: [5, 4, 3],
            affine: [
                [-0.8, 0.1, 0.0, 12.0],
                [0.0, 0.9, 0.2, -7.0],
                [0.05, 0.0, 2.5, 30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let mut m = LabelMap::empty(grid);
        for ((i, j, k), v) in m.data.indexed_iter_mut() {
            *v = ((i * 7 + j * 3 + k * 11) % 5) as u16 * if wide { 300 } else { 1 };
        }
        m
    }

    /// The direct encoding writes the bytes the volume encoder writes, and reading them back
    /// (the fast path) gives the same map, for uint8 and uint16 maps.
    #[test]
    fn direct_encoding_matches_the_volume_encoder_and_reads_back() {
        for wide in [false, true] {
            let m = map(wide);
            let direct = m.to_nifti_gz().expect("encode");
            let via_volume = nifti::encode_gz(&m.to_volume()).expect("encode");
            assert_eq!(direct, via_volume, "wide: {wide}");
            let back = LabelMap::from_nifti(&direct).expect("read");
            assert_eq!(back.data, m.data);
            assert_eq!(back.grid.shape, m.grid.shape);
            m.grid.matches(&back.grid, 1e-4).expect("same grid");
            assert_eq!(back.counts(), m.counts());
            assert_eq!(
                m.present(),
                vec![1, 2, 3, 4]
                    .into_iter()
                    .map(|v| v * if wide { 300 } else { 1 })
                    .collect::<Vec<u16>>()
            );
        }
    }
}
