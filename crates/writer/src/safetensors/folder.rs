//! A model folder written as a whole: the safetensors shards, the index, and side files
//! (`config.json`, tokenizer files, ...), each through an [`AtomicFile`], all committed together.
//!
//! Nothing appears under a real name until every file is complete: shards are streamed into
//! hidden temporary files beside their destinations (`.NAME.XXXX.kiln-tmp`), the index and side
//! files are staged the same way when the writer is created, and [`FolderWriter::finish`] renames
//! them all. Dropping the writer (an error, a panic, a caller giving up) deletes every temporary
//! file and any folder the writer created, so a failed run leaves nothing.
//!
//! The commit order is: weight shards, then the index, then side files, with `config.json` last.
//! `config.json` is what makes a folder loadable by `from_pretrained`, so a crash in the middle of
//! the renames (the only window) leaves a folder without it when none existed before. Before the
//! renames, weight files of an earlier save that the new set would not overwrite and that loaders
//! would still pick up are removed, as transformers' `save_pretrained` does for stale shards:
//! `model-NNNNN-of-NNNNN.safetensors` files not in the new set, `model.safetensors` when the new
//! set is sharded (transformers prefers it over an index), and `model.safetensors.index.json` when
//! it is not (vLLM filters weight files through an index when one exists). Other files in the
//! folder are never touched.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::shards::{INDEX_FILE_NAME, SINGLE_FILE_NAME};
use super::{SafetensorsError, SafetensorsSet, SafetensorsSlot, SafetensorsWriter};
use crate::{AtomicFile, WrittenFile, Xxh3Digest};

/// Buffer between the hashing writer and the temporary file.
const WRITE_BUFFER: usize = 1 << 20;

/// A file written beside the weights as given (e.g. `config.json`, `tokenizer.json`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFile {
    /// Plain file name within the folder.
    pub name: String,
    /// Its content.
    pub bytes: Vec<u8>,
}

/// A committed weight file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShard {
    /// File name within the folder.
    pub file_name: String,
    /// Header size (8-byte length, JSON and padding), i.e. where the data starts.
    pub header_len: u64,
    /// xxh3-64 of the header bytes.
    pub header_xxh3: Xxh3Digest,
    /// Size, whole-file hash and per-tensor places and hashes.
    pub file: WrittenFile,
}

/// A committed index or side file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSideFile {
    /// File name within the folder.
    pub file_name: String,
    /// Size in bytes.
    pub len: u64,
    /// xxh3-64 of the content.
    pub xxh3: Xxh3Digest,
}

/// What [`FolderWriter::finish`] committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenSet {
    /// The weight files, in shard order.
    pub shards: Vec<WrittenShard>,
    /// `model.safetensors.index.json`, when sharded.
    pub index: Option<WrittenSideFile>,
    /// The side files, in the order given.
    pub side_files: Vec<WrittenSideFile>,
    /// Stale weight files of an earlier save that were removed (file names).
    pub removed: Vec<String>,
}

struct OpenShard {
    shard: usize,
    path: PathBuf,
    file: AtomicFile,
    writer: SafetensorsWriter<BufWriter<File>>,
}

struct Staged<T> {
    file: AtomicFile,
    written: T,
}

/// Writes a [`SafetensorsSet`] and side files into a folder; see the module docs.
pub struct FolderWriter {
    dir: PathBuf,
    set: SafetensorsSet,
    /// Folders this writer created, deepest first (removed again on failure).
    created_dirs: Vec<PathBuf>,
    shards: Vec<Staged<WrittenShard>>,
    open: Option<OpenShard>,
    index: Option<Staged<WrittenSideFile>>,
    side: Vec<Staged<WrittenSideFile>>,
    committed: bool,
}

/// `model-NNNNN-of-NNNNN.safetensors` with five digits each, transformers' shard pattern.
fn is_shard_name(name: &str) -> bool {
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    name.strip_prefix("model-")
        .and_then(|r| r.strip_suffix(".safetensors"))
        .and_then(|r| r.split_once("-of-"))
        .is_some_and(|(i, n)| five_digits(i) && five_digits(n))
}

