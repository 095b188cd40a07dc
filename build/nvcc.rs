//! Compiling kernels/*.cu for the GPU: PTX (compute_90, JIT-compiled by the driver on any GPU of
//! compute capability 9.0 or newer) and an sm_90 cubin (loaded as is on H100/H200).
//!
//! One file, included by build.rs and by build/gen_kernels.rs, so the flags, the source hash and
//! the manifest that the committed kernels/generated/ files carry cannot drift from what a build
//! with nvcc produces. Standard library only: gen_kernels.rs is compiled with a bare `rustc`.

// Each of the two programs that include this file uses only part of it.
#![allow(dead_code)]

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// No implicit contraction: a*b+c stays a rounded multiply and a rounded add, as in the
/// emulator (g++ -ffp-contract=off) and the CPU twins; kernels that want an FMA write fmaf.
pub const NVCC_FLAGS: &[&str] = &["-ptx", "-arch=compute_90", "-O3", "--std=c++17", "-lineinfo", "-fmad=false"];
pub const PTXAS_FLAGS: &[&str] = &["-arch=sm_90", "-O3", "-lineinfo", "--warn-on-spills"];
/// The compute capability the embedded cubin runs on (a cubin for sm_90 loads on 9.0 only).
pub const CUBIN_CC: (u32, u32) = (9, 0);
/// The H100 driver in use (CUDA 13.0) rejects newer PTX ISA versions.
pub const MAX_PTX_VERSION: (u32, u32) = (9, 0);
pub const MANIFEST: &str = "manifest.txt";

/// nvcc from, in this order: $NVCC, $CUDA_PATH/bin, $CUDA_HOME/bin, /usr/local/cuda/bin, PATH.
/// Returns the path and where it was found. A set $NVCC that is not a file is an error, not a
/// reason to look elsewhere: the user asked for that one.
pub fn find_nvcc() -> Result<Option<(PathBuf, String)>, String> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(Some((p, "$NVCC".into())))
        } else {
            Err(format!("NVCC={} does not exist", p.display()))
        };
    }
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.is_file() {
                return Ok(Some((p, format!("${var}/bin"))));
            }
        }
    }
    let default = Path::new("/usr/local/cuda/bin/nvcc");
    if default.is_file() {
        return Ok(Some((default.to_path_buf(), "/usr/local/cuda/bin".into())));
    }
    Ok(env::var_os("PATH")
        .and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file()))
        .map(|p| (p, "PATH".into())))
}

/// The last line of `nvcc --version`, e.g. "Build cuda_13.0.r13.0/compiler.36424714_0".
pub fn nvcc_version(nvcc: &Path) -> Result<String, String> {
    let o = Command::new(nvcc).arg("--version").output().map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    match text.lines().rev().find(|l| !l.trim().is_empty()) {
        Some(l) if o.status.success() => Ok(l.trim().to_string()),
        _ => Err(format!("{} --version failed: {}", nvcc.display(), String::from_utf8_lossy(&o.stderr))),
    }
}

/// The kernel sources the GPU build reads: kernels/*.cu and kernels/*.cuh, by name. The
/// emulator's files (kernels/emu/) do not reach nvcc.
pub fn kernel_sources(kdir: &Path) -> Result<Vec<PathBuf>, String> {
    let rd = fs::read_dir(kdir).map_err(|e| format!("reading {}: {e}", kdir.display()))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "cu" || e == "cuh"))
        .collect();
    v.sort();
    Ok(v)
}

/// sha256 over every kernel source: for each file in name order, "<name>\n<byte length>\n<bytes>".
pub fn source_hash(kdir: &Path) -> Result<String, String> {
    let mut all = Vec::new();
    for p in kernel_sources(kdir)? {
        let bytes = fs::read(&p).map_err(|e| format!("reading {}: {e}", p.display()))?;
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        all.extend_from_slice(format!("{name}\n{}\n", bytes.len()).as_bytes());
        all.extend_from_slice(&bytes);
    }
    Ok(sha256_hex(&all))
}

pub fn ptx_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx.lines().find(|l| l.trim_start().starts_with(".version"))?;
    let v = line.split_whitespace().nth(1)?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// -lineinfo writes absolute paths into `.file` directives: kernel sources become
