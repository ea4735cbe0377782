//! safetensors parsing over a byte slice.
//!
//! Validation is the `safetensors` crate's (header size cap, JSON, dtype × shape = byte range, full
//! coverage of the data section without holes). When it rejects a file, kiln re-reads the header
//! to say *which* tensor is at fault, because "invalid tensor info" without a name is no help on a
//! checkpoint with thousands of tensors.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};
use serde::Deserialize;

/// What is wrong with a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// The file is shorter than the 8-byte header length.
    #[error("file too short for a safetensors header ({len} bytes)")]
    HeaderTooSmall {
        /// File length.
        len: usize,
    },
    /// The declared header length is larger than the file or the 100 MB cap.
    #[error("declared header length {declared} is invalid for a file of {len} bytes")]
    InvalidHeaderLength {
        /// Declared length.
        declared: u64,
        /// File length.
        len: usize,
    },
    /// The header is not UTF-8 JSON of the expected shape.
    #[error("invalid header: {reason}")]
    InvalidHeader {
        /// The parser's message.
        reason: String,
    },
    /// The file ends before the data the header promises.
    #[error("truncated: header promises {expected} bytes of tensor data but {actual} are present (tensor `{tensor}` ends past the end of the file)")]
    Truncated {
        /// Bytes of data the header describes.
        expected: u64,
        /// Bytes of data present.
        actual: u64,
        /// The first tensor (in offset order) that does not fit.
        tensor: String,
    },
    /// The file has bytes after the last tensor, or holes between tensors.
    #[error("data section of {actual} bytes is not exactly covered by the tensors ({expected} bytes described)")]
    IncompleteCoverage {
        /// Bytes the tensors cover.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// A tensor's dtype and shape disagree with its byte range.
    #[error("tensor `{tensor}`: dtype {dtype} and shape {shape:?} need {expected} bytes, but its data_offsets span {declared}")]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// Its dtype as written.
        dtype: String,
        /// Its shape as written.
        shape: Vec<u64>,
        /// Bytes implied by dtype and shape.
        expected: u64,
        /// Bytes given by `data_offsets`.
        declared: u64,
    },
    /// A tensor's offsets are reversed, overlap another tensor, or overflow.
    #[error("tensor `{tensor}`: invalid data_offsets")]
    InvalidOffsets {
        /// The tensor.
        tensor: String,
    },
}

/// One tensor of a parsed safetensors file, borrowing its bytes.
#[derive(Debug, Clone)]
pub struct SafetensorsView<'a> {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape, slowest dimension first (PyTorch order).
    pub shape: Vec<usize>,
    /// The tensor's bytes.
    pub data: &'a [u8],
    /// Absolute offset of `data` within the file.
    pub file_offset: usize,
}

/// A parsed safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile<'a> {
    /// Tensors sorted by name (byte order), as llama.cpp's converter visits them.
    pub tensors: Vec<SafetensorsView<'a>>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
}

