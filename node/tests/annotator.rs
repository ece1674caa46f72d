//! The web annotator in a real browser: Debian's chromium driven through chromedriver
//! (WebDriver) against `fedcurate-node annotator`, on a site whose de-identified output has an
//! MR series in three orientations (plain, flipped, oblique). Each test has its own site,
//! ports, browser profile and driver process, all stopped on drop; the tests run one at a
//! time. The viewer comes from `web/` (`scripts/web-assets.sh` installs it).

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use node::fc_annotate::{Grid, LabelMap};
use node::sample::{self, Patient, Series, Study, ts};

mod browser;
use browser::{
    Browser, PASSWORD, add_user, bin, free_port, lock, press, run, wait_for_port, web_assets,
};

const N: usize = 48;
/// The bright block every slice carries: columns and rows (DICOM pixel indices).
const BLOCK_COLS: std::ops::Range<usize> = 30..38;
const BLOCK_ROWS: std::ops::Range<usize> = 8..16;

/// The three orientations: (name, slices, row direction, column direction).
fn orientations() -> Vec<(&'static str, usize, [f64; 3], [f64; 3])> {
    let (a, b) = (20f64.to_radians(), 15f64.to_radians());
    vec![
        ("plain", 10, [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]),
        ("flipped", 11, [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]),
        (
            "oblique",
            12,
            [a.cos(), a.sin(), 0.0],
            [-a.sin() * b.cos(), a.cos() * b.cos(), b.sin()],
        ),
    ]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// An MR series of `slices` 48×48 slices, 2 mm pixels 3 mm apart, in the given orientation,
/// with a bright block at [`BLOCK_COLS`] × [`BLOCK_ROWS`] in every slice.
fn write_series(dir: &Path, name: &str, slices: usize, row: [f64; 3], col: [f64; 3]) {
    let p = Patient {
        id: format!("PAT-{name}"),
        issuer: String::new(),
        name: format!("Doe^{name}"),
        birth_date: "19700101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = Study {
        uid: format!("1.2.826.0.1.3680043.10.543.7.{}", slices),
        date: "20240102".into(),
        time: "101010".into(),
        accession: format!("ACC{slices}"),
        description: "MR head".into(),
        referring_physician: "Ref^Rita".into(),
        institution: "General Hospital".into(),
    };
    let se = Series {
        uid: format!("1.2.826.0.1.3680043.10.543.8.{}", slices),
        number: slices as i32,
        description: format!("T1 {name}"),
        frame_of_reference: format!("1.2.826.0.1.3680043.10.543.9.{}", slices),
        station: "MR1".into(),
    };
    let normal = cross(row, col);
    // The centre of the grid at the origin.
    let half = |d: [f64; 3], n: f64| d.map(|x| x * n);
    let origin: [f64; 3] = std::array::from_fn(|a| {
        -half(row, 2.0 * (N as f64 - 1.0) / 2.0)[a]
            - half(col, 2.0 * (N as f64 - 1.0) / 2.0)[a]
            - half(normal, 3.0 * (slices as f64 - 1.0) / 2.0)[a]
    });
    std::fs::create_dir_all(dir).expect("dir");
    for s in 0..slices {
        let mut o = sample::mr_slice(&p, &st, &se, s as u16);
        let ipp: Vec<String> = (0..3)
            .map(|a| format!("{:.6}", origin[a] + normal[a] * 3.0 * s as f64))
            .collect();
        let iop: Vec<String> = row
            .iter()
            .chain(col.iter())
            .map(|x| format!("{x:.6}"))
            .collect();
        sample::put_text(&mut o, Tag(0x0020, 0x0032), VR::DS, &ipp.join("\\"));
        sample::put_text(&mut o, Tag(0x0020, 0x0037), VR::DS, &iop.join("\\"));
        sample::put_text(&mut o, Tag(0x0028, 0x0030), VR::DS, "2\\2");
        sample::put_text(&mut o, Tag(0x0018, 0x0050), VR::DS, "3");
        for (tag, v) in [(Tag(0x0028, 0x0010), N), (Tag(0x0028, 0x0011), N)] {
            o.put(DataElement::new(
                tag,
                VR::US,
                PrimitiveValue::from(v as u16),
            ));
        }
        let pixels: Vec<u16> = (0..N * N)
            .map(|i| {
                let (r, c) = (i / N, i % N);
                if BLOCK_ROWS.contains(&r) && BLOCK_COLS.contains(&c) {
                    3000
                } else {
                    400 + ((r * 7 + c * 3 + s * 5) % 50) as u16
                }
            })
            .collect();
        o.put(DataElement::new(
            Tag(0x7FE0, 0x0010),
            VR::OW,
            PrimitiveValue::U16(pixels.into()),
        ));
        let bytes = sample::encode(o, ts::EXPLICIT_LE).expect("encode");
        std::fs::write(dir.join(format!("{name}-{s:03}.dcm")), bytes).expect("write");
    }
}

/// A case of the site: its id, grid and the block's voxels in the case image.
#[derive(Clone, Debug)]
struct Case {
    id: String,
    grid: Grid,
    block: Vec<[usize; 3]>,
    raters: Vec<String>,
}

/// A site with de-identified series in three orientations, an annotation project over them
/// (three annotators, two per case, a model's proposal on every case), accounts, and the
/// annotator serving on its own port.
struct Site {
    dir: tempfile::TempDir,
    cfg: PathBuf,
    url: String,
    server: Child,
    cases: BTreeMap<&'static str, Case>,
}

impl Drop for Site {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

const PROJECT: &str = r#"id = "brain"
kinds = ["mask", "box2d", "polygon", "landmark", "label"]
raters_per_case = 2
max_upload_mib = 1
[cases]
modalities = ["MR"]
[[labels]]
value = 1
name = "lesion"
colour = [230, 60, 40]
[[labels]]
value = 2
name = "oedema"
colour = [60, 120, 230]
"#;

impl Site {
    fn new(extra_config: &str) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let cfg = dir.path().join("node.toml");
        std::fs::write(
            &cfg,
            format!(
                "data_dir = {:?}\n[deid]\n[annotator]\nlisten = \"127.0.0.1:{port}\"\nweb_assets = {:?}\n{extra_config}",
                dir.path().join("data"),
                web_assets()
            ),
        )
        .expect("config");
        let archive = dir.path().join("archive");
        for (name, slices, row, col) in orientations() {
            write_series(&archive.join(name), name, slices, row, col);
        }
        let node = |args: &[&str]| {
            let mut c = bin();
            c.arg("--config").arg(&cfg).args(args);
            c
        };
        run(node(&["deid", "--input"]).arg(&archive));
        let project = dir.path().join("project.toml");
        std::fs::write(&project, PROJECT).expect("project");
        run(node(&["annotate", "project", "create"]).arg(&project));
        run(&mut node(&[
            "annotate",
            "assign",
            "--project",
            "brain",
            "--raters",
            "ann1,ann2,ann3",
        ]));
        for (user, role) in [
            ("ann1", "annotator"),
            ("ann2", "annotator"),
            ("ann3", "annotator"),
            ("rev", "reviewer"),
            ("boss", "admin"),
        ] {
            add_user(&cfg, user, role);
        }
        // The cases, told apart by their slice count; the block found in each case image.
        let listed: serde_json::Value = serde_json::from_str(&run(&mut node(&[
            "annotate",
            "cases",
            "--project",
            "brain",
            "--json",
        ])))
        .expect("cases json");
        let config: node::config::NodeConfig =
            node::config::NodeConfig::load(&cfg).expect("config");
        let work = node::annotation::open(&config, config.data_dir.join("deid")).expect("open");
        let assignments = work.assignments("brain").expect("assignments");
        let mut cases = BTreeMap::new();
        for c in listed.as_array().expect("cases") {
            let id = c["case_id"].as_str().expect("id").to_owned();
            let image = dir
                .path()
                .join("data")
                .join(c["image"].as_str().expect("image"));
            let (_, vol) = node::volume::nifti::read(&image).expect("case image");
            let grid = Grid::of(&vol);
            let (name, ..) = orientations()
                .into_iter()
                .find(|o| o.1 == grid.shape[2])
                .expect("an orientation of this slice count");
            let block: Vec<[usize; 3]> = vol
                .data
                .indexed_iter()
                .filter(|(_, v)| **v > 2000.0)
                .map(|((i, j, k, _), _)| [i, j, k])
                .collect();
            assert_eq!(
                block.len(),
                64 * grid.shape[2],
                "{name}: the block in the image"
            );
            // A model's proposal: the block, as label 1.
            let mut proposal = LabelMap::empty(grid.clone());
            for v in &block {
                proposal.data[*v] = 1;
            }
            let file = dir.path().join(format!("proposal-{name}.nii.gz"));
            std::fs::write(&file, proposal.to_nifti_gz().expect("nifti")).expect("write");
            run(node(&[
                "annotate",
                "import",
                "--project",
                "brain",
                "--rater",
                "segmenter",
                "--case",
                &id,
                "--proposal",
                "--model",
                "blockfinder",
                "--model-version",
                "1.0",
                "--labelmap",
            ])
            .arg(&file));
            let raters = assignments
                .iter()
                .filter(|a| a.case_id == id)
                .map(|a| a.rater.clone())
                .collect();
            cases.insert(
                name,
                Case {
                    id,
                    grid,
                    block,
                    raters,
                },
            );
        }
        assert_eq!(cases.len(), 3);
        let server = node(&["annotator"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("annotator starts");
        let url = format!("http://127.0.0.1:{port}");
        wait_for_port(port, "the annotator");
        Site {
            dir,
            cfg,
            url,
            server,
            cases,
        }
    }

    fn config(&self) -> node::config::NodeConfig {
        node::config::NodeConfig::load(&self.cfg).expect("config")
    }

    fn work(&self) -> node::annotation::Annotations {
        let c = self.config();
        node::annotation::open(&c, c.data_dir.join("deid")).expect("workspace")
    }

    /// A rater assigned to this case, and one who is not.
    fn rater_of(&self, case: &str) -> (String, String) {
        let c = &self.cases[case];
        let outsider = ["ann1", "ann2", "ann3"]
            .into_iter()
            .find(|r| !c.raters.iter().any(|x| x == r))
            .expect("an annotator without this case");
        (c.raters[0].clone(), outsider.to_owned())
    }
}

fn centroid_mm(grid: &Grid, voxels: &[[usize; 3]]) -> [f64; 3] {
    let n = voxels.len() as f64;
    let mut c = [0.0; 3];
    for v in voxels {
        let mm = grid.to_mm([v[0] as f64, v[1] as f64, v[2] as f64]);
        for a in 0..3 {
            c[a] += mm[a] / n;
        }
    }
    c
}

fn distance(a: [f64; 3], b: [f64; 3]) -> f64 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

#[test]
fn login_logout_and_what_each_role_may_open() {
    let _one = lock();
    let site = Site::new("");
    let b = Browser::new();
    // A wrong password is refused on the page.
    b.goto(&format!("{}/#/login", site.url));
    b.type_into("#user", "ann1");
    b.type_into("#password", "not the password");
    b.click("form#login button[type=submit]");
    let t = b.wait_text("#login-error", |t| !t.is_empty());
    assert!(t.contains("wrong user name or password"), "{t}");

    let (rater, outsider) = site.rater_of("plain");
    b.login(&site.url, &outsider);
    // The worklist lists only the outsider's cases: two of the three.
    b.wait_css("section.project");
    let rows =
        b.js("return [...document.querySelectorAll('tr[data-case]')].map(r => r.dataset.case)");
    let rows: Vec<String> = serde_json::from_value(rows).expect("rows");
    assert_eq!(rows.len(), 2, "{rows:?}");
    // Everything the page loaded came from the node.
    let foreign = b.js(&format!(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => !n.startsWith('{}'))",
        site.url
    ));
    assert_eq!(foreign, serde_json::json!([]));
    assert!(!rows.contains(&site.cases["plain"].id));
    // Opening the unassigned case by URL is refused, and so are its image and API.
    b.goto(&format!(
        "{}/#/p/brain/c/{}",
        site.url, site.cases["plain"].id
    ));
    let t = b.text("#page-error");
    assert!(t.contains("is assigned to you"), "{t}");
    let status = b.js_async(&format!(
        "const done = arguments[0]; Promise.all(['/api/projects/brain/cases/{0}/image.nii.gz', '/api/projects/brain/cases/{0}/image.nii', '/api/projects/brain/cases/{0}'].map(u => fetch(u).then(r => r.status))).then(done)",
        site.cases["plain"].id
    ));
    assert_eq!(status, serde_json::json!([404, 404, 404]));
    b.logout();

    // The rater saves a version of the case; another annotator cannot read it, by id.
    b.login(&site.url, &rater);
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    let version = b.save();
    b.logout();
    let (_, other) = site.rater_of("plain");
    let other_rater = site.cases["plain"]
        .raters
        .iter()
        .find(|r| **r != rater)
        .expect("a second rater")
        .clone();
    for user in [other, other_rater] {
        b.login(&site.url, &user);
        let status = b.js_async(&format!(
            "const done = arguments[0]; Promise.all(['/api/versions/{version}', '/api/versions/{version}/mask.nii.gz'].map(u => fetch(u).then(r => r.status))).then(done)"
        ));
        assert_eq!(status, serde_json::json!([404, 404]), "{user}");
        b.logout();
    }
    // A reviewer sees every case, opens the one the outsider could not, and the version.
    b.login(&site.url, "rev");
    b.wait_css("section.project");
    let n = b.js("return document.querySelectorAll('tr[data-case]').length");
    assert_eq!(n, 3);
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    b.wait_css(&format!("tr[data-version='{version}']"));
    let status = b.js_async(&format!(
        "const done = arguments[0]; fetch('/api/versions/{version}').then(r => done(r.status))"
    ));
    assert_eq!(status, 200);
    // Right drag pans once chosen (it sets window/level by default).
    b.single_plane();
    let before = b.js("return [...window.fedcurate.viewer.nv.scene.pan2Dxyzmm]");
    b.drag_with(
        fantoccini::actions::MOUSE_BUTTON_RIGHT,
        &[[0.0, 0.0], [60.0, 40.0], [120.0, 80.0]],
    );
    assert_eq!(
        b.js("return [...window.fedcurate.viewer.nv.scene.pan2Dxyzmm]"),
        before,
        "by default a right drag does not pan"
    );
    b.js("const s = document.querySelector('#right-drag'); s.value = 'pan'; s.dispatchEvent(new Event('change'))");
    b.drag_with(
        fantoccini::actions::MOUSE_BUTTON_RIGHT,
        &[[0.0, 0.0], [60.0, 40.0], [120.0, 80.0]],
    );
    let after = b.js("return [...window.fedcurate.viewer.nv.scene.pan2Dxyzmm]");
    assert_ne!(before, after, "a right drag in pan mode moves the view");
    b.logout();
    // An admin sees the project's progress and exports it from the worklist.
    b.login(&site.url, "boss");
    let line = b.text("section.project .status-line");
    assert!(line.starts_with("3 cases · 6 assignments"), "{line}");
    b.click("section.project button.export");
    let out = b.wait_text("section.project .admin-out", |t| !t.is_empty());
    assert!(out.starts_with("Exported 1 version to "), "{out}");
    // After logout the session is over: the API answers 401.
    b.logout();
    let status =
        b.js_async("const done = arguments[0]; fetch('/api/projects').then(r => done(r.status))");
    assert_eq!(status, 401);
}

/// Paint over the block as it is shown, with real pointer drags, in each orientation; the
/// saved mask must cover the block's voxels in the image's own grid (so the same world
/// positions): a label map saved in the wrong voxel order would land on the mirror image.
#[test]
fn a_painted_mask_lands_on_the_voxels_under_the_brush_in_every_orientation() {
    let _one = lock();
    let site = Site::new("");
    let b = Browser::new();
    for name in ["plain", "flipped", "oblique"] {
        let case = &site.cases[name];
        let (rater, _) = site.rater_of(name);
        b.login(&site.url, &rater);
        b.open_case(&site.url, "brain", &site.cases[name].id);
        b.single_plane();
        let (lo, hi) = b.block_on_screen();
        b.click("button[data-tool='brush']");
        b.type_into("#brush-mm", "2");
        b.js("document.querySelector('#brush-mm').dispatchEvent(new Event('change'))");
        // A zigzag over the block, inside its edges.
        let inset = [(hi[0] - lo[0]) * 0.15, (hi[1] - lo[1]) * 0.15];
        let rows = 8;
        let mut path = Vec::new();
        for r in 0..=rows {
            let y = lo[1] + inset[1] + (hi[1] - lo[1] - 2.0 * inset[1]) * r as f64 / rows as f64;
            let (a, z) = (lo[0] + inset[0], hi[0] - inset[0]);
            if r % 2 == 0 {
                path.push([a, y]);
                path.push([z, y]);
            } else {
                path.push([z, y]);
                path.push([a, y]);
            }
        }
        b.drag(&path);
        b.keep_screenshot(&format!("painted-{name}"));
        let painted = b.js("return window.fedcurate.viewer.paintedVoxels()");
        assert!(painted.as_u64().unwrap_or(0) > 20, "{name}: {painted}");
        if name == "plain" {
            // Undo takes the stroke away, redo brings it back (the keys, as a user presses them).
            b.click("#undo");
            assert_eq!(b.js("return window.fedcurate.viewer.paintedVoxels()"), 0);
            b.click("#redo");
            assert_eq!(
                b.js("return window.fedcurate.viewer.paintedVoxels()"),
                painted
            );
        }
        let id = b.save();
        b.logout();

        let loaded = site.work().load(id).expect("version");
        let mask = loaded.mask.expect("a mask");
        assert_eq!(mask.grid.shape, case.grid.shape);
        case.grid.matches(&mask.grid, 1e-3).expect("same grid");
        let painted: Vec<[usize; 3]> = mask
            .data
            .indexed_iter()
            .filter(|(_, v)| **v == 1)
            .map(|((i, j, k), _)| [i, j, k])
            .collect();
        let slices: std::collections::BTreeSet<usize> = painted.iter().map(|v| v[2]).collect();
        assert_eq!(slices.len(), 1, "{name}: painted on one slice: {slices:?}");
        let k = painted[0][2];
        let block: Vec<[usize; 3]> = case.block.iter().filter(|v| v[2] == k).copied().collect();
        let inside = painted.iter().filter(|v| block.contains(v)).count();
        assert!(
            inside as f64 >= 0.9 * painted.len() as f64,
            "{name}: {inside} of {} painted voxels are on the block",
            painted.len()
        );
        assert!(
            inside as f64 >= 0.5 * block.len() as f64,
            "{name}: the strokes covered {inside} of the block's {} voxels",
            block.len()
        );
        let d = distance(
            centroid_mm(&case.grid, &painted),
            centroid_mm(&case.grid, &block),
        );
        assert!(
            d < 4.0,
            "{name}: the painted centroid is {d:.1} mm from the block's"
        );
    }
}

fn attr(tag: &str, name: &str) -> f64 {
    let at = tag
        .find(&format!(" {name}=\""))
        .unwrap_or_else(|| panic!("{name} in {tag}"))
        + name.len()
        + 3;
    tag[at..at + tag[at..].find('"').expect("quote")]
        .parse()
        .expect("number")
}

/// A box, a polygon and two landmarks drawn with the pointer over the block, saved, then
/// exported by `annotate export`: the COCO and CVAT coordinates are the block's.
#[test]
fn a_box_a_polygon_and_landmarks_export_to_coco_and_cvat_where_they_were_drawn() {
    let _one = lock();
    let site = Site::new("");
    let b = Browser::new();
    let case = &site.cases["plain"];
    let (rater, _) = site.rater_of("plain");
    b.login(&site.url, &rater);
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    b.single_plane();
    let (lo, hi) = b.block_on_screen();
    let at = |fx: f64, fy: f64| [lo[0] + (hi[0] - lo[0]) * fx, lo[1] + (hi[1] - lo[1]) * fy];
    // The box: corner to corner of the block as shown.
    b.click("button[data-tool='box']");
    b.drag(&[at(0.0, 0.0), at(0.5, 0.5), at(1.0, 1.0)]);
    // The polygon: four clicks inside the corners, Enter closes it.
    b.click("button[data-tool='polygon']");
    b.clicks(&[at(0.1, 0.1), at(0.9, 0.1), at(0.9, 0.9), at(0.1, 0.9)]);
    press(&b, fantoccini::key::Key::Enter.into());
    // Landmarks: L1 at the block's centre, L2 inside a corner.
    b.click("button[data-tool='landmark']");
    b.clicks(&[at(0.5, 0.5), at(0.2, 0.2)]);
    // The case is classified as showing a lesion (value 1).
    b.click("#classification input[value='1']");
    let vectors = b.js("return window.fedcurate.viewer.vectors");
    assert_eq!(
        vectors["boxes"].as_array().map(Vec::len),
        Some(1),
        "{vectors}"
    );
    assert_eq!(
        vectors["outlines"].as_array().map(Vec::len),
        Some(1),
        "{vectors}"
    );
    assert_eq!(
        vectors["landmarks"].as_array().map(Vec::len),
        Some(2),
        "{vectors}"
    );
    b.keep_screenshot("vectors");
    let id = b.save();
    let saved = site.work().load(id).expect("saved");
    assert_eq!(saved.content.labels.len(), 1, "{:?}", saved.content);
    assert_eq!(saved.content.labels[0].classes, vec![1]);

    let out = site.dir.path().join("export");
    run(bin()
        .arg("--config")
        .arg(&site.cfg)
        .args(["annotate", "export", "--project", "brain", "--out"])
        .arg(&out));
    let k = vectors["boxes"][0]["slice"].as_u64().expect("slice") as usize;
    let block: Vec<[usize; 3]> = case.block.iter().filter(|v| v[2] == k).copied().collect();
    let (i0, i1) = (
        block.iter().map(|v| v[0]).min().expect("i"),
        block.iter().map(|v| v[0]).max().expect("i"),
    );
    let (j0, j1) = (
        block.iter().map(|v| v[1]).min().expect("j"),
        block.iter().map(|v| v[1]).max().expect("j"),
    );
    // Pixel coordinates put a voxel centre at (i + 0.5, j + 0.5): the block spans
    // [i0, i1 + 1] × [j0, j1 + 1].
    let (x0, x1, y0, y1) = (i0 as f64, i1 as f64 + 1.0, j0 as f64, j1 as f64 + 1.0);
    let near = |a: f64, b: f64, what: &str| assert!((a - b).abs() <= 1.0, "{what}: {a} vs {b}");

    let coco: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("coco.json")).expect("coco")).expect("json");
    let image = coco["images"]
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["file_name"] == node::fc_annotate::coco::slice_name(&case.id, k).as_str())
        .expect("the slice's image in COCO");
    let anns: Vec<&serde_json::Value> = coco["annotations"]
        .as_array()
        .expect("annotations")
        .iter()
        .filter(|a| a["image_id"] == image["id"])
        .collect();
    let boxed = anns
        .iter()
        .find(|a| {
            a["segmentation"].as_array().is_some_and(Vec::is_empty) && a["keypoints"].is_null()
        })
        .expect("the box");
    let bb: Vec<f64> = serde_json::from_value(boxed["bbox"].clone()).expect("bbox");
    near(bb[0], x0, "box x");
    near(bb[1], y0, "box y");
    near(bb[0] + bb[2], x1, "box right");
    near(bb[1] + bb[3], y1, "box bottom");
    let polygon = anns
        .iter()
        .find(|a| {
            a["segmentation"][0]
                .as_array()
                .is_some_and(|p| p.len() == 8)
        })
        .expect("the polygon");
    let pts: Vec<f64> = serde_json::from_value(polygon["segmentation"][0].clone()).expect("points");
    for p in pts.chunks(2) {
        assert!(
            p[0] > x0 && p[0] < x1 && p[1] > y0 && p[1] < y1,
            "polygon point {p:?} outside the block [{x0}, {x1}] × [{y0}, {y1}]"
        );
    }
    let kp = anns
        .iter()
        .find(|a| a["keypoints"].is_array())
        .expect("the landmarks");
    let names: Vec<String> = coco["categories"]
        .as_array()
        .expect("categories")
        .iter()
        .find(|c| c["name"] == "landmarks")
        .and_then(|c| serde_json::from_value(c["keypoints"].clone()).ok())
        .expect("landmark names");
    let l1 = names.iter().position(|n| n == "L1").expect("L1");
    let kv: Vec<f64> = serde_json::from_value(kp["keypoints"].clone()).expect("keypoints");
    near(kv[3 * l1], (x0 + x1) / 2.0, "L1 x");
    near(kv[3 * l1 + 1], (y0 + y1) / 2.0, "L1 y");

    let cvat = std::fs::read_to_string(out.join("cvat.xml")).expect("cvat");
    let bx = cvat
        .lines()
        .find(|l| l.trim_start().starts_with("<box "))
        .expect("a CVAT box");
    near(attr(bx, "xtl"), x0, "CVAT xtl");
    near(attr(bx, "ytl"), y0, "CVAT ytl");
    near(attr(bx, "xbr"), x1 - 1.0, "CVAT xbr");
    near(attr(bx, "ybr"), y1 - 1.0, "CVAT ybr");
    assert!(cvat.contains("<polygon "), "a CVAT polygon");
    let l1 = cvat
        .lines()
        .find(|l| l.contains("<points label=\"landmark\"") && l.contains(">L1<"))
        .expect("L1 in CVAT");
    let at = l1.find("points=\"").expect("points") + 8;
    let xy: Vec<f64> = l1[at..at + l1[at..].find('"').expect("quote")]
        .split(',')
        .map(|x| x.parse().expect("coordinate"))
        .collect();
    near(xy[0], (x0 + x1) / 2.0, "CVAT L1 x");
    near(xy[1], (y0 + y1) / 2.0, "CVAT L1 y");
}

