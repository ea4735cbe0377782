//! Atomic output files.

use std::fs::File;
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

use crate::WriteError;

/// A file that appears at its destination only when [`AtomicFile::commit`] succeeds.
///
/// The bytes go to a temporary file in the destination's folder (so the final rename never
/// crosses file systems), named `.<name>.<random>.kiln-tmp`, which nothing mistakes for a finished
/// artifact. Dropping an uncommitted `AtomicFile` deletes it; a killed process leaves at most such
/// a hidden temporary file, never a truncated artifact under the real name.
#[derive(Debug)]
pub struct AtomicFile {
    temp: NamedTempFile,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file for `dest`.
    pub fn create(dest: &Path) -> Result<AtomicFile, WriteError> {
        let name = dest
            .file_name()
            .ok_or_else(|| WriteError::BadDestination(dest.to_path_buf()))?;
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let temp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".kiln-tmp")
            .tempfile_in(&dir)
            .map_err(|e| WriteError::Io {
                path: dir.clone(),
                source: e,
            })?;
        Ok(AtomicFile {
            temp,
            dest: dest.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Where the file will appear.
    pub fn destination(&self) -> &Path {
        &self.dest
    }

    /// Flushes the data to disk, renames the temporary file over the destination, and syncs the
    /// folder so the rename itself survives a crash.
    pub fn commit(self) -> Result<(), WriteError> {
        let dest = self.dest;
        let io = |e: std::io::Error| WriteError::Io {
            path: dest.clone(),
            source: e,
        };
        // The temporary file is private (0600); an artifact gets the permissions of the file it
        // replaces, or the usual 0644, so that others (a model server, CI uploaders) can read it.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&dest)
                .map(|m| m.permissions().mode() & 0o7777)
                .unwrap_or(0o644);
            self.temp
                .as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(io)?;
        }
        self.temp.as_file().sync_all().map_err(io)?;
        self.temp.persist(&dest).map_err(|e| io(e.error))?;
        #[cfg(unix)]
        if let Some(dir) = dest.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        {
            let mut f = AtomicFile::create(&dest).unwrap();
            f.file().write_all(b"partial").unwrap();
        }
        assert!(!dest.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    #[cfg(unix)]
    fn committed_files_are_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        let mut f = AtomicFile::create(&dest).unwrap();
        f.file().write_all(b"x").unwrap();
        f.commit().unwrap();
        let mode = std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn commit_replaces_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.gguf");
        std::fs::write(&dest, b"old").unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        f.file().write_all(b"new").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"old");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
