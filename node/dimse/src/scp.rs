//! The Storage SCP: C-ECHO and C-STORE over associations accepted from allowed calling AE
//! titles (and hosts), several at once, with TCP_NODELAY. A received object is written to the
//! inbox (temporary file, rename) before success is answered; with [`Durability::Flush`] (the
//! default) the file and the inbox folder are on disk first. Concurrent associations commit
//! together: each flushes its own file, and one of them renames every waiting file and flushes
//! the folder once for all of them (a group commit). Objects are written to their temporary
//! file as they arrive, so memory does not grow with their size.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use dicom_core::Tag;
use dicom_object::FileMetaTableBuilder;
use dicom_ul::association::server::{AccessControl, ServerAssociationOptions};
use dicom_ul::pdu::{
    AssociationRJServiceUserReason, PDataValue, PDataValueType, Pdu, UserIdentity,
};

use super::{
    STORAGE_CLASSES, TRANSFER_SYNTAXES, VERIFICATION, command, decode_command, number, response,
    status, text,
};
use std::sync::{Condvar, Mutex};

/// When a received object counts as stored (`[scp] durability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Success only once the object and its inbox entry are on disk: survives a power cut.
    #[default]
    Flush,
    /// Success once the operating system holds the bytes (written and renamed, not flushed):
    /// survives a killed node, not a power cut or a kernel crash.
    Os,
}

/// A peer allowed to send.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedPeer {
    /// Calling AE title.
    pub ae: String,
    /// The peer's address; any host when absent.
    #[serde(default)]
    pub host: Option<IpAddr>,
}

/// SCP settings.
#[derive(Clone, Debug)]
pub struct ScpConfig {
    pub ae_title: String,
    pub bind: SocketAddr,
    pub allowed: Vec<AllowedPeer>,
    pub inbox: PathBuf,
    /// The largest data set accepted in one C-STORE, in bytes; a peer sending more is aborted.
    pub max_object_bytes: u64,
    /// When success is answered.
    pub durability: Durability,
}

