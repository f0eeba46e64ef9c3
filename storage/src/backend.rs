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
}

impl Table {
    pub(crate) const ALL: [Table; 8] = [
        Table::Participants,
        Table::Jobs,
        Table::Rounds,
        Table::Models,
        Table::Audit,
        Table::Meta,
        Table::StrategyState,
        Table::Statistics,
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

/// State in a redb database file.
pub struct RedbBackend {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend")
            .field("path", &self.path)
            .finish()
    }
}

fn table_def(t: Table) -> redb::TableDefinition<'static, &'static str, &'static [u8]> {
    redb::TableDefinition::new(t.name())
}

impl RedbBackend {
    /// Opens (or creates) the database at `path`, creating every table.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        let err = |e: &dyn std::fmt::Display| StateError::Db {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
        }
        let db = redb::Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        for t in Table::ALL {
            tx.open_table(table_def(t)).map_err(|e| err(&e))?;
        }
        tx.commit().map_err(|e| err(&e))?;
        Ok(RedbBackend {
            db,
            path: path.to_path_buf(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Db {
            path: self.path.clone(),
            message: e.to_string(),
        }
    }
}

impl Backend for RedbBackend {
    fn commit(&self, writes: &[Write]) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
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

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StateError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.get(key)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.err(e))? {
            let (k, v) = entry.map_err(|e| self.err(e))?;
            out.push((k.value().to_string(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn scan_prefix(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, StateError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
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

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StateError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.last()
            .map_err(|e| self.err(e))?
            .map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
    }

    fn first_key(&self, table: Table) -> Result<Option<String>, StateError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let t = tx.open_table(table_def(table)).map_err(|e| self.err(e))?;
        Ok(t.first()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| k.value().to_string()))
    }
}