fn check_side_files(files: &[SideFile]) -> Result<(), SafetensorsError> {
    let mut seen = HashSet::new();
    for f in files {
        let n = f.name.as_str();
        let plain = !n.is_empty()
            && n != "."
            && n != ".."
            && !n.contains(['/', '\\', '\0'])
            && Path::new(n).file_name().is_some_and(|f| f == n);
        let weights = n == SINGLE_FILE_NAME || n == INDEX_FILE_NAME || is_shard_name(n);
        if !plain || weights {
            return Err(SafetensorsError::BadSideFile(f.name.clone()));
        }
        if !seen.insert(n) {
            return Err(SafetensorsError::DuplicateSideFile(f.name.clone()));
        }
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SafetensorsError + '_ {
    move |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn stage_bytes(path: &Path, bytes: &[u8]) -> Result<Staged<WrittenSideFile>, SafetensorsError> {
    let mut file = AtomicFile::create(path)?;
    file.file().write_all(bytes).map_err(io_err(path))?;
    Ok(Staged {
        file,
        written: WrittenSideFile {
            file_name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            len: bytes.len() as u64,
            xxh3: Xxh3Digest(xxhash_rust::xxh3::xxh3_64(bytes)),
        },
    })
}

impl FolderWriter {
    /// Creates `dir` if needed and stages the index and `side_files`; shards are created as their
    /// data arrives. Side files must have plain, distinct names that are not weight file names.
    pub fn create(
        dir: &Path,
        set: SafetensorsSet,
        side_files: Vec<SideFile>,
    ) -> Result<FolderWriter, SafetensorsError> {
        check_side_files(&side_files)?;
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        };
        let mut created_dirs = Vec::new();
        let mut probe = Some(dir.as_path());
        while let Some(p) = probe.filter(|p| !p.as_os_str().is_empty() && !p.exists()) {
            created_dirs.push(p.to_path_buf());
            probe = p.parent();
        }
        // From here on, dropping `writer` (on any error below) removes what was made.
        let mut writer = FolderWriter {
            dir,
            set,
            created_dirs,
            shards: Vec::new(),
            open: None,
            index: None,
            side: Vec::new(),
            committed: false,
        };
        std::fs::create_dir_all(&writer.dir).map_err(io_err(&writer.dir))?;
        if let Some(index) = writer.set.index_json() {
            let path = writer.dir.join(INDEX_FILE_NAME);
            writer.index = Some(stage_bytes(&path, index)?);
        }
        for f in &side_files {
            let path = writer.dir.join(&f.name);
            let staged = stage_bytes(&path, &f.bytes)?;
            writer.side.push(staged);
        }
        Ok(writer)
    }

    /// The set being written.
    pub fn set(&self) -> &SafetensorsSet {
        &self.set
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn slot(&self, index: usize) -> Option<&SafetensorsSlot> {
        let (shard, local) = self.set.locate(index)?;
        self.set.shards().get(shard)?.layout.tensors().get(local)
    }

    /// Write index of the tensor that receives the next bytes (zero-byte tensors, which need no
    /// data, are skipped); [`SafetensorsSet::len`] when all are written.
    pub fn next_index(&self) -> usize {
        let mut next = match &self.open {
            Some(o) => self.set.start_of(o.shard) + o.writer.next_index(),
            None => self.set.start_of(self.shards.len()),
        };
        while self.slot(next).is_some_and(|s| s.nbytes == 0) {
            next += 1;
        }
        next
    }

    fn open_shard(&mut self, shard: usize) -> Result<(), SafetensorsError> {
        let Some(planned) = self.set.shards().get(shard) else {
            return Err(SafetensorsError::OutOfOrder {
                expected: self.next_index(),
                actual: self.set.start_of(shard),
                next: None,
            });
        };
        let path = self.dir.join(&planned.file_name);
        let layout = planned.layout.clone();
        let mut file = AtomicFile::create(&path)?;
        // A second handle on the same open file, so the buffered writer can own it while the
        // `AtomicFile` stays available for the commit.
        let handle = file.file().try_clone().map_err(io_err(&path))?;
        let writer = SafetensorsWriter::new(BufWriter::with_capacity(WRITE_BUFFER, handle), layout)
            .map_err(|e| with_path(e, &path))?;
        self.open = Some(OpenShard {
            shard,
            path,
            file,
            writer,
        });
        Ok(())
    }

    /// Finishes the open shard (it must be complete) and stages it for the commit.
    fn stage_open(&mut self) -> Result<(), SafetensorsError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        let header_len = open.writer.layout().data_offset();
        let header_xxh3 = Xxh3Digest(xxhash_rust::xxh3::xxh3_64(open.writer.layout().header()));
        let (buffered, file) = open.writer.finish().map_err(|e| with_path(e, &open.path))?;
        let handle = buffered
            .into_inner()
            .map_err(|e| io_err(&open.path)(e.into_error()))?;
        drop(handle);
        let file_name = self
            .set
            .shards()
            .get(open.shard)
            .map(|s| s.file_name.clone())
            .unwrap_or_default();
        self.shards.push(Staged {
            file: open.file,
            written: WrittenShard {
                file_name,
                header_len,
                header_xxh3,
                file,
            },
        });
        Ok(())
    }

    /// Makes `shard` the open shard, finishing and staging the shards before it.
    fn ensure_open(&mut self, shard: usize) -> Result<(), SafetensorsError> {
        loop {
            match &self.open {
                Some(o) if o.shard == shard => return Ok(()),
                Some(_) => self.stage_open()?,
                // Shards are only ever opened in order; one already staged cannot reopen.
                None if self.shards.len() > shard => {
                    return Err(SafetensorsError::OutOfOrder {
                        expected: self.next_index(),
                        actual: self.set.start_of(shard),
                        next: None,
                    })
                }
                None => self.open_shard(self.shards.len())?,
            }
        }
    }

    /// Checks the order, opens the tensor's shard (finishing the ones before it) and returns the
    /// tensor's in-file index; `None` for an accepted no-op (an empty write for a zero-byte tensor
    /// that is already complete).
    fn route(&mut self, index: usize, empty: bool) -> Result<Option<usize>, SafetensorsError> {
        let next = self.next_index();
        if empty && index < next && self.slot(index).is_some_and(|s| s.nbytes == 0) {
            return Ok(None);
        }
        let Some((shard, local)) = self.set.locate(index).filter(|_| index == next) else {
            return Err(SafetensorsError::OutOfOrder {
                expected: next,
                actual: index,
                next: self.slot(next).map(|s| s.decl.name.clone()),
            });
        };
        self.ensure_open(shard)?;
        Ok(Some(local))
    }

    /// Appends bytes of the tensor at write index `index` (see
    /// [`SafetensorsSet::write_order`]), which must be the next unfinished one. A tensor may
    /// arrive in any number of chunks. Zero-byte tensors need no call; an empty write for one is
    /// accepted.
    pub fn write_tensor_chunk(
        &mut self,
        index: usize,
        bytes: &[u8],
    ) -> Result<(), SafetensorsError> {
        let Some(local) = self.route(index, bytes.is_empty())? else {
            return Ok(());
        };
        match self.open.as_mut() {
            Some(open) => open
                .writer
                .write_tensor_chunk(local, bytes)
                .map_err(|e| with_path(e, &open.path)),
            None => Ok(()),
        }
    }

    /// Writes a whole tensor at once; its length must be the tensor's size.
    pub fn write_tensor(&mut self, index: usize, bytes: &[u8]) -> Result<(), SafetensorsError> {
        let Some(local) = self.route(index, bytes.is_empty())? else {
            return Ok(());
        };
        match self.open.as_mut() {
            Some(open) => open
                .writer
                .write_tensor(local, bytes)
                .map_err(|e| with_path(e, &open.path)),
            None => Ok(()),
        }
    }

    /// Checks that every tensor was written, then commits: removes stale weight files of an
    /// earlier save, renames the shards, the index and the side files into place (`config.json`
    /// last) and syncs the folder. If a rename fails, the files this commit already renamed are
    /// removed again.
    pub fn finish(mut self) -> Result<WrittenSet, SafetensorsError> {
        let next = self.next_index();
        if let Some(slot) = self.slot(next) {
            return Err(SafetensorsError::Incomplete {
                written: next,
                total: self.set.len(),
                next: slot.decl.name.clone(),
            });
        }
        // Remaining shards hold only zero-byte tensors (or the set is empty): create them too.
        while self.shards.len() < self.set.shards().len() {
            if self.open.is_none() {
                self.open_shard(self.shards.len())?;
            }
            self.stage_open()?;
        }
        let removed = self.remove_stale()?;

        // Commit order: shards, index, side files with `config.json` last (module docs).
        let shards = std::mem::take(&mut self.shards);
        let index = self.index.take();
        let side = std::mem::take(&mut self.side);
        let config = side
            .iter()
            .position(|s| s.written.file_name == "config.json");
        let mut files = Vec::with_capacity(shards.len() + side.len() + 1);
        let mut written_shards = Vec::with_capacity(shards.len());
        for s in shards {
            files.push(s.file);
            written_shards.push(s.written);
        }
        let written_index = index.map(|i| {
            files.push(i.file);
            i.written
        });
        let mut written_side = Vec::with_capacity(side.len());
        let mut config_file = None;
        for (i, s) in side.into_iter().enumerate() {
            if Some(i) == config {
                config_file = Some(s.file);
            } else {
                files.push(s.file);
            }
            written_side.push(s.written);
        }
        files.extend(config_file);
        commit_all(files)?;
        self.committed = true;
        Ok(WrittenSet {
            shards: written_shards,
            index: written_index,
            side_files: written_side,
            removed,
        })
    }

    /// Removes weight files of an earlier save that loaders would mix with the new set.
    fn remove_stale(&self) -> Result<Vec<String>, SafetensorsError> {
        let new: HashSet<&str> = self
            .set
            .shards()
            .iter()
            .map(|s| s.file_name.as_str())
            .collect();
        let sharded = self.set.is_sharded();
        let mut removed = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(io_err(&self.dir))?;
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let stale = if is_shard_name(name) {
                !new.contains(name)
            } else if name == SINGLE_FILE_NAME {
                sharded
            } else if name == INDEX_FILE_NAME {
                !sharded
            } else {
                false
            };
            if stale && entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                std::fs::remove_file(&path).map_err(io_err(&path))?;
                removed.push(name.to_string());
            }
        }
        removed.sort();
        Ok(removed)
    }
}

