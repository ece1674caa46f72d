//! The annotation routes. Every handler finds the logged-in user first and checks, on the
//! server, what their role lets them see or do:
//!
//! - an **annotator** sees only the cases assigned to them; in a blinded project only their own
//!   versions (and the model's proposal where their assignment is served with it); they save,
//!   and accept, modify or reject proposals, as themselves;
//! - a **reviewer** sees every case, every rater's versions and the case's agreement, starts
//!   an adjudication from majority vote or STAPLE, saves it as the consensus version, and
//!   returns a case to a rater;
//! - an **admin** can do what a reviewer can, and lists users, creates projects, assigns
//!   cases, reads a project's status and exports it.
//!
//! Images are the NIfTI files the annotation workspace made from the de-identified output,
//! served with byte ranges; label maps are uploaded as NIfTI, streamed with the project's
//! size limit, and checked against the image grid before they are stored.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fc_annotate::{Content, Grid, LabelMap, Project, Source};
use fc_annotation::{AnnotationError, Annotations, CONSENSUS_RATER, ConsensusMethod, Review};
use fc_store::catalog::{AnnotationCase, AnnotationVersion, Assignment};
use serde::Deserialize;

use crate::accounts::{Principal, Role};
use crate::server::{Admin, AppState, User, error, json};

/// The annotation routes (mounted under `/api`).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/projects", get(projects).post(create_project))
        .route("/api/projects/{p}/cases", get(cases))
        .route("/api/projects/{p}/cases/{c}", get(case))
        .route("/api/projects/{p}/cases/{c}/image.nii.gz", get(image))
        .route("/api/projects/{p}/cases/{c}/image.nii", get(image_inflated))
        .route(
            "/api/projects/{p}/cases/{c}/versions",
            post(save).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/api/projects/{p}/cases/{c}/consensus/{method}/start.nii.gz",
            get(consensus_start),
        )
        .route("/api/projects/{p}/cases/{c}/return", post(return_case))
        .route("/api/projects/{p}/assign", post(assign))
        .route("/api/projects/{p}/status", get(status))
        .route("/api/projects/{p}/export", post(export))
        .route("/api/versions/{id}", get(version))
        .route("/api/versions/{id}/mask.nii.gz", get(mask))
        .route("/api/users", get(users))
}

/// Run `f` on the annotation workspace off the async threads.
async fn work<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&mut Annotations) -> Result<T, Response> + Send + 'static,
) -> Result<T, Response> {
    let s = state.clone();
    tokio::task::spawn_blocking(move || {
        let Some(mut w) = s.annotations() else {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                "this service has no annotation workspace",
            ));
        };
        f(&mut w)
    })
    .await
    .unwrap_or_else(|_| {
        Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the request failed inside the service; see its log",
        ))
    })
}

/// The answer for a workspace error: not found, refused (with the reason), or a logged
/// internal error whose details stay in the log.
fn failed(e: AnnotationError) -> Response {
    match e {
        AnnotationError::NotFound(m) => error(StatusCode::NOT_FOUND, &m),
        AnnotationError::Refused(m) => error(StatusCode::UNPROCESSABLE_ENTITY, &m),
        AnnotationError::Project(p) => error(StatusCode::UNPROCESSABLE_ENTITY, &p.to_string()),
        other => {
            tracing::error!(error = %other, "annotation workspace");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the annotation workspace failed; see the service's log",
            )
        }
    }
}

fn forbidden(what: &str) -> Response {
    error(StatusCode::FORBIDDEN, what)
}

fn reviews(p: &Principal) -> bool {
    matches!(p.role, Role::Reviewer | Role::Admin)
}

/// What one user may see of one case.
enum Access {
    /// Reviewers and admins: everything.
    All,
    /// An annotator: their assignments of the case, and whether the project is blinded.
    Own {
        assignments: Vec<Assignment>,
        blinded: bool,
    },
}

/// A case a user may open: what they may see of it, its project, and the case with its grid.
struct Seen {
    access: Access,
    project: Project,
    case: AnnotationCase,
    grid: Grid,
}

