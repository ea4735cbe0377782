//! compressed-tensors checkpoints: `pack-quantized` (integer weights only, W4A16/W8A16) and
//! `int-quantized` (integer weights with static per-tensor int8 input activations, W8A8).
//!
//! # Tensors per quantized linear layer `P` (weight `P.weight`, shape `(out, in)`)
//!
//! `pack-quantized` (`compressors/pack_quantized/base.py`, `ecosystem.md` §1.3, §9.3):
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `P.weight_packed` | I32 | `(out, ceil(in·b/32))` |
//! | `P.weight_scale` | model dtype | group: `(out, ceil(in/G))`, channel: `(out, 1)`, tensor: `(1,)` |
//! | `P.weight_zero_point` | I32 | `(ceil(out·b/32), groups per row)`; only when asymmetric |
//! | `P.weight_shape` | I64 | `(2,)` = `[out, in]` |
//!
//! Packing (`pack_to_int32`): each signed value is offset by `2^(b-1)` (4-bit `q + 8`) and
//! written as a little-endian bit stream per row, element `i` at bits `[i·b, (i+1)·b)`, rows
//! padded with zero bits to whole int32 words. Zero points, in the same signed domain, are packed
//! the same way along dim 0 (per column of the `(out, groups)` matrix). For 4 and 8 bits, the
//! only widths emitted, compressed-tensors' pre-0.18 (padded) and 0.18+ (dense) layouts are
//! identical. No `weight_g_idx` is written. Asymmetric per-tensor weights are refused:
//! compressed-tensors leaves that zero point unpacked and vLLM runs neither per-tensor variant.
//!
//! `int-quantized` (`compressors/naive_quantized/base.py`, `lifecycle/initialize.py`, §1.4):
//! `P.weight` I8 `(out, in)` holding the signed integers themselves, `P.weight_scale` as above,
//! `P.weight_zero_point` I8 with the scale's shape (asymmetric only), and `P.input_scale` in the
//! model dtype, shape `(1,)` (static per-tensor activation scale; symmetric, so no
//! `input_zero_point`).
//!
//! Dequantization, the one contractual formula: `(q - zp) · scale`, per group of `G` consecutive
//! input columns within a row (the last group of a row may be shorter).
//!
//! # The `quantization_config` block
//!
//! [`quantization_config`] writes exactly the keys of a 0.20-era writer (§1.5): the top level
//! [`QUANTIZATION_CONFIG_KEYS`], each scheme [`SCHEME_KEYS`], each argument block [`ARGS_KEYS`]
//! (the long-stable subset; compressed-tensors' `QuantizationArgs` and `QuantizationScheme` use
//! `extra="forbid"`, so nothing else may appear inside them). Keys are sorted, as
//! `json.dump(..., sort_keys=True)` leaves them.

use serde_json::{Map, Value};

use super::{check_len, elements, encode_scales, PackedError, PackedTensor};
use crate::safetensors::{Dtype, TensorDecl};

/// `quant_method`, what transformers and vLLM dispatch on.
pub const QUANT_METHOD: &str = "compressed-tensors";
/// The compressed-tensors release whose layout and config keys this module writes (`version`).
pub const COMPRESSED_TENSORS_VERSION: &str = "0.20.0";
/// Top-level keys of the block, sorted.
pub const QUANTIZATION_CONFIG_KEYS: [&str; 11] = [
    "config_groups",
    "format",
    "global_compression_ratio",
    "ignore",
    "kv_cache_scheme",
    "moe_sparsity_config",
    "quant_method",
    "quantization_status",
    "sparsity_config",
    "transform_config",
    "version",
];
/// Keys of each `config_groups` entry (a `QuantizationScheme`), sorted.
pub const SCHEME_KEYS: [&str; 5] = [
    "format",
    "input_activations",
    "output_activations",
    "targets",
    "weights",
];
/// Keys of each `weights` / `input_activations` block (a `QuantizationArgs`), sorted.
pub const ARGS_KEYS: [&str; 6] = [
    "dynamic",
    "group_size",
    "num_bits",
    "strategy",
    "symmetric",
    "type",
];