/// Renames every file into place in order; if one fails, removes the ones already renamed (the
/// rest are deleted as their `AtomicFile`s drop).
fn commit_all(files: Vec<AtomicFile>) -> Result<(), SafetensorsError> {
    let mut committed = Vec::with_capacity(files.len());
    for file in files {
        let path = file.destination().to_path_buf();
        if let Err(e) = file.commit() {
            for p in &committed {
                let _ = std::fs::remove_file(p);
            }
            return Err(e.into());
        }
        committed.push(path);
    }
    Ok(())
}

/// Names the file in an error that came from a writer not bound to a path.
fn with_path(e: SafetensorsError, path: &Path) -> SafetensorsError {
    match e {
        SafetensorsError::Stream(source) => SafetensorsError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    }
}

impl Drop for FolderWriter {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        // Temporary files first (dropping an uncommitted `AtomicFile` deletes it), then the
        // folders this writer created, deepest first; `remove_dir` leaves a folder that is not
        // empty (someone else put files there) alone.
        self.open = None;
        self.shards.clear();
        self.index = None;
        self.side.clear();
        for d in &self.created_dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Dtype, SetOptions, TensorDecl};
    use super::*;

    fn set(max: Option<u64>) -> SafetensorsSet {
        SafetensorsSet::plan(
            vec![
                TensorDecl::new("a", Dtype::F32, vec![2]),
                TensorDecl::new("e", Dtype::F32, vec![0]),
                TensorDecl::new("b", Dtype::U8, vec![8]),
            ],
            &SetOptions {
                max_shard_bytes: max,
                ..SetOptions::default()
            },
        )
        .unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    fn write_everything(w: &mut FolderWriter) {
        let order: Vec<(usize, u64)> = w
            .set()
            .write_order()
            .enumerate()
            .map(|(i, (_, s))| (i, s.nbytes))
            .collect();
        for (i, n) in order {
            w.write_tensor(i, &vec![7u8; n as usize]).unwrap();
        }
    }

    #[test]
    fn side_file_names_are_checked() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "model.safetensors",
            INDEX_FILE_NAME,
            "model-00001-of-00002.safetensors",
        ] {
            assert!(
                matches!(
                    check_side_files(&[SideFile {
                        name: bad.into(),
                        bytes: vec![]
                    }]),
                    Err(SafetensorsError::BadSideFile(_))
                ),
                "{bad:?}"
            );
        }
        let f = SideFile {
            name: "config.json".into(),
            bytes: vec![],
        };
        assert!(matches!(
            check_side_files(&[f.clone(), f]),
            Err(SafetensorsError::DuplicateSideFile(_))
        ));
        assert!(check_side_files(&[SideFile {
            name: ".gitattributes".into(),
            bytes: vec![]
        }])
        .is_ok());
        assert!(is_shard_name("model-00002-of-00010.safetensors"));
        assert!(!is_shard_name("model-2-of-10.safetensors"));
        assert!(!is_shard_name("model.fp16-00001-of-00002.safetensors"));
    }

    #[test]
    fn stale_weight_files_are_replaced_and_others_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        std::fs::create_dir(&dir).unwrap();
        for n in [
            "model.safetensors",
            "model-00003-of-00009.safetensors",
            "README.md",
            "model-00001-of-00002.safetensors",
        ] {
            std::fs::write(dir.join(n), b"old").unwrap();
        }
        let mut w = FolderWriter::create(
            &dir,
            set(Some(8)),
            vec![SideFile {
                name: "config.json".into(),
                bytes: b"{}\n".to_vec(),
            }],
        )
        .unwrap();
        write_everything(&mut w);
        let written = w.finish().unwrap();
        assert_eq!(
            written.removed,
            ["model-00003-of-00009.safetensors", "model.safetensors"]
        );
        assert_eq!(
            names(&dir),
            [
                "README.md",
                "config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                INDEX_FILE_NAME
            ]
        );
        assert_eq!(std::fs::read(dir.join("README.md")).unwrap(), b"old");
        assert_eq!(written.shards.len(), 2);
        assert_eq!(written.side_files[0].len, 3);

        // Back to one file: the index of the sharded save goes, the shards are left to
        // transformers' rule (only shard-pattern files not in the new set, which are all stale).
        let mut w = FolderWriter::create(&dir, set(None), vec![]).unwrap();
        write_everything(&mut w);
        let written = w.finish().unwrap();
        assert_eq!(
            written.removed,
            [
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                INDEX_FILE_NAME
            ]
        );
        assert_eq!(
            names(&dir),
            ["README.md", "config.json", "model.safetensors"]
        );
    }

    #[test]
    fn dropping_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new/deeper");
        {
            let mut w = FolderWriter::create(
                &dir,
                set(Some(8)),
                vec![SideFile {
                    name: "tokenizer.json".into(),
                    bytes: b"{}".to_vec(),
                }],
            )
            .unwrap();
            w.write_tensor(0, &[0; 8]).unwrap();
            w.write_tensor_chunk(2, &[0; 3]).unwrap();
            assert!(matches!(
                w.write_tensor_chunk(2, &[0; 6]),
                Err(SafetensorsError::WrongTensorSize { .. })
            ));
            assert!(dir.exists());
        }
        assert_eq!(names(tmp.path()), Vec::<String>::new());

        // An existing folder stays, with only what it had.
        std::fs::create_dir(tmp.path().join("keep")).unwrap();
        std::fs::write(tmp.path().join("keep/model.safetensors"), b"old").unwrap();
        let w = FolderWriter::create(&tmp.path().join("keep"), set(None), vec![]).unwrap();
        assert!(matches!(
            w.finish(),
            Err(SafetensorsError::Incomplete { written: 0, .. })
        ));
        assert_eq!(names(&tmp.path().join("keep")), ["model.safetensors"]);
        assert_eq!(
            std::fs::read(tmp.path().join("keep/model.safetensors")).unwrap(),
            b"old"
        );
    }

    #[test]
    fn out_of_order_and_empty_tensors() {
        let tmp = tempfile::tempdir().unwrap();
        let mut w = FolderWriter::create(tmp.path(), set(Some(8)), vec![]).unwrap();
        // Write order: shard 1 holds `a` then the empty `e` (both F32, by name); shard 2 `b`.
        let order: Vec<&str> = w
            .set()
            .write_order()
            .map(|(_, s)| s.decl.name.as_str())
            .collect();
        assert_eq!(order, ["a", "e", "b"]);
        assert!(matches!(
            w.write_tensor(2, &[0; 8]),
            Err(SafetensorsError::OutOfOrder {
                expected: 0,
                actual: 2,
                ..
            })
        ));
        w.write_tensor(0, &[1; 8]).unwrap();
        // `e` needs no data; the next expected tensor is `b`.
        assert_eq!(w.next_index(), 2);
        w.write_tensor(1, &[]).unwrap();
        w.write_tensor(2, &[2; 8]).unwrap();
        let written = w.finish().unwrap();
        assert_eq!(written.shards[0].file.tensors.len(), 2);
        assert_eq!(
            written.shards[0].header_len,
            written.shards[0].file.tensors[0].file_offset
        );
    }
}