impl Access {
    fn of(w: &Annotations, who: &Principal, project: &str, case: &str) -> Result<Seen, Response> {
        let p = w.project(project).map_err(failed)?;
        let seen = |access| {
            let (c, grid) = w.case(project, case).map_err(failed)?;
            Ok(Seen {
                access,
                project: p.clone(),
                case: c,
                grid,
            })
        };
        if reviews(who) {
            return seen(Access::All);
        }
        let mine: Vec<Assignment> = w
            .assignments(project)
            .map_err(failed)?
            .into_iter()
            .filter(|a| a.case_id == case && a.rater == who.user)
            .collect();
        if mine.is_empty() {
            // The same answer whether the case exists or not.
            return Err(error(
                StatusCode::NOT_FOUND,
                &format!("no case {case} of project {project} is assigned to you"),
            ));
        }
        seen(Access::Own {
            assignments: mine,
            blinded: p.blinded,
        })
    }

    fn sees(&self, who: &Principal, v: &AnnotationVersion) -> bool {
        match self {
            Access::All => true,
            Access::Own {
                assignments,
                blinded,
            } => {
                if v.rater == who.user {
                    return true;
                }
                if v.source == Source::Proposal.name() {
                    return assignments.iter().any(|a| a.with_proposal);
                }
                !blinded && v.rater != CONSENSUS_RATER
            }
        }
    }
}

fn version_json(v: &AnnotationVersion) -> serde_json::Value {
    serde_json::json!({
        "id": v.id, "case": v.case_id, "rater": v.rater, "repeat": v.repeat, "at": v.at,
        "parent": v.parent, "source": v.source, "model": v.model,
        "model_version": v.model_version, "has_mask": v.mask_path.is_some(),
    })
}

fn project_json(p: &Project) -> serde_json::Value {
    serde_json::json!({
        "id": p.id,
        "labels": p.labels.iter().map(|l| serde_json::json!({
            "value": l.value, "name": l.name, "colour": l.colour})).collect::<Vec<_>>(),
        "kinds": p.kinds.iter().map(|k| k.name()).collect::<Vec<_>>(),
        "blinded": p.blinded,
        "raters_per_case": p.raters_per_case,
        "max_upload_mib": p.max_upload_mib,
    })
}

async fn projects(State(state): State<Arc<AppState>>, User(who): User) -> Response {
    let r = work(&state, move |w| {
        let mut out = Vec::new();
        for p in w.projects().map_err(failed)? {
            if !reviews(&who)
                && !w
                    .assignments(&p.id)
                    .map_err(failed)?
                    .iter()
                    .any(|a| a.rater == who.user)
            {
                continue;
            }
            out.push(project_json(&p));
        }
        Ok(serde_json::json!({ "projects": out }))
    })
    .await;
    respond(r)
}

/// A NIfTI label map, gzipped, as the answer.
fn gzipped(bytes: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/gzip")], bytes).into_response()
}

fn respond(r: Result<serde_json::Value, Response>) -> Response {
    match r {
        Ok(v) => json(&v),
        Err(r) => r,
    }
}

async fn cases(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path(project): Path<String>,
) -> Response {
    respond(
        work(&state, move |w| {
            let p = w.project(&project).map_err(failed)?;
            let assignments = w.assignments(&project).map_err(failed)?;
            let versions = w.versions(&project, None).map_err(failed)?;
            let mut out = Vec::new();
            for c in w.cases(&project).map_err(failed)? {
                let of_case: Vec<&Assignment> = assignments
                    .iter()
                    .filter(|a| a.case_id == c.case_id && (reviews(&who) || a.rater == who.user))
                    .collect();
                if !reviews(&who) && of_case.is_empty() {
                    continue;
                }
                let consensus = versions
                    .iter()
                    .any(|v| v.case_id == c.case_id && v.rater == CONSENSUS_RATER);
                out.push(serde_json::json!({
                    "case": c.case_id, "modality": c.modality,
                    "assignments": of_case.iter().map(|a| serde_json::json!({
                        "rater": a.rater, "repeat": a.repeat, "state": a.state,
                        "with_proposal": a.with_proposal})).collect::<Vec<_>>(),
                    "consensus": reviews(&who).then_some(consensus),
                }));
            }
            Ok(serde_json::json!({ "project": project_json(&p), "cases": out }))
        })
        .await,
    )
}

