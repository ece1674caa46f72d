//! NIfTI-1 (`.nii`, `.nii.gz`, `.hdr`/`.img`), NIfTI-2 (540-byte header) and Analyze 7.5
//! (`.hdr`/`.img` without the NIfTI magic), in either byte order: header parsing, voxel data
//! with `scl_slope`/`scl_inter` applied, and a NIfTI-1 writer.
//!
//! The writer is also the de-identifier for these formats: it writes only geometry and data,
//! so `descrip`, `aux_file`, `intent_name`, `db_name`, `data_type`, Analyze's history fields
//! and every header extension of the input are gone, and its gzip stream carries no file name
//! and no timestamp.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use ndarray::Array4;

use super::{Affine, StoredType, Volume, from_quaternion, to_quaternion};

/// The three header flavours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavour {
    Nifti1,
    Nifti2,
    Analyze,
}

/// A problem with a NIfTI or Analyze input: a content finding (quarantine reason), not an I/O
/// failure of the node.
#[derive(Debug, thiserror::Error)]
pub enum NiftiError {
    #[error("cannot read: {0}")]
    Io(#[from] io::Error),
    #[error(
        "not a NIfTI or Analyze header (sizeof_hdr is neither 348 nor 540 in either byte order)"
    )]
    NotNifti,
    #[error("unsupported datatype code {0}")]
    Datatype(i16),
    #[error("unsupported dimensions {0:?} (1 to 4 dimensions, 4th of size 1, are read)")]
    Dimensions(Vec<i64>),
    #[error("voxel data is shorter than the header says ({have} of {need} bytes)")]
    Truncated { have: usize, need: usize },
    #[error("the .img file paired with this header is missing")]
    MissingImage,
}

impl NiftiError {
    /// Machine-readable reason for the quarantine.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Io(_) => "unreadable",
            Self::NotNifti => "not-nifti",
            Self::Datatype(_) => "unsupported-datatype",
            Self::Dimensions(_) => "unsupported-dimensions",
            Self::Truncated { .. } => "truncated",
            Self::MissingImage => "missing-image-file",
        }
    }
}

/// Parsed header fields the reader needs.
#[derive(Clone, Debug)]
pub struct Header {
    pub flavour: Flavour,
    pub big_endian: bool,
    pub dims: Vec<i64>,
    pub datatype: StoredType,
    pub pixdim: [f64; 8],
    pub vox_offset: u64,
    pub scl_slope: f64,
    pub scl_inter: f64,
    pub affine: Affine,
    /// Whether the header itself says "single file" (`n+1`, `n+2`).
    pub single_file: bool,
}

struct Cursor<'a> {
    b: &'a [u8],
    be: bool,
}

impl Cursor<'_> {
    fn raw<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut a = [0u8; N];
        if let Some(s) = self.b.get(at..at + N) {
            a.copy_from_slice(s);
        }
        if self.be {
            a.reverse();
        }
        a
    }
    fn i16(&self, at: usize) -> i16 {
        i16::from_le_bytes(self.raw(at))
    }
    fn i32(&self, at: usize) -> i32 {
        i32::from_le_bytes(self.raw(at))
    }
    fn i64(&self, at: usize) -> i64 {
        i64::from_le_bytes(self.raw(at))
    }
    fn f32(&self, at: usize) -> f64 {
        f64::from(f32::from_le_bytes(self.raw(at)))
    }
    fn f64(&self, at: usize) -> f64 {
        f64::from_le_bytes(self.raw(at))
    }
}

