//! Split GGUF inputs: `<prefix>-00001-of-0000N.gguf` sets as llama.cpp's `gguf-split` (and the
//! Python converter) write them, opened and checked the way llama.cpp's model loader does.
//!
//! [`SplitGguf::open`] takes any GGUF file. Without a `split.count` key, or with a count of 0 or 1
//! (`gguf-split --merge` leaves `split.count = 0` in its output), the file is a set of one.
//! Otherwise the file is a shard: from its `split.no` and `split.count`, the exact name suffix
//! `-%05d-of-%05d.gguf` (1-based shard number) is removed to get the prefix (llama.cpp's
//! `llama_split_prefix`; the prefix must be non-empty), every shard's path is regenerated from
//! it, and all shards are opened, so passing any shard of a set opens the whole set. Each shard
//! is then checked as llama.cpp's loader checks it, and a little more:
//!
//! - every shard exists ([`SplitReadError::MissingShard`] names the missing file);
//! - shard `i` has `split.no == i` and the same `split.count` as the file opened (both u16; the
//!   loader does not compare `split.count` across shards, kiln does);
//! - shard 0's `split.tensors.count` (i32) is not negative and equals the number of tensors over
//!   all shards;
//! - no tensor name occurs in two shards.
//!
//! Keys must have the types gguf-split writes (a `split.count` stored as u32 is an error, as in
//! llama.cpp, whose loader checks types strictly).
//!
//! As in llama.cpp, only shard 0's metadata is the model's metadata. [`SplitGguf::metadata`]
//! returns it without the three split keys (`split.no`, `split.count`, `split.tensors.count`),
//! also for a set of one, because they describe the files rather than the model: llama-quantize
//! likewise removes them before writing, and a split writer sets them afresh. Other keys starting
//! with `split.` are kept. Tensors are listed in shard order, then file order within each shard,
//! which for gguf-split's output is the order of the unsplit file.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use kiln_types::{MetaValue, MetaValueType};

use crate::gguf::GgufTensorInfo;
use crate::{GgufInput, MmapAccess, ReadError};

/// Key of the 0-based shard index (u16).
pub const KEY_SPLIT_NO: &str = "split.no";
/// Key of the number of shards (u16).
pub const KEY_SPLIT_COUNT: &str = "split.count";
/// Key of the number of tensors over all shards (i32).
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// Why a (possibly split) GGUF input could not be opened. Every variant names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SplitReadError {
    /// A shard could not be read or is not a valid GGUF file.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A shard of the set does not exist.
    #[error("{path}: shard {} of {count} of this split set does not exist", .shard + 1)]
    MissingShard {
        /// The file that should hold the shard.
        path: PathBuf,
        /// Its 0-based index.
        shard: usize,
        /// Shards in the set.
        count: u16,
    },
    /// A shard's file name does not end in the suffix its split keys imply, so the other shards'
    /// names cannot be derived.
    #[error("{path}: shard {} of {count} must be named `<prefix>{suffix}`", .shard + 1)]
    BadShardName {
        /// The file.
        path: PathBuf,
        /// Its `split.no`.
        shard: u16,
        /// Its `split.count`.
        count: u16,
        /// The name suffix expected.
        suffix: String,
    },
    /// A split key is absent from a shard.
    #[error("{path}: split file lacks the key `{key}`")]
    MissingKey {
        /// The shard.
        path: PathBuf,
        /// The key.
        key: &'static str,
    },
    /// A split key has another type than gguf-split writes.
    #[error("{path}: `{key}` is stored as {}, expected {}", .found.name(), .expected.name())]
    WrongKeyType {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// The type required.
        expected: MetaValueType,
        /// The type stored.
        found: MetaValueType,
    },
    /// `split.no` is not below `split.count` in the file opened.
    #[error("{path}: split.no {no} is out of range for split.count {count}")]
    ShardOutOfRange {
        /// The file.
        path: PathBuf,
        /// Its `split.no`.
        no: u16,
        /// Its `split.count`.
        count: u16,
    },
    /// A shard's `split.no` is not its position in the set.
    #[error("{path}: split.no is {found}, expected {expected}")]
    WrongShardNo {
        /// The shard.
        path: PathBuf,
        /// Its position (0-based).
        expected: u16,
        /// Its `split.no`.
        found: u16,
    },
    /// Shards disagree on `split.count`.
    #[error("{path}: split.count is {found}, but the set has {expected} shards")]
    CountMismatch {
        /// The shard.
        path: PathBuf,
        /// The count of the file opened.
        expected: u16,
        /// This shard's count.
        found: u16,
    },
    /// `split.tensors.count` is negative.
    #[error("{path}: split.tensors.count is negative ({value})")]
    NegativeTensorCount {
        /// The first shard.
        path: PathBuf,
        /// The value stored.
        value: i32,
    },
    /// The shards hold another number of tensors than `split.tensors.count` says.
    #[error("{path}: split.tensors.count is {expected}, but the shards hold {found} tensors")]
    TensorCountMismatch {
        /// The first shard.
        path: PathBuf,
        /// `split.tensors.count`.
        expected: i32,
        /// Tensors found over all shards.
        found: usize,
    },
    /// Two shards hold a tensor of the same name.
    #[error("tensor `{tensor}` appears in both {first} and {second}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// The shard where it was seen first.
        first: PathBuf,
        /// The shard where it was seen again.
        second: PathBuf,
    },
}

