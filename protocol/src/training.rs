//! Federated training: the job document a coordinator publishes, the model layout (a
//! safetensors header reduced to tensor names, dtypes and shapes), the one fixed-point
//! encoding of plain and secure rounds, chunking, and the checks both ends run on a trainer's
//! update.
//!
//! Only numbers cross the wire for a round: an update is the data section of a safetensors
//! file whose header equals the job's layout, encoded as fixed-point words modulo 2^64 (the
//! site's weight as one more word), in content-hashed chunks. The job document is the
//! consortium's own text (tensor names it chose, numeric parameters), like the schema.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids::SiteId;

/// SHA-256 of a training job document.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobHash(pub [u8; 32]);

impl JobHash {
    pub fn hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for JobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobHash({}…)", &self.hex()[..12])
    }
}

/// SHA-256 of one chunk's bytes.
pub type ChunkHash = [u8; 32];

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut h = [0u8; 32];
    h.copy_from_slice(d.as_ref());
    h
}

/// Element types a layout may hold (floating point only: buffers such as batch-norm counters
/// are not averaged and stay out of the layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    F64,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "F32" => Some(Dtype::F32),
            "F64" => Some(Dtype::F64),
            _ => None,
        }
    }
}

/// One tensor of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
}

impl TensorSpec {
    pub fn dtype(&self) -> Result<Dtype, JobError> {
        Dtype::parse(&self.dtype).ok_or_else(|| {
            JobError(format!(
                "tensor {:?} has dtype {:?}; a layout holds F32 or F64 tensors only (leave integer buffers out of the model)",
                self.name, self.dtype
            ))
        })
    }

    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A job or layout that does not validate; the message names the field and the fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("training job: {0}")]
pub struct JobError(pub String);

/// Why a trainer's update was refused (sent back to the trainer word for word).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum UpdateError {
    #[error("the update is not a safetensors file: {0}")]
    NotSafetensors(String),
    #[error(
        "the update's header carries __metadata__; write the tensors only (no text leaves the site)"
    )]
    Metadata,
    #[error("the update's tensors differ from the job's layout: {0}")]
    Layout(String),
    #[error("the update holds a value that is not finite (NaN or infinity) in tensor {0:?}")]
    NotFinite(String),
    #[error("the update's L2 norm {norm:.6} exceeds the job's bound {bound}")]
    TooLarge { norm: f64, bound: f64 },
    #[error("the sample count {0} is outside 1..={1}")]
    Samples(u64, u64),
}

/// The model's tensors in the order of their data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub tensors: Vec<TensorSpec>,
}

const MAX_HEADER: u64 = 16 * 1024 * 1024;
const MAX_TENSORS: usize = 100_000;

impl Layout {
    /// Number of parameters.
    pub fn params(&self) -> u64 {
        self.tensors.iter().map(TensorSpec::elements).sum()
    }

