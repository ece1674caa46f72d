//! Gzip on every core: the input is cut into fixed parts, each part is deflated on its own
//! (ending on a byte boundary with an empty stored block, as pigz does), and the parts are
//! joined into one gzip member whose CRC-32 is combined from the parts'. Any gzip reader
//! reads the result as one stream. The cut does not depend on the number of threads, so the
//! same bytes and level always give the same file.

use std::io;

use flate2::{Compress, Compression, FlushCompress, Status};
use rayon::prelude::*;

/// Bytes deflated as one independent part. Large enough that restarting the window costs
/// well under 1 % of the ratio, small enough to keep two cores busy on a single slice stack.
pub const PART: usize = 1 << 20;

/// How a volume is written: `.nii` as it is, or `.nii.gz` at a fast or the default level.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NiftiCompression {
    /// `.nii`: no compression (what training code reads fastest; the largest files).
    None,
    /// `.nii.gz` at deflate level 1.
    Fast,
    /// `.nii.gz` at deflate level 6 (gzip's and dcm2niix's default).
    #[default]
    Default,
}

impl NiftiCompression {
    /// The deflate level, or `None` for no compression.
    pub fn level(self) -> Option<u32> {
        match self {
            NiftiCompression::None => None,
            NiftiCompression::Fast => Some(1),
            NiftiCompression::Default => Some(6),
        }
    }

    /// The file name suffix this choice writes.
    pub fn suffix(self) -> &'static str {
        match self {
            NiftiCompression::None => ".nii",
            _ => ".nii.gz",
        }
    }

    /// Parse the command-line and configuration spelling.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "none" => Some(NiftiCompression::None),
            "fast" => Some(NiftiCompression::Fast),
            "default" => Some(NiftiCompression::Default),
            _ => None,
        }
    }

    /// Encode NIfTI bytes as this choice asks: as they are, or gzipped.
    pub fn apply(self, nii: Vec<u8>) -> io::Result<Vec<u8>> {
        match self.level() {
            None => Ok(nii),
            Some(level) => gzip(&nii, level),
        }
    }
}

/// Deflate one part: raw deflate, ended by a sync flush (not final) or, for the last part,
/// by the final block.
fn deflate_part(part: &[u8], level: u32, last: bool) -> io::Result<Vec<u8>> {
    let mut c = Compress::new(Compression::new(level), false);
    let mut out = Vec::with_capacity(part.len() / 2 + 64);
    let flush = if last {
        FlushCompress::Finish
    } else {
        FlushCompress::Sync
    };
    loop {
        let consumed = usize::try_from(c.total_in()).map_err(io::Error::other)?;
        let rest = part.get(consumed..).unwrap_or_default();
        let status = c
            .compress_vec(rest, &mut out, flush)
            .map_err(io::Error::other)?;
        let done = match status {
            Status::StreamEnd => true,
            // A sync flush is complete once all input is taken and the output had room left.
            Status::Ok | Status::BufError => {
                !last && c.total_in() as usize == part.len() && out.len() < out.capacity()
            }
        };
        if done {
            return Ok(out);
        }
        out.reserve(out.capacity().max(64 * 1024));
    }
}

/// The gzip header this module writes: no file name, modification time 0.
fn header(level: u32) -> [u8; 10] {
    let xfl = match level {
        9 => 2,
        0 | 1 => 4,
        _ => 0,
    };
    [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 255]
}

/// Deflate parts in parallel with their CRCs.
fn deflate_parts(
    parts: Vec<&[u8]>,
    level: u32,
    last: Option<usize>,
) -> io::Result<Vec<(Vec<u8>, crc32fast::Hasher)>> {
    parts
        .into_par_iter()
        .enumerate()
        .map(|(i, part)| {
            let mut crc = crc32fast::Hasher::new();
            crc.update(part);
            Ok((deflate_part(part, level, Some(i) == last)?, crc))
        })
        .collect()
}

/// A gzip stream written as it is fed: whole [`PART`]s are deflated in parallel groups as
/// they fill, the rest at [`finish`](Self::finish). The bytes equal [`gzip`]'s for the same
/// input, however it was fed, and at most a group of parts is held.
#[derive(Debug)]
pub struct GzWriter<W: io::Write> {
    out: W,
    level: u32,
    pending: Vec<u8>,
    crc: crc32fast::Hasher,
    total: u64,
    group: usize,
}

impl<W: io::Write> GzWriter<W> {
    pub fn new(mut out: W, level: u32) -> io::Result<Self> {
        let level = level.min(9);
        out.write_all(&header(level))?;
        let group = rayon::current_num_threads().max(1) * 2;
        Ok(GzWriter {
            out,
            level,
            pending: Vec::with_capacity(group * PART + PART),
            crc: crc32fast::Hasher::new(),
            total: 0,
            group,
        })
    }

    /// Deflate and write every whole part held, keeping at least one byte back (the last
    /// part is only known at the end).
    fn drain(&mut self) -> io::Result<()> {
        let whole = (self.pending.len().saturating_sub(1) / PART) * PART;
        if whole == 0 {
            return Ok(());
        }
        let done = deflate_parts(
            self.pending[..whole].chunks(PART).collect(),
            self.level,
            None,
        )?;
        for (deflated, crc) in done {
            self.out.write_all(&deflated)?;
            self.crc.combine(&crc);
        }
        self.pending.drain(..whole);
        Ok(())
    }

