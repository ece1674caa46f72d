//! Query/retrieve client: C-FIND at study level and C-MOVE to the node's own SCP (Study Root
//! Query/Retrieve Information Model). Identifiers found are kept in memory only; nothing of
//! them is logged.

use std::net::TcpStream;
use std::time::Duration;

use dicom_core::value::PrimitiveValue;
use dicom_core::{DataElement, Tag, VR};
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::association::client::{ClientAssociation, ClientAssociationOptions};
use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};

use super::{decode_command, encode_command, number, text};

/// Study Root Query/Retrieve Information Model – FIND.
pub const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Study Root Query/Retrieve Information Model – MOVE.
pub const STUDY_ROOT_MOVE: &str = "1.2.840.10008.5.1.4.1.2.2.2";

const C_FIND_RQ: u16 = 0x0020;
const C_MOVE_RQ: u16 = 0x0021;

/// A remote application entity: `AE@host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteAe {
    pub ae_title: String,
    pub address: String,
}

impl RemoteAe {
    /// Parse `AE@host:port`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ae, addr) = s.split_once('@')?;
        let (_, port) = addr.rsplit_once(':')?;
        port.parse::<u16>().ok()?;
        (!ae.is_empty()).then(|| RemoteAe {
            ae_title: ae.to_owned(),
            address: addr.to_owned(),
        })
    }
}

/// Errors of the query/retrieve client.
#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error(
        "cannot associate with {ae} at {address}: {detail}; check the PACS address, its AE title, and that it knows this node's AE title"
    )]
    Associate {
        ae: String,
        address: String,
        detail: String,
    },
    #[error("the peer refused the {0} service (no accepted presentation context)")]
    NoContext(&'static str),
    #[error("DICOM network error: {0}")]
    Network(String),
    #[error("the peer answered with status 0x{0:04X}")]
    Status(u16),
}

/// A study-level query: any combination of keys (empty: any).
#[derive(Clone, Debug, Default)]
pub struct StudyQuery {
    pub accession_number: Option<String>,
    pub patient_id: Option<String>,
    /// `YYYYMMDD-YYYYMMDD` (either end may be empty).
    pub study_date: Option<String>,
}

/// Sub-operation counts of a C-MOVE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MoveCounts {
    pub completed: u16,
    pub failed: u16,
    pub warning: u16,
}

fn associate(
    calling: &str,
    peer: &RemoteAe,
    abstract_syntax: &str,
) -> Result<(ClientAssociation<TcpStream>, u8, String), ScuError> {
    let assoc = ClientAssociationOptions::new()
        .calling_ae_title(calling.to_owned())
        .called_ae_title(peer.ae_title.clone())
        .with_presentation_context(
            abstract_syntax.to_owned(),
            vec![
                "1.2.840.10008.1.2.1".to_owned(),
                "1.2.840.10008.1.2".to_owned(),
            ],
        )
        .read_timeout(Duration::from_secs(600))
        .write_timeout(Duration::from_secs(60))
        .connection_timeout(Duration::from_secs(10))
        .establish_with(&format!("{}@{}", peer.ae_title, peer.address))
        .map_err(|e| ScuError::Associate {
            ae: peer.ae_title.clone(),
            address: peer.address.clone(),
            detail: e.to_string(),
        })?;
    let pc = assoc
        .presentation_contexts()
        .iter()
        .find(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .map(|pc| (pc.id, pc.transfer_syntax.clone()))
        .ok_or(ScuError::NoContext(if abstract_syntax == STUDY_ROOT_FIND {
            "C-FIND"
        } else {
            "C-MOVE"
        }))?;
    Ok((assoc, pc.0, pc.1))
}

fn encode_dataset(obj: &InMemDicomObject, ts: &str) -> Result<Vec<u8>, ScuError> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| ScuError::Network(format!("unknown transfer syntax {ts}")))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| ScuError::Network(e.to_string()))?;
    Ok(out)
}

fn decode_dataset(bytes: &[u8], ts: &str) -> Option<InMemDicomObject> {
    let ts = TransferSyntaxRegistry.get(ts)?;
    InMemDicomObject::read_dataset_with_ts(bytes, ts).ok()
}

fn send(
    assoc: &mut ClientAssociation<TcpStream>,
    pc: u8,
    command: Vec<u8>,
    dataset: Vec<u8>,
) -> Result<(), ScuError> {
    assoc
        .send(&Pdu::PData {
            data: vec![
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: command,
                },
                PDataValue {
                    presentation_context_id: pc,
                    value_type: PDataValueType::Data,
                    is_last: true,
                    data: dataset,
                },
            ],
        })
        .map_err(|e| ScuError::Network(e.to_string()))
}