    /// Bytes of the data section.
    pub fn data_len(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.elements() * t.dtype().map_or(4, Dtype::size) as u64)
            .sum()
    }

    /// Check the names, dtypes and shapes.
    pub fn validate(&self) -> Result<(), JobError> {
        if self.tensors.is_empty() {
            return Err(JobError("the layout holds no tensor".into()));
        }
        if self.tensors.len() > MAX_TENSORS {
            return Err(JobError(format!("more than {MAX_TENSORS} tensors")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.tensors {
            t.dtype()?;
            let ok = (1..=256).contains(&t.name.len())
                && t.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-/:".contains(&b));
            if !ok {
                return Err(JobError(format!(
                    "tensor name {:?}: 1-256 characters of A-Z, a-z, 0-9 and _ . - / :",
                    t.name
                )));
            }
            if t.name == "__metadata__" || !seen.insert(t.name.as_str()) {
                return Err(JobError(format!(
                    "tensor name {:?} is reserved or repeated",
                    t.name
                )));
            }
            if t.shape.len() > 8 || t.shape.contains(&0) {
                return Err(JobError(format!(
                    "tensor {:?}: shapes have 0-8 dimensions, none of size 0",
                    t.name
                )));
            }
            if t.shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .is_none_or(|n| n > 1 << 34)
            {
                return Err(JobError(format!("tensor {:?} is too large", t.name)));
            }
        }
        if self
            .tensors
            .iter()
            .any(|t| t.dtype != self.tensors[0].dtype)
        {
            return Err(JobError(
                "every tensor of a layout has the same dtype (convert the model to one)".into(),
            ));
        }
        if self.params() > 1 << 34 {
            return Err(JobError("the model has more than 2^34 parameters".into()));
        }
        Ok(())
    }

    /// Read a safetensors file's header: the layout in data order and where the data starts.
    pub fn from_safetensors(bytes: &[u8]) -> Result<(Layout, usize), UpdateError> {
        let (header, start) = header_json(bytes)?;
        let serde_json::Value::Object(map) = header else {
            return Err(UpdateError::NotSafetensors(
                "the header is not an object".into(),
            ));
        };
        let mut tensors = Vec::new();
        for (name, v) in map {
            if name == "__metadata__" {
                return Err(UpdateError::Metadata);
            }
            let dtype = v
                .get("dtype")
                .and_then(|d| d.as_str())
                .ok_or_else(|| UpdateError::NotSafetensors(format!("{name}: no dtype")))?
                .to_owned();
            let shape: Vec<u64> = v
                .get("shape")
                .and_then(|s| s.as_array())
                .ok_or_else(|| UpdateError::NotSafetensors(format!("{name}: no shape")))?
                .iter()
                .map(|d| d.as_u64())
                .collect::<Option<_>>()
                .ok_or_else(|| UpdateError::NotSafetensors(format!("{name}: bad shape")))?;
            let offsets: Vec<u64> = v
                .get("data_offsets")
                .and_then(|s| s.as_array())
                .map(|a| a.iter().filter_map(|d| d.as_u64()).collect())
                .unwrap_or_default();
            if offsets.len() != 2 {
                return Err(UpdateError::NotSafetensors(format!(
                    "{name}: bad data_offsets"
                )));
            }
            tensors.push((offsets[0], offsets[1], TensorSpec { name, dtype, shape }));
        }
        tensors.sort_by_key(|t| t.0);
        let mut at = 0u64;
        for (begin, end, t) in &tensors {
            let size = Dtype::parse(&t.dtype).map_or(0, Dtype::size) as u64;
            let want = t.elements().checked_mul(size);
            if *begin != at || want.is_none_or(|w| end.checked_sub(*begin) != Some(w)) {
                return Err(UpdateError::NotSafetensors(format!(
                    "{}: data offsets are not contiguous or do not match the shape",
                    t.name
                )));
            }
            at = *end;
        }
        if (bytes.len() - start) as u64 != at {
            return Err(UpdateError::NotSafetensors(format!(
                "the data section holds {} bytes, the header declares {at}",
                bytes.len() - start
            )));
        }
        let layout = Layout {
            tensors: tensors.into_iter().map(|t| t.2).collect(),
        };
        Ok((layout, start))
    }

    /// Check a trainer's file against this layout: the same tensors (names, dtypes, shapes,
    /// order), no metadata. Returns where the data section starts.
    pub fn check_file(&self, bytes: &[u8]) -> Result<usize, UpdateError> {
        let (got, start) = Layout::from_safetensors(bytes)?;
        if got.tensors.len() != self.tensors.len() {
            return Err(UpdateError::Layout(format!(
                "{} tensors, the job has {}",
                got.tensors.len(),
                self.tensors.len()
            )));
        }
        for (g, w) in got.tensors.iter().zip(&self.tensors) {
            if g != w {
                return Err(UpdateError::Layout(format!(
                    "found {} {} {:?} where the job has {} {} {:?}",
                    g.name, g.dtype, g.shape, w.name, w.dtype, w.shape
                )));
            }
        }
        Ok(start)
    }

    /// A safetensors header (with its length prefix) for this layout, tensors in this order.
    pub fn safetensors_header(&self) -> Vec<u8> {
        let mut map = serde_json::Map::new();
        let mut at = 0u64;
        for t in &self.tensors {
            let n = t.elements() * t.dtype().map_or(4, Dtype::size) as u64;
            map.insert(
                t.name.clone(),
                serde_json::json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [at, at + n]}),
            );
            at += n;
        }
        let mut json = serde_json::Value::Object(map).to_string().into_bytes();
        while !json.len().is_multiple_of(8) {
            json.push(b' ');
        }
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out
    }

    /// The values of a data section as `f64`, in order (the section has been checked; every
    /// tensor of a layout has the same dtype, so the section is one flat array).
    pub fn values<'a>(&self, data: &'a [u8]) -> Values<'a> {
        match self.tensors.first().and_then(|t| t.dtype().ok()) {
            Some(Dtype::F64) => Values::F64(data.chunks_exact(8)),
            _ => Values::F32(data.chunks_exact(4)),
        }
    }

    /// The name of the tensor holding parameter `i`.
    pub fn tensor_of(&self, mut i: u64) -> &str {
        for t in &self.tensors {
            if i < t.elements() {
                return &t.name;
            }
            i -= t.elements();
        }
        ""
    }
}

