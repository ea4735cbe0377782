//! The two IQ3 grids and the one-time neighbour maps built from them (`iq3xs_init_impl`).
//!
//! A grid point is four levels `0..=7`, packed 3 bits per coordinate into a 12-bit key; the
//! quantizer's model value for level `l` is `2l + 1`. IQ3_XXS uses 256 of the 4096 possible
//! points, IQ3_S 512. For every key that is not a grid point, ggml precomputes the list of grid
//! points nearest to it (the `nwant` closest distinct distances), which the quantizer searches
//! when its rounded levels fall off the grid.

use std::sync::OnceLock;

/// Levels per coordinate.
pub(super) const LEVELS: usize = 8;
/// Keys: 4 coordinates × 3 bits.
const KEYS: usize = 1 << 12;

/// The 256 points of IQ3_XXS as 12-bit keys, ascending (`kgrid_256` in `iq3xs_init_impl`).
#[rustfmt::skip]
pub(super) const KGRID_256: [u16; 256] = [
    0, 2, 4, 9, 11, 15, 16, 18, 25, 34, 59, 61, 65, 67, 72, 74,
    81, 85, 88, 90, 97, 108, 120, 128, 130, 132, 137, 144, 146, 153, 155, 159,
    169, 175, 189, 193, 199, 200, 202, 213, 248, 267, 287, 292, 303, 315, 317, 321,
    327, 346, 362, 413, 436, 456, 460, 462, 483, 497, 513, 515, 520, 522, 529, 531,
    536, 538, 540, 551, 552, 576, 578, 585, 592, 594, 641, 643, 648, 650, 657, 664,
    698, 704, 706, 720, 729, 742, 758, 769, 773, 808, 848, 852, 870, 889, 901, 978,
    992, 1024, 1026, 1033, 1035, 1040, 1042, 1046, 1049, 1058, 1089, 1091, 1093, 1096, 1098, 1105,
    1112, 1139, 1143, 1144, 1152, 1154, 1161, 1167, 1168, 1170, 1183, 1184, 1197, 1217, 1224, 1228,
    1272, 1276, 1309, 1323, 1347, 1367, 1377, 1404, 1473, 1475, 1486, 1509, 1537, 1544, 1546, 1553,
    1555, 1576, 1589, 1594, 1600, 1602, 1616, 1625, 1636, 1638, 1665, 1667, 1672, 1685, 1706, 1722,
    1737, 1755, 1816, 1831, 1850, 1856, 1862, 1874, 1901, 1932, 1950, 1971, 2011, 2032, 2052, 2063,
    2077, 2079, 2091, 2095, 2172, 2192, 2207, 2208, 2224, 2230, 2247, 2277, 2308, 2345, 2356, 2389,
    2403, 2424, 2501, 2504, 2506, 2520, 2570, 2593, 2616, 2624, 2630, 2646, 2669, 2700, 2714, 2746,
    2754, 2795, 2824, 2835, 2839, 2874, 2882, 2905, 2984, 3028, 3042, 3092, 3108, 3110, 3124, 3153,
    3185, 3215, 3252, 3288, 3294, 3364, 3397, 3434, 3483, 3523, 3537, 3587, 3589, 3591, 3592, 3610,
    3626, 3670, 3680, 3722, 3749, 3754, 3776, 3789, 3803, 3824, 3857, 3873, 3904, 3906, 3924, 3992,
];
/// The 512 points of IQ3_S as 12-bit keys, ascending (`kgrid_512` in `iq3xs_init_impl`).
#[rustfmt::skip]
pub(super) const KGRID_512: [u16; 512] = [
    0, 1, 2, 5, 7, 8, 9, 10, 12, 14, 16, 17, 21, 27, 32, 34,
    37, 39, 41, 43, 48, 50, 57, 60, 63, 64, 65, 66, 68, 72, 73, 77,
    80, 83, 87, 89, 93, 100, 113, 117, 122, 128, 129, 133, 135, 136, 139, 142,
    145, 149, 152, 156, 162, 165, 167, 169, 171, 184, 187, 195, 201, 205, 208, 210,
    217, 219, 222, 228, 232, 234, 247, 249, 253, 256, 267, 271, 273, 276, 282, 288,
    291, 297, 312, 322, 324, 336, 338, 342, 347, 353, 357, 359, 374, 379, 390, 393,
    395, 409, 426, 441, 448, 450, 452, 464, 466, 470, 475, 488, 492, 512, 513, 514,
    516, 520, 521, 523, 525, 527, 528, 530, 537, 540, 542, 556, 558, 561, 570, 576,
    577, 579, 582, 584, 588, 593, 600, 603, 609, 616, 618, 632, 638, 640, 650, 653,
    655, 656, 660, 666, 672, 675, 685, 688, 698, 705, 708, 711, 712, 715, 721, 727,
    728, 732, 737, 754, 760, 771, 773, 778, 780, 793, 795, 802, 806, 808, 812, 833,
    840, 843, 849, 856, 858, 873, 912, 916, 919, 932, 934, 961, 963, 968, 970, 977,
    989, 993, 1010, 1016, 1024, 1025, 1027, 1029, 1031, 1032, 1034, 1036, 1038, 1041, 1043, 1047,
    1048, 1050, 1057, 1059, 1061, 1064, 1066, 1079, 1080, 1083, 1085, 1088, 1090, 1096, 1099, 1103,
    1106, 1109, 1113, 1116, 1122, 1129, 1153, 1156, 1159, 1169, 1171, 1176, 1183, 1185, 1195, 1199,
    1209, 1212, 1216, 1218, 1221, 1225, 1234, 1236, 1241, 1243, 1250, 1256, 1270, 1281, 1287, 1296,
    1299, 1306, 1309, 1313, 1338, 1341, 1348, 1353, 1362, 1375, 1376, 1387, 1400, 1408, 1410, 1415,
    1425, 1453, 1457, 1477, 1481, 1494, 1496, 1507, 1512, 1538, 1545, 1547, 1549, 1551, 1554, 1561,
    1563, 1565, 1570, 1572, 1575, 1577, 1587, 1593, 1601, 1603, 1605, 1612, 1617, 1619, 1632, 1648,
    1658, 1662, 1664, 1674, 1680, 1690, 1692, 1704, 1729, 1736, 1740, 1745, 1747, 1751, 1752, 1761,
    1763, 1767, 1773, 1787, 1795, 1801, 1806, 1810, 1817, 1834, 1840, 1844, 1857, 1864, 1866, 1877,
    1882, 1892, 1902, 1915, 1934, 1953, 1985, 1987, 2000, 2002, 2013, 2048, 2052, 2058, 2064, 2068,
    2071, 2074, 2081, 2088, 2104, 2114, 2119, 2121, 2123, 2130, 2136, 2141, 2147, 2153, 2157, 2177,
    2179, 2184, 2189, 2193, 2203, 2208, 2223, 2226, 2232, 2244, 2249, 2251, 2256, 2258, 2265, 2269,
    2304, 2306, 2324, 2335, 2336, 2361, 2373, 2375, 2385, 2418, 2443, 2460, 2480, 2504, 2509, 2520,
    2531, 2537, 2562, 2568, 2572, 2578, 2592, 2596, 2599, 2602, 2614, 2620, 2625, 2627, 2629, 2634,
    2641, 2650, 2682, 2688, 2697, 2707, 2712, 2718, 2731, 2754, 2759, 2760, 2775, 2788, 2793, 2805,
    2811, 2817, 2820, 2832, 2842, 2854, 2890, 2902, 2921, 2923, 2978, 3010, 3012, 3026, 3081, 3083,
    3085, 3097, 3099, 3120, 3136, 3152, 3159, 3188, 3210, 3228, 3234, 3245, 3250, 3256, 3264, 3276,
    3281, 3296, 3349, 3363, 3378, 3392, 3395, 3420, 3440, 3461, 3488, 3529, 3531, 3584, 3588, 3591,
    3600, 3602, 3614, 3616, 3628, 3634, 3650, 3657, 3668, 3683, 3685, 3713, 3716, 3720, 3726, 3729,
    3736, 3753, 3778, 3802, 3805, 3819, 3841, 3845, 3851, 3856, 3880, 3922, 3938, 3970, 3993, 4032,
];

