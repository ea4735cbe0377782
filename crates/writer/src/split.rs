//! Split GGUF output: shard planning, shard metadata and shard file names, exactly as llama.cpp's
//! `gguf-split --split` makes them (`tools/gguf-split/gguf-split.cpp`, `llama_split_path` in
//! `src/llama.cpp`), so that llama.cpp's loader opens kiln's shards and a split of the same tensors
//! and metadata is byte-identical to gguf-split's.
//!
//! The format-level pieces only; writing the shards is the caller's job: for each planned range,
//! lay out a file with [`GgufLayout::new`](crate::GgufLayout::new) from [`shard_metadata`] and the
//! range's tensor specs (alignment 32), stream it with [`GgufWriter`](crate::GgufWriter), and name it
//! with [`shard_path`].
//!
//! # gguf-split's rules, as implemented here
//!
//! - **Keys** (`LLM_KV_SPLIT_*`): `split.no` (u16, 0-based shard index), `split.tensors.count`
//!   (i32, tensors over all shards), `split.count` (u16, number of shards). Shard 0 holds every
//!   input key (minus these three, whose old values gguf-split overwrites) followed by the three
//!   keys **in the order `split.no`, `split.tensors.count`, `split.count`**: gguf-split sets
//!   `split.no`, a placeholder `split.count`, then `split.tensors.count`, and sets `split.count`
//!   again once the shard count is known; ggml's `gguf_set_val_*` removes a key and appends it, so
//!   `split.count` ends up last. (The Python converter writes `split.no`, `split.count`,
//!   `split.tensors.count`; kiln follows gguf-split, whose output the golden files are.) Shards
//!   1..n hold only the three keys, in the same order.
//! - **Tensor limit** (`--split-max-tensors N`, default 128): a new shard starts at every tensor
//!   index that is a positive multiple of N.
//! - **Size limit** (`--split-max-size 2G`): tensors are added in order while the running sum of
//!   their sizes padded to 32 bytes (metadata not counted) stays `<=` the limit; the tensor whose
//!   padded size would make the sum exceed the limit starts the next shard, and the sum restarts at
//!   that tensor's padded size. A tensor larger than the limit therefore gets a shard of its own.
//!   (If that tensor is the very first one, gguf-split stops with "one of splits have 0 tensors";
//!   kiln never plans an empty shard and keeps it alone in shard 0 instead.)
//! - **Names**: `<prefix>-%05d-of-%05d.gguf` with the 1-based shard number.
//! - A model without tensors gives one shard holding only metadata (as gguf-split).
//! - gguf-split always writes the split keys and the `-00001-of-00001` name, even for one shard.
//!
//! Not implemented: `--no-tensor-first-split` (a metadata-only shard 0).

use std::ffi::OsString;
use std::ops::Range;
use std::path::{Path, PathBuf};

use kiln_types::MetaValue;

/// Key of the 0-based shard index (u16).
pub const KEY_SPLIT_NO: &str = "split.no";
/// Key of the number of shards (u16).
pub const KEY_SPLIT_COUNT: &str = "split.count";
/// Key of the number of tensors over all shards (i32).
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";
/// gguf-split's default `--split-max-tensors`.
pub const DEFAULT_MAX_TENSORS: usize = 128;

/// When a shard is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitLimit {
    /// At most this many tensors per shard (`--split-max-tensors`). Zero is treated as one.
    MaxTensors(usize),
    /// At most this many bytes of padded tensor data per shard (`--split-max-size`), unless a
    /// single tensor is larger.
    MaxBytes(u64),
}