/// The values of a data section (see [`Layout::values`]).
#[derive(Debug)]
pub enum Values<'a> {
    F32(std::slice::ChunksExact<'a, u8>),
    F64(std::slice::ChunksExact<'a, u8>),
}

impl Iterator for Values<'_> {
    type Item = f64;

    #[inline]
    fn next(&mut self) -> Option<f64> {
        match self {
            Values::F32(it) => it
                .next()
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Values::F64(it) => it
                .next()
                .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Values::F32(it) | Values::F64(it) => it.size_hint(),
        }
    }
}

fn header_json(bytes: &[u8]) -> Result<(serde_json::Value, usize), UpdateError> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        .ok_or_else(|| UpdateError::NotSafetensors("shorter than 8 bytes".into()))?;
    if len > MAX_HEADER || 8 + len > bytes.len() as u64 {
        return Err(UpdateError::NotSafetensors(format!(
            "header length {len} does not fit the file"
        )));
    }
    let start = 8 + len as usize;
    let v: serde_json::Value = serde_json::from_slice(&bytes[8..start])
        .map_err(|e| UpdateError::NotSafetensors(format!("header: {e}")))?;
    Ok((v, start))
}

/// How the server turns the averaged update into the next global model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// x ← x + η·Δ̄ (η = 1: McMahan et al. 2017).
    #[default]
    FedAvg,
    /// v ← β·v + Δ̄; x ← x + η·v (Hsu et al. 2019).
    FedAvgM,
    /// Reddi et al. 2021, Algorithm 2: m ← β1·m + (1−β1)·Δ̄, and v ← v + Δ̄² (Adagrad),
    /// v ← β2·v + (1−β2)·Δ̄² (Adam), v ← v − (1−β2)·Δ̄²·sign(v − Δ̄²) (Yogi);
    /// x ← x + η·m / (√v + τ). No bias correction; m starts at 0, v at τ².
    FedAdagrad,
    FedAdam,
    FedYogi,
}

/// The aggregator and its parameters (defaults by method, see [`Aggregator::resolved`]).
#[derive(Clone, Debug, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregator {
    #[serde(default)]
    pub method: Method,
    pub server_learning_rate: Option<f64>,
    pub momentum: Option<f64>,
    pub beta1: Option<f64>,
    pub beta2: Option<f64>,
    pub tau: Option<f64>,
}

/// Every parameter of the aggregator with the method's defaults filled in.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Resolved {
    pub method: Method,
    pub eta: f64,
    pub momentum: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub tau: f64,
}

