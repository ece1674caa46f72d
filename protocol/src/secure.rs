//! Secure aggregation: a site's aggregates as one vector of integers modulo 2^64, so that
//! pairwise masks (derived by each pair of sites from an X25519 key agreement, expanded with a
//! PRG) cancel in the sum and the coordinator learns only the total over sites.
//!
//! Each site suppresses its own small cells before masking (a suppressed cell contributes 0
//! and a 1 in its "withheld" counter), so the per-site rules hold even if a total were ever
//! differenced. After unmasking, the coordinator checks the total and applies the k rules to
//! the pooled counts. Moments' k-th lowest and highest values are not additive and are not
//! part of a secure release.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Cell, CountTable, CtRelease, Moments, NyulRelease, SiteAggregates};
use crate::schema::CurationSchema;
use crate::summary::{CT_HU_BINS, CtSummary, NYUL_LANDMARKS, NyulSummary};

/// A site's X25519 public key for one peer in one session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerKey {
    pub peer: crate::ids::SiteId,
    pub public: [u8; 32],
}

/// A site's key set for a session as it signed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedKeys {
    pub site: crate::ids::SiteId,
    /// The site's certificate (DER).
    pub certificate: Vec<u8>,
    pub keys: Vec<PeerKey>,
    /// Its certificate key's signature over [`key_statement`].
    pub signature: Vec<u8>,
}

/// What a site signs for its keys: the session (schema, round, number), every participant
/// (sorted), the signer and its keys (sorted by peer). A coordinator that shows different
/// participants to different sites, or substitutes a key, makes a signature fail.
pub fn key_statement(
    schema: &crate::ids::SchemaHash,
    round: u32,
    session: u32,
    participants: &[crate::ids::SiteId],
    signer: &crate::ids::SiteId,
    keys: &[PeerKey],
) -> Vec<u8> {
    let mut out = b"fedcurate secure keys v1\0".to_vec();
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(b);
    };
    field(&schema.0);
    field(&round.to_be_bytes());
    field(&session.to_be_bytes());
    let mut ps: Vec<&str> = participants.iter().map(|p| p.as_str()).collect();
    ps.sort_unstable();
    ps.dedup();
    field(&(ps.len() as u32).to_be_bytes());
    for p in ps {
        field(p.as_bytes());
    }
    field(signer.as_str().as_bytes());
    let mut ks: Vec<&PeerKey> = keys.iter().collect();
    ks.sort_by(|a, b| a.peer.as_str().cmp(b.peer.as_str()));
    field(&(ks.len() as u32).to_be_bytes());
    for k in ks {
        field(k.peer.as_str().as_bytes());
        field(&k.public);
    }
    out
}

/// Length of the vector a schema's aggregates encode to.
pub fn vector_len(schema: &CurationSchema) -> usize {
    let tables: usize = schema
        .statistics
        .counts_by
        .iter()
        .map(|v| 2 * schema.count_table_len(v))
        .sum();
    let hists: usize = schema
        .statistics
        .histograms
        .iter()
        .map(|h| 2 * (h.edges.len() + 1))
        .sum();
    4 + tables
        + hists
        + 4 * schema.moment_quantities().len()
        + (3 + NYUL_LANDMARKS)
        + (5 + CT_HU_BINS)
}

fn cell(out: &mut Vec<u64>, flags: &mut Vec<u64>, c: &Cell) {
    match c {
        Cell::Value(v) => {
            out.push(*v);
            flags.push(0);
        }
        Cell::Suppressed => {
            out.push(0);
            flags.push(1);
        }
    }
}

fn cells(out: &mut Vec<u64>, cs: &[Cell], len: usize) {
    let mut flags = Vec::with_capacity(len);
    for i in 0..len {
        cell(out, &mut flags, cs.get(i).unwrap_or(&Cell::Value(0)));
    }
    out.extend(flags);
}

