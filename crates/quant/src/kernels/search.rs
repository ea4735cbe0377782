//! Shared search helpers of `ggml-quants.c` (`make_qx_quants`, `make_q3_quants`,
//! `make_qkx2_quants`, `make_qkx3_quants`, `make_qp_quants`), bit-exact: plain f32 operations in
//! the same order and association as the C, no fused multiply-add, f32 accumulators summed in
//! element order.
//!
//! Each helper picks a scale (and, for the affine ones, an offset) for a small group of values and
//! the integer level of every value. Levels are returned in a caller-provided slice of the group's
//! length, always as non-negative codes (signed searches add `nmax`, as ggml does), so callers can
//! pack them directly.
//!
//! Where ggml stores an `int` into a `uint8_t` or `int8_t` array, the value wraps modulo 256 (gcc
//! on x86-64); the helpers reproduce that with `as u8` so that even degenerate inputs give ggml's
//! bytes.

use crate::scalar::nearest_int;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below this is treated as all zero.
pub(crate) const GROUP_MAX_EPS: f32 = 1e-15;

/// The largest |x| of a group and the signed value attaining it (the first one, as comparisons are
/// strict). Both are 0 for an empty or all-zero group.
#[inline]
pub(crate) fn abs_max(x: &[f32]) -> (f32, f32) {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        let a = v.abs();
        if a > amax {
            amax = a;
            max = v;
        }
    }
    (amax, max)
}

/// Σ x² accumulated in element order (the σ² sums of the `*_impl` routines).
#[inline]
pub(crate) fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, &v| s + v * v)
}

