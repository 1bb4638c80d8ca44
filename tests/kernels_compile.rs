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
    assert!(fresh.iter().all(|i| !i.from_cache) && cached.iter().all(|i| i.from_cache));
    let bytes = |v: &[nvrtc::Image]| v.iter().map(|i| i.bytes.clone()).collect::<Vec<_>>();
    assert_eq!(bytes(&fresh), bytes(&cached));
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), KERNEL_FILES.len());
    let _ = std::fs::remove_dir_all(&dir);
}

/// An empty cache folder (its own, under the cargo target folder), made afresh.
fn empty_cache(tag: &str) -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kernel-cache-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The smallest kernel file (the cache tests need one real image, not all of them).
fn small_file() -> (&'static str, &'static str) {
    *KERNEL_FILES.iter().find(|(f, _)| *f == "relu.cu").unwrap()
}

/// Eight threads compile the same file at once into one empty cache (as parallel test
/// processes and start-ups on a cold cache do): each gets a whole image, all the same, and
/// the cache ends up holding exactly that one file, with no temporary files left behind.
#[test]
fn eight_threads_compiling_at_once_share_one_cache() {
    if !nvrtc_present() {
        return;
    }
    let dir = empty_cache("race");
    let (file, src) = small_file();
    let images: Vec<nvrtc::Image> = std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..8).map(|_| s.spawn(|| nvrtc::compile_cached(file, src, "sm_90", Some(&dir)))).collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{e:#}"))).collect()
    });
    for image in &images {
        assert_eq!(nvrtc::image_problem(&image.bytes, true), None);
        assert_eq!(image.bytes, images[0].bytes, "two threads got different images");
    }
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 1, "one cache file and no temporary ones: {names:?}");
    let again = nvrtc::compile_cached(file, src, "sm_90", Some(&dir)).unwrap();
    assert!(again.from_cache && again.bytes == images[0].bytes, "the stored image is the compiled one");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cached file that is empty, truncated or corrupted is compiled again, not handed to
/// the driver, and the cache file is repaired.
#[test]
fn a_damaged_cache_file_is_recompiled() {
    if !nvrtc_present() {
        return;
    }
    let dir = empty_cache("damaged");
    let (file, src) = small_file();
    for target in ["sm_90", "compute_90"] {
        let fresh = nvrtc::compile_cached(file, src, target, Some(&dir)).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(!fresh.from_cache);
        let path = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().contains(target))
            .expect("the cache file");
        let whole = std::fs::read(&path).unwrap();
        let mut flipped = whole.clone();
        flipped[whole.len() / 2] ^= 0x40;
        let damages: [(&str, Vec<u8>); 4] = [
            ("empty", Vec::new()),
            ("truncated", whole[..whole.len() / 2].to_vec()),
            ("one byte changed", flipped),
            ("the image without its trailer", fresh.bytes.clone()),
        ];
        for (what, bytes) in damages {
            std::fs::write(&path, bytes).unwrap();
            let got = nvrtc::compile_cached(file, src, target, Some(&dir)).unwrap();
            assert!(!got.from_cache, "{target}: a cache file {what} was trusted");
            assert_eq!(got.bytes, fresh.bytes, "{target}: {what}");
            assert_eq!(std::fs::read(&path).unwrap(), whole, "{target}: {what}: the cache file is repaired");
        }
        assert!(nvrtc::compile_cached(file, src, target, Some(&dir)).unwrap().from_cache);
    }
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
