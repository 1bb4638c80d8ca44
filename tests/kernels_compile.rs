//! Every `kernels/*.cu` compiles with NVRTC, as the CUDA backend compiles it at start-up
//! (common.cuh prepended): to PTX for compute_90, and to an sm_90 cubin with ptxas's register
//! spills as errors. Prints each kernel's registers and shared memory.
//!
//! Needs `--features cuda` (cudarc's NVRTC bindings) and libnvrtc (see
//! `medcnn::cuda::nvrtc::NVRTC_HELP`); no GPU. Without NVRTC the tests skip with a message,
//! unless MEDCNN_REQUIRE_NVRTC=1, when they fail:
//!
//!     LD_LIBRARY_PATH=/path/to/nvidia/cu13/lib MEDCNN_REQUIRE_NVRTC=1 \
//!         cargo test --features cuda --test kernels_compile -- --nocapture
//!
//! Without `--features cuda` this file compiles to nothing (no test, so nothing counts).
#![cfg(feature = "cuda")]

mod common;

use medcnn::cuda::nvrtc;
use medcnn::cuda::sources::{kernel_names, nvrtc_program, KERNEL_FILES};

/// True when NVRTC loads; otherwise skips (prints why) or, under MEDCNN_REQUIRE_NVRTC=1,
/// fails.
fn nvrtc_present() -> bool {
    match nvrtc::check_available() {
        Ok(()) => true,
        Err(e) => {
            common::skip_unless_required("NVRTC", format!("{e:#}"));
            false
        }
    }
}

#[test]
fn every_kernel_compiles_to_ptx_for_compute_90() {
    if !nvrtc_present() {
        return;
    }
    let (major, minor) = nvrtc::version().unwrap();
    println!("NVRTC {major}.{minor}");
    if (major, minor) != (13, 0) {
        eprintln!("note: NVRTC {major}.{minor}; the GPU machines' driver (CUDA 13.0) wants 13.0.x");
    }
    for (file, src) in KERNEL_FILES {
        let out =
            nvrtc::compile(file, &nvrtc_program(file, src), "compute_90", &[]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!out.is_cubin);
        let ptx = String::from_utf8_lossy(&out.image);
        for k in kernel_names(src) {
            assert!(ptx.contains(&format!(".entry {k}(")), "{file}: no entry point {k} in the PTX");
        }
        assert!(out.log.trim().is_empty(), "{file}: NVRTC warnings:\n{}", out.log);
        let version = ptx.lines().find(|l| l.starts_with(".version")).unwrap_or("?");
        println!("{file:<18} PTX {version}, {} kernels", kernel_names(src).len());
    }
}

#[test]
fn every_kernel_compiles_to_an_sm_90_cubin_without_spills() {
    if !nvrtc_present() {
        return;
    }
    let opts = ["--ptxas-options=--warn-on-spills", "--ptxas-options=--warning-as-error", "--ptxas-options=-v"];
    for (file, src) in KERNEL_FILES {
        let out = nvrtc::compile(file, &nvrtc_program(file, src), "sm_90", &opts).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(out.is_cubin && out.image.len() > 16 && out.image.starts_with(b"\x7fELF"), "{file}: not a cubin");
        // ptxas -v: "Function properties for K" then "N bytes stack frame, S bytes spill
        // stores, L bytes spill loads" then "Used R registers, ...".
        let mut kernel = String::new();
        for line in out.log.lines() {
            if let Some(k) = line.split("Function properties for ").nth(1) {
                kernel = k.trim().to_string();
            }
            if line.contains("spill stores") {
                let spills: Vec<u64> = line
                    .split(',')
                    .filter(|p| p.contains("spill"))
                    .filter_map(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
                    .collect();
                assert!(spills.iter().all(|&s| s == 0), "{file}: {kernel} spills registers: {line}");
            }
            if let Some(used) = line.split("Used ").nth(1) {
                println!("{file:<18} {kernel:<32} {}", used.trim());
            }
        }
    }
}

/// The backend's start-up path: all files at once on threads, then again from the cache.
#[test]
fn the_backend_compiles_in_parallel_and_caches() {
    if !nvrtc_present() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let t = std::time::Instant::now();
    let fresh = nvrtc::compile_all("sm_90", Some(&dir)).unwrap_or_else(|e| panic!("{e:#}"));
    let compile_s = t.elapsed().as_secs_f64();
    let t = std::time::Instant::now();
    let cached = nvrtc::compile_all("sm_90", Some(&dir)).unwrap();
    println!(
        "{} files: compiled in {compile_s:.2} s, from the cache in {:.3} s",
        fresh.len(),
        t.elapsed().as_secs_f64()
    );
    assert_eq!(fresh, cached);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), KERNEL_FILES.len());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_compile_error_comes_back_with_the_log() {
    if !nvrtc_present() {
        return;
    }
    let err = nvrtc::compile("broken.cu", "extern \"C\" __global__ void k() { undeclared(); }", "compute_90", &[])
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("broken.cu") && msg.contains("undeclared"), "{msg}");
}