/// "kernels/<name>", CUDA headers "cuda/include/<rest>". The names of inlined functions with
/// internal linkage (in `.debug_str`) carry a hash of the source's absolute path,
/// `_INTERNAL_<8 hex>_`: it becomes zeros. So the PTX and the cubin assembled from it are the
/// same bytes whatever the checkout and the nvcc install paths.
pub fn relativize_file_paths(ptx: &str, kdir: &Path) -> String {
    let kprefix = format!("{}/", kdir.display());
    let mut out = String::with_capacity(ptx.len());
    let mut in_debug_str = false;
    let mut b8_lines: Vec<Vec<u8>> = Vec::new();
    for line in ptx.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with(".section") {
            in_debug_str = t.split_whitespace().nth(1) == Some(".debug_str");
        }
        if in_debug_str {
            if let Some(bytes) = t.strip_prefix(".b8 ").and_then(parse_b8) {
                b8_lines.push(bytes);
                continue;
            }
            flush_b8(&mut b8_lines, &mut out);
        }
        if let (true, Some(q0)) = (t.starts_with(".file"), line.find('"')) {
            if let Some(len) = line[q0 + 1..].find('"') {
                let path = &line[q0 + 1..q0 + 1 + len];
                let rel = if let Some(rest) = path.strip_prefix(&kprefix) {
                    format!("kernels/{rest}")
                } else if let Some(i) = path.rfind("/include/") {
                    format!("cuda/include/{}", &path[i + "/include/".len()..])
                } else {
                    path.rsplit('/').next().unwrap_or(path).to_string()
                };
                out.push_str(&line[..q0 + 1]);
                out.push_str(&rel);
                out.push_str(&line[q0 + 1 + len..]);
                continue;
            }
        }
        out.push_str(line);
    }
    flush_b8(&mut b8_lines, &mut out);
    out
}

fn parse_b8(list: &str) -> Option<Vec<u8>> {
    list.split(',').map(|v| v.trim().parse::<u8>().ok()).collect()
}

/// Re-emits a run of `.b8` lines, line for line, with path hashes in internal names zeroed.
fn flush_b8(lines: &mut Vec<Vec<u8>>, out: &mut String) {
    if lines.is_empty() {
        return;
    }
    let mut all: Vec<u8> = lines.concat();
    let tag = b"_INTERNAL_";
    let mut i = 0;
    while i + tag.len() + 9 <= all.len() {
        let h = i + tag.len();
        if &all[i..h] == tag && all[h..h + 8].iter().all(u8::is_ascii_hexdigit) && all[h + 8] == b'_' {
            all[h..h + 8].fill(b'0');
            i = h + 9;
        } else {
            i += 1;
        }
    }
    let mut at = 0;
    for l in lines.drain(..) {
        let vals: Vec<String> = all[at..at + l.len()].iter().map(|b| b.to_string()).collect();
        let _ = writeln!(out, ".b8 {}", vals.join(","));
        at += l.len();
    }
}

pub struct Compiled {
    pub ptx: String,
    pub cubin: Vec<u8>,
    /// nvcc's and ptxas's messages (warnings; ptxas -v resource lines are not requested).
    pub messages: String,
}

/// Compiles kernels/<name>.cu to PTX and assembles that PTX with ptxas into an sm_90 cubin, in
/// `work` (a scratch folder for this module). ptxas also surfaces at build time the errors the
/// driver's JIT would otherwise hit at load time.
pub fn compile_module(nvcc: &Path, kdir: &Path, name: &str, work: &Path) -> Result<Compiled, String> {
    fs::create_dir_all(work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let raw = work.join(format!("{name}.raw.ptx"));
    let mut cmd = Command::new(nvcc);
    cmd.args(NVCC_FLAGS).arg("-I").arg(kdir);
    if let Some(inc) = nvcc.parent().and_then(|b| b.parent()).map(|r| r.join("include")).filter(|p| p.is_dir()) {
        cmd.arg("-I").arg(inc);
    }
    cmd.arg("-o").arg(&raw).arg(kdir.join(format!("{name}.cu")));
    let o = cmd.output().map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let mut messages = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(format!("nvcc failed on {name}.cu:\n{messages}"));
    }
    let text = fs::read_to_string(&raw).map_err(|e| format!("reading {}: {e}", raw.display()))?;
    let ptx = relativize_file_paths(&text, kdir);
    match ptx_version(&ptx) {
        Some(v) if v <= MAX_PTX_VERSION => {}
        Some((a, b)) => {
            return Err(format!(
                "{name}.ptx has PTX ISA .version {a}.{b}, newer than {}.{} which the CUDA 13.0 driver on the \
                 target accepts. Pin the compiler: pip install nvidia-nvvm==13.0.88 \
                 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88",
                MAX_PTX_VERSION.0, MAX_PTX_VERSION.1
            ))
        }
        None => return Err(format!("{name}.ptx has no .version line")),
    }
    let ptx_path = work.join(format!("{name}.ptx"));
    let cubin_path = work.join(format!("{name}.sm_90.cubin"));
    fs::write(&ptx_path, &ptx).map_err(|e| format!("writing {}: {e}", ptx_path.display()))?;
    let ptxas = nvcc.with_file_name("ptxas");
    if !ptxas.is_file() {
        return Err(format!("ptxas is not beside {} (every CUDA install has both)", nvcc.display()));
    }
    // ptxas records the size and mtime of each `.file` it finds relative to its working
    // directory; in the scratch folder it finds none, so the cubin does not depend on them.
    let o = Command::new(&ptxas)
        .current_dir(work)
        .args(PTXAS_FLAGS)
        .arg("-o")
        .arg(&cubin_path)
        .arg(&ptx_path)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
    let s = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(format!("ptxas rejected {name}.ptx:\n{s}"));
    }
    messages += &s;
    let cubin = fs::read(&cubin_path).map_err(|e| format!("reading {}: {e}", cubin_path.display()))?;
    Ok(Compiled { ptx, cubin, messages })
}

