//! Durable files: how the node writes anything that must survive a kill or a power cut.
//! A file is written to a temporary name in its destination folder, flushed, renamed over its
//! name, and its folder flushed (and the parents of folders the write created); a batch of
//! files becomes durable together. Leftover temporaries of a killed run are swept.

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Prefix of the node's temporary files; leftovers of a killed run are swept on start.
pub const TEMP_PREFIX: &str = ".fc-tmp-";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of content, hex: the only way logs and the catalog refer to an input.
pub fn content_hash(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn temp_path(dest: &Path) -> PathBuf {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    dir.join(format!("{TEMP_PREFIX}{}-{n}-{name}", std::process::id()))
}

/// Write `bytes` to `path` atomically and durably on its own: temporary file in the same
/// folder, flush, rename, flush the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut batch = DurableBatch::default();
    batch.stage(path, bytes)?;
    batch.commit()
}

/// Write a file atomically and durably as [`write_atomically`] does, its content produced by
/// `fill` into the temporary file (for content too large to hold in memory at once).
pub fn write_atomically_with(
    path: &Path,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut batch = DurableBatch::default();
    batch.created_in.extend(create_folders(dir)?);
    let tmp = temp_path(path);
    let mut f = fs::File::create(&tmp)?;
    if let Err(e) = fill(&mut f) {
        drop(f);
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    drop(f);
    batch.staged.push(Staged {
        tmp,
        dest: path.to_owned(),
        content: None,
    });
    batch.commit()
}

/// Files staged to become durable together.
#[derive(Debug, Default)]
pub struct DurableBatch {
    staged: Vec<Staged>,
    /// Folders holding the entry of a folder this batch created: flushed too, or the new
    /// folder (and every file in it) can vanish with a power cut.
    created_in: BTreeSet<PathBuf>,
}

/// The power-loss harness's calibration switch (`node/tests/powerloss.rs`): with
/// `FEDCURATE_TEST_SKIP_FLUSH=1` in the environment, durable batches skip every flush, and
/// the harness must then find lost outputs. Never set it on a node.
pub fn flushes_skipped() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("FEDCURATE_TEST_SKIP_FLUSH").is_some_and(|v| v == "1"))
}

/// One staged file: its temporary name, its final name, and (when staged as owned bytes) the
/// content still to be written at commit.
#[derive(Debug)]
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    content: Option<Vec<u8>>,
}

/// Threads writing and flushing a batch's files at commit: flushes mostly wait on the device,
/// and concurrent flushes share the file system's journal commits.
const IO_THREADS: usize = 8;

/// Create `dir` and its missing ancestors; returns the folders whose entries changed.
fn create_folders(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.exists() {
            break;
        }
        missing.push(d.to_owned());
        cur = d.parent();
    }
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    fs::create_dir_all(dir)?;
    // A relative folder's parent can be empty: that is the current folder.
    Ok(missing
        .iter()
        .filter_map(|d| d.parent())
        .map(|p| {
            if p.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                p.to_owned()
            }
        })
        .collect())
}

impl DurableBatch {
    /// Write `bytes` to a temporary file next to `dest` (not yet flushed or visible).
    pub fn stage(&mut self, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        self.created_in.extend(create_folders(dir)?);
        let tmp = temp_path(dest);
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        self.staged.push(Staged {
            tmp,
            dest: dest.to_owned(),
            content: None,
        });
        Ok(())
    }

    /// Stage `bytes` for `dest`, written at [`commit`](Self::commit) together with the
    /// batch's other files, on several threads (the folders are created now).
    pub fn stage_owned(&mut self, dest: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        self.created_in.extend(create_folders(dir)?);
        self.staged.push(Staged {
            tmp: temp_path(dest),
            dest: dest.to_owned(),
            content: Some(bytes),
        });
        Ok(())
    }

    /// The content staged for `dest` in this batch, if any (read back from its temporary
    /// file, or the bytes still to be written).
    pub fn staged_content(&self, dest: &Path) -> Option<io::Result<Vec<u8>>> {
        let s = self.staged.iter().rev().find(|s| s.dest == dest)?;
        Some(match &s.content {
            Some(b) => Ok(b.clone()),
            None => fs::read(&s.tmp),
        })
    }

    /// Copy `src` to a temporary file next to `dest` (streamed).
    pub fn stage_copy(&mut self, dest: &Path, src: &Path) -> io::Result<()> {
        let dir = dest.parent().unwrap_or(Path::new("."));
        self.created_in.extend(create_folders(dir)?);
        let tmp = temp_path(dest);
        fs::copy(src, &tmp)?;
        self.staged.push(Staged {
            tmp,
            dest: dest.to_owned(),
            content: None,
        });
        Ok(())
    }