/// Which weights share a scale (compressed-tensors' `strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// One scale for the whole tensor (`"tensor"`).
    Tensor,
    /// One per output channel (`"channel"`).
    Channel,
    /// One per group of this many consecutive input columns in a row (`"group"`).
    Group(usize),
}

impl Strategy {
    /// The `strategy` string.
    pub const fn name(self) -> &'static str {
        match self {
            Strategy::Tensor => "tensor",
            Strategy::Channel => "channel",
            Strategy::Group(_) => "group",
        }
    }

    /// Scales per row (1 for tensor and channel).
    pub fn groups_per_row(self, cols: usize) -> usize {
        match self {
            Strategy::Tensor | Strategy::Channel => 1,
            Strategy::Group(g) => cols.div_ceil(g.max(1)),
        }
    }

    /// Number of scales for a `rows × cols` weight.
    pub fn num_scales(self, rows: usize, cols: usize) -> usize {
        match self {
            Strategy::Tensor => 1,
            Strategy::Channel => rows,
            Strategy::Group(_) => rows.saturating_mul(self.groups_per_row(cols)),
        }
    }

    /// Shape of `weight_scale` (and of an unpacked zero point).
    pub fn scale_shape(self, rows: usize, cols: usize) -> Vec<u64> {
        match self {
            Strategy::Tensor => vec![1],
            Strategy::Channel => vec![rows as u64, 1],
            Strategy::Group(_) => vec![rows as u64, self.groups_per_row(cols) as u64],
        }
    }
}

/// How the weights were quantized (the `weights` block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightArgs {
    /// Bits per weight: 4 or 8.
    pub num_bits: u8,
    /// Zero points fixed at 0 (none stored) or stored per group.
    pub symmetric: bool,
    /// Scale granularity.
    pub strategy: Strategy,
}

/// Static, per-tensor, symmetric integer input activations (the `input_activations` block of a
/// W8A8 scheme); one `input_scale` per layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StaticInputArgs {
    /// Bits per activation: 8.
    pub num_bits: u8,
}

/// A compressed-tensors on-disk format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `pack-quantized`: integer weights packed into int32, no activation quantization.
    PackQuantized,
    /// `int-quantized`: int8 weights and integer activations.
    IntQuantized,
}

impl Format {
    /// The `format` string.
    pub const fn name(self) -> &'static str {
        match self {
            Format::PackQuantized => "pack-quantized",
            Format::IntQuantized => "int-quantized",
        }
    }
}

/// A quantization scheme for a set of layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scheme {
    /// The weights.
    pub weights: WeightArgs,
    /// Static input activations (W8A8), or none (weight-only).
    pub input_activations: Option<StaticInputArgs>,
}

impl Scheme {
    /// The format compressed-tensors picks for this scheme (`compressors/format.py`): with
    /// integer activations `int-quantized`, else `pack-quantized`.
    pub fn format(&self) -> Format {
        if self.input_activations.is_some() {
            Format::IntQuantized
        } else {
            Format::PackQuantized
        }
    }
}

/// One quantized linear weight: signed integers in `[-2^(b-1), 2^(b-1) - 1]` row-major, and one
/// scale and zero point per group (row-major over `(row, group)`, zero points in the same signed
/// domain). The fields mirror `kiln_quant::affine::AffineQuantized`.
#[derive(Debug, Clone, Copy)]
pub struct QuantizedLinear<'a> {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// How the values were quantized.
    pub weights: WeightArgs,
    /// `rows × cols` quantized values.
    pub q: &'a [i8],
    /// Scales, exactly representable in the storage dtype.
    pub scales: &'a [f32],
    /// Zero points; all zero (or empty) when symmetric.
    pub zero_points: &'a [i32],
}

