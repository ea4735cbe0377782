//! IQ4_NL and IQ4_XS: 4-bit indices into the fixed non-linear table `kvalues_iq4nl`, scaled per
//! block of 32 (`quantize_row_iq4_nl_impl` in `ggml-quants.c`).
//!
//! IQ4_NL stores one f16 scale per block of 32. IQ4_XS groups eight such blocks into a
//! super-block of 256 with one f16 scale and a 6-bit signed multiplier per block.
//!
//! Both follow `quantize_iq4_nl` / `quantize_iq4_xs`, which llama-quantize runs with and without
//! an importance matrix: a search over 15 trial scales per block (`ntry = 7`), then the indices are
//! recomputed from the final scale. The reference row routine `quantize_row_iq4_nl_ref` (no search)
//! is deliberately not what is implemented here; llama-quantize never calls it.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::Kernel;
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits, nearest_int};

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        ty: GgmlType::IQ4_NL,
        quantize_row: quantize_iq4_nl,
        dequantize: dequantize_iq4_nl,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ4_XS,
        quantize_row: quantize_iq4_xs,
        dequantize: dequantize_iq4_xs,
        requires_imatrix: false,
        uses_imatrix: true,
    },
];

/// `block_iq4_nl`: an f16 scale and 32 four-bit table indices (18 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq4Nl {
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Byte `j`: low nibble indexes element `j`, high nibble element `j + 16`.
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockIq4Nl>() == 18);

impl Block for BlockIq4Nl {
    const TYPE: GgmlType = GgmlType::IQ4_NL;
    const ELEMENTS: usize = 32;
}

/// `block_iq4_xs`: a super-block of 8 × 32 elements with an f16 scale and eight 6-bit block
/// multipliers (136 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq4Xs {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Bits `2b..2b+1` (u16, little-endian) are the top two bits of block `b`'s multiplier code.
    pub(crate) scales_h: [u8; 2],
    /// Nibble `b % 2` of byte `b / 2` holds the low four bits of block `b`'s multiplier code.
    pub(crate) scales_l: [u8; 4],
    /// Block `b` uses bytes `16b..16b+16`, nibbles placed as in IQ4_NL.
    pub(crate) qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockIq4Xs>() == 136);

impl Block for BlockIq4Xs {
    const TYPE: GgmlType = GgmlType::IQ4_XS;
    const ELEMENTS: usize = 256;
}

/// `kvalues_iq4nl`: the levels a 4-bit index selects, in ascending order.
const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Elements per scaled block (both types).
const BLOCK: usize = 32;

/// Below this |x| a block counts as all zero (`GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// Trial scales on either side of the initial one, as `quantize_iq4_nl`/`quantize_iq4_xs` pass.
const NTRY: i32 = 7;

/// Sub-block multipliers are stored as `l + 32` in six bits, so `l` lies in `-32..=31`.
const XS_SCALE_OFFSET: i32 = 32;

