//! The annotator's HTTP service, so far its skeleton: login and logout with a session cookie,
//! who is logged in, and the defences every later route inherits.
//!
//! - The session cookie is `__Host-fedcurate-session`: `Path=/`, `HttpOnly`, `SameSite=Strict`,
//!   and `Secure` when the service runs under TLS (a browser only accepts the `__Host-` prefix
//!   with `Secure`, so without TLS, on loopback, the cookie is named `fedcurate-session`).
//! - Requests that change anything (every method but GET and HEAD) are refused unless the
//!   browser says they come from the same origin (`Sec-Fetch-Site: same-origin`, or an `Origin`
//!   equal to the service's own): the CSRF defence.
//! - Logins are rate-limited per user name: after [`MAX_FAILURES`] failures within
//!   [`FAILURE_WINDOW`] seconds, further attempts are refused until the window passes.
//! - Every answer carries `Content-Security-Policy: default-src 'self'` (with `data:` and
//!   `blob:` images for the viewer), `X-Content-Type-Options: nosniff`,
//!   `Referrer-Policy: no-referrer` and `frame-ancestors 'none'`; the API answers `no-store`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fc_annotation::Annotations;
use fc_store::catalog::Catalog;

use crate::accounts::{self, Denied, Principal};
use crate::web::{self, Assets};

/// Failed logins of one user name allowed within [`FAILURE_WINDOW`].
pub const MAX_FAILURES: usize = 5;
/// Seconds over which failed logins are counted.
pub const FAILURE_WINDOW: i64 = 300;

/// The service's state: the catalog (accounts and sessions), its own origin, and the clock.
pub struct AppState {
    catalog: Mutex<Catalog>,
    /// `https://host:port` (or `http://` on loopback without TLS), and any other name the
    /// service is reached under: what `Origin` must say.
    origins: Vec<String>,
    tls: bool,
    work: Option<Mutex<Annotations>>,
    assets: Option<Assets>,
    export_dir: Option<PathBuf>,
    /// Session limits (seconds): idle, and since login.
    limits: (i64, i64),
    failures: Mutex<BTreeMap<String, Vec<i64>>>,
    clock: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("origins", &self.origins)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over an open catalog; `clock` gives seconds since the epoch (tests move it).
    pub fn new(
        catalog: Catalog,
        origin: String,
        tls: bool,
        clock: Box<dyn Fn() -> i64 + Send + Sync>,
    ) -> Self {
        AppState {
            catalog: Mutex::new(catalog),
            origins: vec![origin],
            tls,
            work: None,
            assets: None,
            export_dir: None,
            limits: (accounts::IDLE, accounts::ABSOLUTE),
            failures: Mutex::new(BTreeMap::new()),
            clock,
        }
    }

    /// Accept requests that change anything from these origins too.
    pub fn with_origins(mut self, origins: impl IntoIterator<Item = String>) -> Self {
        for o in origins {
            if !self.origins.contains(&o) {
                self.origins.push(o);
            }
        }
        self
    }

    /// Serve the annotation routes over this workspace, exporting into `export_dir`.
    pub fn with_annotations(mut self, work: Annotations, export_dir: PathBuf) -> Self {
        self.work = Some(Mutex::new(work));
        self.export_dir = Some(export_dir);
        self
    }

    /// End sessions after `idle` seconds without a request, or `absolute` seconds after login.
    pub fn with_session_limits(mut self, idle: i64, absolute: i64) -> Self {
        self.limits = (idle, absolute);
        self
    }

    /// Serve the screens and the viewer.
    pub fn with_assets(mut self, assets: Assets) -> Self {
        self.assets = Some(assets);
        self
    }

