//! The trainer's API: HTTP on a Unix-domain socket, callers authorised by their peer
//! credentials (the node's own user, `allowed_uids`, members of `allowed_gids`).
//!
//! - `GET /v1/status`: the job, the round, what the node is doing.
//! - `GET /v1/round?after=R&timeout=S`: wait (up to S seconds) until a round after R is open
//!   and its global model is here, or the job is finished; answers the round, the model's
//!   revision, the job's trainer parameters.
//! - `GET /v1/model/{revision}`: the global model (safetensors).
//! - `POST /v1/update?round=R&samples=N&kind=weights|delta&metric=name:value…`: the trainer's
//!   update (safetensors); checked at once (layout, metadata, finite values, sample count,
//!   norm), refused with the reason (422) or kept for the node to send.
//! - `POST /v1/metrics?round=R&metric=name:value…`: local metrics (kept in the node's log,
//!   not sent).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use protocol::training::{JobDocument, TrainingJob};
use serde::Deserialize;

use crate::agent::{Shared, UpdateMeta, model_path, update_paths};
use crate::encode::{self, Update, UpdateKind};

/// Room for a safetensors header beyond the job's data section.
const HEADER_ROOM: usize = 16 * 1024 * 1024 + 8;

/// The caller's credentials, from the socket.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let cred = s.io().peer_cred().ok();
        Peer {
            uid: cred.map(|c| c.uid()),
            gid: cred.map(|c| c.gid()),
        }
    }
}

#[derive(Debug)]
struct Api {
    shared: Arc<Shared>,
    uids: Vec<u32>,
    gids: Vec<u32>,
    max_samples: Option<u64>,
}

/// The node's own user id (the owner of its process).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

fn json(status: StatusCode, v: serde_json::Value) -> Response {
    (status, axum::Json(v)).into_response()
}

fn refuse(status: StatusCode, why: impl std::fmt::Display) -> Response {
    json(status, serde_json::json!({ "error": why.to_string() }))
}

impl Api {
    fn allowed(&self, p: &Peer) -> bool {
        p.uid.is_some_and(|u| self.uids.contains(&u))
            || p.gid.is_some_and(|g| self.gids.contains(&g))
    }
}

/// Bind the socket (owner-only, or 0660 with `socket_group`) and serve until `stop`.
pub async fn serve(
    path: &Path,
    settings: &crate::TrainingSettings,
    shared: Arc<Shared>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    let mode = if let Some(g) = settings.socket_group {
        std::os::unix::fs::chown(path, None, Some(g))?;
        0o660
    } else {
        0o600
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    let mut uids = settings.allowed_uids.clone();
    uids.extend(own_uid());
    let api = Arc::new(Api {
        shared,
        uids,
        gids: settings.allowed_gids.clone(),
        max_samples: settings.counted_cases().map_err(std::io::Error::other)?,
    });
    let app = Router::new()
        .route("/v1/status", get(status))
        .route("/v1/round", get(round))
        .route("/v1/model/{revision}", get(model))
        .route("/v1/update", post(update))
        .route("/v1/metrics", post(metrics))
        // Each route bounds its own body (an update: the job's data section and a header).
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(api.clone(), authorise))
        .with_state(api);
    tracing::info!(socket = %path.display(), mode = format!("{mode:o}"), "trainer API listening");
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(stop)
        .await
}

async fn authorise(
    State(api): State<Arc<Api>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !api.allowed(&peer) {
        tracing::warn!(uid = ?peer.uid, gid = ?peer.gid, "a caller the training settings do not allow was refused");
        return refuse(
            StatusCode::FORBIDDEN,
            "this user may not use the node's training API ([training] allowed_uids, allowed_gids)",
        );
    }
    next.run(req).await
}

async fn status(State(api): State<Arc<Api>>) -> Response {
    json(
        StatusCode::OK,
        serde_json::to_value(api.shared.status()).unwrap_or_default(),
    )
}

#[derive(Deserialize)]
struct RoundQuery {
    #[serde(default)]
    after: u32,
    #[serde(default = "default_wait")]
    timeout: u64,
}

