//! Hospital IT approves a training job once, in the node's egress queue: what leaves each
//! round, in words, with the privacy settings. Until then the node does not join the job.
//! Files in `<data_dir>/training/`: `pending.json` (the job waiting, described) and
//! `approved.json` (the hashes of approved jobs).

use std::path::{Path, PathBuf};

use protocol::training::{JobHash, TrainingJob};
use serde::{Deserialize, Serialize};

/// A job waiting for approval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PendingJob {
    pub job: String,
    pub hash: String,
    pub items: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Approved {
    hashes: Vec<String>,
}

/// The training jobs' approvals of one node.
#[derive(Debug)]
pub struct JobApprovals {
    dir: PathBuf,
}

/// What leaves each round, in words.
pub fn describe(job: &TrainingJob, hash: &JobHash) -> Vec<String> {
    let layout = job.layout();
    let mut items = vec![format!(
        "training job {} ({}…): {} rounds; each round this site sends one model update: the change of {} numbers ({} tensors: {}), as fixed-point words in {} chunks, plus {}",
        job.id,
        &hash.hex()[..12],
        job.rounds,
        layout.params(),
        layout.tensors.len(),
        layout
            .tensors
            .iter()
            .take(6)
            .map(|t| format!("{} {:?}", t.name, t.shape))
            .collect::<Vec<_>>()
            .join(", ")
            + if layout.tensors.len() > 6 {
                ", …"
            } else {
                ""
            },
        job.update_chunks(),
        match job.effective_weighting() {
            protocol::training::Weighting::Samples =>
                "the number of training samples it used (as a weight)",
            protocol::training::Weighting::Uniform =>
                "no sample count (every site weighs the same)",
        }
    )];
    items.push(if job.metrics.is_empty() {
        "metrics: none".into()
    } else {
        format!(
            "metrics, numbers only, seen by the coordinator per site: {}",
            job.metrics.join(", ")
        )
    });
    items.push(if job.secure_aggregation {
        "secure aggregation: on — the coordinator sees only the sum of the sites' updates (pairwise masks verified against the consortium CA)".into()
    } else {
        "secure aggregation: off — the coordinator sees this site's update".into()
    });
    items.push(match &job.privacy {
        Some(p) => {
            let (eps, _) = crate::accountant::epsilon(p.noise_multiplier, job.rounds, p.delta);
            format!(
                "differential privacy: each update clipped to L2 norm {}, Gaussian noise multiplier {}; after all {} rounds ε = {eps:.3} at δ = {} (RDP accountant), spent from this site's budget round by round",
                p.clip_norm, p.noise_multiplier, job.rounds, p.delta
            )
        }
        None => format!(
            "differential privacy: none; updates with an L2 norm above {} are refused",
            job.max_update_norm
        ),
    });
    items
}

impl JobApprovals {
    pub fn at(training_dir: &Path) -> Self {
        JobApprovals {
            dir: training_dir.to_owned(),
        }
    }

    fn approved(&self) -> Approved {
        std::fs::read(self.dir.join("approved.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    pub fn is_approved(&self, hash: &JobHash) -> bool {
        self.approved().hashes.contains(&hash.hex())
    }

    /// Record `job` as waiting (if it is not approved); true if it is approved.
    pub fn check(&self, job: &TrainingJob, hash: &JobHash) -> std::io::Result<bool> {
        if self.is_approved(hash) {
            return Ok(true);
        }
        std::fs::create_dir_all(&self.dir)?;
        let p = PendingJob {
            job: job.id.clone(),
            hash: hash.hex(),
            items: describe(job, hash),
        };
        if self.pending().as_ref() != Some(&p) {
            fc_files::write_atomically(
                &self.dir.join("pending.json"),
                &serde_json::to_vec_pretty(&p).map_err(std::io::Error::other)?,
            )?;
        }
        Ok(false)
    }

    pub fn pending(&self) -> Option<PendingJob> {
        std::fs::read(self.dir.join("pending.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Approve the pending job; returns it.
    pub fn approve(&self) -> std::io::Result<Option<PendingJob>> {
        let Some(p) = self.pending() else {
            return Ok(None);
        };
        let mut a = self.approved();
        if !a.hashes.contains(&p.hash) {
            a.hashes.push(p.hash.clone());
        }
        fc_files::write_atomically(
            &self.dir.join("approved.json"),
            &serde_json::to_vec_pretty(&a).map_err(std::io::Error::other)?,
        )?;
        std::fs::remove_file(self.dir.join("pending.json"))?;
        Ok(Some(p))
    }
}