    /// Write `head` then the bytes `start..end` of `src` to a temporary file next to `dest`,
    /// those from `start + unmapped` on passed through `map` in parts of 1 MiB (even lengths
    /// but the last) before they are written.
    #[allow(clippy::too_many_arguments)]
    pub fn stage_parts(
        &mut self,
        dest: &Path,
        head: &[u8],
        src: &Path,
        start: u64,
        end: u64,
        unmapped: u64,
        map: &dyn Fn(&mut [u8]),
    ) -> io::Result<()> {
        use std::io::{Read, Seek};
        let dir = dest.parent().unwrap_or(Path::new("."));
        self.created_in.extend(create_folders(dir)?);
        let tmp = temp_path(dest);
        let mut out = io::BufWriter::new(fs::File::create(&tmp)?);
        out.write_all(head)?;
        let mut input = fs::File::open(src)?;
        input.seek(io::SeekFrom::Start(start))?;
        let unmapped = unmapped.min(end.saturating_sub(start));
        io::copy(&mut (&mut input).take(unmapped), &mut out)?;
        let mut remaining = end.saturating_sub(start + unmapped);
        let mut buf = vec![0u8; 1 << 20];
        while remaining > 0 {
            let n = (remaining as usize).min(buf.len());
            input.read_exact(&mut buf[..n])?;
            map(&mut buf[..n]);
            out.write_all(&buf[..n])?;
            remaining -= n as u64;
        }
        out.flush()?;
        self.staged.push(Staged {
            tmp,
            dest: dest.to_owned(),
            content: None,
        });
        Ok(())
    }

    /// Number of staged files.
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Write what is still to be written and flush every staged file (on several threads),
    /// rename each into place, then flush their folders.
    pub fn commit(&mut self) -> io::Result<()> {
        let flush = !flushes_skipped();
        write_and_flush(&mut self.staged, flush)?;
        let mut dirs = std::mem::take(&mut self.created_in);
        for s in self.staged.drain(..) {
            fs::rename(&s.tmp, &s.dest)?;
            if let Some(d) = s.dest.parent() {
                dirs.insert(if d.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    d.to_owned()
                });
            }
        }
        // Deepest first: a new folder's own entries before the entry naming it.
        for d in dirs.iter().rev() {
            if flush {
                fs::File::open(d)?.sync_all()?;
            }
        }
        Ok(())
    }
}

/// Write each staged file's pending content to its temporary name and flush it, spread over
/// up to [`IO_THREADS`] threads; the first error wins.
fn write_and_flush(staged: &mut [Staged], flush: bool) -> io::Result<()> {
    let one = |s: &mut Staged| -> io::Result<()> {
        match s.content.take() {
            Some(bytes) => {
                let mut f = fs::File::create(&s.tmp)?;
                f.write_all(&bytes)?;
                if flush {
                    f.sync_all()?;
                }
            }
            None if flush => fs::OpenOptions::new()
                .write(true)
                .open(&s.tmp)?
                .sync_all()?,
            None => {}
        }
        Ok(())
    };
    let threads = IO_THREADS.min(staged.len());
    if threads <= 1 {
        return staged.iter_mut().try_for_each(one);
    }
    let per = staged.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = staged
            .chunks_mut(per)
            .map(|part| scope.spawn(move || part.iter_mut().try_for_each(one)))
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(io::Error::other("a file-writing thread panicked")))
        })
    })
}

/// Remove temporary files a killed run left under `root`.
pub fn sweep_temporaries(root: &Path) -> io::Result<usize> {
    let mut n = 0;
    if !root.exists() {
        return Ok(0);
    }
    for entry in walkdir::WalkDir::new(root).into_iter().flatten() {
        if entry.file_type().is_file()
            && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
        {
            fs::remove_file(entry.path())?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(unix)]
pub fn restrict(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
pub fn restrict(_path: &Path, _mode: u32) -> io::Result<()> {
    Ok(())
}

/// A folder that could not be listed (the walk's error, without the path it was at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    pub kind: Option<io::ErrorKind>,
    /// How deep under the root the walk was.
    pub depth: usize,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            Some(k) => write!(f, "cannot list the folder ({k}) at depth {}", self.depth),
            None => write!(f, "cannot list the folder at depth {}", self.depth),
        }
    }
}

impl std::error::Error for ListError {}

/// All regular files under `root`, in a stable order, skipping the node's temporaries.
pub fn list_files(root: &Path) -> Result<Vec<PathBuf>, ListError> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(root).sort_by_file_name() {
        let entry = entry.map_err(|e| ListError {
            kind: e.io_error().map(io::Error::kind),
            depth: e.depth(),
        })?;
        if entry.file_type().is_file()
            && !entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX)
        {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}
