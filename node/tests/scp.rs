//! The Storage SCP against dcmtk's echoscu and storescu (installed by scripts/test.sh).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use node::sample;

fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

struct Node {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Node {
    start_with(dir, "")
}

fn start_with(dir: &Path, extra_scp: &str) -> Node {
    let cfg = dir.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "data_dir = {:?}\n[scp]\nbind = \"127.0.0.1:0\"\nallowed = [{{ ae = \"STORESCU\" }}, {{ ae = \"ECHOSCU\" }}, {{ ae = \"LOCALONLY\", host = \"127.0.0.1\" }}, {{ ae = \"ELSEWHERE\", host = \"10.9.9.9\" }}]\n{extra_scp}\n",
            dir.join("data")
        ),
    )
    .expect("config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedcurate-node"))
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("first line");
    let port: u16 = line
        .trim()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line:?}"));
    Node {
        child,
        port,
        dir: dir.to_owned(),
    }
}

fn dcmtk(tool: &str, args: &[&str]) -> std::process::Output {
    Command::new(tool)
        .env("TCP_NODELAY", "1")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} (dcmtk, installed by scripts/test.sh): {e}"))
}

fn wait_for(dir: &Path, n: usize) -> usize {
    let started = Instant::now();
    loop {
        let count = files_under(&dir.join("data/deid")).len();
        if count >= n || started.elapsed() > Duration::from_secs(30) {
            return count;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn echo_store_and_refusals_against_dcmtk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(dir.path());
    let port = node.port.to_string();
    assert!(
        dcmtk(
            "echoscu",
            &["-aet", "ECHOSCU", "-aec", "FEDCURATE", "127.0.0.1", &port]
        )
        .status
        .success(),
        "C-ECHO"
    );
    assert!(
        dcmtk(
            "echoscu",
            &["-aet", "LOCALONLY", "-aec", "FEDCURATE", "127.0.0.1", &port]
        )
        .status
        .success(),
        "AE allowed from this host"
    );
    for refused in ["NOBODY", "ELSEWHERE"] {
        let out = dcmtk(
            "echoscu",
            &["-aet", refused, "-aec", "FEDCURATE", "127.0.0.1", &port],
        );
        assert!(!out.status.success(), "{refused} must be refused");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Calling AE Title Not Recognized"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A malformed PDU: the node drops that connection and keeps serving.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", node.port)).expect("connect");
    raw.write_all(&[0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3, 4])
        .expect("garbage");
    drop(raw);
    assert!(
        dcmtk(
            "echoscu",
            &["-aet", "ECHOSCU", "-aec", "FEDCURATE", "127.0.0.1", &port]
        )
        .status
        .success(),
        "still serving"
    );
    // Three senders at once, each a distinct set of instances, in several transfer syntaxes:
    // the sample archive's DICOM files (without the three it must refuse, and the ultrasound
    // images, which wait for a masking rule) split in two, and a bulk CT archive.
    let input = node.dir.join("in");
    let archive = sample::write_sample_archive(&node.dir.join("sample")).expect("sample");
    let good: Vec<&PathBuf> = archive
        .files
        .iter()
        .filter(|f| {
            let n = f.to_string_lossy();
            !n.ends_with("readme.txt")
                && !n.ends_with("odd.dcm")
                && !n.ends_with("no_sop_instance.dcm")
                && !n.contains("/us/")
        })
        .collect();
    for (i, f) in good.iter().enumerate() {
        let sub = if i % 2 == 0 { "a" } else { "b" };
        std::fs::create_dir_all(input.join(sub)).expect("dir");
        std::fs::copy(f, input.join(sub).join(format!("{i}.dcm"))).expect("copy");
    }
    sample::write_bulk_archive(&input.join("c"), 3, 4).expect("bulk");
    let senders: Vec<Child> = ["a", "b", "c"]
        .iter()
        .map(|sub| {
            Command::new("storescu")
                .env("TCP_NODELAY", "1")
                .args([
                    "-aet",
                    "STORESCU",
                    "-aec",
                    "FEDCURATE",
                    "+sd",
                    "+r",
                    "-R",
                    "-xy",
                    "127.0.0.1",
                    &port,
                ])
                .arg(input.join(sub))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("storescu")
        })
        .collect();
    for mut s in senders {
        assert!(
            s.wait().expect("storescu ends").success(),
            "storescu reported a failure"
        );
    }
    let expected = good.len() + 12;
    let written = wait_for(&node.dir, expected);
    assert_eq!(written, expected, "every received instance de-identified");
    // The last batch's catalog commit comes after its outputs: wait for the folders to empty.
    let started = Instant::now();
    while (!files_under(&node.dir.join("data/inbox")).is_empty()
        || !files_under(&node.dir.join("data/inbox-processing")).is_empty())
        && started.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        files_under(&node.dir.join("data/inbox")).is_empty(),
        "inbox emptied"
    );
    assert!(files_under(&node.dir.join("data/inbox-processing")).is_empty());
    for f in files_under(&node.dir.join("data/deid")) {
        let bytes = std::fs::read(&f).expect("read");
        for v in &archive.identifying {
            assert!(
                !bytes.windows(v.len()).any(|w| w == v.as_bytes()),
                "{v} in {}",
                f.display()
            );
        }
    }
    // An unsupported SOP class is refused at association (no presentation context).
    let p = sample::Patient {
        id: "X".into(),
        issuer: String::new(),
        name: "X^Y".into(),
        birth_date: "19700101".into(),
        sex: "F".into(),
        charset: None,
    };
    let st = sample::Study {
        uid: "1.2.826.0.1.3680043.10.543.5.5".into(),
        date: "20240101".into(),
        time: "000000".into(),
        accession: "A".into(),
        description: "d".into(),
        referring_physician: "R".into(),
        institution: "I".into(),
    };
    let se = sample::Series {
        uid: "1.2.826.0.1.3680043.10.543.5.5.1".into(),
        number: 1,
        description: "s".into(),
        frame_of_reference: "1.2.826.0.1.3680043.10.543.5.5.1.0".into(),
        station: "S".into(),
    };
    let mut odd = sample::ct_slice(&p, &st, &se, 1);
    sample::put_text(
        &mut odd,
        dicom_core::Tag(0x0008, 0x0016),
        dicom_core::VR::UI,
        "1.2.826.0.1.3680043.10.543.77777",
    );
    let unsupported = node.dir.join("unsupported.dcm");
    std::fs::write(
        &unsupported,
        sample::encode(odd, sample::ts::EXPLICIT_LE).expect("encode"),
    )
    .expect("write");
    let out = Command::new("storescu")
        .args(["-aet", "STORESCU", "-aec", "FEDCURATE", "127.0.0.1", &port])
        .arg(&unsupported)
        .output()
        .expect("storescu");
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        !out.status.success()
            || err.contains("no presentation context")
            || err.contains("no acceptable presentation"),
        "{err}"
    );
}