/// Parse a header from its first bytes (at least 348, or 540 for NIfTI-2).
pub fn parse_header(b: &[u8]) -> Result<Header, NiftiError> {
    let le = |n: usize| {
        b.get(0..4)
            .map(|s| i32::from_le_bytes([s[0], s[1], s[2], s[3]]))
            == Some(n as i32)
    };
    let be = |n: usize| {
        b.get(0..4)
            .map(|s| i32::from_be_bytes([s[0], s[1], s[2], s[3]]))
            == Some(n as i32)
    };
    let (size, big_endian) = if le(348) {
        (348, false)
    } else if be(348) {
        (348, true)
    } else if le(540) {
        (540, false)
    } else if be(540) {
        (540, true)
    } else {
        return Err(NiftiError::NotNifti);
    };
    if b.len() < size {
        return Err(NiftiError::Truncated {
            have: b.len(),
            need: size,
        });
    }
    let c = Cursor { b, be: big_endian };
    if size == 540 {
        let dims: Vec<i64> = (0..8).map(|i| c.i64(16 + 8 * i)).collect();
        let code = c.i16(12);
        let datatype = StoredType::from_code(code).ok_or(NiftiError::Datatype(code))?;
        let mut pixdim = [0.0; 8];
        for (i, p) in pixdim.iter_mut().enumerate() {
            *p = c.f64(104 + 8 * i);
        }
        let qform_code = c.i32(344);
        let sform_code = c.i32(348);
        let srow = |row: usize| {
            [
                c.f64(400 + 32 * row),
                c.f64(408 + 32 * row),
                c.f64(416 + 32 * row),
                c.f64(424 + 32 * row),
            ]
        };
        let affine = pick_affine(
            sform_code,
            qform_code,
            [srow(0), srow(1), srow(2)],
            [c.f64(352), c.f64(360), c.f64(368)],
            [c.f64(376), c.f64(384), c.f64(392)],
            &pixdim,
        );
        return Ok(Header {
            flavour: Flavour::Nifti2,
            big_endian,
            dims: dims_used(&dims),
            datatype,
            pixdim,
            vox_offset: c.i64(168).max(0) as u64,
            scl_slope: c.f64(176),
            scl_inter: c.f64(184),
            affine,
            single_file: b.get(4..7) == Some(b"n+2"),
        });
    }
    let magic = b.get(344..347).unwrap_or(&[]);
    let flavour = if magic == b"n+1" || magic == b"ni1" {
        Flavour::Nifti1
    } else {
        Flavour::Analyze
    };
    let dims: Vec<i64> = (0..8).map(|i| i64::from(c.i16(40 + 2 * i))).collect();
    let code = c.i16(70);
    let datatype = StoredType::from_code(code).ok_or(NiftiError::Datatype(code))?;
    let mut pixdim = [0.0; 8];
    for (i, p) in pixdim.iter_mut().enumerate() {
        *p = c.f32(76 + 4 * i);
    }
    let (affine, slope, inter) = if flavour == Flavour::Nifti1 {
        let srow = |row: usize| {
            [
                c.f32(280 + 16 * row),
                c.f32(284 + 16 * row),
                c.f32(288 + 16 * row),
                c.f32(292 + 16 * row),
            ]
        };
        let affine = pick_affine(
            i32::from(c.i16(254)),
            i32::from(c.i16(252)),
            [srow(0), srow(1), srow(2)],
            [c.f32(256), c.f32(260), c.f32(264)],
            [c.f32(268), c.f32(272), c.f32(276)],
            &pixdim,
        );
        (affine, c.f32(112), c.f32(116))
    } else {
        // Analyze: spacing only; SPM's funused1 (offset 112) is a scale factor when non-zero.
        let s = c.f32(112);
        (
            pick_affine(0, 0, [[0.0; 4]; 3], [0.0; 3], [0.0; 3], &pixdim),
            if s == 0.0 { 1.0 } else { s },
            0.0,
        )
    };
    Ok(Header {
        flavour,
        big_endian,
        dims: dims_used(&dims),
        datatype,
        pixdim,
        vox_offset: c.f32(108).max(0.0) as u64,
        scl_slope: slope,
        scl_inter: inter,
        affine,
        single_file: magic == b"n+1",
    })
}

fn dims_used(dims: &[i64]) -> Vec<i64> {
    let n = dims.first().copied().unwrap_or(0).clamp(0, 7) as usize;
    dims.get(1..=n).map(<[i64]>::to_vec).unwrap_or_default()
}

fn pick_affine(
    sform_code: i32,
    qform_code: i32,
    srow: [[f64; 4]; 3],
    quatern: [f64; 3],
    offset: [f64; 3],
    pixdim: &[f64; 8],
) -> Affine {
    if sform_code > 0 {
        return [srow[0], srow[1], srow[2], [0.0, 0.0, 0.0, 1.0]];
    }
    let spacing = [
        if pixdim[1] > 0.0 { pixdim[1] } else { 1.0 },
        if pixdim[2] > 0.0 { pixdim[2] } else { 1.0 },
        if pixdim[3] > 0.0 { pixdim[3] } else { 1.0 },
    ];
    if qform_code > 0 {
        return from_quaternion(quatern, pixdim[0], spacing, offset);
    }
    super::diagonal(spacing)
}

/// At most `cap` bytes of a file, inflated when it is gzip: a small `.nii.gz` that would
/// inflate to gigabytes is read only as far as its header says it holds.
fn read_capped(path: &Path, cap: u64) -> io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let mut magic = [0u8; 2];
    let gz = file.read(&mut magic)? == 2 && magic == [0x1F, 0x8B];
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    capped(io::BufReader::new(file), gz, len, cap)
}

/// At most `cap` bytes from a reader of `len` bytes, inflated when `gz`.
fn capped(reader: impl Read, gz: bool, len: u64, cap: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    if gz {
        flate2::read::MultiGzDecoder::new(reader)
            .take(cap)
            .read_to_end(&mut out)?;
    } else {
        out.reserve_exact(len.min(cap) as usize);
        reader.take(cap).read_to_end(&mut out)?;
    }
    Ok(out)
}

/// Read a single-file NIfTI-1/2 (`.nii` or `.nii.gz` bytes) from memory, with the same bounds
/// as [`read`]: inflated only as far as the header declares.
pub fn read_bytes(bytes: &[u8]) -> Result<(Header, Volume), NiftiError> {
    let (header, data) = read_raw(bytes)?;
    let volume = decode(&header, &data)?;
    Ok((header, volume))
}

/// The header and the voxel bytes as stored (gzip inflated, at most what the header
/// declares), for callers that decode a known type themselves.
pub fn read_raw(bytes: &[u8]) -> Result<(Header, Vec<u8>), NiftiError> {
    let gz = bytes.starts_with(&[0x1F, 0x8B]);
    let len = bytes.len() as u64;
    let head = capped(bytes, gz, len, HEADER_READ)?;
    let header = parse_header(&head)?;
    let need = header.data_bytes()?;
    let mut all = capped(bytes, gz, len, header.vox_offset.saturating_add(need))?;
    let start = (header.vox_offset as usize).min(all.len());
    all.drain(..start);
    Ok((header, all))
}