/// Receive one response: its command set and, if present, its data set.
fn receive(
    assoc: &mut ClientAssociation<TcpStream>,
) -> Result<(InMemDicomObject, Option<Vec<u8>>), ScuError> {
    let mut command = Vec::new();
    let mut data = Vec::new();
    let mut cmd: Option<InMemDicomObject> = None;
    loop {
        match assoc
            .receive()
            .map_err(|e| ScuError::Network(e.to_string()))?
        {
            Pdu::PData { data: values } => {
                for v in values {
                    match v.value_type {
                        PDataValueType::Command => {
                            command.extend_from_slice(&v.data);
                            if v.is_last {
                                let c = decode_command(&command).ok_or_else(|| {
                                    ScuError::Network("undecodable response".into())
                                })?;
                                // Command Data Set Type 0x0101: no data set follows.
                                if number(&c, Tag(0x0000, 0x0800)) == Some(0x0101) {
                                    return Ok((c, None));
                                }
                                cmd = Some(c);
                            }
                        }
                        PDataValueType::Data => {
                            data.extend_from_slice(&v.data);
                            if v.is_last
                                && let Some(c) = cmd.take()
                            {
                                return Ok((c, Some(data)));
                            }
                        }
                    }
                }
            }
            Pdu::AbortRQ { .. } => {
                return Err(ScuError::Network("the peer aborted the association".into()));
            }
            other => {
                return Err(ScuError::Network(format!(
                    "unexpected PDU {}",
                    other.short_description()
                )));
            }
        }
    }
}

fn request(
    field: u16,
    class: &str,
    message_id: u16,
    extra: Vec<DataElement<InMemDicomObject>>,
) -> Vec<u8> {
    let mut e = vec![
        DataElement::new(Tag(0x0000, 0x0002), VR::UI, PrimitiveValue::from(class)),
        DataElement::new(Tag(0x0000, 0x0100), VR::US, PrimitiveValue::from(field)),
        DataElement::new(
            Tag(0x0000, 0x0110),
            VR::US,
            PrimitiveValue::from(message_id),
        ),
        DataElement::new(Tag(0x0000, 0x0700), VR::US, PrimitiveValue::from(0u16)),
        DataElement::new(Tag(0x0000, 0x0800), VR::US, PrimitiveValue::from(0x0000u16)),
    ];
    e.extend(extra);
    encode_command(e)
}

/// A C-STORE request command set for one instance.
pub fn store_request(class: &str, instance: &str, message_id: u16) -> Vec<u8> {
    request(
        C_STORE_RQ,
        class,
        message_id,
        vec![DataElement::new(
            Tag(0x0000, 0x1000),
            VR::UI,
            PrimitiveValue::from(instance),
        )],
    )
}

/// C-FIND at study level; returns the Study Instance UIDs that match.
pub fn find_studies(
    calling: &str,
    peer: &RemoteAe,
    q: &StudyQuery,
) -> Result<Vec<String>, ScuError> {
    let (mut assoc, pc, ts) = associate(calling, peer, STUDY_ROOT_FIND)?;
    let value = |v: &Option<String>| PrimitiveValue::from(v.clone().unwrap_or_default());
    let identifier = InMemDicomObject::from_element_iter([
        DataElement::new(Tag(0x0008, 0x0020), VR::DA, value(&q.study_date)),
        DataElement::new(Tag(0x0008, 0x0050), VR::SH, value(&q.accession_number)),
        DataElement::new(Tag(0x0008, 0x0052), VR::CS, PrimitiveValue::from("STUDY")),
        DataElement::new(Tag(0x0010, 0x0020), VR::LO, value(&q.patient_id)),
        DataElement::new(Tag(0x0020, 0x000D), VR::UI, PrimitiveValue::Empty),
    ]);
    send(
        &mut assoc,
        pc,
        request(C_FIND_RQ, STUDY_ROOT_FIND, 1, Vec::new()),
        encode_dataset(&identifier, &ts)?,
    )?;
    let mut studies = Vec::new();
    loop {
        let (cmd, data) = receive(&mut assoc)?;
        let status = number(&cmd, Tag(0x0000, 0x0900)).unwrap_or(0xFFFF);
        match status {
            0xFF00 | 0xFF01 => {
                if let Some(uid) = data
                    .as_deref()
                    .and_then(|d| decode_dataset(d, &ts))
                    .map(|o| text(&o, Tag(0x0020, 0x000D)))
                    && !uid.is_empty()
                {
                    studies.push(uid);
                }
            }
            0x0000 => break,
            other => {
                let _ = assoc.abort();
                return Err(ScuError::Status(other));
            }
        }
    }
    let _ = assoc.release();
    studies.sort();
    studies.dedup();
    Ok(studies)
}