fn default_wait() -> u64 {
    30
}

/// A round the trainer can work on: open, after `after`, its model here.
fn ready(s: &crate::agent::Status, after: u32) -> Option<serde_json::Value> {
    let job = s.job.as_ref()?;
    if s.finished {
        return Some(serde_json::json!({
            "finished": true, "revision": s.revision, "round": 0, "job": job,
        }));
    }
    (s.round > after && s.round >= 1 && s.revision + 1 == s.round).then(|| {
        serde_json::json!({
            "finished": false, "round": s.round, "revision": s.revision, "job": job,
        })
    })
}

async fn round(State(api): State<Arc<Api>>, Query(q): Query<RoundQuery>) -> Response {
    let mut rx = api.shared.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(q.timeout.min(3600));
    loop {
        if let Some(v) = ready(&api.shared.status(), q.after) {
            return json(StatusCode::OK, v);
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "the node is stopping"),
            Err(_) => {
                let s = api.shared.status();
                return json(
                    StatusCode::ACCEPTED,
                    serde_json::json!({"waiting": true, "phase": s.phase, "round": s.round}),
                );
            }
        }
    }
}

fn job_dir(api: &Api) -> Result<(PathBuf, TrainingJob), Box<Response>> {
    let s = api.shared.status();
    let Some(j) = s.job else {
        return Err(Box::new(refuse(
            StatusCode::CONFLICT,
            "no training job yet (the node has not fetched one)",
        )));
    };
    let text = std::fs::read_to_string(j.dir.join("job.toml"))
        .map_err(|e| Box::new(refuse(StatusCode::INTERNAL_SERVER_ERROR, e)))?;
    let job = JobDocument::new(&text)
        .and_then(|d| d.job())
        .map_err(|e| Box::new(refuse(StatusCode::INTERNAL_SERVER_ERROR, e)))?;
    Ok((j.dir, job))
}

async fn model(State(api): State<Arc<Api>>, UrlPath(revision): UrlPath<u32>) -> Response {
    let (dir, _) = match job_dir(&api) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let path = model_path(&dir, revision);
    match tokio::task::spawn_blocking(move || std::fs::read(path))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
    {
        Ok(b) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            b,
        )
            .into_response(),
        Err(_) => refuse(
            StatusCode::NOT_FOUND,
            format!("global model revision {revision} is not held here (the last two are)"),
        ),
    }
}

#[derive(Deserialize)]
struct UpdateQuery {
    round: u32,
    #[serde(default)]
    samples: Option<u64>,
    #[serde(default)]
    kind: Option<UpdateKind>,
}