#[test]
fn the_inbox_is_replayed_after_a_kill() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Objects received by an earlier run that was killed before processing them.
    let inbox = dir.path().join("data/inbox");
    std::fs::create_dir_all(&inbox).expect("inbox");
    let files = sample::write_bulk_archive(&dir.path().join("in"), 2, 3).expect("bulk");
    for (i, f) in files.iter().enumerate() {
        std::fs::copy(f, inbox.join(format!("{i}.dcm"))).expect("copy");
    }
    std::fs::write(inbox.join(".fc-tmp-1-half.dcm"), b"DICM partial").expect("temp");
    let node = start(dir.path());
    assert_eq!(wait_for(&node.dir, files.len()), files.len(), "replayed");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        files_under(&inbox).is_empty(),
        "inbox emptied, half-written temporary removed"
    );
}

#[test]
fn an_abort_mid_transfer_stores_nothing_and_the_node_keeps_serving() {
    use dicom_ul::association::client::ClientAssociationOptions;
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(dir.path());
    let mut assoc = ClientAssociationOptions::new()
        .calling_ae_title("STORESCU")
        .called_ae_title("FEDCURATE")
        .with_presentation_context(sample::sop::CT, vec![sample::ts::EXPLICIT_LE])
        .establish_with(&format!("FEDCURATE@127.0.0.1:{}", node.port))
        .expect("associate");
    let pc = assoc.presentation_contexts()[0].id;
    let command = node::dimse::encode_command(vec![
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x0002),
            dicom_core::VR::UI,
            dicom_core::PrimitiveValue::from(sample::sop::CT),
        ),
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x0100),
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0x0001u16),
        ),
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x0110),
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(1u16),
        ),
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x0700),
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0u16),
        ),
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x0800),
            dicom_core::VR::US,
            dicom_core::PrimitiveValue::from(0u16),
        ),
        dicom_core::DataElement::new(
            dicom_core::Tag(0x0000, 0x1000),
            dicom_core::VR::UI,
            dicom_core::PrimitiveValue::from("2.25.42"),
        ),
    ]);
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
                    is_last: false,
                    data: vec![0x08, 0x00, 0x16, 0x00],
                },
            ],
        })
        .expect("send");
    assoc.abort().expect("abort");
    std::thread::sleep(Duration::from_millis(500));
    assert!(files_under(&node.dir.join("data/inbox")).is_empty());
    assert!(
        files_under(&node.dir.join("data/deid")).is_empty(),
        "nothing half-received is stored"
    );
    let port = node.port.to_string();
    assert!(
        dcmtk(
            "echoscu",
            &["-aet", "ECHOSCU", "-aec", "FEDCURATE", "127.0.0.1", &port]
        )
        .status
        .success(),
        "still serving"
    );
}