/// Decoded magnitude of each level in `iq3xxs_grid`: `8l + 4`, except that the top level is 62
/// rather than 60. The quantizer still fits against `2l + 1`; ggml's fudge factor on the stored
/// scale partly makes up for the difference, so it must not be "fixed".
const XXS_LEVEL_BYTES: [u8; LEVELS] = [4, 12, 20, 28, 36, 44, 52, 62];
/// Decoded magnitude of each level in `iq3s_grid`: exactly the model value `2l + 1`.
const S_LEVEL_BYTES: [u8; LEVELS] = [1, 3, 5, 7, 9, 11, 13, 15];

/// Expands packed keys into per-coordinate bytes through a level → byte table.
const fn expand<const N: usize>(keys: &[u16; N], bytes: &[u8; LEVELS]) -> [[u8; 4]; N] {
    let mut out = [[0u8; 4]; N];
    let mut i = 0;
    while i < N {
        let mut j = 0;
        while j < 4 {
            out[i][j] = bytes[((keys[i] >> (3 * j)) & 7) as usize];
            j += 1;
        }
        i += 1;
    }
    out
}

/// `iq3xxs_grid` from ggml-common.h, one `[u8; 4]` (element order) per point.
pub(super) const IQ3XXS_GRID: [[u8; 4]; 256] = expand(&KGRID_256, &XXS_LEVEL_BYTES);
/// `iq3s_grid` from ggml-common.h, one `[u8; 4]` (element order) per point.
pub(super) const IQ3S_GRID: [[u8; 4]; 512] = expand(&KGRID_512, &S_LEVEL_BYTES);

