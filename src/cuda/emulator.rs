//! The CPU emulator as an `Exec`: `kernels/*.cu` compiled as C++20 by g++ together with
//! `kernels/emulate/cuda_emu.hpp` (blocks run in turn; each CUDA thread a fiber, or an OS
//! thread in the sanitizer builds; `__syncthreads` a real barrier) into
//! `kernels/emulate/harness.cpp`, a small process that keeps the "device" buffers and launches
//! kernels by name over a pipe.
//!
//! It exists for tests: the engine and the launchers in `ops` run on it unchanged, so the
//! kernels and the host code that drives them are checked against the CPU layers on a machine
//! without a GPU. It says nothing about speed. Built with a sanitizer, it also catches
//! out-of-bounds accesses (address) or missing `__syncthreads` (thread) in the kernels.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::exec::{DevPtr, Exec, Launch};
use super::sources::{COMMON, EMULATOR_FILES, KERNEL_FILES};

/// How the harness is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// -O2, CUDA threads as fibers: the fast one.
    Release,
    /// -fsanitize=address,undefined, CUDA threads as OS threads: out-of-bounds reads and
    /// writes, UB.
    Address,
    /// -fsanitize=thread, CUDA threads as OS threads: data races on shared memory, i.e. a
    /// missing or misplaced __syncthreads.
    Thread,
}

impl Flavor {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Flavor::Release => &["-O2"],
            Flavor::Address => &[
                "-O1",
                "-g",
                "-DMEDCNN_EMU_OS_THREADS",
                "-fno-omit-frame-pointer",
                "-fsanitize=address,undefined",
                "-fno-sanitize-recover=all",
            ],
            Flavor::Thread => &["-O1", "-g", "-DMEDCNN_EMU_OS_THREADS", "-fsanitize=thread"],
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Flavor::Release => "release",
            Flavor::Address => "asan",
            Flavor::Thread => "tsan",
        }
    }
}

/// The C++ compiler: `$CXX` or `g++`.
pub fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".into())
}

