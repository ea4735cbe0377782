//! llama.cpp's `llama-quantize` presets as recipes (`recipes/presets/*.toml`, built into kiln so
//! that `kiln convert --type Q4_K_M` works anywhere).

use std::path::Path;

use crate::{Recipe, RecipeError};

/// `(name, recipe text)` for every preset, by llama.cpp file-type name.
pub const PRESETS: &[(&str, &str)] = &[
    ("BF16", include_str!("../../../recipes/presets/bf16.toml")),
    ("F16", include_str!("../../../recipes/presets/f16.toml")),
    ("F32", include_str!("../../../recipes/presets/f32.toml")),
    ("IQ1_M", include_str!("../../../recipes/presets/iq1_m.toml")),
    ("IQ1_S", include_str!("../../../recipes/presets/iq1_s.toml")),
    ("IQ2_M", include_str!("../../../recipes/presets/iq2_m.toml")),
    ("IQ2_S", include_str!("../../../recipes/presets/iq2_s.toml")),
    (
        "IQ2_XS",
        include_str!("../../../recipes/presets/iq2_xs.toml"),
    ),
    (
        "IQ2_XXS",
        include_str!("../../../recipes/presets/iq2_xxs.toml"),
    ),
    ("IQ3_M", include_str!("../../../recipes/presets/iq3_m.toml")),
    ("IQ3_S", include_str!("../../../recipes/presets/iq3_s.toml")),
    (
        "IQ3_XXS",
        include_str!("../../../recipes/presets/iq3_xxs.toml"),
    ),
    (
        "IQ4_NL",
        include_str!("../../../recipes/presets/iq4_nl.toml"),
    ),
    (
        "IQ4_XS",
        include_str!("../../../recipes/presets/iq4_xs.toml"),
    ),
    (
        "MXFP4_MOE",
        include_str!("../../../recipes/presets/mxfp4_moe.toml"),
    ),
    ("Q2_K", include_str!("../../../recipes/presets/q2_k.toml")),
    (
        "Q2_K_S",
        include_str!("../../../recipes/presets/q2_k_s.toml"),
    ),
    (
        "Q3_K_L",
        include_str!("../../../recipes/presets/q3_k_l.toml"),
    ),
    (
        "Q3_K_M",
        include_str!("../../../recipes/presets/q3_k_m.toml"),
    ),
    (
        "Q3_K_S",
        include_str!("../../../recipes/presets/q3_k_s.toml"),
    ),
    ("Q4_0", include_str!("../../../recipes/presets/q4_0.toml")),
    ("Q4_1", include_str!("../../../recipes/presets/q4_1.toml")),
    (
        "Q4_K_M",
        include_str!("../../../recipes/presets/q4_k_m.toml"),
    ),
    (
        "Q4_K_S",
        include_str!("../../../recipes/presets/q4_k_s.toml"),
    ),
    ("Q5_0", include_str!("../../../recipes/presets/q5_0.toml")),
    ("Q5_1", include_str!("../../../recipes/presets/q5_1.toml")),
    (
        "Q5_K_M",
        include_str!("../../../recipes/presets/q5_k_m.toml"),
    ),
    (
        "Q5_K_S",
        include_str!("../../../recipes/presets/q5_k_s.toml"),
    ),
    ("Q6_K", include_str!("../../../recipes/presets/q6_k.toml")),
    ("Q8_0", include_str!("../../../recipes/presets/q8_0.toml")),
    ("TQ1_0", include_str!("../../../recipes/presets/tq1_0.toml")),
    ("TQ2_0", include_str!("../../../recipes/presets/tq2_0.toml")),
];

/// llama-quantize's aliases: `Q3_K` means `Q3_K_M`, and so on.
const ALIASES: &[(&str, &str)] = &[("Q3_K", "Q3_K_M"), ("Q4_K", "Q4_K_M"), ("Q5_K", "Q5_K_M")];

/// The preset recipe named `name` (case-insensitive, llama-quantize's aliases accepted), parsed.
/// `None` when no preset has that name.
pub fn get(name: &str) -> Option<Result<Recipe, RecipeError>> {
    let name = ALIASES
        .iter()
        .find(|(alias, _)| alias.eq_ignore_ascii_case(name))
        .map_or(name, |(_, target)| target);
    PRESETS
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, text)| Recipe::from_toml(text, Path::new("")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_parses_and_names_its_file_type() {
        for (name, _) in PRESETS {
            let recipe = get(name).expect("listed").expect("valid recipe");
            assert_eq!(recipe.file_type.map(|f| f.name), Some(*name), "{name}");
        }
        assert!(get("q4_k").is_some());
        assert!(get("Q9_K").is_none());
    }
}