/// One rater accepts the model's proposal, the other modifies it (adds oedema beside the
/// block); the versions say so; the reviewer sees both overlaid and their agreement, starts
/// from STAPLE and saves the consensus.
#[test]
fn proposals_are_accepted_and_modified_and_the_reviewer_adjudicates() {
    let _one = lock();
    let site = Site::new("");
    let b = Browser::new();
    let case = &site.cases["plain"];
    let (first, second) = (case.raters[0].clone(), case.raters[1].clone());
    b.login(&site.url, &first);
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    let proposal_text = b.text("#proposal");
    assert!(proposal_text.contains("blockfinder 1.0"), "{proposal_text}");
    b.click("#proposal-accept");
    let accepted = b.wait_text("#status", |t| t.contains("Saved as version"));
    b.logout();

    b.login(&site.url, &second);
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    b.single_plane();
    // Where the block is, before the proposal covers it.
    let (lo, hi) = b.block_on_screen();
    b.click("#proposal-modify");
    b.wait_text("#status", |t| t.contains("Editing the proposal"));
    // Oedema (label 2, key "2") in a band to the right of the block.
    b.click("button[data-tool='brush']");
    press(&b, '2');
    let w = hi[0] - lo[0];
    b.drag(&[
        [hi[0] + w * 0.3, lo[1] + 4.0],
        [hi[0] + w * 0.3, hi[1] - 4.0],
        [hi[0] + w * 0.6, hi[1] - 4.0],
        [hi[0] + w * 0.6, lo[1] + 4.0],
    ]);
    let modified = b.save();
    b.logout();

    // A rater of another case rejects its proposal: a version without a mask says so.
    let flipped = &site.cases["flipped"];
    let (third, _) = site.rater_of("flipped");
    b.login(&site.url, &third);
    b.open_case(&site.url, "brain", &flipped.id);
    b.click("#proposal-reject");
    b.wait_text("#status", |t| t.contains("Saved as version"));
    b.logout();
    let rejected = site
        .work()
        .versions("brain", Some(&flipped.id))
        .expect("versions")
        .into_iter()
        .find(|v| v.rater == third && v.source == "proposal-rejected")
        .expect("the rejection");
    assert!(rejected.mask_path.is_none() && rejected.parent.is_some());

    let work = site.work();
    let versions = work.versions("brain", Some(&case.id)).expect("versions");
    let proposal = versions
        .iter()
        .find(|v| v.source == "proposal")
        .expect("the proposal");
    let acc = versions
        .iter()
        .find(|v| v.rater == first && v.source == "proposal-accepted")
        .unwrap_or_else(|| panic!("{first}'s acceptance ({accepted}): {versions:#?}"));
    assert_eq!(acc.parent, Some(proposal.id));
    assert_eq!(acc.model.as_deref(), Some("blockfinder"));
    let m = work.load(modified).expect("modified");
    assert_eq!(m.version.source, "proposal-modified");
    assert_eq!(m.version.parent, Some(proposal.id));
    let mask = m.mask.expect("mask");
    let counts = mask.counts();
    assert_eq!(
        counts.get(&1).copied(),
        Some(case.block.len() as u64),
        "the proposal's block is kept"
    );
    assert!(
        counts.get(&2).copied().unwrap_or(0) > 10,
        "oedema added: {counts:?}"
    );
    // No oedema voxel lies on the block.
    assert!(case.block.iter().all(|v| mask.data[*v] == 1));

    b.login(&site.url, "rev");
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    let agreement = b.text("#agreement");
    assert!(
        agreement.contains("Dice 1.000"),
        "lesion agrees fully: {agreement}"
    );
    b.click(&format!("#overlays input[data-rater='{first}']"));
    b.click(&format!("#overlays input[data-rater='{second}']"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.js("return window.fedcurate.viewer.nv.volumes.length") != 3 {
        assert!(
            Instant::now() < deadline,
            "the raters' masks are not overlaid"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.keep_screenshot("review");
    b.js("const s = document.querySelector('#adjudicate-start'); s.value = 'multi-label-staple'; s.dispatchEvent(new Event('change'))");
    b.click("#adjudicate-begin");
    b.wait_text("#status", |t| {
        t.contains("Adjudicating from multi-label-staple")
    });
    b.click("#adjudicate-save");
    let t = b.wait_text("#status", |t| {
        t.contains("Consensus saved") || t.contains("Not saved")
    });
    assert!(t.contains("Consensus saved"), "{t}");
    let work = site.work();
    let consensus = work.consensus_versions("brain").expect("consensus");
    let c = consensus
        .iter()
        .find(|l| l.version.case_id == case.id)
        .expect("the case's consensus");
    assert_eq!(c.version.source, "consensus");
    assert_eq!(
        c.version.model.as_deref(),
        Some("adjudication-multi-label-staple")
    );
    assert_eq!(c.version.model_version.as_deref(), Some("rev"));
    assert_eq!(c.version.parent, Some(modified.max(acc.id)));
    let cm = c.mask.as_ref().expect("consensus mask");
    assert_eq!(cm.counts().get(&1).copied(), Some(case.block.len() as u64));
}

/// A page on another site cannot make the logged-in user's browser save, and an idle session
/// ends: the page says so and the API refuses.
#[test]
fn cross_site_requests_and_idle_sessions_are_refused() {
    let _one = lock();
    let site = Site::new("session_idle_seconds = 4\nsession_max_seconds = 60\n");
    let b = Browser::new();
    let case = &site.cases["plain"];
    let (rater, _) = site.rater_of("plain");
    b.login(&site.url, &rater);
    let before = site
        .work()
        .versions("brain", Some(&case.id))
        .expect("versions")
        .len();
    // The attacker's page, on another origin, posts a save form at the annotator.
    let evil = TcpListener::bind("127.0.0.1:0").expect("evil listener");
    let evil_port = evil.local_addr().expect("addr").port();
    let target = format!("{}/api/projects/brain/cases/{}/versions", site.url, case.id);
    let page = format!(
        "<!doctype html><form id=f method=post enctype=multipart/form-data action=\"{target}\">\
         <input name=meta value='{{\"action\":\"save\",\"content\":{{}}}}'></form>\
         <script>document.getElementById('f').submit()</script>"
    );
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        if let Ok((mut s, _)) = evil.accept() {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    b.goto(&format!("http://localhost:{evil_port}/"));
    server.join().expect("evil server");
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let s = b.rt.block_on(b.c().source()).expect("source");
        if s.contains("error") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(body.contains("cross-site request refused"), "{body}");
    let after = site
        .work()
        .versions("brain", Some(&case.id))
        .expect("versions")
        .len();
    assert_eq!(before, after, "the forged save was not recorded");

    // Back on the annotator: idle past the limit, the next save is refused.
    b.open_case(&site.url, "brain", &site.cases["plain"].id);
    std::thread::sleep(Duration::from_secs(5));
    b.click("#save");
    let t = b.wait_text("#status", |t| {
        t.contains("Not saved") || t.contains("Saved as")
    });
    assert!(t.contains("the session has ended"), "{t}");
    b.goto(&format!("{}/#/", site.url));
    b.wait_css("form#login");
}

/// Under TLS the cookie is `__Host-` prefixed and Secure; without TLS the service refuses
/// to listen beyond loopback; without the viewer installed it refuses to start.
#[test]
fn tls_cookies_and_refusals_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A LAN address without TLS.
    let cfg = dir.path().join("lan.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[annotator]\nlisten = \"0.0.0.0:8750\"\n",
            dir.path().join("data")
        ),
    )
    .expect("config");
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("annotator")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not loopback: set tls_certificate and tls_key"),
        "{err}"
    );
    // No viewer installed.
    let cfg = dir.path().join("bare.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[annotator]\nweb_assets = {:?}\n",
            dir.path().join("data"),
            dir.path().join("nowhere")
        ),
    )
    .expect("config");
    let out = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("annotator")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("the viewer is not installed") && err.contains("npm ci --ignore-scripts"),
        "{err}"
    );

    // TLS with a certificate for localhost.
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).expect("cert");
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).expect("key");
    let port = free_port();
    let cfg = dir.path().join("tls.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {data:?}\n[annotator]\nlisten = \"127.0.0.1:{port}\"\nweb_assets = {web:?}\ntls_certificate = {c:?}\ntls_key = {k:?}\npublic_url = \"https://localhost:{port}\"\n",
            data = dir.path().join("data"),
            web = web_assets(),
            c = dir.path().join("tls.crt"),
            k = dir.path().join("tls.key"),
        ),
    )
    .expect("config");
    add_user(&cfg, "ann", "annotator");
    let mut server = bin()
        .arg("--config")
        .arg(&cfg)
        .arg("annotator")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("annotator");
    wait_for_port(port, "the annotator");
    let answer = {
        use std::io::{Read, Write};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let conn =
            rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("client");
        let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let body = format!("{{\"user\":\"ann\",\"password\":\"{PASSWORD}\"}}");
        write!(
            tls,
            "POST /api/login HTTP/1.1\r\nhost: localhost:{port}\r\norigin: https://localhost:{port}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("request");
        let mut out = String::new();
        let _ = tls.read_to_string(&mut out);
        out
    };
    let _ = server.kill();
    let _ = server.wait();
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    assert!(cookie.contains("__Host-fedcurate-session="), "{cookie}");
    for a in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(a), "{cookie}");
    }
}

