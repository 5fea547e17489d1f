//! Versioned SQLite stores: the node's ledger and the coordinator's state
//! database each carry a schema version, and a newer binary upgrades an
//! older file in place, after a backup, or refuses one it cannot read.
//!
//! A [`Schema`] names the kind of store (written into the file as SQLite's
//! `application_id`, so a coordinator store is never opened as a ledger)
//! and lists its migrations in order: migration *n* takes a file from
//! version *n - 1* to *n* (`PRAGMA user_version`). [`open`]:
//!
//! 1. refuses a file that is not SQLite, that belongs to another kind of
//!    store, or whose version is newer than this binary knows, with what to
//!    do about it (nothing is written to it);
//! 2. copies a file it is about to upgrade to `<file>.schema-v<N>.bak`
//!    (`VACUUM INTO`: a consistent copy even under WAL), so a downgrade is a
//!    file copy;
//! 3. applies the missing migrations and the new version number in **one**
//!    transaction: a crash or error half way leaves the file as it was.
//!
//! ```no_run
//! use confer_store::{Migration, Schema};
//! fn baseline(conn: &rusqlite::Connection) -> rusqlite::Result<()> {
//!     conn.execute_batch("CREATE TABLE IF NOT EXISTS notes (body TEXT NOT NULL)")
//! }
//! const NOTES: Schema = Schema {
//!     kind: "notebook",
//!     application_id: 0x6366_6e62,
//!     legacy_tables: &["notes"],
//!     migrations: &[Migration { what: "notes", apply: baseline }],
//! };
//! let opened = confer_store::open(std::path::Path::new("notes.sqlite"), &NOTES)?;
//! assert_eq!(opened.version, 1);
//! # Ok::<(), confer_store::StoreError>(())
//! ```
//!
//! [`inspect`] answers the same questions without writing (for `confer node
//! check` and `confer coordinator check`).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};

/// The stores confer writes: `application_id`, name, and a table only its
/// files held before versions were kept. Named in the message
/// when a file of one kind is opened as another.
pub const KNOWN_KINDS: &[(i32, &str, &str)] = &[
    (NODE_LEDGER_ID, "node ledger", "releases"),
    (COORDINATOR_STORE_ID, "coordinator store", "users"),
];

/// `application_id` of a node's ledger (`cfnl`).
pub const NODE_LEDGER_ID: i32 = 0x6366_6e6c;
/// `application_id` of a coordinator's state database (`cfco`).
pub const COORDINATOR_STORE_ID: i32 = 0x6366_636f;

/// Errors opening or upgrading a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The file could not be read, created or copied.
    #[error("{0}")]
    Files(String),
    /// The file is not a SQLite database.
    #[error(
        "{path} is not a SQLite database, so it is not a confer {kind}: point the configuration at the {kind}'s own file (nothing was written to it)"
    )]
    NotSqlite {
        /// The file.
        path: PathBuf,
        /// The kind expected.
        kind: &'static str,
    },
    /// The file is another kind of store (or another program's database).
    #[error(
        "{path} holds {found}, not a confer {kind}: point the configuration at the {kind}'s own file (nothing was written to it)"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What it holds, in words.
        found: String,
        /// The kind expected.
        kind: &'static str,
    },
    /// The file was written by a newer confer.
    #[error(
        "{path} is a {kind} of schema version {found}, written by a newer confer; this binary (confer {binary}) reads versions up to {supported}. Run the newer binary, or restore the backup the upgrade left beside it ({path}.schema-v{supported}.bak) if you are going back on purpose"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// The kind of store.
        kind: &'static str,
        /// Its version.
        found: u32,
        /// The newest version this binary reads.
        supported: u32,
        /// This binary's version.
        binary: &'static str,
    },
    /// A migration failed; the file is as it was.
    #[error(
        "upgrading {path} from schema version {from} to {to} failed at \"{step}\": {error}; the file is unchanged (the upgrade runs in one transaction), and a copy is at {backup}"
    )]
    Migration {
        /// The file.
        path: PathBuf,
        /// The version it was at.
        from: u32,
        /// The version it was going to.
        to: u32,
        /// The migration that failed.
        step: &'static str,
        /// What SQLite said.
        error: String,
        /// Where the copy made before the upgrade is.
        backup: String,
    },
    /// SQLite refused something else.
    #[error("{path}: {error}")]
    Sqlite {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        error: rusqlite::Error,
    },
}