async fn case(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path((project, case)): Path<(String, String)>,
) -> Response {
    respond(
        work(&state, move |w| {
            let Seen {
                access,
                project: p,
                case: c,
                grid,
            } = Access::of(w, &who, &project, &case)?;
            let versions: Vec<serde_json::Value> = w
                .versions(&project, Some(&case))
                .map_err(failed)?
                .iter()
                .filter(|v| access.sees(&who, v))
                .map(version_json)
                .collect();
            let assignments: Vec<serde_json::Value> = match &access {
                Access::All => w
                    .assignments(&project)
                    .map_err(failed)?
                    .into_iter()
                    .filter(|a| a.case_id == case)
                    .collect::<Vec<_>>(),
                Access::Own { assignments, .. } => assignments.clone(),
            }
            .iter()
            .map(|a| {
                serde_json::json!({"rater": a.rater, "repeat": a.repeat, "state": a.state,
                    "with_proposal": a.with_proposal})
            })
            .collect();
            let agreement = match access {
                Access::All => Some(w.case_agreement(&project, &case).map_err(failed)?),
                Access::Own { .. } => None,
            };
            Ok(serde_json::json!({
                "project": project_json(&p),
                "case": c.case_id, "modality": c.modality,
                "grid": {"shape": grid.shape, "spacing": grid.spacing(), "affine": grid.affine},
                "assignments": assignments,
                "versions": versions,
                "agreement": agreement,
            }))
        })
        .await,
    )
}

/// A byte range of a file of `len` bytes, from a `Range: bytes=…` header (one range).
fn byte_range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let v = headers.get(header::RANGE)?.to_str().ok()?;
    let spec = v.strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let r = match (a.trim(), b.trim()) {
        ("", suffix) => {
            let n: u64 = suffix.parse().ok()?;
            (len.saturating_sub(n), len.checked_sub(1)?)
        }
        (start, "") => (start.parse().ok()?, len.checked_sub(1)?),
        (start, end) => (start.parse().ok()?, end.parse::<u64>().ok()?.min(len - 1)),
    };
    Some(if r.0 <= r.1 && r.0 < len {
        Ok(r)
    } else {
        Err(())
    })
}

/// Stream `count` bytes of `file` from `start`, a MiB at a time off the async threads; a read
/// error ends the stream with that error.
fn stream_file(file: std::fs::File, start: u64, count: u64) -> Body {
    use std::io::{Read, Seek, SeekFrom};
    let state = (Some(file), start, count, false);
    let stream = futures_util::stream::unfold(state, |(file, at, left, sought)| async move {
        let mut f = file?;
        if left == 0 {
            return None;
        }
        let chunk = left.min(1 << 20) as usize;
        let read = tokio::task::spawn_blocking(move || {
            if !sought {
                f.seek(SeekFrom::Start(at))?;
            }
            let mut buf = vec![0u8; chunk];
            f.read_exact(&mut buf)?;
            Ok::<_, std::io::Error>((f, buf))
        })
        .await;
        match read {
            Ok(Ok((f, buf))) => Some((
                Ok(buf),
                (Some(f), at + chunk as u64, left - chunk as u64, true),
            )),
            Ok(Err(e)) => Some((Err(e), (None, at, 0, true))),
            Err(_) => None,
        }
    });
    Body::from_stream(stream)
}

/// The case image file, opened, for a user who may see the case.
async fn case_image(
    state: &Arc<AppState>,
    who: Principal,
    project: String,
    case: String,
) -> Result<std::fs::File, Response> {
    let path = work(state, move |w| {
        let seen = Access::of(w, &who, &project, &case)?;
        Ok(w.image_path(&seen.case))
    })
    .await?;
    std::fs::File::open(&path).map_err(|_| {
        tracing::error!(path = %path.display(), "case image missing");
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the case image is missing; run `fedcurate-node annotate cases` to rebuild it",
        )
    })
}

/// The case image as NIfTI, the stored gzip sent as `Content-Encoding: gzip`: the browser
/// inflates it natively while it arrives (what the viewer loads; no byte ranges, which would
/// count the encoded bytes).
async fn image_inflated(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path((project, case)): Path<(String, String)>,
) -> Response {
    let file = match case_image(&state, who, project, case).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = Response::new(stream_file(file, 0, len));
    let h = r.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}