#[test]
fn an_unsupported_transfer_syntax_is_refused() {
    use dicom_ul::association::client::ClientAssociationOptions;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(dir.path());
    // MPEG-2 Main Profile: not a syntax the node accepts.
    let result = ClientAssociationOptions::new()
        .calling_ae_title("STORESCU")
        .called_ae_title("FEDCURATE")
        .with_presentation_context(sample::sop::CT, vec!["1.2.840.10008.1.2.4.100"])
        .establish_with(&format!("FEDCURATE@127.0.0.1:{}", node.port));
    match result {
        Err(e) => {
            let e = e.to_string().to_lowercase();
            assert!(
                e.contains("presentation") || e.contains("context"),
                "refused for another reason: {e}"
            );
        }
        Ok(assoc) => {
            let accepted = assoc
                .presentation_contexts()
                .iter()
                .any(|pc| pc.reason == dicom_ul::pdu::PresentationContextResultReason::Acceptance);
            assert!(!accepted, "the presentation context must be refused");
        }
    }
}

#[test]
fn a_kill_during_receipt_loses_no_acknowledged_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = sample::write_bulk_archive_sized(&dir.path().join("in"), 4, 100, 256)
        .expect("bulk archive");
    let mut node = start(dir.path());
    let log = dir.path().join("storescu.log");
    let mut sender = Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-v", "-aet", "STORESCU", "-aec", "FEDCURATE", "+sd", "+r"])
        .arg("127.0.0.1")
        .arg(node.port.to_string())
        .arg(dir.path().join("in"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("storescu");
    // Kill the node (SIGKILL) once a few objects have arrived, while storescu is still sending.
    let started = Instant::now();
    loop {
        let arrived = ["inbox", "inbox-processing", "deid"]
            .iter()
            .map(|d| files_under(&dir.path().join("data").join(d)).len())
            .sum::<usize>();
        if arrived >= 20 || started.elapsed() > Duration::from_secs(30) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    node.child.kill().expect("kill the node");
    node.child.wait().expect("node ends");
    let _ = sender.wait().expect("storescu ends");
    let text = std::fs::read_to_string(&log).expect("storescu log");
    let acknowledged = text
        .lines()
        .filter(|l| l.contains("Received Store Response (Success)"))
        .count();
    assert!(
        acknowledged > 0 && acknowledged < files.len(),
        "the kill must land mid-transfer: {acknowledged} of {} acknowledged",
        files.len()
    );
    eprintln!(
        "{acknowledged} of {} acknowledged before the kill",
        files.len()
    );
    // Restart: whatever was acknowledged is de-identified, and nothing stays behind.
    let node = start(dir.path());
    let written = wait_for(&node.dir, acknowledged);
    std::thread::sleep(Duration::from_millis(500));
    let written = written.max(files_under(&dir.path().join("data/deid")).len());
    assert!(
        written >= acknowledged && written <= acknowledged + 1,
        "{written} de-identified for {acknowledged} acknowledged (at most one stored but unanswered)"
    );
    for d in ["inbox", "inbox-processing"] {
        assert!(
            files_under(&dir.path().join("data").join(d)).is_empty(),
            "{d} emptied after the replay"
        );
    }
}

/// Peak resident memory of a running process, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM")
        * 1024
}

fn echo_ok(port: u16) -> bool {
    dcmtk(
        "echoscu",
        &[
            "-aet",
            "ECHOSCU",
            "-aec",
            "FEDCURATE",
            "127.0.0.1",
            &port.to_string(),
        ],
    )
    .status
    .success()
}

fn associate(port: u16) -> dicom_ul::association::client::ClientAssociation<std::net::TcpStream> {
    dicom_ul::association::client::ClientAssociationOptions::new()
        .calling_ae_title("STORESCU")
        .called_ae_title("FEDCURATE")
        .with_presentation_context("1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2.1"])
        .read_timeout(Duration::from_secs(10))
        .establish_with(&format!("FEDCURATE@127.0.0.1:{port}"))
        .expect("association")
}

/// Whether the peer ended the association (abort or closed connection) within a few seconds.
fn ended(
    assoc: &mut dicom_ul::association::client::ClientAssociation<std::net::TcpStream>,
) -> bool {
    match assoc.receive() {
        Ok(dicom_ul::pdu::Pdu::AbortRQ { .. }) | Err(_) => true,
        Ok(_) => false,
    }
}

