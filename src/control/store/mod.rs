//! The durable storage of a control node: the raft log in write-ahead segment files
//! ([`wal`]) and a small metadata tree in sled (vote, committed id, purge mark, the latest
//! state-machine snapshot). It stores opaque bytes; `control::raft` decides what they mean.
//! This is the only module that knows sled or the log's files.

mod wal;

use std::fs::File;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// A failed storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Locked(String),
}

/// Keys in the metadata tree.
pub mod keys {
    pub const VOTE: &str = "vote";
    pub const COMMITTED: &str = "committed";
    pub const LAST_PURGED: &str = "last_purged";
    /// Where the snapshot was kept before it had a file of its own (read once, then removed).
    pub(super) const SNAPSHOT: &str = "snapshot";
    /// The store's own: the last index purged from the log files (u64, big-endian).
    pub(super) const LOG_PURGED: &str = "log_purged_upto";
}

/// Called once the entries of one `append` are on disk (or could not be made durable).
pub type OnDurable = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A control node's log and metadata. Cloning shares the same database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log: Arc<Mutex<wal::Wal>>,
    meta: sled::Tree,
    /// The state-machine snapshot's file.
    snapshot: PathBuf,
    /// Appends waiting for the group commit, in log order, each with the file to sync.
    durable: tokio::sync::mpsc::UnboundedSender<(Arc<File>, OnDurable)>,
}

// === impl Store ===

impl Store {
    /// Opens (or creates) the store under `dir`. Only one process may hold it open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = open_db(dir)?;
        let meta = db.open_tree("meta")?;
        let purged = match meta.get(keys::LOG_PURGED)? {
            Some(mark) => Some(index_of(&mark)?),
            None => None,
        };
        let mut log = wal::Wal::open(&dir.join("log"), purged)?;
        migrate_sled_log(&db, &mut log)?;
        if let Some(mark) = purged {
            log.purge_upto(mark)?;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("trellis-log-flush".into())
            .spawn(move || group_commit(rx))
            .map_err(|e| StoreError::Corrupt(format!("starting the log flusher: {e}")))?;
        Ok(Self {
            db,
            log: Arc::new(Mutex::new(log)),
            meta,
            snapshot: dir.join("snapshot"),
            durable: tx,
        })
    }

    /// Appends entries `(index, bytes)` in one batch. They are readable when this returns;
    /// `on_durable` runs once they are fsynced. Appends that arrive while a flush is under way
    /// share the next one (group commit), so concurrent writers do not pay one fsync each.
    pub fn append(
        &self,
        entries: Vec<(u64, Vec<u8>)>,
        on_durable: OnDurable,
    ) -> Result<(), StoreError> {
        let Some(file) = self.wal().append(&entries)? else {
            on_durable(Ok(()));
            return Ok(());
        };
        if let Err(e) = self.durable.send((file, on_durable)) {
            ((e.0).1)(Err("the store is closed".into()));
        }
        Ok(())
    }

    /// Appends entries `(index, bytes)` in one batch and syncs them on this thread before it
    /// returns: for a caller that would only wait for the flusher (raft does, for everything
    /// but a leader's own entries), syncing here saves two thread hand-offs per append.
    pub fn append_synced(&self, entries: Vec<(u64, Vec<u8>)>) -> Result<(), StoreError> {
        let Some(file) = self.wal().append(&entries)? else {
            return Ok(());
        };
        file.sync_data()
            .map_err(|e| StoreError::Corrupt(format!("syncing the raft log: {e}")))
    }

