//! Cost of the calibration-aware quantizers (`kiln_quant::methods`) in seconds per million
//! weights, on rayon pools of 1 and 2 threads.
//!
//! A deterministic 1024 × 1024 layer: Student-t weights (ν = 5) and a Gram matrix `XᵀX` from
//! 2048 synthetic input rows with correlated columns and outlier channels (as in
//! `tests/methods.rs`). Cases: GPTQ (block 128, 4-bit symmetric groups of 128, with and without
//! act_order), LSQ (the default 200 iterations), AWQ (grid 20 with the clipping search) and RTN
//! for scale. Each case checks that both pools give the same result, and prints the output error
//! reduction against RTN min–max next to the time.
//!
//! Run with `cargo bench -p kiln-quant --bench methods` (`KILN_BENCH_RUNS` sets the runs per
//! case, default 1; the best run is reported). Next to wall-clock time the bench prints the
//! process CPU time per million weights (Linux, from `/proc/self/stat`), which stays meaningful
//! on a machine shared with other work: on one thread it is the cost itself, on two it is the
//! total work, so it shows the parallel overhead.

// A benchmark's job is to print.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use kiln_quant::affine::{Granularity, QuantScheme};
use kiln_quant::estimators::Estimator;
use kiln_quant::methods::{
    quantize_affine, AwqConfig, Calibration, GptqConfig, LsqConfig, Method, MethodResult,
};

const ROWS: usize = 1024;
const COLS: usize = 1024;
const SAMPLES: usize = 2048;

/// xorshift64* with Box–Muller Gaussians.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn gaussian(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Process CPU time (user + system) in seconds, from `/proc/self/stat` (clock ticks of 1/100 s,
/// Linux's `USER_HZ`); `None` where that file does not exist.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is parenthesized and may contain spaces; count after it.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are utime and stime: 11 and 12 after the name.
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// Weights, Gram matrix and mean |x| of the synthetic layer.
fn layer() -> (Vec<f32>, Vec<f64>, Vec<f32>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let w: Vec<f32> = (0..ROWS * COLS)
        .map(|_| {
            let z = rng.gaussian();
            let chi2: f64 = (0..5).map(|_| rng.gaussian().powi(2)).sum();
            (0.02 * z / (chi2 / 5.0).sqrt()) as f32
        })
        .collect();
    const RANK: usize = 16;
    let loadings: Vec<f64> = (0..RANK * COLS).map(|_| 0.5 * rng.gaussian()).collect();
    let channel: Vec<f64> = (0..COLS)
        .map(|j| (0.5 * rng.gaussian()).exp() * if j % 64 == 17 { 25.0 } else { 1.0 })
        .collect();
    let mut gram = vec![0.0f64; COLS * COLS];
    let mut abs = vec![0.0f64; COLS];
    let mut x = vec![0.0f64; COLS];
    for _ in 0..SAMPLES {
        let f: Vec<f64> = (0..RANK).map(|_| rng.gaussian()).collect();
        for (j, xj) in x.iter_mut().enumerate() {
            let shared: f64 = (0..RANK).map(|k| f[k] * loadings[k * COLS + j]).sum();
            *xj = channel[j] * (shared + rng.gaussian());
        }
        for (i, &xi) in x.iter().enumerate() {
            abs[i] += xi.abs();
            for (g, &xj) in gram[i * COLS + i..(i + 1) * COLS].iter_mut().zip(&x[i..]) {
                *g += xi * xj;
            }
        }
    }
    for i in 0..COLS {
        for j in 0..i {
            gram[i * COLS + j] = gram[j * COLS + i];
        }
    }
    let act = abs.iter().map(|&s| (s / SAMPLES as f64) as f32).collect();
    (w, gram, act)
}

fn main() {
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let t = Instant::now();
    let (w, gram, act) = layer();
    println!(
        "{ROWS} x {COLS} layer, Gram from {SAMPLES} rows (built in {:.1} s), {runs} run(s) per case",
        t.elapsed().as_secs_f64()
    );
    let calib = Calibration {
        gram: &gram,
        n: SAMPLES as u64,
        act_abs_mean: Some(&act),
    };
    let scheme = QuantScheme::new(4, true, Granularity::Group(128)).expect("scheme");
    let cases = [
        (
            "rtn",
            Method::Rtn {
                estimator: Estimator::MinMax,
            },
        ),
        ("gptq", Method::Gptq(GptqConfig::default())),
        (
            "gptq act_order",
            Method::Gptq(GptqConfig {
                act_order: true,
                ..GptqConfig::default()
            }),
        ),
        ("lsq (200 it)", Method::Lsq(LsqConfig::default())),
        ("awq", Method::Awq(AwqConfig::default())),
    ];
    let mweights = (ROWS * COLS) as f64 / 1e6;
    println!(
        "{:16} {:>7} {:>12} {:>14} {:>10}",
        "method", "threads", "s/Mweights", "cpu s/Mweights", "reduction"
    );
    for (name, method) in &cases {
        let mut first: Option<MethodResult> = None;
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut best = f64::INFINITY;
            let mut best_cpu = f64::INFINITY;
            for _ in 0..runs {
                let t = Instant::now();
                let c = cpu_seconds();
                let r = pool
                    .install(|| quantize_affine(method, &w, ROWS, COLS, &scheme, Some(&calib)))
                    .expect("quantize");
                best = best.min(t.elapsed().as_secs_f64());
                if let (Some(a), Some(b)) = (c, cpu_seconds()) {
                    best_cpu = best_cpu.min(b - a);
                }
                match &first {
                    Some(f) => assert_eq!(f, &r, "{name}: result depends on the thread count"),
                    None => first = Some(r),
                }
            }
            let reduction = first
                .as_ref()
                .and_then(MethodResult::reduction)
                .unwrap_or(0.0);
            println!(
                "{:16} {:>7} {:>12.3} {:>14.3} {:>9.1}%",
                name,
                threads,
                best / mweights,
                best_cpu / mweights,
                100.0 * reduction
            );
        }
    }
}