/// `P.` for a weight named `P.weight` (empty for a bare `weight`).
fn module_prefix(weight_name: &str) -> Result<&str, PackedError> {
    if weight_name == "weight" {
        return Ok("");
    }
    weight_name
        .strip_suffix(".weight")
        .filter(|p| !p.is_empty())
        .map(|p| &weight_name[..p.len() + 1])
        .ok_or_else(|| PackedError::BadWeightName(weight_name.to_string()))
}

fn check_args(tensor: &str, args: &WeightArgs, format: Format) -> Result<(), PackedError> {
    if !matches!(args.num_bits, 4 | 8) {
        return Err(PackedError::UnsupportedBits {
            tensor: tensor.to_string(),
            bits: args.num_bits,
        });
    }
    if args.strategy == Strategy::Group(0) {
        return Err(PackedError::BadGroupSize(tensor.to_string()));
    }
    if format == Format::PackQuantized && !args.symmetric && args.strategy == Strategy::Tensor {
        return Err(PackedError::Unsupported {
            tensor: tensor.to_string(),
            reason: "asymmetric per-tensor pack-quantized weights have no packed zero point",
        });
    }
    Ok(())
}

/// int32 words for `n` values of `bits` bits: `ceil(n·b/32)`.
fn words(tensor: &str, n: usize, bits: u8) -> Result<usize, PackedError> {
    n.checked_mul(usize::from(bits))
        .map(|b| b.div_ceil(32))
        .ok_or_else(|| PackedError::TooLarge(tensor.to_string()))
}

/// The declarations of a `pack-quantized` layer, in the order [`pack_quantized`] returns them:
/// `weight_packed`, `weight_scale`, `weight_zero_point` (asymmetric only), `weight_shape`.
pub fn pack_quantized_decls(
    weight_name: &str,
    rows: usize,
    cols: usize,
    weights: &WeightArgs,
    scale_dtype: Dtype,
) -> Result<Vec<TensorDecl>, PackedError> {
    let p = module_prefix(weight_name)?;
    check_args(weight_name, weights, Format::PackQuantized)?;
    check_scale_dtype(weight_name, scale_dtype)?;
    elements(weight_name, rows, cols)?;
    let b = weights.num_bits;
    let mut decls = vec![
        TensorDecl::new(
            format!("{p}weight_packed"),
            Dtype::I32,
            vec![rows as u64, words(weight_name, cols, b)? as u64],
        ),
        TensorDecl::new(
            format!("{p}weight_scale"),
            scale_dtype,
            weights.strategy.scale_shape(rows, cols),
        ),
    ];
    if !weights.symmetric {
        decls.push(TensorDecl::new(
            format!("{p}weight_zero_point"),
            Dtype::I32,
            vec![
                words(weight_name, rows, b)? as u64,
                weights.strategy.groups_per_row(cols) as u64,
            ],
        ));
    }
    decls.push(TensorDecl::new(
        format!("{p}weight_shape"),
        Dtype::I64,
        vec![2],
    ));
    Ok(decls)
}

/// The declarations of an `int-quantized` layer, in the order [`int_quantized`] returns them:
/// `weight`, `weight_scale`, `weight_zero_point` (asymmetric only), `input_scale`.
pub fn int_quantized_decls(
    weight_name: &str,
    rows: usize,
    cols: usize,
    weights: &WeightArgs,
    scale_dtype: Dtype,
) -> Result<Vec<TensorDecl>, PackedError> {
    let p = module_prefix(weight_name)?;
    check_args(weight_name, weights, Format::IntQuantized)?;
    check_scale_dtype(weight_name, scale_dtype)?;
    elements(weight_name, rows, cols)?;
    let scale_shape = weights.strategy.scale_shape(rows, cols);
    let mut decls = vec![
        TensorDecl::new(
            format!("{p}weight"),
            Dtype::I8,
            vec![rows as u64, cols as u64],
        ),
        TensorDecl::new(format!("{p}weight_scale"), scale_dtype, scale_shape.clone()),
    ];
    if !weights.symmetric {
        decls.push(TensorDecl::new(
            format!("{p}weight_zero_point"),
            Dtype::I8,
            scale_shape,
        ));
    }
    decls.push(TensorDecl::new(
        format!("{p}input_scale"),
        scale_dtype,
        vec![1],
    ));
    Ok(decls)
}

