//! What the browser tests and the annotator benchmark share: chromedriver and a headless
//! chromium of Debian's, driven through WebDriver, and the node binary.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fantoccini::actions::{InputSource, MOUSE_BUTTON_LEFT, MouseActions, PointerAction};
use fantoccini::{Client, ClientBuilder, Locator};

/// One browser at a time (each drives a whole browser on a 2-core machine).
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

pub const PASSWORD: &str = "a long enough secret";

/// `fedcurate-node users add USER --role ROLE` with [`PASSWORD`] on standard input.
pub fn add_user(cfg: &Path, user: &str, role: &str) {
    use std::io::Write;
    let mut child = bin()
        .arg("--config")
        .arg(cfg)
        .args(["users", "add", user, "--role", role])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("users add");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .expect("password");
    assert!(
        child.wait().expect("users add").success(),
        "users add {user}"
    );
}

/// Wait (at most 20 s) until something listens on the loopback `port`.
pub fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("binary runs");
    assert!(
        out.status.success(),
        "command failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub fn web_assets() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    assert!(
        dir.join("node_modules/@niivue/niivue/dist/index.js")
            .exists(),
        "the viewer is not installed: run scripts/web-assets.sh (the test script does)"
    );
    dir
}

/// Press a key (as the keyboard does, through WebDriver).
pub fn press(b: &Browser, key: char) {
    use fantoccini::actions::{KeyAction, KeyActions};
    let k = KeyActions::new("keyboard".into())
        .then(KeyAction::Down { value: key })
        .then(KeyAction::Up { value: key });
    b.rt.block_on(b.c().perform_actions(k)).expect("key");
}

/// chromedriver on its own port, with its own profile folder; killed on drop.
pub struct Browser {
    driver: Child,
    client: Option<Client>,
    _profile: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.client.take() {
            let _ = self.rt.block_on(c.close());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Browser {
    pub fn new() -> Browser {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; the test script installs it)");
        let profile = tempfile::tempdir().expect("profile");
        wait_for_port(port, "chromedriver");
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--use-angle=swiftshader", "--enable-unsafe-swiftshader",
                    "--window-size=1280,900", "--force-device-scale-factor=1",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-quic",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let client = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a browser session");
        Browser {
            driver,
            client: Some(client),
            _profile: profile,
            rt,
        }
    }

    pub fn c(&self) -> &Client {
        self.client.as_ref().expect("client")
    }

    pub fn goto(&self, url: &str) {
        self.rt.block_on(self.c().goto(url)).expect("goto");
    }