/// C-MOVE one study to `destination` (the node's own AE title).
pub fn move_study(
    calling: &str,
    peer: &RemoteAe,
    study_uid: &str,
    destination: &str,
) -> Result<MoveCounts, ScuError> {
    let (mut assoc, pc, ts) = associate(calling, peer, STUDY_ROOT_MOVE)?;
    let identifier = InMemDicomObject::from_element_iter([
        DataElement::new(Tag(0x0008, 0x0052), VR::CS, PrimitiveValue::from("STUDY")),
        DataElement::new(Tag(0x0020, 0x000D), VR::UI, PrimitiveValue::from(study_uid)),
    ]);
    let extra = vec![DataElement::new(
        Tag(0x0000, 0x0600),
        VR::AE,
        PrimitiveValue::from(destination),
    )];
    send(
        &mut assoc,
        pc,
        request(C_MOVE_RQ, STUDY_ROOT_MOVE, 1, extra),
        encode_dataset(&identifier, &ts)?,
    )?;
    let mut counts = MoveCounts::default();
    loop {
        let (cmd, _) = receive(&mut assoc)?;
        let status = number(&cmd, Tag(0x0000, 0x0900)).unwrap_or(0xFFFF);
        counts.completed = number(&cmd, Tag(0x0000, 0x1021)).unwrap_or(counts.completed);
        counts.failed = number(&cmd, Tag(0x0000, 0x1022)).unwrap_or(counts.failed);
        counts.warning = number(&cmd, Tag(0x0000, 0x1023)).unwrap_or(counts.warning);
        match status {
            0xFF00 => continue,
            0x0000 | 0xB000 => break,
            other => {
                let _ = assoc.abort();
                return Err(ScuError::Status(other));
            }
        }
    }
    let _ = assoc.release();
    Ok(counts)
}

const C_STORE_RQ: u16 = 0x0001;

/// What a C-STORE run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreCounts {
    pub sent: usize,
    pub failed: usize,
}

/// C-STORE `files` to `peer` on one association (the files' SOP classes, explicit and
/// implicit VR little endian; data sets are split into PDUs of the negotiated size). Files
/// that do not open, or whose class or syntax the peer refused, count as failed.
pub fn store_files(
    calling: &str,
    peer: &RemoteAe,
    files: &[std::path::PathBuf],
) -> Result<StoreCounts, ScuError> {
    use std::io::Write as _;
    let objects: Vec<Option<dicom_object::DefaultDicomObject>> = files
        .iter()
        .map(|f| dicom_object::open_file(f).ok())
        .collect();
    let mut classes: Vec<String> = objects
        .iter()
        .flatten()
        .map(|o| {
            o.meta()
                .media_storage_sop_class_uid()
                .trim_end_matches('\0')
                .to_owned()
        })
        .collect();
    classes.sort();
    classes.dedup();
    classes.truncate(127);
    let mut options = ClientAssociationOptions::new()
        .calling_ae_title(calling.to_owned())
        .called_ae_title(peer.ae_title.clone())
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60))
        .connection_timeout(Duration::from_secs(10));
    for c in &classes {
        options = options.with_presentation_context(
            c.clone(),
            vec![
                "1.2.840.10008.1.2.1".to_owned(),
                "1.2.840.10008.1.2".to_owned(),
            ],
        );
    }
    let mut assoc = options
        .establish_with(&format!("{}@{}", peer.ae_title, peer.address))
        .map_err(|e| ScuError::Associate {
            ae: peer.ae_title.clone(),
            address: peer.address.clone(),
            detail: e.to_string(),
        })?;
    let accepted: Vec<(String, u8, String)> = assoc
        .presentation_contexts()
        .iter()
        .filter(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance)
        .map(|pc| {
            (
                pc.abstract_syntax.clone(),
                pc.id,
                pc.transfer_syntax.clone(),
            )
        })
        .collect();
    let mut counts = StoreCounts::default();
    for (i, o) in objects.iter().enumerate() {
        let Some(o) = o else {
            counts.failed += 1;
            continue;
        };
        let class = o
            .meta()
            .media_storage_sop_class_uid()
            .trim_end_matches('\0');
        let instance = o
            .meta()
            .media_storage_sop_instance_uid()
            .trim_end_matches('\0')
            .to_owned();
        let Some((_, pc, ts)) = accepted.iter().find(|(a, _, _)| a == class) else {
            counts.failed += 1;
            continue;
        };
        let data = encode_dataset(o, ts)?;
        let command = store_request(class, &instance, (i % 65_000) as u16 + 1);
        assoc
            .send(&Pdu::PData {
                data: vec![PDataValue {
                    presentation_context_id: *pc,
                    value_type: PDataValueType::Command,
                    is_last: true,
                    data: command,
                }],
            })
            .map_err(|e| ScuError::Network(e.to_string()))?;
        {
            let mut w = assoc.send_pdata(*pc);
            w.write_all(&data)
                .map_err(|e| ScuError::Network(e.to_string()))?;
            w.finish().map_err(|e| ScuError::Network(e.to_string()))?;
        }
        let (rsp, _) = receive(&mut assoc)?;
        match number(&rsp, Tag(0x0000, 0x0900)) {
            Some(0x0000) | Some(0xB000) | Some(0xB007) | Some(0xB006) => counts.sent += 1,
            _ => counts.failed += 1,
        }
    }
    let _ = assoc.release();
    Ok(counts)
}
