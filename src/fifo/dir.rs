//! The bridge's directory: made whole before anyone can see it (a temporary
//! directory renamed into place, its FIFOs already open), locked while the
//! bridge lives, watched for FIFOs deleted or replaced, and removed first
//! thing at stop. Nothing that is not the bridge's own is ever deleted.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::sys;

/// The lock file that marks a directory as a bridge's, held while it lives.
const LOCK: &str = ".lock";

/// A live bridge directory.
pub struct Dir {
    pub path: PathBuf,
    /// The FIFOs made (`send`, `recv`, or both).
    names: Vec<&'static str>,
    mode: u32,
    /// Held (flock) while the bridge lives.
    _lock: File,
}

/// What the watchdog found and mended.
pub enum Mended {
    /// The FIFO was gone and was made again.
    Recreated(&'static str),
    /// A regular file stood in its place; it was moved to `.1`, and the FIFO
    /// made again.
    MovedAside(&'static str, PathBuf, u64),
}

impl Dir {
    /// Makes `path` with FIFOs `names` of `mode`; returns it and, when
    /// `send` is among them, the send FIFO opened for reading (O_RDWR, so
    /// it never sees end-of-file), opened before the directory appears.
    pub fn create(
        path: &Path,
        names: &[&'static str],
        mode: u32,
        force: bool,
    ) -> Result<(Dir, Option<File>), String> {
        let shown = path.display();
        if fs::symlink_metadata(path).is_ok() {
            clear_stale(path, force)?;
        }
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| format!("{shown}: not a directory name"))?;
        let temp = parent.join(format!(
            ".{}.tmp.{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let fail = |what: &str, e: io::Error| format!("{shown}: cannot {what}: {e}");
        fs::create_dir(&temp).map_err(|e| fail("create the directory", e))?;
        let made = (|| -> Result<(File, Option<File>), String> {
            fs::set_permissions(&temp, fs::Permissions::from_mode(0o700))
                .map_err(|e| fail("set the directory's mode", e))?;
            for name in names {
                let fifo = temp.join(name);
                sys::mkfifo(&fifo, 0o600).map_err(|e| fail("make a FIFO", e))?;
                fs::set_permissions(&fifo, fs::Permissions::from_mode(mode))
                    .map_err(|e| fail("set a FIFO's mode", e))?;
            }
            let lock = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(temp.join(LOCK))
                .map_err(|e| fail("create the lock", e))?;
            if !sys::try_lock(&lock).map_err(|e| fail("lock", e))? {
                return Err(format!("{shown}: cannot lock"));
            }
            let send = if names.contains(&"send") {
                Some(
                    sys::open(&temp.join("send"), libc::O_RDWR | libc::O_NONBLOCK)
                        .map_err(|e| fail("open the send FIFO", e))?,
                )
            } else {
                None
            };
            // Never over anything, not even an empty directory made since
            // the check: another bridge racing us fails here.
            sys::rename_noreplace(&temp, path)
                .map_err(|e| fail("move the directory into place", e))?;
            Ok((lock, send))
        })();
        match made {
            Ok((lock, send)) => Ok((
                Dir {
                    path: path.to_path_buf(),
                    names: names.to_vec(),
                    mode,
                    _lock: lock,
                },
                send,
            )),
            Err(e) => {
                remove_ours(&temp);
                Err(e)
            }
        }
    }

    /// The path of FIFO `name`.
    pub fn fifo(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Checks each FIFO: one deleted is made again; a regular file in its
    /// place (someone wrote to the path while the FIFO was gone) is moved
    /// aside, never deleted, and the FIFO made again.
    pub fn mend(&self) -> Vec<Mended> {
        let mut mended = Vec::new();
        for name in &self.names {
            let path = self.fifo(name);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_fifo() => continue,
                Ok(meta) => {
                    let secs = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs());
                    let aside = self.path.join(format!("{name}.orphaned.{secs}"));
                    if fs::rename(&path, &aside).is_err() {
                        continue;
                    }
                    if self.make(name).is_ok() {
                        mended.push(Mended::MovedAside(name, aside, meta.len()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if self.make(name).is_ok() {
                        mended.push(Mended::Recreated(name));
                    }
                }
                Err(_) => {}
            }
        }
        mended
    }

    fn make(&self, name: &str) -> io::Result<()> {
        let path = self.fifo(name);
        sys::mkfifo(&path, 0o600)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(self.mode))
    }

    /// Removes the FIFOs, the lock and the directory: later opens fail with
    /// ENOENT instead of blocking on a FIFO nobody serves. Files moved
    /// aside by [`Dir::mend`] stay, and with them the directory.
    pub fn remove(&self) {
        remove_ours(&self.path);
    }
}

/// Removes the FIFOs and the lock file of `dir`, then `dir` if empty.
fn remove_ours(dir: &Path) {
    for name in ["send", "recv"] {
        let path = dir.join(name);
        if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_fifo()) {
            let _ = fs::remove_file(&path);
        }
    }
    let _ = fs::remove_file(dir.join(LOCK));
    let _ = fs::remove_dir(dir);
}

/// `path` exists: refuses unless it is a bridge directory whose bridge is
/// gone, and then clears it only with `force`.
fn clear_stale(path: &Path, force: bool) -> Result<(), String> {
    let shown = path.display();
    let ours = is_bridge_dir(path);
    if !ours {
        return Err(format!(
            "{shown} exists and is not a bridge's directory; nothing was touched (choose another DIR)"
        ));
    }
    let lock =
        File::open(path.join(LOCK)).map_err(|e| format!("{shown}: cannot open its lock: {e}"))?;
    if !sys::try_lock(&lock).map_err(|e| format!("{shown}: {e}"))? {
        return Err(format!("{shown} is in use by a running bridge"));
    }
    if !force {
        return Err(format!(
            "{shown} was left by a bridge that did not stop cleanly (killed?); --force replaces it"
        ));
    }
    remove_ours(path);
    if path.exists() {
        return Err(format!(
            "{shown}: could not clear it (files other than the bridge's are in it)"
        ));
    }
    Ok(())
}

/// Whether `path` is a directory of ours: owned by us, holding the lock
/// file and nothing but FIFOs named `send` and `recv` besides.
fn is_bridge_dir(path: &Path) -> bool {
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let Ok(meta) = fs::symlink_metadata(path) else {
        return false;
    };
    if !meta.is_dir() || meta.uid() != uid {
        return false;
    }
    let Ok(entries) = fs::read_dir(path) else {
        return false;
    };
    let mut has_lock = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Ok(meta) = entry.metadata() else {
            return false;
        };
        match name.to_str() {
            Some(LOCK) if meta.is_file() => has_lock = true,
            Some("send" | "recv") if meta.file_type().is_fifo() && meta.uid() == uid => {}
            _ => return false,
        }
    }
    has_lock
}
