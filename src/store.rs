//! The pubsub store's file (`--store FILE`): a SQLite database in WAL mode
//! holding every retained pubsub message, so that a restarted relay serves
//! them again and every channel's ids continue above the ones given before.
//!
//! This file only speaks SQL: it opens and checks the file, reads it back,
//! and commits a group of new messages together with the rows that
//! retention dropped. Which messages form a group, and when memory sees
//! them, is `mode/pubsub/journal.rs`'s business; what is retained is
//! `mode/pubsub/store.rs`'s.
//!
//! The file is held with an exclusive lock for the relay's whole run
//! (`locking_mode=EXCLUSIVE`): a second relay on the same file is refused
//! at start instead of interleaving ids with the first. A commit is a
//! write to the WAL: once it returns, a `kill -9` loses nothing; with
//! `--store-sync full` it is also on the disk (fsync) and survives a power
//! cut.

use std::fmt;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, params};

use crate::mode::envelope::Envelope;

/// What the `format` row of a patchcord store says.
const FORMAT: &str = "patchcord-pubsub";
/// The layout of the tables below; another one is refused.
const VERSION: i64 = 1;

/// The tables of a new store. `seq` is the order of publication across
/// channels (memory-wide retention evicts the oldest first); the index
/// serves retention's deletes, which go by channel and id.
const SCHEMA: &str = "
    CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
    CREATE TABLE messages (
        seq INTEGER PRIMARY KEY,
        channel TEXT NOT NULL,
        id INTEGER NOT NULL,
        time INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX messages_by_channel ON messages (channel, id);
";

/// The WAL is truncated to this after a checkpoint, so that a burst does
/// not leave a large file behind.
const WAL_LIMIT: i64 = 4 * 1024 * 1024;

/// Free pages are given back to the file system once they are a quarter
/// of the file and at least this many.
const VACUUM_PAGES: i64 = 256;

/// How a commit reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    /// Written to the WAL (the kernel's cache) at each commit, synced at
    /// checkpoints: survives the relay being killed.
    Normal,
    /// Synced at each commit: survives the machine losing power.
    Full,
}

/// The open store: one connection, used by whoever holds the journal's
/// lock on it (a publisher that commits, the journal's thread, a DELETE).
pub struct Disk {
    connection: Connection,
    path: PathBuf,
    /// Messages in the file.
    rows: u64,
}

/// A stored message, as read back at start.
pub struct Row {
    pub channel: String,
    pub id: u64,
    pub time: SystemTime,
    pub envelope: Envelope,
    pub body: Vec<u8>,
}

/// A new message for [`Disk::commit`].
pub struct Written<'a> {
    pub channel: &'a str,
    pub id: u64,
    pub time: SystemTime,
    pub envelope: &'a Envelope,
    pub body: &'a [u8],
}

/// Why the store could not be opened or read back: the relay does not start.
#[derive(Debug)]
pub struct OpenError {
    pub path: PathBuf,
    pub reason: String,
}

/// Why a commit failed; nothing of it is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// The disk is full (SQLITE_FULL; a quota that is exceeded is an I/O
    /// error to SQLite, so [`WriteError::Failed`]).
    Full(String),
    /// Any other failure to write.
    Failed(String),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "--store {}: {}", self.path.display(), self.reason)
    }
}

impl std::error::Error for OpenError {}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteError::Full(reason) => write!(f, "the store's disk is full ({reason})"),
            WriteError::Failed(reason) => write!(f, "the store could not write ({reason})"),
        }
    }
}

impl Disk {
    /// Opens the store at `path`, creating it if there is no file (or an
    /// empty one). Refuses a file that is not a patchcord store, a corrupt
    /// one, one it cannot write and one another process holds.
    pub fn open(path: &Path, sync: SyncMode) -> Result<Disk, OpenError> {
        let fail = |reason: String| OpenError {
            path: path.to_owned(),
            reason,
        };
        if path.is_dir() {
            return Err(fail("is a directory".to_owned()));
        }
        // A new store is readable by this user alone (SQLite would make it
        // 0644 less the umask): it holds channel names, which are
        // capabilities, and message bodies. Its WAL takes the same mode.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(fail(format!("cannot be created ({error})"))),
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let connection = Connection::open_with_flags(path, flags).map_err(|e| fail(opening(&e)))?;
        // SQLite opens a write-protected file for reading only, silently.
        if connection.is_readonly("main").unwrap_or(true) {
            return Err(fail(
                "is read-only: the relay must be able to write it".to_owned(),
            ));
        }
        let disk = Disk {
            connection,
            path: path.to_owned(),
            rows: 0,
        };
        disk.prepare(sync).map_err(fail)?;
        disk.check_pages().map_err(fail)?;
        let rows = disk
            .connection
            .query_row("SELECT count(*) FROM messages", [], |row| {
                row.get::<_, i64>(0)
            })
            .map_err(|e| fail(opening(&e)))?;
        Ok(Disk {
            rows: u64::try_from(rows).unwrap_or(0),
            ..disk
        })
    }