/// What a set of generated kernels was made from; kernels/generated/manifest.txt.
#[derive(Debug, PartialEq)]
pub struct Manifest {
    pub source_sha256: String,
    pub nvcc_version: String,
    pub nvcc_flags: String,
    pub ptxas_flags: String,
    /// (module, sha256 of its PTX, sha256 of its cubin), by module name.
    pub modules: Vec<(String, String, String)>,
}

impl Manifest {
    pub fn new(source_sha256: String, nvcc_version: String, modules: &[(String, Compiled)]) -> Manifest {
        Manifest {
            source_sha256,
            nvcc_version,
            nvcc_flags: NVCC_FLAGS.join(" "),
            ptxas_flags: PTXAS_FLAGS.join(" "),
            modules: modules
                .iter()
                .map(|(n, c)| (n.clone(), sha256_hex(c.ptx.as_bytes()), sha256_hex(&c.cubin)))
                .collect(),
        }
    }

    pub fn render(&self) -> String {
        let mut s = String::from(
            "# Kernels compiled from kernels/*.cu, *.cuh for builds without nvcc. Regenerate with\n\
             # .ci/gen-kernels.sh; never edit by hand.\n",
        );
        let _ = writeln!(s, "source_sha256 {}", self.source_sha256);
        let _ = writeln!(s, "nvcc {}", self.nvcc_version);
        let _ = writeln!(s, "nvcc_flags {}", self.nvcc_flags);
        let _ = writeln!(s, "ptxas_flags {}", self.ptxas_flags);
        for (m, p, c) in &self.modules {
            let _ = writeln!(s, "module {m} ptx_sha256 {p} cubin_sha256 {c}");
        }
        s
    }

    pub fn parse(text: &str) -> Result<Manifest, String> {
        let mut m = Manifest {
            source_sha256: String::new(),
            nvcc_version: String::new(),
            nvcc_flags: String::new(),
            ptxas_flags: String::new(),
            modules: Vec::new(),
        };
        for (i, line) in text.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (key, rest) = line.split_once(' ').ok_or_else(|| format!("line {}: no value", i + 1))?;
            match key {
                "source_sha256" => m.source_sha256 = rest.into(),
                "nvcc" => m.nvcc_version = rest.into(),
                "nvcc_flags" => m.nvcc_flags = rest.into(),
                "ptxas_flags" => m.ptxas_flags = rest.into(),
                "module" => match rest.split(' ').collect::<Vec<_>>()[..] {
                    [name, "ptx_sha256", p, "cubin_sha256", c] => m.modules.push((name.into(), p.into(), c.into())),
                    _ => return Err(format!("line {}: malformed module line", i + 1)),
                },
                other => return Err(format!("line {}: unknown key `{other}`", i + 1)),
            }
        }
        if m.source_sha256.is_empty() || m.modules.is_empty() {
            return Err("no source_sha256 or no module lines".into());
        }
        Ok(m)
    }

    /// Why these files cannot stand in for a build with nvcc now, if they cannot.
    pub fn stale_because(&self, source_sha256: &str) -> Option<String> {
        if self.source_sha256 != source_sha256 {
            return Some(format!(
                "they were compiled from kernel sources with sha256 {}, the sources now hash to {source_sha256}",
                self.source_sha256
            ));
        }
        if self.nvcc_flags != NVCC_FLAGS.join(" ") || self.ptxas_flags != PTXAS_FLAGS.join(" ") {
            return Some("they were compiled with other nvcc/ptxas flags than build/nvcc.rs sets now".into());
        }
        None
    }
}

/// FIPS 180-4 SHA-256 (no crates here: see the module comment).
pub fn sha256_hex(data: &[u8]) -> String {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64).wrapping_mul(8)).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, c) in block.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh.wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            (hh, g, f, e, d, c, b, a) = (g, f, e, d.wrapping_add(t1), c, b, a, t1.wrapping_add(t2));
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *x = x.wrapping_add(y);
        }
    }
    h.iter().map(|x| format!("{x:08x}")).collect()
}
