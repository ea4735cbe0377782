//! bitsandbytes 4-bit blockwise quantization (NF4 and FP4), with optional double quantization of
//! the per-block absmax values, reproducing `bitsandbytes.functional.quantize_4bit` (0.50.2, CPU)
//! and the quant state that transformers serializes next to each weight.
//!
//! What bitsandbytes does, and therefore what this module does (`docs/ecosystem.md` §2):
//!
//! - The tensor is flattened (row-major) and cut into blocks of `blocksize` values; blocks run
//!   across row boundaries and the last block may be short.
//! - Per block, `absmax = max |x|`. Full blocks are scaled by multiplying with the f32 reciprocal
//!   `1 / max(absmax, 1e-38)`; a short last block is *divided* by `max(absmax, 1e-38)` and stores
//!   that clamped value as its absmax (bitsandbytes' default kernel treats the two differently).
//!   Scaled values are clamped to `[-1, 1]`.
//! - Each scaled value gets the code of the nearest table entry, found as `torch.bucketize` does:
//!   count the midpoints (f32, `(a + b) / 2`) between consecutive *sorted* table entries that are
//!   strictly below the value, so an exact tie goes to the lower sorted entry. NF4's table is
//!   sorted; FP4's is not, and the sorted position is mapped back through the argsort permutation
//!   [`FP4_SORT_ORDER`].
//! - Two codes per byte, the first element in the **high** nibble. An odd element count is padded
//!   with the value 0.0 (NF4 code 7, FP4 code 0).
//! - Dequantization is `table[code] * absmax[block]` in f32.
//!
//! Double quantization ([`double_quantize`]) subtracts `offset = mean(absmax)` and quantizes the
//! result blockwise (256 per block) to 8-bit codes into bitsandbytes' signed dynamic map
//! ([`dynamic_map`]), as its CPU kernel does (through a 65 536-entry lookup table, not a nearest
//! search; see [`double_quantize`]).
//!
//! All of this is bit-exact with the bitsandbytes outputs in `fixtures/golden/bnb-4bit.safetensors`
//! (tested in `tests/bnb.rs`). Two paths are not covered by that file, whose tensors are whole
//! multiples of 64 and 512 elements: the short last block follows bitsandbytes' source (the
//! division and clamped absmax above), and see [`double_quantize`] for its tail. Non-finite
//! inputs give deterministic but unspecified codes; no input panics.

use std::sync::OnceLock;

/// The default bitsandbytes block size, and the one transformers uses.
pub const DEFAULT_BLOCKSIZE: usize = 64;

/// Block size of the second-level (nested) quantization of the absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes clamps a block's absmax to at least this before dividing by it, so an all-zero
/// block gives code "0.0" instead of NaN.
const ABSMAX_FLOOR: f32 = 1e-38;

/// The NF4 table (`quant_map` of an NF4 weight), exact f32 values, index = code.
///
/// These are the shortest decimal spellings of bitsandbytes' f32 values (bit patterns
/// `0xBF800000, 0xBF3239B1, ... 0x3F800000`; checked against the golden `quant_map`).
pub const NF4_QUANT_MAP: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// The FP4 table as bitsandbytes serializes it (`quant_map` of an FP4 weight): the E2M1-like
/// values `[0, 0.0625, 8, 12, 4, 6, 2, 3]` divided by 12 for codes 0–7 (bit-pattern order) and
/// their negations for codes 8–15. Python builds it from the integer `-0`, so entry 8 is **+0.0**
/// here; see [`FP4_DEQUANT_TABLE`] for the value the kernels decode.
pub const FP4_QUANT_MAP: [f32; 16] = [
    0.0,
    0.005_208_333_5,
    0.666_666_7,
    1.0,
    0.333_333_34,
    0.5,
    0.166_666_67,
    0.25,
    0.0,
    -0.005_208_333_5,
    -0.666_666_7,
    -1.0,
    -0.333_333_34,
    -0.5,
    -0.166_666_67,
    -0.25,
];

/// The FP4 values bitsandbytes' dequantization kernels use: [`FP4_QUANT_MAP`] except that code 8
/// (sign bit set, magnitude 0) decodes to **-0.0**. Dequantizing with this table reproduces
/// bitsandbytes' `dequantize_4bit` output bit for bit, signed zeros included.
pub const FP4_DEQUANT_TABLE: [f32; 16] = {
    let mut t = FP4_QUANT_MAP;
    t[8] = -0.0;
    t
};