impl Aggregator {
    /// Defaults: FedAvg η = 1; FedAvgM η = 1, β = 0.9; FedAdagrad, FedAdam, FedYogi η = 0.01,
    /// β1 = 0.9, β2 = 0.99, τ = 1e-3.
    pub fn resolved(&self) -> Resolved {
        let adaptive = matches!(
            self.method,
            Method::FedAdagrad | Method::FedAdam | Method::FedYogi
        );
        Resolved {
            method: self.method,
            eta: self
                .server_learning_rate
                .unwrap_or(if adaptive { 0.01 } else { 1.0 }),
            momentum: self.momentum.unwrap_or(0.9),
            beta1: self.beta1.unwrap_or(0.9),
            beta2: self.beta2.unwrap_or(0.99),
            tau: self.tau.unwrap_or(1e-3),
        }
    }

    /// Words of server state per parameter (momentum; first and second moments).
    pub fn state_words(&self) -> usize {
        match self.method {
            Method::FedAvg => 0,
            Method::FedAvgM => 1,
            Method::FedAdagrad | Method::FedAdam | Method::FedYogi => 2,
        }
    }
}

/// Differential privacy of a job: each site clips its update to `clip_norm` (L2) and, under
/// secure aggregation, adds discrete Gaussian noise of variance (z·C)²/n in fixed-point units
/// so that the sum carries noise of standard deviation z·C.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingPrivacy {
    pub clip_norm: f64,
    pub noise_multiplier: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
}

fn default_delta() -> f64 {
    1e-5
}

/// How sites' updates are weighted in the average.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weighting {
    /// By the training samples each site reports (FedAvg).
    #[default]
    Samples,
    /// Every site the same (forced under differential privacy).
    Uniform,
}

/// A training job as the coordinator publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingJob {
    pub id: String,
    pub rounds: u32,
    pub min_sites: u32,
    #[serde(default = "default_deadline")]
    pub round_deadline_seconds: u64,
    #[serde(default)]
    pub secure_aggregation: bool,
    #[serde(default)]
    pub weighting: Weighting,
    /// Largest L2 norm of an update (model after minus model before) a site may send.
    pub max_update_norm: f64,
    /// Largest sample count a site may report.
    #[serde(default = "default_max_samples")]
    pub max_samples: u64,
    /// Fixed point: values are scaled by 2^bits.
    #[serde(default = "default_bits")]
    pub fixed_point_bits: u32,
    /// Chunk size of transfers, in MiB.
    #[serde(default = "default_chunk")]
    pub chunk_mib: u32,
    /// Names of the numeric metrics sites may report each round.
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default)]
    pub aggregator: Aggregator,
    /// Parameters for the trainer (e.g. `fedprox_mu`, `local_epochs`, `learning_rate`).
    #[serde(default)]
    pub trainer: BTreeMap<String, f64>,
    #[serde(default)]
    pub privacy: Option<TrainingPrivacy>,
    pub layout: Vec<TensorSpec>,
}

fn default_deadline() -> u64 {
    3600
}
fn default_max_samples() -> u64 {
    1_000_000
}
fn default_bits() -> u32 {
    24
}
fn default_chunk() -> u32 {
    4
}

/// Most metrics a job may name.
pub const MAX_METRICS: usize = 32;

impl TrainingJob {
    pub fn layout(&self) -> Layout {
        Layout {
            tensors: self.layout.clone(),
        }
    }