    /// Waits until everything appended so far is on disk.
    pub async fn sync_log(&self) -> Result<(), StoreError> {
        let Some(file) = self.wal().last_file() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| StoreError::Corrupt(format!("syncing the raft log: {e}")))?
            .map_err(|e| StoreError::Corrupt(format!("syncing the raft log: {e}")))
    }

    fn wal(&self) -> MutexGuard<'_, wal::Wal> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries whose index is in `range`, in order.
    pub fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let (from, to) = index_span(&range);
        self.wal().read(from, to)
    }

    /// The last entry, if the log holds any.
    pub fn last_entry(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let wal = self.wal();
        match wal.last_index() {
            Some(i) => Ok(wal.read(i, i + 1)?.pop()),
            None => Ok(None),
        }
    }

    /// Deletes entries with index `>= from` (a conflicting suffix) and waits for disk.
    pub async fn truncate_from(&self, from: u64) -> Result<(), StoreError> {
        self.wal().truncate_from(from)
    }

    /// Deletes entries with index `<= upto` (compacted into a snapshot), storing `last_purged`
    /// (raft's own mark) with the store's in one flush, before the files go: a crash in
    /// between leaves entries that are merely redundant, and skipped on the next open.
    pub async fn purge_upto(&self, upto: u64, last_purged: Vec<u8>) -> Result<(), StoreError> {
        let mut marks = sled::Batch::default();
        marks.insert(keys::LAST_PURGED, last_purged);
        marks.insert(keys::LOG_PURGED, &upto.to_be_bytes());
        self.meta.apply_batch(marks)?;
        self.db.flush_async().await?;
        self.wal().purge_upto(upto)
    }

    /// How many entries the log holds.
    pub fn log_len(&self) -> usize {
        self.wal().len()
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key)?.map(|v| v.to_vec()))
    }

    /// Stores a metadata value and waits until it is on disk. sled writes a large value (a
    /// snapshot) to a file of its own at once, so that happens off the runtime's workers.
    pub async fn put_meta(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        let meta = self.meta.clone();
        let key = key.to_string();
        tokio::task::spawn_blocking(move || meta.insert(key, value))
            .await
            .map_err(|e| StoreError::Corrupt(format!("storing metadata: {e}")))??;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The state-machine snapshot last stored, if any.
    pub fn get_snapshot(&self) -> Result<Option<Vec<u8>>, StoreError> {
        match std::fs::read(&self.snapshot) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => self.get_meta(keys::SNAPSHOT),
            Err(e) => Err(StoreError::Corrupt(format!(
                "reading {}: {e}",
                self.snapshot.display()
            ))),
        }
    }

    /// Replaces the state-machine snapshot and waits until it is on disk. A file of its own,
    /// written beside the old one and renamed over it: in sled's metadata tree it was written
    /// again with each small write to the tree (the commit hint, after every entry), so a
    /// 100 MB state cost 100 MB of disk writes per API write.
    pub async fn put_snapshot(&self, bytes: Vec<u8>) -> Result<(), StoreError> {
        let path = self.snapshot.clone();
        tokio::task::spawn_blocking(move || replace_file(&path, &bytes))
            .await
            .map_err(|e| StoreError::Corrupt(format!("storing the snapshot: {e}")))??;
        if self.meta.remove(keys::SNAPSHOT)?.is_some() {
            self.db.flush_async().await?;
        }
        Ok(())
    }

    /// Stores a metadata value that may be lost in a crash (sled flushes it within a second).
    pub fn put_meta_lazy(&self, key: &str, value: Vec<u8>) -> Result<(), StoreError> {
        self.meta.insert(key, value)?;
        Ok(())
    }
}

/// Syncs once for every run of appends queued behind the previous sync (`fdatasync` of the
/// files they went to), then reports each of them durable, in order. A thread of its own, so
/// the runtime never waits on the disk. It ends when the last `Store` clone is dropped.
fn group_commit(mut rx: tokio::sync::mpsc::UnboundedReceiver<(Arc<File>, OnDurable)>) {
    while let Some((file, first)) = rx.blocking_recv() {
        let mut files = vec![file];
        let mut waiting = vec![first];
        while let Ok((file, more)) = rx.try_recv() {
            if !files.iter().any(|f| Arc::ptr_eq(f, &file)) {
                files.push(file);
            }
            waiting.push(more);
        }
        let res = files
            .iter()
            .try_for_each(|f| f.sync_data())
            .map_err(|e| format!("syncing the raft log: {e}"));
        drop(files);
        for done in waiting {
            done(res.clone());
        }
    }
}

