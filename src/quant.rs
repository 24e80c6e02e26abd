//! Quantization types by name, and the ladder of quantized files a user compares.

use llama_cpp_sys_2 as sys;

/// (name on the command line, llama.cpp file type). Lower-case names as llama.cpp's tools spell them.
pub const TYPES: &[(&str, u32)] = &[
    ("f32", sys::LLAMA_FTYPE_ALL_F32),
    ("f16", sys::LLAMA_FTYPE_MOSTLY_F16),
    ("bf16", sys::LLAMA_FTYPE_MOSTLY_BF16),
    ("q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0),
    ("q6_k", sys::LLAMA_FTYPE_MOSTLY_Q6_K),
    ("q5_k_m", sys::LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("q5_k_s", sys::LLAMA_FTYPE_MOSTLY_Q5_K_S),
    ("q5_1", sys::LLAMA_FTYPE_MOSTLY_Q5_1),
    ("q5_0", sys::LLAMA_FTYPE_MOSTLY_Q5_0),
    ("q4_k_m", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("q4_k_s", sys::LLAMA_FTYPE_MOSTLY_Q4_K_S),
    ("q4_1", sys::LLAMA_FTYPE_MOSTLY_Q4_1),
    ("q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0),
    ("q3_k_l", sys::LLAMA_FTYPE_MOSTLY_Q3_K_L),
    ("q3_k_m", sys::LLAMA_FTYPE_MOSTLY_Q3_K_M),
    ("q3_k_s", sys::LLAMA_FTYPE_MOSTLY_Q3_K_S),
    ("q2_k", sys::LLAMA_FTYPE_MOSTLY_Q2_K),
    ("q2_k_s", sys::LLAMA_FTYPE_MOSTLY_Q2_K_S),
];

/// Parse a comma-separated list of type names; unknown names are an error listing the valid ones.
pub fn parse_types(spec: &str) -> Result<Vec<(&'static str, u32)>, String> {
    let mut out = Vec::new();
    for name in spec
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
    {
        match TYPES.iter().find(|(n, _)| *n == name) {
            Some(&t) if !out.contains(&t) => out.push(t),
            Some(_) => {}
            None => {
                let valid: Vec<&str> = TYPES.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "unknown quantization type \"{name}\"; valid types: {}",
                    valid.join(", ")
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("--type: no types given".into());
    }
    Ok(out)
}

/// Output file name for a source file stem and a type: `SmolLM2-135M-Instruct.Q8_0.gguf` from
/// `SmolLM2-135M-Instruct.Q4_1` (a trailing quantization label of the source is replaced).
pub fn output_name(src_stem: &str, ty: &str) -> String {
    let base = match src_stem.rsplit_once(['.', '-']) {
        Some((b, last)) if TYPES.iter().any(|(n, _)| n.eq_ignore_ascii_case(last)) => b,
        _ => src_stem,
    };
    format!("{base}.{}.gguf", ty.to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_and_names() {
        assert_eq!(
            parse_types("q8_0, Q2_K")
                .unwrap()
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>(),
            vec!["q8_0", "q2_k"]
        );
        let e = parse_types("q9_9").unwrap_err();
        assert!(e.contains("q9_9") && e.contains("q4_k_m"), "{e}");
        assert_eq!(
            output_name("SmolLM2-135M-Instruct.Q4_1", "q8_0"),
            "SmolLM2-135M-Instruct.Q8_0.gguf"
        );
        assert_eq!(
            output_name("gemma-3-270m-q4_k_m", "f32"),
            "gemma-3-270m.F32.gguf"
        );
        assert_eq!(output_name("model", "q2_k"), "model.Q2_K.gguf");
    }
}
