//! NIfTI and Analyze inputs of any dimension and datatype are de-identified, not refused:
//! numbers and voxels kept, every text field, Analyze's history and every extension gone.

use std::io::Read;
use std::path::Path;

use node::deid::DeidPolicy;
use node::deid::keys::{Keys, Secret};
use node::volume::deid::{SubjectRule, deidentify};

const MARK: &[u8] = b"QXLEAK";

fn put(h: &mut [u8], at: usize, bytes: &[u8]) {
    h[at..at + bytes.len()].copy_from_slice(bytes);
}

/// A NIfTI-1 header (348 bytes) in either byte order.
fn nifti1(big_endian: bool, dims: &[i16], code: i16, bitpix: i16, magic: &[u8; 4]) -> Vec<u8> {
    let mut h = vec![0u8; 348];
    let i16b = |v: i16| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let i32b = |v: i32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let f32b = |v: f32| {
        if big_endian {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    put(&mut h, 0, &i32b(348));
    put(&mut h, 40, &i16b(dims.len() as i16));
    for (i, d) in dims.iter().enumerate() {
        put(&mut h, 42 + 2 * i, &i16b(*d));
    }
    put(&mut h, 70, &i16b(code));
    put(&mut h, 72, &i16b(bitpix));
    for i in 0..8 {
        put(&mut h, 76 + 4 * i, &f32b(if i == 0 { 1.0 } else { 2.0 }));
    }
    put(&mut h, 108, &f32b(352.0));
    put(&mut h, 112, &f32b(1.0));
    // Text fields with an identifying mark: db_name, descrip, aux_file, intent_name.
    put(&mut h, 14, MARK);
    put(&mut h, 148, MARK);
    put(&mut h, 228, MARK);
    put(&mut h, 328, MARK);
    put(&mut h, 344, magic);
    h
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("gzip");
    out
}

fn deid(path: &Path, rel: &str) -> Vec<u8> {
    let keys = Keys::derive(&Secret::from_bytes(vec![4; 32]).expect("secret"));
    let out = deidentify(
        path,
        Path::new(rel),
        &keys,
        &DeidPolicy::default(),
        &SubjectRule::default(),
    )
    .unwrap_or_else(|e| panic!("{rel} refused: {e:?}"));
    gunzip(&out.image)
}

fn has_mark(bytes: &[u8]) -> bool {
    bytes.windows(MARK.len()).any(|w| w == MARK)
}

#[test]
fn four_and_five_dimensional_inputs_keep_their_numbers_and_voxels() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 4D fMRI-like, big endian int16, 4x3x2 voxels x 5 time points, with an extension.
    let voxels: Vec<u8> = (0..4 * 3 * 2 * 5 * 2)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let mut f = nifti1(true, &[4, 3, 2, 5], 4, 16, b"n+1\0");
    put(&mut f, 108, &368f32.to_be_bytes());
    f.extend_from_slice(&[1, 0, 0, 0]);
    // One extension: esize 16 (big endian), ecode 4 (AFNI), 8 bytes of content.
    f.extend_from_slice(&16i32.to_be_bytes());
    f.extend_from_slice(&4i32.to_be_bytes());
    f.extend_from_slice(MARK);
    f.extend_from_slice(&[0, 0]);
    assert_eq!(f.len(), 368);
    f.extend_from_slice(&voxels);
    let p = dir.path().join("bold.nii");
    std::fs::write(&p, &f).expect("write");
    let out = deid(&p, "bold.nii");
    assert!(!has_mark(&out), "text or extension survives");
    assert_eq!(&out[0..4], &348i32.to_be_bytes(), "same byte order");
    assert_eq!(&out[344..348], b"n+1\0");
    assert_eq!(&out[348..352], &[0, 0, 0, 0], "no extension");
    assert_eq!(&out[40..50], &f[40..50], "dimensions kept");
    assert_eq!(&out[352..], &voxels[..], "voxels copied byte for byte");
    // The nifti crate (a third-party reader) reads the 4D output.
    let obj = ::nifti::ReaderOptions::new()
        .read_file({
            let q = dir.path().join("out.nii");
            std::fs::write(&q, &out).expect("write");
            q
        })
        .expect("the nifti crate reads the output");
    use ::nifti::NiftiObject;
    assert_eq!(&obj.header().dim[..5], &[4, 4, 3, 2, 5]);

    // 5D (CIFTI-like), NIfTI-2 little endian float32: dims [1,1,1,1,2,3].
    let mut h = vec![0u8; 540];
    put(&mut h, 0, &540i32.to_le_bytes());
    put(&mut h, 4, b"n+2\0\r\n\x1a\n");
    put(&mut h, 12, &16i16.to_le_bytes());
    put(&mut h, 14, &32i16.to_le_bytes());
    for (i, d) in [6i64, 1, 1, 1, 1, 2, 3].iter().enumerate() {
        put(&mut h, 16 + 8 * i, &d.to_le_bytes());
    }
    put(&mut h, 168, &544i64.to_le_bytes());
    put(&mut h, 240, MARK);
    put(&mut h, 508, MARK);
    h.extend_from_slice(&[0, 0, 0, 0]);
    let data: Vec<u8> = (0..6)
        .flat_map(|i| (i as f32 * 1.5).to_le_bytes())
        .collect();
    h.extend_from_slice(&data);
    let p = dir.path().join("dense.nii");
    std::fs::write(&p, &h).expect("write");
    let out = deid(&p, "dense.nii");
    assert!(!has_mark(&out));
    assert_eq!(&out[16..72], &h[16..72], "dimensions kept");
    assert_eq!(&out[544..], &data[..]);

    // A 3D complex64 volume (a datatype the volume reader does not decode).
    let mut c = nifti1(false, &[2, 2, 1], 32, 64, b"n+1\0");
    c.extend_from_slice(&[0, 0, 0, 0]);
    let cdata: Vec<u8> = (0..2 * 2 * 8).map(|i| i as u8).collect();
    c.extend_from_slice(&cdata);
    let p = dir.path().join("phase.nii");
    std::fs::write(&p, &c).expect("write");
    let out = deid(&p, "phase.nii");
    assert!(!has_mark(&out));
    assert_eq!(&out[352..], &cdata[..]);
}

#[test]
fn analyze_history_goes_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A 4D Analyze 7.5 pair: no magic; the data history holds a patient id and dates.
    let mut h = nifti1(false, &[2, 2, 2, 3], 2, 8, b"\0\0\0\0");
    put(&mut h, 108, &0f32.to_le_bytes());
    put(&mut h, 283, b"QXLEAK-PID");
    put(&mut h, 293, b"20200101");
    let data: Vec<u8> = (0..24).collect();
    std::fs::write(dir.path().join("scan.hdr"), &h).expect("hdr");
    std::fs::write(dir.path().join("scan.img"), &data).expect("img");
    let out = deid(&dir.path().join("scan.hdr"), "scan.hdr");
    assert!(!has_mark(&out));
    assert!(!out.windows(8).any(|w| w == b"20200101"), "a date survives");
    assert_eq!(&out[344..348], b"n+1\0", "now single-file NIfTI-1");
    assert_eq!(&out[352..], &data[..]);
}
