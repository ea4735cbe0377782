//! Quantization throughput per type, single-threaded and on all cores.
//!
//! For each type, quantizes a deterministic 2048 × 4096 matrix (8.4M elements, values roughly
//! normal with a few outlier columns, like real weights) row by row, with and without an
//! importance matrix for the types that use one, and prints the best and median of several runs in
//! elements per second. Multi-threaded runs split the rows across `std::thread::available_parallelism`
//! scoped threads; the output is identical whatever the split (checked here too).
//! Run with `cargo bench -p kiln-quant --bench quantize` (`KILN_BENCH_RUNS` sets the run count).

// A benchmark's job is to print.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::time::Instant;

use kiln_types::GgmlType;

const ROWS: usize = 2048;
const COLS: usize = 4096;

fn data() -> Vec<f32> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..ROWS * COLS)
        .map(|i| {
            // Sum of four uniforms ≈ normal; every 97th column is an outlier channel.
            let v = (next() + next() + next() + next() - 2.0) * 0.02;
            if (i % COLS) % 97 == 0 {
                v * 20.0
            } else {
                v
            }
        })
        .collect()
}

fn quantize(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>, threads: usize) -> Vec<u8> {
    let row_bytes = kiln_quant::kernel(ty)
        .expect("kernel")
        .row_bytes(COLS)
        .expect("row");
    let mut out = vec![0u8; row_bytes * ROWS];
    let rows_per_thread = ROWS.div_ceil(threads);
    std::thread::scope(|s| {
        for (src, dst) in x
            .chunks(rows_per_thread * COLS)
            .zip(out.chunks_mut(rows_per_thread * row_bytes))
        {
            s.spawn(move || {
                kiln_quant::quantize_rows(ty, src, COLS, imatrix, dst).expect("quantize")
            });
        }
    });
    out
}

fn main() {
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let x = data();
    let imatrix: Vec<f32> = (0..COLS).map(|j| 1.0 + (j % 7) as f32).collect();
    println!("{ROWS} x {COLS} f32 matrix, {runs} runs per case, {all} cores");
    println!(
        "{:8} {:8} {:>7} {:>14} {:>14}",
        "type", "imatrix", "threads", "best Melem/s", "median Melem/s"
    );
    for ty in [
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_XS,
    ] {
        let uses = kiln_quant::kernel(ty).expect("kernel").uses_imatrix;
        for weights in [None, Some(imatrix.as_slice())] {
            if weights.is_some() && !uses {
                continue;
            }
            let reference = quantize(ty, &x, weights, 1);
            for threads in [1, all] {
                let mut times = Vec::with_capacity(runs);
                for _ in 0..runs {
                    let t = Instant::now();
                    let out = quantize(ty, &x, weights, threads);
                    times.push(t.elapsed().as_secs_f64());
                    assert!(out == reference, "{ty}: output depends on the thread count");
                }
                times.sort_by(f64::total_cmp);
                let rate = |s: f64| (ROWS * COLS) as f64 / s / 1e6;
                println!(
                    "{:8} {:8} {:>7} {:>14.1} {:>14.1}",
                    ty.name(),
                    if weights.is_some() { "yes" } else { "no" },
                    threads,
                    rate(times[0]),
                    rate(times[times.len() / 2])
                );
            }
        }
    }
}