/// `ksigns_iq2xs`: a 7-bit sign field completed with the parity bit that makes the number of
/// negative values in a group of 8 even.
pub(super) const KSIGNS: [u8; 128] = {
    let mut out = [0u8; 128];
    let mut s = 0;
    while s < 128 {
        out[s] = s as u8 | (((s as u32).count_ones() & 1) << 7) as u8;
        s += 1;
    }
    out
};

/// What a 12-bit key is: a grid point, or the start of its neighbour record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// The key is grid point `index`.
    Point(u16),
    /// The key is off the grid; its `[n, idx_1, …, idx_n]` record starts at this offset.
    Near(u32),
}

/// A quantizer grid with its key map and neighbour lists.
#[derive(Debug)]
pub(super) struct Grid {
    /// Model value `2l + 1` of each coordinate of each point (ggml's "position grid").
    points: Vec<[u8; 4]>,
    /// One slot per key.
    slots: Vec<Slot>,
    /// The neighbour records of all off-grid keys, in ascending key order (ggml's buffer layout).
    neighbours: Vec<u16>,
}

/// Where a set of four levels lands.
pub(super) enum Snap<'a> {
    /// On the grid, at this point.
    Point(u16),
    /// Off the grid; these are the candidate points, nearest first.
    Near(&'a [u16]),
}