fn check_scale_dtype(tensor: &str, dtype: Dtype) -> Result<(), PackedError> {
    if super::SCALE_DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(PackedError::ScaleDtype {
            tensor: tensor.to_string(),
            dtype,
        })
    }
}

/// Checks lengths and ranges of a quantized weight; returns the zero points to store (all
/// groups; zeros when symmetric and none given).
fn check_weight(weight_name: &str, w: &QuantizedLinear<'_>) -> Result<Vec<i32>, PackedError> {
    let n = elements(weight_name, w.rows, w.cols)?;
    check_len(weight_name, "q", w.q.len(), n)?;
    let groups = w.weights.strategy.num_scales(w.rows, w.cols);
    check_len(weight_name, "scales", w.scales.len(), groups)?;
    let qmax = (1i64 << (w.weights.num_bits - 1)) - 1;
    let qmin = -qmax - 1;
    let out_of_range = |what, index, value: i64, min, max| PackedError::OutOfRange {
        tensor: weight_name.to_string(),
        what,
        index,
        value,
        min,
        max,
    };
    if let Some((i, &v)) =
        w.q.iter()
            .enumerate()
            .find(|(_, &v)| !(qmin..=qmax).contains(&i64::from(v)))
    {
        return Err(out_of_range("q", i, i64::from(v), qmin, qmax));
    }
    if w.weights.symmetric {
        // Symmetric checkpoints store no zero point, so any non-zero one would be silently lost.
        if !w.zero_points.is_empty() {
            check_len(weight_name, "zero points", w.zero_points.len(), groups)?;
        }
        if let Some((i, &z)) = w.zero_points.iter().enumerate().find(|(_, &z)| z != 0) {
            return Err(out_of_range("zero points", i, i64::from(z), 0, 0));
        }
        Ok(vec![0; groups])
    } else {
        check_len(weight_name, "zero points", w.zero_points.len(), groups)?;
        if let Some((i, &z)) = w
            .zero_points
            .iter()
            .enumerate()
            .find(|(_, &z)| !(qmin..=qmax).contains(&i64::from(z)))
        {
            return Err(out_of_range("zero points", i, i64::from(z), qmin, qmax));
        }
        Ok(w.zero_points.to_vec())
    }
}

/// Packs a `count × len` matrix of signed values (read through `value(row, i)`) row by row into
/// little-endian int32 words, offset by `2^(b-1)`, element `i` at bits `[i·b, (i+1)·b)`.
fn pack_int32(
    count: usize,
    len: usize,
    bits: u8,
    value: impl Fn(usize, usize) -> i32,
) -> Vec<Vec<u32>> {
    let offset = 1i32 << (bits - 1);
    let per_row = (len * usize::from(bits)).div_ceil(32);
    (0..count)
        .map(|r| {
            let mut row = vec![0u32; per_row];
            for i in 0..len {
                // The caller checked the range, so `u` fits in `bits` bits.
                let u = (value(r, i) + offset) as u32;
                let bit = i * usize::from(bits);
                let (word, shift) = (bit / 32, (bit % 32) as u32);
                row[word] |= u << shift;
                if shift + u32::from(bits) > 32 {
                    row[word + 1] |= u >> (32 - shift);
                }
            }
            row
        })
        .collect()
}

fn with_bytes(decl: TensorDecl, bytes: Vec<u8>) -> PackedTensor {
    PackedTensor { decl, bytes }
}

