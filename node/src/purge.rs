//! `fedcurate-node purge`: removes what the retention policy says has been kept long enough —
//! quarantined originals, temporary files of interrupted transfers, and (optionally)
//! de-identified outputs — and records what it removed in the audit chain. Catalog records
//! stay: they say what happened to every input, which is what hospital IT must be able to
//! answer later.

use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::batch::TEMP_PREFIX;
use crate::config::NodeConfig;

/// What a purge removed (or would remove, when dry).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Purged {
    pub quarantined: usize,
    pub temporaries: usize,
    pub outputs: usize,
    pub bytes: u64,
}

fn old_files(
    dir: &Path,
    days: u32,
    keep: impl Fn(&Path) -> bool,
) -> Vec<(std::path::PathBuf, u64)> {
    if days == 0 || !dir.exists() {
        return Vec::new();
    }
    let cutoff = SystemTime::now() - Duration::from_secs(u64::from(days) * 86_400);
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && keep(e.path()))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            (m.modified().ok()? < cutoff).then(|| (e.into_path(), m.len()))
        })
        .collect()
}

/// Remove what the retention policy allows (`dry`: only count it). `outputs` is the
/// de-identified output folder.
pub fn purge(config: &NodeConfig, outputs: &Path, dry: bool) -> std::io::Result<Purged> {
    let r = &config.retention;
    let d = &config.data_dir;
    let is_temp = |p: &Path| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(TEMP_PREFIX))
    };
    let q = old_files(&d.join("quarantine"), r.quarantine_days, |_| true);
    let mut t = old_files(&d.join("inbox"), r.temporary_days, is_temp);
    t.extend(old_files(
        &d.join("inbox-processing"),
        r.temporary_days,
        is_temp,
    ));
    let o = old_files(outputs, r.outputs_days, |p| !is_temp(p));
    let out = Purged {
        quarantined: q.len(),
        temporaries: t.len(),
        outputs: o.len(),
        bytes: q.iter().chain(&t).chain(&o).map(|(_, n)| n).sum(),
    };
    if !dry {
        for (p, _) in q.iter().chain(&t).chain(&o) {
            match std::fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(p: &Path, days: u64) {
        let t = SystemTime::now() - Duration::from_secs(days * 86_400);
        let f = std::fs::File::options().write(true).open(p).expect("open");
        f.set_modified(t).expect("mtime");
    }

    #[test]
    fn only_what_is_past_retention_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = format!(
            "data_dir = {:?}\n[retention]\nquarantine_days = 30\ntemporary_days = 1\noutputs_days = 0\n",
            dir.path().join("data")
        );
        let config = NodeConfig::parse(&text, Path::new("node.toml")).expect("config");
        let d = &config.data_dir;
        for sub in ["quarantine", "inbox", "out"] {
            std::fs::create_dir_all(d.join(sub)).expect("dir");
        }
        let files = [
            ("quarantine/old", 40),
            ("quarantine/new", 5),
            ("inbox/.fc-tmp-old", 3),
            ("inbox/received.dcm", 30),
            ("out/old.dcm", 400),
        ];
        for (f, days) in files {
            std::fs::write(d.join(f), b"x").expect("write");
            age(&d.join(f), days);
        }
        let dry = purge(&config, &d.join("out"), true).expect("dry");
        assert_eq!((dry.quarantined, dry.temporaries, dry.outputs), (1, 1, 0));
        assert!(
            d.join("quarantine/old").exists(),
            "a dry run removes nothing"
        );
        purge(&config, &d.join("out"), false).expect("purge");
        assert!(!d.join("quarantine/old").exists());
        assert!(d.join("quarantine/new").exists());
        assert!(!d.join("inbox/.fc-tmp-old").exists());
        assert!(
            d.join("inbox/received.dcm").exists(),
            "received data waits to be processed"
        );
        assert!(
            d.join("out/old.dcm").exists(),
            "outputs are kept unless configured"
        );
    }
}