impl Grid {
    /// The IQ3_XXS grid (256 points, neighbour lists over the 2 nearest distances).
    pub(super) fn xxs() -> &'static Grid {
        static GRID: OnceLock<Grid> = OnceLock::new();
        GRID.get_or_init(|| Grid::build(&KGRID_256, 2))
    }

    /// The IQ3_S grid (512 points, neighbour lists over the 3 nearest distances).
    pub(super) fn s() -> &'static Grid {
        static GRID: OnceLock<Grid> = OnceLock::new();
        GRID.get_or_init(|| Grid::build(&KGRID_512, 3))
    }

    /// `iq3xs_init_impl`: for every off-grid key, all grid points whose squared distance is
    /// among the `nwant` smallest distinct distances, ordered by distance and then by index.
    fn build(keys: &[u16], nwant: usize) -> Grid {
        let points: Vec<[u8; 4]> = keys.iter().map(|&k| positions(k)).collect();
        let mut slots = vec![Slot::Near(0); KEYS];
        for (i, &k) in keys.iter().enumerate() {
            slots[usize::from(k)] = Slot::Point(i as u16);
        }
        let mut neighbours = Vec::new();
        let mut by_distance: Vec<(u32, u16)> = Vec::with_capacity(points.len());
        for (key, slot) in slots.iter_mut().enumerate() {
            if matches!(slot, Slot::Point(_)) {
                continue;
            }
            let query = positions(key as u16);
            by_distance.clear();
            by_distance.extend(points.iter().enumerate().map(|(i, p)| {
                let d2 = p
                    .iter()
                    .zip(&query)
                    .map(|(&a, &b)| u32::from(a.abs_diff(b)).pow(2))
                    .sum::<u32>();
                (d2, i as u16)
            }));
            // (distance, index) is a total order, so ggml's unstable qsort gives this order too.
            by_distance.sort_unstable();
            let start = neighbours.len();
            *slot = Slot::Near(start as u32);
            neighbours.push(0);
            let mut current = by_distance[0].0;
            let mut distinct = 1;
            for &(d2, index) in &by_distance {
                if d2 > current {
                    if distinct == nwant {
                        break;
                    }
                    current = d2;
                    distinct += 1;
                }
                neighbours.push(index);
            }
            neighbours[start] = (neighbours.len() - start - 1) as u16;
        }
        Grid {
            points,
            slots,
            neighbours,
        }
    }

    /// The model values `2l + 1` of point `index`.
    pub(super) fn point(&self, index: u16) -> &[u8; 4] {
        &self.points[usize::from(index)]
    }

    /// Looks up four levels (each `0..=7`).
    pub(super) fn snap(&self, levels: [u8; 4]) -> Snap<'_> {
        let key = levels
            .iter()
            .enumerate()
            .fold(0usize, |key, (j, &l)| key | usize::from(l & 7) << (3 * j));
        match self.slots[key] {
            Slot::Point(index) => Snap::Point(index),
            Slot::Near(start) => {
                let start = start as usize;
                let n = usize::from(self.neighbours[start]);
                Snap::Near(&self.neighbours[start + 1..start + 1 + n])
            }
        }
    }

    /// `iq3_find_best_neighbour`: the candidate minimizing `Σ (w·diff)·diff` with
    /// `diff = scale·q − x`; the first strict minimum wins.
    ///
    /// ggml aborts when no distance is below `f32::MAX` (only possible with non-finite
    /// arithmetic); this returns the first candidate instead.
    pub(super) fn best_neighbour(
        &self,
        candidates: &[u16],
        x: &[f32],
        w: &[f32],
        scale: f32,
    ) -> u16 {
        let mut best = f32::MAX;
        let mut chosen = None;
        for &index in candidates {
            let mut d2 = 0.0f32;
            for ((&q, &x), &w) in self.point(index).iter().zip(x).zip(w) {
                let diff = scale * f32::from(q) - x;
                d2 += w * diff * diff;
            }
            if d2 < best {
                best = d2;
                chosen = Some(index);
            }
        }
        chosen.or(candidates.first().copied()).unwrap_or(0)
    }

    /// ggml's buffers, for checking against its checksums: the neighbour records, and the key map
    /// as `i32`s (a point index, or `-(offset + 1)` of the key's record).
    #[cfg(test)]
    pub(super) fn ggml_layout(&self) -> (&[u16], Vec<i32>) {
        let map = self
            .slots
            .iter()
            .map(|s| match *s {
                Slot::Point(i) => i32::from(i),
                Slot::Near(start) => -(start as i32) - 1,
            })
            .collect();
        (&self.neighbours, map)
    }
}

/// The model values `2l + 1` of a packed key.
fn positions(key: u16) -> [u8; 4] {
    std::array::from_fn(|j| 2 * ((key >> (3 * j)) & 7) as u8 + 1)
}
