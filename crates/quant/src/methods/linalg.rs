//! Dense f64 linear algebra for the calibration-aware quantizers: Cholesky factorization, the
//! upper Cholesky factor of an inverse (GPTQ's `Hinv`), and quadratic forms `dᵀ G d`.
//!
//! Everything here is deterministic whatever the number of threads: work is split only over
//! independent outputs (rows of a factor, columns of an inverse, rows of a weight matrix), and
//! every output element is computed by the same sequence of floating-point operations whichever
//! thread computes it. Sums use a fixed association ([`dot`] keeps eight interleaved partial sums so
//! the compiler can vectorize it without reordering anything itself).

use rayon::prelude::*;

/// Below this many independent outputs a parallel split costs more than it saves; the serial
/// path computes the same values.
const PAR_MIN: usize = 64;

/// Σ aᵢ·bᵢ over the common length with a fixed association: eight partial sums over indices
/// `≡ 0..7 (mod 8)` (independent chains, so the adds overlap and the compiler can vectorize
/// without reordering anything itself), combined pairwise, then the tail in order.
#[inline]
pub(crate) fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut s = [0.0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            s[k] += x[k] * y[k];
        }
    }
    let mut total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        total += x * y;
    }
    total
}

/// `y += a·x` elementwise (each `yᵢ` independent, so this vectorizes without reassociation).
#[inline]
pub(crate) fn axpy(y: &mut [f64], a: f64, x: &[f64]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

/// In-place lower Cholesky factorization `A = L·Lᵀ` of a row-major `n × n` matrix; only the
/// lower triangle (with the diagonal) is read, and the strict upper triangle is zeroed.
///
/// Returns `Err(j)` with the first column whose pivot is not positive (or not finite), i.e. the
/// matrix is not numerically positive definite.
pub(crate) fn cholesky_lower(a: &mut [f64], n: usize) -> Result<(), usize> {
    debug_assert_eq!(a.len(), n * n);
    for j in 0..n {
        let (top, bottom) = a.split_at_mut((j + 1) * n);
        let row_j = &mut top[j * n..];
        let pivot = row_j[j] - dot(&row_j[..j], &row_j[..j]);
        // `!(pivot > 0)` also catches NaN.
        if !(pivot > 0.0 && pivot.is_finite()) {
            return Err(j);
        }
        let ljj = pivot.sqrt();
        row_j[j] = ljj;
        for v in &mut row_j[j + 1..] {
            *v = 0.0;
        }
        let row_j = &top[j * n..j * n + j];
        // Each row below only reads row j's prefix and writes its own entry j.
        let update = |row_i: &mut [f64]| {
            row_i[j] = (row_i[j] - dot(&row_i[..j], row_j)) / ljj;
        };
        if n - j > PAR_MIN {
            bottom.par_chunks_mut(n).for_each(update);
        } else {
            bottom.chunks_mut(n).for_each(update);
        }
    }
    Ok(())
}

/// The inverse of a lower-triangular row-major `n × n` matrix with a positive diagonal, as
/// columns: `cols[c][k]` is `V[c + k][c]` for `V = L⁻¹` (column `c` has `n - c` entries).
fn lower_inverse_columns(l: &[f64], n: usize) -> Vec<Vec<f64>> {
    let column = |c: usize| {
        // L·v = e_c by forward substitution; v is zero above c.
        let mut v = vec![0.0f64; n - c];
        v[0] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let row = &l[i * n + c..i * n + i];
            v[i - c] = -dot(row, &v[..i - c]) / l[i * n + i];
        }
        v
    };
    if n >= PAR_MIN {
        (0..n).into_par_iter().map(column).collect()
    } else {
        (0..n).map(column).collect()
    }
}

/// The upper-triangular `U` with `H⁻¹ = Uᵀ·U` (the upper Cholesky factor of `H⁻¹`), row-major,
/// for a symmetric positive definite row-major `h` (consumed, to keep at most about 1.5 matrices
/// alive). Only the upper triangle of `h` (with the diagonal) is read.
///
/// GPTQ's reference computes `cholesky(cholesky_inverse(cholesky(H)), upper=True)`: three cubic
/// steps and an explicit inverse. The same factor comes from one Cholesky of the reversed matrix
/// and one triangular inverse: with `J` the reversal permutation and `J·H·J = M·Mᵀ`, `R = J·M·J`
/// is upper triangular with `H = R·Rᵀ`, so `H⁻¹ = R⁻ᵀ·R⁻¹ = Uᵀ·U` with `U = R⁻¹ = J·M⁻¹·J` upper
/// triangular with a positive diagonal, which by uniqueness is the Cholesky factor. Half the
/// work, and no explicitly formed inverse.
///
/// Returns `Err(j)` with the failing column (in `h`'s own indexing) when `h` is not positive
/// definite.
pub(crate) fn upper_cholesky_of_inverse(mut h: Vec<f64>, n: usize) -> Result<Vec<f64>, usize> {
    debug_assert_eq!(h.len(), n * n);
    // Reversing the row-major storage maps entry (a, b) to (n-1-a, n-1-b): K = J·H·J in place,
    // whose lower triangle is H's upper triangle.
    h.reverse();
    cholesky_lower(&mut h, n).map_err(|j| n - 1 - j)?;
    let v = lower_inverse_columns(&h, n);
    drop(h);
    // U[a][b] = V[n-1-a][n-1-b] for a <= b; V[i][c] = v[c][i - c].
    let mut u = vec![0.0f64; n * n];
    for (a, row) in u.chunks_exact_mut(n.max(1)).enumerate().take(n) {
        let i = n - 1 - a;
        for (b, x) in row.iter_mut().enumerate().skip(a) {
            let c = n - 1 - b;
            *x = v[c][i - c];
        }
    }
    Ok(u)
}

