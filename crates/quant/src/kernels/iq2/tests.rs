//! Checks of the tables against the documented ggml values, and round-trip properties.

use kiln_types::GgmlType;
use proptest::prelude::*;

use super::grids::{KGRID_1BIT_2048, KGRID_2BIT_1024, KGRID_2BIT_256, KGRID_2BIT_512};
use super::lattice::{Grid, Lookup, IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, KSIGNS_IQ2XS};
use crate::kernels::kernel;

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

fn le_u64(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The digests of iq-types.md §7 (little-endian serialization of each table).
#[test]
fn tables_match_ggml() {
    let cases: [(&str, Vec<u8>, &str); 10] = [
        (
            "kgrid_2bit_256",
            le_u16(&KGRID_2BIT_256),
            "915952ebc4af8ddba8113583ca1316fc818843f7b825bbf1a25ae1c39bf0e16d",
        ),
        (
            "kgrid_2bit_512",
            le_u16(&KGRID_2BIT_512),
            "f66435966ca8d64e9e4a6e3c91e64afcf9015e700ec85962f527283ebae207b9",
        ),
        (
            "kgrid_2bit_1024",
            le_u16(&KGRID_2BIT_1024),
            "e6e75e121b65e8afa5c1f92b71463cfbe217b83893f438acde22fd5db06a43f7",
        ),
        (
            "kgrid_1bit_2048",
            le_u16(&KGRID_1BIT_2048),
            "e9ffebfc997ad6023063a667c0bf4eedd8ebf7f56b3da399cbc7d1b1f7ea52c6",
        ),
        (
            "iq2xxs_grid",
            le_u64(&IQ2XXS_GRID),
            "05826b5d3e472a3a78f196be62ac78acf81df0f909626e12ab9fa2a5d490dd54",
        ),
        (
            "iq2xs_grid",
            le_u64(&IQ2XS_GRID),
            "06e47aaca60b4dc1d9b5a3f34540437058a6b142b4d7a59d5ded769b4d1bf1de",
        ),
        (
            "iq2s_grid",
            le_u64(&IQ2S_GRID),
            "e1aa1473412b0552c2174c30ef22ab4073f6a181b85a17056e8249bd2932fd88",
        ),
        (
            "iq1s_grid",
            le_u64(&IQ1S_GRID),
            "07540ffc1aeaf6ad4d97e96b0fcc765aae39671d4ae4a27bbd0e796fde167c6a",
        ),
        (
            "ksigns_iq2xs",
            KSIGNS_IQ2XS.to_vec(),
            "a76742a603f8beca5212ecce0f1f02f11a4887fd2f7c8b15aca0ea3eb3380c31",
        ),
        (
            "kmask_iq2xs",
            (0..8).map(|j| 1u8 << j).collect(),
            "5ac9831b2e30eb285ef34f8501620f878432d5c04331ad1ae47f977a83ba41a5",
        ),
    ];
    for (name, bytes, digest) in cases {
        assert_eq!(sha256_hex(&bytes), digest, "{name}");
    }
}

/// The reachable-only neighbour buffers of iq-types.md §1.6: digest, number of off-grid keys and
/// total list length.
#[test]
fn neighbour_lists_match_ggml() {
    let cases = [
        (
            Grid::Iq2Xxs,
            6305,
            113_157,
            "74a188b8f41773b0784ff32a84f307208cd824008a13bf0e93868ac1bf50b1d2",
        ),
        (
            Grid::Iq2Xs,
            6049,
            181_721,
            "ad5729a5fd181723acdcdd00c6bd368a3448b9d30fc8780eb43c125d5bb55679",
        ),
        (
            Grid::Iq2S,
            5537,
            44_716,
            "61aecb7dfb3f7529183c6a3d1ce6c1d51012d91bf18f24fe829ebf548fb56a20",
        ),
        (
            Grid::Iq1,
            4513,
            327_721,
            "51b9520579f6ff55c7501a989181a30679c304c8c7fe8da9daf23460089affe7",
        ),
    ];
    for (grid, keys, total, digest) in cases {
        let records = grid.lattice().neighbour_records();
        assert_eq!(records.len(), keys + total, "{grid:?}");
        assert_eq!(sha256_hex(&le_u16(records)), digest, "{grid:?}");
    }
    // The worked example: key 1 of IQ2_XXS has nine points at d² = 4, then those at d² = 8.
    let Lookup::Neighbours(list) = Grid::Iq2Xxs.lattice().lookup(1) else {
        panic!("key 1 is off the grid");
    };
    assert_eq!(list.len(), 34);
    assert_eq!(&list[..12], &[0, 1, 2, 5, 11, 21, 32, 72, 132, 6, 12, 13]);
    for (i, &g) in KGRID_1BIT_2048.iter().enumerate() {
        assert_eq!(Grid::Iq1.lattice().lookup(g), Lookup::OnGrid(i as u16));
    }
}

#[test]
fn block_layouts_match_the_type_table() {
    crate::blocks::assert_matches_type_table::<super::iq2_xxs::BlockIq2Xxs>();
    crate::blocks::assert_matches_type_table::<super::iq2_xs::BlockIq2Xs>();
    crate::blocks::assert_matches_type_table::<super::iq2_xs::BlockIq2S>();
    crate::blocks::assert_matches_type_table::<super::iq1::BlockIq1S>();
    crate::blocks::assert_matches_type_table::<super::iq1::BlockIq1M>();
}

/// Row 97 of tiny-llama's `blk.1.attn_output.weight` with its importance weights, and the bytes
/// llama-quantize wrote for it as IQ2_XXS (`testdata/iq2_xxs_u8_wrap.bin`: 256 f32 values, 256
/// f32 weights, 66 bytes). In one of its groups the parity-flipped value is below −max/8, so
/// `make_qp_quants` stores a wrapped `u8` level; without the wrap the output differs.
#[test]
fn iq2_xxs_keeps_the_make_qp_quants_wrap() {
    let data = include_bytes!("testdata/iq2_xxs_u8_wrap.bin");
    let floats: Vec<f32> = data[..2048]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let (x, weights) = floats.split_at(256);
    let mut q = [0u8; 66];
    super::iq2_xxs::quantize(x, &mut q, Some(weights));
    assert_eq!(&q[..], &data[2048..]);
}

const TYPES: [GgmlType; 5] = [
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
];

fn round_trip(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>) -> Vec<f32> {
    let k = kernel(ty).expect("kernel");
    let mut q = vec![0u8; k.row_bytes(x.len()).expect("row")];
    (k.quantize_row)(x, &mut q, imatrix);
    let mut y = vec![0.0f32; x.len()];
    (k.dequantize)(&q, &mut y);
    y
}

#[test]
fn zero_rows_are_zero_bytes() {
    for ty in TYPES {
        let k = kernel(ty).expect("kernel");
        let x = [0.0f32; 512];
        let mut q = vec![0xffu8; k.row_bytes(512).expect("row")];
        (k.quantize_row)(&x, &mut q, Some(&[1.0; 512]));
        assert!(q.iter().all(|&b| b == 0), "{ty}");
        assert!(
            round_trip(ty, &x, Some(&[1.0; 512]))
                .iter()
                .all(|&v| v == 0.0),
            "{ty}"
        );
    }
}

/// Decodes one super-block's f16 scale as the dequantizers see it.
fn stored_scale(ty: GgmlType, q: &[u8]) -> f32 {
    let bits = if ty == GgmlType::IQ1_M {
        let sc = |t: usize| u16::from_le_bytes([q[48 + 2 * t], q[49 + 2 * t]]);
        (sc(0) >> 12) | ((sc(1) >> 8) & 0x00f0) | ((sc(2) >> 4) & 0x0f00) | (sc(3) & 0xf000)
    } else {
        u16::from_le_bytes([q[0], q[1]])
    };
    crate::scalar::f16_bits_to_f32(bits)
}

/// A zero sub-block inside a non-zero super-block keeps grid point 0, no signs and scale code 0,
/// so it decodes to `d` (IQ2) or `d·(−1 + 0.125)` (IQ1), not to zero (iq-types.md §6.7).
#[test]
fn zero_sub_blocks_decode_to_the_grid_origin() {
    let mut x: Vec<f32> = (0..256)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 10.0)
        .collect();
    x[..32].fill(0.0);
    let weights = vec![1.0f32; 256];
    for ty in TYPES {
        let k = kernel(ty).expect("kernel");
        let mut q = vec![0u8; k.type_size()];
        (k.quantize_row)(&x, &mut q, Some(&weights));
        let mut y = vec![0.0f32; 256];
        (k.dequantize)(&q, &mut y);
        let d = stored_scale(ty, &q);
        assert!(d > 0.0, "{ty}");
        let expected = match ty {
            GgmlType::IQ1_S | GgmlType::IQ1_M => d * -0.875,
            _ => d,
        };
        assert!(
            y[..16].iter().all(|&v| v == expected),
            "{ty}: {:?} vs {expected}",
            &y[..16]
        );
    }
}

