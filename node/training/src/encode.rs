//! What leaves for a round: the trainer's update checked against the job (layout, finite
//! values, sample count, norm), clipped and noised under differential privacy, weighted,
//! encoded in fixed point modulo 2^64 with stochastic rounding, and masked pairwise under
//! secure aggregation, in chunks with their SHA-256.
//!
//! The encoding is deterministic given the update, the round and (under differential privacy)
//! the round's noise seed: a node that restarts re-encodes the same chunks, offers the same
//! hashes, and sends only what the coordinator lacks. Rounding does not depend on whether the
//! round is secure, so a plain and a secure round over the same updates sum to the same words.

use fc_federation::secure::{PairSeed, mask_chunk};
use protocol::SiteId;
use protocol::training::{
    ChunkHash, Layout, TrainingJob, UpdateError, Weighting, sha256, to_fixed,
};
use ring::aead;

/// What the trainer uploaded: the model after its local training, or the change itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateKind {
    Weights,
    Delta,
}

/// A trainer's update as uploaded.
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    /// The safetensors file.
    pub bytes: &'a [u8],
    pub kind: UpdateKind,
    pub samples: u64,
    /// The change's L2 norm when [`check`] computed it already.
    pub norm: Option<f64>,
}

/// Pairwise masks of a secure round.
#[derive(Debug)]
pub struct MaskPlan<'a> {
    pub me: &'a SiteId,
    pub seeds: &'a [PairSeed],
    pub participants: &'a [SiteId],
    /// Binds the masks to the job, round and attempt.
    pub salt: Vec<u8>,
}

/// Differential-privacy noise of a round: discrete Gaussian words of standard deviation
/// `sigma_units` (fixed-point units), drawn from a ChaCha20 stream of a secret seed kept for
/// the round (so a resumed upload re-draws the same noise).
#[derive(Clone, Debug)]
pub struct NoisePlan {
    pub seed: [u8; 32],
    pub sigma_units: f64,
}

/// An encoded update.
#[derive(Debug)]
pub struct Encoded {
    pub words: Vec<u64>,
    pub hashes: Vec<ChunkHash>,
    /// L2 norm of the change before clipping.
    pub norm: f64,
    /// The factor the change was scaled by to meet the clipping norm (1: not clipped).
    pub clip_factor: f64,
}

/// Call `f` with the change `update − global` (or the update itself when it is a change),
/// value by value, in tight loops per dtype (every tensor of a layout has one dtype).
#[inline]
fn for_each_delta(
    layout: &Layout,
    global: &[u8],
    data: &[u8],
    kind: UpdateKind,
    mut f: impl FnMut(f64),
) {
    let f32s = |b: &[u8]| f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let f64s = |b: &[u8]| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let wide = matches!(
        layout.tensors.first().and_then(|t| t.dtype().ok()),
        Some(protocol::training::Dtype::F64)
    );
    match (wide, kind) {
        (false, UpdateKind::Weights) => {
            for (u, g) in data.chunks_exact(4).zip(global.chunks_exact(4)) {
                f(f32s(u) - f32s(g));
            }
        }
        (false, UpdateKind::Delta) => data.chunks_exact(4).for_each(|u| f(f32s(u))),
        (true, UpdateKind::Weights) => {
            for (u, g) in data.chunks_exact(8).zip(global.chunks_exact(8)) {
                f(f64s(u) - f64s(g));
            }
        }
        (true, UpdateKind::Delta) => data.chunks_exact(8).for_each(|u| f(f64s(u))),
    }
}

