//! Consumer groups' committed offsets: one small JSON file per group and topic,
//! `<topic>/groups/<group>.json`, always replaced atomically (temp file, fsync, rename, fsync of
//! the directory), so a crash leaves either the old or the new offsets, never a mix.
//!
//! Acknowledgements from the consumers of every partition of a group share the file. They are
//! committed like appends are: each bumps a version in memory, and whoever writes the file next
//! writes everything up to the latest version, so concurrent acks share one write.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::write_atomic;
use crate::BrokerError;

#[derive(Debug, Serialize, Deserialize)]
struct GroupFile {
    group: String,
    /// Partition → the next offset the group is to receive.
    offsets: BTreeMap<u32, u64>,
}

pub(super) struct Groups {
    dir: PathBuf,
    fsync: bool,
    groups: Mutex<BTreeMap<String, Arc<Group>>>,
}

pub(super) struct Group {
    pub name: String,
    path: PathBuf,
    fsync: bool,
    state: Mutex<State>,
    /// The version last written; held while writing.
    persisted: tokio::sync::Mutex<u64>,
}

struct State {
    offsets: BTreeMap<u32, u64>,
    version: u64,
}

/// A file name for any group name: bytes other than ASCII letters, digits, `-`, `_` and a
/// non-leading `.` are percent-encoded, so no name can escape the directory or hide itself.
fn file_name(group: &str) -> String {
    let mut out = String::with_capacity(group.len() + 5);
    for (i, byte) in group.bytes().enumerate() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' || (byte == b'.' && i > 0) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out.push_str(".json");
    out
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Groups {
    /// Reads every group of a topic. A file that cannot be read as offsets is reported and
    /// skipped: its group then starts again from the oldest record, which repeats deliveries
    /// but loses none. Blocking.
    pub fn load(dir: &Path, fsync: bool) -> io::Result<Groups> {
        std::fs::create_dir_all(dir)?;
        let mut groups = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                // A write a crash interrupted; the file it was to replace is intact.
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(file = %path.display(), "could not remove a temp file: {e}");
                }
                continue;
            }
            if !name.ends_with(".json") {
                continue;
            }
            let parsed = std::fs::read(&path).and_then(|bytes| {
                serde_json::from_slice::<GroupFile>(&bytes)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
            });
            let stored = match parsed {
                Ok(stored) if file_name(&stored.group) == name => stored,
                Ok(stored) => {
                    tracing::warn!(
                        file = %path.display(),
                        "ignoring offsets of group `{}` found under another group's name",
                        stored.group
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        file = %path.display(),
                        "ignoring unreadable consumer group offsets (the group starts over): {e}"
                    );
                    continue;
                }
            };
            let group = Group::new(dir, fsync, stored.group.clone(), stored.offsets, 0);
            groups.insert(stored.group, Arc::new(group));
        }
        Ok(Groups {
            dir: dir.to_owned(),
            fsync,
            groups: Mutex::new(groups),
        })
    }

    /// Brings back any offset past its partition's end (`ends[partition]`): after a power loss
    /// with `FsyncPolicy::Interval` the log can end before an offset acknowledged in it, and
    /// offsets handed to new records from there must not count as consumed. Blocking.
    pub fn clamp(&self, ends: &[u64]) -> io::Result<()> {
        for group in self.all() {
            let bytes = {
                let mut state = lock(&group.state);
                let mut changed = false;
                for (&partition, offset) in state.offsets.iter_mut() {
                    let Some(&end) = ends.get(partition as usize) else {
                        continue;
                    };
                    if *offset > end {
                        tracing::warn!(
                            group = %group.name,
                            partition,
                            "the group's offset {offset} is past the end of the log ({end}):                              records from {end} on will be delivered"
                        );
                        *offset = end;
                        changed = true;
                    }
                }
                if !changed {
                    continue;
                }
                group.encode(&state)?
            };
            write_atomic(&group.path, &bytes, true)?;
        }
        Ok(())
    }

    pub fn all(&self) -> Vec<Arc<Group>> {
        lock(&self.groups).values().cloned().collect()
    }

    /// The group, created (and its file written, so it is listed after a restart) if new.
    pub async fn get_or_create(&self, name: &str) -> Result<Arc<Group>, BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a consumer group needs a name",
            )));
        }
        let group = {
            let mut groups = lock(&self.groups);
            if let Some(group) = groups.get(name) {
                return Ok(Arc::clone(group));
            }
            let group = Arc::new(Group::new(
                &self.dir,
                self.fsync,
                name.to_owned(),
                BTreeMap::new(),
                1,
            ));
            groups.insert(name.to_owned(), Arc::clone(&group));
            group
        };
        group.persist(1).await?;
        Ok(group)
    }
}

impl Group {
    fn new(
        dir: &Path,
        fsync: bool,
        name: String,
        offsets: BTreeMap<u32, u64>,
        version: u64,
    ) -> Group {
        Group {
            path: dir.join(file_name(&name)),
            name,
            fsync,
            state: Mutex::new(State { offsets, version }),
            persisted: tokio::sync::Mutex::new(0),
        }
    }

    fn encode(&self, state: &State) -> io::Result<Vec<u8>> {
        let file = GroupFile {
            group: self.name.clone(),
            offsets: state.offsets.clone(),
        };
        serde_json::to_vec_pretty(&file).map_err(io::Error::other)
    }

    /// The next offset the group is to receive in `partition`, if it ever committed one there.
    pub fn committed(&self, partition: u32) -> Option<u64> {
        lock(&self.state).offsets.get(&partition).copied()
    }

    /// Sets the group's next offset in `partition` and returns once that is on disk.
    pub async fn commit(&self, partition: u32, next: u64) -> Result<(), BrokerError> {
        let version = {
            let mut state = lock(&self.state);
            state.offsets.insert(partition, next);
            state.version += 1;
            state.version
        };
        self.persist(version).await
    }

    /// Writes the offsets unless a write since `version` was made already did.
    async fn persist(&self, version: u64) -> Result<(), BrokerError> {
        let mut persisted = self.persisted.lock().await;
        if *persisted >= version {
            return Ok(());
        }
        let (bytes, latest) = {
            let state = lock(&self.state);
            (self.encode(&state)?, state.version)
        };
        let path = self.path.clone();
        let fsync = self.fsync;
        tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, fsync))
            .await
            .map_err(|_| BrokerError::Closed)?
            .map_err(BrokerError::from_io)?;
        *persisted = latest;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_group_name_is_one_plain_file_name() {
        assert_eq!(file_name("billing"), "billing.json");
        assert_eq!(file_name("billing.v2"), "billing.v2.json");
        assert_eq!(file_name("../etc"), "%2E.%2Fetc.json");
        assert_eq!(file_name(".hidden"), "%2Ehidden.json");
        assert_eq!(file_name("a b\n"), "a%20b%0A.json");
        assert_ne!(file_name("a/b"), file_name("a%2Fb"));
    }
}