    pub(crate) fn annotations(&self) -> Option<MutexGuard<'_, Annotations>> {
        self.work.as_ref().map(|m| match m.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        })
    }

    pub(crate) fn export_dir(&self) -> Option<PathBuf> {
        self.export_dir.clone()
    }

    pub(crate) fn users(&self) -> Result<Vec<serde_json::Value>, Response> {
        let users = self.catalog().users().map_err(|e| {
            tracing::error!(error = %e, "listing users");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the service cannot read its catalog",
            )
        })?;
        Ok(users
            .into_iter()
            .map(|u| serde_json::json!({"user": u.name, "role": u.role, "disabled": u.disabled}))
            .collect())
    }

    fn cookie_name(&self) -> &'static str {
        if self.tls {
            "__Host-fedcurate-session"
        } else {
            "fedcurate-session"
        }
    }

    fn catalog(&self) -> std::sync::MutexGuard<'_, Catalog> {
        match self.catalog.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

/// The router: `POST /api/login`, `POST /api/logout`, `GET /api/me`, the annotation routes
/// ([`crate::api`]), the screens, the viewer and the about page, all behind the defences.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/login", post(login))
        .route("/api/logout", post(logout))
        .route("/api/me", get(me))
        .merge(crate::api::routes())
        .route("/", get(index))
        .route("/app/{file}", get(app_file))
        .route("/assets/niivue.js", get(niivue))
        .route("/about", get(about))
        .layer(middleware::from_fn_with_state(state.clone(), defences))
        .with_state(state)
}

async fn index() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        web::INDEX,
    )
        .into_response()
}

async fn app_file(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match web::APP.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, text)) => ([(header::CONTENT_TYPE, *kind)], *text).into_response(),
        None => error(StatusCode::NOT_FOUND, "no such file"),
    }
}

async fn niivue(State(state): State<Arc<AppState>>) -> Response {
    match &state.assets {
        Some(a) => (
            [
                (header::CONTENT_TYPE, "text/javascript"),
                (header::CACHE_CONTROL, "private, max-age=86400"),
            ],
            a.niivue.clone(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "the viewer is not installed"),
    }
}

async fn about(State(state): State<Arc<AppState>>) -> Response {
    match &state.assets {
        Some(a) => (
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            a.about.clone(),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "the viewer is not installed"),
    }
}

/// A JSON answer.
pub(crate) fn json(v: &serde_json::Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// An error answer: `{"error": message}`.
pub(crate) fn error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({ "error": message }).to_string(),
    )
        .into_response()
}

/// CSRF check on state-changing requests, then security headers on every answer.
async fn defences(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD);
    if changes && !same_origin(request.headers(), &state.origins) {
        return with_headers(error(StatusCode::FORBIDDEN, "cross-site request refused"));
    }
    with_headers(next.run(request).await)
}

/// Whether the browser says the request comes from one of our pages: `Sec-Fetch-Site` when it
/// sends it (browsers set it and pages cannot), else `Origin`.
fn same_origin(headers: &HeaderMap, origins: &[String]) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    let from = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    match (site, from) {
        (Some(s), _) => s == "same-origin",
        (None, Some(o)) => origins.iter().any(|x| x == o),
        (None, None) => false,
    }
}

fn with_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn session_token(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// The logged-in user, as an extractor: a handler taking it answers 401 without a live
/// session, before it runs.
#[derive(Debug)]
pub struct User(pub Principal);

impl axum::extract::FromRequestParts<Arc<AppState>> for User {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Response> {
        principal(state, &parts.headers).map(User)
    }
}

/// The logged-in admin: 401 without a session, 403 for any other role.
#[derive(Debug)]
pub struct Admin(pub Principal);

impl axum::extract::FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Response> {
        let User(who) = User::from_request_parts(parts, state).await?;
        if who.role == accounts::Role::Admin {
            Ok(Admin(who))
        } else {
            Err(error(StatusCode::FORBIDDEN, "only admins do this"))
        }
    }
}