impl<'a> SafetensorsFile<'a> {
    /// Parses and validates a whole safetensors file.
    pub fn parse(bytes: &'a [u8]) -> Result<SafetensorsFile<'a>, SafetensorsError> {
        let (header_len, metadata) =
            SafeTensors::read_metadata(bytes).map_err(|e| diagnose(bytes, e))?;
        let data_start = 8 + header_len;
        let mut tensors = Vec::with_capacity(metadata.tensors().len());
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            // `read_metadata` has checked that every range lies inside the data section.
            let range = data_start
                .checked_add(start)
                .zip(data_start.checked_add(end));
            let Some(data) = range.and_then(|(s, e)| bytes.get(s..e)) else {
                return Err(SafetensorsError::InvalidOffsets { tensor: name });
            };
            tensors.push(SafetensorsView {
                name,
                dtype: info.dtype,
                shape: info.shape.clone(),
                data,
                file_offset: data_start + start,
            });
        }
        tensors.sort_by(|a, b| a.name.cmp(&b.name));
        let metadata = metadata
            .metadata()
            .as_ref()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default();
        Ok(SafetensorsFile { tensors, metadata })
    }
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Turns the crate's error into one that names the tensor, by re-reading the header.
fn diagnose(bytes: &[u8], err: SafeTensorError) -> SafetensorsError {
    let len = bytes.len();
    let Some(header_len) = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return SafetensorsError::HeaderTooSmall { len };
    };
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .and_then(|end| bytes.get(8..end));
    let Some(header) = header else {
        return SafetensorsError::InvalidHeaderLength {
            declared: header_len,
            len,
        };
    };
    let data_len = (len - 8 - header.len()) as u64;
    let raw: BTreeMap<String, serde_json::Value> = match serde_json::from_slice(header) {
        Ok(raw) => raw,
        Err(e) => {
            return SafetensorsError::InvalidHeader {
                reason: e.to_string(),
            }
        }
    };
    let mut infos: Vec<(String, RawInfo)> = Vec::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        match serde_json::from_value::<RawInfo>(value) {
            Ok(info) => infos.push((name, info)),
            Err(e) => {
                return SafetensorsError::InvalidHeader {
                    reason: format!("tensor `{name}`: {e}"),
                }
            }
        }
    }
    infos.sort_by_key(|(_, info)| info.data_offsets);
    for (name, info) in &infos {
        let (start, end) = info.data_offsets;
        if end < start {
            return SafetensorsError::InvalidOffsets {
                tensor: name.clone(),
            };
        }
        let elements = info
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let expected = dtype_bits(&info.dtype)
            .and_then(|bits| elements.and_then(|n| n.checked_mul(bits)))
            .map(|bits| bits.div_ceil(8));
        match expected {
            Some(expected) if expected != end - start => {
                return SafetensorsError::ShapeMismatch {
                    tensor: name.clone(),
                    dtype: info.dtype.clone(),
                    shape: info.shape.clone(),
                    expected,
                    declared: end - start,
                }
            }
            None => {
                return SafetensorsError::InvalidOffsets {
                    tensor: name.clone(),
                }
            }
            _ => {}
        }
    }
    let mut cursor = 0u64;
    for (name, info) in &infos {
        if info.data_offsets.0 != cursor {
            return SafetensorsError::InvalidOffsets {
                tensor: name.clone(),
            };
        }
        if info.data_offsets.1 > data_len {
            return SafetensorsError::Truncated {
                expected: infos.last().map_or(0, |(_, i)| i.data_offsets.1),
                actual: data_len,
                tensor: name.clone(),
            };
        }
        cursor = info.data_offsets.1;
    }
    if cursor != data_len {
        return SafetensorsError::IncompleteCoverage {
            expected: cursor,
            actual: data_len,
        };
    }
    SafetensorsError::InvalidHeader {
        reason: err.to_string(),
    }
}

fn dtype_bits(name: &str) -> Option<u64> {
    Some(match name {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    #[test]
    fn parses_and_sorts_by_name() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},"__metadata__":{"format":"pt"}}"#;
        let bytes = file(h, 16);
        let f = SafetensorsFile::parse(&bytes).unwrap();
        assert_eq!(f.tensors[0].name, "a");
        assert_eq!(f.tensors[0].shape, vec![2, 2]);
        assert_eq!(f.tensors[0].file_offset, 8 + h.len() + 8);
        assert_eq!(f.tensors[1].data.len(), 8);
        assert_eq!(f.metadata.get("format").map(String::as_str), Some("pt"));
    }

    #[test]
    fn truncated_names_tensor() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#;
        let bytes = file(h, 12);
        let err = SafetensorsFile::parse(&bytes).unwrap_err();
        assert!(
            matches!(err, SafetensorsError::Truncated { ref tensor, .. } if tensor == "b"),
            "{err:?}"
        );
    }

    #[test]
    fn shape_mismatch_names_tensor() {
        let h = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[3],"data_offsets":[8,16]}}"#;
        let bytes = file(h, 16);
        let err = SafetensorsFile::parse(&bytes).unwrap_err();
        assert!(
            matches!(err, SafetensorsError::ShapeMismatch { ref tensor, expected: 12, declared: 8, .. } if tensor == "b"),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_garbage_without_panicking() {
        assert!(matches!(
            SafetensorsFile::parse(&[1, 2, 3]),
            Err(SafetensorsError::HeaderTooSmall { .. })
        ));
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        assert!(matches!(
            SafetensorsFile::parse(&huge),
            Err(SafetensorsError::InvalidHeaderLength { .. })
        ));
        let bytes = file("{not json", 0);
        assert!(matches!(
            SafetensorsFile::parse(&bytes),
            Err(SafetensorsError::InvalidHeader { .. })
        ));
        let bytes = file(
            r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            8,
        );
        assert!(matches!(
            SafetensorsFile::parse(&bytes),
            Err(SafetensorsError::IncompleteCoverage { .. })
        ));
    }
}