/// The case image as stored (NIfTI, gzipped), with byte ranges.
async fn image(
    State(state): State<Arc<AppState>>,
    User(who): User,
    headers: HeaderMap,
    Path((project, case)): Path<(String, String)>,
) -> Response {
    let file = match case_image(&state, who, project, case).await {
        Ok(f) => f,
        Err(r) => return r,
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = match byte_range(&headers, len) {
        None => {
            let mut r = Response::new(stream_file(file, 0, len));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        Some(Ok((a, b))) => {
            let mut r = Response::new(stream_file(file, a, b - a + 1));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            r
        }
        Some(Err(())) => {
            let mut r = error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "the range is outside the image",
            );
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return r;
        }
    };
    let h = r.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/gzip"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-store"),
    );
    r
}

/// What a save says besides the label map.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SaveMeta {
    /// `save`, `accept`, `modify`, `reject` or `adjudicate`.
    action: String,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default)]
    content: Content,
    /// The proposal acted on (`accept`, `modify`, `reject`).
    #[serde(default)]
    proposal: Option<i64>,
    /// The version this one continues.
    #[serde(default)]
    parent: Option<i64>,
    /// Where an adjudication started: `edit`, `majority-vote`, `multi-label-staple`.
    #[serde(default)]
    start: Option<String>,
}

/// Read the multipart body: `meta` (JSON) and an optional `mask` (NIfTI), refusing more than
/// `limit` bytes in all.
async fn read_upload(
    mut form: Multipart,
    limit: u64,
) -> Result<(SaveMeta, Option<Vec<u8>>), Response> {
    let mut meta = None;
    let mut mask = None;
    let mut total = 0u64;
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(error(StatusCode::BAD_REQUEST, &e.body_text())),
        };
        let name = field.name().unwrap_or_default().to_owned();
        let mut field = field;
        let mut bytes = Vec::new();
        loop {
            match field.chunk().await {
                Ok(Some(c)) => {
                    total += c.len() as u64;
                    if total > limit {
                        return Err(error(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            &format!(
                                "the upload is larger than this project's limit of {} MiB",
                                limit >> 20
                            ),
                        ));
                    }
                    bytes.extend_from_slice(&c);
                }
                Ok(None) => break,
                Err(e) => return Err(error(StatusCode::BAD_REQUEST, &e.body_text())),
            }
        }
        match name.as_str() {
            "meta" => meta = Some(bytes),
            "mask" => mask = Some(bytes),
            other => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("unknown part {other:?}: send `meta` and optionally `mask`"),
                ));
            }
        }
    }
    let meta = meta.ok_or_else(|| error(StatusCode::BAD_REQUEST, "the `meta` part is missing"))?;
    let meta: SaveMeta = serde_json::from_slice(&meta)
        .map_err(|e| error(StatusCode::BAD_REQUEST, &format!("the `meta` part: {e}")))?;
    Ok((meta, mask.filter(|m| !m.is_empty())))
}