/// `Σ_r d_rᵀ·G·d_r` for `rows` residual rows of length `n` (row-major `d`, f64) against a
/// symmetric row-major `n × n` `g`, reading its diagonal and upper triangle:
/// `dᵀGd = Σᵢ dᵢ·(Gᵢᵢdᵢ + 2·Σ_{j>i} Gᵢⱼdⱼ)`, the inner sums by [`dot`] and the outer one in `i`
/// order. Returns one value per row, each computed by the same operations whichever thread runs
/// it.
pub(crate) fn quadratic_forms(d: &[f64], rows: usize, n: usize, g: &[f64]) -> Vec<f64> {
    /// Rows sharing one pass over `g` (each row of `g` is loaded once per tile).
    const TILE: usize = 8;
    if n == 0 {
        return vec![0.0; rows];
    }
    let tile = |rows_d: &[f64]| -> Vec<f64> {
        let mut total = vec![0.0f64; rows_d.len() / n];
        for i in 0..n {
            let gi = &g[i * n..(i + 1) * n];
            for (tk, dk) in total.iter_mut().zip(rows_d.chunks_exact(n)) {
                let di = dk[i];
                *tk += di * (gi[i] * di + 2.0 * dot(&gi[i + 1..], &dk[i + 1..]));
            }
        }
        total
    };
    let chunks = d[..rows * n].par_chunks(TILE * n);
    let per_tile: Vec<Vec<f64>> = chunks.map(tile).collect();
    per_tile.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spd(n: usize) -> Vec<f64> {
        // A = B·Bᵀ + n·I for a fixed B.
        let b: Vec<f64> = (0..n * n)
            .map(|i| ((i * 7919 % 97) as f64 - 48.0) / 50.0)
            .collect();
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = dot(&b[i * n..(i + 1) * n], &b[j * n..(j + 1) * n]);
            }
            a[i * n + i] += n as f64;
        }
        a
    }

    #[test]
    fn cholesky_reconstructs() {
        for n in [1, 3, 70] {
            let a = spd(n);
            let mut l = a.clone();
            cholesky_lower(&mut l, n).unwrap();
            for i in 0..n {
                for j in 0..n {
                    let v = dot(&l[i * n..i * n + n], &l[j * n..j * n + n]);
                    assert!(
                        (v - a[i * n + j]).abs() < 1e-9 * a[i * n + i],
                        "{n} {i} {j}"
                    );
                }
            }
        }
    }

    #[test]
    fn upper_factor_of_inverse() {
        for n in [1, 2, 5, 67] {
            let h = spd(n);
            let u = upper_cholesky_of_inverse(h.clone(), n).unwrap();
            // Upper triangular with positive diagonal.
            for a in 0..n {
                assert!(u[a * n + a] > 0.0);
                for b in 0..a {
                    assert_eq!(u[a * n + b], 0.0);
                }
            }
            // (UᵀU)·H = I.
            let mut hinv = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    hinv[i * n + j] = (0..n).map(|k| u[k * n + i] * u[k * n + j]).sum();
                }
            }
            for i in 0..n {
                for j in 0..n {
                    let v: f64 = (0..n).map(|k| hinv[i * n + k] * h[k * n + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-9, "{n}: ({i},{j}) = {v}");
                }
            }
        }
    }

    #[test]
    fn not_positive_definite_reports_a_column() {
        let h = [1.0, 2.0, 2.0, 1.0];
        assert!(upper_cholesky_of_inverse(h.to_vec(), 2).is_err());
        let mut l = [1.0, 0.0, 0.0, f64::NAN];
        assert_eq!(cholesky_lower(&mut l, 2), Err(1));
    }

    #[test]
    fn quadratic_form_matches_definition() {
        let n = 13;
        let g = spd(n);
        let d: Vec<f64> = (0..3 * n).map(|i| (i as f64 * 0.37).sin()).collect();
        let got = quadratic_forms(&d, 3, n, &g);
        for r in 0..3 {
            let dr = &d[r * n..(r + 1) * n];
            let want: f64 = (0..n)
                .map(|i| dr[i] * (0..n).map(|j| g[i * n + j] * dr[j]).sum::<f64>())
                .sum();
            assert!(
                (got[r] - want).abs() < 1e-9 * want.abs(),
                "{} {}",
                got[r],
                want
            );
        }
    }
}