/// Whether the C++ compiler runs at all.
pub fn compiler_available() -> bool {
    Command::new(compiler())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Compiles the harness into `dir` (once per source version and flavor; later calls reuse the
/// binary) and returns its path.
pub fn build_harness(dir: &Path, flavor: Flavor) -> Result<PathBuf> {
    let mut hasher = Sha256::new();
    for (name, text) in [("common.cuh", COMMON)].into_iter().chain(KERNEL_FILES).chain(EMULATOR_FILES) {
        hasher.update(name.as_bytes());
        hasher.update(text.as_bytes());
    }
    for f in flavor.flags() {
        hasher.update(f.as_bytes());
    }
    let hash: String = hasher.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    let exe = dir.join(format!("medcnn-emu-{}-{hash}", flavor.tag()));
    if exe.exists() {
        return Ok(exe);
    }
    // Write the sources as the kernels/ folder lays them out, then compile.
    let src = dir.join(format!("medcnn-emu-src-{hash}"));
    std::fs::create_dir_all(src.join("emulate")).with_context(|| format!("creating {}", src.display()))?;
    for (name, text) in [("common.cuh", COMMON)].into_iter().chain(KERNEL_FILES).chain(EMULATOR_FILES) {
        std::fs::write(src.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    let tmp = dir.join(format!("medcnn-emu-{}-{hash}.tmp{}", flavor.tag(), std::process::id()));
    let out = Command::new(compiler())
        .args(["-std=c++20", "-march=native", "-ffp-contract=off", "-pthread", "-Wall", "-Wno-unknown-pragmas"])
        .args(flavor.flags())
        .arg(src.join("emulate/harness.cpp"))
        .arg("-o")
        .arg(&tmp)
        .output()
        .with_context(|| format!("running {} (set CXX to another C++20 compiler)", compiler()))?;
    if !out.status.success() {
        bail!("compiling the kernel emulator failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    std::fs::rename(&tmp, &exe).context("moving the emulator into place")?;
    // Best effort: drop the sources and this flavor's binaries of older source versions.
    let _ = std::fs::remove_dir_all(&src);
    let prefix = format!("medcnn-emu-{}-", flavor.tag());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && !name.contains(&hash) && !name.contains(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    Ok(exe)
}

/// A running harness process.
pub struct EmuExec {
    child: Child,
    tx: BufWriter<ChildStdin>,
    rx: BufReader<ChildStdout>,
    next_id: u32,
    sms: u32,
    max_grid: u32,
}

impl EmuExec {
    /// Starts the harness at `exe` (from `build_harness`). It pretends to have 4 SMs and caps
    /// grid-stride grids at 4 blocks, so plans and loops take their multi-block paths on
    /// small test shapes.
    pub fn spawn(exe: &Path) -> Result<Self> {
        Self::spawn_with(exe, Stdio::inherit())
    }

    /// As `spawn`, with the harness's stderr (sanitizer reports) discarded.
    pub fn spawn_quiet(exe: &Path) -> Result<Self> {
        Self::spawn_with(exe, Stdio::null())
    }

    fn spawn_with(exe: &Path, stderr: Stdio) -> Result<Self> {
        let mut child = Command::new(exe)
            // A sanitizer's first report ends the process, so the test that caused it fails.
            .env("TSAN_OPTIONS", "halt_on_error=1")
            .env("ASAN_OPTIONS", "detect_leaks=0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let tx = BufWriter::new(child.stdin.take().context("harness stdin")?);
        let rx = BufReader::new(child.stdout.take().context("harness stdout")?);
        Ok(EmuExec { child, tx, rx, next_id: 1, sms: 4, max_grid: 4 })
    }

    /// Changes the SM count the planner sees and the grid-stride cap.
    pub fn with_shape(mut self, sms: u32, max_grid: u32) -> Self {
        self.sms = sms;
        self.max_grid = max_grid;
        self
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.tx.write_all(bytes).context("writing to the emulator (did it crash? see stderr)")
    }

    /// Flushes the request and reads the status of the reply.
    fn finish(&mut self, what: &str) -> Result<()> {
        self.tx.flush().context("writing to the emulator (did it crash? see stderr)")?;
        let n = self.read_u32().with_context(|| format!("emulator died during {what} (see its stderr above)"))?;
        if n > 0 {
            let mut msg = vec![0; n as usize];
            self.rx.read_exact(&mut msg)?;
            bail!("emulator: {what}: {}", String::from_utf8_lossy(&msg));
        }
        Ok(())
    }

    fn read_u32(&mut self) -> Result<u32> {
        let mut b = [0; 4];
        self.rx.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn text(&mut self, op: u8, what: &str) -> Result<String> {
        self.send(&[op])?;
        self.finish(what)?;
        let n = self.read_u32()?;
        let mut t = vec![0; n as usize];
        self.rx.read_exact(&mut t)?;
        Ok(String::from_utf8_lossy(&t).into_owned())
    }

    /// `(struct name, sizeof)` of every parameter struct, as the C++ compiler lays them out.
    pub fn struct_sizes(&mut self) -> Result<Vec<(String, usize)>> {
        let t = self.text(b'S', "struct sizes")?;
        t.lines()
            .map(|l| {
                let (name, size) = l.split_once(' ').context("struct size line")?;
                Ok((name.to_string(), size.parse()?))
            })
            .collect()
    }

    /// The kernels the harness can launch.
    pub fn kernel_names(&mut self) -> Result<Vec<String>> {
        Ok(self.text(b'K', "kernel list")?.lines().map(str::to_string).collect())
    }
}

impl Drop for EmuExec {
    fn drop(&mut self) {
        let _ = self.tx.write_all(b"Q").and_then(|_| self.tx.flush());
        let _ = self.child.wait();
    }
}

impl Exec for EmuExec {
    fn describe(&self) -> String {
        "cuda emulator (kernels compiled for the CPU)".into()
    }

    fn sm_count(&self) -> u32 {
        self.sms
    }

    fn max_grid_blocks(&self) -> u32 {
        self.max_grid
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = vec![b'A'];
        req.extend(id.to_le_bytes());
        req.extend((bytes as u64).to_le_bytes());
        self.send(&req)?;
        self.finish("alloc")?;
        Ok(DevPtr((id as u64) << 40))
    }

    fn free(&mut self, ptr: DevPtr) -> Result<()> {
        let mut req = vec![b'F'];
        req.extend(((ptr.0 >> 40) as u32).to_le_bytes());
        self.send(&req)?;
        self.finish("free")
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<()> {
        let mut req = vec![b'U'];
        req.extend(dst.0.to_le_bytes());
        req.extend((src.len() as u64).to_le_bytes());
        self.send(&req)?;
        self.send(src)?;
        self.finish("upload")
    }

    fn download(&mut self, src: DevPtr, dst: &mut [u8]) -> Result<()> {
        let mut req = vec![b'D'];
        req.extend(src.0.to_le_bytes());
        req.extend((dst.len() as u64).to_le_bytes());
        self.send(&req)?;
        self.finish("download")?;
        self.rx.read_exact(dst).context("reading a download")?;
        Ok(())
    }

    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<()> {
        let mut req = vec![b'Z'];
        req.extend(dst.0.to_le_bytes());
        req.extend((bytes as u64).to_le_bytes());
        self.send(&req)?;
        self.finish("zero")
    }

    fn launch(&mut self, l: &Launch) -> Result<()> {
        let mut req = vec![b'L'];
        req.extend((l.kernel.len() as u16).to_le_bytes());
        req.extend(l.kernel.as_bytes());
        for v in l.grid.iter().chain(&l.block) {
            req.extend(v.to_le_bytes());
        }
        req.extend((l.params.len() as u32).to_le_bytes());
        req.extend(l.params);
        req.extend((l.ptrs.len() as u32).to_le_bytes());
        for p in l.ptrs {
            req.extend(p.0.to_le_bytes());
        }
        self.send(&req)?;
        self.finish(l.kernel)
    }

    fn sync(&mut self) -> Result<()> {
        Ok(())
    }
}