/// Encode a site's aggregates (already suppressed by the site) for the schema.
pub fn encode(a: &SiteAggregates, schema: &CurationSchema) -> Vec<u64> {
    let mut out = Vec::with_capacity(vector_len(schema));
    for c in [a.patients, a.series] {
        let mut f = Vec::new();
        cell(&mut out, &mut f, &c);
        out.extend(f);
    }
    for (i, v) in schema.statistics.counts_by.iter().enumerate() {
        let empty = Vec::new();
        let t = a.counts.get(i).map_or(&empty, |t| &t.cells);
        cells(&mut out, t, schema.count_table_len(v));
    }
    for (i, h) in schema.statistics.histograms.iter().enumerate() {
        let empty = Vec::new();
        let c = a.histograms.get(i).unwrap_or(&empty);
        cells(&mut out, c, h.edges.len() + 1);
    }
    for q in schema.moment_quantities() {
        match a
            .moments
            .iter()
            .find(|(x, _)| *x == q)
            .and_then(|(_, m)| *m)
        {
            Some(m) => out.extend([1, m.patients, m.sum as u64, m.sum_squares as u64]),
            None => out.extend([0, 0, 0, 0]),
        }
    }
    match &a.nyul {
        Some(n) => {
            out.extend([1, n.patients, n.summary.volumes]);
            out.extend(n.summary.landmark_sums.iter().map(|v| *v as u64));
        }
        None => out.extend(std::iter::repeat_n(0, 3 + NYUL_LANDMARKS)),
    }
    match &a.ct {
        Some(c) => {
            out.extend([
                1,
                c.patients,
                c.summary.count,
                c.summary.sum as u64,
                c.summary.sum_squares as u64,
            ]);
            let mut h = c.summary.histogram.clone();
            h.resize(CT_HU_BINS, 0);
            out.extend(h);
        }
        None => out.extend(std::iter::repeat_n(0, 5 + CT_HU_BINS)),
    }
    out
}

/// The total over sites, decoded: pooled counts (a cell any site withheld stays withheld,
/// others are exact sums; then the k rules apply to the pooled table), merged moments,
/// Nyúl and CT summaries over the sites that released them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecureTotal {
    pub sites: u32,
    pub aggregates: SiteAggregates,
    /// Sites that released moments, Nyúl and CT summaries.
    pub moments_sites: Vec<u64>,
    pub nyul_sites: u64,
    pub ct_sites: u64,
}

/// Why a sum cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecureError {
    #[error("the vector has {got} entries, the schema needs {expected}")]
    Length { got: usize, expected: usize },
}

/// Decode the sum of `sites` vectors and apply the k rules to the pooled counts.
pub fn decode(
    sum: &[u64],
    schema: &CurationSchema,
    sites: u32,
    k: u64,
) -> Result<SecureTotal, SecureError> {
    let expected = vector_len(schema);
    if sum.len() != expected {
        return Err(SecureError::Length {
            got: sum.len(),
            expected,
        });
    }
    struct Reader<'a> {
        sum: &'a [u64],
        at: usize,
    }
    impl Reader<'_> {
        fn next(&mut self, n: usize) -> Vec<u64> {
            let s = self.sum[self.at..self.at + n].to_vec();
            self.at += n;
            s
        }
    }
    let mut r = Reader { sum, at: 0 };
    let pooled = |values: &[u64], flags: &[u64]| -> Vec<u64> {
        values
            .iter()
            .zip(flags)
            .map(|(v, f)| if *f > 0 { u64::MAX } else { *v })
            .collect()
    };
    // u64::MAX marks "withheld by a site"; the k rules then run on the known cells.
    let finish = |raw: Vec<u64>| -> Vec<Cell> {
        let known: Vec<u64> = raw
            .iter()
            .map(|v| if *v == u64::MAX { 0 } else { *v })
            .collect();
        let mut out = crate::aggregate::suppress(&known, k);
        for (o, r) in out.iter_mut().zip(&raw) {
            if *r == u64::MAX {
                *o = Cell::Suppressed;
            }
        }
        out
    };
    let total = |v: Vec<u64>| {
        if v[1] > 0 {
            Cell::Suppressed
        } else {
            crate::aggregate::primary(v[0], k)
        }
    };
    let patients = total(r.next(2));
    let series = total(r.next(2));
    let mut counts = Vec::new();
    for v in &schema.statistics.counts_by {
        let n = schema.count_table_len(v);
        let values = r.next(n);
        let flags = r.next(n);
        counts.push(CountTable {
            cells: finish(pooled(&values, &flags)),
        });
    }
    let mut histograms = Vec::new();
    for h in &schema.statistics.histograms {
        let n = h.edges.len() + 1;
        let values = r.next(n);
        let flags = r.next(n);
        histograms.push(finish(pooled(&values, &flags)));
    }
    let mut moments = Vec::new();
    let mut moments_sites = Vec::new();
    for q in schema.moment_quantities() {
        let m = r.next(4);
        moments_sites.push(m[0]);
        moments.push((
            q,
            (m[0] > 0 && m[1] >= k).then_some(Moments {
                patients: m[1],
                sum: m[2] as i64,
                sum_squares: m[3] as i64,
                low: None,
                high: None,
            }),
        ));
    }
    let n = r.next(3 + NYUL_LANDMARKS);
    let nyul_sites = n[0];
    let nyul = (n[0] > 0).then(|| {
        let mut landmark_sums = [0i64; NYUL_LANDMARKS];
        for (o, v) in landmark_sums.iter_mut().zip(&n[3..]) {
            *o = *v as i64;
        }
        NyulRelease {
            patients: n[1],
            summary: NyulSummary {
                landmark_sums,
                volumes: n[2],
            },
        }
    });
    let c = r.next(5 + CT_HU_BINS);
    let ct_sites = c[0];
    let ct = (c[0] > 0).then(|| CtRelease {
        patients: c[1],
        trimmed: false,
        summary: CtSummary {
            count: c[2],
            sum: c[3] as i64,
            sum_squares: c[4] as i64,
            histogram: c[5..].to_vec(),
        },
    });
    Ok(SecureTotal {
        sites,
        aggregates: SiteAggregates {
            k: k as u32,
            patients,
            series,
            counts,
            histograms,
            moments,
            nyul,
            ct,
            noise: None,
        },
        moments_sites,
        nyul_sites,
        ct_sites,
    })
}