/// Where a tensor of a [`SplitGguf`] lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SplitTensor {
    /// Index of the shard in [`SplitGguf::shards`].
    pub shard: usize,
    /// Index of the tensor in that shard's [`GgufInput::tensors`] (and for [`GgufInput::data`]).
    pub index: usize,
}

/// A GGUF input that may be split over several files, all mapped and checked.
#[derive(Debug)]
pub struct SplitGguf {
    shards: Vec<GgufInput>,
    paths: Vec<PathBuf>,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<SplitTensor>,
}

impl SplitGguf {
    /// Opens `path` and, if it is a shard of a split set, every shard of the set (see the
    /// [module documentation](self) for what is checked).
    pub fn open(access: &MmapAccess, path: &Path) -> Result<SplitGguf, SplitReadError> {
        let given = GgufInput::open(access, path)?;
        let count = match get_u16(&given, KEY_SPLIT_COUNT)? {
            None | Some(0 | 1) => return Ok(SplitGguf::assemble(vec![given])),
            Some(count) => count,
        };
        let no = require_u16(&given, KEY_SPLIT_NO)?;
        if no >= count {
            return Err(SplitReadError::ShardOutOfRange {
                path: path.to_path_buf(),
                no,
                count,
            });
        }
        let Some(prefix) = split_prefix(path, no, count) else {
            return Err(SplitReadError::BadShardName {
                path: path.to_path_buf(),
                shard: no,
                count,
                suffix: split_suffix(no, count),
            });
        };

        let mut given = Some(given);
        let mut shards = Vec::with_capacity(usize::from(count));
        for i in 0..count {
            let shard = match given.take_if(|_| i == no) {
                Some(shard) => shard,
                None => {
                    let shard_path = join_prefix(&prefix, i, count);
                    open_shard(access, shard_path, i, count)?
                }
            };
            let found = require_u16(&shard, KEY_SPLIT_NO)?;
            if found != i {
                return Err(SplitReadError::WrongShardNo {
                    path: shard.path().to_path_buf(),
                    expected: i,
                    found,
                });
            }
            let found = require_u16(&shard, KEY_SPLIT_COUNT)?;
            if found != count {
                return Err(SplitReadError::CountMismatch {
                    path: shard.path().to_path_buf(),
                    expected: count,
                    found,
                });
            }
            shards.push(shard);
        }

        let first = &shards[0];
        let expected = match first.get(KEY_SPLIT_TENSORS_COUNT) {
            Some(MetaValue::I32(n)) => *n,
            Some(other) => {
                return Err(SplitReadError::WrongKeyType {
                    path: first.path().to_path_buf(),
                    key: KEY_SPLIT_TENSORS_COUNT,
                    expected: MetaValueType::I32,
                    found: other.value_type(),
                })
            }
            None => {
                return Err(SplitReadError::MissingKey {
                    path: first.path().to_path_buf(),
                    key: KEY_SPLIT_TENSORS_COUNT,
                })
            }
        };
        if expected < 0 {
            return Err(SplitReadError::NegativeTensorCount {
                path: first.path().to_path_buf(),
                value: expected,
            });
        }

        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (s, shard) in shards.iter().enumerate() {
            for t in shard.tensors() {
                if let Some(&prev) = seen.get(t.name.as_str()) {
                    return Err(SplitReadError::DuplicateTensor {
                        tensor: t.name.clone(),
                        first: shards[prev].path().to_path_buf(),
                        second: shard.path().to_path_buf(),
                    });
                }
                seen.insert(&t.name, s);
            }
        }
        let found = seen.len();
        if usize::try_from(expected).ok() != Some(found) {
            return Err(SplitReadError::TensorCountMismatch {
                path: first.path().to_path_buf(),
                expected,
                found,
            });
        }
        Ok(SplitGguf::assemble(shards))
    }

