//! Holding transactions that Postgres streams while they are still in progress.
//!
//! With pgoutput's `streaming 'on'`, a transaction larger than the server's
//! `logical_decoding_work_mem` arrives in chunks (Stream Start .. Stream Stop) long before
//! its commit, interleaved with other transactions, and ends with Stream Commit or Stream
//! Abort. Nothing of it may become an event before the commit: this module owns keeping
//! the chunks until then, in memory up to a limit and in a file per transaction beyond.
//!
//! What is kept is the raw pgoutput payload of each message (changes, and the Relation
//! and Type messages sent inside the stream), so that at commit the pipeline can decode
//! it again and feed it to the assembler as an ordinary Begin .. Commit transaction: the
//! events, positions and ids are then exactly those a non-streamed delivery gives.
//!
//! Invariants:
//! - Records of one transaction come back in the order they were pushed.
//! - A record tagged with a subtransaction xid that was aborted (Stream Abort with
//!   `subxid != xid`) is never returned; records tagged [`KEEP`] (schema messages) always are.
//! - The bytes held in memory across all open transactions stay under the configured
//!   limit (plus one record): past it the transaction being appended goes to disk, and
//!   from then on writes through a small buffer.
//! - Spill files live in a directory of their own, removed when the [`Spool`] is dropped;
//!   a transaction's file is removed when it commits or aborts.
//!
//! All I/O is blocking `std::fs` on local files, buffered: it runs on the replication
//! task, between network reads.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;

/// The tag of records that no subtransaction abort removes (xid 0 is never a real xid).
pub const KEEP: u32 = 0;

/// Default for [`SpillConfig::memory_limit`].
pub const DEFAULT_MEMORY_LIMIT: usize = 16 * 1024 * 1024;

/// Write buffer of a spilled transaction's file.
const FILE_BUFFER: usize = 64 * 1024;

/// Record header: subxid tag, payload length (both u32, big-endian).
const HEADER: usize = 8;

static SPOOL_SEQ: AtomicU32 = AtomicU32::new(0);

/// Where and when streamed transactions go to disk.
#[derive(Debug, Clone)]
pub struct SpillConfig {
    /// Parent of the spill directory; `None`: the system temp directory.
    pub dir: Option<PathBuf>,
    /// Bytes of streamed changes held in memory, over all open transactions.
    pub memory_limit: usize,
}

impl Default for SpillConfig {
    fn default() -> Self {
        SpillConfig {
            dir: None,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }
}

/// A streamed transaction could not be held or read back, or the stream's bracketing was
/// not what pgoutput sends. All are definite: going on could lose or invent changes.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("spill file {} is damaged: {what}", path.display())]
    Corrupt { path: PathBuf, what: &'static str },
    #[error("Stream Start for transaction {xid} continues a stream whose first segment was never received")]
    MissingFirstSegment { xid: u32 },
    #[error("Stream Start marks transaction {xid} as new, but it is already being streamed")]
    RestartedStream { xid: u32 },
    #[error("streamed change outside a Stream Start .. Stream Stop block")]
    OutsideStream,
    #[error("Stream Commit for transaction {xid}, which was never streamed")]
    UnknownTransaction { xid: u32 },
    #[error("streamed change of {len} bytes is larger than a spill record can hold")]
    RecordTooLarge { len: usize },
}

impl SpillError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        SpillError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Where one transaction's records are.
enum Store {
    Memory(Vec<u8>),
    /// Every record so far is in the file (some possibly still in the writer's buffer).
    File {
        path: PathBuf,
        writer: BufWriter<File>,
    },
}

struct Streamed {
    store: Store,
    aborted: HashSet<u32>,
    records: u64,
}

/// The streamed transactions of one replication session.
pub struct Spool {
    config: SpillConfig,
    /// Created on the first spill.
    dir: Option<PathBuf>,
    open: HashMap<u32, Streamed>,
    /// The transaction of the current Stream Start .. Stream Stop block.
    current: Option<u32>,
    in_memory: usize,
}

impl Spool {
    pub fn new(config: SpillConfig) -> Self {
        Spool {
            config,
            dir: None,
            open: HashMap::new(),
            current: None,
            in_memory: 0,
        }
    }

