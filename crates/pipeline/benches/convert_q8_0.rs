//! Benchmark: converting generated bf16 Llama checkpoints (100M+ parameters) to Q8_0.
//!
//! Three checkpoints are generated once per invocation into a temporary folder (`TMPDIR`), with
//! deterministic values (xorshift64 seeded from each tensor's name), in two shards with an index,
//! as Hugging Face publishes them:
//!
//! - `small`: 4 layers, ~113M parameters. Its largest tensors are the embedding and the LM head,
//!   `[32000, 1024]` (62.5 MiB of bf16 each).
//! - `deep`: 12 layers, ~207M parameters, the same largest tensor. The checkpoint is 1.8× larger;
//!   if peak memory follows the largest tensor, the peak stays about the same.
//! - `wide-vocab`: 4 layers with a 64000-row vocabulary, ~178M parameters: a largest tensor twice
//!   as big (125 MiB of bf16). The contrast: here the peak should rise by about that difference.
//!
//! Each is converted with `threads = 1` and `threads = all cores`, `KILN_BENCH_RUNS` times each
//! (default 5), through the library API (`plan` + `build`), exactly as `kiln convert --type q8_0`
//! would. Every conversion runs in a fresh child process (this executable, re-run with
//! `KILN_BENCH_CHILD=1`), so heap the allocator kept from an earlier run can neither hide nor
//! inflate a later run's peak. Reported: throughput in parameters/s and input MB/s (best and
//! median of the runs; wall time of `plan` + `build`), the output file's size, and peak memory:
//! Linux `VmHWM` from `/proc/self/status`, reset right before the conversion by writing `5` to
//! `/proc/self/clear_refs`, next to the resident set just before it (the baseline), so that
//! `peak − baseline` is what the conversion added. File-backed pages of the memory-mapped
//! checkpoint count in RSS; kiln drops each tensor's pages (`MADV_DONTNEED`) once it is written,
//! which is why the peak follows the largest tensor and not the checkpoint.
//!
//! The input files were just written, so they are in the page cache: this measures conversion,
//! not disk reads. Run with `cargo bench -p kiln-pipeline --bench convert_q8_0`.

// A benchmark's whole job is to print its measurements.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use kiln_pipeline::{build, plan, BuildOptions, MmapAccess, Overrides, Recipe, TypeChoice};
use kiln_types::GgmlType;

const HIDDEN: usize = 1024;
const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 64;
const FFN: usize = 2816;

const MIB: f64 = 1024.0 * 1024.0;
const MB: f64 = 1e6;

type Error = Box<dyn std::error::Error>;

/// The shape of one generated checkpoint.
struct ModelSpec {
    label: &'static str,
    layers: usize,
    vocab: usize,
}

/// One tensor of a generated checkpoint.
struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    /// Norm weights are centred on 1, projections on 0.
    is_norm: bool,
}

impl TensorSpec {
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.elements() * 2
    }
}