async fn save(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path((project, case)): Path<(String, String)>,
    form: Multipart,
) -> Response {
    let limit = {
        let (project, who, case) = (project.clone(), who.clone(), case.clone());
        match work(&state, move |w| {
            Ok(Access::of(w, &who, &project, &case)?.project.max_upload_mib << 20)
        })
        .await
        {
            Ok(l) => l,
            Err(r) => return r,
        }
    };
    let (meta, mask) = match read_upload(form, limit).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    respond(
        work(&state, move |w| {
            let mask = match mask {
                Some(b) => Some(LabelMap::from_nifti(&b).map_err(|e| {
                    error(StatusCode::UNPROCESSABLE_ENTITY, &format!("the label map: {e}"))
                })?),
                None => None,
            };
            let access = Access::of(w, &who, &project, &case)?.access;
            let id = if meta.action == "adjudicate" {
                if !reviews(&who) {
                    return Err(forbidden("only reviewers adjudicate"));
                }
                let start = meta.start.as_deref().unwrap_or("edit");
                if !matches!(start, "edit" | "majority-vote" | "multi-label-staple") {
                    return Err(error(
                        StatusCode::BAD_REQUEST,
                        "start is edit, majority-vote or multi-label-staple",
                    ));
                }
                w.adjudicate(
                    &project,
                    &case,
                    &who.user,
                    start,
                    &meta.content,
                    mask.as_ref(),
                    meta.parent,
                )
                .map_err(failed)?
            } else {
                // Raters save as themselves, against an assignment of theirs.
                let mine: Vec<Assignment> = match access {
                    Access::Own { assignments, .. } => assignments,
                    Access::All => w
                        .assignments(&project)
                        .map_err(failed)?
                        .into_iter()
                        .filter(|a| a.case_id == case && a.rater == who.user)
                        .collect(),
                };
                let repeat = meta.repeat.unwrap_or(1);
                let Some(a) = mine.iter().find(|a| a.repeat == repeat) else {
                    return Err(forbidden(&format!(
                        "you have no assignment {repeat} of case {case}"
                    )));
                };
                if let Some(parent) = meta.parent {
                    let pv = w.load(parent).map_err(failed)?;
                    if pv.version.rater != who.user || pv.version.case_id != case {
                        return Err(forbidden("a version continues only your own work"));
                    }
                }
                match meta.action.as_str() {
                    "save" => w
                        .save(
                            &project,
                            &case,
                            &who.user,
                            repeat,
                            &meta.content,
                            mask.as_ref(),
                            Source::Manual,
                            meta.parent,
                            None,
                        )
                        .map_err(failed)?,
                    action @ ("accept" | "modify" | "reject") => {
                        if !a.with_proposal {
                            return Err(forbidden(
                                "this assignment is served without the model's proposal",
                            ));
                        }
                        let Some(proposal) = meta.proposal else {
                            return Err(error(StatusCode::BAD_REQUEST, "name the proposal"));
                        };
                        let pv = w.load(proposal).map_err(failed)?;
                        if pv.version.case_id != case || pv.version.project != project {
                            return Err(forbidden("the proposal belongs to another case"));
                        }
                        let review = match action {
                            "accept" => Review::Accept,
                            "reject" => Review::Reject,
                            _ => Review::Modify(Box::new(meta.content), mask.map(Box::new)),
                        };
                        w.review(proposal, &who.user, repeat, review)
                            .map_err(failed)?
                    }
                    other => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            &format!(
                                "unknown action {other:?}: save, accept, modify, reject or adjudicate"
                            ),
                        ));
                    }
                }
            };
            tracing::info!(user = %who.user, project = %project, case = %case, version = id, "annotation saved");
            Ok(serde_json::json!({ "id": id }))
        })
        .await,
    )
}

async fn consensus_start(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path((project, case, method)): Path<(String, String, String)>,
) -> Response {
    if !reviews(&who) {
        return forbidden("only reviewers adjudicate");
    }
    let method = match method.as_str() {
        "majority-vote" => ConsensusMethod::Majority,
        "multi-label-staple" => ConsensusMethod::Staple,
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "method is majority-vote or multi-label-staple",
            );
        }
    };
    let r = work(&state, move |w| {
        let Some((map, parent)) = w.case_consensus(&project, &case, method).map_err(failed)? else {
            return Err(error(
                StatusCode::CONFLICT,
                "the case needs at least two raters' masks",
            ));
        };
        let bytes = map.to_nifti_gz().map_err(|e| {
            tracing::error!(error = %e, "encoding a consensus");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the consensus failed",
            )
        })?;
        Ok((bytes, parent))
    })
    .await;
    match r {
        Ok((bytes, parent)) => {
            let mut r = gzipped(bytes);
            r.headers_mut()
                .insert("x-fedcurate-parent", HeaderValue::from(parent));
            r
        }
        Err(r) => r,
    }
}

#[derive(Deserialize)]
struct ReturnRequest {
    rater: String,
    #[serde(default = "one")]
    repeat: u32,
    #[serde(default)]
    reason: String,
}

fn one() -> u32 {
    1
}

async fn body_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, 1 << 20)
        .await
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "the request is too large"))?;
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, &e.to_string()))
}