    /// End the stream: the last part, the CRC and the size. Returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        let rest = std::mem::take(&mut self.pending);
        let parts: Vec<&[u8]> = if rest.is_empty() {
            vec![&rest[..]]
        } else {
            rest.chunks(PART).collect()
        };
        let last = parts.len() - 1;
        for (deflated, crc) in deflate_parts(parts, self.level, Some(last))? {
            self.out.write_all(&deflated)?;
            self.crc.combine(&crc);
        }
        self.out
            .write_all(&self.crc.clone().finalize().to_le_bytes())?;
        self.out.write_all(&(self.total as u32).to_le_bytes())?;
        Ok(self.out)
    }
}

impl<W: io::Write> io::Write for GzWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.total += buf.len() as u64;
        if self.pending.len() > self.group * PART {
            self.drain()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Gzip `bytes` at `level` (0–9): no file name, modification time 0, deterministic.
pub fn gzip(bytes: &[u8], level: u32) -> io::Result<Vec<u8>> {
    let level = level.min(9);
    let parts: Vec<&[u8]> = if bytes.is_empty() {
        vec![bytes]
    } else {
        bytes.chunks(PART).collect()
    };
    let last = parts.len() - 1;
    let done = deflate_parts(parts, level, Some(last))?;
    let mut out = Vec::with_capacity(bytes.len() / 2 + 32);
    out.extend_from_slice(&header(level));
    let mut crc = crc32fast::Hasher::new();
    for (deflated, part_crc) in done {
        out.extend_from_slice(&deflated);
        crc.combine(&part_crc);
    }
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .expect("a valid gzip stream");
        out
    }

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a slowly varying signal with noise, as CT slices are.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((i / 512) as u8).wrapping_add((state % 7) as u8)
            })
            .collect()
    }

    #[test]
    fn parts_join_into_one_member_any_reader_reads() {
        for len in [0, 1, 1000, PART - 1, PART, PART + 1, 3 * PART + 12_345] {
            let data = sample(len);
            for level in [1, 6, 9] {
                let gz = gzip(&data, level).expect("gzip");
                assert_eq!(gunzip(&gz), data, "length {len}, level {level}");
                // One member: the trailer's size is the whole input.
                let isize = u32::from_le_bytes(gz[gz.len() - 4..].try_into().expect("4 bytes"));
                assert_eq!(isize as usize, len);
            }
        }
    }

    #[test]
    fn the_system_gzip_reads_it_and_checks_the_crc() {
        let data = sample(2 * PART + 777);
        let gz = gzip(&data, 6).expect("gzip");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.gz");
        std::fs::write(&path, &gz).expect("write");
        let out = std::process::Command::new("gzip")
            .arg("-t")
            .arg(&path)
            .output()
            .expect("gzip is part of every Debian system");
        assert!(
            out.status.success(),
            "gzip -t refused it: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A flipped byte in the trailer's CRC is caught by the same reader.
        let mut bad = gz.clone();
        let at = bad.len() - 8;
        bad[at] ^= 1;
        std::fs::write(&path, &bad).expect("write");
        let out = std::process::Command::new("gzip")
            .arg("-t")
            .arg(&path)
            .output()
            .expect("gzip");
        assert!(!out.status.success(), "a wrong CRC must be refused");
    }

    #[test]
    fn the_streaming_writer_writes_what_gzip_writes_however_it_is_fed() {
        use std::io::Write;
        for len in [0, 5, PART, 3 * PART, 9 * PART + 3] {
            let data = sample(len);
            let whole = gzip(&data, 6).expect("gzip");
            for feed in [7usize, 4096, PART - 1, PART + 17] {
                let mut w = GzWriter::new(Vec::new(), 6).expect("writer");
                for piece in data.chunks(feed.min(len.max(1))) {
                    w.write_all(piece).expect("write");
                }
                let streamed = w.finish().expect("finish");
                assert!(streamed == whole, "length {len}, fed {feed} at a time");
            }
        }
    }

    #[test]
    fn same_bytes_same_file_whatever_the_threads() {
        let data = sample(5 * PART / 2);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(|| gzip(&data, 6).expect("gzip"));
        let many = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .expect("pool")
            .install(|| gzip(&data, 6).expect("gzip"));
        assert_eq!(one, many);
    }

    #[test]
    fn fast_is_larger_than_default_and_none_is_the_input() {
        let data = sample(2 * PART);
        let fast = NiftiCompression::Fast.apply(data.clone()).expect("fast");
        let default = NiftiCompression::Default
            .apply(data.clone())
            .expect("default");
        assert!(
            default.len() <= fast.len(),
            "{} > {}",
            default.len(),
            fast.len()
        );
        assert!(fast.len() < data.len());
        assert_eq!(
            NiftiCompression::None.apply(data.clone()).expect("none"),
            data
        );
        assert_eq!(
            NiftiCompression::parse("fast"),
            Some(NiftiCompression::Fast)
        );
        assert_eq!(NiftiCompression::parse("zip"), None);
    }
}