/// One 256-value super-block of test data.
fn super_block() -> impl Strategy<Value = Vec<f32>> {
    let uniform = prop::collection::vec(-1.0e3f32..1.0e3, 256);
    prop_oneof![
        uniform.clone(),
        // Bell-shaped: a sum of three uniforms.
        prop::collection::vec((-1.0f32..1.0, -1.0f32..1.0, -1.0f32..1.0), 256)
            .prop_map(|v| v.into_iter().map(|(a, b, c)| (a + b + c) * 10.0).collect()),
        // A zero 32-value sub-block among ordinary values.
        (uniform, 0usize..8).prop_map(|(mut v, ib)| {
            v[32 * ib..32 * ib + 32].fill(0.0);
            v
        }),
        Just(vec![0.0; 256]),
        prop::collection::vec(-1.0e-6f32..1.0e-6, 256),
        prop::collection::vec(-1.0e-38f32..1.0e-38, 256),
    ]
}

/// Rows of two super-blocks with random positive importance weights.
fn row_and_weights() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (
        (super_block(), super_block()).prop_map(|(mut a, b)| {
            a.extend(b);
            a
        }),
        prop::collection::vec(0.25f32..4.0, 512),
    )
}

/// The relative L2 error allowed per super-block, `‖y − x‖ ≤ ρ·‖x‖ + slack`: the worst case seen
/// over many thousand random rows with a margin, ordered by bits per weight (IQ2_S 2.56, IQ2_XS
/// 2.31, IQ2_XXS 2.06, IQ1_M 1.75, IQ1_S 1.56), and the largest multiple of the stored f16 scale
/// `d` a value can decode to (IQ2: 15.5·0.25·43; IQ1: 15·1.125).
fn bound(ty: GgmlType) -> (f32, f32) {
    match ty {
        GgmlType::IQ2_S => (0.45, 166.7),
        GgmlType::IQ2_XS => (0.5, 166.7),
        GgmlType::IQ2_XXS => (0.55, 166.7),
        GgmlType::IQ1_M => (0.75, 16.9),
        _ => (0.8, 16.9),
    }
}

