//! Uniform ("affine") integer quantization with a scale and a zero point, in the convention of
//! compressed-tensors, the format kiln writes for vLLM and transformers (`docs/ecosystem.md`
//! §1.3), and compressed-tensors' int32 packing.
//!
//! A weight matrix is `rows × cols` row-major (a PyTorch `nn.Linear` weight: rows are output
//! channels, cols input features). A [`QuantScheme`] gives the bit width (2–8), symmetric or
//! asymmetric, and the granularity: one scale for the whole tensor, one per output channel (row),
//! or one per group of `G` consecutive input columns within a row (the last group of a row may be
//! shorter). Scales and zero points are stored row-major over `(row, group)`, which is the layout
//! of compressed-tensors' `weight_scale` `(out, ceil(in/G))`.
//!
//! The arithmetic is compressed-tensors' (`calculate_qparams`, `_quantize`, `_dequantize`), in f32:
//!
//! - Integers live in the **signed** range `[-2^(b-1), 2^(b-1) - 1]` for both modes (-8..7 for 4
//!   bits). The issue text describes symmetric quantization as ±(2^(b-1) - 1) and asymmetric as
//!   `[0, 2^b - 1]`; kiln follows the format it writes instead. Asymmetric values are the
//!   unsigned ones shifted by `2^(b-1)`, with the zero point shifted alike, so `(q - zp) * scale`
//!   is unchanged; and compressed-tensors' symmetric scale divides the absmax by `(2^b - 1) / 2`
//!   (7.5 for 4 bits, not 7), so `+absmax` lands on `qmax` after clamping and `-absmax` on `qmin`.
//! - The clipping range is first widened to include 0 (`min <= 0 <= max`), so 0 is exact.
//! - Symmetric: `scale = max(|min|, |max|) / ((2^b - 1) / 2)`, zero point 0.
//!   Asymmetric: `scale = (max - min) / (2^b - 1)`, `zp = round(clamp(qmin - min / scale, qmin,
//!   qmax))`. Either scale is clamped to at least `f32::EPSILON` first.
//! - `q = round_half_even(clamp(x / scale + zp, qmin, qmax))`, dequantized as `(q - zp) * scale`.
//!
//! compressed-tensors computes in the scale's dtype (the model dtype, often bf16); kiln computes
//! in f32. A writer that stores bf16 or f16 scales should round the scales first and quantize with
//! [`quantize_with_params`], so the stored integers are the ones that scale reproduces best.
//! NaN weights quantize to the zero point; no input panics.

/// Smallest supported bit width.
pub const MIN_BITS: u8 = 2;
/// Largest supported bit width.
pub const MAX_BITS: u8 = 8;

/// How many weights share a scale and a zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Granularity {
    /// One for the whole tensor (compressed-tensors `strategy: tensor`).
    Tensor,
    /// One per output channel, i.e. per row (`strategy: channel`).
    Channel,
    /// One per group of this many consecutive input columns within a row (`strategy: group`).
    Group(usize),
}

/// Bit width, symmetry and granularity of a uniform quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantScheme {
    /// Bits per weight, 2..=8.
    pub bits: u8,
    /// Zero point fixed at 0 (`true`) or chosen per group (`false`).
    pub symmetric: bool,
    /// Which weights share parameters.
    pub granularity: Granularity,
}