    /// Whether some streamed transaction has neither committed nor aborted.
    pub fn has_open(&self) -> bool {
        !self.open.is_empty()
    }

    /// Bytes of streamed changes held in memory now.
    #[cfg(test)]
    fn memory_bytes(&self) -> usize {
        self.in_memory
    }

    /// Forgets every open transaction (after a reconnect the server streams them again
    /// from their first segment).
    pub fn reset(&mut self) {
        for (_, tx) in self.open.drain() {
            discard(tx.store);
        }
        self.current = None;
        self.in_memory = 0;
    }

    /// Stream Start.
    pub fn start(&mut self, xid: u32, first_segment: bool) -> Result<(), SpillError> {
        match (self.open.contains_key(&xid), first_segment) {
            (false, false) => return Err(SpillError::MissingFirstSegment { xid }),
            (true, true) => return Err(SpillError::RestartedStream { xid }),
            (false, true) => {
                self.open.insert(
                    xid,
                    Streamed {
                        store: Store::Memory(Vec::new()),
                        aborted: HashSet::new(),
                        records: 0,
                    },
                );
            }
            (true, false) => {}
        }
        self.current = Some(xid);
        Ok(())
    }

    /// Stream Stop.
    pub fn stop(&mut self) {
        self.current = None;
    }

    /// Keeps one message of the current stream block. `subxid` is the (sub)transaction
    /// the change belongs to, or [`KEEP`] for messages no abort may remove.
    pub fn push(&mut self, subxid: u32, payload: &[u8]) -> Result<(), SpillError> {
        let xid = self.current.ok_or(SpillError::OutsideStream)?;
        let len = u32::try_from(payload.len())
            .map_err(|_| SpillError::RecordTooLarge { len: payload.len() })?;
        let in_memory = matches!(
            self.open.get(&xid).map(|tx| &tx.store),
            Some(Store::Memory(_))
        );
        let over_limit = self.in_memory + HEADER + payload.len() > self.config.memory_limit;
        let path = if in_memory && over_limit {
            Some(self.spill_path(xid)?)
        } else {
            None
        };
        let tx = self.open.get_mut(&xid).ok_or(SpillError::OutsideStream)?;
        tx.records += 1;
        if let (Some(path), Store::Memory(buf)) = (path, &tx.store) {
            let file = File::create(&path).map_err(|e| SpillError::io(&path, e))?;
            let mut writer = BufWriter::with_capacity(FILE_BUFFER, file);
            writer
                .write_all(buf)
                .map_err(|e| SpillError::io(&path, e))?;
            self.in_memory -= buf.len();
            tracing::debug!(xid, file = %path.display(), bytes = buf.len(), "streamed transaction spilled to disk");
            tx.store = Store::File { path, writer };
        }
        match &mut tx.store {
            Store::Memory(buf) => {
                buf.extend_from_slice(&subxid.to_be_bytes());
                buf.extend_from_slice(&len.to_be_bytes());
                buf.extend_from_slice(payload);
                self.in_memory += HEADER + payload.len();
            }
            Store::File { path, writer } => {
                writer
                    .write_all(&subxid.to_be_bytes())
                    .and_then(|()| writer.write_all(&len.to_be_bytes()))
                    .and_then(|()| writer.write_all(payload))
                    .map_err(|e| SpillError::io(path, e))?;
            }
        }
        Ok(())
    }

    /// Stream Abort: the whole transaction (`subxid == xid`) or one subtransaction. An
    /// abort of a transaction never streamed is nothing to undo.
    pub fn abort(&mut self, xid: u32, subxid: u32) {
        if xid == subxid {
            if let Some(tx) = self.open.remove(&xid) {
                self.release(tx);
            }
            if self.current == Some(xid) {
                self.current = None;
            }
        } else if let Some(tx) = self.open.get_mut(&xid) {
            tx.aborted.insert(subxid);
        }
    }