/// The logged-in user of a request, or the answer refusing it.
pub fn principal(state: &AppState, headers: &HeaderMap) -> Result<Principal, Response> {
    let Some(token) = session_token(headers, state.cookie_name()) else {
        return Err(error(StatusCode::UNAUTHORIZED, "log in first"));
    };
    let now = (state.clock)();
    let (idle, absolute) = state.limits;
    match accounts::session_within(&state.catalog(), &token, now, idle, absolute) {
        Ok(Ok(p)) => Ok(p),
        Ok(Err(d)) => Err(error(StatusCode::UNAUTHORIZED, &d.to_string())),
        Err(e) => {
            tracing::error!(error = %e, "session lookup failed");
            Err(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the service cannot read its catalog",
            ))
        }
    }
}

#[derive(serde::Deserialize)]
struct Credentials {
    user: String,
    password: String,
}

async fn login(State(state): State<Arc<AppState>>, body: Body) -> Response {
    let Ok(bytes) = axum::body::to_bytes(body, 16 * 1024).await else {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "the request is too large");
    };
    let Ok(c) = serde_json::from_slice::<Credentials>(&bytes) else {
        return error(
            StatusCode::BAD_REQUEST,
            "send {\"user\": ..., \"password\": ...}",
        );
    };
    let now = (state.clock)();
    {
        let mut f = match state.failures.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let recent = f.entry(c.user.clone()).or_default();
        recent.retain(|t| now - t < FAILURE_WINDOW);
        if recent.len() >= MAX_FAILURES {
            return error(
                StatusCode::TOO_MANY_REQUESTS,
                "too many failed logins; wait a few minutes",
            );
        }
    }
    // argon2 takes tens of milliseconds: off the async threads.
    let result = {
        let (s, user, password) = (state.clone(), c.user.clone(), c.password.clone());
        match tokio::task::spawn_blocking(move || {
            accounts::login(&s.catalog(), &user, &password, now)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the login failed inside the service",
                );
            }
        }
    };
    match result {
        Ok(Ok(token)) => {
            if let Ok(mut f) = state.failures.lock() {
                f.remove(&c.user);
            }
            let cookie = format!(
                "{}={token}; Path=/; HttpOnly; SameSite=Strict{}",
                state.cookie_name(),
                if state.tls { "; Secure" } else { "" }
            );
            let mut r = StatusCode::NO_CONTENT.into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Ok(Err(Denied::Credentials | Denied::Expired)) => {
            if let Ok(mut f) = state.failures.lock() {
                f.entry(c.user).or_default().push(now);
            }
            error(StatusCode::UNAUTHORIZED, &Denied::Credentials.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "login failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the service cannot read its catalog",
            )
        }
    }
}

