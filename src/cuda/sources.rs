//! The kernel sources, embedded in the binary (no build script, no nvcc): `kernels/*.cu`, the
//! shared header and the CPU emulator's files.

/// `kernels/common.cuh`
pub const COMMON: &str = include_str!("../../kernels/common.cuh");

/// Every `kernels/*.cu` as (file name, source).
pub const KERNEL_FILES: [(&str, &str); 9] = [
    ("adam.cu", include_str!("../../kernels/adam.cu")),
    ("avg_pool2d.cu", include_str!("../../kernels/avg_pool2d.cu")),
    ("bias.cu", include_str!("../../kernels/bias.cu")),
    ("conv2d.cu", include_str!("../../kernels/conv2d.cu")),
    ("cross_entropy.cu", include_str!("../../kernels/cross_entropy.cu")),
    ("dropout.cu", include_str!("../../kernels/dropout.cu")),
    ("gemm.cu", include_str!("../../kernels/gemm.cu")),
    ("max_pool2d.cu", include_str!("../../kernels/max_pool2d.cu")),
    ("relu.cu", include_str!("../../kernels/relu.cu")),
];

/// `kernels/emulate/cuda_emu.hpp` and `kernels/emulate/harness.cpp`.
pub const EMULATOR_FILES: [(&str, &str); 2] = [
    ("emulate/cuda_emu.hpp", include_str!("../../kernels/emulate/cuda_emu.hpp")),
    ("emulate/harness.cpp", include_str!("../../kernels/emulate/harness.cpp")),
];

const INCLUDE_COMMON: &str = "#include \"common.cuh\"";

/// The text NVRTC compiles for one file: common.cuh, then the file with its
/// `#include "common.cuh"` line blanked (line numbers in errors stay the file's own).
pub fn nvrtc_program(file: &str, source: &str) -> String {
    let body: String =
        source.lines().map(|l| if l.trim() == INCLUDE_COMMON { "" } else { l }).collect::<Vec<_>>().join("\n");
    let common = COMMON.replacen("#pragma once", "", 1);
    format!("{common}\n#line 1 \"{file}\"\n{body}\n")
}

/// The `extern "C" __global__` kernels a source defines, in order, including the ones a
/// `MEDCNN_SGEMM_ALL(suffix, ...)` macro line expands to.
pub fn kernel_names(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut lines = source.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#define") {
            // Skip macro bodies (continued with a trailing backslash).
            let mut l = line;
            while l.trim_end().ends_with('\\') {
                match lines.next() {
                    Some(next) => l = next,
                    None => break,
                }
            }
            continue;
        }
        if let Some(rest) = t.strip_prefix("MEDCNN_SGEMM_ALL(") {
            let suffix = rest.split(',').next().unwrap_or("").trim();
            for tt in ["nn", "nt", "tn", "tt"] {
                names.push(format!("sgemm_{tt}_{suffix}"));
            }
            continue;
        }
        if t.starts_with("extern \"C\" __global__") {
            // The name is the identifier before the first '(' after the return type, which
            // may follow __launch_bounds__(...) on the next line.
            let mut text = t.to_string();
            while !text.contains(')') || name_of(&text).is_none() {
                match lines.next() {
                    Some(next) => text.push_str(next),
                    None => break,
                }
            }
            if let Some(n) = name_of(&text) {
                names.push(n);
            }
        }
    }
    names
}

/// The kernel name in `extern "C" __global__ [__launch_bounds__(..)] void name(`.
fn name_of(decl: &str) -> Option<String> {
    let mut after_void = decl.split_once(" void ")?.1.trim_start();
    if let Some(rest) = after_void.strip_prefix("__launch_bounds__") {
        // Skip the balanced parentheses of the bounds.
        let mut depth = 0;
        let end = rest.char_indices().find_map(|(i, c)| {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            (depth == 0 && c == ')').then_some(i)
        })?;
        after_void = rest[end + 1..].trim_start();
    }
    let name: String = after_void.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
    (!name.is_empty() && after_void[name.len()..].trim_start().starts_with('(')).then_some(name)
}

/// Every kernel of every file as (kernel, file).
pub fn all_kernels() -> Vec<(String, &'static str)> {
    KERNEL_FILES.iter().flat_map(|&(file, src)| kernel_names(src).into_iter().map(move |k| (k, file))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_kernel() {
        let all: Vec<String> = all_kernels().into_iter().map(|(k, _)| k).collect();
        for k in [
            "adam_step",
            "bias_grad",
            "im2col",
            "col2im",
            "sgemm_tn_64",
            "sgemm_reduce_splits",
            "max_pool_backward",
            "cross_entropy_forward_backward",
            "dropout_forward",
            "global_avg_pool_backward",
            "relu_backward",
        ] {
            assert!(all.iter().any(|a| a == k), "{k} missing from {all:?}");
        }
        assert_eq!(all.iter().filter(|k| k.starts_with("sgemm_") && !k.contains("reduce")).count(), 12);
        let mut dedup = all.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), all.len(), "duplicate kernel names");
    }

    #[test]
    fn program_text_has_the_header_once() {
        let text = nvrtc_program("relu.cu", KERNEL_FILES[8].1);
        assert_eq!(text.matches("struct ReluParams").count(), 1);
        assert!(!text.contains(INCLUDE_COMMON));
    }
}