/// `best_index_int8` over [`KVALUES`]: the index of the level nearest to `x`, a tie going to the
/// higher index. Out-of-range values clamp to the ends; NaN lands on the last index, as the
/// reference's binary search does.
fn best_index(x: f32) -> u8 {
    let level = |i: usize| f32::from(KVALUES[i]);
    if x <= level(0) {
        return 0;
    }
    if x >= level(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0usize, 15usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < level(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    // Distances are compared as two separate f32 subtractions, exactly as ggml does.
    if x - level(lo) < level(hi) - x {
        lo as u8
    } else {
        hi as u8
    }
}

/// The σ² of the weighting: twice the mean square over the super-block (`2/n` multiplies the
/// f32 sum, as in ggml; `n` is a power of two, so the factor is exact).
fn sigma2(x: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for v in x {
        sum += v * v;
    }
    sum * (2.0 / x.len() as f32)
}

/// Per-element weights of one block: `qw·√(σ² + x²)` with an importance matrix, else `x²`.
fn block_weights(xb: &[f32], qw: Option<&[f32]>, sigma2: f32) -> [f32; BLOCK] {
    let mut w = [0.0f32; BLOCK];
    match qw {
        Some(qw) => {
            for ((w, &x), &q) in w.iter_mut().zip(xb).zip(qw) {
                *w = q * (sigma2 + x * x).sqrt();
            }
        }
        None => {
            for (w, &x) in w.iter_mut().zip(xb) {
                *w = x * x;
            }
        }
    }
    w
}

/// Σ w·q·x and Σ w·q² for the levels `best_index(id·x)` picks.
fn weighted_sums(xb: &[f32], w: &[f32; BLOCK], id: f32) -> (f32, f32) {
    let mut sumqx = 0.0f32;
    let mut sumq2 = 0.0f32;
    for (&x, &w) in xb.iter().zip(w) {
        let q = f32::from(KVALUES[usize::from(best_index(id * x))]);
        sumqx += w * q * x;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The least-squares scale of one block of 32 after trying `2·NTRY + 1` inverse scales around
/// `-127/max` (the element of largest magnitude maps to the most negative level). An all-zero
/// block gets scale 0.
fn block_scale(xb: &[f32], w: &[f32; BLOCK]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &x in xb {
        if x.abs() > amax {
            amax = x.abs();
            max = x;
        }
    }
    if amax < GROUP_MAX_EPS {
        return 0.0;
    }
    // The first guess, -max/K[0], maps the largest element to the top of the table (the trials
    // below map it to the bottom); ggml keeps this sign convention, so we do too.
    let d0 = -max / f32::from(KVALUES[0]);
    let (sumqx, sumq2) = weighted_sums(xb, w, 1.0 / d0);
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -NTRY..=NTRY {
        let id = (itry + i32::from(KVALUES[0])) as f32 / max;
        let (sumqx, sumq2) = weighted_sums(xb, w, id);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Indices of the levels nearest to `id·x`, packed two per byte: byte `j` holds element `j` in
/// its low nibble and element `j + 16` in its high nibble.
fn pack_block(xb: &[f32], id: f32, qs: &mut [u8]) {
    let (lo, hi) = xb.split_at(BLOCK / 2);
    for ((q, &a), &b) in qs.iter_mut().zip(lo).zip(hi) {
        *q = best_index(id * a) | (best_index(id * b) << 4);
    }
}

/// The importance weights of block `index` of `size` elements, if there is an imatrix.
fn block_imatrix(imatrix: Option<&[f32]>, index: usize, size: usize) -> Option<&[f32]> {
    imatrix.map(|w| &w[index * size..][..size])
}

/// `quantize_iq4_nl`: each block of 32 is its own super-block (σ² over the 32 elements).
fn quantize_iq4_nl(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockIq4Nl] = bytemuck::cast_slice_mut(dst);
    for (ib, (xb, block)) in src.chunks_exact(BLOCK).zip(blocks).enumerate() {
        let qw = block_imatrix(imatrix, ib, BLOCK);
        let w = block_weights(xb, qw, sigma2(xb));
        let scale = block_scale(xb, &w);
        block.d = f32_to_f16_bits(scale).to_le_bytes();
        // The indices are recomputed from the unrounded scale; a zero scale maps every element
        // to level 1 (index 8), the level nearest to zero.
        let id = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        pack_block(xb, id, &mut block.qs);
    }
}

/// `quantize_iq4_xs`: per super-block of 256, a scale per block of 32 as in IQ4_NL, then those
/// scales quantized to six bits against the super-scale `d = -max_scale/32`.
fn quantize_iq4_xs(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockIq4Xs] = bytemuck::cast_slice_mut(dst);
    for (ibl, (xbl, block)) in src
        .chunks_exact(BlockIq4Xs::ELEMENTS)
        .zip(blocks)
        .enumerate()
    {
        let qwl = block_imatrix(imatrix, ibl, BlockIq4Xs::ELEMENTS);
        let s2 = sigma2(xbl);
        let mut scales = [0.0f32; BlockIq4Xs::ELEMENTS / BLOCK];
        let mut amax_scale = 0.0f32;
        let mut max_scale = 0.0f32;
        for (ib, (scale, xb)) in scales.iter_mut().zip(xbl.chunks_exact(BLOCK)).enumerate() {
            let w = block_weights(xb, block_imatrix(qwl, ib, BLOCK), s2);
            *scale = block_scale(xb, &w);
            if scale.abs() > amax_scale {
                amax_scale = scale.abs();
                max_scale = *scale;
            }
        }

        // An all-zero super-block gives d = -0.0, stored as 0x8000.
        let d = -max_scale / 32.0;
        block.d = f32_to_f16_bits(d).to_le_bytes();
        // The block multipliers and indices use the unrounded d, not its f16 value.
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut scales_h = 0u16;
        block.scales_l = [0; 4];
        for (ib, (scale, xb)) in scales.iter().zip(xbl.chunks_exact(BLOCK)).enumerate() {
            let l = nearest_int(id * scale).clamp(-XS_SCALE_OFFSET, XS_SCALE_OFFSET - 1);
            let dl = d * l as f32;
            let idl = if dl != 0.0 { 1.0 / dl } else { 0.0 };
            pack_block(xb, idl, &mut block.qs[16 * ib..16 * ib + 16]);
            let code = (l + XS_SCALE_OFFSET) as u8;
            block.scales_l[ib / 2] |= (code & 0xf) << (4 * (ib % 2));
            scales_h |= u16::from(code >> 4) << (2 * ib);
        }
        block.scales_h = scales_h.to_le_bytes();
    }
}

/// Decodes one block of 32: `dl · K[nibble]`, nibbles placed as in IQ4_NL.
fn dequantize_block(dl: f32, qs: &[u8], out: &mut [f32]) {
    let (lo, hi) = out.split_at_mut(BLOCK / 2);
    for ((q, a), b) in qs.iter().zip(lo).zip(hi) {
        *a = dl * f32::from(KVALUES[usize::from(q & 0xf)]);
        *b = dl * f32::from(KVALUES[usize::from(q >> 4)]);
    }
}

fn dequantize_iq4_nl(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq4Nl] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(BLOCK)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        dequantize_block(d, &block.qs, out);
    }
}

fn dequantize_iq4_xs(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq4Xs] = bytemuck::cast_slice(src);
    for (block, out) in blocks
        .iter()
        .zip(dst.chunks_exact_mut(BlockIq4Xs::ELEMENTS))
    {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        let scales_h = u16::from_le_bytes(block.scales_h);
        for (ib, (qs, out)) in block
            .qs
            .chunks_exact(16)
            .zip(out.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let low = (block.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
            let high = ((scales_h >> (2 * ib)) & 3) as u8;
            let code = i32::from(low | (high << 4));
            dequantize_block(d * (code - XS_SCALE_OFFSET) as f32, qs, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Quantizes `x` as one row of `ty` and decodes it again.
    fn round_trip(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>) -> (Vec<u8>, Vec<f32>) {
        let k = crate::kernel(ty).unwrap();
        let mut q = vec![0u8; k.row_bytes(x.len()).unwrap()];
        crate::quantize_rows(ty, x, x.len(), imatrix, &mut q).unwrap();
        let mut y = vec![0.0f32; x.len()];
        crate::dequantize_rows(ty, &q, &mut y).unwrap();
        (q, y)
    }

    #[test]
    fn best_index_picks_nearest_and_ties_go_up() {
        assert_eq!(best_index(-1000.0), 0);
        assert_eq!(best_index(-127.0), 0);
        assert_eq!(best_index(113.0), 15);
        assert_eq!(best_index(1e9), 15);
        assert_eq!(best_index(0.0), 8);
        for (i, &k) in KVALUES.iter().enumerate() {
            assert_eq!(best_index(f32::from(k)), i as u8);
        }
        for (i, pair) in KVALUES.windows(2).enumerate() {
            let (a, b) = (f32::from(pair[0]), f32::from(pair[1]));
            let mid = (a + b) / 2.0;
            assert_eq!(best_index(mid), i as u8 + 1, "tie at {mid}");
            assert_eq!(best_index(mid - 0.01), i as u8);
            assert_eq!(best_index(mid + 0.01), i as u8 + 1);
        }
    }

    #[test]
    fn zero_blocks_have_the_reference_bytes() {
        // §7 fact 5: IQ4_NL d = 0 and qs 0x88; IQ4_XS d = 0x8000 (-0.0), scales_h 0xAAAA,
        // scales_l 0, qs 0x88. An imatrix does not change that.
        let x = [0.0f32; 256];
        let w = [1.0f32; 256];
        for imatrix in [None, Some(&w[..])] {
            let (q, _) = round_trip(GgmlType::IQ4_NL, &x, imatrix);
            for block in q.chunks_exact(18) {
                assert_eq!(block[..2], [0, 0]);
                assert!(block[2..].iter().all(|&b| b == 0x88));
            }
            let (q, _) = round_trip(GgmlType::IQ4_XS, &x, imatrix);
            assert_eq!(q[..2], [0x00, 0x80]);
            assert_eq!(q[2..4], [0xaa, 0xaa]);
            assert_eq!(q[4..8], [0; 4]);
            assert!(q[8..].iter().all(|&b| b == 0x88));
        }
    }

    #[test]
    fn levels_of_the_table_survive_exactly() {
        // A block holding the table itself (twice) is reproduced with scale 1: the initial
        // scale -max/K[0] is already exact and no trial beats a perfect fit.
        let mut x = [0.0f32; 32];
        for (i, v) in x.iter_mut().enumerate() {
            *v = f32::from(KVALUES[i % 16]);
        }
        let (q, y) = round_trip(GgmlType::IQ4_NL, &x, None);
        assert_eq!(u16::from_le_bytes([q[0], q[1]]), f32_to_f16_bits(1.0));
        assert_eq!(q[2], 0x00); // elements 0 and 16 are both K[0]
        assert_eq!(q[17], 0xff);
        assert_eq!(y, x);
    }

    /// Up to how far `y` may be from `x`, given the decoded block scale `dl`: `y` must be the
    /// table level nearest to `x` on the decoded grid, up to the f16 rounding of the scale
    /// (relative 2⁻¹¹, or 2⁻²⁵ absolute for subnormal f16) moving both candidate levels by at
    /// most 127 of those steps each, plus f32 rounding slack.
    fn check_nearest(
        x: f32,
        y: f32,
        dl: f32,
        scale_err: f32,
        slack: f32,
    ) -> Result<(), TestCaseError> {
        let best = KVALUES
            .iter()
            .map(|&k| (x - dl * f32::from(k)).abs())
            .fold(f32::INFINITY, f32::min);
        let tol = 254.0 * scale_err + slack;
        prop_assert!(
            (x - y).abs() <= best + tol,
            "{x} -> {y}, nearest at {best}, dl {dl}"
        );
        Ok(())
    }

    fn interesting_row() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0e3f32..1.0e3, 256),
            Just(vec![0.0; 256]),
            (0usize..256, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
                let mut v = vec![1.0e-3; 256];
                v[i] = big;
                v
            }),
            (
                0usize..256,
                -1.0e4f32..1.0e4,
                prop::collection::vec(-1.0f32..1.0, 256)
            )
                .prop_map(|(i, big, mut v)| {
                    v[i] = big;
                    v
                }),
            prop::collection::vec(-1.0e-38f32..1.0e-38, 256),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 256),
            prop::collection::vec(-1.0e-10f32..1.0e-10, 256),
        ]
    }

    fn amax(x: &[f32]) -> f32 {
        x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
    }

    proptest! {
        #[test]
        fn iq4_nl_round_trip_error_is_bounded(
            x in interesting_row(),
            // Importance weights are positive: with weights of zero the search may fit the
            // block to the other elements and leave a zero-weight outlier far off (ggml does the
            // same; the bit-exact tests cover that case), so the error bound would not hold.
            w in prop::option::of(prop::collection::vec(0.01f32..10.0, 256)),
        ) {
            let (q, y) = round_trip(GgmlType::IQ4_NL, &x, w.as_deref());
            for (b, block) in q.chunks_exact(18).enumerate() {
                let d = f16_bits_to_f32(u16::from_le_bytes([block[0], block[1]]));
                let xs = &x[32 * b..][..32];
                let a = amax(xs);
                // With d the level spacing is at most 24·|d| (half of it: 12·|d|), and the
                // scale keeps the largest element on the -127 end, so elements beyond +113·|d|
                // lose at most 14·|d| ≈ 0.11·amax.
                let bound = 0.25 * a + 1e-5;
                let scale_err = d.abs() * 2.0f32.powi(-11) + 2.0f32.powi(-25);
                for (&xv, &yv) in xs.iter().zip(&y[32 * b..][..32]) {
                    prop_assert!((xv - yv).abs() <= bound, "{xv} vs {yv}, bound {bound}");
                    check_nearest(xv, yv, d, scale_err, a * 1e-5)?;
                }
            }
        }

        #[test]
        fn iq4_xs_round_trip_error_is_bounded(
            x in interesting_row(),
            // Importance weights are positive: with weights of zero the search may fit the
            // block to the other elements and leave a zero-weight outlier far off (ggml does the
            // same; the bit-exact tests cover that case), so the error bound would not hold.
            w in prop::option::of(prop::collection::vec(0.01f32..10.0, 256)),
        ) {
            let (q, y) = round_trip(GgmlType::IQ4_XS, &x, w.as_deref());
            let d = f16_bits_to_f32(u16::from_le_bytes([q[0], q[1]]));
            let scales_h = u16::from_le_bytes([q[2], q[3]]);
            let a = amax(&x);
            // Block scales lose at most half a step of |d| = max_scale/32 on top of IQ4_NL's
            // error; a block rounded to multiplier 0 decodes to zeros, which only happens when
            // its own amax is below about 2·max_scale ≈ amax/60.
            let bound = 0.25 * a + 1e-5;
            for b in 0..8 {
                let low = (q[4 + b / 2] >> (4 * (b % 2))) & 0xf;
                let high = ((scales_h >> (2 * b)) & 3) as u8;
                let l = i32::from(low | (high << 4)) - 32;
                let dl = d * l as f32;
                let scale_err = (d.abs() * 2.0f32.powi(-11) + 2.0f32.powi(-25)) * l.abs() as f32;
                for i in 32 * b..32 * b + 32 {
                    prop_assert!((x[i] - y[i]).abs() <= bound, "{} vs {}, bound {bound}", x[i], y[i]);
                    check_nearest(x[i], y[i], dl, scale_err, a * 1e-5)?;
                }
            }
        }

        #[test]
        fn extreme_values_do_not_panic(
            x in prop::collection::vec(
                prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(f32::MIN_POSITIVE), Just(1e-45f32), -1e30f32..1e30],
                256,
            ),
        ) {
            round_trip(GgmlType::IQ4_NL, &x, None);
            round_trip(GgmlType::IQ4_XS, &x, None);
            round_trip(GgmlType::IQ4_XS, &x, Some(&[1e30; 256]));
        }
    }
}
