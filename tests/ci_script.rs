//! CI's own logic (`.ci/run` and the steps in `.ci/lib.sh`), tried on this machine: on a machine
//! without g++, where CI may not install it, CI must stop with a clear error before it runs any
//! test, instead of letting the kernel-emulator tests print "skipped" and pass. g++ is hidden
//! by running the scripts with a `PATH` that holds every program of /usr/bin and /bin except the
//! C++ and C compilers.
//!
//! What it is not: a run of CI itself (that is `.ci/run`, minutes long); with g++ hidden the
//! script stops at its first step, so nothing is installed or built here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{text, TempDir};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A folder of links to every program in /usr/bin and /bin, except the compilers.
fn path_without_compilers(dir: &TempDir) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let hidden = |name: &str| {
        ["g++", "c++", "gcc", "cc", "clang", "clang++", "cpp"].contains(&name)
            || name.contains("-g++")
            || name.starts_with("g++-")
            || name.contains("-gcc")
            || name.starts_with("gcc-")
            || name.starts_with("clang")
    };
    for folder in ["/usr/bin", "/bin"] {
        for entry in std::fs::read_dir(folder).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let link = bin.join(&name);
            if !hidden(&name) && !link.exists() {
                let _ = std::os::unix::fs::symlink(entry.path(), link);
            }
        }
    }
    bin
}

/// Runs `bash -c SCRIPT` in the repository with g++ hidden and installing forbidden.
fn without_gxx(script: &str) -> Output {
    let tmp = TempDir::new("ci-no-gxx");
    let bin = path_without_compilers(&tmp);
    let bash = bin.join("bash");
    assert!(bash.exists(), "no bash in /usr/bin or /bin");
    Command::new(&bash)
        .arg("-c")
        .arg(script)
        .current_dir(ROOT)
        .env("PATH", &bin)
        .env("MEDCNN_CI_INSTALL", "0")
        .env_remove("CXX")
        .env_remove("MEDCNN_REQUIRE_GXX")
        .output()
        .expect("run bash")
}

#[track_caller]
fn assert_stops_for_gxx(out: &Output) {
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let ctx = format!("\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}");
    assert!(!out.status.success(), "CI went on without g++{ctx}");
    let line = stderr.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line{ctx}"));
    for needle in ["g++", "tests/kernels_emulated.rs", "apt-get install -y g++"] {
        assert!(line.contains(needle), "the error does not say {needle:?}{ctx}");
    }
    assert!(!stdout.contains("cargo ") && !stderr.contains("Compiling"), "CI got past the g++ step{ctx}");
}

/// The step alone: `require_gxx` fails and says what is missing and how to get it.
#[test]
fn the_gxx_step_fails_without_gxx() {
    let out = without_gxx("source .ci/lib.sh && require_gxx && echo \"REQUIRE=$MEDCNN_REQUIRE_GXX\"");
    assert_stops_for_gxx(&out);
    assert!(!text(&out.stdout).contains("REQUIRE=1"));
}

/// The whole script: `.ci/run` stops at that step, before it installs, builds or tests anything.
#[test]
fn ci_fails_on_a_machine_without_gxx() {
    let out = without_gxx("exec .ci/run");
    assert_stops_for_gxx(&out);
}

/// Where g++ exists the step passes and makes the emulator tests required.
#[test]
fn the_gxx_step_passes_and_requires_the_emulator_where_gxx_exists() {
    let found = Command::new("g++").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        return common::skip_unless_required("GXX", "no g++ on this machine to see the CI step pass");
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg("source .ci/lib.sh && require_gxx && echo \"REQUIRE=$MEDCNN_REQUIRE_GXX\"")
        .current_dir(ROOT)
        .env("MEDCNN_CI_INSTALL", "0")
        .env_remove("CXX")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("REQUIRE=1"), "{}", text(&out.stdout));
}

/// `.ci/run` runs the README's test command, after every `require_*` step and with every
/// `MEDCNN_REQUIRE_*` variable the tests know set.
#[test]
fn ci_runs_the_test_command_with_every_requirement() {
    let run = std::fs::read_to_string(Path::new(ROOT).join(".ci/run")).unwrap();
    let lines: Vec<&str> = run.lines().map(str::trim).collect();
    let at = |l: &str| lines.iter().position(|x| *x == l).unwrap_or_else(|| panic!(".ci/run has no line {l:?}"));
    let test = at("cargo test --release --features cuda");
    for step in
        ["source .ci/lib.sh", "require_gxx", "require_nvrtc", "require_chromium", "require_avx512_where_present"]
    {
        assert!(at(step) < test, "{step} comes after the tests in .ci/run");
    }
    assert!(at("export MEDCNN_REQUIRE_DATA=1") < test, "MEDCNN_REQUIRE_DATA is set after the tests");
}

/// Runs `require_avx512_where_present` on a made-up /proc/cpuinfo whose flags line is `flags`;
/// gives what it left in MEDCNN_REQUIRE_AVX512 and its stderr.
fn avx512_step(flags: &str) -> (String, String) {
    let tmp = TempDir::new("ci-cpuinfo");
    let cpuinfo = tmp.join("cpuinfo");
    std::fs::write(&cpuinfo, format!("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\n")).unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg("source .ci/lib.sh && require_avx512_where_present && echo \"REQUIRE=${MEDCNN_REQUIRE_AVX512:-unset}\"")
        .current_dir(ROOT)
        .env("MEDCNN_CPUINFO", &cpuinfo)
        .env_remove("MEDCNN_REQUIRE_AVX512")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    (text(&out.stdout).trim().to_string(), text(&out.stderr))
}

/// Where the CPU has AVX-512F, CI requires the AVX-512 unit tests to run; where it has not
/// (AVX2 only, or only AVX-512 extensions' names that merely contain "avx512f"), CI says on
/// stderr that the AVX-512 code goes unchecked and does not require it.
#[test]
fn ci_requires_avx512_exactly_where_the_cpu_has_it() {
    let (out, _) = avx512_step("fpu sse2 avx avx2 fma avx512f avx512dq avx512bw avx512vl");
    assert_eq!(out, "REQUIRE=1");
    let (out, _) = avx512_step("fpu sse2 avx avx2 avx512bw avx512f");
    assert_eq!(out, "REQUIRE=1", "avx512f as the last flag");
    let (out, err) = avx512_step("fpu sse2 avx avx2 fma sha_ni vaes");
    assert_eq!(out, "REQUIRE=unset");
    assert!(err.contains("no AVX-512F") && err.contains("not checked"), "{err}");
    let (out, _) = avx512_step("fpu avx2 xavx512fx");
    assert_eq!(out, "REQUIRE=unset", "a flag that only contains avx512f is not avx512f");
}