/// Add `b` into `a` modulo 2^64.
pub fn add_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x = x.wrapping_add(*y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = include_str!("../../deploy/schema.toml");

    fn site(seed: u64, schema: &CurationSchema) -> SiteAggregates {
        SiteAggregates {
            k: 10,
            patients: Cell::Value(20 + seed),
            series: Cell::Value(40),
            counts: schema
                .statistics
                .counts_by
                .iter()
                .map(|v| {
                    let mut cells = vec![Cell::Value(0); schema.count_table_len(v)];
                    cells[0] = Cell::Value(10 + seed);
                    cells[1] = if seed == 0 {
                        Cell::Suppressed
                    } else {
                        Cell::Value(10)
                    };
                    CountTable { cells }
                })
                .collect(),
            histograms: schema
                .statistics
                .histograms
                .iter()
                .map(|h| vec![Cell::Value(12); h.edges.len() + 1])
                .collect(),
            moments: schema
                .moment_quantities()
                .into_iter()
                .map(|q| {
                    (
                        q,
                        Some(Moments {
                            patients: 20,
                            sum: -5_000_000 + seed as i64,
                            sum_squares: 7,
                            low: Some(1),
                            high: Some(2),
                        }),
                    )
                })
                .collect(),
            nyul: Some(NyulRelease {
                patients: 20,
                summary: NyulSummary {
                    landmark_sums: [-(seed as i64); NYUL_LANDMARKS],
                    volumes: 20,
                },
            }),
            ct: None,
            noise: None,
        }
    }

    #[test]
    fn sums_of_encodings_decode_to_the_pooled_aggregates() {
        let schema = CurationSchema::parse(SCHEMA).expect("schema");
        let a = site(1, &schema);
        let b = site(2, &schema);
        let c = site(0, &schema);
        let mut sum = encode(&a, &schema);
        assert_eq!(sum.len(), vector_len(&schema));
        add_into(&mut sum, &encode(&b, &schema));
        add_into(&mut sum, &encode(&c, &schema));
        let t = decode(&sum, &schema, 3, 10).expect("decode");
        assert_eq!(t.aggregates.patients, Cell::Value(63));
        assert_eq!(t.aggregates.counts[0].cells[0], Cell::Value(33));
        assert_eq!(
            t.aggregates.counts[0].cells[1],
            Cell::Suppressed,
            "a cell one site withheld stays withheld"
        );
        assert_eq!(t.aggregates.histograms[0][0], Cell::Value(36));
        let m = t.aggregates.moments[0].1.expect("moments");
        assert_eq!((m.patients, m.sum), (60, -15_000_000 + 3));
        let n = t.aggregates.nyul.expect("nyul");
        assert_eq!((n.summary.volumes, n.summary.landmark_sums[0]), (60, -3));
        assert_eq!(t.nyul_sites, 3);
        assert!(t.aggregates.ct.is_none());
        assert!(matches!(
            decode(&sum[1..], &schema, 3, 10),
            Err(SecureError::Length { .. })
        ));
    }
}