async fn logout(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers, state.cookie_name()) {
        let _ = accounts::logout(&state.catalog(), &token);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let expired = format!(
        "{}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{}",
        state.cookie_name(),
        if state.tls { "; Secure" } else { "" }
    );
    if let Ok(v) = HeaderValue::from_str(&expired) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn me(User(p): User) -> Response {
    json(&serde_json::json!({"user": p.user, "role": p.role}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};
    use tower::ServiceExt;

    const ORIGIN: &str = "http://127.0.0.1:8443";

    fn service(tls: bool) -> (tempfile::TempDir, Router, Arc<AtomicI64>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Catalog::open(&dir.path().join("catalog.sqlite")).expect("catalog");
        accounts::add(
            &mut c,
            "ann",
            accounts::Role::Annotator,
            "a long enough secret",
        )
        .expect("add");
        let now = Arc::new(AtomicI64::new(1_000_000));
        let clock = now.clone();
        let state = Arc::new(AppState::new(
            c,
            ORIGIN.into(),
            tls,
            Box::new(move || clock.load(Ordering::Relaxed)),
        ));
        (dir, router(state), now)
    }

    fn request(method: &str, path: &str, body: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = axum::http::Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::from(body.to_owned())).expect("request")
    }

    async fn send(app: &Router, r: Request) -> Response {
        app.clone().oneshot(r).await.expect("answer")
    }

    const SAME: (&str, &str) = ("origin", ORIGIN);

    #[tokio::test]
    async fn login_sets_a_strict_http_only_cookie_and_logout_ends_the_session() {
        let (_d, app, _) = service(true);
        let r = send(
            &app,
            request(
                "POST",
                "/api/login",
                r#"{"user":"ann","password":"a long enough secret"}"#,
                &[SAME],
            ),
        )
        .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let cookie = r.headers()[header::SET_COOKIE]
            .to_str()
            .expect("cookie")
            .to_owned();
        assert!(cookie.starts_with("__Host-fedcurate-session="), "{cookie}");
        for attribute in ["Path=/", "HttpOnly", "SameSite=Strict", "Secure"] {
            assert!(cookie.contains(attribute), "{cookie}");
        }
        assert!(
            r.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .expect("csp")
                .contains("default-src 'self'")
        );
        let session = cookie.split(';').next().expect("pair").to_owned();
        let r = send(&app, request("GET", "/api/me", "", &[("cookie", &session)])).await;
        assert_eq!(r.status(), StatusCode::OK);
        let body = axum::body::to_bytes(r.into_body(), 1024)
            .await
            .expect("body");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).expect("json")["role"],
            "annotator"
        );
        let r = send(
            &app,
            request("POST", "/api/logout", "", &[SAME, ("cookie", &session)]),
        )
        .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let r = send(&app, request("GET", "/api/me", "", &[("cookie", &session)])).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = send(&app, request("GET", "/api/me", "", &[])).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn cross_site_requests_expired_sessions_and_guessing_are_refused() {
        let (_d, app, clock) = service(false);
        let login = r#"{"user":"ann","password":"a long enough secret"}"#;
        // No proof of origin, another origin, or a cross-site fetch: refused before the handler.
        for headers in [
            vec![],
            vec![("origin", "https://evil.example")],
            vec![("sec-fetch-site", "cross-site"), SAME],
        ] {
            let r = send(&app, request("POST", "/api/login", login, &headers)).await;
            assert_eq!(r.status(), StatusCode::FORBIDDEN, "{headers:?}");
        }
        let r = send(
            &app,
            request(
                "POST",
                "/api/login",
                login,
                &[("sec-fetch-site", "same-origin")],
            ),
        )
        .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let cookie = r.headers()[header::SET_COOKIE]
            .to_str()
            .expect("cookie")
            .to_owned();
        assert!(
            cookie.starts_with("fedcurate-session=") && !cookie.contains("Secure"),
            "{cookie}"
        );
        let session = cookie.split(';').next().expect("pair").to_owned();
        // Idle past the limit: the session is over.
        clock.fetch_add(accounts::IDLE + 1, Ordering::Relaxed);
        let r = send(&app, request("GET", "/api/me", "", &[("cookie", &session)])).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // Guessing: five failures, then even the right password waits out the window.
        for _ in 0..MAX_FAILURES {
            let r = send(
                &app,
                request(
                    "POST",
                    "/api/login",
                    r#"{"user":"ann","password":"wrong guess!!!"}"#,
                    &[SAME],
                ),
            )
            .await;
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        }
        let r = send(&app, request("POST", "/api/login", login, &[SAME])).await;
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        clock.fetch_add(FAILURE_WINDOW, Ordering::Relaxed);
        let r = send(&app, request("POST", "/api/login", login, &[SAME])).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        // An unknown user is told the same as a wrong password.
        let r = send(
            &app,
            request(
                "POST",
                "/api/login",
                r#"{"user":"nobody","password":"a long enough secret"}"#,
                &[SAME],
            ),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let body = axum::body::to_bytes(r.into_body(), 1024)
            .await
            .expect("body");
        assert!(String::from_utf8_lossy(&body).contains("wrong user name or password"));
    }
}
