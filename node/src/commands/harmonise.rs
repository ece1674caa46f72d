//! `harmonise`: fit and apply intensity harmonisation to volumes.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use node::audit::{self};
use node::batch::{self};
use node::config::NodeConfig;

use super::data::open_data_dir;
use crate::{ContrastName, ForegroundName, HarmoniseArgs, MethodName, WindowName};

pub(crate) fn harmonise(config: &NodeConfig, a: HarmoniseArgs) -> Result<()> {
    use node::harmonise::stats::Contrast;
    use node::harmonise::{self as h, Discretisation, Foreground, Method, WindowFunction};
    let contrast = match a.contrast {
        ContrastName::T1 => Contrast::T1,
        ContrastName::T2 => Contrast::T2,
        ContrastName::Flair => Contrast::Flair,
        ContrastName::Pd => Contrast::Pd,
    };
    let method = match a.method {
        MethodName::MinMax => Method::MinMax,
        MethodName::Percentile => Method::Percentile {
            low: a.low,
            high: a.high,
        },
        MethodName::MuSigmaIbsi => Method::MuSigmaIbsi { n: a.n_sigma },
        MethodName::MuSigmaPyradiomics => Method::MuSigmaPyradiomics { n: a.n_sigma },
        MethodName::Zscore => Method::ZScore,
        MethodName::Kde => Method::Kde { contrast },
        MethodName::Whitestripe => Method::WhiteStripe {
            contrast,
            width: a.stripe_width,
        },
        MethodName::Fcm => Method::Fcm,
        MethodName::Nyul => Method::Nyul,
        MethodName::Lsq => Method::Lsq,
        MethodName::CtWindow => Method::CtWindow {
            center: a.window_center,
            width: a.window_width,
            function: match a.window_function {
                WindowName::Linear => WindowFunction::Linear,
                WindowName::LinearExact => WindowFunction::LinearExact,
                WindowName::Sigmoid => WindowFunction::Sigmoid,
            },
        },
        MethodName::CtNnunet => Method::CtNnunet,
        MethodName::Fbn => Method::Discretise(Discretisation::FixedBinNumber { bins: a.bins }),
        MethodName::Fbs => Method::Discretise(Discretisation::FixedBinSize {
            width: a.bin_width,
            lower: a.lower,
        }),
        MethodName::PyradiomicsBinWidth => {
            Method::Discretise(Discretisation::PyradiomicsBinWidth { width: a.bin_width })
        }
    };
    let files: Vec<PathBuf> = batch::list_inputs(&a.input)?
        .into_iter()
        .filter(|p| node::volume::nifti::is_nifti_path(p))
        .collect();
    if files.is_empty() {
        bail!("no NIfTI volumes under {}", a.input.display());
    }
    let mut volumes = Vec::new();
    let mut rules = Vec::new();
    for f in &files {
        // The source's hash (provenance) is taken while the volume is decoded.
        let (read, hashed) = rayon::join(|| node::volume::nifti::read(f), || batch::hash_file(f));
        let (_, v) = read.map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        let rel = f.strip_prefix(&a.input).unwrap_or(f).to_owned();
        let rule = match &a.masks {
            Some(dir) => {
                let (_, m) = node::volume::nifti::read(&dir.join(&rel))
                    .map_err(|e| anyhow::anyhow!("mask for {}: {e}", rel.display()))?;
                Foreground::Mask(m.data.iter().map(|x| *x > 0.0).collect())
            }
            None => match (a.padding_value, a.foreground) {
                (Some(p), _) => Foreground::AbovePadding(p),
                (None, ForegroundName::Otsu) => Foreground::Otsu,
                (None, ForegroundName::Positive) => Foreground::Positive,
            },
        };
        volumes.push((rel, v, hashed?.0));
        rules.push(rule);
    }
    let model = match &a.model {
        Some(p) => {
            let m: h::Model = serde_json::from_slice(&std::fs::read(p)?)
                .with_context(|| format!("reading model {}", p.display()))?;
            if m.method != method {
                bail!(
                    "model {} is for {:?}, not {:?}",
                    p.display(),
                    m.method,
                    method
                );
            }
            m
        }
        None => {
            // Fitting: a summary per volume with its own mask, merged (equal to pooled fitting).
            // A degenerate volume (constant or empty foreground, infinite voxels) is left out
            // of the fit with a finding, and the fit goes on without it.
            let mut per: Vec<h::Model> = Vec::new();
            for ((rel, v, _), r) in volumes.iter().zip(&rules) {
                match h::fit(&method, std::slice::from_ref(v), r) {
                    Ok(m) => per.push(m),
                    Err(
                        e @ (h::HarmoniseError::Degenerate | h::HarmoniseError::EmptyForeground),
                    ) => {
                        println!(
                            "finding  harmonise-degenerate-input  {}: left out of the fit ({e})",
                            rel.display()
                        );
                    }
                    Err(e) => bail!("{}: {e}", rel.display()),
                }
            }
            if matches!(method, Method::Lsq) {
                per.into_iter().next().context("no volume to fit on")?
            } else {
                h::merge(&per).context("no volume to fit on")?
            }
        }
    };
    let model_json = serde_json::to_vec_pretty(&model)?;
    let model_hash = batch::content_hash(&model_json);
    batch::write_atomically(&a.out.join("model.json"), &model_json)?;
    let dd = open_data_dir(config)?;
    let method_json = serde_json::to_string(&model.method)?;
    let count = volumes.len();
    let mut refused = 0;
    for ((rel, v, source_hash), rule) in volumes.into_iter().zip(&rules) {
        // The volume is not needed afterwards: rewritten in place, no second buffer.
        let out = match h::apply_owned(&model, v, rule) {
            Ok(o) => o,
            Err(e @ (h::HarmoniseError::Degenerate | h::HarmoniseError::EmptyForeground)) => {
                println!(
                    "finding  harmonise-degenerate-input  {}: not harmonised ({e})",
                    rel.display()
                );
                refused += 1;
                continue;
            }
            Err(e) => bail!("{}: {e}", rel.display()),
        };
        let name = rel
            .to_string_lossy()
            .replace(".nii.gz", "")
            .replace(".nii", "")
            .replace(".hdr", "");
        let compress = node::volume::gz::NiftiCompression::from(a.compress);
        let rel_out = format!("{name}{}", compress.suffix());
        let bytes = compress.apply(node::volume::nifti::encode(&out.volume))?;
        let (written, output_hash) = rayon::join(
            || batch::write_atomically(&a.out.join(&rel_out), &bytes),
            || batch::content_hash(&bytes),
        );
        written?;
        dd.catalog
            .record_harmonised(&node::catalog::HarmonisedRecord {
                output_path: rel_out,
                output_hash,
                source_hash: source_hash.clone(),
                method: method_json.clone(),
                model_version: model.version,
                model_hash: model_hash.clone(),
                at: audit::utc_now(),
            })?;
    }
    println!(
        "harmonised {} volumes with {method_json} (model {} in {})",
        count - refused,
        &model_hash[..12],
        a.out.join("model.json").display()
    );
    Ok(())
}