/// A running SCP.
#[derive(Debug)]
pub struct ScpHandle {
    pub local_addr: SocketAddr,
    shutdown: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl ScpHandle {
    /// Stop accepting, and wait for the accept loop to end.
    pub fn shutdown(mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

#[derive(Clone)]
struct Allowed(Vec<String>);

impl AccessControl for Allowed {
    fn check_access(
        &self,
        _this: &str,
        calling: &str,
        _called: &str,
        _user: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        if self.0.iter().any(|a| a == calling.trim()) {
            Ok(())
        } else {
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        }
    }
}

/// Start listening. Every stored object is announced on `stored`.
pub fn bind(config: ScpConfig, stored: Sender<()>) -> io::Result<ScpHandle> {
    std::fs::create_dir_all(&config.inbox)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.inbox, std::fs::Permissions::from_mode(0o700))?;
    }
    let listener = TcpListener::bind(config.bind)?;
    listener.set_nonblocking(true)?;
    let local_addr = listener.local_addr()?;
    let shutdown = Arc::new(AtomicBool::new(false));
    let stop = shutdown.clone();
    let config = Arc::new(config);
    let group = Arc::new(GroupCommit::default());
    let join = std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            match listener.accept() {
                Ok((stream, peer)) => {
                    let config = config.clone();
                    let stored = stored.clone();
                    let group = group.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = serve_connection(stream, peer, &config, &group, &stored) {
                            tracing::info!(error = %e, "association ended with an error");
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    });
    Ok(ScpHandle {
        local_addr,
        shutdown,
        join: Some(join),
    })
}

static RECEIVED: AtomicU64 = AtomicU64::new(0);

fn inbox_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{nanos}-{}-{}.dcm",
        std::process::id(),
        RECEIVED.fetch_add(1, Ordering::Relaxed)
    )
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    config: &ScpConfig,
    group: &GroupCommit,
    stored: &Sender<()>,
) -> Result<(), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    // Hosts: a calling AE restricted to a host may only connect from it.
    let allowed_here: Vec<String> = config
        .allowed
        .iter()
        .filter(|a| a.host.is_none_or(|h| h == peer.ip()))
        .map(|a| a.ae.clone())
        .collect();
    let mut options = ServerAssociationOptions::new()
        .ae_access_control(Allowed(allowed_here))
        .ae_title(config.ae_title.clone())
        .with_abstract_syntax(VERIFICATION)
        .max_pdu_length(65536)
        .read_timeout(Duration::from_secs(60))
        .write_timeout(Duration::from_secs(60));
    for c in STORAGE_CLASSES {
        options = options.with_abstract_syntax(*c);
    }
    for t in TRANSFER_SYNTAXES {
        options = options.with_transfer_syntax(*t);
    }
    let mut assoc = options.establish(stream).map_err(|e| e.to_string())?;
    tracing::info!(peer = %peer.ip(), "association accepted");
    let contexts: HashMap<u8, (String, String)> = assoc
        .presentation_contexts()
        .iter()
        .map(|pc| {
            (
                pc.id,
                (pc.abstract_syntax.clone(), pc.transfer_syntax.clone()),
            )
        })
        .collect();
    let mut command_bytes = Vec::new();
    let mut pending: Option<(u8, dicom_object::InMemDicomObject)> = None;
    // The object being received, written to its temporary inbox file as it arrives.
    let mut incoming: Option<Incoming> = None;
    loop {
        let pdu = match assoc.receive() {
            Ok(p) => p,
            Err(e) => return Err(e.to_string()),
        };
        match pdu {
            Pdu::PData { data } => {
                for PDataValue {
                    presentation_context_id,
                    value_type,
                    is_last,
                    data,
                } in data
                {
                    match value_type {
                        PDataValueType::Command => {
                            if command_bytes.len() + data.len() > super::MAX_COMMAND_SET {
                                tracing::warn!(
                                    peer = %peer.ip(),
                                    limit = super::MAX_COMMAND_SET,
                                    "command set larger than the limit; aborting the association"
                                );
                                let _ = assoc.abort();
                                return Err("command set too large".into());
                            }
                            command_bytes.extend_from_slice(&data);
                            if !is_last {
                                continue;
                            }
                            let Some(cmd) = decode_command(&command_bytes) else {
                                tracing::warn!(peer = %peer.ip(), bytes = command_bytes.len(), "undecodable command set; aborting the association");
                                let _ = assoc.abort();
                                return Err("undecodable command set".into());
                            };
                            command_bytes.clear();
                            let field = number(&cmd, Tag(0x0000, 0x0100)).unwrap_or(0);
                            let msg_id = number(&cmd, Tag(0x0000, 0x0110)).unwrap_or(0);
                            match field {
                                command::C_ECHO_RQ => {
                                    let rsp = response(
                                        command::C_ECHO_RSP,
                                        msg_id,
                                        VERIFICATION,
                                        None,
                                        status::SUCCESS,
                                    );
                                    send_command(&mut assoc, presentation_context_id, rsp)?;
                                }
                                command::C_STORE_RQ => {
                                    pending = Some((presentation_context_id, cmd))
                                }
                                other => {
                                    tracing::warn!(
                                        command = other,
                                        "unsupported DIMSE command; aborting"
                                    );
                                    let _ = assoc.abort();
                                    return Err("unsupported command".into());
                                }
                            }
                        }
                        PDataValueType::Data => {
                            if pending.is_none() {
                                tracing::warn!(peer = %peer.ip(), "data set without a C-STORE request; aborting the association");
                                let _ = assoc.abort();
                                return Err("data set without a C-STORE request".into());
                            }
                            let Some((pc, cmd)) = &pending else {
                                return Err("data set without a C-STORE request".into());
                            };
                            let receiving = incoming.get_or_insert_with(|| {
                                Incoming::begin(
                                    &config.inbox,
                                    &text(cmd, Tag(0x0000, 0x0002)),
                                    &text(cmd, Tag(0x0000, 0x1000)),
                                    &contexts.get(pc).map(|c| c.1.clone()).unwrap_or_default(),
                                )
                            });
                            if receiving.bytes + data.len() as u64 > config.max_object_bytes {
                                tracing::warn!(
                                    peer = %peer.ip(),
                                    limit_bytes = config.max_object_bytes,
                                    "data set larger than [scp] max_object_mib; aborting the association"
                                );
                                let _ = assoc.abort();
                                return Err("data set too large".into());
                            }
                            receiving.append(&data);
                            if !is_last {
                                continue;
                            }
                            let Some((pc, cmd)) = pending.take() else {
                                return Err("data set without a C-STORE request".into());
                            };
                            let class = text(&cmd, Tag(0x0000, 0x0002));
                            let instance = text(&cmd, Tag(0x0000, 0x1000));
                            let msg_id = number(&cmd, Tag(0x0000, 0x0110)).unwrap_or(0);
                            let received = incoming.take().map(|i| i.commit(config, group));
                            let st = match received.unwrap_or_else(|| {
                                Err(io::Error::other("no data set was received"))
                            }) {
                                Ok(()) => {
                                    let _ = stored.send(());
                                    status::SUCCESS
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "could not store a received object in the inbox");
                                    status::OUT_OF_RESOURCES
                                }
                            };
                            let rsp =
                                response(command::C_STORE_RSP, msg_id, &class, Some(&instance), st);
                            send_command(&mut assoc, pc, rsp)?;
                        }
                    }
                }
            }
            Pdu::ReleaseRQ => {
                let _ = assoc.send(&Pdu::ReleaseRP);
                return Ok(());
            }
            Pdu::AbortRQ { .. } => return Ok(()),
            other => {
                let _ = assoc.abort();
                return Err(format!("unexpected PDU {}", other.short_description()));
            }
        }
    }
}

