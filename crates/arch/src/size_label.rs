//! `general.size_label`, computed from parameter counts as gguf-py's `utility.size_label` does.

/// Parameter counts of a model, as gguf-py's `GGUFWriter.get_total_parameter_count` reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// All parameters.
    pub total: u64,
    /// Parameters outside expert tensors.
    pub shared: u64,
    /// Parameters of one expert (summed over expert tensors).
    pub expert: u64,
    /// Experts per expert tensor (0 for dense models).
    pub expert_count: u64,
}

/// `3.8M`, `8.0B`, `8x7.0B`: the parameter count with at least two significant digits.
pub fn size_label(counts: &ParamCounts) -> String {
    if counts.expert_count > 0 {
        format!(
            "{}x{}",
            counts.expert_count,
            rounded_notation(counts.shared + counts.expert, 2)
        )
    } else {
        rounded_notation(counts.total, 2)
    }
}

fn rounded_notation(count: u64, min_digits: usize) -> String {
    let n = count as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    // Python: len(str(round(scaled)).lstrip('0')), with round() rounding half to even.
    let rounded = scaled.round_ties_even() as u64;
    let digits = rounded.to_string().trim_start_matches('0').len();
    let fix = min_digits.saturating_sub(digits);
    format!("{scaled:.fix$}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(total: u64) -> String {
        size_label(&ParamCounts {
            total,
            shared: total,
            ..Default::default()
        })
    }

    #[test]
    fn labels() {
        assert_eq!(dense(3_804_416), "3.8M");
        assert_eq!(dense(8_030_261_248), "8.0B");
        assert_eq!(dense(70_553_706_496), "71B");
        assert_eq!(dense(4_385_920), "4.4M");
        assert_eq!(dense(500), "0.50K");
        assert_eq!(
            size_label(&ParamCounts {
                total: 0,
                shared: 600_000,
                expert: 500_000,
                expert_count: 4
            }),
            "4x1.1M"
        );
    }
}