    fn assemble(shards: Vec<GgufInput>) -> SplitGguf {
        let metadata = shards[0]
            .metadata()
            .iter()
            .filter(|(k, _)| !is_split_key(k))
            .cloned()
            .collect();
        let tensors = shards
            .iter()
            .enumerate()
            .flat_map(|(shard, input)| {
                (0..input.tensors().len()).map(move |index| SplitTensor { shard, index })
            })
            .collect();
        let paths = shards.iter().map(|s| s.path().to_path_buf()).collect();
        SplitGguf {
            shards,
            paths,
            metadata,
            tensors,
        }
    }

    /// Number of files (1 for an unsplit file).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The opened files, in shard order.
    pub fn shards(&self) -> &[GgufInput] {
        &self.shards
    }

    /// The files' paths, in shard order (as derived from the path given to [`SplitGguf::open`]).
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The model's metadata: shard 0's, in file order, without `split.no`, `split.count` and
    /// `split.tensors.count`.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// A value of [`SplitGguf::metadata`].
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every tensor, in shard order, then file order.
    pub fn tensors(&self) -> &[SplitTensor] {
        &self.tensors
    }

    /// The info of tensor `i` of [`SplitGguf::tensors`].
    pub fn tensor_info(&self, i: usize) -> Option<&GgufTensorInfo> {
        let t = self.tensors.get(i)?;
        self.shards[t.shard].tensors().get(t.index)
    }

    /// The bytes of tensor `i` of [`SplitGguf::tensors`] (empty for an unknown index or a tensor
    /// of unknown type, as [`GgufInput::data`]).
    pub fn tensor_data(&self, i: usize) -> &[u8] {
        self.tensors
            .get(i)
            .map_or(&[], |t| self.shards[t.shard].data(t.index))
    }

    /// The position in [`SplitGguf::tensors`] of the tensor called `name`.
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors
            .iter()
            .position(|t| self.shards[t.shard].tensors()[t.index].name == name)
    }
}

/// Whether `key` is one of the three keys that describe a split (`split.no`, `split.count`,
/// `split.tensors.count`).
pub fn is_split_key(key: &str) -> bool {
    matches!(
        key,
        KEY_SPLIT_NO | KEY_SPLIT_COUNT | KEY_SPLIT_TENSORS_COUNT
    )
}

/// The name suffix of shard `no` (0-based) of `count`: `-%05d-of-%05d.gguf`.
fn split_suffix(no: u16, count: u16) -> String {
    format!("-{:05}-of-{:05}.gguf", u32::from(no) + 1, count)
}

/// `path` without the suffix of shard `no` of `count`, as (folder, rest of the file name), if it
/// ends with the suffix and something precedes it (llama.cpp's `llama_split_prefix`). Only the
/// file name is inspected, so the folder may be any path; a file name that is not UTF-8 cannot
/// carry the suffix.
fn split_prefix(path: &Path, no: u16, count: u16) -> Option<(PathBuf, String)> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(&split_suffix(no, count))?;
    let dir = path.parent().unwrap_or(Path::new(""));
    (!stem.is_empty() || !dir.as_os_str().is_empty()).then(|| (dir.to_path_buf(), stem.to_owned()))
}

/// The path of shard `no` of `count` for a prefix from [`split_prefix`].
fn join_prefix((dir, stem): &(PathBuf, String), no: u16, count: u16) -> PathBuf {
    let mut name = OsString::from(stem);
    name.push(split_suffix(no, count));
    dir.join(name)
}

fn open_shard(
    access: &MmapAccess,
    path: PathBuf,
    shard: u16,
    count: u16,
) -> Result<GgufInput, SplitReadError> {
    GgufInput::open(access, &path).map_err(|e| match e {
        ReadError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            SplitReadError::MissingShard {
                path,
                shard: usize::from(shard),
                count,
            }
        }
        other => SplitReadError::Read(other),
    })
}

fn get_u16(input: &GgufInput, key: &'static str) -> Result<Option<u16>, SplitReadError> {
    match input.get(key) {
        None => Ok(None),
        Some(MetaValue::U16(v)) => Ok(Some(*v)),
        Some(other) => Err(SplitReadError::WrongKeyType {
            path: input.path().to_path_buf(),
            key,
            expected: MetaValueType::U16,
            found: other.value_type(),
        }),
    }
}