    pub fn validate(&self) -> Result<(), JobError> {
        let slug = |s: &str| {
            (1..=64).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        };
        if !slug(&self.id) {
            return Err(JobError("id: 1-64 characters of a-z, 0-9, - and _".into()));
        }
        if !(1..=100_000).contains(&self.rounds) {
            return Err(JobError("rounds: between 1 and 100000".into()));
        }
        let floor = if self.secure_aggregation { 3 } else { 2 };
        if self.min_sites < floor {
            return Err(JobError(format!(
                "min_sites: at least {floor} (an average over fewer sites is one site's update{})",
                if self.secure_aggregation {
                    "; a secure sum of two lets each learn the other's"
                } else {
                    ""
                }
            )));
        }
        if self.round_deadline_seconds < 10 {
            return Err(JobError("round_deadline_seconds: at least 10".into()));
        }
        if !(self.max_update_norm.is_finite() && self.max_update_norm > 0.0) {
            return Err(JobError("max_update_norm: a positive number".into()));
        }
        if !(1..=1 << 40).contains(&self.max_samples) {
            return Err(JobError("max_samples: between 1 and 2^40".into()));
        }
        if !(8..=40).contains(&self.fixed_point_bits) {
            return Err(JobError("fixed_point_bits: between 8 and 40".into()));
        }
        if !(1..=8).contains(&self.chunk_mib) {
            return Err(JobError("chunk_mib: between 1 and 8".into()));
        }
        // The sum of 1024 sites' largest contributions must not wrap around 2^63.
        let weight = match self.effective_weighting() {
            Weighting::Samples => self.max_samples as f64,
            Weighting::Uniform => 1.0,
        };
        let bound = weight * self.max_update_norm * 2f64.powi(self.fixed_point_bits as i32);
        if bound * 1024.0 >= 2f64.powi(62) {
            return Err(JobError(format!(
                "max_samples × max_update_norm × 2^fixed_point_bits = {bound:e} is too large for a 64-bit sum of 1024 sites; lower one of them"
            )));
        }
        if self.metrics.len() > MAX_METRICS || self.metrics.iter().any(|m| !slug(m)) {
            return Err(JobError(format!(
                "metrics: at most {MAX_METRICS} names of a-z, 0-9, - and _"
            )));
        }
        if self.trainer.len() > 64 || self.trainer.keys().any(|m| !slug(m)) {
            return Err(JobError(
                "trainer: at most 64 numeric parameters named with a-z, 0-9, - and _".into(),
            ));
        }
        if self.trainer.values().any(|v| !v.is_finite()) {
            return Err(JobError(
                "trainer: parameters must be finite numbers".into(),
            ));
        }
        let r = self.aggregator.resolved();
        let unit = |x: f64| (0.0..1.0).contains(&x);
        let ok = r.eta.is_finite()
            && r.eta > 0.0
            && unit(r.momentum)
            && unit(r.beta1)
            && unit(r.beta2)
            && r.tau.is_finite()
            && r.tau > 0.0;
        if !ok {
            return Err(JobError(
                "aggregator: server_learning_rate and tau positive; momentum, beta1, beta2 in [0, 1)"
                    .into(),
            ));
        }
        if let Some(p) = &self.privacy
            && !(p.clip_norm.is_finite()
                && p.clip_norm > 0.0
                && p.clip_norm <= self.max_update_norm
                && p.noise_multiplier.is_finite()
                && p.noise_multiplier > 0.0
                && p.delta > 0.0
                && p.delta < 1.0)
        {
            return Err(JobError(
                "privacy: clip_norm positive and at most max_update_norm, noise_multiplier positive, delta in (0, 1)".into(),
            ));
        }
        self.layout().validate()
    }

    /// Uniform under differential privacy (a sample-weighted sum's sensitivity would depend on
    /// the site's count), else as configured.
    pub fn effective_weighting(&self) -> Weighting {
        if self.privacy.is_some() {
            Weighting::Uniform
        } else {
            self.weighting
        }
    }

    /// Words of an update vector: one per parameter and the weight.
    pub fn vector_words(&self) -> u64 {
        self.layout().params() + 1
    }

    /// Words per update chunk.
    pub fn chunk_words(&self) -> u64 {
        u64::from(self.chunk_mib) * 1024 * 1024 / 8
    }

    /// Chunks of an update.
    pub fn update_chunks(&self) -> u32 {
        self.vector_words().div_ceil(self.chunk_words()) as u32
    }

