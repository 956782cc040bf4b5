//! The raft log as a write-ahead log in segment files, as etcd keeps its own: appends are plain
//! `write`s, durability is one `fdatasync` per group of appends, and reads are `pread`s through
//! an in-memory index. sled's own flush (its I/O buffers, a thread pool, then fsync) cost more
//! CPU per write than everything else on the write path; the log needs none of a tree.
//!
//! A segment (`log/<first index, 20 digits>.wal`) is a run of records
//! `[payload length u32][crc32 of index and payload u32][index u64][payload]`, little-endian.
//! Segments roll over at [`SEGMENT_BYTES`]; purging deletes whole segments below the mark.
//! A new segment is allocated at its full size up front (etcd does the same): an append then
//! never changes the file's size, so its `fdatasync` has no size to write back, which took a
//! quarter off its latency on ext4 here. The unused rest of a segment reads as zeros, which
//! no record starts with, so the log ends at the first all-zero tail.
//! A crash can tear only the tail of the last segment: opening truncates it at the first
//! record that does not check out. A bad record anywhere else is corruption and refuses to open.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::StoreError;

/// A segment rolls over once it holds this much.
const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;
const HEADER: usize = 4 + 4 + 8;

/// Where one entry's payload lies.
#[derive(Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u32,
}

struct Segment {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
}

pub(super) struct Wal {
    dir: PathBuf,
    /// Segments by the index they were created for, in log order.
    segments: BTreeMap<u64, Segment>,
    /// Where each entry lies, by index. Indexes only ever increase along the files; they
    /// need not be consecutive (openraft's storage suite writes gaps).
    locs: BTreeMap<u64, Loc>,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Corrupt(format!("{what} {}: {e}", path.display()))
}