/// Check an update; returns the L2 norm of its change. `max_samples` is the job's bound or
/// the cases this site counts, whichever is lower.
pub fn check(
    job: &TrainingJob,
    layout: &Layout,
    global: &[u8],
    u: &Update,
    max_samples: u64,
) -> Result<f64, UpdateError> {
    let start = layout.check_file(u.bytes)?;
    if u.samples == 0 || u.samples > max_samples {
        return Err(UpdateError::Samples(u.samples, max_samples));
    }
    let data = &u.bytes[start..];
    let mut norm2 = 0.0;
    for_each_delta(layout, global, data, u.kind, |d| norm2 += d * d);
    if !norm2.is_finite() {
        // Find where, for the message.
        let mut i = 0u64;
        let mut at = None;
        for_each_delta(layout, global, data, u.kind, |d| {
            if at.is_none() && !d.is_finite() {
                at = Some(i);
            }
            i += 1;
        });
        return Err(UpdateError::NotFinite(
            layout.tensor_of(at.unwrap_or(0)).to_owned(),
        ));
    }
    let norm = f64::sqrt(norm2);
    if job.privacy.is_none() && norm > job.max_update_norm {
        return Err(UpdateError::TooLarge {
            norm,
            bound: job.max_update_norm,
        });
    }
    Ok(norm)
}