    /// Bytes per chunk of a global model's data section.
    pub fn model_chunk_bytes(&self) -> u64 {
        u64::from(self.chunk_mib) * 1024 * 1024
    }

    pub fn model_chunks(&self) -> u32 {
        self.layout()
            .data_len()
            .div_ceil(self.model_chunk_bytes())
            .max(1) as u32
    }

    pub fn scale(&self) -> f64 {
        2f64.powi(self.fixed_point_bits as i32)
    }
}

/// A training job as distributed: its TOML text, accepted only if it parses and validates,
/// on both ends.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobDocument(String);

impl JobDocument {
    pub fn new(text: &str) -> Result<Self, JobError> {
        let job: TrainingJob =
            toml::from_str(text).map_err(|e| JobError(format!("does not parse: {e}")))?;
        job.validate()?;
        Ok(JobDocument(text.to_owned()))
    }

    pub fn text(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> JobHash {
        JobHash(sha256(self.0.as_bytes()))
    }

    /// The parsed job (valid by construction).
    pub fn job(&self) -> Result<TrainingJob, JobError> {
        toml::from_str(&self.0).map_err(|e| JobError(e.to_string()))
    }
}

impl<'de> Deserialize<'de> for JobDocument {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        JobDocument::new(&s).map_err(|_| serde::de::Error::custom("invalid training job"))
    }
}

/// Fixed point: `x·2^bits` rounded down after adding `u` in [0, 1) (stochastic rounding when
/// `u` is uniform), as a two's-complement word.
#[inline]
pub fn to_fixed(x: f64, scale: f64, u: f64) -> u64 {
    floor_i64(x * scale + u) as u64
}

/// ⌊v⌋ without a call into libm (the baseline x86-64 target has no rounding instruction).
#[inline]
fn floor_i64(v: f64) -> i64 {
    let t = v as i64;
    if (t as f64) > v { t - 1 } else { t }
}

/// A sum of fixed-point words back to a number.
pub fn from_fixed(word: u64, scale: f64) -> f64 {
    (word as i64) as f64 / scale
}

/// What phase a round is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Fewer than `min_sites` sites have joined the job.
    Joining,
    /// Updates are being collected from the round's participants.
    Collecting,
    /// Every round ran; the last global model is final.
    Finished,
}

/// The job's state as a site sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundState {
    pub id: crate::ids::MessageId,
    pub reply_to: crate::ids::MessageId,
    pub job: JobHash,
    pub phase: Phase,
    /// The round being collected (1-based); the global model it starts from is revision
    /// `round - 1` (0: the initial model).
    pub round: u32,
    /// Increases when a secure round restarts without a site that missed the deadline.
    pub attempt: u32,
    pub participants: Vec<SiteId>,
    /// Sites that joined the job.
    pub joined: Vec<SiteId>,
    /// Under secure aggregation: the sites whose signed keys the pairwise masks use.
    pub keyed: Vec<SiteId>,
    /// The latest global model: its revision and the hashes of its data chunks.
    pub revision: u32,
    pub model: Vec<ChunkHash>,
    /// This site's update chunks the coordinator holds for this round and attempt.
    pub have: Vec<u32>,
    /// Sites whose update for this round is complete.
    pub complete: Vec<SiteId>,
}

/// A site's update for a round: the hashes of its chunks (sent first, so a restarted transfer
/// sends only what is missing) and its metrics (the job's names, in order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpdateOffer {
    pub id: crate::ids::MessageId,
    pub job: JobHash,
    pub round: u32,
    pub attempt: u32,
    pub chunks: Vec<ChunkHash>,
    pub metrics: Vec<f64>,
    /// The site clipped and noised the update (its own privacy ledger recorded it).
    pub noised: bool,
}

/// Which chunk a chunk frame carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkHead {
    pub id: crate::ids::MessageId,
    pub job: JobHash,
    /// The round (updates) or the model revision (global models).
    pub round: u32,
    pub attempt: u32,
    pub index: u32,
}