    pub fn js(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.c().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Run an async script: `done(value)` is `arguments[0]`.
    pub fn js_async(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.c().execute_async(script, vec![]))
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    pub fn wait_css(&self, css: &str) -> fantoccini::elements::Element {
        self.rt
            .block_on(
                self.c()
                    .wait()
                    .at_most(Duration::from_secs(30))
                    .for_element(Locator::Css(css)),
            )
            .unwrap_or_else(|e| panic!("waiting for {css}: {e}"))
    }

    pub fn text(&self, css: &str) -> String {
        let e = self.wait_css(css);
        self.rt.block_on(e.text()).expect("text")
    }

    pub fn click(&self, css: &str) {
        let e = self.wait_css(css);
        self.rt.block_on(e.click()).expect("click");
    }

    pub fn type_into(&self, css: &str, text: &str) {
        let e = self.wait_css(css);
        self.rt.block_on(e.clear()).expect("clear");
        self.rt.block_on(e.send_keys(text)).expect("type");
    }

    /// Wait until `css`'s text satisfies `ok`.
    pub fn wait_text(&self, css: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = self.text(css);
            if ok(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "{css} says {t:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn login(&self, url: &str, user: &str) {
        self.goto(&format!("{url}/#/login"));
        self.type_into("#user", user);
        self.type_into("#password", PASSWORD);
        self.click("form#login button[type=submit]");
        self.wait_text("#who", |t| t.contains(user));
    }

    pub fn logout(&self) {
        self.click("#logout");
        self.wait_css("form#login");
    }

    /// Open a case and wait for its image to be shown.
    pub fn open_case(&self, url: &str, project: &str, case: &str) {
        self.goto(&format!("{url}/#/p/{project}/c/{case}"));
        let t = self.wait_text("#status", |t| {
            t.contains("Image shown") || t.contains("could not be shown")
        });
        assert!(t.contains("Image shown"), "{t}");
    }

    /// Keep a screenshot of the page when `FEDCURATE_SCREENSHOTS` names a folder.
    pub fn keep_screenshot(&self, name: &str) {
        if let Some(dir) = std::env::var_os("FEDCURATE_SCREENSHOTS") {
            let png = self.rt.block_on(self.c().screenshot()).expect("screenshot");
            std::fs::create_dir_all(&dir).expect("screenshot folder");
            std::fs::write(Path::new(&dir).join(format!("{name}.png")), png).expect("screenshot");
        }
    }

    /// Show one plane (the acquisition's) filling the canvas.
    pub fn single_plane(&self) {
        self.js("document.querySelector('#layout').value = 'acquisition'; document.querySelector('#layout').dispatchEvent(new Event('change'));");
        std::thread::sleep(Duration::from_millis(300));
    }

    /// The canvas as the user sees it (RGBA rows), with its size.
    pub fn canvas_pixels(&self) -> (Vec<u8>, usize, usize) {
        let e = self.wait_css("#stage canvas");
        let png_bytes = self.rt.block_on(e.screenshot()).expect("screenshot");
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
        let mut reader = decoder.read_info().expect("png");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("frame");
        let channels = info.color_type.samples();
        let rgba: Vec<u8> = buf[..info.buffer_size()]
            .chunks(channels)
            .flat_map(|p| [p[0], p[1 % channels], p[2 % channels], 255])
            .collect();
        (rgba, info.width as usize, info.height as usize)
    }

    /// Where the bright block is on screen: the bounding box of near-white pixels, in CSS
    /// pixels relative to the canvas's centre (the scale factor is forced to 1).
    pub fn block_on_screen(&self) -> ([f64; 2], [f64; 2]) {
        let (px, w, h) = self.canvas_pixels();
        let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
        for y in 0..h {
            for x in 0..w {
                let p = &px[(y * w + x) * 4..];
                if p[0] > 235 && p[1] > 235 && p[2] > 235 {
                    x0 = x0.min(x);
                    y0 = y0.min(y);
                    x1 = x1.max(x);
                    y1 = y1.max(y);
                }
            }
        }
        assert!(x0 < x1 && y0 < y1, "the block is not visible on the canvas");
        let (cx, cy) = (w as f64 / 2.0, h as f64 / 2.0);
        (
            [x0 as f64 - cx, y0 as f64 - cy],
            [x1 as f64 - cx, y1 as f64 - cy],
        )
    }

    /// Pointer actions on the canvas: press at the first point, drag through the others,
    /// release (points in CSS pixels from the canvas's centre).
    pub fn drag(&self, points: &[[f64; 2]]) {
        self.drag_with(MOUSE_BUTTON_LEFT, points);
    }

    /// [`Self::drag`] with another mouse button.
    pub fn drag_with(&self, button: u64, points: &[[f64; 2]]) {
        let canvas = self.wait_css("#stage canvas.overlay");
        let mut m = MouseActions::new("mouse".into());
        for (n, p) in points.iter().enumerate() {
            m = m.then(PointerAction::MoveToElement {
                element: canvas.clone(),
                duration: Some(Duration::from_millis(if n == 0 { 0 } else { 40 })),
                x: p[0],
                y: p[1],
            });
            if n == 0 {
                m = m.then(PointerAction::Down { button });
            }
        }
        m = m.then(PointerAction::Up { button });
        self.rt
            .block_on(self.c().perform_actions(m))
            .expect("pointer actions");
    }

    /// Clicks at points (CSS pixels from the canvas's centre).
    pub fn clicks(&self, points: &[[f64; 2]]) {
        for p in points {
            self.drag(&[*p]);
        }
    }

    pub fn save(&self) -> i64 {
        self.click("#save");
        let t = self.wait_text("#status", |t| {
            t.contains("Saved as version") || t.contains("Not saved")
        });
        assert!(t.contains("Saved as version"), "{t}");
        t.trim_start_matches("Saved as version ")
            .trim_end_matches('.')
            .parse()
            .expect("version id")
    }
}