/// The `pack-quantized` tensors of one linear weight (see the module docs), scales stored in
/// `scale_dtype` (F32, F16 or BF16; each scale must be exactly representable in it).
pub fn pack_quantized(
    weight_name: &str,
    w: &QuantizedLinear<'_>,
    scale_dtype: Dtype,
) -> Result<Vec<PackedTensor>, PackedError> {
    let decls = pack_quantized_decls(weight_name, w.rows, w.cols, &w.weights, scale_dtype)?;
    let zero_points = check_weight(weight_name, w)?;
    let bits = w.weights.num_bits;
    let cols = w.cols;
    let gpr = w.weights.strategy.groups_per_row(w.cols);
    let mut out = Vec::with_capacity(decls.len());
    for decl in decls {
        let bytes = if decl.name.ends_with("weight_packed") {
            pack_int32(w.rows, cols, bits, |r, i| i32::from(w.q[r * cols + i]))
                .into_iter()
                .flatten()
                .flat_map(u32::to_le_bytes)
                .collect()
        } else if decl.name.ends_with("weight_scale") {
            encode_scales(weight_name, "scales", w.scales, scale_dtype)?
        } else if decl.name.ends_with("weight_zero_point") {
            // Along dim 0: column g of the (rows × groups) matrix is one packed stream; the
            // result is stored transposed back, (words × groups) row-major.
            let columns = pack_int32(gpr, w.rows, bits, |g, r| zero_points[r * gpr + g]);
            let nwords = columns.first().map_or(0, Vec::len);
            (0..nwords)
                .flat_map(|k| columns.iter().map(move |c| c[k]))
                .flat_map(u32::to_le_bytes)
                .collect()
        } else {
            [w.rows as i64, w.cols as i64]
                .into_iter()
                .flat_map(i64::to_le_bytes)
                .collect()
        };
        out.push(with_bytes(decl, bytes));
    }
    Ok(out)
}

/// The `int-quantized` tensors of one linear weight with a static per-tensor input scale (W8A8;
/// see the module docs). Scales (weight and input) are stored in `scale_dtype`.
pub fn int_quantized(
    weight_name: &str,
    w: &QuantizedLinear<'_>,
    input_scale: f32,
    scale_dtype: Dtype,
) -> Result<Vec<PackedTensor>, PackedError> {
    let decls = int_quantized_decls(weight_name, w.rows, w.cols, &w.weights, scale_dtype)?;
    let zero_points = check_weight(weight_name, w)?;
    let mut out = Vec::with_capacity(decls.len());
    for decl in decls {
        let bytes = if decl.name.ends_with("weight_scale") {
            encode_scales(weight_name, "scales", w.scales, scale_dtype)?
        } else if decl.name.ends_with("weight_zero_point") {
            // Checked to lie in the signed range of at most 8 bits.
            zero_points.iter().map(|&z| z as i8 as u8).collect()
        } else if decl.name.ends_with("input_scale") {
            encode_scales(weight_name, "input scale", &[input_scale], scale_dtype)?
        } else {
            w.q.iter().map(|&v| v as u8).collect()
        };
        out.push(with_bytes(decl, bytes));
    }
    Ok(out)
}

/// One entry of `config_groups`: a scheme and the modules it targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigGroup {
    /// Module class names (`"Linear"`), exact module names, or `re:` regular expressions.
    pub targets: Vec<String>,
    /// The scheme.
    pub scheme: Scheme,
}

fn args_json(num_bits: u8, symmetric: bool, strategy: Strategy) -> Value {
    // Inserted in sorted order (`ARGS_KEYS`).
    let mut m = Map::new();
    m.insert("dynamic".into(), Value::Bool(false));
    m.insert(
        "group_size".into(),
        match strategy {
            Strategy::Group(g) => Value::from(g),
            // A group size with another strategy is an error in compressed-tensors.
            _ => Value::Null,
        },
    );
    m.insert("num_bits".into(), Value::from(num_bits));
    m.insert("strategy".into(), Value::from(strategy.name()));
    m.insert("symmetric".into(), Value::Bool(symmetric));
    m.insert("type".into(), Value::from("int"));
    Value::Object(m)
}

fn scheme_json(group: &ConfigGroup) -> Value {
    let s = &group.scheme;
    let mut m = Map::new();
    m.insert("format".into(), Value::from(s.format().name()));
    m.insert(
        "input_activations".into(),
        match s.input_activations {
            Some(a) => args_json(a.num_bits, true, Strategy::Tensor),
            None => Value::Null,
        },
    );
    m.insert("output_activations".into(), Value::Null);
    m.insert(
        "targets".into(),
        Value::Array(group.targets.iter().cloned().map(Value::String).collect()),
    );
    m.insert(
        "weights".into(),
        args_json(s.weights.num_bits, s.weights.symmetric, s.weights.strategy),
    );
    Value::Object(m)
}

