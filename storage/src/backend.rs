//! The state's storage layer: a [`Backend`] is a transactional key-value store of a few
//! named [`Table`]s, where every [`Backend::commit`] applies all of its writes or none.
//! [`RedbBackend`] keeps them in an embedded ACID database (redb: copy-on-write B-trees,
//! fsync on commit); [`MemoryBackend`] is its in-memory twin for tests and simulations.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The tables, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Participants,
    Jobs,
    Rounds,
    Models,
    Audit,
    /// Singletons: the serving history.
    Meta,
    /// Strategies' server state (FedAdam's moments) after each job's last completed round.
    StrategyState,
    /// Jobs with tables: the federation's statistics from round 0.
    Statistics,
    /// Which model versions name each weights object (`weights \0 job \0 version`, no
    /// value), so that pruning finds an orphaned object without reading every manifest.
    WeightRefs,
}

impl Table {
    pub(crate) const ALL: [Table; 9] = [
        Table::Participants,
        Table::Jobs,
        Table::Rounds,
        Table::Models,
        Table::Audit,
        Table::Meta,
        Table::StrategyState,
        Table::Statistics,
        Table::WeightRefs,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Table::Participants => "participants",
            Table::Jobs => "jobs",
            Table::Rounds => "rounds",
            Table::Models => "models",
            Table::Audit => "audit",
            Table::Meta => "meta",
            Table::StrategyState => "strategy_state",
            Table::Statistics => "statistics",
            Table::WeightRefs => "weight_refs",
        }
    }
}

/// One write of a commit.
#[derive(Debug, Clone)]
pub enum Write {
    Put(Table, String, Vec<u8>),
    Delete(Table, String),
}

/// State that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {message}")]
    Db { path: PathBuf, message: String },
    #[error("state record {table}/{key} is not valid: {message}")]
    Corrupt {
        table: &'static str,
        key: String,
        message: String,
    },
}

/// A transactional store of byte values under string keys, in [`Table`]s.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// Applies every write, or none of them; returns once they are durable.
    fn commit(&self, writes: &[Write]) -> Result<(), StateError>;
    /// Every entry of `table`, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StateError>;
    /// One entry.
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StateError>;
    /// The entries of `table` whose keys start with `prefix`, in key order.
    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let mut all = self.scan(table)?;
        all.retain(|(k, _)| k.starts_with(prefix));
        Ok(all)
    }
    /// The entry with the greatest key.
    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StateError> {
        Ok(self.scan(table)?.pop())
    }
    /// The key of the entry with the least key.
    fn first_key(&self, table: Table) -> Result<Option<String>, StateError> {
        Ok(self.scan(table)?.into_iter().next().map(|(k, _)| k))
    }
    /// How many entries `table` holds.
    fn count(&self, table: Table) -> Result<u64, StateError> {
        Ok(self.scan(table)?.len() as u64)
    }
    /// Gives the space of removed entries back to the file system, where the backend has a
    /// file: its size (bytes) before and after. `None` where there is nothing to compact.
    fn compact(&self) -> Result<Option<(u64, u64)>, StateError> {
        Ok(None)
    }
}

/// The in-memory twin of [`RedbBackend`].
#[derive(Debug, Default)]
pub struct MemoryBackend {
    tables: Mutex<BTreeMap<Table, BTreeMap<String, Vec<u8>>>>,
}

