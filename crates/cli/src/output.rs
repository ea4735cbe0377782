//! Everything kiln prints. The only module allowed to write to stdout and stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use kiln_pipeline::{meta_to_json, BuildPlan, Inspection, PipelineError, Report, WeightMethod};
use std::fmt::Write as _;
use std::io::Write as _;

use kiln_types::MetaValue;
use serde_json::json;

/// `writeln!` into a `String` (which cannot fail).
macro_rules! outln {
    ($o:expr, $($arg:tt)*) => {{
        let _ = writeln!($o, $($arg)*);
    }};
}

/// Writes to stdout; a closed pipe (`kiln inspect x | head`) ends the output quietly.
fn emit(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write output: {e}");
        }
    }
}

/// Errors print as one line: each error's message already includes its cause's.
pub(crate) fn error(e: &PipelineError) {
    eprintln!("error: {e}");
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

fn shape(ne: &[u64]) -> String {
    ne.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join("×")
}

pub(crate) fn plan(plan: &BuildPlan, as_json: bool) {
    let mut o = String::new();
    if as_json {
        let tensors: Vec<_> = plan
            .tensors
            .iter()
            .map(|t| {
                json!({
                    "name": t.name,
                    "source": t.source_name,
                    "layer": t.layer,
                    "source_type": t.source_type.to_string(),
                    "shape": t.ne,
                    "type": t.ty.to_string(),
                    "decision": t.decision.to_string(),
                    "method": t.method.to_string(),
                    "bytes": t.nbytes,
                })
            })
            .collect();
        let out = json!({
            "input": plan.input,
            "output": plan.output,
            "architecture": plan.arch,
            "file_type": plan.file_type.name,
            "parameters": plan.parameters(),
            "tensor_bytes": plan.tensor_bytes(),
            "tensors": tensors,
        });
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(&out).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    outln!(o, "input:  {}", plan.input.display());
    outln!(o, "output: {}", plan.output.display());
    outln!(
        o,
        "architecture {}, file type {}, {} tensors, {} parameters",
        plan.arch,
        plan.file_type.name,
        plan.tensors.len(),
        plan.parameters()
    );
    let name_w = plan
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let shape_w = plan
        .tensors
        .iter()
        .map(|t| shape(&t.ne).len())
        .max()
        .unwrap_or(5)
        .max(5);
    outln!(
        o,
        "{:>4}  {:name_w$}  {:shape_w$}  {:5} → {:7}  {:>10}  rule",
        "#",
        "tensor",
        "shape",
        "from",
        "type",
        "size"
    );
    for (i, t) in plan.tensors.iter().enumerate() {
        let method = match &t.method {
            WeightMethod::Kernel => String::new(),
            other => format!("; {other}"),
        };
        outln!(
            o,
            "{:>4}  {:name_w$}  {:shape_w$}  {:5} → {:7}  {:>10}  {}{method}",
            i,
            t.name,
            shape(&t.ne),
            t.source_type.to_string(),
            t.ty.to_string(),
            human_bytes(t.nbytes),
            t.decision
        );
    }
    let bpw = plan.tensor_bytes() as f64 * 8.0 / plan.parameters().max(1) as f64;
    outln!(
        o,
        "total: {} of tensor data, {:.3} bits per weight",
        human_bytes(plan.tensor_bytes()),
        bpw
    );
    emit(&o);
}

pub(crate) fn report(report: &Report, as_json: bool, quiet: bool) {
    let mut o = String::new();
    if as_json {
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    if quiet {
        emit(&o);
        return;
    }
    outln!(
        o,
        "wrote {} ({}, {} tensors, {} parameters, {:.3} bpw, file type {})",
        report.output.display(),
        human_bytes(report.file_bytes),
        report.tensors.len(),
        report.parameters,
        report.bpw,
        report.file_type
    );
    outln!(
        o,
        "xxh3 {}  in {:.2} s on {} threads ({:.1} M parameters/s)",
        report.file_xxh3,
        report.seconds,
        report.threads,
        report.parameters as f64 / report.seconds.max(1e-9) / 1e6
    );
    // Per output type: how much of the model it holds and how far it is from the source.
    #[derive(Default)]
    struct TypeSummary {
        tensors: usize,
        parameters: u64,
        bytes: u64,
        squared: f64,
        weighted: Option<(f64, f64)>,
    }
    let mut by_type: std::collections::BTreeMap<&str, TypeSummary> = Default::default();
    for t in &report.tensors {
        let n: u64 = t.shape.iter().product();
        let e = by_type.entry(t.ty.as_str()).or_default();
        e.tensors += 1;
        e.parameters += n;
        e.bytes += t.bytes;
        e.squared += t.rmse * t.rmse * n as f64;
        if let Some(w) = t.weighted_rmse {
            let acc = e.weighted.get_or_insert((0.0, 0.0));
            acc.0 += w * w * n as f64;
            acc.1 += n as f64;
        }
    }
    outln!(
        o,
        "{:8} {:>8} {:>14} {:>7} {:>12} {:>14}",
        "type",
        "tensors",
        "parameters",
        "bpw",
        "rmse",
        "weighted rmse"
    );
    for (ty, e) in by_type {
        let weighted = e
            .weighted
            .map(|(w, m)| format!("{:.3e}", (w / m.max(1.0)).sqrt()))
            .unwrap_or_else(|| "-".into());
        outln!(
            o,
            "{ty:8} {:>8} {:>14} {:>7.3} {:>12.3e} {weighted:>14}",
            e.tensors,
            e.parameters,
            e.bytes as f64 * 8.0 / e.parameters.max(1) as f64,
            (e.squared / e.parameters.max(1) as f64).sqrt()
        );
    }
    outln!(
        o,
        "overall rmse {:.3e} ({:.3} bpw); per-tensor figures: --json",
        report.rmse,
        report.bpw
    );
    if let Some((n, ratio)) = report.mean_output_error_ratio() {
        outln!(
            o,
            "gptq on {n} tensors: mean output error on calibration data {:.1}% of the kernel's rounding",
            100.0 * ratio
        );
    }
    emit(&o);
}

fn meta_line(v: &MetaValue, full: bool) -> String {
    if full {
        if let MetaValue::Array(_) = v {
            return meta_to_json(v).to_string();
        }
    }
    v.to_string()
}

pub(crate) fn packed_report(report: &kiln_pipeline::PackedReport, as_json: bool, quiet: bool) {
    let mut o = String::new();
    if as_json {
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    if quiet {
        return;
    }
    let name_w = report
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0);
    outln!(
        o,
        "  {:name_w$}  {:6}  {:6}  {:>12}  {:>12}  {:>10}",
        "tensor",
        "stored",
        "method",
        "out.err RTN",
        "out.err now",
        "w.rmse"
    );
    let num = |x: Option<f64>| x.map(|v| format!("{v:.4e}")).unwrap_or_else(|| "-".into());
    for t in &report.tensors {
        outln!(
            o,
            "  {:name_w$}  {:6}  {:6}  {:>12}  {:>12}  {:>10}",
            t.name,
            t.stored_as,
            t.method.as_deref().unwrap_or("-"),
            num(t.output_error_before),
            num(t.output_error_after),
            num(t.weight_rmse_after)
        );
    }
    let ratio = report
        .mean_error_ratio()
        .map(|r| format!("; mean output error {:.1}% of round-to-nearest", 100.0 * r))
        .unwrap_or_default();
    outln!(
        o,
        "wrote {} ({}, {} in {} file(s)){ratio}",
        report.output.display(),
        report.format,
        human_bytes(report.tensor_bytes),
        report.files.len()
    );
    if let Some(m) = &report.manifest {
        outln!(o, "manifest {}", m.display());
    }
    emit(&o);
}

pub(crate) fn inspection(ins: &Inspection, as_json: bool, full: bool) {
    let mut o = String::new();
    if as_json {
        let mut value = serde_json::to_value(ins).unwrap_or_default();
        let metadata: serde_json::Map<String, serde_json::Value> = ins
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    json!({"type": v.value_type().name(), "value": meta_to_json(v)}),
                )
            })
            .collect();
        value["metadata"] = serde_json::Value::Object(metadata);
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    outln!(o, "{} ({})", ins.path.display(), ins.format);
    if let (Some(v), Some(a)) = (ins.version, ins.alignment) {
        outln!(o, "GGUF v{v}, alignment {a}");
    }
    if let Some(model) = &ins.model {
        let verdict = if model.convertible() {
            "kiln can convert this checkpoint"
        } else {
            "kiln cannot convert this checkpoint as it is"
        };
        outln!(o, "model ({verdict}):");
        outln!(o, "{model}");
    }
    if !ins.metadata.is_empty() {
        outln!(o, "metadata ({} keys):", ins.metadata.len());
        let key_w = ins.metadata.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (k, v) in &ins.metadata {
            outln!(
                o,
                "  {k:key_w$}  {:6}  {}",
                v.value_type().name(),
                meta_line(v, full)
            );
        }
    }
    outln!(
        o,
        "tensors ({}, {} parameters):",
        ins.tensors.len(),
        ins.parameters
    );
    let name_w = ins.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &ins.tensors {
        let size = t.bytes.map(human_bytes).unwrap_or_else(|| "?".into());
        let file = t
            .file
            .as_deref()
            .map(|f| format!("  {f}"))
            .unwrap_or_default();
        outln!(
            o,
            "  {:name_w$}  {:8}  {:>16}  {:>10}{}",
            t.name,
            t.ty,
            shape(&t.shape),
            size,
            file
        );
    }
    emit(&o);
}

pub(crate) fn verify(
    artifact: &std::path::Path,
    report: &kiln_pipeline::verify::VerifyReport,
    as_json: bool,
) {
    let mut o = String::new();
    if as_json {
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    use kiln_pipeline::verify::VerifyFailure as F;
    for f in &report.failures {
        match f {
            F::MissingFile { file } => outln!(o, "MISSING   {file}"),
            F::SizeMismatch {
                file,
                expected,
                actual,
            } => {
                outln!(
                    o,
                    "SIZE      {file}: {actual} bytes, expected {expected}{}",
                    if actual < expected {
                        " (truncated)"
                    } else {
                        ""
                    }
                )
            }
            F::HeaderMismatch { file, .. } => {
                outln!(o, "HEADER    {file}: metadata or tensor infos differ")
            }
            F::TensorMismatch {
                file,
                tensor,
                start,
                end,
                actual,
                ..
            } => outln!(
                o,
                "TENSOR    {file}: {tensor} bytes {start}..{end} {}",
                if actual == "missing" {
                    "are past the end of the file"
                } else {
                    "differ"
                }
            ),
            F::FileMismatch { file, .. } => outln!(o, "FILE      {file}: whole-file hash differs"),
            F::RecipeMismatch {
                file,
                expected,
                actual,
            } => {
                outln!(
                    o,
                    "RECIPE    {file}: kiln.recipe.xxh3 is {actual}, manifest says {expected}"
                )
            }
            F::InputMismatch { input, actual, .. } => outln!(
                o,
                "INPUT     {input}: {}",
                if actual == "missing" {
                    "not read by the rebuild"
                } else {
                    "differs from the recorded input"
                }
            ),
        }
    }
    outln!(
        o,
        "{}: {} ({} file(s), {} tensors checked{})",
        artifact.display(),
        if report.ok { "OK" } else { "FAILED" },
        report.files,
        report.tensors,
        if report.rebuilt {
            ", rebuilt and compared byte for byte"
        } else {
            ""
        }
    );
    emit(&o);
}

pub(crate) fn diff(report: &kiln_pipeline::diff::DiffReport, as_json: bool) {
    let mut o = String::new();
    if as_json {
        outln!(
            o,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        emit(&o);
        return;
    }
    let m = &report.metadata;
    for e in &m.only_in_a {
        outln!(o, "- {} ({}) = {}", e.key, e.ty, e.value);
    }
    for e in &m.only_in_b {
        outln!(o, "+ {} ({}) = {}", e.key, e.ty, e.value);
    }
    for c in &m.changed {
        outln!(
            o,
            "~ {}: ({}) {} -> ({}) {}",
            c.key,
            c.type_a,
            c.value_a,
            c.type_b,
            c.value_b
        );
    }
    let t = &report.tensors;
    for x in &t.only_in_a {
        outln!(o, "- tensor {} {} {}", x.name, x.ty, shape(&x.shape));
    }
    for x in &t.only_in_b {
        outln!(o, "+ tensor {} {} {}", x.name, x.ty, shape(&x.shape));
    }
    let name_w = t
        .common
        .iter()
        .map(|x| x.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let changed: Vec<_> = t.common.iter().filter(|x| !x.identical).collect();
    if !changed.is_empty() {
        outln!(
            o,
            "{:name_w$}  {:>15}  {:>12}  {:>12}  {:>10}",
            "tensor",
            "types",
            "max |d|",
            "rmse",
            "rel rmse"
        );
        for x in changed {
            let types = if x.type_a == x.type_b {
                x.type_a.clone()
            } else {
                format!("{}>{}", x.type_a, x.type_b)
            };
            match &x.numeric {
                Some(n) => outln!(
                    o,
                    "{:name_w$}  {types:>15}  {:>12.4e}  {:>12.4e}  {:>10}",
                    x.name,
                    n.max_abs,
                    n.rmse,
                    n.relative_rmse
                        .map(|r| format!("{r:.3e}"))
                        .unwrap_or_else(|| "-".into())
                ),
                None => outln!(
                    o,
                    "{:name_w$}  {types:>15}  bytes differ (no numeric comparison)",
                    x.name
                ),
            }
        }
    }
    let s = &report.summary;
    outln!(
        o,
        "{}: metadata +{} -{} ~{}; tensors +{} -{}, {} of {} identical",
        if report.identical {
            "identical"
        } else {
            "different"
        },
        s.metadata_only_in_b,
        s.metadata_only_in_a,
        s.metadata_changed,
        s.tensors_only_in_b,
        s.tensors_only_in_a,
        s.tensors_identical,
        s.tensors_common
    );
    emit(&o);
}
