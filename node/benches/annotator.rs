//! The web annotator's figures: `cargo bench -p node --bench annotator`.
//!
//! On one generated 512×512×300 CT series, de-identified and made a case of a project:
//! - server start: from spawning `fedcurate-node annotator` to its first answer over HTTP;
//! - idle memory: the service's resident set after start, and after serving the volume;
//! - volume shown: in Debian's headless chromium (software WebGL2), from opening the case to
//!   NiiVue having drawn it (download, decompression, texture), measured in the page;
//! - label map saved: a drawing covering a third of the volume, from pressing Save to the
//!   version recorded (NIfTI encoded in the page, uploaded, parsed and checked against the
//!   grid, written durably, recorded in the catalog).
//!
//! Each figure is the median of several runs. Under `cargo test` (no `--bench` argument) it
//! runs once on a 64×64×20 series as a smoke test of the measuring itself.

#[path = "../tests/browser/mod.rs"]
#[allow(dead_code)]
mod browser;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use browser::{Browser, bin, free_port, run, web_assets};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawn the annotator and wait for its first HTTP answer: (server, milliseconds).
fn start(cfg: &Path, port: u16) -> (Server, f64) {
    use std::io::{Read, Write};
    let t0 = Instant::now();
    let child = bin()
        .arg("--config")
        .arg(cfg)
        .arg("annotator")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("annotator");
    let server = Server(child);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = write!(
                s,
                "GET /api/me HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
            );
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            if out.starts_with("HTTP/1.1 401") {
                return (server, t0.elapsed().as_secs_f64() * 1000.0);
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the annotator did not answer"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (matrix, slices, runs) = if full { (512, 300, 5) } else { (64, 20, 1) };
    let _one = browser::lock();
    // FEDCURATE_BENCH_DIR keeps the prepared case for the next run (preparing takes minutes).
    let temp = tempfile::tempdir().expect("tempdir");
    let root = std::env::var_os("FEDCURATE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&root).expect("bench folder");
    let port = free_port();
    let cfg = root.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[deid]\n[annotator]\nlisten = \"127.0.0.1:{port}\"\nweb_assets = {:?}\n",
            root.join("data"),
            web_assets()
        ),
    )
    .expect("config");
    let node = |args: &[&str]| {
        let mut c = bin();
        c.arg("--config").arg(&cfg).args(args);
        c
    };
    let marker = root.join(format!("prepared-{matrix}x{slices}"));
    if !marker.exists() {
        println!("preparing a {matrix}x{matrix}x{slices} CT case…");
        prepare(&node, &cfg, &root, matrix, slices);
        std::fs::write(&marker, b"").expect("marker");
    }
    let cases: serde_json::Value = serde_json::from_str(&run(&mut node(&[
        "annotate",
        "cases",
        "--project",
        "bench",
        "--json",
    ])))
    .expect("cases");
    let case = cases[0]["case_id"].as_str().expect("a case").to_owned();
    let image_bytes = std::fs::metadata(
        root.join("data")
            .join(cases[0]["image"].as_str().expect("image")),
    )
    .map(|m| m.len())
    .unwrap_or(0);
    measure(&cfg, port, &case, image_bytes, (matrix, slices), runs);
}

/// A generated CT series, de-identified, the case of a project assigned to `reader`.
fn prepare(
    node: &dyn Fn(&[&str]) -> std::process::Command,
    cfg: &Path,
    root: &Path,
    matrix: usize,
    slices: usize,
) {
    let archive = root.join("archive");
    run(node(&["sample", "--patients", "1"])
        .args([
            "--slices",
            &slices.to_string(),
            "--matrix",
            &matrix.to_string(),
        ])
        .arg("--out")
        .arg(&archive));
    run(node(&["deid", "--input"]).arg(&archive));
    let project = root.join("project.toml");
    std::fs::write(
        &project,
        "id = \"bench\"\nkinds = [\"mask\"]\nraters_per_case = 1\nmax_upload_mib = 1024\n[cases]\nmodalities = [\"CT\"]\n[[labels]]\nvalue = 1\nname = \"organ\"\ncolour = [230, 60, 40]\n",
    )
    .expect("project");
    run(node(&["annotate", "project", "create"]).arg(&project));
    run(&mut node(&[
        "annotate",
        "assign",
        "--project",
        "bench",
        "--raters",
        "reader",
    ]));
    browser::add_user(cfg, "reader", "annotator");
}