impl Backend for MemoryBackend {
    fn commit(&self, writes: &[Write]) -> Result<(), StateError> {
        let mut t = self.tables.lock().expect("state lock");
        for w in writes {
            match w {
                Write::Put(table, k, v) => {
                    t.entry(*table).or_default().insert(k.clone(), v.clone());
                }
                Write::Delete(table, k) => {
                    t.entry(*table).or_default().remove(k);
                }
            }
        }
        Ok(())
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        let t = self.tables.lock().expect("state lock");
        Ok(t.get(&table).and_then(|m| m.get(key).cloned()))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let t = self.tables.lock().expect("state lock");
        Ok(t.get(&table)
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default())
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        let t = self.tables.lock().expect("state lock");
        Ok(t.get(&table)
            .map(|m| {
                m.range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StateError> {
        let t = self.tables.lock().expect("state lock");
        Ok(t.get(&table)
            .and_then(|m| m.last_key_value())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn first_key(&self, table: Table) -> Result<Option<String>, StateError> {
        let t = self.tables.lock().expect("state lock");
        Ok(t.get(&table).and_then(|m| m.keys().next().cloned()))
    }
}

/// Opens the database a [`RedbBackend`] uses (again, after a failure).
type Opener = Box<dyn Fn() -> Result<redb::Database, String> + Send + Sync>;

/// State in a redb database file.
///
/// After an I/O error (a full disk, a file system remounted read-only), redb refuses every
/// later write on the same handle (`PreviousIo`) even once the disk has recovered. So a
/// failed operation drops the handle, and the next one opens the file again (redb repairs
/// it if need be): commits succeed again as soon as storage does, without a restart.
pub struct RedbBackend {
    /// `None` after a failure, until the next operation reopens it.
    db: std::sync::RwLock<Option<redb::Database>>,
    open: Opener,
    path: PathBuf,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("path", &self.path)
            .finish()
    }
}

/// The database's page cache. redb's default (1 GiB) lets the cache follow the file, so the
/// coordinator's memory grew with its state (0.5 KB a round in a soak). Commits touch a few
/// pages of each table; whole-table reads are rare (admin listings, pruning, start) and
/// come from the operating system's page cache on a miss.
const CACHE_BYTES: usize = 1 << 20;

fn table_def(t: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(t.name())
}

impl RedbBackend {
    /// Opens (or creates) the database at `path`, creating every table.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| StateError::Db {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        }
        let p = path.to_path_buf();
        Self::with_opener(
            path,
            Box::new(move || {
                redb::Builder::new()
                    .set_cache_size(CACHE_BYTES)
                    .create(&p)
                    .map_err(|e| e.to_string())
            }),
        )
    }

    /// A backend whose database `open` opens (named `path` in errors); every table is
    /// created on the first opening.
    pub(crate) fn with_opener(path: &Path, open: Opener) -> Result<Self, StateError> {
        let err = |e: &dyn std::fmt::Display| StateError::Db {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let db = open().map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        for t in Table::ALL {
            tx.open_table(table_def(t)).map_err(|e| err(&e))?;
        }
        tx.commit().map_err(|e| err(&e))?;
        Ok(RedbBackend {
            db: std::sync::RwLock::new(Some(db)),
            open,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `f` on the database, opening it first if a failure dropped it; a failure of
    /// `f` drops it in turn.
    fn with<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StateError>,
    ) -> Result<T, StateError> {
        fn lock<G>(r: std::sync::LockResult<G>) -> G {
            r.unwrap_or_else(std::sync::PoisonError::into_inner)
        }
        let r = loop {
            let g = lock(self.db.read());
            if let Some(db) = g.as_ref() {
                break f(db);
            }
            drop(g);
            let mut w = lock(self.db.write());
            if w.is_none() {
                // Opening creates a missing file: a file that went away (a disk mounted
                // anew, a volume lost) must not come back empty, losing every job.
                if !self.path.exists() {
                    return Err(self.err(
                        "reopening: the file is gone; not creating an empty one in its place",
                    ));
                }
                *w = Some((self.open)().map_err(|e| self.err(format!("reopening: {e}")))?);
            }
        };
        if r.is_err() {
            *lock(self.db.write()) = None;
        }
        r
    }
}

impl Backend for RedbBackend {
    fn commit(&self, writes: &[Write]) -> Result<(), StateError> {
        self.with(|db| self.commit_on(db, writes))
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        self.with(|db| self.get_on(db, table, key))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        self.with(|db| self.scan_on(db, table, ""))
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        self.with(|db| self.scan_on(db, table, prefix))
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StateError> {
        self.with(|db| self.last_on(db, table))
    }

    fn first_key(&self, table: Table) -> Result<Option<String>, StateError> {
        self.with(|db| self.first_key_on(db, table))
    }

    fn count(&self, table: Table) -> Result<u64, StateError> {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        self.with(|db| {
            let tx = db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
            t.len().map_err(|e| self.err(e))
        })
    }

    /// redb reuses the pages of removed entries but never shrinks its file; compaction
    /// moves the live pages down and truncates. Other operations wait meanwhile.
    fn compact(&self) -> Result<Option<(u64, u64)>, StateError> {
        let size = || {
            std::fs::metadata(&self.path)
                .map(|m| m.len())
                .map_err(|e| self.err(e))
        };
        let before = size()?;
        // Opened by an operation first if a failure dropped it.
        self.with(|_| Ok(()))?;
        let mut db = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(d) = db.as_mut()
            && let Err(e) = d.compact()
        {
            // As after any failure: the next operation opens the file again.
            *db = None;
            return Err(self.err(format!("compacting: {e}")));
        }
        drop(db);
        Ok(Some((before, size()?)))
    }
}

impl RedbBackend {
    fn commit_on(&self, db: &redb::Database, writes: &[Write]) -> Result<(), StateError> {
        let tx = db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut open: BTreeMap<Table, redb::Table<&str, &[u8]>> = BTreeMap::new();
            for w in writes {
                let t = match w {
                    Write::Put(t, ..) | Write::Delete(t, _) => *t,
                };
                let table = match open.entry(t) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(tx.open_table(table_def(t)).map_err(|e| self.err(e))?)
                    }
                };
                match w {
                    Write::Put(_, k, v) => {
                        table
                            .insert(k.as_str(), v.as_slice())
                            .map_err(|e| self.err(e))?;
                    }
                    Write::Delete(_, k) => {
                        table.remove(k.as_str()).map_err(|e| self.err(e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| self.err(e))
    }

    fn get_on(
        &self,
        db: &redb::Database,
        table: Table,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StateError> {
        use redb::ReadableDatabase;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    /// The entries whose keys start with `prefix` (every entry for "").
    fn scan_on(
        &self,
        db: &redb::Database,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        use redb::ReadableDatabase;
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn last_on(
        &self,
        db: &redb::Database,
        table: Table,
    ) -> Result<Option<(String, Vec<u8>)>, StateError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.last()
            .map_err(|e| self.err(e))?
            .map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
    }

    fn first_key_on(
        &self,
        db: &redb::Database,
        table: Table,
    ) -> Result<Option<String>, StateError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.first()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| k.value().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn compaction_gives_removed_entries_space_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let db = RedbBackend::open(&path).unwrap();
        let value = vec![7u8; 4096];
        for batch in 0..20 {
            let writes: Vec<Write> = (0..50)
                .map(|i| Write::Put(Table::Rounds, format!("{batch:03}/{i:03}"), value.clone()))
                .collect();
            db.commit(&writes).unwrap();
        }
        db.commit(&[Write::Put(Table::Jobs, "kept".into(), b"yes".to_vec())])
            .unwrap();
        let removed: Vec<Write> = db
            .scan(Table::Rounds)
            .unwrap()
            .into_iter()
            .map(|(k, _)| Write::Delete(Table::Rounds, k))
            .collect();
        db.commit(&removed).unwrap();
        let grown = std::fs::metadata(&path).unwrap().len();
        let (before, after) = db.compact().unwrap().unwrap();
        assert_eq!(before, grown);
        assert!(after * 4 < before, "{before} → {after} bytes");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), after);
        // Still the same database, still writable.
        assert_eq!(db.get(Table::Jobs, "kept").unwrap().unwrap(), b"yes");
        db.commit(&[Write::Put(Table::Jobs, "after".into(), b"1".to_vec())])
            .unwrap();
        drop(db);
        let again = RedbBackend::open(&path).unwrap();
        assert_eq!(again.scan(Table::Jobs).unwrap().len(), 2);
        assert!(again.scan(Table::Rounds).unwrap().is_empty());
        assert_eq!(MemoryBackend::default().compact().unwrap(), None);
    }

    /// A file whose writes fail while `fail` is set (a full disk).
    #[derive(Debug)]
    struct FailingDisk {
        file: redb::backends::FileBackend,
        fail: Arc<AtomicBool>,
    }

    impl FailingDisk {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(std::io::Error::other("No space left on device"));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FailingDisk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.check()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.check()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
    }

    #[test]
    fn commits_succeed_again_once_the_disk_does_without_reopening_by_hand() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let fail = Arc::new(AtomicBool::new(false));
        let (p, f) = (path.clone(), fail.clone());
        let b = RedbBackend::with_opener(
            &path,
            Box::new(move || {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)
                    .map_err(|e| e.to_string())?;
                let disk = FailingDisk {
                    file: redb::backends::FileBackend::new(file).map_err(|e| e.to_string())?,
                    fail: f.clone(),
                };
                redb::Builder::new()
                    .create_with_backend(disk)
                    .map_err(|e| e.to_string())
            }),
        )
        .unwrap();
        let put = |k: &str| b.commit(&[Write::Put(Table::Jobs, k.into(), b"v".to_vec())]);
        put("before").unwrap();
        fail.store(true, Ordering::SeqCst);
        let e = put("during").unwrap_err().to_string();
        assert!(e.contains("state.redb"), "{e}");
        // Still failing: refused, nothing half-written.
        assert!(put("during").is_err());
        fail.store(false, Ordering::SeqCst);
        put("after").unwrap();
        let keys: Vec<String> = b
            .scan(Table::Jobs)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec!["after".to_string(), "before".into()]);
        // A file that is gone when the backend opens it again is not created anew: the
        // state waits for it (a disk being mounted again) instead of starting empty.
        fail.store(true, Ordering::SeqCst);
        put("lost").unwrap_err();
        fail.store(false, Ordering::SeqCst);
        let moved = dir.path().join("elsewhere.redb");
        std::fs::rename(&path, &moved).unwrap();
        let e = put("while gone").unwrap_err().to_string();
        assert!(e.contains("the file is gone"), "{e}");
        assert!(!path.exists(), "an empty database was created");
        std::fs::rename(&moved, &path).unwrap();
        put("back").unwrap();
        assert_eq!(b.scan(Table::Jobs).unwrap().len(), 3);
    }
}