    /// Stream Commit: the transaction's surviving records, in order.
    pub fn commit(&mut self, xid: u32) -> Result<Replay, SpillError> {
        let tx = self
            .open
            .remove(&xid)
            .ok_or(SpillError::UnknownTransaction { xid })?;
        if self.current == Some(xid) {
            self.current = None;
        }
        tracing::debug!(
            xid,
            records = tx.records,
            spilled = matches!(tx.store, Store::File { .. }),
            "streamed transaction committed"
        );
        let source = match tx.store {
            Store::Memory(buf) => {
                self.in_memory -= buf.len();
                Source::Memory(Bytes::from(buf))
            }
            Store::File { path, writer } => {
                let file = writer
                    .into_inner()
                    .map_err(|e| SpillError::io(&path, e.into_error()))?;
                drop(file);
                let reader = File::open(&path).map_err(|e| SpillError::io(&path, e))?;
                Source::File {
                    reader: BufReader::with_capacity(FILE_BUFFER, reader),
                    path,
                }
            }
        };
        Ok(Replay {
            source,
            aborted: tx.aborted,
        })
    }

    fn release(&mut self, tx: Streamed) {
        if let Store::Memory(buf) = &tx.store {
            self.in_memory -= buf.len();
        }
        discard(tx.store);
    }

    fn spill_path(&mut self, xid: u32) -> Result<PathBuf, SpillError> {
        let dir = match &self.dir {
            Some(dir) => dir.clone(),
            None => {
                let parent = self.config.dir.clone().unwrap_or_else(std::env::temp_dir);
                remove_orphans(&parent);
                let dir = parent.join(format!(
                    "waltap-spill-{}-{}",
                    std::process::id(),
                    SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
                ));
                fs::create_dir_all(&dir).map_err(|e| SpillError::io(&dir, e))?;
                self.dir = Some(dir.clone());
                dir
            }
        };
        Ok(dir.join(format!("{xid}.spill")))
    }
}

/// Deletes the spill directories that processes killed before they could clean up left
/// in `parent` (`waltap-spill-<pid>-<n>` of a pid that no longer runs). Best effort, and
/// only where `/proc` tells which processes run.
fn remove_orphans(parent: &std::path::Path) {
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("waltap-spill-"))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new("/proc").join(pid.to_string()).exists() {
            tracing::info!(dir = %entry.path().display(), "removing the spill directory of a process that is gone");
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        self.reset();
        if let Some(dir) = self.dir.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

fn discard(store: Store) {
    if let Store::File { path, writer } = store {
        drop(writer);
        let _ = fs::remove_file(path);
    }
}

enum Source {
    Memory(Bytes),
    File {
        reader: BufReader<File>,
        path: PathBuf,
    },
}

/// The records of a committed streamed transaction, read back one at a time so memory
/// does not grow with the transaction. Removes its file when dropped.
pub struct Replay {
    source: Source,
    aborted: HashSet<u32>,
}

impl Replay {
    /// The next payload that survived the subtransaction aborts; `None` at the end.
    pub fn next_payload(&mut self) -> Result<Option<Bytes>, SpillError> {
        loop {
            let Some((subxid, payload)) = self.next_record()? else {
                return Ok(None);
            };
            if subxid == KEEP || !self.aborted.contains(&subxid) {
                return Ok(Some(payload));
            }
        }
    }

    fn next_record(&mut self) -> Result<Option<(u32, Bytes)>, SpillError> {
        match &mut self.source {
            Source::Memory(buf) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let corrupt = || SpillError::Corrupt {
                    path: PathBuf::from("(memory)"),
                    what: "record cut short",
                };
                if buf.len() < HEADER {
                    return Err(corrupt());
                }
                let header = buf.split_to(HEADER);
                let (subxid, len) = parse_header(&header);
                if buf.len() < len {
                    return Err(corrupt());
                }
                Ok(Some((subxid, buf.split_to(len))))
            }
            Source::File { reader, path } => {
                let mut header = [0u8; HEADER];
                match reader.read_exact(&mut header) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
                    Err(e) => return Err(SpillError::io(path, e)),
                }
                let (subxid, len) = parse_header(&header);
                let mut payload = vec![0u8; len];
                reader.read_exact(&mut payload).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        SpillError::Corrupt {
                            path: path.clone(),
                            what: "record cut short",
                        }
                    } else {
                        SpillError::io(path, e)
                    }
                })?;
                Ok(Some((subxid, Bytes::from(payload))))
            }
        }
    }
}

