//! Tables against ggml's checksums, known blocks, and round-trip error bounds.

use bytemuck::Zeroable;
use kiln_types::GgmlType;
use proptest::prelude::*;

use super::grid::{Grid, IQ3S_GRID, IQ3XXS_GRID, KGRID_256, KGRID_512, KSIGNS};
use super::s::BlockIq3S;
use super::xxs::BlockIq3Xxs;
use crate::{dequantize_rows, quantize_rows};

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn le_u16(values: &[u16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The constant tables, hashed as little-endian binary (`iq-types.md` §7).
#[test]
fn tables_match_ggml() {
    assert_eq!(
        sha256_hex(&le_u16(&KGRID_256)),
        "c9678803c61b2210fbd8cbbb3f965a835409cd7d88a04d086d236261bd221d11"
    );
    assert_eq!(
        sha256_hex(&le_u16(&KGRID_512)),
        "353274c58dd7d8dc5ee960dc8fc54ff9164eaf2b49206b841cd49415cf393f81"
    );
    // A point's bytes in element order are the little-endian encoding of ggml's u32 entry.
    assert_eq!(
        sha256_hex(IQ3XXS_GRID.as_flattened()),
        "46e35f5a997efdee6c99ce57854c8a0d4f0ff8ca57e5e8a60c0793ea580acf5d"
    );
    assert_eq!(
        sha256_hex(IQ3S_GRID.as_flattened()),
        "bd1af4945a1717c65610b0284e4628b9a1ba3b306fae3a06f6e5f597356e349f"
    );
    assert_eq!(
        sha256_hex(&KSIGNS),
        "a76742a603f8beca5212ecce0f1f02f11a4887fd2f7c8b15aca0ea3eb3380c31"
    );
    // Spot values from ggml-common.h.
    assert_eq!(u32::from_le_bytes(IQ3XXS_GRID[0]), 0x0404_0404);
    assert_eq!(u32::from_le_bytes(IQ3XXS_GRID[255]), 0x3e34_1c04);
    assert_eq!(u32::from_le_bytes(IQ3S_GRID[0]), 0x0101_0101);
    assert_eq!(u32::from_le_bytes(IQ3S_GRID[511]), 0x0f0f_0101);
    assert_eq!(KSIGNS[1], 0x81);
    assert_eq!(KSIGNS[3], 0x03);
    // The quantizers rely on the all-zero levels being point 0.
    assert_eq!((KGRID_256[0], KGRID_512[0]), (0, 0));
}

/// The neighbour buffers and key maps, in ggml's exact layout (`iq-types.md` §1.6).
#[test]
fn neighbour_maps_match_ggml() {
    let cases = [
        (
            Grid::xxs(),
            22825,
            "4b54395c1c3e9766e6cbb7f2f84a3ebb43d9ca391bd344e517577c3c3c3fa01a",
            "2384bfe6ea71e4257727bfd5ec66d358995a2f0600bd8b6ef16a83559390e751",
            (2, 36),
        ),
        (
            Grid::s(),
            28317,
            "662208b0d2ce2fa3346c5fb672db4be13bc06f87c78775acfc435550935b5d89",
            "53eb24b689961eea61a0a46257a182ac58fe414a9d52163e67ee4a9fc5322659",
            (3, 38),
        ),
    ];
    for (grid, len, buffer_sha, map_sha, (min, max)) in cases {
        let (buffer, map) = grid.ggml_layout();
        assert_eq!(buffer.len(), len);
        assert_eq!(sha256_hex(&le_u16(buffer)), buffer_sha);
        let map_bytes: Vec<u8> = map.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(sha256_hex(&map_bytes), map_sha);
        let lengths: Vec<u16> = map
            .iter()
            .filter(|&&m| m < 0)
            .map(|&m| buffer[(-m - 1) as usize])
            .collect();
        assert_eq!(lengths.iter().min(), Some(&min));
        assert_eq!(lengths.iter().max(), Some(&max));
    }
}

fn round_trip(ty: GgmlType, x: &[f32], qw: Option<&[f32]>) -> (Vec<u8>, Vec<f32>) {
    let k = crate::kernel(ty).expect("kernel");
    let mut q = vec![0u8; k.row_bytes(x.len()).expect("row")];
    quantize_rows(ty, x, x.len(), qw, &mut q).expect("quantize");
    let mut y = vec![0.0f32; x.len()];
    dequantize_rows(ty, &q, &mut y).expect("dequantize");
    (q, y)
}

#[test]
fn all_zero_blocks_encode_to_zero_bytes() {
    for ty in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
        let x = [0.0f32; 512];
        let (q, y) = round_trip(ty, &x, None);
        assert!(q.iter().all(|&b| b == 0), "{ty}");
        assert!(y.iter().all(|&v| v == 0.0), "{ty}");
    }
}

/// Hand-built blocks decode as `dequantize_row_iq3_xxs` / `dequantize_row_iq3_s` do.
#[test]
fn known_blocks_decode() {
    let mut xxs = BlockIq3Xxs::zeroed();
    xxs.d = 0x3c00u16.to_le_bytes(); // 1.0
    xxs.grid[0] = 255; // [4, 28, 52, 62]
                       // Sign field 1 implies sign bit 7 as well (odd count); scale 3 gives db = (1·3.5)·0.5.
    xxs.signs_scale[0] = (1u32 | 3 << 28).to_le_bytes();
    let mut y = [0.0f32; 256];
    super::xxs::dequantize(bytemuck::bytes_of(&xxs), &mut y);
    assert_eq!(y[..8], [-7.0, 49.0, 91.0, 108.5, 7.0, 7.0, 7.0, -7.0]);
    // Empty sub-blocks decode to d·0.5·0.5·4 = d, not zero.
    assert!(y[32..].iter().all(|&v| v == 1.0));

    let mut s = BlockIq3S::zeroed();
    s.d = 0x3c00u16.to_le_bytes();
    s.scales[0] = 0x21; // sub-block 0: 1 + 2·1 = 3; sub-block 1: 1 + 2·2 = 5
    s.qs[0] = 255;
    s.qh[0] = 1; // index 511 = [1, 1, 15, 15]
    s.signs[0] = 0b10;
    s.signs[4] = 0x10; // sub-block 1, element 4
    let mut y = [0.0f32; 256];
    super::s::dequantize(bytemuck::bytes_of(&s), &mut y);
    assert_eq!(y[..8], [3.0, -3.0, 45.0, 45.0, 3.0, 3.0, 3.0, 3.0]);
    assert_eq!(y[32..40], [5.0, 5.0, 5.0, 5.0, -5.0, 5.0, 5.0, 5.0]);
    assert!(y[64..].iter().all(|&v| v == 1.0));
}

/// ggml's IQ3_S cursor quirk: after an exactly-zero sub-block, later index and sign bytes land
/// one slot early, while the high index bits stay where the sub-block is.
#[test]
fn iq3_s_zero_sub_block_shifts_later_bytes() {
    let mut x: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
        .collect();
    let (reference, _) = round_trip(GgmlType::IQ3_S, &x, None);
    x[..32].fill(0.0);
    let (shifted, _) = round_trip(GgmlType::IQ3_S, &x, None);
    let a: &BlockIq3S = bytemuck::from_bytes(&reference);
    let b: &BlockIq3S = bytemuck::from_bytes(&shifted);
    // Sub-blocks 1..8 are quantized identically (σ² differs, but without an imatrix it is
    // unused), so their bytes move one slot down and the last slot stays empty.
    assert_eq!(b.qs[..56], a.qs[8..]);
    assert_eq!(b.qs[56..], [0; 8]);
    assert_eq!(b.signs[..28], a.signs[4..]);
    assert_eq!(b.signs[28..], [0; 4]);
    assert_eq!(b.qh[0], 0);
    assert_eq!(b.qh[1..], a.qh[1..]);
    assert_eq!(b.scales[0] & 15, 0);
}

/// Values whose `x²` overflows make ggml's arithmetic non-finite; the kernels must still
/// return without panicking.
#[test]
fn extreme_values_do_not_panic() {
    for ty in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
        for big in [1.0e20f32, 3.0e38, f32::MAX] {
            let x: Vec<f32> = (0..256)
                .map(|i| {
                    if i % 3 == 0 {
                        -big
                    } else {
                        big / (i + 1) as f32
                    }
                })
                .collect();
            let qw = vec![1.0f32; 256];
            round_trip(ty, &x, None);
            round_trip(ty, &x, Some(&qw));
        }
        let x = [f32::MIN_POSITIVE / 4.0; 256];
        let (_, y) = round_trip(ty, &x, None);
        assert!(y.iter().all(|&v| v == 0.0), "{ty}");
    }
}