fn require_u16(input: &GgufInput, key: &'static str) -> Result<u16, SplitReadError> {
    get_u16(input, key)?.ok_or_else(|| SplitReadError::MissingKey {
        path: input.path().to_path_buf(),
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use kiln_types::GgmlType;

    fn access() -> MmapAccess {
        // SAFETY: the tests only map files they created and never modify while mapped.
        #[allow(unsafe_code)]
        unsafe {
            MmapAccess::new()
        }
    }

    // ------------------------------------------------------------ a tiny GGUF builder

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// Encodes a GGUF v3 file with scalar metadata (u16, i32, u32, string) and F32 tensors.
    fn gguf(kvs: &[(&str, MetaValue)], tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
        for (k, v) in kvs {
            put_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            match v {
                MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
                MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
                MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
                MetaValue::String(s) => put_str(&mut out, s),
                other => panic!("builder: unsupported value {other:?}"),
            }
        }
        let mut offset = 0u64;
        for (name, values) in tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            out.extend_from_slice(&GgmlType::F32.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + 4 * values.len() as u64).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (_, values) in tensors {
            out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.resize(out.len().next_multiple_of(32), 0);
        }
        out
    }

    fn split_keys(no: u16, total: i32, count: u16) -> Vec<(&'static str, MetaValue)> {
        vec![
            (KEY_SPLIT_NO, MetaValue::U16(no)),
            (KEY_SPLIT_TENSORS_COUNT, MetaValue::I32(total)),
            (KEY_SPLIT_COUNT, MetaValue::U16(count)),
        ]
    }

    /// A shard as gguf-split writes it: model keys on shard 0 only, then the split keys.
    fn shard(no: u16, total: i32, count: u16, tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let mut kvs = Vec::new();
        if no == 0 {
            kvs.push(("general.architecture", MetaValue::String("llama".into())));
            kvs.push(("general.file_type", MetaValue::U32(0)));
        }
        kvs.extend(split_keys(no, total, count));
        gguf(&kvs, tensors)
    }

    /// Three shards of model `m`: a, b | c | d, e.
    fn three_shards() -> Vec<Vec<u8>> {
        vec![
            shard(0, 5, 3, &[("a", vec![1.0, 2.0]), ("b", vec![3.0; 9])]),
            shard(1, 5, 3, &[("c", vec![4.0])]),
            shard(2, 5, 3, &[("d", vec![5.0]), ("e", vec![6.0, 7.0])]),
        ]
    }

    fn write_set(dir: &Path, files: &[Vec<u8>]) -> Vec<PathBuf> {
        let n = files.len() as u16;
        files
            .iter()
            .enumerate()
            .map(|(i, bytes)| {
                let p = dir.join(format!("m-{:05}-of-{n:05}.gguf", i + 1));
                std::fs::write(&p, bytes).unwrap();
                p
            })
            .collect()
    }

    fn open_err(path: &Path) -> SplitReadError {
        match SplitGguf::open(&access(), path) {
            Ok(s) => panic!("expected an error, opened {:?}", s.paths()),
            Err(e) => e,
        }
    }

    fn names(set: &SplitGguf) -> Vec<String> {
        (0..set.tensors().len())
            .map(|i| set.tensor_info(i).unwrap().name.clone())
            .collect()
    }

    // ------------------------------------------------------------ tests

    #[test]
    fn opens_a_split_set_from_any_shard() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_set(dir.path(), &three_shards());
        for p in &paths {
            let set = SplitGguf::open(&access(), p).unwrap();
            assert_eq!(set.shard_count(), 3);
            assert_eq!(set.paths(), &paths[..]);
            assert_eq!(names(&set), ["a", "b", "c", "d", "e"]);
            assert_eq!(set.tensors()[3], SplitTensor { shard: 2, index: 0 });
            let data = set.tensor_data(4);
            assert_eq!(data, [6.0f32, 7.0].map(f32::to_le_bytes).concat());
            assert_eq!(set.tensor_data(2), 4.0f32.to_le_bytes());
            assert_eq!(set.tensor_data(5), &[] as &[u8]);
            assert_eq!(set.tensor_index("d"), Some(3));
            let keys: Vec<&str> = set.metadata().iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(keys, ["general.architecture", "general.file_type"]);
            assert_eq!(set.get(KEY_SPLIT_COUNT), None);
        }
    }

    #[test]
    fn an_unsplit_file_is_a_set_of_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.gguf");
        let bytes = gguf(
            &[("general.architecture", MetaValue::String("llama".into()))],
            &[("x", vec![1.0])],
        );
        std::fs::write(&p, bytes).unwrap();
        let set = SplitGguf::open(&access(), &p).unwrap();
        assert_eq!(set.shard_count(), 1);
        assert_eq!(set.paths(), std::slice::from_ref(&p));
        assert_eq!(names(&set), ["x"]);
        assert_eq!(set.metadata().len(), 1);

        // gguf-split --merge output: split.count = 0, keys removed from the metadata.
        let merged = dir.path().join("merged.gguf");
        let mut kvs = vec![("general.architecture", MetaValue::String("llama".into()))];
        kvs.extend(split_keys(0, 1, 0));
        std::fs::write(&merged, gguf(&kvs, &[("x", vec![1.0])])).unwrap();
        let set = SplitGguf::open(&access(), &merged).unwrap();
        assert_eq!(set.shard_count(), 1);
        assert_eq!(set.metadata().len(), 1);

        // A set of one shard, named as gguf-split names it.
        let single = dir.path().join("s-00001-of-00001.gguf");
        std::fs::write(&single, shard(0, 1, 1, &[("x", vec![1.0])])).unwrap();
        let set = SplitGguf::open(&access(), &single).unwrap();
        assert_eq!(set.shard_count(), 1);
        assert_eq!(set.metadata().len(), 2);
    }

    #[test]
    fn a_missing_shard_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_set(dir.path(), &three_shards());
        std::fs::remove_file(&paths[1]).unwrap();
        match open_err(&paths[0]) {
            SplitReadError::MissingShard { path, shard, count } => {
                assert_eq!((path, shard, count), (paths[1].clone(), 1, 3));
            }
            e => panic!("{e:?}"),
        }
        std::fs::remove_file(&paths[0]).unwrap();
        assert!(matches!(
            open_err(&paths[2]),
            SplitReadError::MissingShard { shard: 0, .. }
        ));
    }

    #[test]
    fn a_wrong_split_no_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = three_shards();
        files[2] = shard(1, 5, 3, &[("d", vec![5.0]), ("e", vec![6.0, 7.0])]);
        let paths = write_set(dir.path(), &files);
        match open_err(&paths[0]) {
            SplitReadError::WrongShardNo {
                path,
                expected,
                found,
            } => assert_eq!((path, expected, found), (paths[2].clone(), 2, 1)),
            e => panic!("{e:?}"),
        }
        // Opened through the mislabelled file itself, its name no longer matches its keys.
        assert!(matches!(
            open_err(&paths[2]),
            SplitReadError::BadShardName {
                shard: 1,
                count: 3,
                ..
            }
        ));
    }

    #[test]
    fn a_wrong_tensor_count_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = three_shards();
        files[0] = shard(0, 6, 3, &[("a", vec![1.0, 2.0]), ("b", vec![3.0; 9])]);
        let paths = write_set(dir.path(), &files);
        match open_err(&paths[1]) {
            SplitReadError::TensorCountMismatch {
                path,
                expected,
                found,
            } => assert_eq!((path, expected, found), (paths[0].clone(), 6, 5)),
            e => panic!("{e:?}"),
        }
        files[0] = shard(0, -5, 3, &[("a", vec![1.0, 2.0]), ("b", vec![3.0; 9])]);
        let paths = write_set(dir.path(), &files);
        assert!(matches!(
            open_err(&paths[0]),
            SplitReadError::NegativeTensorCount { value: -5, .. }
        ));
    }

    #[test]
    fn duplicate_tensor_names_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = three_shards();
        files[2] = shard(2, 5, 3, &[("d", vec![5.0]), ("a", vec![6.0, 7.0])]);
        let paths = write_set(dir.path(), &files);
        match open_err(&paths[0]) {
            SplitReadError::DuplicateTensor {
                tensor,
                first,
                second,
            } => assert_eq!(
                (tensor.as_str(), first, second),
                ("a", paths[0].clone(), paths[2].clone())
            ),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn inconsistent_counts_and_key_types_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = three_shards();
        files[1] = shard(1, 5, 4, &[("c", vec![4.0])]);
        let paths = write_set(dir.path(), &files);
        assert!(matches!(
            open_err(&paths[0]),
            SplitReadError::CountMismatch {
                expected: 3,
                found: 4,
                ..
            }
        ));

        let mut kvs = split_keys(1, 5, 3);
        kvs[2].1 = MetaValue::U32(3);
        files[1] = gguf(&kvs, &[("c", vec![4.0])]);
        let paths = write_set(dir.path(), &files);
        assert!(matches!(
            open_err(&paths[1]),
            SplitReadError::WrongKeyType {
                key: KEY_SPLIT_COUNT,
                expected: MetaValueType::U16,
                found: MetaValueType::U32,
                ..
            }
        ));

        let kvs = vec![(KEY_SPLIT_NO, MetaValue::U16(1))];
        files[1] = gguf(&kvs, &[("c", vec![4.0])]);
        let paths = write_set(dir.path(), &files);
        assert!(matches!(
            open_err(&paths[0]),
            SplitReadError::MissingKey {
                key: KEY_SPLIT_COUNT,
                ..
            }
        ));

        let bad = dir.path().join("renamed.gguf");
        std::fs::write(&bad, &files[0]).unwrap();
        match open_err(&bad) {
            SplitReadError::BadShardName { suffix, .. } => {
                assert_eq!(suffix, "-00001-of-00003.gguf")
            }
            e => panic!("{e:?}"),
        }

        let out_of_range = dir.path().join("o-00004-of-00003.gguf");
        std::fs::write(&out_of_range, shard(3, 5, 3, &[])).unwrap();
        assert!(matches!(
            open_err(&out_of_range),
            SplitReadError::ShardOutOfRange {
                no: 3,
                count: 3,
                ..
            }
        ));
    }

    #[test]
    fn prefixes_as_llama_split_prefix() {
        let p = |s: &str, no, count| split_prefix(Path::new(s), no, count);
        assert_eq!(
            p("d/m-00002-of-00003.gguf", 1, 3),
            Some((PathBuf::from("d"), "m".to_owned()))
        );
        assert_eq!(p("d/m-00002-of-00003.gguf", 0, 3), None);
        assert_eq!(p("d/m-00002-of-00003.GGUF", 1, 3), None);
        assert_eq!(p("-00001-of-00003.gguf", 0, 3), None);
        assert_eq!(
            p("d/-00001-of-00003.gguf", 0, 3),
            Some((PathBuf::from("d"), String::new()))
        );
        let prefix = (PathBuf::from("d"), "m".to_owned());
        assert_eq!(
            join_prefix(&prefix, 9, 10),
            PathBuf::from("d/m-00010-of-00010.gguf")
        );
        assert_eq!(split_suffix(u16::MAX - 1, u16::MAX), "-65535-of-65535.gguf");
    }

    #[test]
    fn a_malformed_shard_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = three_shards();
        files[1].truncate(40);
        let paths = write_set(dir.path(), &files);
        match open_err(&paths[0]) {
            SplitReadError::Read(ReadError::Gguf { path, .. }) => assert_eq!(path, paths[1]),
            e => panic!("{e:?}"),
        }
    }

    /// llama.cpp's own split of its Q4_K_M file holds the unsplit file's metadata and tensors.
    #[test]
    fn golden_split_set_matches_the_unsplit_file() {
        let golden = Path::new("/work/shared/golden/tiny-llama");
        if !golden.exists() {
            return;
        }
        let unsplit_bytes = std::fs::read(golden.join("quant-Q4_K_M.gguf")).unwrap();
        let unsplit = GgufFile::parse(&unsplit_bytes).unwrap();
        for n in 1..=3 {
            let p = golden.join(format!("split-Q4_K_M-{n:05}-of-00003.gguf"));
            let set = SplitGguf::open(&access(), &p).unwrap();
            assert_eq!(set.shard_count(), 3);
            assert_eq!(
                set.paths()[0],
                golden.join("split-Q4_K_M-00001-of-00003.gguf")
            );
            assert_eq!(set.tensors().len(), 57);
            assert_eq!(
                set.tensors()
                    .iter()
                    .map(|t| t.shard)
                    .fold([0; 3], |mut c, s| {
                        c[s] += 1;
                        c
                    }),
                [20, 20, 17]
            );
            assert_eq!(set.metadata(), &unsplit.metadata[..]);
            for (i, expected) in unsplit.tensors.iter().enumerate() {
                let info = set.tensor_info(i).unwrap();
                assert_eq!(
                    (&info.name, &info.ne, info.ty),
                    (&expected.name, &expected.ne, expected.ty)
                );
                assert_eq!(
                    set.tensor_data(i),
                    unsplit.tensor_data(i).unwrap(),
                    "{}",
                    info.name
                );
            }
        }
    }
}