impl Wal {
    /// Opens the log under `dir` (created if missing), checking every record. Records at or
    /// below `purged` are redundant (a purge whose segment deletions a crash interrupted).
    pub(super) fn open(dir: &Path, purged: Option<u64>) -> Result<Self, StoreError> {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
            if let Some(parent) = dir.parent() {
                File::open(parent)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io("syncing", parent, e))?;
            }
        }
        let mut names: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| io("listing", dir, e))?
            .filter_map(|d| {
                let name = d.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".wal")?.parse().ok()
            })
            .collect();
        names.sort_unstable();
        let mut wal = Self {
            dir: dir.to_path_buf(),
            segments: BTreeMap::new(),
            locs: BTreeMap::new(),
        };
        let count = names.len();
        for (i, name) in names.into_iter().enumerate() {
            wal.load(name, i + 1 == count, purged)?;
        }
        // What a crashed process wrote may not have reached the disk yet; what this one reads
        // back it takes as durable (earlier segments were synced when the next one started).
        if let Some(s) = wal.segments.values().last() {
            s.file.sync_data().map_err(|e| io("syncing", &s.path, e))?;
        }
        Ok(wal)
    }

    fn segment_path(&self, name: u64) -> PathBuf {
        self.dir.join(format!("{name:020}.wal"))
    }

    /// Indexes one segment; a torn tail is cut off when `last`. A whole record out of order
    /// is corruption, never a tail to cut: it was durable once.
    fn load(&mut self, name: u64, last: bool, purged: Option<u64>) -> Result<(), StoreError> {
        let path = self.segment_path(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening", &path, e))?;
        let bytes = std::fs::read(&path).map_err(|e| io("reading", &path, e))?;
        let mut at = 0usize;
        while at < bytes.len() {
            match record_at(&bytes, at) {
                Some((index, len)) if purged.is_some_and(|p| index <= p) => {
                    at += HEADER + len as usize;
                }
                Some((index, len)) => {
                    if let Some(last) = self.last_index()
                        && index <= last
                    {
                        return Err(StoreError::Corrupt(format!(
                            "{}: log entry {index} at byte {at} follows entry {last}",
                            path.display()
                        )));
                    }
                    self.locs.insert(
                        index,
                        Loc {
                            segment: name,
                            offset: (at + HEADER) as u64,
                            len,
                        },
                    );
                    at += HEADER + len as usize;
                }
                None if bytes[at..].iter().all(|b| *b == 0) => break,
                None if last => {
                    tracing::warn!(segment = %path.display(), offset = at, "cutting a torn log tail");
                    file.set_len(at as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(|e| io("truncating", &path, e))?;
                    break;
                }
                None => {
                    return Err(StoreError::Corrupt(format!(
                        "{}: bad log record at byte {at}",
                        path.display()
                    )));
                }
            }
        }
        let len = (at as u64).min(bytes.len() as u64);
        self.segments.insert(
            name,
            Segment {
                file: Arc::new(file),
                path,
                len,
            },
        );
        Ok(())
    }

    pub(super) fn len(&self) -> usize {
        self.locs.len()
    }

    /// Writes the entries (which must continue the log) and returns the file to sync for
    /// them (none for no entries).
    pub(super) fn append(
        &mut self,
        entries: &[(u64, Vec<u8>)],
    ) -> Result<Option<Arc<File>>, StoreError> {
        let Some((first, _)) = entries.first() else {
            return Ok(None);
        };
        if let Some(back) = entries.windows(2).find(|w| w[1].0 <= w[0].0) {
            return Err(StoreError::Corrupt(format!(
                "appending log entry {} after {}",
                back[1].0, back[0].0
            )));
        }
        if let Some(last) = self.last_index()
            && *first <= last
        {
            return Err(StoreError::Corrupt(format!(
                "appending log entry {first}, but the log already ends at {last}"
            )));
        }
        let roll = self
            .segments
            .last_key_value()
            .is_none_or(|(_, s)| s.len >= SEGMENT_BYTES);
        if roll {
            self.roll(*first)?;
        }
        let (&name, segment) = self
            .segments
            .last_key_value()
            .ok_or_else(|| StoreError::Corrupt("no log segment".into()))?;
        let mut buf = Vec::with_capacity(entries.iter().map(|(_, b)| HEADER + b.len()).sum());
        let mut locs = Vec::with_capacity(entries.len());
        for (index, payload) in entries {
            let len = u32::try_from(payload.len())
                .map_err(|_| StoreError::Corrupt(format!("log entry {index} over 4 GiB")))?;
            locs.push((
                *index,
                Loc {
                    segment: name,
                    offset: segment.len + (buf.len() + HEADER) as u64,
                    len,
                },
            ));
            let mut crc = crc32fast::Hasher::new();
            crc.update(&index.to_le_bytes());
            crc.update(payload);
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(&crc.finalize().to_le_bytes());
            buf.extend_from_slice(&index.to_le_bytes());
            buf.extend_from_slice(payload);
        }
        // At the segment's logical end, which a truncation may have moved back.
        let file = segment.file.clone();
        if let Err(e) = file.write_all_at(&buf, segment.len) {
            // A partial record past the end would be junk inside the log once it grows.
            let _ = file.set_len(segment.len);
            return Err(io("writing", &segment.path, e));
        }
        if let Some(s) = self.segments.get_mut(&name) {
            s.len += buf.len() as u64;
        }
        self.locs.extend(locs);
        Ok(Some(file))
    }

    /// Starts a new segment for entries from `first`; the previous one is synced first, so
    /// a later sync of the new file covers everything before it.
    fn roll(&mut self, first: u64) -> Result<(), StoreError> {
        if let Some((_, s)) = self.segments.last_key_value() {
            s.file.sync_data().map_err(|e| io("syncing", &s.path, e))?;
        }
        let path = self.segment_path(first);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io("creating", &path, e))?;
        // Where the file system cannot allocate ahead, appends grow the file as they go.
        if let Err(e) =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, SEGMENT_BYTES)
        {
            tracing::debug!(segment = %path.display(), error = %e, "log segment not preallocated");
        }
        file.sync_all().map_err(|e| io("syncing", &path, e))?;
        self.sync_dir()?;
        self.segments.insert(
            first,
            Segment {
                file: Arc::new(file),
                path,
                len: 0,
            },
        );
        Ok(())
    }

    fn sync_dir(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing", &self.dir, e))
    }

    /// Reads entries `from..to`.
    pub(super) fn read(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= to {
            return Ok(Vec::new());
        }
        self.locs
            .range(from..to)
            .map(|(&index, loc)| {
                let segment = self
                    .segments
                    .get(&loc.segment)
                    .ok_or_else(|| StoreError::Corrupt(format!("log segment {}", loc.segment)))?;
                let mut payload = vec![0; loc.len as usize];
                segment
                    .file
                    .read_exact_at(&mut payload, loc.offset)
                    .map_err(|e| io("reading", &segment.path, e))?;
                Ok((index, payload))
            })
            .collect()
    }

    /// The segment appends go to (the one to sync for everything so far).
    pub(super) fn last_file(&self) -> Option<Arc<File>> {
        self.segments.values().last().map(|s| s.file.clone())
    }

    pub(super) fn last_index(&self) -> Option<u64> {
        self.locs.last_key_value().map(|(i, _)| *i)
    }

    /// Deletes entries `>= from` and waits for the disk.
    pub(super) fn truncate_from(&mut self, from: u64) -> Result<(), StoreError> {
        let removed = self.locs.split_off(&from);
        let Some((_, &cut)) = removed.first_key_value() else {
            return Ok(());
        };
        let later: Vec<u64> = self
            .segments
            .range(cut.segment + 1..)
            .map(|(k, _)| *k)
            .collect();
        for name in later {
            if let Some(s) = self.segments.remove(&name) {
                std::fs::remove_file(&s.path).map_err(|e| io("removing", &s.path, e))?;
            }
        }
        if let Some(s) = self.segments.get_mut(&cut.segment) {
            s.len = cut.offset - HEADER as u64;
            s.file
                .set_len(s.len)
                .and_then(|()| s.file.sync_all())
                .map_err(|e| io("truncating", &s.path, e))?;
        }
        self.sync_dir()
    }

    /// Forgets entries `<= upto` and deletes the segments that held only those.
    pub(super) fn purge_upto(&mut self, upto: u64) -> Result<(), StoreError> {
        self.locs = self.locs.split_off(&upto.saturating_add(1));
        let keep_from = self.locs.first_key_value().map(|(_, l)| l.segment);
        // With nothing left, every segment goes, the last too: entries after a purge past the
        // end of the log start a segment of their own, never continue an old one.
        let dead: Vec<u64> = match keep_from {
            Some(f) => self.segments.range(..f).map(|(k, _)| *k).collect(),
            None => self.segments.keys().copied().collect(),
        };
        if dead.is_empty() {
            return Ok(());
        }
        for name in dead {
            if let Some(s) = self.segments.remove(&name) {
                std::fs::remove_file(&s.path).map_err(|e| io("removing", &s.path, e))?;
            }
        }
        self.sync_dir()
    }
}