/// Random rows of two super-blocks, with the cases the kernels special-case.
fn rows() -> impl Strategy<Value = Vec<f32>> {
    let magnitude = prop_oneof![Just(1.0f32), Just(1.0e3), Just(1.0e-3), Just(1.0e-6)];
    prop_oneof![
        (prop::collection::vec(-1.0f32..1.0, 512), magnitude.clone())
            .prop_map(|(v, m)| v.into_iter().map(|x| x * m).collect()),
        // Heavier tails, closer to real weights.
        (prop::collection::vec(-1.0f32..1.0, 512), magnitude)
            .prop_map(|(v, m)| v.into_iter().map(|x| x * x * x * m).collect()),
        Just(vec![0.0; 512]),
        (0usize..512, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
            let mut v = vec![1.0e-3; 512];
            v[i] = big;
            v
        }),
        // Zero 32-value sub-blocks inside non-zero super-blocks.
        (prop::collection::vec(-1.0f32..1.0, 512), 0usize..16).prop_map(|(mut v, z)| {
            v[32 * z..32 * z + 32].fill(0.0);
            v
        }),
        prop::collection::vec(-1.0e-38f32..1.0e-38, 512),
        prop::collection::vec(-1.0e-6f32..1.0e-6, 512),
    ]
}

fn importance() -> impl Strategy<Value = Option<Vec<f32>>> {
    prop::option::of(prop::collection::vec(1.0e-3f32..1.0e3, 512))
}