impl Drop for Replay {
    fn drop(&mut self) {
        if let Source::File { path, .. } = &self.source {
            let _ = fs::remove_file(path);
        }
    }
}

fn parse_header(header: &[u8]) -> (u32, usize) {
    let word = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&header[i..i + 4]);
        u32::from_be_bytes(b)
    };
    (word(0), word(4) as usize)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn drain(mut r: Replay) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Some(p) = r.next_payload().unwrap() {
            out.push(p);
        }
        out
    }

    fn spool(limit: usize, dir: &Path) -> Spool {
        Spool::new(SpillConfig {
            dir: Some(dir.to_path_buf()),
            memory_limit: limit,
        })
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("waltap-spill-test-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn records_come_back_in_order_from_memory_and_disk() {
        for limit in [1 << 20, 40] {
            let dir = scratch(&format!("order-{limit}"));
            let mut s = spool(limit, &dir);
            s.start(7, true).unwrap();
            for i in 0..20u8 {
                s.push(7, &[i; 5]).unwrap();
            }
            s.stop();
            assert!(s.memory_bytes() <= limit.max(HEADER + 5));
            s.start(7, false).unwrap();
            s.push(KEEP, b"rel").unwrap();
            s.stop();
            let got = drain(s.commit(7).unwrap());
            assert_eq!(got.len(), 21);
            assert_eq!(got[3].as_ref(), &[3u8; 5]);
            assert_eq!(got[20].as_ref(), b"rel");
            assert!(!s.has_open());
            assert_eq!(s.memory_bytes(), 0);
            drop(s);
            assert!(fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 0);
            let _ = fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn subtransaction_abort_drops_only_its_changes() {
        let dir = scratch("subabort");
        let mut s = spool(16, &dir);
        s.start(10, true).unwrap();
        s.push(10, b"a").unwrap();
        s.push(11, b"b").unwrap();
        s.push(KEEP, b"schema").unwrap();
        s.push(11, b"c").unwrap();
        s.push(12, b"d").unwrap();
        s.stop();
        s.abort(10, 11);
        let got = drain(s.commit(10).unwrap());
        assert_eq!(
            got,
            vec![Bytes::from("a"), Bytes::from("schema"), Bytes::from("d")]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn whole_abort_and_bracketing_errors() {
        let dir = scratch("abort");
        let mut s = spool(1 << 20, &dir);
        assert!(matches!(s.push(1, b"x"), Err(SpillError::OutsideStream)));
        assert!(matches!(
            s.start(5, false),
            Err(SpillError::MissingFirstSegment { xid: 5 })
        ));
        s.start(5, true).unwrap();
        s.push(5, b"x").unwrap();
        assert!(matches!(
            s.start(5, true),
            Err(SpillError::RestartedStream { xid: 5 })
        ));
        s.stop();
        s.abort(5, 5);
        assert!(!s.has_open());
        assert_eq!(s.memory_bytes(), 0);
        assert!(matches!(
            s.commit(5),
            Err(SpillError::UnknownTransaction { xid: 5 })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn orphaned_spill_directories_are_removed() {
        let parent = std::env::temp_dir().join(format!("waltap-orphans-{}", std::process::id()));
        let gone = parent.join("waltap-spill-2147483646-0");
        let mine = parent.join(format!("waltap-spill-{}-0", std::process::id()));
        let other = parent.join("unrelated");
        for d in [&gone, &mine, &other] {
            fs::create_dir_all(d).unwrap();
        }
        remove_orphans(&parent);
        assert!(!gone.exists(), "a dead process's directory is removed");
        assert!(
            mine.exists() && other.exists(),
            "live and foreign ones stay"
        );
        let _ = fs::remove_dir_all(&parent);
    }
}