/// `range` as `from..to` (an open end is `u64::MAX`).
pub fn index_span(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(i) => *i,
        Bound::Excluded(i) => i.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(i) => i.saturating_add(1),
        Bound::Excluded(i) => *i,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

/// Writes `path` whole or not at all: a temporary file beside it, synced, renamed over it, and
/// the directory synced.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write;
    let err = |what: &str, e: std::io::Error| {
        StoreError::Corrupt(format!("{what} {}: {e}", path.display()))
    };
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| err("creating", e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| err("writing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| err("replacing", e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err("syncing the directory of", e))?;
    }
    Ok(())
}

/// Moves a log kept in sled's `log` tree (before the log had files of its own) into the
/// files. The tree goes only once the files hold all of it, so a crash midway resumes where
/// the files end.
fn migrate_sled_log(db: &sled::Db, wal: &mut wal::Wal) -> Result<(), StoreError> {
    if !db.tree_names().iter().any(|n| n.as_ref() == b"log") {
        return Ok(());
    }
    let old = db.open_tree("log")?;
    let from = wal.last_index().map_or(0, |i| i + 1);
    let entries = old
        .range(from.to_be_bytes()..)
        .map(|kv| {
            let (k, v) = kv?;
            Ok((index_of(&k)?, v.to_vec()))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    if let Some(file) = wal.append(&entries)? {
        file.sync_data()
            .map_err(|e| StoreError::Corrupt(format!("syncing the moved raft log: {e}")))?;
        tracing::info!(
            entries = entries.len(),
            "moved the raft log from sled into log files"
        );
    }
    db.drop_tree("log")?;
    db.flush()?;
    Ok(())
}

/// How long `open` waits for a lock still held by a store that is closing: raft's background
/// tasks (a snapshot build, the last group commit) drop their clones a moment after shutdown,
/// and a node restarted by systemd may start while the old process is still exiting.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn open_db(dir: &Path) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(dir.join("raft.sled"))
            // A control plane's state is small; sled's 1 GiB default cache is not.
            .cache_capacity(64 * 1024 * 1024)
            .open();
        let locked = matches!(&opened, Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock"));
        match opened {
            Err(e) if locked && std::time::Instant::now() >= deadline => {
                return Err(StoreError::Locked(format!(
                    "{}: another trellis process holds this data directory ({e})",
                    dir.display()
                )));
            }
            Err(_) if locked => std::thread::sleep(std::time::Duration::from_millis(20)),
            other => return Ok(other?),
        }
    }
}

fn index_of(k: &[u8]) -> Result<u64, StoreError> {
    let b: [u8; 8] = k
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("log key of {} bytes", k.len())))?;
    Ok(u64::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_snapshot_moves_out_of_sled_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            assert_eq!(s.get_snapshot().unwrap(), None);
            // As an older trellis kept it.
            s.put_meta(keys::SNAPSHOT, b"old".to_vec()).await.unwrap();
            assert_eq!(s.get_snapshot().unwrap().as_deref(), Some(&b"old"[..]));
            s.put_snapshot(b"new".to_vec()).await.unwrap();
            assert_eq!(
                s.get_meta(keys::SNAPSHOT).unwrap(),
                None,
                "the sled copy is gone"
            );
            s.put_meta_lazy(keys::COMMITTED, b"1".to_vec()).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.get_snapshot().unwrap().as_deref(), Some(&b"new"[..]));
    }

    #[tokio::test]
    async fn log_orders_by_index_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel();
            let entries = (1..=300u64)
                .map(|i| (i, i.to_string().into_bytes()))
                .collect();
            s.append(entries, Box::new(move |r| drop(tx.send(r))))
                .unwrap();
            rx.await.unwrap().unwrap();
            s.truncate_from(290).await.unwrap();
            s.purge_upto(10, b"m".to_vec()).await.unwrap();
            s.put_meta(keys::VOTE, b"v".to_vec()).await.unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let all = s.entries(..).unwrap();
        assert_eq!(all.first().unwrap().0, 11);
        assert_eq!(all.last().unwrap().0, 289);
        assert!(all.windows(2).all(|w| w[0].0 + 1 == w[1].0));
        assert_eq!(s.entries(255..=256).unwrap()[1].1, b"256");
        assert_eq!(s.last_entry().unwrap().unwrap().0, 289);
        assert_eq!(s.get_meta(keys::VOTE).unwrap(), Some(b"v".to_vec()));
    }

    #[tokio::test]
    async fn a_log_kept_in_sled_moves_into_the_files_once_and_resumes_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = open_db(dir.path()).unwrap();
            let old = db.open_tree("log").unwrap();
            for i in 5..=9u64 {
                old.insert(i.to_be_bytes(), i.to_string().as_bytes())
                    .unwrap();
            }
            db.flush().unwrap();
        }
        // A crash midway through an earlier move left 5..=6 in the files.
        let mut wal = wal::Wal::open(&dir.path().join("log"), None).unwrap();
        wal.append(&[(5, b"5".to_vec()), (6, b"6".to_vec())])
            .unwrap();
        drop(wal);
        for _ in 0..2 {
            let s = Store::open(dir.path()).unwrap();
            let all = s.entries(..).unwrap();
            assert_eq!(all.len(), 5);
            assert_eq!(all[0], (5, b"5".to_vec()));
            assert_eq!(s.last_entry().unwrap().unwrap().0, 9);
            assert!(!s.db.tree_names().iter().any(|n| n.as_ref() == b"log"));
        }
    }
}
