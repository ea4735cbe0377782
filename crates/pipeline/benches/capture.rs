//! Benchmark: activation-capture throughput (tokens/s) on the tiny-llama fixture.
//!
//! Runs `kiln_pipeline::calibrate::calibrate` (the code path of `kiln calibrate`) on
//! `fixtures/tiny-llama` over the committed tokens of the golden calibration text
//! (`fixtures/calib/tiny-llama-calib.tokens`), 30 chunks of 128 tokens (llama-imatrix's
//! `-c 128 --chunks 30`, as the golden imatrix was made), with and without Gram matrices, on 1
//! thread and on all cores, `KILN_BENCH_RUNS` times each (default 3). Reported: best and median
//! wall time of the whole call (opening the checkpoint, decoding the bf16 weights, the forward
//! passes, the statistics) and tokens/s; and whether the serialized statistics of every
//! configuration are byte-identical across thread counts.
//!
//! Run with `cargo bench -p kiln-pipeline --bench capture`.

// A benchmark's whole job is to print its measurements.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::Path;
use std::time::Instant;

use kiln_pipeline::calibrate::{calibrate, CalibrateOptions};
use kiln_pipeline::MmapAccess;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let checkpoint = root.join("fixtures/tiny-llama");
    let tokens = root.join("fixtures/calib/tiny-llama-calib.tokens");
    // SAFETY: the fixture files are part of the repository and nothing modifies them while the
    // benchmark maps them.
    #[allow(unsafe_code)]
    let access = unsafe { MmapAccess::new() };
    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(3);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1, cores.max(2)];
    thread_counts.dedup();

    println!(
        "capture: tiny-llama (6 layers, hidden 256, ffn 512), 30 chunks x 128 tokens, {runs} runs each"
    );
    println!(
        "{:<10} {:>7} {:>8} {:>9} {:>12} {:>12}",
        "gram", "threads", "best s", "median s", "best tok/s", "median tok/s"
    );
    for gram in [true, false] {
        let mut reference: Option<Vec<u8>> = None;
        let mut identical = true;
        for &threads in &thread_counts {
            let options = CalibrateOptions {
                n_ctx: 128,
                chunks: Some(30),
                gram,
                histogram: None,
                threads: Some(threads),
            };
            let mut times = Vec::with_capacity(runs);
            let mut tokens_done = 0;
            for _ in 0..runs {
                let started = Instant::now();
                let stats = calibrate(&access, &checkpoint, &tokens, &options)?;
                times.push(started.elapsed().as_secs_f64());
                tokens_done = stats.chunk_count as usize * 128;
                let bytes = stats.to_safetensors()?;
                match &reference {
                    None => reference = Some(bytes),
                    Some(r) => identical &= *r == bytes,
                }
            }
            times.sort_by(f64::total_cmp);
            let (best, median) = (times[0], times[times.len() / 2]);
            println!(
                "{:<10} {:>7} {:>8.3} {:>9.3} {:>12.0} {:>12.0}",
                if gram { "with" } else { "without" },
                threads,
                best,
                median,
                tokens_done as f64 / best,
                tokens_done as f64 / median,
            );
        }
        println!(
            "  statistics {} across thread counts",
            if identical {
                "byte-identical"
            } else {
                "DIFFER"
            }
        );
    }
    Ok(())
}
