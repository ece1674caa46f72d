//! `export`: the de-identified series as a dataset training code reads (NIfTI, nnU-Net).

use anyhow::{Result, bail};
use node::catalog::Catalog;
use node::config::NodeConfig;

use super::data::site_tokens;
use crate::{ExportArgs, ExportFormat, StratifyBy};

/// `export`: the de-identified series as a dataset training code reads.
pub(crate) fn export_dataset(config: &NodeConfig, args: ExportArgs) -> Result<()> {
    let ExportArgs {
        format,
        out,
        input,
        dataset_id,
        dataset_name,
        seed,
        split,
        stratify,
        harmonised,
        labels,
        labels_rater,
        compress,
    } = args;
    if matches!(format, ExportFormat::Nnunet) && matches!(compress, crate::CompressArg::None) {
        bail!("nnU-Net's layout is .nii.gz: give --compress fast or default with --format nnunet");
    }
    let input = input.unwrap_or_else(|| config.data_dir.join("deid"));
    let fractions = match split.as_slice() {
        [a, b, c] => [*a, *b, *c],
        _ => bail!("--split takes three fractions: train,validation,test"),
    };
    let opts = node::export::ExportOptions {
        compress: compress.into(),
        format: match format {
            ExportFormat::Nifti => node::export::Format::Nifti,
            ExportFormat::Nnunet => node::export::Format::NnUnet,
        },
        dataset_id,
        dataset_name,
        seed,
        fractions,
        stratify: match stratify {
            StratifyBy::None => node::export::Stratify::None,
            StratifyBy::Modality => node::export::Stratify::Modality,
            StratifyBy::Sex => node::export::Stratify::Sex,
        },
        harmonised,
        tokens: site_tokens(config)?,
        labels: match &labels {
            Some(project) => {
                if !matches!(format, ExportFormat::Nnunet) {
                    bail!(
                        "--labels goes with --format nnunet (annotate export writes label maps otherwise)"
                    );
                }
                let a = node::annotation::open(config, input.clone())?;
                let l = a.nnunet_labels(project, labels_rater.as_deref())?;
                if l.maps.is_empty() {
                    bail!(
                        "project {project} has no {} label maps yet",
                        labels_rater.as_deref().unwrap_or("consensus")
                    );
                }
                Some(l)
            }
            None => None,
        },
    };
    // Only the catalog is opened (SQLite serialises access), so export can run while
    // the node ingests.
    let catalog_path = config.data_dir.join("catalog.sqlite");
    let catalog = if catalog_path.exists() {
        Some(Catalog::open(&catalog_path)?)
    } else {
        None
    };
    let recorded = |h: &str| {
        catalog
            .as_ref()
            .is_some_and(|c| c.is_own_output(h).unwrap_or(false))
    };
    let s = node::export::export(&input, &out, &opts, &recorded)?;
    println!(
        "exported {} volumes of {} patients to {} ({} series skipped: no geometry or undecodable)",
        s.volumes,
        s.patients,
        out.display(),
        s.skipped
    );
    if matches!(format, ExportFormat::Nnunet) {
        println!(
            "splits by patient: train {} / validation {} / test {} cases",
            s.splits[0], s.splits[1], s.splits[2]
        );
    }
    Ok(())
}