/// `torch.argsort(FP4_QUANT_MAP)` as bitsandbytes obtains it: sorted position → code. The two
/// zeros (codes 0 and 8) compare equal; torch keeps them in index order (0 before 8). This order
/// is visible in the output: a positive value below half the smallest positive entry (|x| up to
/// absmax / 384) falls in the bucket of sorted position 8 and gets code 8 (-0), while a small
/// negative value gets code 0 (+0). The golden FP4 bytes confirm it.
pub const FP4_SORT_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// NF4's table is sorted, so its argsort is the identity.
const NF4_SORT_ORDER: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Which 4-bit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bnb4Kind {
    /// NormalFloat4: 16 levels at quantiles of a normal distribution.
    Nf4,
    /// bitsandbytes' 4-bit float (sign, 2 exponent bits, 1 mantissa bit), scaled to `[-1, 1]`.
    Fp4,
}

impl Bnb4Kind {
    /// The `quant_type` string bitsandbytes uses (`"nf4"` / `"fp4"`), also the suffix of the
    /// `quant_state.bitsandbytes__<type>` tensor.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Nf4 => "nf4",
            Self::Fp4 => "fp4",
        }
    }

    /// The table as serialized in `weight.quant_map`.
    pub const fn quant_map(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4_QUANT_MAP,
            Self::Fp4 => &FP4_QUANT_MAP,
        }
    }

    /// The table the dequantization kernels use (differs from [`Self::quant_map`] only in the
    /// sign of FP4's code-8 zero).
    pub const fn dequant_table(self) -> &'static [f32; 16] {
        match self {
            Self::Nf4 => &NF4_QUANT_MAP,
            Self::Fp4 => &FP4_DEQUANT_TABLE,
        }
    }

    /// Sorted position → code.
    const fn sort_order(self) -> &'static [u8; 16] {
        match self {
            Self::Nf4 => &NF4_SORT_ORDER,
            Self::Fp4 => &FP4_SORT_ORDER,
        }
    }

    /// The 15 decision boundaries: f32 midpoints between consecutive sorted entries, computed as
    /// bitsandbytes does (`(a + b) / 2` in f32).
    fn midpoints(self) -> [f32; 15] {
        let map = self.quant_map();
        let order = self.sort_order();
        let mut mids = [0.0f32; 15];
        for (i, m) in mids.iter_mut().enumerate() {
            let a = map[usize::from(order[i])];
            let b = map[usize::from(order[i + 1])];
            *m = (a + b) / 2.0;
        }
        mids
    }
}

/// Why a bitsandbytes call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BnbError {
    /// bitsandbytes accepts only powers of two from 32 to 4096.
    #[error("block size {0} is not a power of two in 32..=4096")]
    BlockSize(usize),
    /// A buffer does not have the length the element count implies.
    #[error("{what}: expected {expected} entries, got {actual}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Entries needed.
        expected: usize,
        /// Entries given.
        actual: usize,
    },
}

/// Checks that `blocksize` is one bitsandbytes accepts (a power of two in 32..=4096).
pub fn check_blocksize(blocksize: usize) -> Result<(), BnbError> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(BnbError::BlockSize(blocksize))
    }
}

/// Number of blocks (absmax values) for `n` elements.
pub fn num_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize.max(1))
}

/// Number of packed bytes for `n` elements (two per byte, rounded up).
pub fn packed_len(n: usize) -> usize {
    n.div_ceil(2)
}

/// A tensor quantized to 4 bits as bitsandbytes stores it.
#[derive(Debug, Clone, PartialEq)]
pub struct Bnb4Quantized {
    /// Packed codes, `ceil(n / 2)` bytes, first element of each pair in the high nibble
    /// (transformers stores this as `weight` with shape `(ceil(n/2), 1)`).
    pub packed: Vec<u8>,
    /// One absmax per block (`weight.absmax` when not double-quantized).
    pub absmax: Vec<f32>,
}

/// Maximum of |x| over a block; NaN propagates as in `torch.max`.
fn block_absmax(block: &[f32]) -> f32 {
    block.iter().fold(0.0f32, |m, v| {
        let a = v.abs();
        if m.is_nan() || a.is_nan() {
            f32::NAN
        } else {
            m.max(a)
        }
    })
}