/// `pub type Result<T>` of this crate.
pub type Result<T> = std::result::Result<T, StoreError>;

/// One step of a schema: applied inside the upgrade's transaction.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// What it changes, in words (named in errors and `check`).
    pub what: &'static str,
    /// Applies it; must not open a transaction of its own.
    pub apply: fn(&Connection) -> rusqlite::Result<()>,
}

/// A kind of store and its history.
#[derive(Debug, Clone, Copy)]
pub struct Schema {
    /// The store's name in messages ("node ledger").
    pub kind: &'static str,
    /// Written into the file's header (`PRAGMA application_id`).
    pub application_id: i32,
    /// The tables files of this kind held before versions were kept: an
    /// unversioned file with none of them is another program's database.
    pub legacy_tables: &'static [&'static str],
    /// Migration *n* (1-based) takes version *n - 1* to *n*.
    pub migrations: &'static [Migration],
}

impl Schema {
    /// The version this binary writes.
    pub fn version(&self) -> u32 {
        self.migrations.len() as u32
    }
}

/// A store opened at the current version.
#[derive(Debug)]
pub struct Opened {
    /// The connection (WAL, `synchronous = FULL`, 30 s busy timeout).
    pub conn: Connection,
    /// The version it is at now (the schema's).
    pub version: u32,
    /// The version it was at (0 for a new file or one written before
    /// versions were kept).
    pub from: u32,
    /// The copy made before upgrading, if it was upgraded.
    pub backup: Option<PathBuf>,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No file yet: it is created on first start.
    Missing,
    /// At the version this binary writes.
    Current(u32),
    /// Older: opening it upgrades it (after a backup).
    Older {
        /// Its version (0: written before versions were kept).
        from: u32,
        /// The version it would be upgraded to.
        to: u32,
    },
}

fn sqlite(path: &Path) -> impl Fn(rusqlite::Error) -> StoreError + '_ {
    move |error| StoreError::Sqlite {
        path: path.to_path_buf(),
        error,
    }
}

const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// Refuses a non-empty file without SQLite's header (before SQLite would
/// touch it).
fn check_header(path: &Path, schema: &Schema) -> Result<bool> {
    use std::io::Read as _;
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => {
            return Err(StoreError::Files(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    };
    let mut head = Vec::with_capacity(16);
    file.by_ref()
        .take(16)
        .read_to_end(&mut head)
        .map_err(|e| StoreError::Files(format!("cannot read {}: {e}", path.display())))?;
    if head.is_empty() {
        return Ok(false);
    }
    if head.as_slice() != SQLITE_MAGIC {
        return Err(StoreError::NotSqlite {
            path: path.to_path_buf(),
            kind: schema.kind,
        });
    }
    Ok(true)
}

/// The file's version, after checking it is this kind of store and not
/// newer than this binary.
fn version_of(conn: &Connection, path: &Path, schema: &Schema) -> Result<u32> {
    let read = |pragma: &str| -> Result<i64> {
        conn.query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
            .map_err(|e| match e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::NotADatabase =>
                {
                    StoreError::NotSqlite {
                        path: path.to_path_buf(),
                        kind: schema.kind,
                    }
                }
                e => sqlite(path)(e),
            })
    };
    let app = read("application_id")? as i32;
    let version = read("user_version")?;
    if app != 0 && app != schema.application_id {
        let found = KNOWN_KINDS
            .iter()
            .find(|(id, _, _)| *id == app)
            .map(|(_, name, _)| format!("a confer {name}"))
            .unwrap_or_else(|| format!("another program's database (application id {app:#x})"));
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            found,
            kind: schema.kind,
        });
    }
    if app == 0 {
        // Written before versions were kept, or by something else.
        let tables: Vec<String> = {
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
                .map_err(sqlite(path))?;
            stmt.query_map([], |r| r.get(0))
                .map_err(sqlite(path))?
                .collect::<rusqlite::Result<_>>()
                .map_err(sqlite(path))?
        };
        // Another kind's files are told by the table only that kind has.
        let other = KNOWN_KINDS.iter().find(|(id, _, table)| {
            *id != schema.application_id
                && tables.iter().any(|t| t == table)
                && !schema.legacy_tables.contains(table)
        });
        if let Some((_, name, _)) = other {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                found: format!("a confer {name} written before schema versions"),
                kind: schema.kind,
            });
        }
        if !tables.is_empty()
            && !tables
                .iter()
                .any(|t| schema.legacy_tables.contains(&t.as_str()))
        {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                found: format!("another program's database (tables {})", tables.join(", ")),
                kind: schema.kind,
            });
        }
        if version != 0 {
            return Err(StoreError::Foreign {
                path: path.to_path_buf(),
                found: format!("a database of version {version} with no confer application id"),
                kind: schema.kind,
            });
        }
    }
    let version = u32::try_from(version).map_err(|_| StoreError::Foreign {
        path: path.to_path_buf(),
        found: format!("a database of version {version}"),
        kind: schema.kind,
    })?;
    if version > schema.version() {
        return Err(StoreError::Newer {
            path: path.to_path_buf(),
            kind: schema.kind,
            found: version,
            supported: schema.version(),
            binary: env!("CARGO_PKG_VERSION"),
        });
    }
    Ok(version)
}