fn send_command(
    assoc: &mut dicom_ul::association::server::ServerAssociation<TcpStream>,
    pc: u8,
    bytes: Vec<u8>,
) -> Result<(), String> {
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc,
                value_type: PDataValueType::Command,
                is_last: true,
                data: bytes,
            }],
        })
        .map_err(|e| e.to_string())
}

/// Files flushed by their associations and waiting to be renamed into the inbox, with the
/// folder flushed once for all of them.
#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<GroupState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct GroupState {
    /// (temporary, final name, the generation it joined).
    waiting: Vec<(PathBuf, PathBuf)>,
    /// Generation of the group being collected; a group is committed by one leader.
    generation: u64,
    /// Generations below this one are committed.
    committed: u64,
    /// The latest failed generations and why (a waiter reads its own).
    failed: std::collections::VecDeque<(u64, String)>,
    leader: bool,
}

impl GroupCommit {
    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, GroupState>> {
        self.state
            .lock()
            .map_err(|_| io::Error::other("the inbox commit lock is poisoned"))
    }

    /// Rename `tmp` to `dest` and flush the folder, together with whatever other
    /// associations hand in meanwhile; returns once this file's group is on disk.
    fn commit(&self, inbox: &Path, tmp: PathBuf, dest: PathBuf) -> io::Result<()> {
        let mut st = self.lock()?;
        st.waiting.push((tmp, dest));
        let mine = st.generation;
        loop {
            if st.committed > mine {
                return match st.failed.iter().find(|(g, _)| *g == mine) {
                    Some((_, e)) => Err(io::Error::other(e.clone())),
                    None => Ok(()),
                };
            }
            if !st.leader {
                // Lead this generation: take every waiting file, close the group.
                st.leader = true;
                let group = std::mem::take(&mut st.waiting);
                let generation = st.generation;
                st.generation += 1;
                drop(st);
                let outcome = (|| -> io::Result<()> {
                    // Each object was flushed before it joined the group: the names, then
                    // the folder holding them, once for the group.
                    for (tmp, dest) in &group {
                        std::fs::rename(tmp, dest)?;
                    }
                    if !fc_files::flushes_skipped() {
                        std::fs::File::open(inbox)?.sync_all()?;
                    }
                    Ok(())
                })();
                st = self.lock()?;
                st.leader = false;
                st.committed = generation + 1;
                if let Err(e) = outcome {
                    if st.failed.len() >= 64 {
                        st.failed.pop_front();
                    }
                    st.failed.push_back((generation, e.to_string()));
                }
                self.done.notify_all();
                continue;
            }
            st = self
                .done
                .wait(st)
                .map_err(|_| io::Error::other("the inbox commit lock is poisoned"))?;
        }
    }
}