fn norm(v: impl Iterator<Item = f32>) -> f32 {
    v.map(|e| e * e).sum::<f32>().sqrt()
}

proptest! {
    /// Round trip within the type's bound. The slack covers the f16 scale: below 2⁻¹⁴ it is
    /// stored with an absolute error up to 2⁻²⁵, which each of the 256 values can see multiplied
    /// by up to `m` (so `16·m·2⁻²⁴` in L2, with a factor 2 to spare).
    #[test]
    fn round_trip_error_is_bounded((x, w) in row_and_weights()) {
        for ty in TYPES {
            let imatrices: &[Option<&[f32]>] = match ty {
                GgmlType::IQ2_S | GgmlType::IQ1_M => &[Some(&w), None],
                _ => &[Some(&w)],
            };
            for &imatrix in imatrices {
                let y = round_trip(ty, &x, imatrix);
                let (rho, m) = bound(ty);
                for (xb, yb) in x.chunks_exact(256).zip(y.chunks_exact(256)) {
                    let err = norm(xb.iter().zip(yb).map(|(a, b)| a - b));
                    let limit = rho * norm(xb.iter().copied()) + 16.0 * m * 2.0f32.powi(-24);
                    prop_assert!(err <= limit, "{ty} (imatrix {}): error {err} > {limit}", imatrix.is_some());
                    if xb.iter().all(|&v| v == 0.0) {
                        prop_assert!(yb.iter().all(|&v| v == 0.0), "{ty}: zero block");
                    }
                }
            }
        }
    }

    /// A huge outlier among small values, all of equal importance, is kept within 15% (IQ1_S's
    /// fudge factor alone scales it by up to 1.125), and nothing decodes to more than 1.5 times it. (Unequal importance may legitimately trade the outlier
    /// for its neighbours: no level decodes to zero, so the small values of its sub-block pull
    /// the least-squares scale down in proportion to their weight.)
    #[test]
    fn huge_outlier_is_kept(
        small in prop::collection::vec(-1.0e-3f32..1.0e-3, 256),
        at in 0usize..256,
        big in prop_oneof![1.0e2f32..1.0e4, -1.0e4f32..-1.0e2],
    ) {
        let mut x = small;
        x[at] = big;
        for ty in TYPES {
            let y = round_trip(ty, &x, Some(&[1.0; 256]));
            prop_assert!((y[at] - big).abs() <= 0.15 * big.abs(), "{ty}: {} for {big}", y[at]);
            prop_assert!(y.iter().all(|v| v.abs() <= 1.5 * big.abs()), "{ty}: blow-up");
        }
    }
}