/// The index and payload length of a whole, intact record at `at`.
fn record_at(bytes: &[u8], at: usize) -> Option<(u64, u32)> {
    let head = bytes.get(at..at + HEADER)?;
    let len = u32::from_le_bytes(head[0..4].try_into().ok()?);
    let crc = u32::from_le_bytes(head[4..8].try_into().ok()?);
    let index = u64::from_le_bytes(head[8..16].try_into().ok()?);
    let payload = bytes.get(at + HEADER..at + HEADER + len as usize)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&index.to_le_bytes());
    h.update(payload);
    (h.finalize() == crc).then_some((index, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(r: std::ops::RangeInclusive<u64>) -> Vec<(u64, Vec<u8>)> {
        r.map(|i| (i, format!("entry {i}").into_bytes())).collect()
    }

    #[test]
    fn a_torn_tail_is_cut_and_the_log_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            w.append(&entries(1..=10)).unwrap();
        }
        // A crash in the middle of writing entry 11, into the preallocated rest.
        let seg = dir.path().join(format!("{:020}.wal", 1));
        let end = Wal::open(dir.path(), None).unwrap().segments[&1].len;
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[7, 0, 0, 0, 1, 2], end).unwrap();
        drop(f);
        let mut w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(10));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), end);
        w.append(&entries(11..=12)).unwrap();
        drop(w);
        let w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.read(10, 13).unwrap()[2].1, b"entry 12");
    }

    #[test]
    fn a_bad_record_before_the_tail_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            w.append(&entries(1..=10)).unwrap();
            w.roll(11).unwrap();
            w.append(&entries(11..=12)).unwrap();
        }
        let seg = dir.path().join(format!("{:020}.wal", 1));
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[HEADER + 2] ^= 0xff;
        std::fs::write(&seg, bytes).unwrap();
        let e = Wal::open(dir.path(), None).err().unwrap().to_string();
        assert!(e.contains("bad log record at byte 0"), "{e}");
    }

    #[test]
    fn segments_roll_truncate_and_purge() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), None).unwrap();
        for chunk in 0..5u64 {
            w.append(&entries(chunk * 10 + 1..=chunk * 10 + 10))
                .unwrap();
            w.roll(chunk * 10 + 11).unwrap();
        }
        assert_eq!(w.segments.len(), 6);
        w.truncate_from(25).unwrap();
        assert_eq!(w.last_index(), Some(24));
        assert_eq!(w.segments.len(), 3, "segments after 21..=30 are gone");
        w.append(&entries(25..=26)).unwrap();
        assert_eq!(
            w.read(24, 27).unwrap()[1].1,
            b"entry 25",
            "written where the cut was"
        );
        w.purge_upto(22).unwrap();
        assert_eq!(w.segments.len(), 1);
        assert_eq!(w.read(0, 100).unwrap().first().unwrap().0, 23);
        drop(w);
        let w = Wal::open(dir.path(), Some(22)).unwrap();
        let all = w.read(0, 100).unwrap();
        assert_eq!(
            all.first().unwrap().0,
            23,
            "the purged prefix of a kept segment is skipped"
        );
        assert_eq!(all.last().unwrap(), &(26, b"entry 26".to_vec()));
        assert!(all.windows(2).all(|p| p[0].0 + 1 == p[1].0));
    }

    #[test]
    fn a_purge_past_the_end_starts_the_log_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Wal::open(dir.path(), None).unwrap();
        w.append(&entries(1..=50)).unwrap();
        w.purge_upto(1000).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(w.append(&entries(1001..=1005)).unwrap().is_some());
        drop(w);
        let w = Wal::open(dir.path(), Some(1000)).unwrap();
        assert_eq!(w.read(0, u64::MAX).unwrap().len(), 5);
        assert_eq!(w.last_index(), Some(1005));
    }

    #[test]
    fn a_whole_record_out_of_order_is_corruption_not_a_tail() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        Wal::open(a.path(), None)
            .unwrap()
            .append(&entries(1..=3))
            .unwrap();
        Wal::open(b.path(), None)
            .unwrap()
            .append(&entries(10..=12))
            .unwrap();
        std::fs::copy(
            a.path().join(format!("{:020}.wal", 1)),
            b.path().join(format!("{:020}.wal", 20)),
        )
        .unwrap();
        let e = Wal::open(b.path(), None).err().unwrap().to_string();
        assert!(e.contains("log entry 1 at byte 0 follows entry 12"), "{e}");
        let mut w = Wal::open(a.path(), None).unwrap();
        let e = w
            .append(&[(14, vec![]), (13, vec![])])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("appending log entry 13 after 14"), "{e}");
        let e = w.append(&[(3, vec![])]).err().unwrap().to_string();
        assert!(
            e.contains("appending log entry 3, but the log already ends at 3"),
            "{e}"
        );
    }

    #[test]
    fn a_preallocated_segment_keeps_its_size_and_ends_at_its_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let seg = dir.path().join(format!("{:020}.wal", 1));
        {
            let mut w = Wal::open(dir.path(), None).unwrap();
            w.append(&entries(1..=10)).unwrap();
        }
        // Allocated whole (on file systems that can), appends inside it.
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), SEGMENT_BYTES);
        let mut w = Wal::open(dir.path(), None).unwrap();
        assert_eq!(w.last_index(), Some(10));
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), SEGMENT_BYTES);
        w.append(&entries(11..=12)).unwrap();
        w.roll(13).unwrap();
        w.append(&entries(13..=14)).unwrap();
        drop(w);
        // The first segment's zero tail, no longer the last, is not corruption either.
        let w = Wal::open(dir.path(), None).unwrap();
        let all = w.read(0, 100).unwrap();
        assert_eq!(all.len(), 14);
        assert_eq!(all[11].1, b"entry 12");
    }
}