/// A chunk of an update (node to coordinator) or of a global model (coordinator to node):
/// little-endian words, or the model's data bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub head: ChunkHead,
    pub data: Vec<u8>,
    /// SHA-256 of `data`, computed by the receiver before it takes a lock (never on the
    /// wire: the frame carries the head and the data only).
    #[serde(skip)]
    pub digest: Option<ChunkHash>,
}

impl fmt::Debug for Chunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("head", &self.head)
            .field("bytes", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn example_job() -> String {
        r#"
id = "digits-mlp"
rounds = 5
min_sites = 3
max_update_norm = 100.0
metrics = ["loss", "accuracy"]

[aggregator]
method = "fedadam"

[trainer]
learning_rate = 0.1
fedprox_mu = 0.01

[[layout]]
name = "w1"
dtype = "F32"
shape = [64, 32]

[[layout]]
name = "b1"
dtype = "F32"
shape = [32]
"#
        .to_owned()
    }

    #[test]
    fn a_valid_job_parses_and_bad_ones_say_why() {
        let doc = JobDocument::new(&example_job()).expect("valid");
        let job = doc.job().expect("job");
        assert_eq!(job.layout().params(), 64 * 32 + 32);
        assert_eq!(job.aggregator.resolved().eta, 0.01);
        for (from, to, says) in [
            ("min_sites = 3", "min_sites = 1", "min_sites"),
            (
                "dtype = \"F32\"\nshape = [32]",
                "dtype = \"I64\"\nshape = [32]",
                "integer buffers",
            ),
            ("name = \"b1\"", "name = \"w1\"", "repeated"),
            (
                "max_update_norm = 100.0",
                "max_update_norm = 1e12",
                "too large for a 64-bit sum",
            ),
            ("[aggregator]", "[aggregator]\nbeta1 = 1.5", "beta1"),
        ] {
            let text = example_job().replace(from, to);
            let e = JobDocument::new(&text).expect_err(says);
            assert!(e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn safetensors_round_trip_and_refusals() {
        let job = JobDocument::new(&example_job())
            .expect("valid")
            .job()
            .expect("job");
        let layout = job.layout();
        let mut file = layout.safetensors_header();
        let n = layout.params() as usize;
        for i in 0..n {
            file.extend_from_slice(&(i as f32).to_le_bytes());
        }
        let start = layout.check_file(&file).expect("fits");
        let v: Vec<f64> = layout.values(&file[start..]).collect();
        assert_eq!(v.len(), n);
        assert_eq!(v[n - 1], (n - 1) as f64);
        // Metadata is refused, and so is a shape the job does not have.
        let with_meta = {
            let mut h = serde_json::json!({"__metadata__": {"who": "x"}});
            h["b1"] = serde_json::json!({"dtype":"F32","shape":[32],"data_offsets":[0,128]});
            let j = h.to_string().into_bytes();
            let mut f = (j.len() as u64).to_le_bytes().to_vec();
            f.extend(j);
            f.extend(vec![0u8; 128]);
            f
        };
        assert_eq!(layout.check_file(&with_meta), Err(UpdateError::Metadata));
        let mut other = layout.clone();
        other.tensors[1].shape = vec![16, 2];
        let mut f2 = other.safetensors_header();
        f2.extend(vec![0u8; n * 4]);
        assert!(matches!(
            layout.check_file(&f2),
            Err(UpdateError::Layout(_))
        ));
        assert!(matches!(
            layout.check_file(&file[..file.len() - 1]),
            Err(UpdateError::NotSafetensors(_))
        ));
    }

    #[test]
    fn fixed_point_sums_decode() {
        let scale = 2f64.powi(24);
        let xs = [0.5, -1.25, 3.0e-3, -7.0];
        let sum = xs
            .iter()
            .fold(0u64, |a, &x| a.wrapping_add(to_fixed(x, scale, 0.5)));
        let back = from_fixed(sum, scale);
        assert!((back - xs.iter().sum::<f64>()).abs() < 4.0 / scale);
    }
}