/// Bound on the RMS round-trip error of a super-block with largest magnitude `amax`.
///
/// 8 levels per sub-block give a step of about `2·amax/15`, but only 256 (IQ3_XXS) or 512
/// (IQ3_S) of the 4096 level combinations exist, sub-block scales are 4-bit multiples of the
/// super-scale, and IQ3_XXS stores only 7 of 8 signs (one value per 8 may keep a wrong sign when
/// the count of negatives is odd). Measured worst cases over random rows are about 0.13·amax
/// (IQ3_XXS without an imatrix), 0.19·amax (IQ3_XXS with random weights) and 0.11·amax (IQ3_S).
/// The absolute term covers the f16 super-scale: its subnormal step is 2⁻²⁴ and values decode to
/// at most ~480 times it, so tiny blocks lose all precision (they may decode to zero).
fn rms_bound(ty: GgmlType, amax: f32) -> f32 {
    let relative = if ty == GgmlType::IQ3_XXS { 0.3 } else { 0.2 };
    relative * amax + 512.0 * f32::powi(2.0, -24)
}

fn check_round_trip(ty: GgmlType, x: &[f32], qw: Option<&[f32]>) -> Result<(), TestCaseError> {
    let (q, y) = round_trip(ty, x, qw);
    let block_bytes = q.len() / (x.len() / 256);
    for (b, (xs, ys)) in x.chunks_exact(256).zip(y.chunks_exact(256)).enumerate() {
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            prop_assert!(ys.iter().all(|&v| v == 0.0));
            continue;
        }
        let mut skip = 0;
        if ty == GgmlType::IQ3_S {
            // After an exactly-zero sub-block ggml's IQ3_S stores later sub-blocks in the wrong
            // slots (see `iq3_s_zero_sub_block_shifts_later_bytes`), so only the sub-blocks
            // before the first zero one round-trip.
            if let Some(z) = xs
                .chunks_exact(32)
                .position(|s| s.iter().all(|&v| v == 0.0))
            {
                skip = 256 - 32 * z;
            }
        }
        let n = 256 - skip;
        let se: f64 = xs[..n]
            .iter()
            .zip(&ys[..n])
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        let rms = (se / n.max(1) as f64).sqrt() as f32;
        prop_assert!(
            rms <= rms_bound(ty, amax),
            "{ty} block {b}: rms {rms}, amax {amax}"
        );
        if ty == GgmlType::IQ3_XXS {
            // The stored signs always have even parity per group of 8.
            let block: &BlockIq3Xxs = bytemuck::from_bytes(&q[b * block_bytes..][..block_bytes]);
            if u16::from_le_bytes(block.d) != 0 {
                for g in ys.chunks_exact(8) {
                    prop_assert_eq!(g.iter().filter(|v| v.is_sign_negative()).count() % 2, 0);
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #[test]
    fn iq3_xxs_round_trip_error_is_bounded(x in rows(), qw in importance()) {
        check_round_trip(GgmlType::IQ3_XXS, &x, qw.as_deref())?;
    }

    #[test]
    fn iq3_s_round_trip_error_is_bounded(x in rows(), qw in importance()) {
        check_round_trip(GgmlType::IQ3_S, &x, qw.as_deref())?;
    }

    /// Super-blocks are independent: a row quantizes like its super-blocks quantized one by one.
    #[test]
    fn super_blocks_are_independent(x in rows(), w in prop::collection::vec(1.0e-3f32..1.0e3, 256)) {
        let qw: Vec<f32> = w.iter().chain(&w).copied().collect();
        for ty in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
            for weights in [None, Some(&qw[..])] {
                let (whole, _) = round_trip(ty, &x, weights);
                let (first, _) = round_trip(ty, &x[..256], weights.map(|w| &w[..256]));
                let (second, _) = round_trip(ty, &x[256..], weights.map(|w| &w[256..]));
                prop_assert_eq!(&whole[..first.len()], &first[..]);
                prop_assert_eq!(&whole[first.len()..], &second[..]);
            }
        }
    }
}

#[test]
fn block_sizes_match_the_type_table() {
    crate::blocks::assert_matches_type_table::<BlockIq3Xxs>();
    crate::blocks::assert_matches_type_table::<BlockIq3S>();
}