/// Why a split could not be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SplitError {
    /// The size is empty.
    #[error("empty split size")]
    EmptySize,
    /// The size does not end in `M` or `G`, gguf-split's only units.
    #[error(
        "split size `{0}`: supported units are M (megabytes) or G (gigabytes), e.g. 500M or 2G"
    )]
    BadUnit(String),
    /// The part before the unit is not a decimal integer.
    #[error("split size `{0}`: expected a whole number before the unit, e.g. 500M or 2G")]
    BadNumber(String),
    /// The size is zero.
    #[error("split size `{0}`: size must be a positive value")]
    NotPositive(String),
    /// The size does not fit in 64 bits.
    #[error("split size `{0}` is too large")]
    TooLarge(String),
    /// More shards than `split.count` (u16) can number.
    #[error("{count} shards planned; a split set has at most 65535")]
    TooManyShards {
        /// Shards planned.
        count: usize,
    },
    /// More tensors than `split.tensors.count` (i32) can count.
    #[error("{count} tensors; a split set holds at most 2147483647")]
    TooManyTensors {
        /// Tensors in the model.
        count: usize,
    },
    /// A shard index not below the shard count.
    #[error("shard index {shard} out of range for {count} shards")]
    ShardOutOfRange {
        /// The index.
        shard: usize,
        /// The shard count.
        count: usize,
    },
}