    /// Takes the file for this process alone, refuses it if it holds other
    /// tables than a patchcord store's (before changing anything in it),
    /// creates the tables of a new store, and sets WAL mode and the sync
    /// level.
    fn prepare(&self, sync: SyncMode) -> Result<(), String> {
        let c = &self.connection;
        let sql = |e: rusqlite::Error| opening(&e);
        // No waiting on a lock another process holds: that is an error.
        c.busy_timeout(Duration::ZERO).map_err(sql)?;
        // Before WAL mode, so that the WAL index lives in this process's
        // memory (no -shm file) and the lock is kept until exit.
        c.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(sql)?;
        let tables: i64 = c
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(sql)?;
        if tables == 0 {
            // Only before the first table: pages freed by retention can
            // then be given back without rewriting the file.
            c.pragma_update(None, "auto_vacuum", "INCREMENTAL")
                .map_err(sql)?;
        } else {
            self.check_format()?;
        }
        let mode: String = c
            .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
            .map_err(sql)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(format!(
                "cannot be put in WAL mode (its journal mode stays {mode})"
            ));
        }
        let level = match sync {
            SyncMode::Normal => "NORMAL",
            SyncMode::Full => "FULL",
        };
        c.pragma_update(None, "synchronous", level).map_err(sql)?;
        c.pragma_update(None, "journal_size_limit", WAL_LIMIT)
            .map_err(sql)?;
        // A write, so that the exclusive lock is taken now (or refused now).
        c.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        let made = if tables == 0 {
            c.execute_batch(SCHEMA).and_then(|()| {
                c.execute(
                    "INSERT INTO meta (key, value) VALUES ('format', ?1), ('version', ?2), ('last_id', 0)",
                    params![FORMAT, VERSION],
                )
            })
        } else {
            Ok(0)
        };
        match made {
            Ok(_) => c.execute_batch("COMMIT").map_err(sql),
            Err(error) => {
                let _ = c.execute_batch("ROLLBACK");
                Err(opening(&error))
            }
        }
    }

    /// Refuses a database that is not a patchcord store of this version.
    fn check_format(&self) -> Result<(), String> {
        let c = &self.connection;
        let value = |key: &str| -> Result<Option<String>, String> {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| match v {
                rusqlite::types::Value::Text(t) => Some(t),
                rusqlite::types::Value::Integer(i) => Some(i.to_string()),
                _ => None,
            })
            .or_else(|e| match e {
                rusqlite::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e.to_string()),
            })
        };
        let not_ours = "is not a patchcord store (a SQLite database with other tables); \
                        give --store a new file";
        match value("format") {
            Ok(Some(format)) if format == FORMAT => {}
            Ok(_) => return Err(not_ours.to_owned()),
            Err(e) if e.contains("no such table") => return Err(not_ours.to_owned()),
            Err(e) => return Err(damaged(&e)),
        }
        if value("version")? != Some(VERSION.to_string()) {
            return Err(format!(
                "is a patchcord store of another version (this relay reads version {VERSION})"
            ));
        }
        Ok(())
    }

    /// Refuses a store whose pages are damaged.
    fn check_pages(&self) -> Result<(), String> {
        let verdict: String = self
            .connection
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(|e| damaged(&e.to_string()))?;
        if verdict != "ok" {
            return Err(damaged(&verdict));
        }
        Ok(())
    }

    /// Reads every stored message back, oldest publication first, handing
    /// each to `each`; returns the largest id ever given (messages since
    /// deleted included).
    pub fn restore(&self, mut each: impl FnMut(Row)) -> Result<u64, OpenError> {
        let fail = |reason: String| OpenError {
            path: self.path.clone(),
            reason,
        };
        let mut statement = self
            .connection
            .prepare("SELECT channel, id, time, envelope, body FROM messages ORDER BY seq")
            .map_err(|e| fail(damaged(&e.to_string())))?;
        let mut rows = statement
            .query([])
            .map_err(|e| fail(damaged(&e.to_string())))?;
        let mut last_id = 0;
        while let Some(row) = rows.next().map_err(|e| fail(damaged(&e.to_string())))? {
            let read = || -> rusqlite::Result<Option<Row>> {
                let id = u64::try_from(row.get::<_, i64>(1)?).ok();
                let micros = u64::try_from(row.get::<_, i64>(2)?).ok();
                let envelope = Envelope::from_bytes(row.get_ref(3)?.as_blob()?);
                Ok(match (id, micros, envelope) {
                    (Some(id), Some(micros), Some(envelope)) => Some(Row {
                        channel: row.get(0)?,
                        id,
                        time: UNIX_EPOCH + Duration::from_micros(micros),
                        envelope,
                        body: row.get(4)?,
                    }),
                    _ => None,
                })
            };
            match read() {
                Ok(Some(row)) => {
                    last_id = last_id.max(row.id);
                    each(row);
                }
                Ok(None) => return Err(fail(damaged("a message row holds values out of range"))),
                Err(e) => return Err(fail(damaged(&e.to_string()))),
            }
        }
        let stored: i64 = self
            .connection
            .query_row("SELECT value FROM meta WHERE key = 'last_id'", [], |r| {
                r.get(0)
            })
            .map_err(|e| fail(damaged(&e.to_string())))?;
        Ok(last_id.max(u64::try_from(stored).unwrap_or(0)))
    }

    /// Writes `written` and deletes, for each `(channel, id)` of `dropped`,
    /// that channel's messages up to that id, in one transaction; records
    /// `last_id` as the largest id given. On an error nothing was written.
    pub fn commit(
        &mut self,
        written: &[Written<'_>],
        dropped: &[(String, u64)],
        last_id: u64,
    ) -> Result<(), WriteError> {
        let deleted =
            self.write(written, dropped, last_id)
                .map_err(|e| match e.sqlite_error_code() {
                    Some(ErrorCode::DiskFull) => WriteError::Full(e.to_string()),
                    _ => WriteError::Failed(e.to_string()),
                })?;
        self.rows = (self.rows + written.len() as u64).saturating_sub(deleted);
        if deleted > 0 {
            self.vacuum();
        }
        Ok(())
    }

    /// The transaction of [`Disk::commit`]; returns how many rows it deleted.
    fn write(
        &mut self,
        written: &[Written<'_>],
        dropped: &[(String, u64)],
        last_id: u64,
    ) -> rusqlite::Result<u64> {
        let transaction = self.connection.transaction()?;
        let mut deleted = 0;
        {
            // Deletes first: the pages they free serve the inserts.
            let mut delete =
                transaction.prepare("DELETE FROM messages WHERE channel = ?1 AND id <= ?2")?;
            for (channel, upto) in dropped {
                deleted += delete.execute(params![channel, sql_int(*upto)])? as u64;
            }
            let mut insert = transaction.prepare(
                "INSERT INTO messages (channel, id, time, envelope, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for message in written {
                insert.execute(params![
                    message.channel,
                    sql_int(message.id),
                    sql_int(micros(message.time)),
                    message.envelope.to_bytes(),
                    message.body,
                ])?;
            }
            transaction.execute(
                "UPDATE meta SET value = max(value, ?1) WHERE key = 'last_id'",
                [sql_int(last_id)],
            )?;
        }
        transaction.commit()?;
        Ok(deleted)
    }

    /// Gives free pages back to the file system once they are many.
    fn vacuum(&self) {
        let count = |pragma: &str| -> i64 {
            self.connection
                .query_row(&format!("PRAGMA {pragma}"), [], |r| r.get(0))
                .unwrap_or(0)
        };
        let free = count("freelist_count");
        if free >= VACUUM_PAGES && free * 4 >= count("page_count") {
            // The pragma frees one page per step: step it to the end.
            let vacuumed = self
                .connection
                .prepare("PRAGMA incremental_vacuum")
                .and_then(|mut statement| {
                    let mut steps = statement.query([])?;
                    while steps.next()?.is_some() {}
                    Ok(())
                });
            if let Err(error) = vacuumed {
                log::warn!("store: could not give free pages back: {error}");
            }
        }
    }

    /// Messages in the file.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes on disk: the database and its WAL.
    pub fn size(&self) -> u64 {
        let mut wal = self.path.clone().into_os_string();
        wal.push("-wal");
        [self.path.as_os_str(), wal.as_os_str()]
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why opening failed, in words an operator can act on.
fn opening(error: &rusqlite::Error) -> String {
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => {
            "is not a patchcord store (not a SQLite database); give --store a new file".to_owned()
        }
        Some(ErrorCode::DatabaseCorrupt) => damaged(&error.to_string()),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
            "is in use by another process (another relay?)".to_owned()
        }
        Some(ErrorCode::ReadOnly) => "is read-only: the relay must be able to write it".to_owned(),
        Some(ErrorCode::CannotOpen) => format!("cannot be opened ({error})"),
        _ => error.to_string(),
    }
}

/// The reason for a damaged store.
fn damaged(detail: &str) -> String {
    format!(
        "is damaged ({detail}); move it aside to start with an empty store, or repair it with sqlite3's .recover"
    )
}

/// Microseconds since the Unix epoch (0 before it).
fn micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// A u64 as SQLite's signed integer (ids and times stay far below 2^63).
fn sql_int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("patchcord-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        dir.join("pubsub.db")
    }

    fn message<'a>(channel: &'a str, id: u64, envelope: &'a Envelope) -> Written<'a> {
        Written {
            channel,
            id,
            time: UNIX_EPOCH + Duration::from_micros(id),
            envelope,
            body: b"hello",
        }
    }

    #[test]
    fn messages_come_back_in_order_with_the_largest_id() {
        let path = scratch("order");
        let envelope = Envelope::text();
        {
            let mut disk = Disk::open(&path, SyncMode::Normal).expect("new store");
            let written = [
                message("/a", 10, &envelope),
                message("/b", 20, &envelope),
                message("/a", 11, &envelope),
            ];
            disk.commit(&written, &[], 99).expect("commit");
            disk.commit(&[], &[("/a".to_owned(), 10)], 99)
                .expect("delete");
            assert_eq!(disk.rows(), 2);
        }
        let disk = Disk::open(&path, SyncMode::Full).expect("reopened");
        assert_eq!(disk.rows(), 2);
        let mut rows = Vec::new();
        let last = disk
            .restore(|row| rows.push((row.channel, row.id, row.time, row.body)))
            .expect("restore");
        assert_eq!(last, 99);
        assert_eq!(
            rows,
            vec![
                (
                    "/b".to_owned(),
                    20,
                    UNIX_EPOCH + Duration::from_micros(20),
                    b"hello".to_vec()
                ),
                (
                    "/a".to_owned(),
                    11,
                    UNIX_EPOCH + Duration::from_micros(11),
                    b"hello".to_vec()
                ),
            ]
        );
    }

    #[test]
    fn a_new_store_is_private_and_a_missing_directory_is_said() {
        use std::os::unix::fs::PermissionsExt as _;
        let path = scratch("private");
        let mut disk = Disk::open(&path, SyncMode::Normal).expect("new store");
        let envelope = Envelope::text();
        disk.commit(&[message("/a", 1, &envelope)], &[], 1)
            .expect("commit");
        let wal = path.with_file_name("pubsub.db-wal");
        for file in [&path, &wal] {
            let mode = std::fs::metadata(file).expect("file").permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", file.display());
        }
        let missing = path.with_file_name("missing").join("pubsub.db");
        let error = Disk::open(&missing, SyncMode::Normal)
            .err()
            .expect("no dir");
        assert!(error.to_string().contains("cannot be created"), "{error}");
        assert!(error.to_string().contains("missing/pubsub.db"), "{error}");
    }

    #[test]
    fn a_second_opener_and_foreign_files_are_refused() {
        let path = scratch("refused");
        let held = Disk::open(&path, SyncMode::Normal).expect("new store");
        let error = Disk::open(&path, SyncMode::Normal).err().expect("in use");
        assert!(error.reason.contains("in use"), "{error}");
        drop(held);

        std::fs::write(&path, b"not a database, just text\n".repeat(100)).expect("write");
        let error = Disk::open(&path, SyncMode::Normal)
            .err()
            .expect("not sqlite");
        assert!(
            error.to_string().contains("not a patchcord store"),
            "{error}"
        );

        std::fs::remove_file(&path).expect("remove");
        let other = Connection::open(&path).expect("sqlite");
        other
            .execute_batch("CREATE TABLE notes (text TEXT)")
            .expect("table");
        drop(other);
        let error = Disk::open(&path, SyncMode::Normal)
            .err()
            .expect("foreign tables");
        assert!(error.reason.contains("other tables"), "{error}");
        // Refused before anything in it changed.
        let other = Connection::open(&path).expect("sqlite");
        let mode: String = other
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("journal mode");
        assert_eq!(mode, "delete");
    }
}
