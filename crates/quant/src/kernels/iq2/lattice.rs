//! The 8-dimensional grids behind IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S and IQ1_M: the dequantization
//! tables of ggml-common.h, and the maps `iq2xs_init_impl` builds once for the quantizers (key →
//! grid index, and for keys off the grid, the list of nearest grid points).
//!
//! Each grid point has eight coordinates, each at level 0, 1 or 2. The quantizers work with the
//! *position* `2·level + 1` (1, 3 or 5); a group's *key* packs its levels two bits per coordinate,
//! which is exactly the point's entry in the quantizer grid ([`super::grids`]). The dequantization
//! tables are derived from those same entries at compile time, so the two views cannot disagree.

use std::sync::OnceLock;

use super::grids::{KGRID_1BIT_2048, KGRID_2BIT_1024, KGRID_2BIT_256, KGRID_2BIT_512};
use crate::scalar::nearest_int;

/// Dequantization byte of each level in `iq2xxs_grid`, `iq2xs_grid` and `iq2s_grid`. The quantizer
/// fits against positions 1, 3, 5 but the decoder uses 8, 25, 43 (= 8·{1, 3.125, 5.375}); ggml's
/// fudge factors partly make up for the difference, so it must not be "fixed".
const IQ2_LEVEL_BYTES: [u8; 3] = [0x08, 0x19, 0x2b];
/// Dequantization byte of each level in `iq1s_grid`, read back as `i8`: −1, 0, +1.
const IQ1_LEVEL_BYTES: [u8; 3] = [0xff, 0x00, 0x01];

/// Expands a quantizer grid into ggml's u64 dequantization table: byte `j` (little-endian) of entry
/// `i` is the dequantization byte of coordinate `j` of point `i`. A level of 3 in a table would fail
/// const evaluation (index out of bounds), so the tables are checked at compile time.
const fn expand<const N: usize>(kgrid: &[u16; N], bytes: [u8; 3]) -> [u64; N] {
    let mut out = [0u64; N];
    let mut i = 0;
    while i < N {
        let mut v = 0u64;
        let mut j = 0;
        while j < 8 {
            let level = (kgrid[i] >> (2 * j)) & 3;
            v |= (bytes[level as usize] as u64) << (8 * j);
            j += 1;
        }
        out[i] = v;
        i += 1;
    }
    out
}

/// `iq2xxs_grid` (ggml-common.h): the IQ2_XXS dequantization grid.
pub(super) static IQ2XXS_GRID: [u64; 256] = expand(&KGRID_2BIT_256, IQ2_LEVEL_BYTES);
/// `iq2xs_grid`: the IQ2_XS dequantization grid.
pub(super) static IQ2XS_GRID: [u64; 512] = expand(&KGRID_2BIT_512, IQ2_LEVEL_BYTES);
/// `iq2s_grid`: the IQ2_S dequantization grid.
pub(super) static IQ2S_GRID: [u64; 1024] = expand(&KGRID_2BIT_1024, IQ2_LEVEL_BYTES);
/// `iq1s_grid`: the IQ1_S / IQ1_M dequantization grid (bytes are `i8`).
pub(super) static IQ1S_GRID: [u64; 2048] = expand(&KGRID_1BIT_2048, IQ1_LEVEL_BYTES);

/// `ksigns_iq2xs`: a 7-bit stored sign field with bit 7 restored as the parity of the other seven,
/// since the quantizers keep an even number of negative values per group of 8.
pub(super) static KSIGNS_IQ2XS: [u8; 128] = {
    let mut out = [0u8; 128];
    let mut s = 0;
    while s < 128 {
        out[s] = s as u8 | (((s as u32).count_ones() & 1) << 7) as u8;
        s += 1;
    }
    out
};

/// Number of keys `iq2xs_init_impl` maps: every 16-bit key up to `0xAAAA` (all levels 2), plus one.
const KEY_SPACE: usize = 43_692;
/// Largest squared position distance between two points with levels ≤ 2: 8 coordinates × 4².
const MAX_DIST2: usize = 128;

/// The five quantizer slots of `iq2xs_init_impl` (IQ1_S and IQ1_M share one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Grid {
    /// `kgrid_2bit_256`, 2 neighbour distances.
    Iq2Xxs,
    /// `kgrid_2bit_512`, 2 neighbour distances.
    Iq2Xs,
    /// `kgrid_2bit_1024`, 1 neighbour distance.
    Iq2S,
    /// `kgrid_1bit_2048`, 3 neighbour distances.
    Iq1,
}

