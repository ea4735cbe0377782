//! GGUF v3 layout and streaming writer.

use std::collections::BTreeSet;
use std::io::Write;

use kiln_types::{GgmlType, MetaArray, MetaValue};
use xxhash_rust::xxh3::Xxh3;

use crate::hashing::{HashingWriter, Xxh3Digest};
use crate::{WriteError, GGUF_DEFAULT_ALIGNMENT};

const GGUF_MAGIC: &[u8; 4] = b"GGUF";
const GGUF_VERSION: u32 = 3;
const MAX_TENSOR_NAME: usize = 63;

/// A tensor as it will be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// GGUF tensor name.
    pub name: String,
    /// Dimensions, fastest first, written as given (no trimming of trailing 1s).
    pub ne: Vec<u64>,
    /// Stored type.
    pub ty: GgmlType,
}

/// A tensor's place in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// The tensor.
    pub spec: TensorSpec,
    /// Offset from the start of the data section.
    pub offset: u64,
    /// Byte size (without padding).
    pub nbytes: u64,
}

/// Metadata and tensors of a GGUF file with every offset decided.
#[derive(Debug, Clone)]
pub struct GgufLayout {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<TensorSlot>,
    alignment: u64,
    header: Vec<u8>,
    data_len: u64,
}

impl GgufLayout {
    /// Lays out a file. `general.alignment` in `metadata`, if present, must be a `u32` equal to
    /// `alignment`; if absent and `alignment` is not the default 32, it is appended.
    pub fn new(
        mut metadata: Vec<(String, MetaValue)>,
        tensors: Vec<TensorSpec>,
        alignment: u64,
    ) -> Result<GgufLayout, WriteError> {
        if alignment == 0 || !alignment.is_power_of_two() || alignment > u64::from(u32::MAX) {
            return Err(WriteError::InvalidAlignment(alignment));
        }
        match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, MetaValue::U32(a))) if u64::from(*a) == alignment => {}
            Some(_) => return Err(WriteError::InvalidAlignment(alignment)),
            None if alignment != GGUF_DEFAULT_ALIGNMENT => {
                metadata.push(("general.alignment".into(), MetaValue::U32(alignment as u32)))
            }
            None => {}
        }
        let mut keys = BTreeSet::new();
        for (k, _) in &metadata {
            if k.is_empty() || !keys.insert(k.as_str()) {
                return Err(WriteError::BadKey(k.clone()));
            }
        }
        let mut names = BTreeSet::new();
        let mut slots = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for spec in tensors {
            if spec.name.len() > MAX_TENSOR_NAME {
                let len = spec.name.len();
                return Err(WriteError::TensorNameTooLong(spec.name, len));
            }
            if !names.insert(spec.name.clone()) {
                return Err(WriteError::DuplicateTensor(spec.name));
            }
            let nbytes = (!spec.ne.is_empty() && spec.ne.len() <= 4)
                .then(|| spec.ty.tensor_bytes(&spec.ne))
                .flatten()
                .ok_or_else(|| WriteError::InvalidShape {
                    name: spec.name.clone(),
                    ne: spec.ne.clone(),
                    ty: spec.ty,
                })?;
            slots.push(TensorSlot {
                spec,
                offset,
                nbytes,
            });
            offset = offset
                .checked_add(nbytes)
                .map(|end| end.next_multiple_of(alignment))
                .ok_or(WriteError::InvalidAlignment(alignment))?;
        }
        let mut header = Vec::new();
        encode_header(&mut header, &metadata, &slots);
        let padded = (header.len() as u64).next_multiple_of(alignment);
        header.resize(padded as usize, 0);
        Ok(GgufLayout {
            metadata,
            tensors: slots,
            alignment,
            header,
            data_len: offset,
        })
    }

    /// The metadata, in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// The tensors, in file order.
    pub fn tensors(&self) -> &[TensorSlot] {
        &self.tensors
    }

    /// Alignment of the data section and of every tensor.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The encoded header: magic, counts, metadata, tensor infos and the padding before the data.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Size of the header including the padding before the data section.
    pub fn data_offset(&self) -> u64 {
        self.header.len() as u64
    }

    /// Total file size.
    pub fn file_len(&self) -> u64 {
        self.data_offset() + self.data_len
    }
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u64(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

fn encode_header(out: &mut Vec<u8>, metadata: &[(String, MetaValue)], tensors: &[TensorSlot]) {
    out.extend_from_slice(GGUF_MAGIC);
    put_u32(out, GGUF_VERSION);
    put_u64(out, tensors.len() as u64);
    put_u64(out, metadata.len() as u64);
    for (key, value) in metadata {
        put_str(out, key);
        put_u32(out, value.value_type().id());
        encode_value(out, value);
    }
    for slot in tensors {
        put_str(out, &slot.spec.name);
        put_u32(out, slot.spec.ne.len() as u32);
        for &d in &slot.spec.ne {
            put_u64(out, d);
        }
        put_u32(out, slot.spec.ty.0);
        put_u64(out, slot.offset);
    }
}

fn encode_value(out: &mut Vec<u8>, value: &MetaValue) {
    match value {
        MetaValue::U8(v) => out.push(*v),
        MetaValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Bool(v) => out.push(u8::from(*v)),
        MetaValue::String(s) => put_str(out, s),
        MetaValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetaValue::Array(a) => {
            put_u32(out, a.element_type().id());
            put_u64(out, a.len() as u64);
            match a {
                MetaArray::U8(v) => out.extend_from_slice(v),
                MetaArray::I8(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::U16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::I16(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::U32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::I32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::F32(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::Bool(v) => v.iter().for_each(|x| out.push(u8::from(*x))),
                MetaArray::String(v) => v.iter().for_each(|s| put_str(out, s)),
                MetaArray::U64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::I64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                MetaArray::F64(v) => v
                    .iter()
                    .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            }
        }
    }
}

/// Digest and place of one written tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenTensor {
    /// Tensor name.
    pub name: String,
    /// Absolute byte offset of the tensor in the file.
    pub file_offset: u64,
    /// Byte size (without padding).
    pub nbytes: u64,
    /// xxh3-64 of the tensor's bytes.
    pub xxh3: Xxh3Digest,
}

/// Digests of a completed file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    /// Total bytes written.
    pub len: u64,
    /// xxh3-64 of the whole file.
    pub xxh3: Xxh3Digest,
    /// Per tensor, in file order.
    pub tensors: Vec<WrittenTensor>,
}

/// Streams a [`GgufLayout`] to a writer: header on creation, then tensor data in layout order.
pub struct GgufWriter<W: Write> {
    out: HashingWriter<W>,
    layout: GgufLayout,
    current: usize,
    current_written: u64,
    current_hash: Xxh3,
    written: Vec<WrittenTensor>,
}

impl<W: Write> GgufWriter<W> {
    /// Writes the header and the padding before the data section.
    pub fn new(out: W, layout: GgufLayout) -> Result<GgufWriter<W>, WriteError> {
        let mut out = HashingWriter::new(out);
        out.write_all(&layout.header)?;
        let written = Vec::with_capacity(layout.tensors.len());
        Ok(GgufWriter {
            out,
            layout,
            current: 0,
            current_written: 0,
            current_hash: Xxh3::new(),
            written,
        })
    }

    /// The layout being written.
    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }

    /// Appends bytes of tensor `index`, which must be the next unfinished tensor. A tensor may be
    /// written in any number of chunks; it is finished (and padded) when its size is reached.
    pub fn write_tensor_chunk(&mut self, index: usize, bytes: &[u8]) -> Result<(), WriteError> {
        let Some(slot) = self.layout.tensors.get(self.current) else {
            return Err(WriteError::OutOfOrder {
                expected: self.current,
                actual: index,
            });
        };
        if index != self.current {
            return Err(WriteError::OutOfOrder {
                expected: self.current,
                actual: index,
            });
        }
        let total = self.current_written + bytes.len() as u64;
        if total > slot.nbytes {
            return Err(WriteError::WrongTensorSize {
                name: slot.spec.name.clone(),
                expected: slot.nbytes,
                actual: total,
            });
        }
        self.out.write_all(bytes)?;
        self.current_hash.update(bytes);
        self.current_written = total;
        if total == slot.nbytes {
            self.close_current()?;
        }
        Ok(())
    }

    /// Writes a whole tensor at once.
    pub fn write_tensor(&mut self, index: usize, bytes: &[u8]) -> Result<(), WriteError> {
        if let Some(slot) = self.layout.tensors.get(index) {
            if bytes.len() as u64 != slot.nbytes {
                return Err(WriteError::WrongTensorSize {
                    name: slot.spec.name.clone(),
                    expected: slot.nbytes,
                    actual: bytes.len() as u64,
                });
            }
        }
        // A chunk that completes the tensor closes it, a zero-byte tensor included.
        self.write_tensor_chunk(index, bytes)
    }

    fn close_current(&mut self) -> Result<(), WriteError> {
        let slot = &self.layout.tensors[self.current];
        let file_offset = self.layout.data_offset() + slot.offset;
        let end = slot.offset + slot.nbytes;
        let pad = end.next_multiple_of(self.layout.alignment) - end;
        self.out.write_all(&vec![0u8; pad as usize])?;
        self.written.push(WrittenTensor {
            name: slot.spec.name.clone(),
            file_offset,
            nbytes: slot.nbytes,
            xxh3: Xxh3Digest(self.current_hash.digest()),
        });
        self.current += 1;
        self.current_written = 0;
        self.current_hash = Xxh3::new();
        // The position check guards the layout arithmetic: a mismatch would mean the header's
        // offsets lie about where the data is.
        let expected = self
            .layout
            .tensors
            .get(self.current)
            .map_or(self.layout.file_len(), |s| {
                self.layout.data_offset() + s.offset
            });
        debug_assert_eq!(
            self.out.position(),
            expected,
            "internal error: writer position"
        );
        Ok(())
    }

    /// Checks that every tensor was written, flushes, and returns the inner writer and digests.
    pub fn finish(mut self) -> Result<(W, WrittenFile), WriteError> {
        if self.current != self.layout.tensors.len() {
            return Err(WriteError::Incomplete {
                written: self.current,
                total: self.layout.tensors.len(),
            });
        }
        self.out.flush()?;
        let file = WrittenFile {
            len: self.out.position(),
            xxh3: self.out.digest(),
            tensors: self.written,
        };
        Ok((self.out.into_inner(), file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, ne: &[u64], ty: GgmlType) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            ne: ne.to_vec(),
            ty,
        }
    }

    #[test]
    fn golden_bytes_of_a_tiny_file() {
        let layout = GgufLayout::new(
            vec![("a".into(), MetaValue::U32(7))],
            vec![spec("t", &[2], GgmlType::F32)],
            32,
        )
        .unwrap();
        let mut w = GgufWriter::new(Vec::new(), layout).unwrap();
        w.write_tensor(0, &[1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
        let (bytes, file) = w.finish().unwrap();
        let mut expected = b"GGUF".to_vec();
        expected.extend_from_slice(&3u32.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.push(b'a');
        expected.extend_from_slice(&4u32.to_le_bytes());
        expected.extend_from_slice(&7u32.to_le_bytes());
        expected.extend_from_slice(&1u64.to_le_bytes());
        expected.push(b't');
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&2u64.to_le_bytes());
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(&0u64.to_le_bytes());
        // 74 header bytes, padded to the 32-byte boundary.
        assert_eq!(expected.len(), 74);
        expected.resize(96, 0);
        expected.extend_from_slice(&[1, 0, 0, 0, 2, 0, 0, 0]);
        expected.resize(128, 0);
        assert_eq!(bytes, expected);
        assert_eq!(file.len, 128);
        assert_eq!(file.tensors[0].file_offset, 96);
        assert_eq!(file.xxh3, Xxh3Digest(xxhash_rust::xxh3::xxh3_64(&expected)));
    }

    #[test]
    fn zero_byte_tensors_are_closed_once() {
        let layout = GgufLayout::new(
            vec![],
            vec![
                spec("empty", &[0], GgmlType::F32),
                spec("b", &[2], GgmlType::F32),
            ],
            32,
        )
        .unwrap();
        let mut w = GgufWriter::new(Vec::new(), layout).unwrap();
        w.write_tensor(0, &[]).unwrap();
        w.write_tensor(1, &[0; 8]).unwrap();
        let (_, file) = w.finish().unwrap();
        let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["empty", "b"]);
    }

    #[test]
    fn chunks_and_order_are_checked() {
        let layout = GgufLayout::new(
            vec![],
            vec![
                spec("a", &[32], GgmlType::Q8_0),
                spec("b", &[3], GgmlType::F16),
            ],
            32,
        )
        .unwrap();
        assert_eq!(layout.tensors()[1].offset, 64);
        let mut w = GgufWriter::new(Vec::new(), layout).unwrap();
        assert!(matches!(
            w.write_tensor_chunk(1, &[0; 6]),
            Err(WriteError::OutOfOrder {
                expected: 0,
                actual: 1
            })
        ));
        w.write_tensor_chunk(0, &[0; 30]).unwrap();
        assert!(matches!(
            w.write_tensor_chunk(0, &[0; 5]),
            Err(WriteError::WrongTensorSize { .. })
        ));
        w.write_tensor_chunk(0, &[0; 4]).unwrap();
        let err = match GgufWriter::new(Vec::new(), w.layout().clone()) {
            Ok(w2) => w2.finish().err(),
            Err(e) => Some(e),
        };
        assert!(matches!(
            err,
            Some(WriteError::Incomplete {
                written: 0,
                total: 2
            })
        ));
        w.write_tensor(1, &[0; 6]).unwrap();
        let (bytes, _) = w.finish().unwrap();
        assert_eq!(bytes.len() as u64 % 32, 0);
    }

    #[test]
    fn layout_rejections() {
        let long = "x".repeat(64);
        assert!(matches!(
            GgufLayout::new(vec![], vec![spec(&long, &[1], GgmlType::F32)], 32),
            Err(WriteError::TensorNameTooLong(_, 64))
        ));
        assert!(matches!(
            GgufLayout::new(
                vec![],
                vec![
                    spec("a", &[1], GgmlType::F32),
                    spec("a", &[1], GgmlType::F32)
                ],
                32
            ),
            Err(WriteError::DuplicateTensor(_))
        ));
        assert!(matches!(
            GgufLayout::new(vec![], vec![spec("a", &[33], GgmlType::Q8_0)], 32),
            Err(WriteError::InvalidShape { .. })
        ));
        assert!(matches!(
            GgufLayout::new(vec![], vec![], 24),
            Err(WriteError::InvalidAlignment(24))
        ));
        assert!(matches!(
            GgufLayout::new(
                vec![
                    ("k".into(), MetaValue::Bool(true)),
                    ("k".into(), MetaValue::Bool(false))
                ],
                vec![],
                32
            ),
            Err(WriteError::BadKey(_))
        ));
    }

    #[test]
    fn non_default_alignment_is_recorded() {
        let layout = GgufLayout::new(vec![], vec![spec("a", &[1], GgmlType::F32)], 64).unwrap();
        assert_eq!(
            layout.metadata(),
            &[("general.alignment".to_string(), MetaValue::U32(64))]
        );
        assert_eq!(layout.data_offset() % 64, 0);
    }
}