/// The largest header (NIfTI-2) and the magic after it.
const HEADER_READ: u64 = 544;

impl Header {
    /// Bytes of voxel data the header declares (all dimensions), with checked arithmetic.
    pub fn data_bytes(&self) -> Result<u64, NiftiError> {
        data_size(&self.dims, u64::try_from(self.datatype.bits()).unwrap_or(0))
    }
}

/// Bytes of voxel data for `dims` at `bits` per voxel: checked products, every dimension at
/// least 1, at most [`MAX_DATA_BYTES`]; otherwise the dimensions are refused.
fn data_size(dims: &[i64], bits: u64) -> Result<u64, NiftiError> {
    dims.iter()
        .try_fold(bits, |acc, &d| {
            u64::try_from(d)
                .ok()
                .filter(|&d| d > 0)
                .and_then(|d| acc.checked_mul(d))
        })
        .map(|b| b.div_ceil(8))
        .filter(|&b| !dims.is_empty() && b <= MAX_DATA_BYTES)
        .ok_or_else(|| NiftiError::Dimensions(dims.to_vec()))
}

/// No volume larger than this (64 GiB of voxel data) is read; its dimensions are refused.
const MAX_DATA_BYTES: u64 = 1 << 36;

/// The image file paired with a `.hdr` (`.img` or `.img.gz`).
pub fn image_pair(header: &Path) -> Option<PathBuf> {
    let name = header.file_name()?.to_string_lossy().into_owned();
    let stem = name
        .strip_suffix(".hdr.gz")
        .or_else(|| name.strip_suffix(".hdr"))?;
    [format!("{stem}.img"), format!("{stem}.img.gz")]
        .into_iter()
        .map(|n| header.with_file_name(n))
        .find(|p| p.exists())
}

/// Whether a path looks like a NIfTI/Analyze header or single file.
pub fn is_nifti_path(path: &Path) -> bool {
    let n = path.to_string_lossy().to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz") || n.ends_with(".hdr") || n.ends_with(".hdr.gz")
}

/// Read a NIfTI-1/2 or Analyze volume from its path (`.nii[.gz]` or `.hdr[.gz]` + `.img[.gz]`).
pub fn read(path: &Path) -> Result<(Header, Volume), NiftiError> {
    let head = read_capped(path, HEADER_READ)?;
    let header = parse_header(&head)?;
    let need = header.data_bytes()?;
    let data: Vec<u8> = if header.single_file
        || (header.flavour != Flavour::Analyze && !path.to_string_lossy().contains(".hdr"))
    {
        let total = header.vox_offset.saturating_add(need);
        let bytes = read_capped(path, total)?;
        bytes
            .get(header.vox_offset as usize..)
            .unwrap_or(&[])
            .to_vec()
    } else {
        let img = image_pair(path).ok_or(NiftiError::MissingImage)?;
        let all = read_capped(&img, header.vox_offset.saturating_add(need))?;
        all.get(header.vox_offset as usize..)
            .unwrap_or(&[])
            .to_vec()
    };
    let volume = decode(&header, &data)?;
    Ok((header, volume))
}

/// Read a 3D or 4D image as its volumes (see [`read`]).
pub fn read_series(path: &Path) -> Result<(Header, Vec<Volume>), NiftiError> {
    let head = read_capped(path, HEADER_READ)?;
    let header = parse_header(&head)?;
    let need = header.data_bytes()?;
    let bytes = read_capped(path, header.vox_offset.saturating_add(need))?;
    let data = bytes.get(header.vox_offset as usize..).unwrap_or(&[]);
    let volumes = decode_series(&header, data)?;
    Ok((header, volumes))
}

/// Bits per voxel of every NIfTI datatype code (binary, integers, floats up to 128 bits,
/// complex, RGB, RGBA).
fn bits_of_code(code: i16) -> Option<u64> {
    Some(match code {
        1 => 1,
        2 | 256 => 8,
        4 | 512 => 16,
        128 => 24,
        8 | 16 | 768 | 2304 => 32,
        32 | 64 | 1024 | 1280 => 64,
        1536 | 1792 => 128,
        2048 => 256,
        _ => return None,
    })
}

/// Text fields of a NIfTI-1 header (and the Analyze fields in the same places): data_type,
/// db_name, descrip, aux_file, intent_name.
const NIFTI1_TEXT: [(usize, usize); 5] = [(4, 14), (14, 32), (148, 228), (228, 252), (328, 344)];
/// Text fields of a NIfTI-2 header: descrip, aux_file, intent_name, unused_str.
const NIFTI2_TEXT: [(usize, usize); 4] = [(240, 320), (320, 344), (508, 524), (525, 540)];