impl Grid {
    /// The quantizer grid table and how many distinct neighbour distances each list keeps
    /// (`nwant`).
    fn definition(self) -> (&'static [u16], usize) {
        match self {
            Grid::Iq2Xxs => (&KGRID_2BIT_256, 2),
            Grid::Iq2Xs => (&KGRID_2BIT_512, 2),
            Grid::Iq2S => (&KGRID_2BIT_1024, 1),
            Grid::Iq1 => (&KGRID_1BIT_2048, 3),
        }
    }

    /// The slot's maps, built on first use (the same for every caller and thread).
    pub(super) fn lattice(self) -> &'static Lattice {
        static SLOTS: [OnceLock<Lattice>; 4] = [const { OnceLock::new() }; 4];
        let slot = match self {
            Grid::Iq2Xxs => 0,
            Grid::Iq2Xs => 1,
            Grid::Iq2S => 2,
            Grid::Iq1 => 3,
        };
        SLOTS[slot].get_or_init(|| {
            let (kgrid, nwant) = self.definition();
            Lattice::build(kgrid, nwant)
        })
    }
}

/// The levels of the eight coordinates packed in a key.
fn key_levels(key: u16) -> [u8; 8] {
    std::array::from_fn(|j| ((key >> (2 * j)) & 3) as u8)
}

/// The key of eight levels (each 0..=2).
pub(super) fn key_of(levels: &[u8]) -> u16 {
    levels
        .iter()
        .enumerate()
        .fold(0u16, |key, (j, &l)| key | (u16::from(l) << (2 * j)))
}

/// Where a group's key falls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Lookup<'a> {
    /// The key is a grid point: its index.
    OnGrid(u16),
    /// The key is off the grid: its nearest grid points, by distance and then by index.
    Neighbours(&'a [u16]),
}

/// One slot of `iq2xs_init_impl`: the grid points, the key map and the neighbour lists.
///
/// Lists exist only for *reachable* keys (all levels ≤ 2), the only ones the quantizers form; they
/// are stored as in ggml, one `[n, index_1, …, index_n]` record per off-grid key in ascending key
/// order.
#[derive(Debug)]
pub(super) struct Lattice {
    /// The levels of every grid point.
    points: Vec<[u8; 8]>,
    /// By key: the grid index (≥ 0), `-(offset + 1)` of the key's record in `neighbours`, or
    /// `i32::MIN` for an unreachable off-grid key.
    map: Vec<i32>,
    /// The neighbour records.
    neighbours: Vec<u16>,
}

impl Lattice {
    /// Builds the maps as `iq2xs_init_impl` does: for an off-grid key, every grid point is ranked
    /// by its integer squared distance in positions, ties by index, and the list keeps all points
    /// whose distance is among the `nwant` smallest distinct distances. Distances are small
    /// integers, so a bucket pass replaces ggml's sort with the same order.
    fn build(kgrid: &[u16], nwant: usize) -> Lattice {
        let points: Vec<[u8; 8]> = kgrid.iter().map(|&g| key_levels(g)).collect();
        let mut map = vec![i32::MIN; KEY_SPACE];
        for (i, &g) in kgrid.iter().enumerate() {
            map[usize::from(g)] = i as i32;
        }
        let mut neighbours = Vec::new();
        let mut dist2 = vec![0usize; points.len()];
        for key in 0..KEY_SPACE as u16 {
            let levels = key_levels(key);
            if map[usize::from(key)] >= 0 || levels.contains(&3) {
                continue;
            }
            let mut present = [false; MAX_DIST2 + 1];
            for (d, point) in dist2.iter_mut().zip(&points) {
                *d = point
                    .iter()
                    .zip(&levels)
                    .map(|(&p, &q)| {
                        let diff = (2 * i32::from(p) + 1) - (2 * i32::from(q) + 1);
                        (diff * diff) as usize
                    })
                    .sum();
                present[*d] = true;
            }
            let offset = neighbours.len();
            map[usize::from(key)] = -(offset as i32 + 1);
            neighbours.push(0);
            let wanted = (0..=MAX_DIST2).filter(|&d| present[d]).take(nwant);
            for d in wanted {
                let at_d = dist2.iter().enumerate().filter(|&(_, &di)| di == d);
                neighbours.extend(at_d.map(|(i, _)| i as u16));
            }
            neighbours[offset] = (neighbours.len() - offset - 1) as u16;
        }
        Lattice {
            points,
            map,
            neighbours,
        }
    }

