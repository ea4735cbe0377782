//! The per-32-element scale search shared by IQ3_XXS and IQ3_S.
//!
//! Both quantizers sweep a range of trial scales, snap every group of 4 magnitudes to the grid
//! (through the neighbour lists when the rounded levels are off the grid), keep the trial with
//! the best weighted least-squares fit, and finally re-snap at the fitted scale.

use super::grid::{Grid, Snap, LEVELS};
use crate::scalar::nearest_int;

/// Elements per sub-block: one 4-bit scale each.
pub(super) const SUB: usize = 32;
/// Groups of 4 (one grid point each) per sub-block.
pub(super) const GROUPS: usize = SUB / 4;

/// `σ² = 2·Σx²/256` over a super-block, summed in index order.
pub(super) fn sigma2(x: &[f32]) -> f32 {
    let sumx2 = x.iter().fold(0.0f32, |s, &v| s + v * v);
    2.0 * sumx2 / x.len() as f32
}

/// Per-element importance of one sub-block, and its square root used by the neighbour search.
///
/// With an importance matrix: `qw·√(σ² + x²)`; without one ggml falls back to `x²`.
pub(super) fn weights(x: &[f32], qw: Option<&[f32]>, sigma2: f32) -> ([f32; SUB], [f32; SUB]) {
    let mut weight = [0.0f32; SUB];
    match qw {
        Some(qw) => {
            for ((w, &x), &q) in weight.iter_mut().zip(x).zip(qw) {
                *w = q * (sigma2 + x * x).sqrt();
            }
        }
        None => {
            for (w, &x) in weight.iter_mut().zip(x) {
                *w = x * x;
            }
        }
    }
    let waux = weight.map(f32::sqrt);
    (weight, waux)
}

/// ggml's `MAX(a, b)`: `a > b ? a : b` (which argument wins on NaN matters for bit-exactness).
pub(super) fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// One sub-block's inputs: magnitudes (IQ3_XXS may hold one non-positive entry per 8, see its
/// parity rule) and weights.
pub(super) struct Inputs<'a> {
    /// Magnitudes to fit.
    pub(super) xval: &'a [f32; SUB],
    /// Least-squares weights.
    pub(super) weight: &'a [f32; SUB],
    /// Square roots of `weight`, used for neighbour distances.
    pub(super) waux: &'a [f32; SUB],
}

/// The knobs in which the two quantizers differ.
pub(super) struct Search {
    /// The grid to snap to.
    pub(super) grid: &'static Grid,
    /// Trial scales `is = -steps..=steps`.
    pub(super) steps: i32,
    /// Whether groups count as on the grid before any trial is accepted (IQ3_XXS: yes, IQ3_S: no,
    /// which forces the final re-snap even when no trial was accepted).
    pub(super) start_on_grid: bool,
    /// Whether the final re-snap redoes every group (IQ3_S) or only the off-grid ones (IQ3_XXS).
    pub(super) resnap_all: bool,
}

impl Search {
    /// Finds the sub-block scale and each group's grid point. `max` is the largest `xval`
    /// (non-zero; the callers skip empty sub-blocks).
    pub(super) fn run(&self, inputs: &Inputs<'_>, max: f32) -> (f32, [u16; GROUPS]) {
        let mut best = 0.0f32;
        let mut scale = max / 15.0;
        // Until a trial is accepted the levels are all 0, which is key 0 = grid point 0.
        let mut chosen = [0u16; GROUPS];
        let mut on_grid = [self.start_on_grid; GROUPS];
        for is in -self.steps..=self.steps {
            let id = (15.0 + is as f32 * 0.2) / max;
            let this_scale = 1.0 / id;
            let mut trial = [0u16; GROUPS];
            let mut trial_on_grid = [true; GROUPS];
            for k in 0..GROUPS {
                (trial[k], trial_on_grid[k]) = self.snap_group(inputs, k, id, this_scale);
            }
            let (sumqx, sumq2) = self.fit(inputs, &trial);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                chosen = trial;
                on_grid = trial_on_grid;
            }
        }
        if on_grid.contains(&false) && scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..GROUPS {
                if self.resnap_all || !on_grid[k] {
                    chosen[k] = self.snap_group(inputs, k, id, scale).0;
                }
            }
            let (sumqx, sumq2) = self.fit(inputs, &chosen);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        (scale, chosen)
    }

    /// Rounds group `k` to levels at inverse scale `id` and returns its grid point and whether
    /// the rounded levels were on the grid; off the grid, the nearest neighbour at `scale` wins.
    fn snap_group(&self, inputs: &Inputs<'_>, k: usize, id: f32, scale: f32) -> (u16, bool) {
        let x = &inputs.xval[4 * k..4 * k + 4];
        let levels: [u8; 4] = std::array::from_fn(|i| {
            nearest_int(0.5 * (id * x[i] - 1.0)).clamp(0, LEVELS as i32 - 1) as u8
        });
        match self.grid.snap(levels) {
            Snap::Point(index) => (index, true),
            Snap::Near(candidates) => {
                let w = &inputs.waux[4 * k..4 * k + 4];
                (self.grid.best_neighbour(candidates, x, w, scale), false)
            }
        }
    }

    /// Weighted least-squares sums `Σ (w·x)·q` and `Σ (w·q)·q` with model values `q = 2l + 1`.
    fn fit(&self, inputs: &Inputs<'_>, points: &[u16; GROUPS]) -> (f32, f32) {
        let mut sumqx = 0.0f32;
        let mut sumq2 = 0.0f32;
        for (k, &index) in points.iter().enumerate() {
            let q = self.grid.point(index);
            for i in 0..4 {
                let w = inputs.weight[4 * k + i];
                let q = f32::from(q[i]);
                sumqx += w * inputs.xval[4 * k + i] * q;
                sumq2 += w * q * q;
            }
        }
        (sumqx, sumq2)
    }
}

/// The 4-bit code of a sub-block scale relative to the super-block scale: `scale ≈ d·(2l + 1)`.
pub(super) fn scale_nibble(id: f32, scale: f32) -> u8 {
    nearest_int(0.5 * (id * scale - 1.0)).clamp(0, 15) as u8
}