/// SplitMix64: the rounding stream (not a secret: it only decides which way a value rounds).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Standard normal draws from a ChaCha20 keystream (Box–Muller), chunk by chunk.
fn normals(seed: &[u8; 32], chunk: u32, n: usize) -> Vec<f64> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::CHACHA20_POLY1305, seed).unwrap_or_else(|_| {
            // A 32-byte key is always accepted; keep a valid key on the impossible path.
            aead::UnboundKey::new(&aead::CHACHA20_POLY1305, &[0u8; 32]).expect("32-byte key")
        }),
    );
    let pairs = n.div_ceil(2);
    let mut buf = vec![0u8; pairs * 16];
    let mut nonce = [0u8; 12];
    nonce[8..].copy_from_slice(&chunk.to_be_bytes());
    let _ = key.seal_in_place_separate_tag(
        aead::Nonce::assume_unique_for_key(nonce),
        aead::Aad::empty(),
        &mut buf,
    );
    let mut out = Vec::with_capacity(pairs * 2);
    for c in buf.chunks_exact(16) {
        let a = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let b = u64::from_le_bytes([c[8], c[9], c[10], c[11], c[12], c[13], c[14], c[15]]);
        // u1 in (0, 1], u2 in [0, 1).
        let u1 = ((a >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let u2 = (b >> 11) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * u1.ln()).sqrt();
        let t = std::f64::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// The rounding seed of a round: the job's id and the round, nothing of the site.
fn rounding_seed(job: &TrainingJob, round: u32) -> u64 {
    let mut b = b"fedcurate rounding v1".to_vec();
    b.extend_from_slice(job.id.as_bytes());
    b.extend_from_slice(&round.to_be_bytes());
    let h = sha256(&b);
    u64::from_le_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

/// Encode a checked update for `round`.
pub fn encode(
    job: &TrainingJob,
    layout: &Layout,
    global: &[u8],
    u: &Update,
    round: u32,
    noise: Option<&NoisePlan>,
    mask: Option<&MaskPlan>,
) -> Result<Encoded, UpdateError> {
    let start = layout.check_file(u.bytes)?;
    let data = &u.bytes[start..];
    let params = layout.params() as usize;
    let norm = match u.norm {
        Some(n) => n,
        None => {
            let mut n2 = 0.0;
            for_each_delta(layout, global, data, u.kind, |d| n2 += d * d);
            n2.sqrt()
        }
    };
    let clip_factor = match &job.privacy {
        Some(p) if norm > p.clip_norm => p.clip_norm / norm,
        _ => 1.0,
    };
    let weight = match job.effective_weighting() {
        Weighting::Samples => u.samples as f64,
        Weighting::Uniform => 1.0,
    };
    let scale = job.scale();
    let factor = weight * clip_factor * scale;
    let mut rng = SplitMix(rounding_seed(job, round));
    let mut words = Vec::with_capacity(params + 1);
    for_each_delta(layout, global, data, u.kind, |d| {
        words.push(to_fixed(d * factor, 1.0, rng.uniform()));
    });
    words.push(to_fixed(weight, scale, 0.0));
    let cw = job.chunk_words() as usize;
    let chunks = words.len().div_ceil(cw);
    if let Some(n) = noise {
        for c in 0..chunks {
            let lo = c * cw;
            let hi = ((c + 1) * cw).min(params);
            if lo >= hi {
                continue;
            }
            let z = normals(&n.seed, c as u32, hi - lo);
            for (w, g) in words[lo..hi].iter_mut().zip(z) {
                *w = w.wrapping_add(((g * n.sigma_units).round() as i64) as u64);
            }
        }
    }
    if let Some(m) = mask {
        for c in 0..chunks {
            let lo = c * cw;
            let hi = ((c + 1) * cw).min(words.len());
            mask_chunk(
                &mut words[lo..hi],
                m.me,
                m.seeds,
                m.participants,
                &m.salt,
                c as u32,
            )
            .map_err(|e| UpdateError::Layout(format!("masking: {e}")))?;
        }
    }
    let hashes = (0..chunks)
        .map(|c| sha256(&chunk_bytes(&words, cw, c)))
        .collect();
    Ok(Encoded {
        words,
        hashes,
        norm,
        clip_factor,
    })
}

/// Chunk `c` of the words as little-endian bytes.
pub fn chunk_bytes(words: &[u64], chunk_words: usize, c: usize) -> Vec<u8> {
    let lo = (c * chunk_words).min(words.len());
    let hi = ((c + 1) * chunk_words).min(words.len());
    let mut out = Vec::with_capacity((hi - lo) * 8);
    for w in &words[lo..hi] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::training::{JobDocument, from_fixed};

    fn job(extra: &str) -> TrainingJob {
        JobDocument::new(&format!(
            "id = \"t\"\nrounds = 2\nmin_sites = 3\nmax_update_norm = 10.0\nchunk_mib = 1\n{extra}\n[[layout]]\nname = \"w\"\ndtype = \"F32\"\nshape = [300000]\n"
        ))
        .expect("valid")
        .job()
        .expect("job")
    }

    fn file(layout: &Layout, f: impl Fn(usize) -> f32) -> Vec<u8> {
        let mut b = layout.safetensors_header();
        for i in 0..layout.params() as usize {
            b.extend_from_slice(&f(i).to_le_bytes());
        }
        b
    }

    #[test]
    fn plain_and_masked_updates_sum_to_the_same_words() {
        let job = job("secure_aggregation = true");
        let layout = job.layout();
        let global = file(&layout, |_| 0.5);
        let gdata = &global[layout.check_file(&global).expect("global")..];
        let sites: Vec<SiteId> = ["a", "b", "c"]
            .iter()
            .map(|s| SiteId::new(s).expect("id"))
            .collect();
        let updates: Vec<Vec<u8>> = (0..3)
            .map(|k| file(&layout, |i| 0.5 + ((i * (k + 1)) % 7) as f32 * 1e-3))
            .collect();
        // Pairwise seeds as the key exchange leaves them: one secret per pair.
        let seed_of = |a: usize, b: usize| {
            let (lo, hi) = (a.min(b), a.max(b));
            [(lo * 3 + hi) as u8; 32]
        };
        let mut plain = vec![0u64; job.vector_words() as usize];
        let mut masked = plain.clone();
        for (k, bytes) in updates.iter().enumerate() {
            let u = Update {
                bytes,
                kind: UpdateKind::Weights,
                samples: 10 * (k as u64 + 1),
                norm: None,
            };
            check(&job, &layout, gdata, &u, 1000).expect("fits");
            let p = encode(&job, &layout, gdata, &u, 1, None, None).expect("plain");
            let seeds: Vec<PairSeed> = (0..3)
                .filter(|j| *j != k)
                .map(|j| PairSeed {
                    peer: sites[j].clone(),
                    seed: seed_of(k, j),
                })
                .collect();
            let plan = MaskPlan {
                me: &sites[k],
                seeds: &seeds,
                participants: &sites,
                salt: b"job round 1".to_vec(),
            };
            let m = encode(&job, &layout, gdata, &u, 1, None, Some(&plan)).expect("masked");
            assert_eq!(p.hashes.len(), 3, "300,001 words in chunks of 131,072");
            assert_ne!(p.words, m.words, "masked words differ from plain ones");
            // Re-encoding gives the same chunks (a resumed upload sends the same hashes).
            let again = encode(&job, &layout, gdata, &u, 1, None, Some(&plan)).expect("again");
            assert_eq!(again.hashes, m.hashes);
            protocol::secure::add_into(&mut plain, &p.words);
            protocol::secure::add_into(&mut masked, &m.words);
        }
        assert_eq!(plain, masked);
        // The weighted mean of the changes comes back from the sum.
        let scale = job.scale();
        let w = from_fixed(plain[300_000], scale);
        assert_eq!(w, 60.0);
        let i = 1234usize;
        let want: f64 = (0..3)
            .map(|k| {
                let u = 0.5f32 + ((i * (k + 1)) % 7) as f32 * 1e-3;
                10.0 * (k as f64 + 1.0) * (f64::from(u) - 0.5)
            })
            .sum::<f64>()
            / 60.0;
        let got = from_fixed(plain[i], scale) / w;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn refusals_say_why() {
        let job = job("");
        let layout = job.layout();
        let global = file(&layout, |_| 0.0);
        let gdata = &global[layout.check_file(&global).expect("global")..];
        let nan = file(&layout, |i| if i == 7 { f32::NAN } else { 0.0 });
        let big = file(&layout, |_| 1.0);
        let ok = file(&layout, |_| 1e-3);
        let u = |bytes: &'static [u8], samples| Update {
            bytes,
            kind: UpdateKind::Weights,
            samples,
            norm: None,
        };
        let leak = |v: Vec<u8>| -> &'static [u8] { Box::leak(v.into_boxed_slice()) };
        let nan = leak(nan);
        let big = leak(big);
        let ok = leak(ok);
        assert_eq!(
            check(&job, &layout, gdata, &u(nan, 5), 100),
            Err(UpdateError::NotFinite("w".into()))
        );
        assert!(matches!(
            check(&job, &layout, gdata, &u(big, 5), 100),
            Err(UpdateError::TooLarge { .. })
        ));
        assert_eq!(
            check(&job, &layout, gdata, &u(ok, 500), 100),
            Err(UpdateError::Samples(500, 100))
        );
        assert!(check(&job, &layout, gdata, &u(ok, 5), 100).is_ok());
    }

    #[test]
    fn clipping_bounds_the_norm_and_noise_has_its_spread() {
        let job = job("[privacy]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n");
        let layout = job.layout();
        let global = file(&layout, |_| 0.0);
        let gdata = &global[layout.check_file(&global).expect("global")..];
        let big = file(&layout, |_| 1.0);
        let u = Update {
            bytes: &big,
            kind: UpdateKind::Weights,
            samples: 5,
            norm: None,
        };
        let e = encode(&job, &layout, gdata, &u, 1, None, None).expect("clipped");
        let scale = job.scale();
        let n2: f64 = e.words[..300_000]
            .iter()
            .map(|w| from_fixed(*w, scale).powi(2))
            .sum();
        assert!(
            (n2.sqrt() - 1.0).abs() < 1e-3,
            "clipped to 1: {}",
            n2.sqrt()
        );
        assert_eq!(
            from_fixed(e.words[300_000], scale),
            1.0,
            "uniform weight under DP"
        );
        let noise = NoisePlan {
            seed: [7; 32],
            sigma_units: 0.01 * scale,
        };
        let n = encode(&job, &layout, gdata, &u, 1, Some(&noise), None).expect("noised");
        let diffs: Vec<f64> = n.words[..300_000]
            .iter()
            .zip(&e.words)
            .map(|(a, b)| from_fixed(a.wrapping_sub(*b), scale))
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let sd =
            (diffs.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / diffs.len() as f64).sqrt();
        assert!(mean.abs() < 1e-4 && (sd - 0.01).abs() < 2e-4, "{mean} {sd}");
    }
}