    /// Looks a key up. Keys with a level of 3 never occur (levels are clamped to 0..=2); should
    /// one appear, it is treated as an empty neighbour list.
    pub(super) fn lookup(&self, key: u16) -> Lookup<'_> {
        match self.map.get(usize::from(key)).copied().unwrap_or(i32::MIN) {
            i32::MIN => Lookup::Neighbours(&[]),
            index if index >= 0 => Lookup::OnGrid(index as u16),
            code => {
                let start = (-(code + 1)) as usize;
                let n = usize::from(self.neighbours[start]);
                Lookup::Neighbours(&self.neighbours[start + 1..start + 1 + n])
            }
        }
    }

    /// The grid index of a group's levels, which the quantizers only ask for once the levels are
    /// a grid point (ggml aborts otherwise; here the answer is then point 0).
    pub(super) fn index_of(&self, levels: &[u8]) -> u16 {
        match self.lookup(key_of(levels)) {
            Lookup::OnGrid(index) => index,
            Lookup::Neighbours(_) => 0,
        }
    }

    /// The levels of grid point `index`.
    pub(super) fn levels(&self, index: u16) -> &[u8; 8] {
        &self.points[usize::from(index)]
    }

    /// The neighbour records (see the type docs), for checking against ggml's.
    #[cfg(test)]
    pub(super) fn neighbour_records(&self) -> &[u16] {
        &self.neighbours
    }

    /// Rounds a group of 8 to levels at inverse scale `id` and snaps it onto the grid (ggml's
    /// inner loop of the IQ2 scale sweeps): `level = clamp(rne(0.5·(id·x − 1)), 0, 2)`; if that is
    /// not a grid point, the nearest neighbour at `scale` (`iq2_find_best_neighbour`)
    /// replaces it. Writes the levels, and returns the grid index and whether the rounded levels
    /// were already on the grid.
    pub(super) fn snap(
        &self,
        xval: &[f32],
        waux: &[f32],
        id: f32,
        scale: f32,
        levels: &mut [u8],
    ) -> (u16, bool) {
        for (l, &x) in levels.iter_mut().zip(xval) {
            *l = nearest_int(0.5 * (id * x - 1.0)).clamp(0, 2) as u8;
        }
        match self.lookup(key_of(levels)) {
            Lookup::OnGrid(index) => (index, true),
            Lookup::Neighbours(list) => {
                let index = self.nearest_iq2(list, xval, waux, scale);
                levels.copy_from_slice(self.levels(index));
                (index, false)
            }
        }
    }

    /// `iq2_find_best_neighbour`: the first candidate with the smallest
    /// `Σ (waux·diff)·diff`, `diff = scale·position − xval`. Only non-finite inputs can leave
    /// every distance at or above `f32::MAX`, where ggml aborts; the first candidate is taken then.
    fn nearest_iq2(&self, list: &[u16], xval: &[f32], waux: &[f32], scale: f32) -> u16 {
        let mut best = (list.first().copied().unwrap_or(0), f32::MAX);
        for &candidate in list {
            let d2 = self.levels(candidate).iter().zip(xval).zip(waux).fold(
                0.0f32,
                |d2, ((&l, &x), &w)| {
                    let diff = scale * f32::from(2 * l + 1) - x;
                    d2 + w * diff * diff
                },
            );
            if d2 < best.1 {
                best = (candidate, d2);
            }
        }
        best.0
    }

    /// `iq1_find_best_neighbour2`: like [`Self::nearest_iq2`] but on the signed values, with the
    /// plain weights and the shifted value table (`x_p` or `x_m`) in place of positions.
    pub(super) fn nearest_iq1(
        &self,
        list: &[u16],
        x: &[f32],
        weight: &[f32],
        scale: f32,
        values: &[f32; 3],
    ) -> u16 {
        let mut best = (list.first().copied().unwrap_or(0), f32::MAX);
        for &candidate in list {
            let d2 = self.levels(candidate).iter().zip(x).zip(weight).fold(
                0.0f32,
                |d2, ((&l, &x), &w)| {
                    let diff = scale * values[usize::from(l)] - x;
                    d2 + w * diff * diff
                },
            );
            if d2 < best.1 {
                best = (candidate, d2);
            }
        }
        best.0
    }
}