/// Why an affine quantization call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AffineError {
    /// The bit width is outside 2..=8.
    #[error("{0} bits is outside the supported 2..=8")]
    Bits(u8),
    /// A group size of 0.
    #[error("group size must be at least 1")]
    GroupSize,
    /// A buffer does not have the length the shape implies.
    #[error("{what}: expected {expected} entries, got {actual}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Entries needed.
        expected: usize,
        /// Entries given.
        actual: usize,
    },
    /// `rows × cols` (or a packed size) overflows `usize`.
    #[error("shape {rows} x {cols} is too large")]
    TooLarge {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A value to pack does not fit the signed range of the bit width.
    #[error("value {value} does not fit in {bits} signed bits")]
    OutOfRange {
        /// The value.
        value: i32,
        /// The bit width.
        bits: u8,
    },
    /// An estimator parameter is out of its domain.
    #[error("invalid parameter: {0}")]
    Parameter(&'static str),
}

fn check_bits(bits: u8) -> Result<(), AffineError> {
    if (MIN_BITS..=MAX_BITS).contains(&bits) {
        Ok(())
    } else {
        Err(AffineError::Bits(bits))
    }
}

fn element_count(rows: usize, cols: usize) -> Result<usize, AffineError> {
    rows.checked_mul(cols)
        .ok_or(AffineError::TooLarge { rows, cols })
}

impl QuantScheme {
    /// A validated scheme.
    pub fn new(bits: u8, symmetric: bool, granularity: Granularity) -> Result<Self, AffineError> {
        let s = Self {
            bits,
            symmetric,
            granularity,
        };
        s.validate()?;
        Ok(s)
    }

    /// Checks the bit width and the group size.
    pub fn validate(&self) -> Result<(), AffineError> {
        check_bits(self.bits)?;
        if self.granularity == Granularity::Group(0) {
            return Err(AffineError::GroupSize);
        }
        Ok(())
    }

    /// Bits clamped into the supported range, so the range helpers never overflow even for a
    /// scheme that was built by hand and not validated.
    const fn bits_clamped(&self) -> u32 {
        if self.bits < MIN_BITS {
            MIN_BITS as u32
        } else if self.bits > MAX_BITS {
            MAX_BITS as u32
        } else {
            self.bits as u32
        }
    }

    /// Smallest integer, `-2^(b-1)`.
    pub const fn qmin(&self) -> i32 {
        -(1 << (self.bits_clamped() - 1))
    }

    /// Largest integer, `2^(b-1) - 1`.
    pub const fn qmax(&self) -> i32 {
        (1 << (self.bits_clamped() - 1)) - 1
    }

    /// Parameter groups per row: 1 for per-tensor and per-channel, `ceil(cols / G)` for groups.
    pub fn groups_per_row(&self, cols: usize) -> usize {
        match self.granularity {
            Granularity::Tensor | Granularity::Channel => 1,
            Granularity::Group(g) => cols.div_ceil(g.max(1)),
        }
    }

    /// Number of scales (and zero points) for a `rows × cols` matrix.
    pub fn num_groups(&self, rows: usize, cols: usize) -> usize {
        match self.granularity {
            Granularity::Tensor => 1,
            Granularity::Channel => rows,
            Granularity::Group(_) => rows.saturating_mul(self.groups_per_row(cols)),
        }
    }
}

/// Each parameter group of a `rows × cols` matrix as a slice, in scale order. Every group is
/// contiguous in row-major storage: the whole tensor, a row, or a run of columns within a row.
pub(crate) fn group_slices<'a>(
    weights: &'a [f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
) -> Result<Vec<&'a [f32]>, AffineError> {
    scheme.validate()?;
    let n = element_count(rows, cols)?;
    if weights.len() != n {
        return Err(AffineError::Length {
            what: "weights",
            expected: n,
            actual: weights.len(),
        });
    }
    Ok(match scheme.granularity {
        Granularity::Tensor => vec![weights],
        Granularity::Channel => {
            if cols == 0 {
                vec![&weights[..0]; rows]
            } else {
                weights.chunks_exact(cols).collect()
            }
        }
        Granularity::Group(g) => {
            if cols == 0 {
                Vec::new()
            } else {
                weights
                    .chunks_exact(cols)
                    .flat_map(|row| row.chunks(g))
                    .collect()
            }
        }
    })
}

/// A clipping range: the interval of weight values a group's integers should cover.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Range {
    /// Lower end.
    pub min: f32,
    /// Upper end.
    pub max: f32,
}

impl Range {
    /// A range from its ends.
    pub const fn new(min: f32, max: f32) -> Self {
        Self { min, max }
    }
}

/// Scale and zero point for a clipping range (compressed-tensors' `calculate_qparams`).
pub fn qparams(range: Range, scheme: &QuantScheme) -> (f32, i32) {
    // `min(x, 0)` / `max(x, 0)` as torch does; NaN ends collapse to 0.
    let lo = if range.min < 0.0 { range.min } else { 0.0 };
    let hi = if range.max > 0.0 { range.max } else { 0.0 };
    let qmin = scheme.qmin();
    let qmax = scheme.qmax();
    let bit_range = (qmax - qmin) as f32;
    if scheme.symmetric {
        let a = lo.abs().max(hi.abs());
        let scale = (a / (bit_range / 2.0)).max(f32::EPSILON);
        (scale, 0)
    } else {
        let scale = ((hi - lo) / bit_range).max(f32::EPSILON);
        let zp = (qmin as f32 - lo / scale).clamp(qmin as f32, qmax as f32);
        (scale, zp.round_ties_even() as i32)
    }
}