/// One HTTP/1.1 request on a new connection: (status, head, body).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("head");
    // A server may refuse before reading all of a large body.
    let _ = s.write_all(body);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let status = head[9..12].parse().expect("status");
    (status, head, out[split + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn multipart(meta: &str, mask: Option<&[u8]>) -> (String, Vec<u8>) {
    let boundary = "fedcurate-test-boundary-7d1c";
    let mut b = Vec::new();
    b.extend_from_slice(format!("--{boundary}\r\ncontent-disposition: form-data; name=\"meta\"\r\ncontent-type: application/json\r\n\r\n{meta}\r\n").as_bytes());
    if let Some(m) = mask {
        b.extend_from_slice(format!("--{boundary}\r\ncontent-disposition: form-data; name=\"mask\"; filename=\"mask.nii.gz\"\r\ncontent-type: application/octet-stream\r\n\r\n").as_bytes());
        b.extend_from_slice(m);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), b)
}

/// Byte ranges of a case image; label maps refused when they do not fit the image's grid or
/// the project's classes, or exceed its upload limit, and nothing recorded for them.
#[test]
fn the_api_serves_byte_ranges_and_refuses_label_maps_that_do_not_fit() {
    let site = Site::new("");
    let port: u16 = site
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let case = &site.cases["plain"];
    let (rater, _) = site.rater_of("plain");
    let origin = site.url.clone();
    let login = format!("{{\"user\":\"{rater}\",\"password\":\"{PASSWORD}\"}}");
    let (status, head, _) = http(
        port,
        "POST",
        "/api/login",
        &[("origin", &origin), ("content-type", "application/json")],
        login.as_bytes(),
    );
    assert_eq!(status, 204, "{head}");
    let cookie = header(&head, "set-cookie")
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let auth = [("cookie", cookie.as_str()), ("origin", origin.as_str())];

    let image_path = format!("/api/projects/brain/cases/{}/image.nii.gz", case.id);
    let whole = {
        let work = site.work();
        let cases = work.cases("brain").expect("cases");
        let this = cases.iter().find(|c| c.case_id == case.id).expect("case");
        std::fs::read(work.image_path(this)).expect("image")
    };
    let (status, head, body) = http(port, "GET", &image_path, &auth, b"");
    assert_eq!(status, 200);
    assert_eq!(header(&head, "accept-ranges"), Some("bytes"));
    assert_eq!(body, whole);
    let len = whole.len();
    let (status, head, body) = http(
        port,
        "GET",
        &image_path,
        &[auth[0], ("range", "bytes=0-99")],
        b"",
    );
    assert_eq!(status, 206);
    assert_eq!(
        header(&head, "content-range"),
        Some(format!("bytes 0-99/{len}").as_str())
    );
    assert_eq!(body, whole[..100]);
    let (status, _, body) = http(
        port,
        "GET",
        &image_path,
        &[auth[0], ("range", "bytes=-10")],
        b"",
    );
    assert_eq!(status, 206);
    assert_eq!(body, whole[len - 10..]);
    let (status, head, _) = http(
        port,
        "GET",
        &image_path,
        &[auth[0], ("range", &format!("bytes={len}-"))],
        b"",
    );
    assert_eq!(status, 416);
    assert_eq!(
        header(&head, "content-range"),
        Some(format!("bytes */{len}").as_str())
    );

    let save_path = format!("/api/projects/brain/cases/{}/versions", case.id);
    let before = site
        .work()
        .versions("brain", Some(&case.id))
        .expect("versions")
        .len();
    let meta = r#"{"action":"save","content":{}}"#;
    let refused = |mask: &[u8], expect_status: u16, expect: &str| {
        let (ct, body) = multipart(meta, Some(mask));
        let (status, _, answer) = http(
            port,
            "POST",
            &save_path,
            &[auth[0], auth[1], ("content-type", &ct)],
            &body,
        );
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status, expect_status, "{answer}");
        assert!(answer.contains(expect), "{answer}");
    };
    // Another case's grid (the flipped series).
    let other = &site.cases["flipped"];
    let mut wrong = LabelMap::empty(other.grid.clone());
    wrong.data[[1, 1, 1]] = 1;
    refused(&wrong.to_nifti_gz().expect("nifti"), 422, "voxels");
    // The right shape, shifted 5 mm.
    let mut shifted_grid = case.grid.clone();
    shifted_grid.affine[0][3] += 5.0;
    let mut shifted = LabelMap::empty(shifted_grid);
    shifted.data[[1, 1, 1]] = 1;
    refused(
        &shifted.to_nifti_gz().expect("nifti"),
        422,
        "geometry differs",
    );
    // A class the project does not have.
    let mut stranger = LabelMap::empty(case.grid.clone());
    stranger.data[[1, 1, 1]] = 7;
    refused(
        &stranger.to_nifti_gz().expect("nifti"),
        422,
        "label value 7",
    );
    // Not NIfTI at all, and over the project's limit of 1 MiB.
    refused(b"not a nifti file", 422, "not a readable NIfTI");
    refused(&vec![0u8; 1_200_000], 413, "limit of 1 MiB");
    // Cross-site: no Origin, no Sec-Fetch-Site.
    let (ct, body) = multipart(meta, None);
    let (status, _, _) = http(
        port,
        "POST",
        &save_path,
        &[auth[0], ("content-type", &ct)],
        &body,
    );
    assert_eq!(status, 403);
    let after = site
        .work()
        .versions("brain", Some(&case.id))
        .expect("versions")
        .len();
    assert_eq!(before, after, "nothing refused was recorded");
    // A label map that fits is stored.
    let mut good = LabelMap::empty(case.grid.clone());
    for v in &case.block {
        good.data[*v] = 1;
    }
    let (ct, body) = multipart(meta, Some(&good.to_nifti_gz().expect("nifti")));
    let (status, _, answer) = http(
        port,
        "POST",
        &save_path,
        &[auth[0], auth[1], ("content-type", &ct)],
        &body,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    let id = serde_json::from_slice::<serde_json::Value>(&answer).expect("json")["id"]
        .as_i64()
        .expect("id");
    let saved = site.work().load(id).expect("saved").mask.expect("mask");
    assert_eq!(saved.data, good.data);

    // The about page names the viewer and what it is installed with, and their licences.
    let (status, head, about) = http(port, "GET", "/about", &[], b"");
    assert_eq!(status, 200);
    assert!(
        header(&head, "content-security-policy")
            .is_some_and(|c| c.starts_with("default-src 'self'"))
    );
    let about = String::from_utf8_lossy(&about);
    for needle in ["@niivue/niivue 0.69.0", "BSD-2-Clause", "gl-matrix", "MIT"] {
        assert!(about.contains(needle), "{needle} not on the about page");
    }
    // Admin routes: refused to an annotator, done for an admin.
    for (method, path) in [
        ("GET", "/api/users".to_owned()),
        ("GET", "/api/projects/brain/status".to_owned()),
        ("POST", "/api/projects/brain/export".to_owned()),
        (
            "POST",
            format!("/api/projects/brain/cases/{}/return", case.id),
        ),
    ] {
        let (status, _, _) = http(port, method, &path, &auth, b"{}");
        assert_eq!(status, 403, "{method} {path} as an annotator");
    }
    let login = format!("{{\"user\":\"boss\",\"password\":\"{PASSWORD}\"}}");
    let (_, head, _) = http(
        port,
        "POST",
        "/api/login",
        &[("origin", &origin)],
        login.as_bytes(),
    );
    let boss = header(&head, "set-cookie")
        .expect("cookie")
        .split(';')
        .next()
        .expect("pair")
        .to_owned();
    let admin = [("cookie", boss.as_str()), ("origin", origin.as_str())];
    let (status, _, body) = http(port, "GET", "/api/users", &admin, b"");
    assert_eq!(status, 200);
    let users: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(users["users"].as_array().map(Vec::len), Some(5), "{users}");
    assert!(
        !String::from_utf8_lossy(&body).contains("argon2"),
        "no hash leaves"
    );
    let (status, _, body) = http(port, "GET", "/api/projects/brain/status", &admin, b"");
    assert_eq!(status, 200);
    let st: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(st["cases"], 3);
    let (status, _, body) = http(port, "POST", "/api/projects/brain/export", &admin, b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let ex: serde_json::Value = serde_json::from_slice(&body).expect("json");
    let folder = PathBuf::from(ex["folder"].as_str().expect("folder"));
    assert!(folder.join("coco.json").is_file() && folder.join("labels").is_dir());
    // The rater's case is returned with a reason; the assignment says so.
    let body = format!("{{\"rater\":\"{rater}\",\"repeat\":1,\"reason\":\"redo the lower edge\"}}");
    let (status, _, _) = http(
        port,
        "POST",
        &format!("/api/projects/brain/cases/{}/return", case.id),
        &admin,
        body.as_bytes(),
    );
    assert_eq!(status, 200);
    let state = site
        .work()
        .assignments("brain")
        .expect("assignments")
        .into_iter()
        .find(|a| a.case_id == case.id && a.rater == rater)
        .expect("assignment")
        .state;
    assert_eq!(state, "returned");
}