/// Parses gguf-split's `--split-max-size` value: a positive decimal integer followed by `M`
/// (× 1 000 000) or `G` (× 1 000 000 000), e.g. `500M`, `2G`.
///
/// gguf-split accepts exactly these two units, upper case: `K`, lower-case units and plain byte
/// counts are rejected, as by gguf-split (the Python converter's `--split-max-size` additionally
/// takes `K` and plain numbers; kiln follows gguf-split). Where gguf-split's `sscanf("%d")` would
/// silently read a prefix (`1.5G` as 1 GB, ` 2G`, `+2G`), kiln rejects the value instead.
pub fn parse_size(s: &str) -> Result<u64, SplitError> {
    let (digits, multiplier) = match s.as_bytes().last() {
        None => return Err(SplitError::EmptySize),
        Some(b'M') => (&s[..s.len() - 1], 1_000_000u64),
        Some(b'G') => (&s[..s.len() - 1], 1_000_000_000u64),
        Some(_) => return Err(SplitError::BadUnit(s.to_owned())),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SplitError::BadNumber(s.to_owned()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SplitError::TooLarge(s.to_owned()))?;
    if n == 0 {
        return Err(SplitError::NotPositive(s.to_owned()));
    }
    n.checked_mul(multiplier)
        .ok_or_else(|| SplitError::TooLarge(s.to_owned()))
}

/// Splits tensors (given by their unpadded byte sizes, in output order) into shards, as gguf-split
/// does; returns each shard's range of tensor indices, in order, covering all tensors.
///
/// With [`SplitLimit::MaxBytes`] each size is padded to `alignment` (32 for gguf-split; 0 is
/// treated as 1, no padding) before it is counted; see the [module documentation](self) for the
/// exact rule. No shard is ever empty, except the single shard planned for a model without
/// tensors (`vec![0..0]`).
pub fn plan_shards(tensor_sizes: &[u64], alignment: u64, limit: SplitLimit) -> Vec<Range<usize>> {
    let n = tensor_sizes.len();
    let mut shards = Vec::new();
    let mut start = 0;
    match limit {
        SplitLimit::MaxTensors(max) => {
            let max = max.max(1);
            for i in (1..n).filter(|i| i % max == 0) {
                shards.push(start..i);
                start = i;
            }
        }
        SplitLimit::MaxBytes(max) => {
            let alignment = alignment.max(1);
            let mut current = 0u64;
            for (i, &size) in tensor_sizes.iter().enumerate() {
                let padded = size.checked_next_multiple_of(alignment).unwrap_or(u64::MAX);
                let next = current.saturating_add(padded);
                if next > max && i > start {
                    shards.push(start..i);
                    start = i;
                    current = padded;
                } else {
                    current = next;
                }
            }
        }
    }
    shards.push(start..n);
    shards
}

/// Checks that `count` shards of `total_tensors` tensors can be numbered by the split keys
/// (`split.count` is a u16, `split.tensors.count` an i32). [`shard_metadata`] performs the same
/// check; this lets a planner fail before anything is written.
pub fn check_split(count: usize, total_tensors: usize) -> Result<(), SplitError> {
    if count > usize::from(u16::MAX) {
        return Err(SplitError::TooManyShards { count });
    }
    if i32::try_from(total_tensors).is_err() {
        return Err(SplitError::TooManyTensors {
            count: total_tensors,
        });
    }
    Ok(())
}

/// The metadata of shard `shard` of `count`: for shard 0, `base` without any `split.no`,
/// `split.count` and `split.tensors.count` entries, followed by the three split keys; for every
/// other shard, only the three keys. The keys come in gguf-split's order `split.no` (u16),
/// `split.tensors.count` (i32), `split.count` (u16).
///
/// Other keys starting with `split.` are kept, as gguf-split keeps them.
pub fn shard_metadata(
    base: &[(String, MetaValue)],
    shard: usize,
    count: usize,
    total_tensors: usize,
) -> Result<Vec<(String, MetaValue)>, SplitError> {
    check_split(count, total_tensors)?;
    if shard >= count {
        return Err(SplitError::ShardOutOfRange { shard, count });
    }
    // Both fit: `shard < count <= u16::MAX` and `total_tensors <= i32::MAX` were checked above.
    let (no, n, total) = (shard as u16, count as u16, total_tensors as i32);
    let mut out: Vec<(String, MetaValue)> = if shard == 0 {
        base.iter()
            .filter(|(k, _)| !is_split_key(k))
            .cloned()
            .collect()
    } else {
        Vec::with_capacity(3)
    };
    out.push((KEY_SPLIT_NO.to_owned(), MetaValue::U16(no)));
    out.push((KEY_SPLIT_TENSORS_COUNT.to_owned(), MetaValue::I32(total)));
    out.push((KEY_SPLIT_COUNT.to_owned(), MetaValue::U16(n)));
    Ok(out)
}

/// Whether `key` is one of the three keys a split writes (`split.no`, `split.count`,
/// `split.tensors.count`).
pub fn is_split_key(key: &str) -> bool {
    matches!(
        key,
        KEY_SPLIT_NO | KEY_SPLIT_COUNT | KEY_SPLIT_TENSORS_COUNT
    )
}

/// The file of shard `shard` (0-based) of `count`: `<prefix>-%05d-of-%05d.gguf` with the 1-based
/// shard number, where the prefix is `output` with a trailing `.gguf` extension (exactly that,
/// lower case) removed: `out/model.gguf` → `out/model-00001-of-00003.gguf`.
///
/// gguf-split itself takes the prefix verbatim (`gguf-split in.gguf out` writes
/// `out-00001-of-00003.gguf`, while `... out.gguf` would give `out.gguf-00001-of-00003.gguf`);
/// removing `.gguf` matches the Python converter and lets one output path serve both split and
/// unsplit builds. A prefix without `.gguf` is used as is, so passing gguf-split's prefix gives
/// gguf-split's names.
pub fn shard_path(output: &Path, shard: usize, count: usize) -> PathBuf {
    let prefix = if output.extension().is_some_and(|e| e == "gguf") {
        output.with_extension("")
    } else {
        output.to_path_buf()
    };
    let mut name: OsString = prefix.into_os_string();
    name.push(format!("-{:05}-of-{:05}.gguf", shard + 1, count));
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{GgufLayout, GgufWriter, TensorSpec};
    use kiln_reader::gguf::GgufFile;
    use sha2::{Digest, Sha256};

    const GOLDEN: &str = "/work/shared/golden/tiny-llama";

    fn ranges(v: &[(usize, usize)]) -> Vec<Range<usize>> {
        v.iter().map(|&(a, b)| a..b).collect()
    }

    #[test]
    fn plan_by_tensor_count() {
        let sizes = [1u64; 57];
        assert_eq!(
            plan_shards(&sizes, 32, SplitLimit::MaxTensors(20)),
            ranges(&[(0, 20), (20, 40), (40, 57)])
        );
        assert_eq!(
            plan_shards(&sizes[..40], 32, SplitLimit::MaxTensors(20)),
            ranges(&[(0, 20), (20, 40)])
        );
        assert_eq!(
            plan_shards(&sizes[..3], 32, SplitLimit::MaxTensors(128)),
            ranges(&[(0, 3)])
        );
        assert_eq!(
            plan_shards(&sizes[..3], 32, SplitLimit::MaxTensors(1)),
            ranges(&[(0, 1), (1, 2), (2, 3)])
        );
        assert_eq!(
            plan_shards(&sizes[..2], 32, SplitLimit::MaxTensors(0)),
            ranges(&[(0, 1), (1, 2)])
        );
        assert_eq!(
            plan_shards(&[], 32, SplitLimit::MaxTensors(20)),
            ranges(&[(0, 0)])
        );
    }

    #[test]
    fn plan_by_size_counts_padded_bytes() {
        // Padded: 32, 64, 32, 96. Limit 96: 32+64 = 96 is not above it, +32 is.
        assert_eq!(
            plan_shards(&[1, 40, 32, 70], 32, SplitLimit::MaxBytes(96)),
            ranges(&[(0, 2), (2, 3), (3, 4)])
        );
        // Unpadded the first three would fit in 96 (1 + 40 + 32 = 73); padded they do not.
        assert_eq!(
            plan_shards(&[1, 40, 32], 32, SplitLimit::MaxBytes(96)),
            ranges(&[(0, 2), (2, 3)])
        );
        // Exactly at the limit stays in the shard.
        assert_eq!(
            plan_shards(&[32, 32, 32, 32], 32, SplitLimit::MaxBytes(64)),
            ranges(&[(0, 2), (2, 4)])
        );
        // Alignment 1 (or 0): unpadded sizes.
        assert_eq!(
            plan_shards(&[1, 40, 32], 0, SplitLimit::MaxBytes(96)),
            ranges(&[(0, 3)])
        );
        assert_eq!(
            plan_shards(&[], 32, SplitLimit::MaxBytes(1)),
            ranges(&[(0, 0)])
        );
    }

    #[test]
    fn a_tensor_above_the_size_limit_gets_its_own_shard() {
        assert_eq!(
            plan_shards(&[10, 500, 10, 10], 32, SplitLimit::MaxBytes(100)),
            ranges(&[(0, 1), (1, 2), (2, 4)])
        );
        // First tensor too large: gguf-split refuses; kiln keeps it alone in shard 0.
        assert_eq!(
            plan_shards(&[500, 10, 600], 32, SplitLimit::MaxBytes(100)),
            ranges(&[(0, 1), (1, 2), (2, 3)])
        );
        assert_eq!(
            plan_shards(&[u64::MAX, u64::MAX], 32, SplitLimit::MaxBytes(1 << 40)),
            ranges(&[(0, 1), (1, 2)])
        );
    }

    #[test]
    fn parse_size_follows_gguf_split() {
        assert_eq!(parse_size("500M"), Ok(500_000_000));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("1M"), Ok(1_000_000));
        assert_eq!(parse_size("0050M"), Ok(50_000_000));
        assert_eq!(parse_size(""), Err(SplitError::EmptySize));
        for bad_unit in ["2K", "100", "2g", "500m", "2GB", "2 "] {
            assert_eq!(
                parse_size(bad_unit),
                Err(SplitError::BadUnit(bad_unit.into())),
                "{bad_unit}"
            );
        }
        for bad_number in ["G", "1.5G", " 2G", "+2G", "-1G", "2xG"] {
            assert_eq!(
                parse_size(bad_number),
                Err(SplitError::BadNumber(bad_number.into())),
                "{bad_number}"
            );
        }
        assert_eq!(parse_size("0G"), Err(SplitError::NotPositive("0G".into())));
        assert_eq!(
            parse_size("99999999999999999999G"),
            Err(SplitError::TooLarge("99999999999999999999G".into()))
        );
        assert_eq!(
            parse_size("18446744074G"),
            Err(SplitError::TooLarge("18446744074G".into()))
        );
    }

    #[test]
    fn shard_paths() {
        assert_eq!(
            shard_path(Path::new("out/model.gguf"), 0, 3),
            PathBuf::from("out/model-00001-of-00003.gguf")
        );
        assert_eq!(
            shard_path(Path::new("split-Q4_K_M"), 2, 3),
            PathBuf::from("split-Q4_K_M-00003-of-00003.gguf")
        );
        assert_eq!(
            shard_path(Path::new("/m/a.b.gguf"), 9, 12),
            PathBuf::from("/m/a.b-00010-of-00012.gguf")
        );
        assert_eq!(
            shard_path(Path::new("m.GGUF"), 0, 1),
            PathBuf::from("m.GGUF-00001-of-00001.gguf")
        );
        assert_eq!(
            shard_path(Path::new("m.bin"), 0, 2),
            PathBuf::from("m.bin-00001-of-00002.gguf")
        );
        assert_eq!(
            shard_path(Path::new(".gguf"), 0, 2),
            PathBuf::from(".gguf-00001-of-00002.gguf")
        );
        assert_eq!(
            shard_path(Path::new("x.gguf"), 99_999, 100_000),
            PathBuf::from("x-100000-of-100000.gguf")
        );
    }

    #[test]
    fn metadata_of_shards() {
        let base = vec![
            (
                "general.architecture".to_string(),
                MetaValue::String("llama".into()),
            ),
            (KEY_SPLIT_COUNT.to_string(), MetaValue::U16(0)),
            ("split.other".to_string(), MetaValue::Bool(true)),
            ("general.file_type".to_string(), MetaValue::U32(15)),
        ];
        let keys = |m: &[(String, MetaValue)]| m.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        let first = shard_metadata(&base, 0, 3, 57).unwrap();
        assert_eq!(
            keys(&first),
            [
                "general.architecture",
                "split.other",
                "general.file_type",
                "split.no",
                "split.tensors.count",
                "split.count"
            ]
        );
        assert_eq!(
            &first[3..],
            &[
                ("split.no".to_string(), MetaValue::U16(0)),
                ("split.tensors.count".to_string(), MetaValue::I32(57)),
                ("split.count".to_string(), MetaValue::U16(3)),
            ]
        );
        let third = shard_metadata(&base, 2, 3, 57).unwrap();
        assert_eq!(
            third,
            [
                ("split.no".to_string(), MetaValue::U16(2)),
                ("split.tensors.count".to_string(), MetaValue::I32(57)),
                ("split.count".to_string(), MetaValue::U16(3)),
            ]
        );
        assert_eq!(
            shard_metadata(&base, 3, 3, 57),
            Err(SplitError::ShardOutOfRange { shard: 3, count: 3 })
        );
        assert_eq!(
            shard_metadata(&base, 0, 65_536, 57),
            Err(SplitError::TooManyShards { count: 65_536 })
        );
        assert!(shard_metadata(&base, 65_534, 65_535, 57).is_ok());
        assert_eq!(
            check_split(2, i32::MAX as usize + 1),
            Err(SplitError::TooManyTensors {
                count: i32::MAX as usize + 1
            })
        );
    }

    /// Splits llama.cpp's Q4_K_M file as `llama-gguf-split --split --split-max-tensors 20` did and
    /// compares every shard's SHA-256 with the golden summary.
    #[test]
    fn golden_split_is_byte_identical() {
        let input = Path::new(GOLDEN).join("quant-Q4_K_M.gguf");
        if !input.exists() {
            return;
        }
        let summary: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden/tiny-llama.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let bytes = std::fs::read(&input).unwrap();
        let file = GgufFile::parse(&bytes).unwrap();
        let sizes: Vec<u64> = file.tensors.iter().map(|t| t.nbytes.unwrap()).collect();
        let plan = plan_shards(&sizes, 32, SplitLimit::MaxTensors(20));
        assert_eq!(plan, ranges(&[(0, 20), (20, 40), (40, 57)]));
        for (shard, range) in plan.iter().enumerate() {
            let metadata = shard_metadata(&file.metadata, shard, plan.len(), sizes.len()).unwrap();
            let specs = file.tensors[range.clone()]
                .iter()
                .map(|t| TensorSpec {
                    name: t.name.clone(),
                    ne: t.ne.clone(),
                    ty: t.ty,
                })
                .collect();
            let layout = GgufLayout::new(metadata, specs, 32).unwrap();
            let mut writer = GgufWriter::new(Vec::new(), layout).unwrap();
            for (j, i) in range.clone().enumerate() {
                writer
                    .write_tensor(j, file.tensor_data(i).unwrap())
                    .unwrap();
            }
            let (out, _) = writer.finish().unwrap();
            let name = shard_path(Path::new("split-Q4_K_M.gguf"), shard, plan.len());
            let name = name.to_str().unwrap();
            let expected = summary[name]["file_sha256"].as_str().unwrap();
            let actual: String = Sha256::digest(&out)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(actual, expected, "{name}");
        }
    }
}