/// One value: `round_half_even(clamp(x / scale + zp, qmin, qmax))`.
pub fn quantize_value(x: f32, scale: f32, zero_point: i32, qmin: i32, qmax: i32) -> i32 {
    let v = (x / scale + zero_point as f32).clamp(qmin as f32, qmax as f32);
    // NaN stays NaN through clamp; `as` maps it to 0, i.e. to the value 0 - zp. Keep the zero
    // point instead, which dequantizes to 0.
    if v.is_nan() {
        zero_point
    } else {
        v.round_ties_even() as i32
    }
}

/// One value: `(q - zp) * scale`.
pub fn dequantize_value(q: i32, scale: f32, zero_point: i32) -> f32 {
    (q - zero_point) as f32 * scale
}

/// A quantized matrix with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct AffineQuantized {
    /// Rows (output channels).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// The scheme the values were produced with.
    pub scheme: QuantScheme,
    /// Signed integers in `[qmin, qmax]`, row-major.
    pub q: Vec<i8>,
    /// Scales, one per group, row-major over `(row, group)`.
    pub scales: Vec<f32>,
    /// Zero points in the signed domain, one per group (all 0 when symmetric).
    pub zero_points: Vec<i32>,
}

impl AffineQuantized {
    /// `(q - zp) * scale` for every element, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let gpr = self.scheme.groups_per_row(self.cols);
        let mut out = Vec::with_capacity(self.q.len());
        for (i, &q) in self.q.iter().enumerate() {
            let g = group_index(&self.scheme, gpr, i, self.cols);
            let (s, z) = match (self.scales.get(g), self.zero_points.get(g)) {
                (Some(&s), Some(&z)) => (s, z),
                // Only reachable for a hand-built inconsistent value; decode as 0 rather than
                // panic.
                _ => (0.0, 0),
            };
            out.push(dequantize_value(i32::from(q), s, z));
        }
        out
    }
}

/// The group of flat element `i`.
fn group_index(scheme: &QuantScheme, groups_per_row: usize, i: usize, cols: usize) -> usize {
    match scheme.granularity {
        Granularity::Tensor => 0,
        Granularity::Channel => i / cols.max(1),
        Granularity::Group(g) => {
            let cols = cols.max(1);
            (i / cols) * groups_per_row + (i % cols) / g.max(1)
        }
    }
}

/// Quantizes a `rows × cols` matrix with one clipping range per group (in scale order, e.g. from
/// [`crate::estimators::estimate_ranges`]).
pub fn quantize(
    weights: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    ranges: &[Range],
) -> Result<AffineQuantized, AffineError> {
    scheme.validate()?;
    let groups = scheme.num_groups(rows, cols);
    if ranges.len() != groups {
        return Err(AffineError::Length {
            what: "ranges",
            expected: groups,
            actual: ranges.len(),
        });
    }
    let (scales, zero_points): (Vec<f32>, Vec<i32>) =
        ranges.iter().map(|&r| qparams(r, scheme)).unzip();
    quantize_with_params(weights, rows, cols, scheme, &scales, &zero_points)
}

/// Quantizes a `rows × cols` matrix with given scales and zero points (one per group, in scale
/// order). Zero points must lie in `[qmin, qmax]`; scales should be positive.
pub fn quantize_with_params(
    weights: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    scales: &[f32],
    zero_points: &[i32],
) -> Result<AffineQuantized, AffineError> {
    let slices = group_slices(weights, rows, cols, scheme)?;
    for (what, len) in [("scales", scales.len()), ("zero points", zero_points.len())] {
        if len != slices.len() {
            return Err(AffineError::Length {
                what,
                expected: slices.len(),
                actual: len,
            });
        }
    }
    let (qmin, qmax) = (scheme.qmin(), scheme.qmax());
    if let Some(&z) = zero_points.iter().find(|&&z| z < qmin || z > qmax) {
        return Err(AffineError::OutOfRange {
            value: z,
            bits: scheme.bits,
        });
    }
    let mut q = Vec::with_capacity(weights.len());
    for ((slice, &s), &z) in slices.iter().zip(scales).zip(zero_points) {
        // quantize_value clamps into [qmin, qmax] ⊂ i8, so the narrowing is lossless.
        q.extend(
            slice
                .iter()
                .map(|&x| quantize_value(x, s, z, qmin, qmax) as i8),
        );
    }
    Ok(AffineQuantized {
        rows,
        cols,
        scheme: *scheme,
        q,
        scales: scales.to_vec(),
        zero_points: zero_points.to_vec(),
    })
}