/// The 4-bit code of one scaled value (already clamped to `[-1, 1]`).
fn code_of(scaled: f32, mids: &[f32; 15], order: &[u8; 16]) -> u8 {
    // `torch.bucketize(v, mids)` (right=False) = number of boundaries strictly below v. NaN
    // compares false everywhere and lands in position 0, deterministically.
    let pos = mids.partition_point(|&m| m < scaled);
    order[pos]
}

/// Quantizes `x` (the flattened weight) like `bitsandbytes.functional.quantize_4bit(x, blocksize,
/// quant_type, compress_statistics=False)`.
pub fn quantize_4bit(
    x: &[f32],
    blocksize: usize,
    kind: Bnb4Kind,
) -> Result<Bnb4Quantized, BnbError> {
    check_blocksize(blocksize)?;
    let mids = kind.midpoints();
    let order = kind.sort_order();
    let n = x.len();
    let full_blocks = n / blocksize;
    let mut absmax = Vec::with_capacity(num_blocks(n, blocksize));
    let mut codes = Vec::with_capacity(n + 1);
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block_absmax(block);
        if b < full_blocks {
            // Full blocks: multiply by the f32 reciprocal of the clamped absmax, store the raw
            // absmax.
            let r = 1.0 / am.max(ABSMAX_FLOOR);
            absmax.push(am);
            codes.extend(
                block
                    .iter()
                    .map(|&v| code_of((v * r).clamp(-1.0, 1.0), &mids, order)),
            );
        } else {
            // The short last block: true division, and the clamped absmax is what is stored.
            let am = am.max(ABSMAX_FLOOR);
            absmax.push(am);
            codes.extend(
                block
                    .iter()
                    .map(|&v| code_of((v / am).clamp(-1.0, 1.0), &mids, order)),
            );
        }
    }
    if codes.len() % 2 == 1 {
        codes.push(code_of(0.0, &mids, order));
    }
    let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
    Ok(Bnb4Quantized { packed, absmax })
}

/// Unpacks `n` 4-bit codes (high nibble first) from `packed`.
pub fn unpack_codes(packed: &[u8], n: usize) -> Result<Vec<u8>, BnbError> {
    if packed.len() != packed_len(n) {
        return Err(BnbError::Length {
            what: "packed 4-bit codes",
            expected: packed_len(n),
            actual: packed.len(),
        });
    }
    Ok(packed
        .iter()
        .flat_map(|&b| [b >> 4, b & 0x0F])
        .take(n)
        .collect())
}

/// Dequantizes `n` elements: `table[code] * absmax[block]` in f32, as bitsandbytes'
/// `dequantize_4bit` with `dtype=torch.float32` does (bit-exact, including FP4's -0.0).
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    n: usize,
    blocksize: usize,
    kind: Bnb4Kind,
) -> Result<Vec<f32>, BnbError> {
    check_blocksize(blocksize)?;
    let blocks = num_blocks(n, blocksize);
    if absmax.len() != blocks {
        return Err(BnbError::Length {
            what: "absmax",
            expected: blocks,
            actual: absmax.len(),
        });
    }
    let codes = unpack_codes(packed, n)?;
    let table = kind.dequant_table();
    Ok(codes
        .chunks(blocksize)
        .zip(absmax)
        .flat_map(|(block, &am)| block.iter().map(move |&c| table[usize::from(c)] * am))
        .collect())
}