/// A received object on its way into the inbox: its temporary file holds the file meta
/// group and the data set as far as it arrived. Dropped before [`commit`](Self::commit)
/// (an abort, an oversize data set, a broken connection), the temporary file is removed.
struct Incoming {
    file: Option<std::fs::File>,
    tmp: PathBuf,
    dest: PathBuf,
    /// Data set bytes received so far.
    bytes: u64,
    /// Why the object cannot be stored (answered when its last fragment arrives).
    error: Option<io::Error>,
}

impl Incoming {
    /// Open the temporary file (owner-only from the start) and write the file meta group.
    fn begin(inbox: &Path, class: &str, instance: &str, ts: &str) -> Incoming {
        let name = inbox_name();
        let mut incoming = Incoming {
            file: None,
            tmp: inbox.join(format!("{}{name}", fc_files::TEMP_PREFIX)),
            dest: inbox.join(&name),
            bytes: 0,
            error: None,
        };
        let opened = (|| -> io::Result<std::fs::File> {
            use std::io::Write as _;
            let meta = FileMetaTableBuilder::new()
                .media_storage_sop_class_uid(class)
                .media_storage_sop_instance_uid(instance)
                .transfer_syntax(ts)
                .implementation_class_uid(fc_read::IMPLEMENTATION_CLASS_UID)
                .build()
                .map_err(io::Error::other)?;
            let mut head = vec![0u8; 128];
            head.extend_from_slice(b"DICM");
            meta.write(&mut head).map_err(io::Error::other)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                // Owner-only from the start: the data directory is owner-only too.
                options.mode(0o600);
            }
            let mut f = options.open(&incoming.tmp)?;
            f.write_all(&head)?;
            Ok(f)
        })();
        match opened {
            Ok(f) => incoming.file = Some(f),
            Err(e) => incoming.fail(e),
        }
        incoming
    }

    fn fail(&mut self, e: io::Error) {
        self.file = None;
        let _ = std::fs::remove_file(&self.tmp);
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// Append a fragment of the data set.
    fn append(&mut self, data: &[u8]) {
        use std::io::Write as _;
        self.bytes += data.len() as u64;
        if let Some(f) = &mut self.file
            && let Err(e) = f.write_all(data)
        {
            self.fail(e);
        }
    }

    /// The object is complete: flushed under [`Durability::Flush`] and renamed in a group
    /// commit, or renamed at once under [`Durability::Os`].
    fn commit(mut self, config: &ScpConfig, group: &GroupCommit) -> io::Result<()> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        let f = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("the inbox file is gone"))?;
        let tmp = std::mem::take(&mut self.tmp);
        let dest = std::mem::take(&mut self.dest);
        let done = match config.durability {
            Durability::Flush => {
                let flushed = if fc_files::flushes_skipped() {
                    Ok(())
                } else {
                    f.sync_all()
                };
                drop(f);
                flushed.and_then(|()| group.commit(&config.inbox, tmp.clone(), dest))
            }
            Durability::Os => {
                drop(f);
                std::fs::rename(&tmp, &dest)
            }
        };
        if done.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        done
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Not committed: what arrived is not an object anyone was told is stored.
        if !self.tmp.as_os_str().is_empty() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