/// `metric=name:value` pairs from the query string, in any number.
fn metric_pairs(query: Option<&str>) -> Result<Vec<(String, f64)>, String> {
    let mut out = Vec::new();
    for pair in query.unwrap_or("").split('&') {
        let Some(v) = pair.strip_prefix("metric=") else {
            continue;
        };
        let v = v.replace("%3A", ":").replace("%3a", ":");
        let (name, value) = v
            .split_once(':')
            .ok_or_else(|| format!("metric {v:?}: write name:value"))?;
        let value: f64 = value
            .parse()
            .map_err(|_| format!("metric {name}: {value:?} is not a number"))?;
        if !value.is_finite() {
            return Err(format!("metric {name} is not finite"));
        }
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

async fn update(
    State(api): State<Arc<Api>>,
    Query(q): Query<UpdateQuery>,
    uri: axum::http::Uri,
    body: axum::body::Body,
) -> Response {
    let (dir, job) = match job_dir(&api) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let limit = job.layout().data_len() as usize + HEADER_ROOM;
    let body: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("an update of this job is at most {limit} bytes"),
            );
        }
    };
    let s = api.shared.status();
    if s.round == 0 || q.round != s.round || s.revision + 1 != s.round {
        return refuse(
            StatusCode::CONFLICT,
            format!(
                "round {} is not the one the node collects (round {}, model revision {})",
                q.round, s.round, s.revision
            ),
        );
    }
    let metrics = match metric_pairs(uri.query()) {
        Ok(m) => m,
        Err(e) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    if let Some((name, _)) = metrics.iter().find(|(n, _)| !job.metrics.contains(n)) {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "metric {name} is not one the job defines ({})",
                job.metrics.join(", ")
            ),
        );
    }
    let values: Vec<f64> = job
        .metrics
        .iter()
        .map(|n| {
            metrics
                .iter()
                .find(|(m, _)| m == n)
                .map_or(0.0, |(_, v)| *v)
        })
        .collect();
    let samples = q.samples.unwrap_or(1);
    let kind = q.kind.unwrap_or(UpdateKind::Weights);
    let max = api
        .max_samples
        .map_or(job.max_samples, |c| c.min(job.max_samples));
    let round = q.round;
    let revision = s.revision;
    let t0 = std::time::Instant::now();
    let checked = tokio::task::spawn_blocking(move || -> Result<f64, String> {
        let layout = job.layout();
        let global = std::fs::read(model_path(&dir, revision)).map_err(|e| e.to_string())?;
        let start = layout.check_file(&global).map_err(|e| e.to_string())?;
        let u = Update {
            bytes: &body,
            kind,
            samples,
            norm: None,
        };
        let norm =
            encode::check(&job, &layout, &global[start..], &u, max).map_err(|e| e.to_string())?;
        let (upath, mpath) = update_paths(&dir, round);
        fc_files::write_atomically(&upath, &body).map_err(|e| e.to_string())?;
        let meta = UpdateMeta {
            samples,
            kind,
            metrics: values,
            norm: Some(norm),
        };
        fc_files::write_atomically(&mpath, &serde_json::to_vec(&meta).unwrap_or_default())
            .map_err(|e| e.to_string())?;
        Ok(norm)
    })
    .await;
    match checked {
        Ok(Ok(norm)) => {
            api.shared.update(|s| {
                s.submitted = round;
                s.error = None;
            });
            tracing::info!(
                round,
                samples,
                norm,
                ms = t0.elapsed().as_millis() as u64,
                "the trainer's update was accepted"
            );
            json(
                StatusCode::OK,
                serde_json::json!({"accepted": true, "round": round, "norm": norm}),
            )
        }
        Ok(Err(e)) => {
            tracing::warn!(round, reason = %e, "the trainer's update was refused");
            refuse(StatusCode::UNPROCESSABLE_ENTITY, e)
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[derive(Deserialize)]
struct MetricsQuery {
    #[serde(default)]
    round: u32,
}

async fn metrics(
    State(api): State<Arc<Api>>,
    Query(q): Query<MetricsQuery>,
    uri: axum::http::Uri,
) -> Response {
    let (dir, _) = match job_dir(&api) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let m = match metric_pairs(uri.query()) {
        Ok(m) => m,
        Err(e) => return refuse(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let line = serde_json::json!({
        "at": fc_store::audit::utc_now(),
        "round": q.round,
        "metrics": m
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect::<serde_json::Map<String, serde_json::Value>>(),
    });
    use std::io::Write;
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .and_then(|mut f| writeln!(f, "{line}"));
    match r {
        Ok(()) => json(StatusCode::OK, serde_json::json!({"kept": m.len()})),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_are_allowed_by_uid_or_group_only() {
        let api = Api {
            shared: Shared::new(&protocol::SiteId::new("site-a").expect("id")),
            uids: vec![1000, 1001],
            gids: vec![998],
            max_samples: None,
        };
        let peer = |uid, gid| Peer {
            uid: Some(uid),
            gid: Some(gid),
        };
        assert!(api.allowed(&peer(1000, 5)));
        assert!(
            api.allowed(&peer(4242, 998)),
            "a member of an allowed group"
        );
        assert!(!api.allowed(&peer(4242, 5)));
        assert!(!api.allowed(&Peer {
            uid: None,
            gid: None
        }));
        assert!(own_uid().is_some(), "the node's own user is always allowed");
    }
}
