//! The curation run over a folder of de-identified DICOM, and its report (JSON with stable
//! field names, and a self-contained HTML page for clinicians).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use dicom_core::Tag;
use dicom_core::value::Value;
use dicom_object::{DefaultDicomObject, OpenFileOptions};
use protocol::schema::{Acquisition, CurationSchema};
use serde::Serialize;

use super::quality::{QualityReport, measure};
use super::{Finding, Severity, conformance};
use fc_deid::dictionary::Dictionary;
use fc_deid::iod::IodTables;
use fc_files::content_hash;
use fc_read::text;
use fc_volume::series::assemble;

/// Version of the report format.
pub const REPORT_VERSION: u32 = 1;

/// Protocol status of a series.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProtocolStatus {
    InScope,
    OutOfScope {
        reason: String,
    },
    /// `rules` in words; `constraints`: positions in `data_of_interest.constraints` of the
    /// constraints violated.
    Deviating {
        rules: Vec<String>,
        constraints: Vec<usize>,
    },
    NoSchema,
}

/// One series in the report.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesReport {
    /// Keyed hash of the de-identified Series Instance UID.
    pub series: String,
    /// Patient pseudonym.
    pub patient: String,
    pub modality: String,
    pub instances: usize,
    pub protocol: ProtocolStatus,
    pub findings: Vec<Finding>,
    pub quality: Vec<QualityReport>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct CurationReport {
    pub report_version: u32,
    /// Hash of the schema the protocol checks used, if any.
    pub schema: Option<String>,
    pub instances: usize,
    pub series: Vec<SeriesReport>,
    /// Findings about the site or the data set as a whole.
    pub site_findings: Vec<Finding>,
    /// Count of findings per code over everything.
    pub counts: BTreeMap<String, usize>,
}

/// Check a series against the schema's data of interest.
fn protocol_status(schema: &CurationSchema, first: &DefaultDicomObject) -> ProtocolStatus {
    let d = &schema.data_of_interest;
    let modality = text(first, Tag(0x0008, 0x0060));
    if !d
        .modalities
        .iter()
        .any(|m| m.eq_ignore_ascii_case(&modality))
    {
        return ProtocolStatus::OutOfScope {
            reason: format!("modality {modality} is not in scope"),
        };
    }
    let body_part = text(first, Tag(0x0018, 0x0015));
    if !d.body_parts.is_empty()
        && !body_part.is_empty()
        && !d
            .body_parts
            .iter()
            .any(|b| b.eq_ignore_ascii_case(&body_part))
    {
        return ProtocolStatus::OutOfScope {
            reason: "body part is not in scope".into(),
        };
    }
    let mut failed = Vec::new();
    let mut constraints = Vec::new();
    for (index, c) in d.constraints.iter().enumerate() {
        if c.modality
            .as_ref()
            .is_some_and(|m| !m.eq_ignore_ascii_case(&modality))
        {
            continue;
        }
        let (tag, name) = match c.attribute {
            Acquisition::SliceThickness => (Tag(0x0018, 0x0050), "slice-thickness"),
            Acquisition::PixelSpacing => (Tag(0x0028, 0x0030), "pixel-spacing"),
            Acquisition::FieldStrength => (Tag(0x0018, 0x0087), "field-strength"),
            Acquisition::Kvp => (Tag(0x0018, 0x0060), "kvp"),
            Acquisition::RepetitionTime => (Tag(0x0018, 0x0080), "repetition-time"),
            Acquisition::EchoTime => (Tag(0x0018, 0x0081), "echo-time"),
            Acquisition::Manufacturer => (Tag(0x0008, 0x0070), "manufacturer"),
            Acquisition::Rows => (Tag(0x0028, 0x0010), "rows"),
            Acquisition::Columns => (Tag(0x0028, 0x0011), "columns"),
            Acquisition::ContrastAgent => (Tag(0x0018, 0x0010), "contrast-agent"),
        };
        let value = match first.get(tag).map(|e| e.value()) {
            Some(Value::Primitive(p)) => p
                .to_str()
                .split('\\')
                .next()
                .unwrap_or("")
                .trim()
                .to_owned(),
            _ => String::new(),
        };
        let ok = match (&c.range, &c.allowed) {
            (Some([lo, hi]), _) => value.parse::<f64>().is_ok_and(|v| v >= *lo && v <= *hi),
            (_, Some(allowed)) => {
                let num = value.parse::<f64>().ok();
                allowed.iter().any(|a| {
                    a.eq_ignore_ascii_case(&value)
                        || (num.is_some() && a.parse::<f64>().ok() == num)
                })
            }
            _ => true,
        };
        if !ok {
            constraints.push(index);
            failed.push(if value.is_empty() {
                format!("{name} is missing")
            } else {
                format!("{name} outside the protocol")
            });
        }
    }
    if failed.is_empty() {
        ProtocolStatus::InScope
    } else {
        ProtocolStatus::Deviating {
            rules: failed,
            constraints,
        }
    }
}

