//! Python's `repr(float)`, which is also how `json.dumps` writes floats. Several of kiln's
//! outputs must match files written by Python (bitsandbytes' quant-state JSON, Hugging Face
//! `config.json` and shard indexes), so the quantizers and the writers share this one routine.

/// A float as Python's `repr` (and therefore `json.dumps`) writes it: the shortest digits that
/// round-trip, in positional notation when the decimal exponent is in `-4..16`, otherwise as
/// `d.ddde±XX`; integral values keep a `.0`. Non-finite values are spelled as `json.dumps` does
/// (`NaN`, `Infinity`, `-Infinity`).
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    let sign = if x.is_sign_negative() { "-" } else { "" };
    if x == 0.0 {
        return format!("{sign}0.0");
    }
    // Rust's `{:e}` gives the shortest digit count that round-trips, as Python's repr does. Among
    // strings of that length Python takes the one nearest to x with ties to even, which is the
    // exact rounding to that many digits; Rust's shortest mode can round a tie up instead (an f32
    // widened to f64 may lie exactly halfway), so the exact rounding is used when it round-trips.
    let shortest = format!("{:e}", x.abs());
    let count = shortest
        .split('e')
        .next()
        .map_or(1, |m| m.chars().filter(char::is_ascii_digit).count());
    let nearest = format!("{:.*e}", count.saturating_sub(1), x.abs());
    let sci = if nearest.parse::<f64>() == Ok(x.abs()) {
        nearest
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    // Position of the decimal point relative to the digit string: x = 0.DIGITS * 10^decpt.
    let decpt = exp + 1;
    let n = digits.len() as i32;
    let body = if decpt <= -4 || decpt > 16 {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let e = decpt - 1;
        let esign = if e < 0 { '-' } else { '+' };
        format!("{first}{frac}e{esign}{:02}", e.abs())
    } else if decpt <= 0 {
        format!("0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt >= n {
        format!("{digits}{}.0", "0".repeat((decpt - n) as usize))
    } else {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// Appends a string literal as Python's `json.dumps` writes it with `ensure_ascii=True`: printable
/// ASCII (space to `~`) as is, `"` and `\` escaped, the short forms for `\n`, `\r`, `\t`, `\b`,
/// `\f`, and everything else as `\uXXXX` UTF-16 units (surrogate pairs above the BMP).
pub fn push_python_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_ascii_escaped() {
        let json = |s: &str| {
            let mut out = String::new();
            push_python_json_string(&mut out, s);
            out
        };
        assert_eq!(json("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(json("é"), "\"\\u00e9\"");
        assert_eq!(json("\u{1F600}"), "\"\\ud83d\\ude00\"");
        assert_eq!(json("\n\u{7f}~"), "\"\\n\\u007f~\"");
    }

    // The tie case is written as its exact decimal value on purpose.
    #[allow(clippy::excessive_precision)]
    #[test]
    fn python_repr_matches_known_spellings() {
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (123.25, "123.25"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e17, "1.2345e+17"),
            (-2.5e-7, "-2.5e-07"),
            (f64::from(0.178_499_94_f32), "0.17849993705749512"),
            // Exactly halfway between two 17-digit strings: Python rounds the tie to even.
            (0.171_222_686_767_578_125, "0.17122268676757812"),
            (5e-324, "5e-324"),
            (2.5, "2.5"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
        ];
        for &(x, want) in cases {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }
}