/// What is at `path`, without writing to it.
pub fn inspect(path: &Path, schema: &Schema) -> Result<Found> {
    if !check_header(path, schema)? {
        return Ok(Found::Missing);
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite(path))?;
    let from = version_of(&conn, path, schema)?;
    Ok(if from == schema.version() {
        Found::Current(from)
    } else {
        Found::Older {
            from,
            to: schema.version(),
        }
    })
}

/// Writes a consistent copy of the store at `path` to `target` (which must
/// not exist), without writing to `path`: for trying an upgrade on a copy.
pub fn snapshot(path: &Path, target: &Path) -> Result<()> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite(path))?;
    conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])
        .map_err(|e| {
            StoreError::Files(format!(
                "cannot copy {} to {}: {e}",
                path.display(),
                target.display()
            ))
        })?;
    Ok(())
}

/// A path beside `path` that does not exist yet, for its backup.
fn backup_path(path: &Path, from: u32) -> PathBuf {
    let base = format!("{}.schema-v{from}.bak", path.display());
    let mut candidate = PathBuf::from(&base);
    let mut n = 1;
    while candidate.exists() {
        candidate = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    candidate
}

/// Opens (creating if needed) the store at `path` at the schema's version,
/// upgrading an older file after copying it aside.
pub fn open(path: &Path, schema: &Schema) -> Result<Opened> {
    let existed = check_header(path, schema)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Files(format!("cannot create {}: {e}", dir.display())))?;
    }
    let conn = Connection::open(path).map_err(sqlite(path))?;
    let from = version_of(&conn, path, schema)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(sqlite(path))?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(sqlite(path))?;
    conn.busy_timeout(std::time::Duration::from_secs(30))
        .map_err(sqlite(path))?;
    let to = schema.version();
    if from == to {
        return Ok(Opened {
            conn,
            version: to,
            from,
            backup: None,
        });
    }
    let has_tables: bool = conn
        .query_row(
            "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table'",
            [],
            |r| r.get(0),
        )
        .map_err(sqlite(path))?;
    let backup = if existed && has_tables {
        let target = backup_path(path, from);
        conn.execute("VACUUM INTO ?1", [target.to_string_lossy()])
            .map_err(|e| {
                StoreError::Files(format!(
                    "cannot copy {} to {} before upgrading it (nothing was changed): {e}",
                    path.display(),
                    target.display()
                ))
            })?;
        Some(target)
    } else {
        None
    };
    let mut conn = conn;
    {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sqlite(path))?;
        // Another process may have upgraded it meanwhile.
        let now = version_of(&tx, path, schema)?;
        for (i, step) in schema.migrations.iter().enumerate().skip(now as usize) {
            (step.apply)(&tx).map_err(|e| StoreError::Migration {
                path: path.to_path_buf(),
                from,
                to,
                step: step.what,
                error: format!("{e} (migration {} of {to})", i + 1),
                backup: backup
                    .as_ref()
                    .map(|b| b.display().to_string())
                    .unwrap_or_else(|| "(none: the file was empty)".into()),
            })?;
        }
        tx.execute_batch(&format!(
            "PRAGMA application_id = {}; PRAGMA user_version = {to};",
            schema.application_id
        ))
        .map_err(sqlite(path))?;
        tx.commit().map_err(sqlite(path))?;
    }
    Ok(Opened {
        conn,
        version: to,
        from,
        backup,
    })
}

#[cfg(test)]
mod tests;
