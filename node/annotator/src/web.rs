//! What the browser loads: our own screens (plain ES modules, built into the binary), the
//! viewer (NiiVue, installed by npm into the web-assets folder, never copied into the repo),
//! and the about page with the licences of what the viewer is and bundles.

use std::path::{Path, PathBuf};

/// Where NiiVue's self-contained ES module sits under the web-assets folder.
pub const NIIVUE: &str = "node_modules/@niivue/niivue/dist/index.js";

/// Our screens: (path under `/app/`, media type, text).
pub const APP: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript", include_str!("../web/app.js")),
    (
        "viewer.js",
        "text/javascript",
        include_str!("../web/viewer.js"),
    ),
    ("api.js", "text/javascript", include_str!("../web/api.js")),
    ("style.css", "text/css", include_str!("../web/style.css")),
];

/// The page every screen lives in.
pub const INDEX: &str = include_str!("../web/index.html");

/// The viewer's files, loaded once at start.
#[derive(Clone, Debug)]
pub struct Assets {
    pub niivue: Vec<u8>,
    pub about: String,
    pub dir: PathBuf,
}

/// Why the annotator cannot start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the viewer is not installed in {dir}: {NIIVUE} is missing. Run `npm ci --ignore-scripts` \
     there (`scripts/web-assets.sh` does it), or set [annotator] web_assets to the folder \
     where it was installed"
)]
pub struct Missing {
    pub dir: String,
}

impl Assets {
    /// Load the viewer from `dir` and build the about page.
    pub fn load(dir: &Path) -> Result<Assets, Missing> {
        let niivue = std::fs::read(dir.join(NIIVUE)).map_err(|_| Missing {
            dir: dir.display().to_string(),
        })?;
        let about = about(dir, &niivue);
        Ok(Assets {
            niivue,
            about,
            dir: dir.to_owned(),
        })
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The installed packages (from npm's own record), each with its declared licence and its
/// licence and notice files; then the licence comments inside NiiVue's bundle.
fn about(dir: &Path, bundle: &[u8]) -> String {
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>About the fedcurate annotator</title>\
         <link rel=\"stylesheet\" href=\"/app/style.css\"></head><body class=\"about\">\
         <h1>About the fedcurate annotator</h1>\
         <p>The viewer is <a href=\"https://github.com/niivue/niivue\">NiiVue</a>, installed from npm as a \
         dependency. These are the packages installed with it and their licences, then the notices \
         inside its bundle.</p>",
    );
    let record: serde_json::Value = std::fs::read(dir.join("node_modules/.package-lock.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let mut packages: Vec<(String, PathBuf)> = record["packages"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| k.starts_with("node_modules/"))
                .map(|k| (k["node_modules/".len()..].to_owned(), dir.join(k)))
                .collect()
        })
        .unwrap_or_default();
    packages.sort();
    for (name, path) in packages {
        let manifest: serde_json::Value = std::fs::read(path.join("package.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let version = manifest["version"].as_str().unwrap_or("?");
        let licence = manifest["license"].as_str().unwrap_or("not declared");
        html.push_str(&format!(
            "<section><h2>{} {}</h2><p>Licence: {}</p>",
            escape(&name),
            escape(version),
            escape(licence)
        ));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&path)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        let n = p
                            .file_name()
                            .map(|n| n.to_string_lossy().to_uppercase())
                            .unwrap_or_default();
                        ["LICENSE", "LICENCE", "COPYING", "NOTICE"]
                            .iter()
                            .any(|k| n.starts_with(k))
                    })
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        if files.is_empty() {
            html.push_str("<p>The package ships no licence file.</p>");
        }
        for f in files {
            if let Ok(text) = std::fs::read_to_string(&f) {
                html.push_str(&format!("<pre>{}</pre>", escape(&text)));
            }
        }
        html.push_str("</section>");
    }
    html.push_str("<section><h2>Notices inside the NiiVue bundle</h2>");
    let text = String::from_utf8_lossy(bundle);
    let mut rest = text.as_ref();
    let mut seen = std::collections::BTreeSet::new();
    while let Some(start) = rest.find("/*") {
        let Some(len) = rest[start..].find("*/") else {
            break;
        };
        let block = &rest[start..start + len + 2];
        if (block.contains("Copyright") || block.contains("@license")) && seen.insert(block) {
            html.push_str(&format!("<pre>{}</pre>", escape(block)));
        }
        rest = &rest[start + len + 2..];
    }
    html.push_str("</section></body></html>");
    html
}