/// The `quantization_config` block for `config.json`: one `config_groups` entry per group (named
/// `group_0`, `group_1`, ..., zero-padded so the names sort in group order, since compressed-
/// tensors' matching takes the first matching group and writers sort keys), `ignore` as given
/// (modules left dense, e.g. `lm_head`), `format` the groups' common format or
/// `mixed-precision`, `quantization_status` `compressed`.
pub fn quantization_config(
    groups: &[ConfigGroup],
    ignore: &[String],
) -> Result<Value, PackedError> {
    if groups.is_empty() {
        return Err(PackedError::Config(
            "at least one config group is needed".into(),
        ));
    }
    let width = (groups.len() - 1).to_string().len();
    let mut config_groups = Map::new();
    for (i, g) in groups.iter().enumerate() {
        let name = format!("group_{i:0width$}");
        if g.targets.is_empty() || g.targets.iter().any(String::is_empty) {
            return Err(PackedError::Config(format!("{name}: empty target")));
        }
        let format = g.scheme.format();
        check_args(&name, &g.scheme.weights, format)
            .map_err(|e| PackedError::Config(e.to_string()))?;
        if let Some(a) = g.scheme.input_activations {
            if a.num_bits != 8 {
                return Err(PackedError::Config(format!(
                    "{name}: static input activations must be 8-bit, not {}",
                    a.num_bits
                )));
            }
        }
        config_groups.insert(name, scheme_json(g));
    }
    let first = groups[0].scheme.format();
    let format = if groups.iter().all(|g| g.scheme.format() == first) {
        first.name()
    } else {
        "mixed-precision"
    };
    let mut m = Map::new();
    m.insert("config_groups".into(), Value::Object(config_groups));
    m.insert("format".into(), Value::from(format));
    m.insert("global_compression_ratio".into(), Value::Null);
    m.insert(
        "ignore".into(),
        Value::Array(ignore.iter().cloned().map(Value::String).collect()),
    );
    m.insert("kv_cache_scheme".into(), Value::Null);
    m.insert("moe_sparsity_config".into(), Value::Null);
    m.insert("quant_method".into(), Value::from(QUANT_METHOD));
    m.insert("quantization_status".into(), Value::from("compressed"));
    m.insert("sparsity_config".into(), Value::Object(Map::new()));
    m.insert("transform_config".into(), Value::Object(Map::new()));
    m.insert("version".into(), Value::from(COMPRESSED_TENSORS_VERSION));
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::to_python_json;

    fn args(num_bits: u8, symmetric: bool, strategy: Strategy) -> WeightArgs {
        WeightArgs {
            num_bits,
            symmetric,
            strategy,
        }
    }

    #[test]
    fn ecosystem_worked_example() {
        // ecosystem.md §0: the row [1, -2, 3, 0, -8, 7, 5, -1] packs to 0x7DF08B69.
        let q = [1i8, -2, 3, 0, -8, 7, 5, -1];
        let w = QuantizedLinear {
            rows: 1,
            cols: 8,
            weights: args(4, true, Strategy::Channel),
            q: &q,
            scales: &[1.0],
            zero_points: &[0],
        };
        let t = pack_quantized("m.weight", &w, Dtype::F32).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.decl.name.as_str()).collect();
        assert_eq!(
            names,
            ["m.weight_packed", "m.weight_scale", "m.weight_shape"]
        );
        assert_eq!(t[0].bytes, [0x69, 0x8B, 0xF0, 0x7D]);
        assert_eq!(t[0].decl.shape, [1, 1]);
        assert_eq!(t[1].decl.shape, [1, 1]);
        assert_eq!(t[2].bytes[..8], 1i64.to_le_bytes());
        assert_eq!(t[2].bytes[8..], 8i64.to_le_bytes());
    }

    #[test]
    fn zero_points_pack_along_dim_0() {
        // 9 rows, 2 groups of 2 columns: column g of the zero points is one 4-bit stream; 9
        // rows need 2 words.
        let rows = 9;
        let zp: Vec<i32> = (0..rows * 2).map(|i| (i as i32 % 16) - 8).collect();
        let w = QuantizedLinear {
            rows,
            cols: 4,
            weights: args(4, false, Strategy::Group(2)),
            q: &[0; 36],
            scales: &[0.5; 18],
            zero_points: &zp,
        };
        let t = pack_quantized("weight", &w, Dtype::BF16).unwrap();
        let zt = &t[2];
        assert_eq!(zt.decl.name, "weight_zero_point");
        assert_eq!(zt.decl.shape, [2, 2]);
        let words: Vec<u32> = zt
            .bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for r in 0..rows {
            for g in 0..2 {
                let word = words[(r / 8) * 2 + g];
                let nibble = (word >> ((r % 8) * 4)) & 0xF;
                assert_eq!(nibble as i32 - 8, zp[r * 2 + g], "row {r} group {g}");
            }
        }
        // Rows 9..16 of the second word are padding.
        assert_eq!(words[2] >> 4, 0);
    }

    #[test]
    fn encoders_agree_with_decls() {
        for (bits, sym, strategy) in [
            (4, true, Strategy::Group(3)),
            (4, false, Strategy::Group(3)),
            (8, false, Strategy::Channel),
            (8, true, Strategy::Tensor),
        ] {
            let (rows, cols) = (5, 7);
            let a = args(bits, sym, strategy);
            let n = strategy.num_scales(rows, cols);
            let w = QuantizedLinear {
                rows,
                cols,
                weights: a,
                q: &vec![-1; rows * cols],
                scales: &vec![0.25; n],
                zero_points: &vec![if sym { 0 } else { 3 }; n],
            };
            let packed = pack_quantized("l.weight", &w, Dtype::F16).unwrap();
            let decls = pack_quantized_decls("l.weight", rows, cols, &a, Dtype::F16).unwrap();
            assert_eq!(
                packed.iter().map(|t| &t.decl).collect::<Vec<_>>(),
                decls.iter().collect::<Vec<_>>()
            );
            for t in &packed {
                assert_eq!(
                    t.bytes.len() as u64,
                    t.decl.nbytes().unwrap(),
                    "{}",
                    t.decl.name
                );
            }
            let int = int_quantized("l.weight", &w, 0.5, Dtype::F16).unwrap();
            let decls = int_quantized_decls("l.weight", rows, cols, &a, Dtype::F16).unwrap();
            assert_eq!(
                int.iter().map(|t| &t.decl).collect::<Vec<_>>(),
                decls.iter().collect::<Vec<_>>()
            );
            for t in &int {
                assert_eq!(
                    t.bytes.len() as u64,
                    t.decl.nbytes().unwrap(),
                    "{}",
                    t.decl.name
                );
            }
        }
    }

    #[test]
    fn rejections_name_the_tensor() {
        let ok = QuantizedLinear {
            rows: 2,
            cols: 2,
            weights: args(4, true, Strategy::Channel),
            q: &[0, 1, 2, 3],
            scales: &[1.0, 1.0],
            zero_points: &[0, 0],
        };
        let err = |w: QuantizedLinear<'_>| pack_quantized("x.weight", &w, Dtype::F32).unwrap_err();
        assert_eq!(
            pack_quantized("x.bias", &ok, Dtype::F32).unwrap_err(),
            PackedError::BadWeightName("x.bias".into())
        );
        assert!(matches!(
            err(QuantizedLinear {
                weights: args(3, true, Strategy::Channel),
                ..ok
            }),
            PackedError::UnsupportedBits { bits: 3, .. }
        ));
        assert!(matches!(
            err(QuantizedLinear {
                q: &[0, 1, 2, 8],
                ..ok
            }),
            PackedError::OutOfRange {
                index: 3,
                value: 8,
                ..
            }
        ));
        assert!(matches!(
            err(QuantizedLinear {
                zero_points: &[0, 1],
                ..ok
            }),
            PackedError::OutOfRange {
                what: "zero points",
                index: 1,
                ..
            }
        ));
        assert!(matches!(
            err(QuantizedLinear {
                scales: &[1.0],
                ..ok
            }),
            PackedError::Length {
                what: "scales",
                expected: 2,
                actual: 1,
                ..
            }
        ));
        assert!(matches!(
            err(QuantizedLinear {
                weights: args(4, false, Strategy::Tensor),
                scales: &[1.0],
                zero_points: &[0],
                ..ok
            }),
            PackedError::Unsupported { .. }
        ));
        assert!(matches!(
            err(QuantizedLinear {
                weights: args(4, true, Strategy::Group(0)),
                ..ok
            }),
            PackedError::BadGroupSize(_)
        ));
        assert!(matches!(
            pack_quantized("x.weight", &ok, Dtype::U8).unwrap_err(),
            PackedError::ScaleDtype { .. }
        ));
        assert!(matches!(
            int_quantized("x.weight", &ok, f32::NAN, Dtype::F32).unwrap_err(),
            PackedError::BadScale {
                what: "input scale",
                ..
            }
        ));
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn config_block_has_exactly_the_accepted_keys() {
        let w4 = ConfigGroup {
            targets: vec!["Linear".into()],
            scheme: Scheme {
                weights: args(4, true, Strategy::Group(128)),
                input_activations: None,
            },
        };
        let v = quantization_config(std::slice::from_ref(&w4), &["lm_head".into()]).unwrap();
        assert_eq!(keys(&v), QUANTIZATION_CONFIG_KEYS);
        assert_eq!(keys(&v["config_groups"]["group_0"]), SCHEME_KEYS);
        assert_eq!(keys(&v["config_groups"]["group_0"]["weights"]), ARGS_KEYS);
        // ecosystem.md §1.5's minimal W4A16 example, as json.dumps(indent=2, sort_keys=True).
        let expected = r#"{
  "config_groups": {
    "group_0": {
      "format": "pack-quantized",
      "input_activations": null,
      "output_activations": null,
      "targets": [
        "Linear"
      ],
      "weights": {
        "dynamic": false,
        "group_size": 128,
        "num_bits": 4,
        "strategy": "group",
        "symmetric": true,
        "type": "int"
      }
    }
  },
  "format": "pack-quantized",
  "global_compression_ratio": null,
  "ignore": [
    "lm_head"
  ],
  "kv_cache_scheme": null,
  "moe_sparsity_config": null,
  "quant_method": "compressed-tensors",
  "quantization_status": "compressed",
  "sparsity_config": {},
  "transform_config": {},
  "version": "0.20.0"
}"#;
        assert_eq!(to_python_json(&v, true), expected);
        assert_eq!(to_python_json(&v, false), expected, "inserted sorted");

        let w8a8 = ConfigGroup {
            targets: vec!["re:.*mlp.*".into()],
            scheme: Scheme {
                weights: args(8, true, Strategy::Channel),
                input_activations: Some(StaticInputArgs { num_bits: 8 }),
            },
        };
        let mut groups = vec![w4.clone(); 10];
        groups.push(w8a8);
        let v = quantization_config(&groups, &[]).unwrap();
        assert_eq!(v["format"], "mixed-precision");
        let names = keys(&v["config_groups"]);
        assert_eq!(names.first(), Some(&"group_00"));
        assert_eq!(names.last(), Some(&"group_10"));
        let g = &v["config_groups"]["group_10"];
        assert_eq!(g["format"], "int-quantized");
        assert_eq!(keys(&g["input_activations"]), ARGS_KEYS);
        assert_eq!(g["input_activations"]["strategy"], "tensor");
        assert_eq!(g["weights"]["group_size"], Value::Null);
        assert!(quantization_config(&[], &[]).is_err());
    }
}