/// `torch.linspace(start, end, steps)` in f32 as torch's CPU kernel computes it: `step = (end -
/// start) / (steps - 1)`, the first half as `start + step * i`, the second half as `end - step *
/// (steps - 1 - i)`. torch's kernel is compiled with floating-point contraction, so each of those
/// is one fused multiply-add; the unfused form gives a dynamic map that differs from
/// bitsandbytes' stored one in 42 of 256 entries, the fused form matches all of them.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// bitsandbytes' signed dynamic 8-bit map, `create_dynamic_map(signed=True, max_exponent_bits=7,
/// total_bits=8)`: the `nested_quant_map` of double-quantized weights, 256 sorted f32 values in
/// `[-0.99296875, 1]`.
///
/// For each exponent `i` in 0..7 the map holds `10^(i-6) * m` and its negation for the `2^i`
/// midpoints `m` of `linspace(0.1, 1, 2^i + 1)`, plus 0 and 1. The products are f32 (torch
/// multiplies the f32 tensor by the f32-rounded scalar), and the linspace is torch's (see
/// `torch_linspace_f32`); the result equals the stored map bit for bit.
pub fn dynamic_map() -> [f32; 256] {
    // 10 ** (i - 6) as Python computes it (a correctly rounded double), then rounded to f32 as
    // torch does when multiplying an f32 tensor by a Python float.
    const POWERS: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data = Vec::with_capacity(256);
    for (i, &p) in POWERS.iter().enumerate() {
        let bounds = torch_linspace_f32(0.1, 1.0, (1 << i) + 1);
        let scale = p as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut map = [0.0f32; 256];
    map.copy_from_slice(&data);
    map
}

/// Size of the lookup table bitsandbytes' CPU 8-bit quantizer uses.
const LUT_SIZE: usize = 65_536;

/// bitsandbytes' CPU blockwise 8-bit quantizer does not search the code table per value: it
/// discretizes `[-1, 1]` into 65 536 points `-1 + 2i/65535` (f32), records for each point the
/// nearest code (the number of f32 midpoints `0.5 * (a + b)` strictly below it), and maps a
/// scaled value to the point `trunc(((v + 1) * 0.5) * 65535 + 0.5)`. This is not always the
/// nearest code (a value within about 1.5e-5 of a midpoint, or in the dense region near zero
/// where codes are closer than the grid, may get a neighbour), and it is what produced the codes
/// in bitsandbytes' files; the golden nested codes match it exactly and differ from a true
/// nearest search in 3 of 1024 and 2 of 2048 values.
fn dynamic_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Vec::with_capacity(LUT_SIZE);
        let mut idx = 0usize;
        for i in 0..LUT_SIZE {
            let val = -1.0f32 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < mids.len() && mids[idx] < val {
                idx += 1;
            }
            // idx <= 255 because mids has 255 entries.
            lut.push(idx as u8);
        }
        lut
    })
}

/// The absmax values of a double-quantized weight.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// One 8-bit code per 4-bit block (stored as `weight.absmax`, uint8).
    pub codes: Vec<u8>,
    /// One f32 absmax per 256 codes (`weight.nested_absmax`).
    pub nested_absmax: Vec<f32>,
    /// The mean that was subtracted (`nested_offset` in the quant state JSON).
    pub offset: f32,
}

/// Double quantization of `absmax`, as `quantize_4bit(..., compress_statistics=True)` does on CPU:
/// `offset = mean(absmax)`, then `absmax - offset` quantized blockwise (256 per block) into
/// [`dynamic_map`] with bitsandbytes' CPU lookup-table rounding.
///
/// The mean is accumulated in f64 in index order and rounded to f32. torch sums in f32 with its
/// own vectorized order, so for other inputs the offset may differ from bitsandbytes' by an ulp
/// (the golden offsets match). Within a block: `am = max |a|`; an all-zero block gets codes 0;
/// otherwise `v = clamp(a * (1 / am), -1, 1)` and the code is the table entry of
/// `trunc(((v + 1) * 0.5) * 65535 + 0.5)`, each step rounded to f32 as the AVX2 kernel does.
/// bitsandbytes handles the last `len % 8` values (only the final block can have such a tail)
/// in a scalar loop compiled with FMA enabled, where the compiler may fuse the last multiply and
/// add; kiln does not fuse.
/// The golden absmax counts (1024, 2048) are multiples of 8, so that tail is unverified and may
/// differ in rare values by one code.
pub fn double_quantize(absmax: &[f32]) -> NestedAbsmax {
    let offset = if absmax.is_empty() {
        0.0
    } else {
        (absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / absmax.len() as f64) as f32
    };
    let lut = dynamic_lut();
    let centered: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let mut codes = Vec::with_capacity(centered.len());
    let mut nested_absmax = Vec::with_capacity(num_blocks(centered.len(), NESTED_BLOCKSIZE));
    for block in centered.chunks(NESTED_BLOCKSIZE) {
        // The kernel's max ignores NaN lanes.
        let am = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        nested_absmax.push(am);
        if am == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inv = 1.0 / am;
        codes.extend(block.iter().map(|&a| {
            let v = (a * inv).clamp(-1.0, 1.0);
            let t = (v + 1.0) * 0.5;
            let t = t * (LUT_SIZE - 1) as f32;
            let t = t + 0.5;
            // t is in [0.5, 65535.5] for finite v; `as` truncates like cvttps and saturates NaN
            // to 0, so the index is always in range.
            lut[(t as usize).min(LUT_SIZE - 1)]
        }));
    }
    NestedAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

/// Restores the absmax values from their double quantization:
/// `map[code] * nested_absmax[block] + offset`, with two f32 roundings, as bitsandbytes'
/// blockwise dequantization followed by the offset addition (no fused multiply-add).
pub fn dequantize_nested_absmax(nested: &NestedAbsmax) -> Result<Vec<f32>, BnbError> {
    let blocks = num_blocks(nested.codes.len(), NESTED_BLOCKSIZE);
    if nested.nested_absmax.len() != blocks {
        return Err(BnbError::Length {
            what: "nested_absmax",
            expected: blocks,
            actual: nested.nested_absmax.len(),
        });
    }
    let map = dynamic_map();
    Ok(nested
        .codes
        .chunks(NESTED_BLOCKSIZE)
        .zip(&nested.nested_absmax)
        .flat_map(|(block, &am)| {
            block
                .iter()
                .map(move |&c| map[usize::from(c)] * am + nested.offset)
        })
        .collect())
}

/// The JSON bitsandbytes stores in `weight.quant_state.bitsandbytes__<type>` (as UTF-8 bytes),
/// byte for byte as `json.dumps(QuantState.as_dict(packed=True) non-tensor part)` writes it:
/// keys `quant_type`, `blocksize`, `dtype`, `shape` and, when double-quantized,
/// `nested_blocksize` (256), `nested_dtype` (`"float32"`), `nested_offset`; Python's default
/// separators (`", "`, `": "`), ASCII-only escaping, floats as Python's `repr`.
///
/// `dtype` is the torch dtype name of the original weight without the `torch.` prefix
/// (`"bfloat16"`, `"float16"`, `"float32"`); `shape` is the original weight shape.
pub fn quant_state_json(
    kind: Bnb4Kind,
    blocksize: usize,
    dtype: &str,
    shape: &[usize],
    nested_offset: Option<f32>,
) -> String {
    let shape_list = shape
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "{{\"quant_type\": {}, \"blocksize\": {blocksize}, \"dtype\": {}, \"shape\": [{shape_list}]",
        json_string(kind.name()),
        json_string(dtype),
    );
    if let Some(offset) = nested_offset {
        // The offset is a 0-d f32 tensor; `.item()` widens it to a Python float exactly.
        s.push_str(&format!(
            ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \
             \"nested_offset\": {}",
            kiln_types::python_float_repr(f64::from(offset))
        ));
    }
    s.push('}');
    s
}