fn measure(
    cfg: &Path,
    port: u16,
    case: &str,
    image_bytes: u64,
    (matrix, slices): (usize, usize),
    runs: usize,
) {
    // Start and idle memory.
    let mut starts = Vec::new();
    let mut idle = Vec::new();
    for _ in 0..runs {
        let (server, ms) = start(cfg, port);
        std::thread::sleep(Duration::from_millis(500));
        idle.push(rss_mib(server.0.id()));
        starts.push(ms);
    }
    let (server, _) = start(cfg, port);
    let url = format!("http://127.0.0.1:{port}");

    // Volume shown, and a label map saved.
    let b = Browser::new();
    b.login(&url, "reader");
    let mut shown = Vec::new();
    let mut saved = Vec::new();
    let open = || {
        b.goto(&format!("{url}/#/"));
        b.wait_css("section.project");
        b.open_case(&url, "bench", case);
        b.wait_css("#save");
        b.js("return window.fedcurate.loadMs")
            .as_f64()
            .expect("load time")
    };
    // Opening the case before this run saves anything. (Where a kept case already has the
    // rater's versions, the last one's label map is loaded with the image: said below.)
    let earlier = b.js_async(&format!(
        "const done = arguments[0]; fetch('/api/projects/bench/cases/{case}').then(r => r.json()).then(j => done(j.versions.length))"
    ));
    for _ in 0..runs.min(3) {
        shown.push(open());
    }
    for _ in 0..runs.min(3) {
        open();
        // The brush chosen (the drawing is made then), a third of the volume painted (a
        // central block), then Save pressed.
        b.click("button[data-tool='brush']");
        b.js("const v = window.fedcurate.viewer; const nv = v.nv; const d = nv.back.dimsRAS; \
              const bmp = nv.drawBitmap; for (let z = Math.floor(d[3] / 6); z < Math.ceil(5 * d[3] / 6); z++) \
              for (let y = Math.floor(d[2] / 5); y < Math.ceil(4 * d[2] / 5); y++) { const row = (z * d[2] + y) * d[1]; \
              bmp.fill(1, row + Math.floor(d[1] / 5), row + Math.ceil(4 * d[1] / 5)); } nv.refreshDrawing(true);");
        let ms = b.js_async(
            "const done = arguments[0]; const s = document.querySelector('#status'); const t0 = performance.now(); \
             const o = new MutationObserver(() => { if (/Saved as version|Not saved/.test(s.textContent)) { o.disconnect(); \
             done([performance.now() - t0, s.textContent]); } }); o.observe(s, {childList: true, characterData: true, subtree: true}); \
             document.querySelector('#save').click();",
        );
        assert!(
            ms[1]
                .as_str()
                .is_some_and(|t| t.contains("Saved as version")),
            "{ms}"
        );
        saved.push(ms[0].as_f64().expect("save time"));
    }
    let served = rss_mib(server.0.id());
    drop(b);
    println!(
        "annotator, {matrix}x{matrix}x{slices} CT case ({:.1} MB gzipped NIfTI), medians:",
        image_bytes as f64 / 1e6
    );
    println!(
        "  server start to first answer: {:.0} ms (goal < 1000 ms)",
        median(starts)
    );
    println!(
        "  idle memory after start:      {:.1} MiB (goal < 50 MiB); after serving the case: {served:.1} MiB",
        median(idle)
    );
    println!(
        "  volume shown in the browser:  {:.0} ms (goal < 1000 ms){}",
        median(shown),
        if earlier.as_u64().unwrap_or(0) > 0 {
            " (with the rater's last label map)"
        } else {
            ""
        }
    );
    println!(
        "  label map saved and recorded: {:.0} ms (goal < 1000 ms)",
        median(saved)
    );
}