impl ModelSpec {
    /// The checkpoint's tensors, split into two shards: the embedding and the first half of the
    /// layers, then the rest of the layers, the final norm and the LM head. Each shard is sorted
    /// by name, as `safetensors` writes them.
    fn shards(&self) -> [Vec<TensorSpec>; 2] {
        let t = |name: String, shape: Vec<usize>| TensorSpec {
            is_norm: name.ends_with("norm.weight"),
            name,
            shape,
        };
        let mut shards: [Vec<TensorSpec>; 2] = [Vec::new(), Vec::new()];
        shards[0].push(t(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, HIDDEN],
        ));
        for i in 0..self.layers {
            let shard = &mut shards[usize::from(i >= self.layers / 2)];
            let p = format!("model.layers.{i}");
            shard.push(t(format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
            shard.push(t(
                format!("{p}.post_attention_layernorm.weight"),
                vec![HIDDEN],
            ));
            shard.push(t(
                format!("{p}.self_attn.q_proj.weight"),
                vec![HEADS * HEAD_DIM, HIDDEN],
            ));
            shard.push(t(
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ));
            shard.push(t(
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ));
            shard.push(t(
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HEADS * HEAD_DIM],
            ));
            shard.push(t(format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
            shard.push(t(format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
            shard.push(t(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
        }
        shards[1].push(t("model.norm.weight".into(), vec![HIDDEN]));
        shards[1].push(t("lm_head.weight".into(), vec![self.vocab, HIDDEN]));
        for shard in &mut shards {
            shard.sort_by(|a, b| a.name.cmp(&b.name));
        }
        shards
    }
}

/// What was generated, for the report.
struct Generated {
    dir: PathBuf,
    parameters: u64,
    checkpoint_bytes: u64,
    largest_tensor: String,
    largest_tensor_bytes: u64,
}

/// xorshift64: deterministic, fast, good enough for weights nobody reads.
struct XorShift64(u64);

impl XorShift64 {
    /// Seeded from a tensor name (FNV-1a), so every tensor has its own reproducible stream.
    fn for_tensor(name: &str) -> XorShift64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        XorShift64(h | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Roughly normal with mean 0 and standard deviation 1: the sum of four uniform 16-bit
    /// draws taken from one 64-bit output (Irwin–Hall with n = 4, rescaled).
    fn normalish(&mut self) -> f32 {
        let x = self.next();
        let sum: u64 = (0..4).map(|i| (x >> (16 * i)) & 0xffff).sum();
        // Each draw is uniform on [0, 1) with variance 1/12, so the sum has mean 2, variance 1/3.
        ((sum as f32 / 65536.0) - 2.0) * 3.0f32.sqrt()
    }
}

/// f32 → bf16 bits, round to nearest even (no NaNs are generated).
fn bf16_bits(v: f32) -> u16 {
    let bits = v.to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Writes one safetensors shard without holding it in memory: the JSON header first (its offsets
/// follow from the shapes alone), then each tensor's bytes in 1 MiB chunks.
fn write_shard(path: &Path, tensors: &[TensorSpec]) -> Result<(), Error> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in tensors {
        header.insert(
            t.name.clone(),
            serde_json::json!({
                "dtype": "BF16",
                "shape": t.shape,
                "data_offsets": [offset, offset + t.bytes()],
            }),
        );
        offset += t.bytes();
    }
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut json = serde_json::to_string(&header)?;
    // The data section starts 8-byte aligned; trailing spaces are valid JSON padding.
    while json.len() % 8 != 0 {
        json.push(' ');
    }

    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    out.write_all(&(json.len() as u64).to_le_bytes())?;
    out.write_all(json.as_bytes())?;
    let mut buf = Vec::with_capacity(1 << 20);
    for t in tensors {
        let mut rng = XorShift64::for_tensor(&t.name);
        let (centre, scale) = if t.is_norm { (1.0, 0.02) } else { (0.0, 0.02) };
        let mut left = t.elements();
        while left > 0 {
            let n = left.min(512 * 1024);
            buf.clear();
            for _ in 0..n {
                let v = centre + scale * rng.normalish();
                buf.extend_from_slice(&bf16_bits(v).to_le_bytes());
            }
            out.write_all(&buf)?;
            left -= n;
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// The tiny-llama fixture whose tokenizer the generated checkpoints borrow.
fn tokenizer_source() -> Result<PathBuf, Error> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidates = [
        root.join("fixtures/tiny-llama"),
        root.join("../shared/fixtures/tiny-llama"),
    ];
    candidates
        .iter()
        .find(|p| p.join("tokenizer.model").is_file())
        .cloned()
        .ok_or_else(|| {
            format!(
                "no tiny-llama fixture with tokenizer.model in {}",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            )
            .into()
        })
}

/// Generates a checkpoint folder under `base`.
fn generate(base: &Path, spec: &ModelSpec, tokenizer: &Path) -> Result<Generated, Error> {
    let dir = base.join(spec.label);
    std::fs::create_dir_all(&dir)?;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "dtype": "bfloat16",
        "eos_token_id": 2,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": FFN,
        "max_position_embeddings": 2048,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": KV_HEADS,
        "pad_token_id": null,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_parameters": { "rope_theta": 10000.0, "rope_type": "default" },
        "tie_word_embeddings": false,
        "use_cache": true,
        "vocab_size": spec.vocab,
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for name in ["tokenizer.model", "tokenizer_config.json"] {
        std::fs::copy(tokenizer.join(name), dir.join(name))?;
    }

    let shards = spec.shards();
    let mut weight_map = BTreeMap::new();
    let (mut parameters, mut bytes) = (0u64, 0u64);
    let mut largest = ("", 0usize);
    for (i, tensors) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
        write_shard(&dir.join(&file), tensors)?;
        for t in tensors {
            weight_map.insert(t.name.clone(), file.clone());
            parameters += t.elements() as u64;
            bytes += t.bytes() as u64;
            if t.bytes() > largest.1 {
                largest = (&t.name, t.bytes());
            }
        }
    }
    let index = serde_json::json!({
        "metadata": { "total_parameters": parameters, "total_size": bytes },
        "weight_map": weight_map,
    });
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    Ok(Generated {
        dir,
        parameters,
        checkpoint_bytes: bytes,
        largest_tensor: largest.0.to_owned(),
        largest_tensor_bytes: largest.1 as u64,
    })
}

/// Resets this process's peak resident set (`VmHWM`) to its current size. Linux ≥ 4.0.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `/proc/self/status` field in bytes (`VmHWM`, `VmRSS`).
fn proc_status_bytes(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// One conversion, as measured by the child process that ran it.
struct Run {
    seconds: f64,
    baseline_rss: u64,
    peak_rss: u64,
    peak_reset: bool,
    parameters: u64,
    file_bytes: u64,
    largest_output: String,
    largest_output_bytes: u64,
}

/// Child mode: converts `KILN_BENCH_INPUT` to `KILN_BENCH_OUTPUT` with `KILN_BENCH_THREADS`
/// threads and prints one `RESULT {json}` line. Each conversion runs in a fresh process so that
/// heap kept by the allocator from earlier runs neither hides nor inflates its peak: the figure is
/// what one `kiln convert` process would reach.
fn child(input: &Path, output: &Path, threads: usize) -> Result<(), Error> {
    // SAFETY: the checkpoints live in the parent's private temporary folder, which nothing
    // modifies or truncates while they are mapped.
    #[allow(unsafe_code)]
    let access = unsafe { MmapAccess::new() };
    let recipe = Recipe::plain(TypeChoice::Type(GgmlType::Q8_0)).with_overrides(&Overrides {
        input: Some(input.to_path_buf()),
        output: Some(output.to_path_buf()),
        ..Overrides::default()
    });
    let options = BuildOptions {
        threads: Some(threads),
        ..Default::default()
    };
    let peak_reset = reset_peak_rss();
    let baseline_rss = proc_status_bytes("VmRSS").unwrap_or(0);
    let started = Instant::now();
    let built = plan(&recipe, &access)?;
    let report = build(&built, &options, &())?;
    let seconds = started.elapsed().as_secs_f64();
    let peak_rss = proc_status_bytes("VmHWM").unwrap_or(0);
    let largest = report.tensors.iter().max_by_key(|t| t.bytes);
    let result = serde_json::json!({
        "seconds": seconds,
        "baseline_rss": baseline_rss,
        "peak_rss": peak_rss,
        "peak_reset": peak_reset,
        "parameters": report.parameters,
        "file_bytes": report.file_bytes,
        "largest_output": largest.map(|t| format!("{} ({})", t.name, t.ty)),
        "largest_output_bytes": largest.map_or(0, |t| t.bytes),
    });
    println!("RESULT {result}");
    Ok(())
}

/// Runs one conversion in a child process (this executable in child mode).
fn convert(input: &Path, output: &Path, threads: usize) -> Result<Run, Error> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .env("KILN_BENCH_CHILD", "1")
        .env("KILN_BENCH_INPUT", input)
        .env("KILN_BENCH_OUTPUT", output)
        .env("KILN_BENCH_THREADS", threads.to_string())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("RESULT "));
    let (true, Some(line)) = (out.status.success(), line) else {
        return Err(format!(
            "conversion of {} failed ({}): {}{}",
            input.display(),
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    };
    let v: serde_json::Value = serde_json::from_str(line)?;
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Run {
        seconds: v["seconds"].as_f64().ok_or("child reported no time")?,
        baseline_rss: u("baseline_rss"),
        peak_rss: u("peak_rss"),
        peak_reset: v["peak_reset"].as_bool().unwrap_or(false),
        parameters: u("parameters"),
        file_bytes: u("file_bytes"),
        largest_output: v["largest_output"].as_str().unwrap_or("?").to_owned(),
        largest_output_bytes: u("largest_output_bytes"),
    })
}

/// The runs of one configuration, summarised.
struct Row {
    label: &'static str,
    threads: usize,
    parameters: u64,
    checkpoint_bytes: u64,
    largest_input: u64,
    largest_output: u64,
    best: f64,
    median: f64,
    /// Largest over the runs of each run's own figure.
    baseline_rss: u64,
    peak_rss: u64,
    added_rss: u64,
    file_bytes: u64,
}

fn main() -> Result<(), Error> {
    if std::env::var_os("KILN_BENCH_CHILD").is_some() {
        let var = |k: &str| std::env::var_os(k).ok_or_else(|| format!("{k} is not set"));
        let threads = var("KILN_BENCH_THREADS")?
            .to_str()
            .and_then(|t| t.parse().ok())
            .ok_or("KILN_BENCH_THREADS is not a number")?;
        return child(
            Path::new(&var("KILN_BENCH_INPUT")?),
            Path::new(&var("KILN_BENCH_OUTPUT")?),
            threads,
        );
    }

    let runs: usize = std::env::var("KILN_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(5);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut thread_counts = vec![1, cores];
    thread_counts.dedup();

    let specs = [
        ModelSpec {
            label: "small",
            layers: 4,
            vocab: 32000,
        },
        ModelSpec {
            label: "deep",
            layers: 12,
            vocab: 32000,
        },
        ModelSpec {
            label: "wide-vocab",
            layers: 4,
            vocab: 64000,
        },
    ];
    let tokenizer = tokenizer_source()?;
    let work = tempfile::Builder::new().prefix("kiln-bench-").tempdir()?;
    println!(
        "generating {} checkpoints in {} (tokenizer from {})",
        specs.len(),
        work.path().display(),
        tokenizer.display()
    );
    let mut generated = Vec::new();
    for spec in &specs {
        let started = Instant::now();
        let g = generate(work.path(), spec, &tokenizer)?;
        println!(
            "  {:<10} {:>2} layers, vocab {:>5}: {:>5.1}M parameters, {:>6.1} MiB bf16, largest \
             tensor {} {:.1} MiB ({:.1}s)",
            spec.label,
            spec.layers,
            spec.vocab,
            g.parameters as f64 / 1e6,
            g.checkpoint_bytes as f64 / MIB,
            g.largest_tensor,
            g.largest_tensor_bytes as f64 / MIB,
            started.elapsed().as_secs_f64()
        );
        generated.push(g);
    }

    println!("converting to Q8_0, each run in a fresh process:");
    let mut rows = Vec::new();
    let mut peak_resettable = true;
    for (spec, g) in specs.iter().zip(&generated) {
        let output = work.path().join(format!("{}-q8_0.gguf", spec.label));
        for &threads in &thread_counts {
            let mut results = Vec::with_capacity(runs);
            for run in 0..runs {
                let r = convert(&g.dir, &output, threads)?;
                println!(
                    "  {:<10} threads={threads} run {}/{runs}: {:>6.3}s, {:>6.1}M params/s, \
                     peak RSS {:>6.1} MiB (baseline {:.1} MiB)",
                    spec.label,
                    run + 1,
                    r.seconds,
                    r.parameters as f64 / r.seconds / 1e6,
                    r.peak_rss as f64 / MIB,
                    r.baseline_rss as f64 / MIB,
                );
                peak_resettable &= r.peak_reset;
                results.push(r);
            }
            let mut times: Vec<f64> = results.iter().map(|r| r.seconds).collect();
            times.sort_by(f64::total_cmp);
            let last = results.last().ok_or("no runs")?;
            if threads == thread_counts[0] {
                println!(
                    "  {:<10} output {} = {:.1} MiB; largest output tensor {} = {:.1} MiB",
                    spec.label,
                    output.display(),
                    last.file_bytes as f64 / MIB,
                    last.largest_output,
                    last.largest_output_bytes as f64 / MIB
                );
            }
            let max = |f: fn(&Run) -> u64| results.iter().map(f).max().unwrap_or(0);
            rows.push(Row {
                label: spec.label,
                threads,
                parameters: last.parameters,
                checkpoint_bytes: g.checkpoint_bytes,
                largest_input: g.largest_tensor_bytes,
                largest_output: last.largest_output_bytes,
                best: times[0],
                median: times[times.len() / 2],
                baseline_rss: max(|r| r.baseline_rss),
                peak_rss: max(|r| r.peak_rss),
                added_rss: max(|r| r.peak_rss.saturating_sub(r.baseline_rss)),
                file_bytes: last.file_bytes,
            });
        }
    }
    if !peak_resettable {
        println!(
            "note: cannot write /proc/self/clear_refs; peak RSS figures include the child's \
             start-up before the conversion (small, but not zero)"
        );
    }

    print_tables(&rows, runs, peak_resettable);
    Ok(())
}

fn print_tables(rows: &[Row], runs: usize, peak_resettable: bool) {
    println!();
    println!("== Throughput: bf16 -> Q8_0, {runs} runs each, wall time of plan + build ==");
    println!(
        "{:<10} {:>7} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>8} {:>9}",
        "checkpoint",
        "threads",
        "params",
        "best s",
        "median s",
        "best Mp/s",
        "median Mp/s",
        "best MB/s",
        "med MB/s",
        "out MiB"
    );
    for r in rows {
        let p = r.parameters as f64;
        let b = r.checkpoint_bytes as f64;
        println!(
            "{:<10} {:>7} {:>7.1}M {:>8.3} {:>8.3} {:>10.1} {:>10.1} {:>8.1} {:>8.1} {:>9.1}",
            r.label,
            r.threads,
            p / 1e6,
            r.best,
            r.median,
            p / r.best / 1e6,
            p / r.median / 1e6,
            b / r.best / MB,
            b / r.median / MB,
            r.file_bytes as f64 / MIB,
        );
    }

    println!();
    println!(
        "== Peak memory (VmHWM{}, max over runs), MiB ==",
        if peak_resettable {
            ", reset before each run"
        } else {
            ", NOT reset: includes process start-up"
        }
    );
    println!(
        "{:<10} {:>7} {:>10} {:>13} {:>13} {:>9} {:>9} {:>10} {:>18}",
        "checkpoint",
        "threads",
        "ckpt bf16",
        "largest bf16",
        "largest Q8_0",
        "baseline",
        "peak",
        "peak-base",
        "peak-base-largest"
    );
    for r in rows {
        let added = r.added_rss;
        println!(
            "{:<10} {:>7} {:>10.1} {:>13.1} {:>13.1} {:>9.1} {:>9.1} {:>10.1} {:>18.1}",
            r.label,
            r.threads,
            r.checkpoint_bytes as f64 / MIB,
            r.largest_input as f64 / MIB,
            r.largest_output as f64 / MIB,
            r.baseline_rss as f64 / MIB,
            r.peak_rss as f64 / MIB,
            added as f64 / MIB,
            (added as f64 - r.largest_input as f64) / MIB,
        );
    }

    println!(
        "baseline: RSS of the fresh process just before plan + build; peak-base-largest: what \
         the conversion held beyond the largest tensor's mapped pages (buffers in flight)"
    );

    // The comparison the benchmark exists for: same largest tensor, bigger checkpoint (and the
    // contrast: bigger largest tensor).
    println!();
    for r in rows.iter().filter(|r| r.label != "small") {
        let Some(small) = rows
            .iter()
            .find(|s| s.label == "small" && s.threads == r.threads)
        else {
            continue;
        };
        let added = |x: &Row| x.added_rss as f64 / MIB;
        println!(
            "{} vs small, threads={}: checkpoint {:.2}x, largest tensor {:.2}x, \
             peak-base {:.1} -> {:.1} MiB ({:.2}x), beyond the largest tensor {:.1} -> {:.1} MiB",
            r.label,
            r.threads,
            r.checkpoint_bytes as f64 / small.checkpoint_bytes as f64,
            r.largest_input as f64 / small.largest_input as f64,
            added(small),
            added(r),
            added(r) / added(small).max(f64::MIN_POSITIVE),
            added(small) - small.largest_input as f64 / MIB,
            added(r) - r.largest_input as f64 / MIB,
        );
    }
}