/// A JSON string literal as Python's `json.dumps` writes it (`ensure_ascii=True`).
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    kiln_types::push_python_json_string(&mut out, s);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_ascii_escaped() {
        assert_eq!(json_string("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json_string("é"), "\"\\u00e9\"");
        assert_eq!(json_string("\u{1F600}"), "\"\\ud83d\\ude00\"");
    }

    #[test]
    fn fp4_sort_order_sorts_the_table() {
        let mut seen = [false; 16];
        for w in FP4_SORT_ORDER.windows(2) {
            assert!(FP4_QUANT_MAP[usize::from(w[0])] <= FP4_QUANT_MAP[usize::from(w[1])]);
        }
        for &c in &FP4_SORT_ORDER {
            seen[usize::from(c)] = true;
        }
        assert!(seen.iter().all(|&s| s));
        // The stable argsort keeps +0 (code 0) before -0 (code 8).
        assert_eq!(&FP4_SORT_ORDER[7..9], &[0, 8]);
    }

    #[test]
    fn nf4_codes_pick_the_nearest_entry_with_ties_down() {
        let mids = Bnb4Kind::Nf4.midpoints();
        for (i, &m) in mids.iter().enumerate() {
            // Exactly on a midpoint: the lower entry.
            assert_eq!(code_of(m, &mids, &NF4_SORT_ORDER), i as u8);
            // Just above: the upper one.
            let above = if m > 0.0 {
                f32::from_bits(m.to_bits() + 1)
            } else {
                f32::from_bits(m.to_bits() - 1)
            };
            assert_eq!(code_of(above, &mids, &NF4_SORT_ORDER), i as u8 + 1);
        }
        for (c, &v) in NF4_QUANT_MAP.iter().enumerate() {
            assert_eq!(code_of(v, &mids, &NF4_SORT_ORDER), c as u8);
        }
    }

    #[test]
    fn fp4_small_values_take_signed_zero_codes() {
        let mids = Bnb4Kind::Fp4.midpoints();
        assert_eq!(code_of(0.0, &mids, &FP4_SORT_ORDER), 0);
        assert_eq!(code_of(1e-4, &mids, &FP4_SORT_ORDER), 8);
        assert_eq!(code_of(-1e-4, &mids, &FP4_SORT_ORDER), 0);
        assert_eq!(code_of(0.01, &mids, &FP4_SORT_ORDER), 1);
        assert_eq!(code_of(-1.0, &mids, &FP4_SORT_ORDER), 11);
        assert_eq!(code_of(1.0, &mids, &FP4_SORT_ORDER), 3);
    }

    #[test]
    fn odd_count_pads_with_the_zero_code() {
        let q = quantize_4bit(&[1.0, -1.0, 0.5], 64, Bnb4Kind::Nf4).unwrap();
        assert_eq!(q.packed, vec![0xF0, 0xC7]);
        assert_eq!(q.absmax, vec![1.0]);
        let q = quantize_4bit(&[1.0], 64, Bnb4Kind::Fp4).unwrap();
        assert_eq!(q.packed, vec![0x30]);
    }

    #[test]
    fn short_last_block_and_zero_blocks() {
        let mut x = vec![0.0f32; 32];
        x.extend([2.0, -1.0, 0.0]);
        let q = quantize_4bit(&x, 32, Bnb4Kind::Nf4).unwrap();
        // The all-zero full block keeps absmax 0 and code 7; the short block stores max(am, 1e-38).
        assert_eq!(q.absmax, vec![0.0, 2.0]);
        assert!(q.packed[..16].iter().all(|&b| b == 0x77));
        let d = dequantize_4bit(&q.packed, &q.absmax, x.len(), 32, Bnb4Kind::Nf4).unwrap();
        assert_eq!(&d[32..], &[2.0, NF4_QUANT_MAP[2] * 2.0, 0.0]);
        let q = quantize_4bit(&[0.0; 3], 32, Bnb4Kind::Nf4).unwrap();
        assert_eq!(q.absmax, vec![1e-38]);
    }

    #[test]
    fn bad_sizes_are_errors() {
        assert_eq!(
            quantize_4bit(&[1.0], 48, Bnb4Kind::Nf4),
            Err(BnbError::BlockSize(48))
        );
        assert_eq!(check_blocksize(16), Err(BnbError::BlockSize(16)));
        assert_eq!(check_blocksize(8192), Err(BnbError::BlockSize(8192)));
        assert!(matches!(
            dequantize_4bit(&[0; 2], &[1.0], 5, 64, Bnb4Kind::Nf4),
            Err(BnbError::Length { .. })
        ));
        assert!(matches!(
            dequantize_4bit(&[0; 3], &[1.0, 1.0], 5, 64, Bnb4Kind::Nf4),
            Err(BnbError::Length { .. })
        ));
        let bad = NestedAbsmax {
            codes: vec![0; 300],
            nested_absmax: vec![1.0],
            offset: 0.0,
        };
        assert!(dequantize_nested_absmax(&bad).is_err());
    }

    #[test]
    fn non_finite_inputs_do_not_panic() {
        let x = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1.0];
        for kind in [Bnb4Kind::Nf4, Bnb4Kind::Fp4] {
            let q = quantize_4bit(&x, 32, kind).unwrap();
            assert_eq!(q.packed.len(), 2);
        }
        let n = double_quantize(&[f32::NAN, 1.0, f32::INFINITY]);
        assert_eq!(n.codes.len(), 3);
        assert!(double_quantize(&[]).codes.is_empty());
    }

    #[test]
    fn dynamic_map_shape() {
        let map = dynamic_map();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[255], 1.0);
        assert_eq!(map[127], 0.0);
        assert_eq!(map[0], -map[254]);
        let lut = dynamic_lut();
        assert_eq!(lut.len(), LUT_SIZE);
        assert_eq!(lut[0], 0);
        assert_eq!(lut[LUT_SIZE - 1], 255);
        assert!(lut.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn double_quantization_round_trips_closely() {
        let absmax: Vec<f32> = (0..600)
            .map(|i| 0.05 + (i as f32 * 0.37).sin().abs())
            .collect();
        let n = double_quantize(&absmax);
        assert_eq!(n.codes.len(), 600);
        assert_eq!(n.nested_absmax.len(), 3);
        let back = dequantize_nested_absmax(&n).unwrap();
        for (a, b) in absmax.iter().zip(&back) {
            // The dynamic map's coarsest step is 1/64 of the block range.
            assert!((a - b).abs() <= 0.02, "{a} vs {b}");
        }
    }
}