#[test]
fn hostile_command_sets_and_oversized_data_sets_are_aborted_in_bounded_memory() {
    use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_with(dir.path(), "max_object_mib = 1");
    assert!(echo_ok(node.port));
    let before = peak_rss(node.child.id());

    // A command fragment of 8 bytes whose one element declares about 4 GB (the PDU is 22
    // bytes on the wire): refused before anything is reserved.
    let mut assoc = associate(node.port);
    let pc = assoc.presentation_contexts()[0].id;
    let mut command = Vec::new();
    command.extend_from_slice(&[0x00, 0x00, 0x02, 0x00]);
    command.extend_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .expect("sent");
    assert!(ended(&mut assoc), "the association is aborted");

    // Command fragments that never end: cut off at the command-set limit.
    let mut assoc = associate(node.port);
    let mut cut = false;
    for _ in 0..64 {
        let sent = assoc.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: false,
                data: vec![0u8; 4096],
            }],
        });
        if sent.is_err() {
            cut = true;
            break;
        }
    }
    assert!(
        cut || ended(&mut assoc),
        "endless command fragments are cut off"
    );

    // A data set beyond [scp] max_object_mib (1 MiB here) after a C-STORE request: aborted,
    // nothing stored.
    let mut assoc = associate(node.port);
    let request = node::dimse::scu::store_request("1.2.840.10008.5.1.4.1.1.2", "2.25.1", 7);
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: request,
            }],
        })
        .expect("request sent");
    let mut cut = false;
    for _ in 0..64 {
        let sent = assoc.send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Data,
                is_last: false,
                data: vec![0u8; 32 * 1024],
            }],
        });
        if sent.is_err() {
            cut = true;
            break;
        }
    }
    assert!(cut || ended(&mut assoc), "an oversized data set is cut off");

    assert!(echo_ok(node.port), "the node keeps serving");
    let after = peak_rss(node.child.id());
    assert!(
        after <= before + 16 * 1024 * 1024,
        "peak RSS grew from {before} to {after} bytes under hostile PDUs"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        files_under(&node.dir.join("data/inbox")).is_empty()
            && files_under(&node.dir.join("data/deid")).is_empty(),
        "nothing stored from the refused associations"
    );
}

/// Four storescu associations at once, under `durability = "flush"` (the group commit of the
/// inbox) and `durability = "os"`: every instance is acknowledged, lands in the inbox and is
/// de-identified, and no temporary file is left behind.
#[test]
fn concurrent_associations_store_every_instance_under_either_durability() {
    for durability in ["flush", "os"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let input = dir.path().join("in");
        sample::write_bulk_archive(&input, 4, 12).expect("archive");
        let node = start_with(dir.path(), &format!("durability = {durability:?}"));
        let port = node.port.to_string();
        let mut folders: Vec<PathBuf> = std::fs::read_dir(&input)
            .expect("archive")
            .flatten()
            .map(|e| e.path())
            .collect();
        folders.sort();
        assert_eq!(folders.len(), 4, "one folder per patient");
        let senders: Vec<Child> = folders
            .iter()
            .map(|f| {
                Command::new("storescu")
                    .env("TCP_NODELAY", "1")
                    .args(["-aet", "STORESCU", "-aec", "FEDCURATE", "+sd", "+r"])
                    .arg("127.0.0.1")
                    .arg(&port)
                    .arg(f)
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("storescu (dcmtk)")
            })
            .collect();
        for s in senders {
            let out = s.wait_with_output().expect("storescu ends");
            assert!(
                out.status.success(),
                "{durability}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert_eq!(wait_for(&node.dir, 48), 48, "{durability}: every instance");
        let leftovers: Vec<PathBuf> = files_under(&node.dir.join("data"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".fc-tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{durability}: {leftovers:?}");
    }
}

/// A 168 MB object is written to the inbox as it arrives and de-identified by the large-file
/// path (which reads at most 32 MiB of a file's head): the node's peak memory stays below
/// half the object's size.
#[test]
fn a_large_object_is_received_and_processed_without_holding_it_in_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).expect("dir");
    let bytes =
        sample::encode(sample::large_multiframe(320), sample::ts::EXPLICIT_LE).expect("encode");
    let size = bytes.len() as u64;
    std::fs::write(input.join("large.dcm"), &bytes).expect("write");
    drop(bytes);
    let node = start(dir.path());
    let before = peak_rss(node.child.id());
    let out = dcmtk(
        "storescu",
        &[
            "-aet",
            "STORESCU",
            "-aec",
            "FEDCURATE",
            "127.0.0.1",
            &node.port.to_string(),
            &input.join("large.dcm").to_string_lossy(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(wait_for(&node.dir, 1), 1, "de-identified");
    let peak = peak_rss(node.child.id());
    assert!(
        peak < size / 2,
        "peak {} MB (before the transfer {} MB) for a {} MB object",
        peak / 1_000_000,
        before / 1_000_000,
        size / 1_000_000
    );
}