/// Sum of squared errors of quantizing `xs` with these parameters, accumulated in f64 in order.
pub(crate) fn quantization_sq_error(
    xs: &[f32],
    scale: f32,
    zero_point: i32,
    qmin: i32,
    qmax: i32,
) -> f64 {
    xs.iter()
        .map(|&x| {
            let d = dequantize_value(
                quantize_value(x, scale, zero_point, qmin, qmax),
                scale,
                zero_point,
            );
            let e = f64::from(x) - f64::from(d);
            e * e
        })
        .sum()
}

/// int32 words needed for `len` values of `bits` bits packed densely: `ceil(len * bits / 32)`.
pub fn packed_words(len: usize, bits: u8) -> usize {
    (len.saturating_mul(usize::from(bits))).div_ceil(32)
}

/// Packs one row densely, LSB first.
fn pack_row(values: impl Iterator<Item = u32>, bits: u32, out: &mut [u32]) {
    for (i, u) in values.enumerate() {
        let bit = i * bits as usize;
        let (word, shift) = (bit / 32, (bit % 32) as u32);
        out[word] |= u << shift;
        if shift + bits > 32 {
            out[word + 1] |= u >> (32 - shift);
        }
    }
}

/// Reads value `i` of `bits` bits from a densely packed row.
fn unpack_one(row: &[u32], i: usize, bits: u32) -> u32 {
    let bit = i * bits as usize;
    let (word, shift) = (bit / 32, (bit % 32) as u32);
    let mask = (1u32 << bits) - 1;
    let mut u = row[word] >> shift;
    if shift + bits > 32 {
        u |= row[word + 1] << (32 - shift);
    }
    u & mask
}

/// Offsets signed values into `[0, 2^b)` after checking their range.
fn to_unsigned(values: &[i32], bits: u8) -> Result<Vec<u32>, AffineError> {
    let offset = 1i32 << (bits - 1);
    values
        .iter()
        .map(|&v| {
            if v < -offset || v >= offset {
                Err(AffineError::OutOfRange { value: v, bits })
            } else {
                Ok((v + offset) as u32)
            }
        })
        .collect()
}