/// De-identify a NIfTI-1/2 or Analyze file of any dimensions and any datatype without
/// decoding it: the header keeps its numbers (dimensions, datatype, spacing, geometry,
/// scaling, intent and slice timing codes) in the input's byte order, loses every text field,
/// Analyze's history (which holds a patient id and dates) and every extension, and says
/// single-file; the voxels are copied byte for byte. Returns the `.nii` bytes.
pub fn rewrite(path: &Path) -> Result<Vec<u8>, NiftiError> {
    let head = read_capped(path, HEADER_READ)?;
    let sized = |n: i32| {
        head.get(0..4).is_some_and(|s| {
            let a = [s[0], s[1], s[2], s[3]];
            i32::from_le_bytes(a) == n || i32::from_be_bytes(a) == n
        })
    };
    let (size, nifti2) = if sized(540) {
        (540usize, true)
    } else if sized(348) {
        (348usize, false)
    } else {
        return Err(NiftiError::NotNifti);
    };
    let big_endian = head.get(0..4).is_some_and(|s| s[0] == 0);
    if head.len() < size {
        return Err(NiftiError::Truncated {
            have: head.len(),
            need: size,
        });
    }
    let c = Cursor {
        b: &head,
        be: big_endian,
    };
    let (dims, code, vox_offset): (Vec<i64>, i16, u64) = if nifti2 {
        (
            dims_used(&(0..8).map(|i| c.i64(16 + 8 * i)).collect::<Vec<_>>()),
            c.i16(12),
            c.i64(168).max(0) as u64,
        )
    } else {
        (
            dims_used(
                &(0..8)
                    .map(|i| i64::from(c.i16(40 + 2 * i)))
                    .collect::<Vec<_>>(),
            ),
            c.i16(70),
            c.f32(108).max(0.0) as u64,
        )
    };
    let bits = bits_of_code(code).ok_or(NiftiError::Datatype(code))?;
    let need = data_size(&dims, bits)?;
    let analyze = !nifti2 && !matches!(head.get(344..347), Some(b"n+1") | Some(b"ni1"));
    let paired =
        analyze || head.get(344..347) == Some(b"ni1") || path.to_string_lossy().contains(".hdr");
    let data = if paired {
        let img = image_pair(path).ok_or(NiftiError::MissingImage)?;
        read_capped(&img, vox_offset.saturating_add(need))?
    } else {
        read_capped(path, vox_offset.saturating_add(need))?
    };
    let voxels = data
        .get(vox_offset as usize..)
        .filter(|v| v.len() as u64 >= need)
        .ok_or(NiftiError::Truncated {
            have: data.len().saturating_sub(vox_offset as usize),
            need: need as usize,
        })?;
    let mut h = head[..size].to_vec();
    let text: &[(usize, usize)] = if nifti2 { &NIFTI2_TEXT } else { &NIFTI1_TEXT };
    for &(from, to) in text {
        h[from..to].fill(0);
    }
    let offset = size + 4;
    if nifti2 {
        h[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
        let v = offset as i64;
        h[168..176].copy_from_slice(&if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    } else {
        if analyze {
            // Analyze's data history (originator, patient id, dates, ...): all of it goes; the
            // NIfTI fields in its place stay zero (geometry from the spacing, as Analyze meant).
            h[148..348].fill(0);
        }
        h[344..348].copy_from_slice(b"n+1\0");
        let v = offset as f32;
        h[108..112].copy_from_slice(&if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        });
    }
    // Extension flag: none.
    h.extend_from_slice(&[0, 0, 0, 0]);
    h.extend_from_slice(&voxels[..need as usize]);
    Ok(h)
}

/// Decode voxel data for a header.
pub fn decode(header: &Header, data: &[u8]) -> Result<Volume, NiftiError> {
    let d = &header.dims;
    if d.get(3).is_some_and(|&t| t != 1) {
        return Err(NiftiError::Dimensions(d.clone()));
    }
    decode_series(header, data)?
        .into_iter()
        .next()
        .ok_or_else(|| NiftiError::Dimensions(d.clone()))
}

/// Decode a 3D or 4D image into its volumes (one per `dim[4]`).
pub fn decode_series(header: &Header, data: &[u8]) -> Result<Vec<Volume>, NiftiError> {
    let d = &header.dims;
    if d.is_empty() || d.len() > 4 || d.iter().any(|&x| x < 1) {
        return Err(NiftiError::Dimensions(d.clone()));
    }
    let ni = d[0] as usize;
    let nj = d.get(1).copied().unwrap_or(1) as usize;
    let nk = d.get(2).copied().unwrap_or(1) as usize;
    let channels = if header.datatype == StoredType::Rgb24 {
        3
    } else {
        1
    };
    let need =
        usize::try_from(header.data_bytes()?).map_err(|_| NiftiError::Dimensions(d.clone()))?;
    if data.len() < need {
        return Err(NiftiError::Truncated {
            have: data.len(),
            need,
        });
    }
    let be = header.big_endian;
    let word = |at: usize, len: usize| -> [u8; 8] {
        let mut a = [0u8; 8];
        a[..len].copy_from_slice(&data[at..at + len]);
        if be {
            a[..len].reverse();
        }
        a
    };
    let value = |idx: usize| -> f64 {
        match header.datatype {
            StoredType::U8 | StoredType::Rgb24 => f64::from(data[idx]),
            StoredType::I8 => f64::from(data[idx] as i8),
            StoredType::I16 => {
                let a = word(idx * 2, 2);
                f64::from(i16::from_le_bytes([a[0], a[1]]))
            }
            StoredType::U16 => {
                let a = word(idx * 2, 2);
                f64::from(u16::from_le_bytes([a[0], a[1]]))
            }
            StoredType::I32 => {
                let a = word(idx * 4, 4);
                f64::from(i32::from_le_bytes([a[0], a[1], a[2], a[3]]))
            }
            StoredType::U32 => {
                let a = word(idx * 4, 4);
                f64::from(u32::from_le_bytes([a[0], a[1], a[2], a[3]]))
            }
            StoredType::F32 => {
                let a = word(idx * 4, 4);
                f64::from(f32::from_le_bytes([a[0], a[1], a[2], a[3]]))
            }
            StoredType::F64 => f64::from_le_bytes(word(idx * 8, 8)),
        }
    };
    let (slope, inter) = if header.scl_slope == 0.0 || !header.scl_slope.is_finite() {
        (1.0, 0.0)
    } else {
        (header.scl_slope, header.scl_inter)
    };
    let scaled = header.datatype != StoredType::Rgb24;
    let nt = d.get(3).copied().unwrap_or(1) as usize;
    let mut volumes = Vec::with_capacity(nt);
    for t in 0..nt {
        // One channel: Fortran order, which is the file's order, converted in parallel parts.
        if channels == 1 {
            use ndarray::ShapeBuilder;
            use rayon::prelude::*;
            let mut out = Array4::<f32>::zeros((ni, nj, nk, 1).f());
            let Some(voxels) = out.as_slice_memory_order_mut() else {
                return Err(NiftiError::Dimensions(d.clone()));
            };
            let base = t * ni * nj * nk;
            const PART: usize = 1 << 16;
            voxels
                .par_chunks_mut(PART)
                .enumerate()
                .for_each(|(p, dst)| {
                    let first = base + p * PART;
                    macro_rules! take {
                        ($t:ty, $n:expr) => {{
                            let src = &data[first * $n..(first + dst.len()) * $n];
                            for (x, b) in dst.iter_mut().zip(src.chunks_exact($n)) {
                                let mut a = [0u8; $n];
                                a.copy_from_slice(b);
                                let raw = if be {
                                    <$t>::from_be_bytes(a)
                                } else {
                                    <$t>::from_le_bytes(a)
                                };
                                *x = (f64::from(raw) * slope + inter) as f32;
                            }
                        }};
                    }
                    match header.datatype {
                        StoredType::U8 | StoredType::Rgb24 => take!(u8, 1),
                        StoredType::I8 => take!(i8, 1),
                        StoredType::I16 => take!(i16, 2),
                        StoredType::U16 => take!(u16, 2),
                        StoredType::I32 => take!(i32, 4),
                        StoredType::U32 => take!(u32, 4),
                        StoredType::F32 => take!(f32, 4),
                        StoredType::F64 => {
                            let src = &data[first * 8..(first + dst.len()) * 8];
                            for (x, b) in dst.iter_mut().zip(src.chunks_exact(8)) {
                                let mut a = [0u8; 8];
                                a.copy_from_slice(b);
                                let raw = if be {
                                    f64::from_be_bytes(a)
                                } else {
                                    f64::from_le_bytes(a)
                                };
                                *x = (raw * slope + inter) as f32;
                            }
                        }
                    }
                });
            volumes.push(Volume {
                data: out,
                affine: header.affine,
                stored: header.datatype,
            });
            continue;
        }
        let mut out = Array4::<f32>::zeros((ni, nj, nk, channels));
        for k in 0..nk {
            for j in 0..nj {
                for i in 0..ni {
                    let v = i + ni * (j + nj * (k + nk * t));
                    for c in 0..channels {
                        let raw = value(v * channels + c);
                        out[[i, j, k, c]] = if scaled {
                            (raw * slope + inter) as f32
                        } else {
                            raw as f32
                        };
                    }
                }
            }
        }
        volumes.push(Volume {
            data: out,
            affine: header.affine,
            stored: header.datatype,
        });
    }
    Ok(volumes)
}

fn clamp_round(v: f32, lo: f64, hi: f64) -> f64 {
    f64::from(v).round().clamp(lo, hi)
}

/// Encode a volume as a NIfTI-1 single file (`.nii`), little endian, with sform and qform
/// both set from the affine (code 1, scanner anatomical), and no extension.
pub fn encode(volume: &Volume) -> Vec<u8> {
    encode_series(volume, &[], 1.0)
}

/// Encode a 4D series (`first`, then `more` of the same shape and affine, e.g. fMRI time
/// points or diffusion directions) as one NIfTI-1 file: `dim[4]` volumes, `pixdim[4]` the
/// time between them in seconds. With nothing in `more` it is [`encode`].
pub fn encode_series(first: &Volume, more: &[Volume], seconds: f64) -> Vec<u8> {
    let (ni, nj, nk) = first.shape();
    let width = (stored_of(first).bits() as usize / 8).max(1);
    let mut out = Vec::with_capacity(352 + (1 + more.len()) * ni * nj * nk * width);
    // Writing to memory cannot fail.
    let _ = write_series(&mut out, first, more, seconds);
    out
}

/// The type a volume is written as (three channels are RGB).
fn stored_of(volume: &Volume) -> StoredType {
    if volume.channels() == 3 {
        StoredType::Rgb24
    } else {
        volume.stored
    }
}

/// Voxels converted per block when a volume is written as it is converted.
const WRITE_BLOCK: usize = 1 << 20;

/// Write what [`encode_series`] returns to `out` as it is converted, a block of voxels at a
/// time (each block converted on every core): no copy of the whole file is held.
pub fn write_series<W: io::Write>(
    out: &mut W,
    first: &Volume,
    more: &[Volume],
    seconds: f64,
) -> io::Result<()> {
    let (ni, nj, nk) = first.shape();
    let stored = stored_of(first);
    let nt = 1 + more.len();
    out.write_all(&header_bytes(
        [ni, nj, nk, nt],
        stored,
        &first.affine,
        seconds,
    ))?;
    let mut buf = Vec::new();
    for volume in std::iter::once(first).chain(more) {
        match single_channel_voxels(volume, stored) {
            Some(voxels) => {
                for block in voxels.chunks(WRITE_BLOCK) {
                    buf.clear();
                    push_voxels_single_channel(&mut buf, block, stored);
                    out.write_all(&buf)?;
                }
            }
            None => {
                buf.clear();
                push_voxels(&mut buf, volume, stored);
                out.write_all(&buf)?;
            }
        }
    }
    Ok(())
}

/// Write a series as [`crate::gz::NiftiCompression`] asks: `.nii`, or gzipped as it is
/// converted (parts deflated in parallel, [`crate::gz::GzWriter`]).
pub fn write_series_as<W: io::Write>(
    out: W,
    first: &Volume,
    more: &[Volume],
    seconds: f64,
    compress: crate::gz::NiftiCompression,
) -> io::Result<W> {
    match compress.level() {
        None => {
            let mut out = out;
            write_series(&mut out, first, more, seconds)?;
            Ok(out)
        }
        Some(level) => {
            let mut gz = crate::gz::GzWriter::new(out, level)?;
            write_series(&mut gz, first, more, seconds)?;
            gz.finish()
        }
    }
}

/// A single-channel volume's voxels in memory order, when that is NIfTI's order (Fortran).
fn single_channel_voxels(volume: &Volume, stored: StoredType) -> Option<&[f32]> {
    if volume.channels() != 1
        || stored == StoredType::Rgb24
        || !volume.data.t().is_standard_layout()
    {
        return None;
    }
    volume.data.as_slice_memory_order()
}

/// A 3D NIfTI-1 file of voxels already in NIfTI's order and `stored` type (little-endian).
pub fn encode_raw(
    shape: [usize; 3],
    affine: &Affine,
    stored: StoredType,
    voxels: &[u8],
) -> Vec<u8> {
    let mut out = header_bytes([shape[0], shape[1], shape[2], 1], stored, affine, 1.0);
    out.extend_from_slice(voxels);
    out
}

/// The 352 bytes before the voxels: the header and an empty extension flag.
fn header_bytes(dims4: [usize; 4], stored: StoredType, affine: &Affine, seconds: f64) -> Vec<u8> {
    let [ni, nj, nk, nt] = dims4;
    let mut h = vec![0u8; 352];
    let put_i16 =
        |h: &mut Vec<u8>, at: usize, v: i16| h[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put_i32 =
        |h: &mut Vec<u8>, at: usize, v: i32| h[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put_f32 = |h: &mut Vec<u8>, at: usize, v: f64| {
        h[at..at + 4].copy_from_slice(&(v as f32).to_le_bytes())
    };
    put_i32(&mut h, 0, 348);
    h[38] = b'r';
    let dims = if nt > 1 {
        [4i16, ni as i16, nj as i16, nk as i16, nt as i16, 1, 1, 1]
    } else {
        [3i16, ni as i16, nj as i16, nk as i16, 1, 1, 1, 1]
    };
    for (i, d) in dims.iter().enumerate() {
        put_i16(&mut h, 40 + 2 * i, *d);
    }
    put_i16(&mut h, 70, stored.code());
    put_i16(&mut h, 72, stored.bits());
    let (quat, qfac, spacing) = to_quaternion(affine);
    let pixdim = [
        qfac, spacing[0], spacing[1], spacing[2], seconds, 1.0, 1.0, 1.0,
    ];
    for (i, p) in pixdim.iter().enumerate() {
        put_f32(&mut h, 76 + 4 * i, *p);
    }
    put_f32(&mut h, 108, 352.0);
    put_f32(&mut h, 112, 1.0);
    put_f32(&mut h, 116, 0.0);
    h[123] = 2 | 8; // mm, seconds
    put_i16(&mut h, 252, 1);
    put_i16(&mut h, 254, 1);
    for (i, q) in quat.iter().enumerate() {
        put_f32(&mut h, 256 + 4 * i, *q);
    }
    for (i, row) in affine.iter().take(3).enumerate() {
        put_f32(&mut h, 268 + 4 * i, row[3]);
    }
    for (r, row) in affine.iter().take(3).enumerate() {
        for (c, v) in row.iter().enumerate() {
            put_f32(&mut h, 280 + 16 * r + 4 * c, *v);
        }
    }
    h[344..348].copy_from_slice(b"n+1\0");
    // 348..352: extension flag 0 (no extensions).
    h
}

/// Round half away from zero (as `f32::round`) after clamping to `lo..=hi`, without a libm
/// call and without branches (so the loop runs on vector lanes). Exact for the 8- and 16-bit
/// types' ranges, where `v - trunc(v)` is exact in `f32`; NaN gives 0, as a cast does.
#[inline(always)]
fn round_clamped(v: f32, lo: f32, hi: f32) -> i32 {
    let v = v.clamp(lo, hi);
    let t = v as i32;
    let frac = v - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

/// Voxels of `stored`'s width, converted from a single-channel volume's memory order (which
/// is NIfTI's order) in parallel parts.
fn push_voxels_single_channel(out: &mut Vec<u8>, voxels: &[f32], stored: StoredType) {
    use rayon::prelude::*;
    let width = (stored.bits() as usize / 8).max(1);
    let base = out.len();
    out.resize(base + voxels.len() * width, 0);
    const PART: usize = 1 << 16;
    out[base..]
        .par_chunks_mut(PART * width)
        .zip(voxels.par_chunks(PART))
        .for_each(|(dst, src)| {
            macro_rules! put {
                ($t:ty, $lo:expr, $hi:expr) => {
                    for (d, v) in dst.chunks_exact_mut(width).zip(src) {
                        d.copy_from_slice(&(round_clamped(*v, $lo, $hi) as $t).to_le_bytes());
                    }
                };
            }
            match stored {
                StoredType::U8 | StoredType::Rgb24 => put!(u8, 0.0, 255.0),
                StoredType::I8 => put!(i8, -128.0, 127.0),
                StoredType::I16 => put!(i16, -32768.0, 32767.0),
                StoredType::U16 => put!(u16, 0.0, 65535.0),
                StoredType::I32 => {
                    for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                        let r = clamp_round(*v, f64::from(i32::MIN), f64::from(i32::MAX));
                        d.copy_from_slice(&(r as i32).to_le_bytes());
                    }
                }
                StoredType::U32 => {
                    for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                        let r = clamp_round(*v, 0.0, f64::from(u32::MAX));
                        d.copy_from_slice(&(r as u32).to_le_bytes());
                    }
                }
                StoredType::F32 => {
                    for (d, v) in dst.chunks_exact_mut(4).zip(src) {
                        d.copy_from_slice(&v.to_le_bytes());
                    }
                }
                StoredType::F64 => {
                    for (d, v) in dst.chunks_exact_mut(8).zip(src) {
                        d.copy_from_slice(&f64::from(*v).to_le_bytes());
                    }
                }
            }
        });
}

fn push_voxels(out: &mut Vec<u8>, volume: &Volume, stored: StoredType) {
    let (ni, nj, nk) = volume.shape();
    let channels = volume.channels();
    // A single channel stored in Fortran order is already in NIfTI's order.
    if let Some(voxels) = single_channel_voxels(volume, stored) {
        push_voxels_single_channel(out, voxels, stored);
        return;
    }
    for k in 0..nk {
        for j in 0..nj {
            for i in 0..ni {
                for c in 0..channels {
                    let v = volume.data[[i, j, k, c]];
                    match stored {
                        StoredType::U8 | StoredType::Rgb24 => {
                            out.push(clamp_round(v, 0.0, 255.0) as u8)
                        }
                        StoredType::I8 => out.push((clamp_round(v, -128.0, 127.0) as i8) as u8),
                        StoredType::I16 => out.extend_from_slice(
                            &(clamp_round(v, -32768.0, 32767.0) as i16).to_le_bytes(),
                        ),
                        StoredType::U16 => out.extend_from_slice(
                            &(clamp_round(v, 0.0, 65535.0) as u16).to_le_bytes(),
                        ),
                        StoredType::I32 => out.extend_from_slice(
                            &(clamp_round(v, f64::from(i32::MIN), f64::from(i32::MAX)) as i32)
                                .to_le_bytes(),
                        ),
                        StoredType::U32 => out.extend_from_slice(
                            &(clamp_round(v, 0.0, f64::from(u32::MAX)) as u32).to_le_bytes(),
                        ),
                        StoredType::F32 => out.extend_from_slice(&v.to_le_bytes()),
                        StoredType::F64 => out.extend_from_slice(&f64::from(v).to_le_bytes()),
                    }
                }
            }
        }
    }
}

/// Gzip bytes with no file name and no modification time in the gzip header, on every core
/// ([`crate::gz`]).
pub fn gzip(bytes: &[u8], level: u32) -> io::Result<Vec<u8>> {
    crate::gz::gzip(bytes, level)
}

/// Encode as `.nii.gz`.
pub fn encode_gz(volume: &Volume) -> io::Result<Vec<u8>> {
    gzip(&encode(volume), 6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(stored: StoredType, channels: usize) -> Volume {
        let mut data = Array4::<f32>::zeros((5, 4, 3, channels));
        for ((i, j, k, c), v) in data.indexed_iter_mut() {
            *v = match stored {
                StoredType::I8 | StoredType::I16 | StoredType::I32 => {
                    (i as f32) * 10.0 - (j as f32) * 7.0 + (k as f32) - c as f32
                }
                StoredType::F32 | StoredType::F64 => i as f32 * 0.25 - j as f32 + k as f32 * 1.5,
                _ => (i + 2 * j + 3 * k + c) as f32,
            };
        }
        let (s, co) = (0.2f64.sin(), 0.2f64.cos());
        Volume {
            data,
            affine: [
                [-0.8 * co, 0.0, 2.0 * s, 12.0],
                [0.0, 0.9, 0.0, -30.0],
                [0.8 * s, 0.0, 2.0 * co, 7.5],
                [0.0, 0.0, 0.0, 1.0],
            ],
            stored,
        }
    }

    #[test]
    fn every_datatype_round_trips_through_our_writer_and_reader() {
        for (stored, ch) in [
            (StoredType::U8, 1),
            (StoredType::I8, 1),
            (StoredType::I16, 1),
            (StoredType::U16, 1),
            (StoredType::I32, 1),
            (StoredType::U32, 1),
            (StoredType::F32, 1),
            (StoredType::F64, 1),
            (StoredType::Rgb24, 3),
        ] {
            let v = volume(stored, ch);
            let bytes = encode(&v);
            let h = parse_header(&bytes).expect("header");
            assert_eq!(h.flavour, Flavour::Nifti1);
            assert_eq!(h.datatype, stored);
            let back = decode(&h, &bytes[352..]).expect("decode");
            assert_eq!(back.data, v.data, "{stored:?}");
            for (a, b) in back.affine.iter().flatten().zip(v.affine.iter().flatten()) {
                assert!((a - b).abs() < 1e-4, "{stored:?} affine");
            }
        }
    }

    #[test]
    fn big_endian_nifti2_and_analyze_headers_parse() {
        // NIfTI-2, big endian, int16, 2x2x1 with slope 2 and intercept -1.
        let mut h = vec![0u8; 544];
        h[0..4].copy_from_slice(&540i32.to_be_bytes());
        h[4..12].copy_from_slice(b"n+2\0\r\n\x1a\n");
        h[12..14].copy_from_slice(&4i16.to_be_bytes());
        h[14..16].copy_from_slice(&16i16.to_be_bytes());
        for (i, d) in [3i64, 2, 2, 1, 1, 1, 1, 1].iter().enumerate() {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&d.to_be_bytes());
        }
        for (i, p) in [1.0f64, 0.5, 0.5, 3.0].iter().enumerate() {
            h[104 + 8 * i..112 + 8 * i].copy_from_slice(&p.to_be_bytes());
        }
        h[168..176].copy_from_slice(&544i64.to_be_bytes());
        h[176..184].copy_from_slice(&2.0f64.to_be_bytes());
        h[184..192].copy_from_slice(&(-1.0f64).to_be_bytes());
        for v in [1i16, 2, 3, 4] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        let hd = parse_header(&h).expect("nifti-2");
        assert_eq!((hd.flavour, hd.big_endian), (Flavour::Nifti2, true));
        let vol = decode(&hd, &h[544..]).expect("data");
        assert_eq!(
            vol.data.iter().copied().collect::<Vec<_>>(),
            vec![1.0, 5.0, 3.0, 7.0]
        );
        assert_eq!(
            vol.spacing().map(|s| (s * 10.0).round() / 10.0),
            [0.5, 0.5, 3.0]
        );
        // Analyze 7.5, little endian, uint8, without magic.
        let mut a = vec![0u8; 348];
        a[0..4].copy_from_slice(&348i32.to_le_bytes());
        for (i, d) in [3i16, 2, 1, 1].iter().enumerate() {
            a[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
        }
        a[70..72].copy_from_slice(&2i16.to_le_bytes());
        a[72..74].copy_from_slice(&8i16.to_le_bytes());
        a[80..84].copy_from_slice(&1.5f32.to_le_bytes());
        let ha = parse_header(&a).expect("analyze");
        assert_eq!(ha.flavour, Flavour::Analyze);
        let va = decode(&ha, &[9, 10]).expect("data");
        assert_eq!(va.data.iter().copied().collect::<Vec<_>>(), vec![9.0, 10.0]);
        assert_eq!(va.spacing()[0], 1.5);
        assert!(matches!(
            parse_header(&[0u8; 400]),
            Err(NiftiError::NotNifti)
        ));
        assert!(matches!(
            decode(&ha, &[1]),
            Err(NiftiError::Truncated { .. })
        ));
    }

    #[test]
    fn our_files_read_back_with_the_nifti_crate() {
        use ::nifti::{NiftiObject, ReaderOptions};
        let v = volume(StoredType::I16, 1);
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("v.nii.gz");
        std::fs::write(&p, encode_gz(&v).expect("gz")).expect("write");
        let obj = ReaderOptions::new()
            .read_file(&p)
            .expect("nifti crate reads our file");
        let h = obj.header();
        assert_eq!(h.dim[1..4], [5, 4, 3]);
        assert_eq!(h.sform_code, 1);
        assert!((h.srow_x[3] - 12.0).abs() < 1e-4);
        let gz = std::fs::read(&p).expect("read");
        assert_eq!(gz[3] & 0x08, 0, "no file name in the gzip header");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "no timestamp in the gzip header");
    }
}