/// Attributes that must agree within a series.
const SERIES_CONSTANTS: [(Tag, &str); 8] = [
    (Tag(0x0010, 0x0020), "patient"),
    (Tag(0x0020, 0x000D), "study"),
    (Tag(0x0008, 0x0060), "modality"),
    (Tag(0x0020, 0x0052), "frame of reference"),
    (Tag(0x0028, 0x0010), "rows"),
    (Tag(0x0028, 0x0011), "columns"),
    (Tag(0x0028, 0x0030), "pixel spacing"),
    (Tag(0x0020, 0x0037), "orientation"),
];

/// Curate a folder of de-identified DICOM.
/// Series are named in the report by a keyed token of their (de-identified) UID.
pub fn curate(
    folder: &Path,
    schema: Option<(&CurationSchema, String)>,
    site_findings: Vec<Finding>,
    tokens: &fc_deid::keys::Tokens,
) -> std::io::Result<CurationReport> {
    let files = fc_files::list_files(folder).map_err(std::io::Error::other)?;
    let objects: Vec<DefaultDicomObject> = files
        .iter()
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            OpenFileOptions::new().from_reader(bytes.as_slice()).ok()
        })
        .collect();
    let iods = IodTables::standard();
    let dict = Dictionary::standard();
    let mut by_series: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, o) in objects.iter().enumerate() {
        by_series
            .entry(text(o, Tag(0x0020, 0x000E)))
            .or_default()
            .push(i);
    }
    // Identical decoded pixels under different SOP Instance UIDs.
    let mut pixels: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for o in &objects {
        let bytes = match o.get(Tag(0x7FE0, 0x0010)).map(|e| e.value()) {
            Some(Value::Primitive(p)) => p.to_bytes().into_owned(),
            Some(Value::PixelSequence(s)) => s.fragments().concat(),
            _ => continue,
        };
        pixels
            .entry(content_hash(&bytes))
            .or_default()
            .insert(text(o, Tag(0x0008, 0x0018)));
    }
    let duplicated: BTreeSet<String> = pixels
        .values()
        .filter(|uids| uids.len() > 1)
        .flatten()
        .cloned()
        .collect();
    let volumes = assemble(&objects);
    let mut series_reports = Vec::new();
    for (series_uid, members) in &by_series {
        let first = &objects[members[0]];
        let mut findings = Vec::new();
        let mut seen_codes: BTreeSet<(String, Option<String>)> = BTreeSet::new();
        for &i in members {
            let o = &objects[i];
            let explicit = o.meta().transfer_syntax().trim_end_matches('\0') != "1.2.840.10008.1.2";
            for f in conformance::check(o, explicit, iods, dict) {
                // One finding per code and tag per series, not per instance.
                if seen_codes.insert((f.code.to_owned(), f.tag.clone())) {
                    findings.push(f);
                }
            }
            if duplicated.contains(&text(o, Tag(0x0008, 0x0018)))
                && seen_codes.insert(("duplicate-pixels".into(), None))
            {
                findings.push(Finding::new(
                    "duplicate-pixels",
                    Severity::Warning,
                    None,
                    "identical pixel data appears under another SOP Instance UID",
                ));
            }
        }
        for (tag, name) in SERIES_CONSTANTS {
            let values: BTreeSet<String> =
                members.iter().map(|&i| text(&objects[i], tag)).collect();
            if values.len() > 1 {
                findings.push(Finding::new(
                    "series-inconsistent",
                    Severity::Error,
                    Some(tag),
                    &format!("{name} differs between instances of the series"),
                ));
            }
        }
        let mut quality = Vec::new();
        let modality = text(first, Tag(0x0008, 0x0060));
        for v in volumes.iter().filter(|v| &v.series_uid == series_uid) {
            for f in &v.findings {
                findings.push(Finding::new(
                    f.code(),
                    Severity::Warning,
                    None,
                    &format!("geometry: {}", f.code()),
                ));
            }
            if let Some(vol) = &v.volume {
                quality.push(measure(vol, modality == "CT"));
            }
        }
        let protocol = match &schema {
            Some((s, _)) => protocol_status(s, first),
            None => ProtocolStatus::NoSchema,
        };
        series_reports.push(SeriesReport {
            series: tokens.token(series_uid),
            patient: text(first, Tag(0x0010, 0x0020)),
            modality,
            instances: members.len(),
            protocol,
            findings,
            quality,
        });
    }
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for f in series_reports
        .iter()
        .flat_map(|s| s.findings.iter())
        .chain(site_findings.iter())
    {
        *counts.entry(f.code.to_owned()).or_default() += 1;
    }
    for s in &series_reports {
        let status = match &s.protocol {
            ProtocolStatus::InScope => "protocol-in-scope",
            ProtocolStatus::OutOfScope { .. } => "protocol-out-of-scope",
            ProtocolStatus::Deviating { .. } => "protocol-deviating",
            ProtocolStatus::NoSchema => continue,
        };
        *counts.entry(status.to_owned()).or_default() += 1;
    }
    Ok(CurationReport {
        report_version: REPORT_VERSION,
        schema: schema.map(|(_, h)| h),
        instances: objects.len(),
        series: series_reports,
        site_findings,
        counts,
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A self-contained HTML page of the report (no external resources).
pub fn html(r: &CurationReport) -> String {
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>fedcurate curation report</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}.error{color:#b00}.warning{color:#a60}</style></head><body>",
    );
    h.push_str(&format!(
        "<h1>Curation report</h1><p>{} instances in {} series. Schema: {}.</p>",
        r.instances,
        r.series.len(),
        esc(r.schema.as_deref().unwrap_or("none"))
    ));
    // Bar chart of findings per code (inline SVG).
    let max = r.counts.values().copied().max().unwrap_or(1).max(1);
    h.push_str(&format!(
        "<h2>Findings per code</h2><svg width=\"640\" height=\"{}\" role=\"img\">",
        22 * r.counts.len() + 10
    ));
    for (i, (code, n)) in r.counts.iter().enumerate() {
        let w = 380 * n / max;
        let y = 22 * i + 5;
        h.push_str(&format!("<text x=\"0\" y=\"{}\" font-size=\"12\">{}</text><rect x=\"220\" y=\"{}\" width=\"{w}\" height=\"16\" fill=\"#4a7\"/><text x=\"{}\" y=\"{}\" font-size=\"12\">{n}</text>", y + 12, esc(code), y, 225 + w, y + 12));
    }
    h.push_str("</svg>");
    // Histogram of SNR.
    let snrs: Vec<f64> = r
        .series
        .iter()
        .flat_map(|s| s.quality.iter().map(|q| q.snr))
        .collect();
    if !snrs.is_empty() {
        let edges = [0.0, 2.0, 5.0, 10.0, 20.0, 40.0, f64::INFINITY];
        let mut bins = [0usize; 6];
        for s in &snrs {
            if let Some(b) = edges.windows(2).position(|w| *s >= w[0] && *s < w[1]) {
                bins[b] += 1;
            }
        }
        let top = bins.iter().copied().max().unwrap_or(1).max(1);
        h.push_str("<h2>SNR of volumes</h2><svg width=\"480\" height=\"170\" role=\"img\">");
        for (i, n) in bins.iter().enumerate() {
            let bh = 120 * n / top;
            let label = if i == 5 {
                "40+".to_owned()
            } else {
                format!("{}-{}", edges[i], edges[i + 1])
            };
            h.push_str(&format!("<rect x=\"{}\" y=\"{}\" width=\"60\" height=\"{bh}\" fill=\"#47a\"/><text x=\"{}\" y=\"160\" font-size=\"11\">{label}</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{n}</text>", 10 + 75 * i, 140 - bh, 10 + 75 * i, 30 + 75 * i, 135 - bh));
        }
        h.push_str("</svg>");
    }
    h.push_str("<h2>Series</h2><table><tr><th>series</th><th>patient</th><th>modality</th><th>instances</th><th>protocol</th><th>findings</th><th>SNR</th></tr>");
    for s in &r.series {
        let protocol = match &s.protocol {
            ProtocolStatus::InScope => "in scope".to_owned(),
            ProtocolStatus::OutOfScope { reason } => format!("out of scope: {reason}"),
            ProtocolStatus::Deviating { rules, .. } => format!("deviating: {}", rules.join("; ")),
            ProtocolStatus::NoSchema => "-".to_owned(),
        };
        let findings: Vec<String> = s
            .findings
            .iter()
            .map(|f| {
                format!(
                    "<span class=\"{}\">{}</span>",
                    match f.severity {
                        Severity::Error => "error",
                        Severity::Warning => "warning",
                        Severity::Info => "info",
                    },
                    esc(&f.message)
                )
            })
            .collect();
        let snr = s
            .quality
            .first()
            .map_or("-".to_owned(), |q| format!("{:.1}", q.snr));
        h.push_str(&format!("<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{snr}</td></tr>", esc(&s.series), esc(&s.patient), esc(&s.modality), s.instances, esc(&protocol), findings.join("<br>")));
    }
    h.push_str("</table>");
    if !r.site_findings.is_empty() {
        h.push_str("<h2>Site</h2><ul>");
        for f in &r.site_findings {
            h.push_str(&format!("<li>{}</li>", esc(&f.message)));
        }
        h.push_str("</ul>");
    }
    h.push_str("</body></html>\n");
    h
}