/// compressed-tensors' `pack_to_int32(values, bits)` along dim 1: each row of the `rows × cols`
/// signed matrix is offset by `2^(b-1)` (4-bit `q + 8`) and written as a little-endian bit
/// stream, element `i` at bits `[i*b, (i+1)*b)`, padded with zeros to
/// [`packed_words`]`(cols, b)` words. Returns `rows × ceil(cols*b/32)` words row-major (the
/// `weight_packed` int32 tensor; write each word little-endian).
///
/// This is the dense layout of compressed-tensors 0.18 and later. For 2, 4 and 8 bits it is also
/// what earlier versions wrote; for 3, 5, 6 and 7 bits earlier versions left the spare high bits
/// of each word empty instead (`docs/ecosystem.md` §1.3), so emit those widths only for readers
/// known to be ≥ 0.18.
pub fn pack_to_int32(
    values: &[i8],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i32>, AffineError> {
    let wide: Vec<i32> = values.iter().map(|&v| i32::from(v)).collect();
    pack_i32_rows(&wide, rows, cols, bits)
}

fn pack_i32_rows(
    values: &[i32],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i32>, AffineError> {
    check_bits(bits)?;
    let n = element_count(rows, cols)?;
    if values.len() != n {
        return Err(AffineError::Length {
            what: "values to pack",
            expected: n,
            actual: values.len(),
        });
    }
    let unsigned = to_unsigned(values, bits)?;
    let words = packed_words(cols, bits);
    let total = element_count(rows, words)?;
    let mut out = vec![0u32; total];
    if words > 0 {
        for (row, dst) in unsigned
            .chunks_exact(cols.max(1))
            .zip(out.chunks_exact_mut(words))
        {
            pack_row(row.iter().copied(), u32::from(bits), dst);
        }
    }
    // The int32 tensor holds the same bits; reinterpret.
    Ok(out.into_iter().map(|w| w as i32).collect())
}

/// The inverse of [`pack_to_int32`]: `rows × ceil(cols*b/32)` words back to the signed
/// `rows × cols` matrix (compressed-tensors' `unpack_from_int32`).
pub fn unpack_from_int32(
    packed: &[i32],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i8>, AffineError> {
    Ok(unpack_i32_rows(packed, rows, cols, bits)?
        .into_iter()
        // Values are in [-2^(b-1), 2^(b-1)) with b <= 8.
        .map(|v| v as i8)
        .collect())
}

fn unpack_i32_rows(
    packed: &[i32],
    rows: usize,
    cols: usize,
    bits: u8,
) -> Result<Vec<i32>, AffineError> {
    check_bits(bits)?;
    let words = packed_words(cols, bits);
    let total = element_count(rows, words)?;
    if packed.len() != total {
        return Err(AffineError::Length {
            what: "packed words",
            expected: total,
            actual: packed.len(),
        });
    }
    let offset = 1i32 << (bits - 1);
    let mut out = Vec::with_capacity(element_count(rows, cols)?);
    if words == 0 {
        out.resize(rows * cols, 0);
        return Ok(out);
    }
    let unsigned: Vec<u32> = packed.iter().map(|&w| w as u32).collect();
    for row in unsigned.chunks_exact(words) {
        out.extend((0..cols).map(|i| unpack_one(row, i, u32::from(bits)) as i32 - offset));
    }
    Ok(out)
}

/// Packs asymmetric zero points as compressed-tensors does: the signed `rows × groups` matrix is
/// packed along dim 0 (output channels), i.e. transposed, packed row-wise with
/// [`pack_to_int32`]'s routine, and transposed back. Returns `ceil(rows*b/32) × groups` words
/// row-major (the `weight_zero_point` int32 tensor).
pub fn pack_zero_points(
    zero_points: &[i32],
    rows: usize,
    groups: usize,
    bits: u8,
) -> Result<Vec<i32>, AffineError> {
    let n = element_count(rows, groups)?;
    if zero_points.len() != n {
        return Err(AffineError::Length {
            what: "zero points",
            expected: n,
            actual: zero_points.len(),
        });
    }
    let mut transposed = vec![0i32; n];
    for r in 0..rows {
        for g in 0..groups {
            transposed[g * rows + r] = zero_points[r * groups + g];
        }
    }
    let packed_t = pack_i32_rows(&transposed, groups, rows, bits)?;
    let words = packed_words(rows, bits);
    let mut out = vec![0i32; packed_t.len()];
    for g in 0..groups {
        for w in 0..words {
            out[w * groups + g] = packed_t[g * words + w];
        }
    }
    Ok(out)
}

/// The inverse of [`pack_zero_points`].
pub fn unpack_zero_points(
    packed: &[i32],
    rows: usize,
    groups: usize,
    bits: u8,
) -> Result<Vec<i32>, AffineError> {
    check_bits(bits)?;
    let words = packed_words(rows, bits);
    let total = element_count(words, groups)?;
    if packed.len() != total {
        return Err(AffineError::Length {
            what: "packed zero points",
            expected: total,
            actual: packed.len(),
        });
    }
    let mut packed_t = vec![0i32; total];
    for g in 0..groups {
        for w in 0..words {
            packed_t[g * words + w] = packed[w * groups + g];
        }
    }
    let transposed = unpack_i32_rows(&packed_t, groups, rows, bits)?;
    let mut out = vec![0i32; transposed.len()];
    for g in 0..groups {
        for r in 0..rows {
            out[r * groups + g] = transposed[g * rows + r];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scheme(bits: u8, symmetric: bool, granularity: Granularity) -> QuantScheme {
        QuantScheme::new(bits, symmetric, granularity).unwrap()
    }

    #[test]
    fn ecosystem_worked_example_packs_to_0x7df08b69() {
        let row = [1i8, -2, 3, 0, -8, 7, 5, -1];
        let packed = pack_to_int32(&row, 1, 8, 4).unwrap();
        assert_eq!(packed.len(), 1);
        assert_eq!(packed[0] as u32, 0x7DF0_8B69);
        assert_eq!(packed[0].to_le_bytes(), [0x69, 0x8B, 0xF0, 0x7D]);
        assert_eq!(unpack_from_int32(&packed, 1, 8, 4).unwrap(), row);
    }

    #[test]
    fn packing_pads_rows_and_straddles_words() {
        // 9 four-bit values: two words per row, the second holding one nibble.
        let q: Vec<i8> = (0..18).map(|i| (i % 16 - 8) as i8).collect();
        let packed = pack_to_int32(&q, 2, 9, 4).unwrap();
        assert_eq!(packed.len(), 4);
        // Element 8 of row 0 is 0, stored as 0 + 8 alone in the second word.
        assert_eq!(packed[1], 0x8);
        assert_eq!(unpack_from_int32(&packed, 2, 9, 4).unwrap(), q);
        // Every width round-trips, including the ones whose values straddle words.
        for bits in MIN_BITS..=MAX_BITS {
            let lo = -(1i32 << (bits - 1));
            let hi = (1i32 << (bits - 1)) - 1;
            let q: Vec<i8> = (0..3 * 37)
                .map(|i| (lo + (i * 7) % (hi - lo + 1)) as i8)
                .collect();
            let packed = pack_to_int32(&q, 3, 37, bits).unwrap();
            assert_eq!(packed.len(), 3 * packed_words(37, bits));
            assert_eq!(
                unpack_from_int32(&packed, 3, 37, bits).unwrap(),
                q,
                "{bits} bits"
            );
        }
        // 3 bits, dense: 11 values fill 33 bits, so value 10 straddles words 0 and 1.
        let q = [3i8; 11]; // offset 4 -> 7 = 0b111 everywhere
        let packed = pack_to_int32(&q, 1, 11, 3).unwrap();
        assert_eq!(packed[0] as u32, u32::MAX);
        assert_eq!(packed[1], 1);
    }

    #[test]
    fn packing_rejects_bad_input() {
        assert_eq!(
            pack_to_int32(&[8], 1, 1, 4),
            Err(AffineError::OutOfRange { value: 8, bits: 4 })
        );
        assert!(matches!(
            pack_to_int32(&[0; 3], 2, 2, 4),
            Err(AffineError::Length { .. })
        ));
        assert_eq!(pack_to_int32(&[0], 1, 1, 9), Err(AffineError::Bits(9)));
        assert!(matches!(
            unpack_from_int32(&[0; 3], 2, 9, 4),
            Err(AffineError::Length { .. })
        ));
        assert!(matches!(
            pack_to_int32(&[], usize::MAX, 2, 4),
            Err(AffineError::TooLarge { .. })
        ));
    }

    #[test]
    fn zero_points_pack_along_output_channels() {
        // 9 rows x 2 groups of 4-bit zero points: 2 words per column.
        let zp: Vec<i32> = (0..18).map(|i| i % 16 - 8).collect();
        let packed = pack_zero_points(&zp, 9, 2, 4).unwrap();
        assert_eq!(packed.len(), 2 * 2);
        // Column 0 holds rows' values 0,2,4,... = -8,-6,...; word 0 of column 0 is packed[0].
        let col0: Vec<i32> = (0..9).map(|r| zp[r * 2]).collect();
        let want = pack_i32_rows(&col0, 1, 9, 4).unwrap();
        assert_eq!((packed[0], packed[2]), (want[0], want[1]));
        assert_eq!(unpack_zero_points(&packed, 9, 2, 4).unwrap(), zp);
    }

    #[test]
    fn symmetric_4bit_follows_compressed_tensors() {
        let s = scheme(4, true, Granularity::Tensor);
        assert_eq!((s.qmin(), s.qmax()), (-8, 7));
        let (scale, zp) = qparams(Range::new(-3.0, 1.5), &s);
        assert_eq!(scale, 3.0 / 7.5);
        assert_eq!(zp, 0);
        // -absmax -> -7.5 -> round half even -> -8; +absmax -> clamp 7.
        assert_eq!(quantize_value(-3.0, scale, zp, -8, 7), -8);
        assert_eq!(quantize_value(3.0, scale, zp, -8, 7), 7);
        // Half-way cases round to even.
        assert_eq!(quantize_value(0.5 * scale, scale, 0, -8, 7), 0);
        assert_eq!(quantize_value(1.5 * scale, scale, 0, -8, 7), 2);
        assert_eq!(quantize_value(-2.5 * scale, scale, 0, -8, 7), -2);
    }

    #[test]
    fn asymmetric_maps_min_and_max_to_the_ends() {
        let s = scheme(4, false, Granularity::Tensor);
        let (scale, zp) = qparams(Range::new(-1.0, 2.0), &s);
        assert_eq!(scale, 3.0 / 15.0);
        // qmin - min/scale = -8 + 5 = -3.
        assert_eq!(zp, -3);
        assert_eq!(quantize_value(-1.0, scale, zp, -8, 7), -8);
        assert_eq!(quantize_value(2.0, scale, zp, -8, 7), 7);
        assert_eq!(
            dequantize_value(quantize_value(0.0, scale, zp, -8, 7), scale, zp),
            0.0
        );
        // A range that excludes 0 is widened to include it.
        let (scale, zp) = qparams(Range::new(1.0, 2.0), &s);
        assert_eq!((scale, zp), (2.0 / 15.0, -8));
        // Degenerate ranges get the epsilon scale.
        assert_eq!(qparams(Range::new(0.0, 0.0), &s), (f32::EPSILON, -8));
        let sym = scheme(8, true, Granularity::Tensor);
        assert_eq!(qparams(Range::new(0.0, 0.0), &sym), (f32::EPSILON, 0));
    }

    #[test]
    fn quantize_per_group_layout_and_round_trip() {
        // 2 rows x 5 cols, groups of 2 -> 3 groups per row, the last one column wide.
        let w = [0.1, -0.2, 0.3, 0.4, -0.5, 1.0, 2.0, -3.0, 0.0, 0.25];
        let s = scheme(8, true, Granularity::Group(2));
        assert_eq!(s.num_groups(2, 5), 6);
        let ranges: Vec<Range> = group_slices(&w, 2, 5, &s)
            .unwrap()
            .iter()
            .map(|g| {
                let a = g.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                Range::new(-a, a)
            })
            .collect();
        let q = quantize(&w, 2, 5, &s, &ranges).unwrap();
        assert_eq!(q.scales.len(), 6);
        assert_eq!(q.scales[2], 0.5 / 127.5);
        // -absmax / scale is -127.5 in exact arithmetic; the f32-rounded scale decides which
        // side of the tie it lands on.
        assert!(matches!(q.q[4], -128 | -127), "{}", q.q[4]);
        // Element 4 is alone in group 2 of row 0, element 5 starts row 1's group 3.
        assert_eq!(q.scales[3], 2.0 / 127.5);
        let d = q.dequantize();
        for (a, b) in w.iter().zip(&d) {
            assert!((a - b).abs() <= 3.0 / 127.5 / 2.0 + 1e-6, "{a} vs {b}");
        }
        assert!(matches!(
            quantize(&w, 2, 5, &s, &ranges[..5]),
            Err(AffineError::Length { .. })
        ));
        assert!(matches!(
            quantize(&w[..9], 2, 5, &s, &ranges),
            Err(AffineError::Length { .. })
        ));
    }

    #[test]
    fn per_channel_and_per_tensor_counts() {
        let s = scheme(4, false, Granularity::Channel);
        assert_eq!(s.num_groups(3, 7), 3);
        let t = scheme(4, false, Granularity::Tensor);
        assert_eq!(t.num_groups(3, 7), 1);
        assert_eq!(
            QuantScheme::new(1, true, Granularity::Tensor),
            Err(AffineError::Bits(1))
        );
        assert_eq!(
            QuantScheme::new(4, true, Granularity::Group(0)),
            Err(AffineError::GroupSize)
        );
        let w = [0.0f32; 21];
        let q = quantize(&w, 3, 7, &s, &[Range::new(-1.0, 1.0); 3]).unwrap();
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
        assert!(matches!(
            quantize_with_params(&w, 3, 7, &s, &[1.0; 3], &[0, 9, 0]),
            Err(AffineError::OutOfRange { value: 9, .. })
        ));
    }

    #[test]
    fn nan_weights_decode_to_zero() {
        let s = scheme(4, false, Granularity::Tensor);
        let q = quantize(&[f32::NAN, 1.0], 1, 2, &s, &[Range::new(-1.0, 1.0)]).unwrap();
        assert_eq!(q.dequantize()[0], 0.0);
    }
}
