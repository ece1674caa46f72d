//! The `[training]` section of the node's configuration.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// `[training]`: where trainers reach the node and who may.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSettings {
    /// The Unix-domain socket trainers connect to (default `<data_dir>/training/trainer.sock`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// Group (numeric id) that owns the socket; the socket is then 0660, else 0600.
    #[serde(default)]
    pub socket_group: Option<u32>,
    /// User ids allowed to call the API (besides the node's own user).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Group ids whose members may call the API.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Chunks in flight at once during an upload or a download.
    #[serde(default = "default_in_flight")]
    pub transfers_in_flight: usize,
    /// An nnU-Net dataset folder this site exports for the job: the sample count a trainer
    /// reports is capped at the training cases its `dataset.json` counts.
    #[serde(default)]
    pub dataset: Option<PathBuf>,
}

fn default_in_flight() -> usize {
    4
}

impl Default for TrainingSettings {
    fn default() -> Self {
        TrainingSettings {
            socket: None,
            socket_group: None,
            allowed_uids: Vec::new(),
            allowed_gids: Vec::new(),
            transfers_in_flight: default_in_flight(),
            dataset: None,
        }
    }
}

impl TrainingSettings {
    /// The socket's path for a node whose data directory is `data_dir`.
    pub fn socket_path(&self, data_dir: &Path) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| data_dir.join("training").join("trainer.sock"))
    }

    /// Training cases the site's export counts (`numTraining` of the dataset's
    /// `dataset.json`), if a dataset is configured.
    pub fn counted_cases(&self) -> Result<Option<u64>, String> {
        let Some(d) = &self.dataset else {
            return Ok(None);
        };
        let p = d.join("dataset.json");
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        v.get("numTraining")
            .and_then(|n| n.as_u64())
            .map(Some)
            .ok_or_else(|| format!("{}: no numTraining", p.display()))
    }
}
