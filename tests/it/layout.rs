//! The workspace's layout rules (ARCHITECTURE.md, "Rules"), checked from the manifests and
//! the node's sources, so a change that breaks one fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A member's package name and its dependencies by kind.
struct Member {
    dir: PathBuf,
    normal: BTreeSet<String>,
    every: BTreeSet<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn members() -> BTreeMap<String, Member> {
    let root = root();
    let workspace: toml::Table = std::fs::read_to_string(root.join("Cargo.toml"))
        .expect("workspace manifest")
        .parse()
        .expect("workspace toml");
    let mut dirs: Vec<String> = workspace["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m.as_str().expect("member").to_owned())
        .collect();
    // The fuzz crate is outside the workspace (its own lockfile) but follows the rules.
    dirs.push("node/fuzz".into());
    let mut out = BTreeMap::new();
    for d in dirs {
        let dir = root.join(&d);
        let manifest: toml::Table = std::fs::read_to_string(dir.join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{d}/Cargo.toml: {e}"))
            .parse()
            .expect("member toml");
        let name = manifest["package"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        let keys = |section: &str| -> BTreeSet<String> {
            manifest
                .get(section)
                .and_then(|t| t.as_table())
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default()
        };
        let normal = keys("dependencies");
        let mut every = normal.clone();
        every.extend(keys("dev-dependencies"));
        every.extend(keys("build-dependencies"));
        out.insert(name, Member { dir, normal, every });
    }
    out
}

/// Members that exist to test, fuzz or benchmark: they may depend on anything.
const TOOLING: &[&str] = &["tests", "fc-fuzzing", "node-fuzz"];

/// The pure stages: no store, network, fixture or binary crate beneath them.
const PURE: &[&str] = &[
    "fc-read",
    "fc-deid",
    "fc-volume",
    "fc-harmonise",
    "fc-curate",
    "fc-annotate",
];

#[test]
fn the_floor_depends_on_no_other_member() {
    let m = members();
    let names: BTreeSet<&String> = m.keys().collect();
    let p = &m["protocol"];
    let inner: Vec<&String> = p.every.iter().filter(|d| names.contains(d)).collect();
    assert!(inner.is_empty(), "protocol depends on {inner:?}");
}

#[test]
fn pure_stages_reach_no_store_network_fixture_or_binary() {
    let m = members();
    let forbidden_members = [
        "fc-store",
        "fc-dimse",
        "fc-federation",
        "fc-training",
        "fc-fixtures",
        "fc-export",
        "node",
        "coordinator",
    ];
    // Third-party crates that would bring storage or networking into a stage.
    let forbidden_crates = [
        "rusqlite",
        "quinn",
        "rustls",
        "tokio",
        "tokio-rustls",
        "dicom-ul",
    ];
    // The transitive closure of each stage's normal dependencies among members.
    for stage in PURE {
        let mut seen = BTreeSet::new();
        let mut todo = vec![stage.to_string()];
        while let Some(c) = todo.pop() {
            let member = m.get(&c).unwrap_or_else(|| panic!("{c} is not a member"));
            for d in &member.normal {
                assert!(
                    !forbidden_crates.contains(&d.as_str()),
                    "{stage} reaches {d} through {c}"
                );
                if m.contains_key(d) && seen.insert(d.clone()) {
                    assert!(
                        !forbidden_members.contains(&d.as_str()),
                        "{stage} reaches {d} through {c}"
                    );
                    todo.push(d.clone());
                }
            }
        }
    }
}

#[test]
fn nothing_but_tooling_depends_on_the_binary_and_the_two_sides_share_only_protocol() {
    let m = members();
    let node_side: BTreeSet<&str> = m
        .iter()
        .filter(|(_, v)| v.dir.starts_with(root().join("node")))
        .map(|(k, _)| k.as_str())
        .collect();
    assert!(node_side.contains("node") && node_side.contains("fc-deid"));
    for (name, member) in &m {
        if !TOOLING.contains(&name.as_str()) {
            assert!(
                !member.every.contains("node"),
                "{name} depends on the binary's crate"
            );
        }
        if node_side.contains(name.as_str()) {
            assert!(
                !member.every.contains("coordinator"),
                "{name} depends on the coordinator"
            );
        }
    }
    let coordinator: Vec<&String> = m["coordinator"]
        .every
        .iter()
        .filter(|d| node_side.contains(d.as_str()))
        .collect();
    assert!(
        coordinator.is_empty(),
        "the coordinator depends on {coordinator:?}"
    );
}

#[test]
fn fixtures_reach_no_pipeline_module() {
    let m = members();
    for (name, member) in &m {
        let allowed = TOOLING.contains(&name.as_str()) || name == "node";
        if !allowed {
            assert!(
                !member.normal.contains("fc-fixtures"),
                "{name} depends on the fixtures"
            );
        }
    }
    // Within the node's crate, only the commands (demo, bench, sample) name the fixtures; the
    // library re-exports them for the tests and uses them nowhere else.
    let src = root().join("node/src");
    let mut offenders = Vec::new();
    for entry in walkdir::WalkDir::new(&src) {
        let entry = entry.expect("walk");
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "rs") || path.starts_with(src.join("commands")) {
            continue;
        }
        let text = std::fs::read_to_string(path).expect("source");
        let names_fixtures = text.lines().any(|l| {
            let l = l.trim_start();
            !l.starts_with("//")
                && (l.contains("fc_fixtures")
                    || l.contains("crate::sample")
                    || l.contains("node::sample"))
        });
        if names_fixtures && !path.ends_with("lib.rs") && !path.ends_with("main.rs") {
            offenders.push(
                path.strip_prefix(&src)
                    .expect("under src")
                    .display()
                    .to_string(),
            );
        }
    }
    assert!(
        offenders.is_empty(),
        "pipeline modules import the fixtures: {offenders:?}"
    );
}