async fn return_case(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path((project, case)): Path<(String, String)>,
    body: Body,
) -> Response {
    if !reviews(&who) {
        return forbidden("only reviewers return cases");
    }
    let req: ReturnRequest = match body_json(body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    respond(
        work(&state, move |w| {
            w.return_case(
                &project,
                &case,
                &req.rater,
                req.repeat,
                &who.user,
                &req.reason,
            )
            .map_err(failed)?;
            Ok(serde_json::json!({"returned": true}))
        })
        .await,
    )
}

async fn create_project(
    State(state): State<Arc<AppState>>,
    Admin(who): Admin,
    body: Body,
) -> Response {
    let p: Project = match body_json(body).await {
        Ok(p) => p,
        Err(r) => return r,
    };
    respond(
        work(&state, move |w| {
            let n = w.create_project(&p).map_err(failed)?;
            tracing::info!(user = %who.user, project = %p.id, cases = n, "project created");
            Ok(serde_json::json!({"project": p.id, "cases": n}))
        })
        .await,
    )
}

#[derive(Deserialize)]
struct AssignRequest {
    raters: Vec<String>,
}

async fn assign(
    State(state): State<Arc<AppState>>,
    _: Admin,
    Path(project): Path<String>,
    body: Body,
) -> Response {
    let req: AssignRequest = match body_json(body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    respond(
        work(&state, move |w| {
            let n = w.assign(&project, &req.raters).map_err(failed)?;
            Ok(serde_json::json!({"assigned": n}))
        })
        .await,
    )
}

async fn status(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path(project): Path<String>,
) -> Response {
    if !reviews(&who) {
        return forbidden("only reviewers and admins see a project's status");
    }
    respond(
        work(&state, move |w| {
            let s = w.status(&project).map_err(failed)?;
            serde_json::to_value(s)
                .map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
        })
        .await,
    )
}

async fn export(
    State(state): State<Arc<AppState>>,
    Admin(who): Admin,
    Path(project): Path<String>,
) -> Response {
    let Some(root) = state.export_dir() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no export folder is configured",
        );
    };
    respond(
        work(&state, move |w| {
            let stamp = fc_store::audit::utc_now().replace([':', '-'], "");
            let out = root.join(format!("{project}-{stamp}"));
            let n = w.export(&project, &out, false, None).map_err(failed)?;
            tracing::info!(user = %who.user, project = %project, versions = n, "annotations exported");
            Ok(serde_json::json!({"versions": n, "folder": out}))
        })
        .await,
    )
}

async fn version(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path(id): Path<i64>,
) -> Response {
    respond(
        work(&state, move |w| {
            let l = visible_version(w, &who, id)?;
            let mut v = version_json(&l.version);
            v["content"] = serde_json::to_value(&l.content).unwrap_or_default();
            Ok(v)
        })
        .await,
    )
}

/// A version the user may see (the same "not found" whether it exists or is hidden).
fn visible_version(
    w: &Annotations,
    who: &Principal,
    id: i64,
) -> Result<fc_annotation::Loaded, Response> {
    let hidden = || error(StatusCode::NOT_FOUND, &format!("no version {id} for you"));
    let l = w.load(id).map_err(|e| match e {
        AnnotationError::NotFound(_) => hidden(),
        other => failed(other),
    })?;
    let seen = Access::of(w, who, &l.version.project, &l.version.case_id).map_err(|_| hidden())?;
    if !seen.access.sees(who, &l.version) {
        return Err(hidden());
    }
    Ok(l)
}

async fn mask(
    State(state): State<Arc<AppState>>,
    User(who): User,
    Path(id): Path<i64>,
) -> Response {
    let r = work(&state, move |w| {
        let l = visible_version(w, &who, id)?;
        w.mask_bytes(&l.version)
            .map_err(failed)?
            .ok_or_else(|| error(StatusCode::NOT_FOUND, "this version has no label map"))
    })
    .await;
    r.map_or_else(|r| r, gzipped)
}

async fn users(State(state): State<Arc<AppState>>, _: Admin) -> Response {
    match state.users() {
        Ok(u) => json(&serde_json::json!({ "users": u })),
        Err(r) => r,
    }
}