/// `make_qx_quants(n, nmax, x, L, rmse_type = 1, qw)`: a symmetric scale with signed levels in
/// `[-nmax, nmax - 1]`, chosen to minimise the weighted squared error over 19 trial scales.
///
/// - `nmax`: half the number of levels (4 for 3 bits, 8 for 4 bits, 16 for 5 bits, 32 for 6 bits).
/// - `x`: the group; `levels` (same length) receives `level + nmax`, in `0..2·nmax`.
/// - `qw`: per-element weights; `None` weighs each element by x².
///
/// Returns the scale (value ≈ scale·(code − nmax)). It is negative when the group's largest
/// magnitude is positive: ggml maps that element to the level −nmax. An all-zero group (|x| below
/// [`GROUP_MAX_EPS`]) gives scale 0 and all codes 0 (not `nmax`).
pub(crate) fn make_qx_quants(nmax: i32, x: &[f32], levels: &mut [u8], qw: Option<&[f32]>) -> f32 {
    debug_assert_eq!(levels.len(), x.len());
    debug_assert!(qw.is_none_or(|w| w.len() == x.len()));
    let (amax, max) = abs_max(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let weight = |i: usize| match qw {
        Some(w) => w[i],
        None => x[i] * x[i],
    };
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    // Weighted Σ w·x·l and Σ w·l² for one trial inverse scale.
    let sums = |iscale: f32| {
        let mut sumlx = 0.0f32;
        let mut suml2 = 0.0f32;
        for (i, &v) in x.iter().enumerate() {
            let l = level(iscale, v) as f32;
            let w = weight(i);
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let store = |iscale: f32, levels: &mut [u8]| {
        for (q, &v) in levels.iter_mut().zip(x) {
            *q = (level(iscale, v) + nmax) as u8;
        }
    };

    let nmaxf = nmax as f32;
    let iscale = -nmaxf / max;
    store(iscale, levels);
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in (-9..=9).filter(|&is| is != 0) {
        let iscale = -(nmaxf + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            store(iscale, levels);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `make_q3_quants(n, nmax, x, L, do_rmse = true)` (the Q3_K reference): symmetric levels in
/// `[-nmax, nmax - 1]` from the rounding scale −nmax/max, then up to five passes of coordinate
/// descent that move single levels while that raises (Σ w·x·l)² / Σ w·l², with w = x².
///
/// `levels` receives `level + nmax`. Returns the least-squares scale for the final levels. An
/// all-zero group gives scale 0 and all codes 0 (not `nmax`).
pub(crate) fn make_q3_quants(nmax: i32, x: &[f32], levels: &mut [u8]) -> f32 {
    debug_assert_eq!(levels.len(), x.len());
    let (amax, max) = abs_max(x);
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    // The signed level of element i is `levels[i] - nmax` throughout; only its code is stored.
    let signed = |code: u8| i32::from(code) - nmax;
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (q, &v) in levels.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *q = (l + nmax) as u8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (q, &v) in levels.iter_mut().zip(x) {
            let w = v * v;
            let old = signed(*q);
            let oldf = old as f32;
            let mut slx = sumlx - w * v * oldf;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * oldf * oldf;
                let new = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new != old {
                    let newf = new as f32;
                    slx += w * v * newf;
                    sl2 += w * newf * newf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = (new + nmax) as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// The trial grid of an affine search (`rmin`, `rdelta`, `nstep`, `use_mad` of
/// `make_qkx2_quants` / `make_qkx3_quants`): trial `is` in `0..=nstep` uses the inverse scale
/// `(rmin + rdelta·is + nmax) / (max − min)`; the error is the weighted absolute error when
/// `use_mad`, else the weighted squared error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AffineGrid {
    /// Offset of the first trial from `nmax` levels.
    pub(crate) rmin: f32,
    /// Step between trials.
    pub(crate) rdelta: f32,
    /// Number of steps; trials are `0..=nstep`, none when `nstep < 1`.
    pub(crate) nstep: i32,
    /// Absolute instead of squared error.
    pub(crate) use_mad: bool,
}

/// The result of an affine search: value ≈ `scale`·code − `min`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct AffineFit {
    /// The scale (the float ggml stores as `d` or a sub-block scale).
    pub(crate) scale: f32,
    /// ggml's `the_min`: the negated offset, ≥ 0 (possibly −0.0).
    pub(crate) min: f32,
}

/// `make_qkx2_quants`: affine levels `0..=nmax` with a non-positive offset, searched over
/// `grid`'s trial scales, each refined by weighted least squares for scale and offset.
///
/// `weights` has one weight per element of `x`; `levels` receives the codes; `scratch` is a
/// caller-owned buffer of at least `x.len()` bytes (ggml's `Laux`). A constant group gives scale 0
/// and codes 0.
///
/// As in ggml, each trial's levels are computed from the offset of the best trial so far, not the
/// initial minimum.
pub(crate) fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    levels: &mut [u8],
    scratch: &mut [u8],
    grid: AffineGrid,
) -> AffineFit {
    affine_search(
        nmax,
        x,
        |i| weights[i],
        levels,
        scratch,
        grid,
        |max, min| max == min,
    )
}

/// `make_qkx3_quants`: as [`make_qkx2_quants`], except that `weights` may be `None` (each
/// element then weighs x²) and the degenerate test is `max <= min`.
pub(crate) fn make_qkx3_quants(
    nmax: i32,
    x: &[f32],
    weights: Option<&[f32]>,
    levels: &mut [u8],
    scratch: &mut [u8],
    grid: AffineGrid,
) -> AffineFit {
    let weight = |i: usize| match weights {
        Some(w) => w[i],
        None => x[i] * x[i],
    };
    affine_search(nmax, x, weight, levels, scratch, grid, |max, min| {
        max <= min
    })
}

/// The body shared by `make_qkx2_quants` and `make_qkx3_quants`.
fn affine_search(
    nmax: i32,
    x: &[f32],
    weight: impl Fn(usize) -> f32,
    levels: &mut [u8],
    scratch: &mut [u8],
    grid: AffineGrid,
    degenerate: impl Fn(f32, f32) -> bool,
) -> AffineFit {
    let n = x.len();
    debug_assert_eq!(levels.len(), n);
    let Some(&x0) = x.first() else {
        return AffineFit {
            scale: 0.0,
            min: 0.0,
        };
    };
    let scratch = &mut scratch[..n];
    let mut min = x0;
    let mut max = x0;
    let mut sum_w = weight(0);
    let mut sum_x = sum_w * x0;
    for (i, &v) in x.iter().enumerate().skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        let w = weight(i);
        sum_w += w;
        sum_x += w * v;
    }
    if min > 0.0 {
        min = 0.0;
    }
    if degenerate(max, min) {
        levels.fill(0);
        return AffineFit {
            scale: 0.0,
            min: -min,
        };
    }
    let error = |scale: f32, min: f32, codes: &[u8]| {
        let mut err = 0.0f32;
        for (i, (&v, &q)) in x.iter().zip(codes).enumerate() {
            let diff = scale * f32::from(q) + min - v;
            let diff = if grid.use_mad {
                diff.abs()
            } else {
                diff * diff
            };
            err += weight(i) * diff;
        }
        err
    };
    let quantize = |iscale: f32, min: f32, codes: &mut [u8]| {
        for (q, &v) in codes.iter_mut().zip(x) {
            *q = nearest_int(iscale * (v - min)).clamp(0, nmax) as u8;
        }
    };

    let nmaxf = nmax as f32;
    let iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    quantize(iscale, min, levels);
    let mut best_error = error(scale, min, levels);
    if grid.nstep < 1 {
        return AffineFit { scale, min: -min };
    }
    for is in 0..=grid.nstep {
        let iscale = (grid.rmin + grid.rdelta * is as f32 + nmaxf) / (max - min);
        quantize(iscale, min, scratch);
        let mut sum_l = 0.0f32;
        let mut sum_l2 = 0.0f32;
        let mut sum_xl = 0.0f32;
        for (i, (&v, &q)) in x.iter().zip(scratch.iter()).enumerate() {
            let l = f32::from(q);
            let w = weight(i);
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * v;
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let cur_error = error(this_scale, this_min, scratch);
            if cur_error < best_error {
                levels.copy_from_slice(scratch);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    AffineFit { scale, min: -min }
}

/// `make_qp_quants(n, nmax, x, L, qw)`: a scale for non-negative values (sub-block scales or
/// mins) with levels `0..=nmax`, chosen over nine trial scales by weighted squared error and then
/// refined by up to five passes of single-level moves.
///
/// `levels` receives the codes; `qw` has one weight per element. Returns the least-squares scale
/// of the final levels, 0 when every value is below [`GROUP_MAX_EPS`] (codes 0). As in ggml the
/// levels are only clamped from above, so a negative input wraps modulo 256 in `levels`.
pub(crate) fn make_qp_quants(nmax: i32, x: &[f32], levels: &mut [u8], qw: &[f32]) -> f32 {
    debug_assert_eq!(levels.len(), x.len());
    debug_assert_eq!(qw.len(), x.len());
    let max = x.iter().fold(0.0f32, |m, &v| if m > v { m } else { v });
    if max < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / max;
    for (q, &v) in levels.iter_mut().zip(x) {
        *q = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for ((&v, &q), &w) in x.iter().zip(levels.iter()).zip(qw) {
        let diff = v - scale * f32::from(q);
        best_mse += w * diff * diff;
    }
    for is in (-4..=4).filter(|&is| is != 0) {
        let iscale_is = (0.1 * is as f32 + nmaxf) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for (&v, &w) in x.iter().zip(qw) {
            let l = nearest_int(iscale_is * v).min(nmax);
            let diff = v - scale_is * l as f32;
            mse += w * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for ((q, &v), &w) in levels.iter_mut().zip(x).zip(qw) {
        let l = nearest_int(iscale * v).min(nmax);
        *q = l as u8;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for ((q, &v), &w) in levels.iter_mut().zip(x).zip(qw) {
            let old = f32::from(*q);
            let mut slx = sumlx - w * v * old;
            let mut sl2 = suml2 - w * old * old;
            if slx > 0.0 && sl2 > 0.0 {
                let new = nearest_int(v * sl2 / slx).min(nmax);
                if new != i32::from(*q) {
                    let newf = new as f32;
                    slx += w * v * newf;
                    sl2 += w * newf * newf;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *q = new as u8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qx_zero_group_gives_zero_codes() {
        let mut l = [9u8; 16];
        assert_eq!(make_qx_quants(32, &[0.0; 16], &mut l, None), 0.0);
        assert_eq!(l, [0; 16]);
    }

    #[test]
    fn qx_maps_the_largest_magnitude_to_minus_nmax() {
        let x = [1.0, -0.5, 0.25, 0.0];
        let mut l = [0u8; 4];
        let scale = make_qx_quants(8, &x, &mut l, None);
        assert!(scale < 0.0);
        assert_eq!(l[0], 0); // level −8
        for (&v, &q) in x.iter().zip(&l) {
            assert!(
                (scale * (f32::from(q) - 8.0) - v).abs() <= 0.07,
                "{v} {q} {scale}"
            );
        }
    }

    #[test]
    fn q3_zero_group_gives_zero_codes() {
        let mut l = [9u8; 16];
        assert_eq!(make_q3_quants(4, &[0.0; 16], &mut l), 0.0);
        assert_eq!(l, [0; 16]);
    }

    #[test]
    fn affine_search_fits_a_ramp_exactly() {
        let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let w = vec![1.0; 16];
        let mut l = [0u8; 16];
        let mut aux = [0u8; 16];
        let grid = AffineGrid {
            rmin: -1.0,
            rdelta: 0.1,
            nstep: 20,
            use_mad: false,
        };
        let fit = make_qkx2_quants(15, &x, &w, &mut l, &mut aux, grid);
        for (&v, &q) in x.iter().zip(&l) {
            assert!((fit.scale * f32::from(q) - fit.min - v).abs() < 1e-5);
        }
        let fit3 = make_qkx3_quants(15, &x, Some(&w), &mut l, &mut aux, grid);
        assert_eq!(fit, fit3);
    }

    #[test]
    fn affine_search_constant_group() {
        let mut l = [7u8; 8];
        let mut aux = [0u8; 8];
        let grid = AffineGrid {
            rmin: -0.9,
            rdelta: 0.05,
            nstep: 36,
            use_mad: false,
        };
        let fit = make_qkx3_quants(15, &[-2.0; 8], None, &mut l, &mut aux, grid);
        assert_eq!(fit.scale, 0.0);
        assert_eq!(fit.min, 2.0);
        assert_eq!(l, [0; 8]);
        // Positive constants: the offset is clamped to 0, so the group is not degenerate.
        let fit = make_qkx2_quants(15, &[3.0; 8], &[1.0; 8], &mut l, &mut aux, grid);
        assert!((fit.scale * f32::from(l[0]) - fit.min - 3.0).abs() < 1e-5);
    }

    #[test]
    fn qp_levels_stay_in_range() {
        let x = [0.5, 1.0, 0.0, 0.75, 0.1, 0.3, 0.9, 0.2];
        let w = [1.0; 8];
        let mut l = [0u8; 8];
        let d = make_qp_quants(15, &x, &mut l, &w);
        assert!(d > 0.0);
        for (&v, &q) in x.iter().zip(&l) {
            assert!(q <= 15);
            assert!((d * f32::from(q) - v).abs() <= d);
        }
        assert_eq!(make_qp_quants(15, &[0.0; 8], &mut l, &w), 0.0);
        assert_eq!(l, [0; 8]);
    }
}
