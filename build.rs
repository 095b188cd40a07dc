//! Builds the CUDA kernels in kernels/*.cu two ways:
//!  * PTX and sm_90 cubin (OUT_DIR/ptx.rs), for the real GPU backend: by nvcc when it exists
//!    (build/nvcc.rs), else from the committed kernels/generated/ when they match the sources;
//!  * a host emulation static library via g++ (OUT_DIR/emu_table.rs), always,
//!    so every kernel's logic is tested on machines without a GPU.
//!
//! Kernel signatures are parsed here once and drive both the C++ launch shims
//! and the argument checks on the Rust side.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

const PIP_HINT: &str = "pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
     nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 (or `export NVCC=$(bash .ci/install-nvcc.sh)`), \
     then set NVCC=<site-packages>/nvidia/cu13/bin/nvcc";

fn fail(msg: &str) -> ! {
    eprintln!("\nerror: {msg}\n");
    std::process::exit(1);
}

fn warn(msg: &str) {
    for line in msg.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning={line}");
    }
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in ["NVCC", "CUDA_HOME", "ROTVAR_REQUIRE_NVCC"] {
        println!("cargo:rerun-if-env-changed={v}");
    }

    let mut sources: Vec<PathBuf> =
        fs::read_dir(&kdir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();

    let mut modules = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    for path in &sources {
        let module = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(path).unwrap_or_else(|e| fail(&format!("reading {}: {e}", path.display())));
        let kernels = parse_kernels(&text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        for k in &kernels {
            if k.name == "last_error" {
                fail(&format!("{}: kernel name `last_error` is reserved by the emulator", path.display()));
            }
            if let Some(other) = seen.insert(k.name.clone(), module.clone()) {
                fail(&format!(
                    "kernel `{}` is defined in both {other}.cu and {module}.cu; names must be unique \
                     because the emulator links all modules into one library",
                    k.name
                ));
            }
        }
        modules.push(Module { name: module, path: path.clone(), kernels });
    }

    // Deliberately broken kernels that prove the emulator's sanitizer catches each class of
    // bug (tests/sanitizer.rs). Emulator only: never compiled to PTX, never in the backend's table.
    let fixture_dir = root.join("tests").join("emu_fixtures");
    println!("cargo:rerun-if-changed={}", fixture_dir.display());
    let mut fixtures = Vec::new();
    let mut paths: Vec<PathBuf> =
        fs::read_dir(&fixture_dir).map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    paths.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    paths.sort();
    for path in paths {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("reading {}: {e}", path.display())));
        let kernels = parse_kernels(&text).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
        for k in &kernels {
            if let Some(other) = seen.insert(k.name.clone(), name.clone()) {
                fail(&format!("kernel `{}` is defined in both {other} and {name}.cu", k.name));
            }
        }
        fixtures.push(Module { name, path, kernels });
    }
    for path in sources.iter().chain(fixtures.iter().map(|m| &m.path)).chain([&kdir.join("rotvar_common.cuh")]) {
        let text = fs::read_to_string(path).unwrap_or_default();
        if let Some(t) = tokenize(&text).iter().find(|t| t.s == "__shared__") {
            fail(&format!(
                "{}:{}: declare static shared memory with ROTVAR_SHARED(type, name, [dims]) instead of \
                 __shared__, so that each emulated block gets its own copy",
                path.display(),
                t.line
            ));
        }
    }

    build_ptx(&modules, &kdir, &out);
    build_emu(&modules, &fixtures, &kdir, &out);
}

struct Module {
    name: String,
    path: PathBuf,
    kernels: Vec<Kernel>,
}

#[derive(PartialEq, Debug)]
struct Kernel {
    name: String,
    params: Vec<Param>,
}

#[derive(PartialEq, Debug)]
struct Param {
    /// Canonical C++ type, e.g. `const float*`, `long long`.
    cty: &'static str,
    /// Variant name of `ParamKind` in src/backend/cuda/emu.rs.
    kind: &'static str,
    name: String,
}

/// Accepted parameter types: (spellings after normalisation, canonical, kind).
const TYPES: &[(&[&str], &str, &str)] = &[
    (&["float*"], "float*", "PtrF32"),
    (&["const float*"], "const float*", "PtrF32Const"),
    (&["double*"], "double*", "PtrF64"),
    (&["const double*"], "const double*", "PtrF64Const"),
    (&["int*"], "int*", "PtrI32"),
    (&["const int*"], "const int*", "PtrI32Const"),
    (&["unsigned*", "unsigned int*"], "unsigned*", "PtrU32"),
    (&["const unsigned*", "const unsigned int*"], "const unsigned*", "PtrU32Const"),
    (&["int"], "int", "I32"),
    (&["unsigned", "unsigned int"], "unsigned", "U32"),
    (&["float"], "float", "F32"),
    (&["long long", "long long int"], "long long", "I64"),
    (&["unsigned long long", "unsigned long long int"], "unsigned long long", "U64"),
];

#[derive(Clone, Debug)]
struct Tok {
    s: String,
    line: usize,
}

/// Tokenises C++ source, dropping comments and preprocessor lines (macros are
/// not expanded, so kernel signatures must be written out literally).
fn tokenize(src: &str) -> Vec<Tok> {
    let b = src.as_bytes();
    let (mut i, mut line, mut toks) = (0usize, 1usize, Vec::new());
    let mut line_start = true;
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            line_start = true;
            i += 1;
            continue;
        }
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if line_start && c == b'#' {
            // Skip the directive including backslash continuations.
            while i < b.len() && b[i] != b'\n' {
                if b[i] == b'\\' && i + 1 < b.len() && b[i + 1] == b'\n' {
                    line += 1;
                    i += 1;
                }
                i += 1;
            }
            continue;
        }
        line_start = false;
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i < b.len() && !(b[i] == b'*' && b.get(i + 1) == Some(&b'/')) {
                line += (b[i] == b'\n') as usize;
                i += 1;
            }
            i += 2;
        } else if c == b'"' || c == b'\'' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != c {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            toks.push(Tok { s: src[start..i.min(b.len())].to_string(), line });
        } else if c.is_ascii_alphanumeric() || c == b'_' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
            toks.push(Tok { s: src[start..i].to_string(), line });
        } else {
            toks.push(Tok { s: (c as char).to_string(), line });
            i += 1;
        }
    }
    toks
}

/// Index just past the bracket group opening at `toks[open]`.
fn skip_group(toks: &[Tok], open: usize) -> Result<usize, String> {
    let mut depth = 0i32;
    for (j, t) in toks.iter().enumerate().skip(open) {
        match t.s.as_str() {
            "(" | "[" | "{" => depth += 1,
            ")" | "]" | "}" => {
                depth -= 1;
                if depth == 0 {
                    return Ok(j + 1);
                }
            }
            _ => {}
        }
    }
    Err(format!("line {}: unbalanced brackets", toks[open].line))
}

fn parse_kernels(src: &str) -> Result<Vec<Kernel>, String> {
    let toks = tokenize(src);
    let mut out: Vec<Kernel> = Vec::new();
    let form = "every kernel must be written `extern \"C\" __global__ void name(params)` (no templates, \
                no extern \"C\" blocks, no macros in the signature)";
    let mut i = 0;
    while i < toks.len() {
        if toks[i].s != "__global__" {
            i += 1;
            continue;
        }
        let line = toks[i].line;
        if i < 2 || toks[i - 2].s != "extern" || toks[i - 1].s != "\"C\"" {
            return Err(format!("line {line}: {form}"));
        }
        let mut j = i + 1;
        let skip_bounds = |j: &mut usize| -> Result<(), String> {
            if toks.get(*j).is_some_and(|t| t.s == "__launch_bounds__") {
                if toks.get(*j + 1).map(|t| t.s.as_str()) != Some("(") {
                    return Err(format!("line {line}: malformed __launch_bounds__"));
                }
                *j = skip_group(&toks, *j + 1)?;
            }
            Ok(())
        };
        skip_bounds(&mut j)?;
        if toks.get(j).map(|t| t.s.as_str()) != Some("void") {
            return Err(format!("line {line}: {form}"));
        }
        j += 1;
        skip_bounds(&mut j)?;
        let name = match toks.get(j) {
            Some(t) if is_ident(&t.s) => t.s.clone(),
            _ => return Err(format!("line {line}: {form}")),
        };
        if toks.get(j + 1).map(|t| t.s.as_str()) != Some("(") {
            return Err(format!("line {line}: kernel `{name}`: {form}"));
        }
        let close = skip_group(&toks, j + 1)?;
        let params = parse_params(&toks[j + 2..close - 1]).map_err(|e| format!("line {line}: kernel `{name}`: {e}"))?;
        let k = Kernel { name, params };
        match out.iter().find(|o| o.name == k.name) {
            Some(prev) if *prev != k => {
                return Err(format!("line {line}: kernel `{}` declared twice with different parameters", k.name))
            }
            Some(_) => {}
            None => out.push(k),
        }
        i = close;
    }
    Ok(out)
}

fn is_ident(s: &str) -> bool {
    s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn parse_params(toks: &[Tok]) -> Result<Vec<Param>, String> {
    if toks.is_empty() || (toks.len() == 1 && toks[0].s == "void") {
        return Ok(Vec::new());
    }
    let mut groups: Vec<Vec<&str>> = vec![Vec::new()];
    let mut depth = 0i32;
    for t in toks {
        match t.s.as_str() {
            "(" | "[" | "<" => depth += 1,
            ")" | "]" | ">" => depth -= 1,
            "," if depth == 0 => {
                groups.push(Vec::new());
                continue;
            }
            _ => {}
        }
        groups.last_mut().unwrap().push(t.s.as_str());
    }
    let allowed: Vec<&str> = TYPES.iter().map(|t| t.1).collect();
    let mut params = Vec::new();
    for (idx, g) in groups.iter().enumerate() {
        let g: Vec<&str> =
            g.iter().copied().filter(|s| !matches!(*s, "__restrict__" | "__restrict" | "restrict")).collect();
        let text = g.join(" ");
        let bad = || {
            format!(
                "parameter {idx} `{text}`: unsupported; parameters must be named and have one of the types {}",
                allowed.join(", ")
            )
        };
        let (name, ty) = match g.split_last() {
            Some((n, ty)) if is_ident(n) && !ty.is_empty() && !matches!(*n, "int" | "float" | "unsigned" | "long") => {
                (n.to_string(), ty)
            }
            _ => return Err(bad()),
        };
        let mut ty = ty.join(" ").replace(" *", "*");
        // Top-level const on a by-value scalar does not change the ABI.
        if !ty.ends_with('*') {
            if let Some(rest) = ty.strip_prefix("const ") {
                ty = rest.to_string();
            }
        }
        let (_, cty, kind) = TYPES.iter().find(|t| t.0.contains(&ty.as_str())).ok_or_else(bad)?;
        params.push(Param { cty, kind, name });
    }
    Ok(params)
}

// ------------------------------------------------------------------ nvcc/PTX

#[path = "build/nvcc.rs"]
mod nvcc;

/// Where the embedded GPU kernels come from, for ptx.rs.
enum Origin {
    Nvcc(String),
    Committed(String),
    None,
}

/// Embeds, per module, the PTX (any GPU of compute capability >= 9.0, JIT-compiled) and the
/// sm_90 cubin (H100/H200, no JIT): compiled now when nvcc is found, else the committed
/// kernels/generated/ files when they were made from the current sources.
fn build_ptx(modules: &[Module], kdir: &Path, out: &Path) {
    println!("cargo:rerun-if-changed=build/nvcc.rs");
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    let require = env::var("ROTVAR_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let source_sha256 = nvcc::source_hash(kdir).unwrap_or_else(|e| fail(&e));
    let why = match nvcc::find_nvcc() {
        Ok(Some((nvcc_path, from))) => match compile_all(&nvcc_path, modules, kdir, out) {
            Ok(entries) => {
                let version = nvcc::nvcc_version(&nvcc_path).unwrap_or_else(|e| fail(&e));
                warn(&format!("GPU kernels compiled by {} (found via {from}; {version})", nvcc_path.display()));
                let origin = format!("compiled at build time by nvcc ({version})");
                return write_ptx_rs(out, Origin::Nvcc(origin), &source_sha256, &entries);
            }
            Err(all) if require => fail(&format!("kernel compilation failed (ROTVAR_REQUIRE_NVCC=1):\n{all}")),
            Err(all) => format!("kernel compilation failed:\n{all}"),
        },
        Ok(None) => "nvcc not found ($NVCC, $CUDA_PATH/bin, $CUDA_HOME/bin, /usr/local/cuda/bin, PATH)".into(),
        Err(e) => e,
    };
    if require {
        fail(&format!("ROTVAR_REQUIRE_NVCC=1 but {why}. Get nvcc with: {PIP_HINT}"));
    }
    match committed_kernels(modules, kdir, &source_sha256) {
        Ok((entries, version)) => {
            warn(&format!("{why}\nGPU kernels: using the committed kernels/generated/ (compiled by nvcc {version})"));
            let origin = format!("committed kernels/generated/ (compiled by nvcc {version})");
            write_ptx_rs(out, Origin::Committed(origin), &source_sha256, &entries);
        }
        Err(e) => {
            warn(&format!(
                "{why}\nThe committed kernels/generated/ cannot stand in: {e}.\nThis build has NO GPU kernels \
                 (emulated tests still run). Get nvcc with: {PIP_HINT}, or regenerate with .ci/gen-kernels.sh. \
                 PATH changes alone do not re-run this build script; set NVCC."
            ));
            write_ptx_rs(out, Origin::None, &source_sha256, &[]);
        }
    }
}

/// (module, PTX file, cubin file) to embed.
type Entry = (String, PathBuf, PathBuf);

fn compile_all(nvcc_path: &Path, modules: &[Module], kdir: &Path, out: &Path) -> Result<Vec<Entry>, String> {
    let ptx_dir = out.join("ptx");
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = modules
            .iter()
            .map(|m| {
                let work = ptx_dir.join(&m.name);
                s.spawn(move || nvcc::compile_module(nvcc_path, kdir, &m.name, &work))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("nvcc worker panicked".into()))).collect()
    });
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (m, r) in modules.iter().zip(results) {
        match r.and_then(|c| check_entries(m, &c.ptx).map(|_| c)) {
            Ok(c) => {
                warn(&c.messages);
                let (ptx, cubin) =
                    (ptx_dir.join(format!("{}.ptx", m.name)), ptx_dir.join(format!("{}.sm_90.cubin", m.name)));
                fs::write(&ptx, &c.ptx).unwrap_or_else(|e| fail(&format!("writing {}: {e}", ptx.display())));
                fs::write(&cubin, &c.cubin).unwrap_or_else(|e| fail(&format!("writing {}: {e}", cubin.display())));
                entries.push((m.name.clone(), ptx, cubin));
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(errors.join("\n"))
    }
}

fn check_entries(m: &Module, ptx: &str) -> Result<(), String> {
    for k in &m.kernels {
        if !ptx.contains(&format!(".entry {}(", k.name)) {
            return Err(format!("{}.ptx lacks entry `{}`; was it compiled out by #ifdef?", m.name, k.name));
        }
    }
    Ok(())
}

/// The committed kernels/generated/ files, when their manifest says they were compiled from
/// the current sources with the current flags and every file has the bytes it records.
fn committed_kernels(modules: &[Module], kdir: &Path, source_sha256: &str) -> Result<(Vec<Entry>, String), String> {
    let gen = kdir.join("generated");
    let text = fs::read_to_string(gen.join(nvcc::MANIFEST)).map_err(|e| format!("no {}: {e}", nvcc::MANIFEST))?;
    let manifest = nvcc::Manifest::parse(&text).map_err(|e| format!("{}: {e}", nvcc::MANIFEST))?;
    if let Some(why) = manifest.stale_because(source_sha256) {
        return Err(why);
    }
    let mut entries = Vec::new();
    for m in modules {
        let (_, ptx_sha, cubin_sha) = manifest
            .modules
            .iter()
            .find(|(n, _, _)| *n == m.name)
            .ok_or_else(|| format!("module {} is not in the manifest", m.name))?;
        let (ptx, cubin) = (gen.join(format!("{}.ptx", m.name)), gen.join(format!("{}.sm_90.cubin", m.name)));
        for (path, want) in [(&ptx, ptx_sha), (&cubin, cubin_sha)] {
            let bytes = fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            if nvcc::sha256_hex(&bytes) != *want {
                return Err(format!("{} does not have the sha256 its manifest records", path.display()));
            }
        }
        check_entries(m, &fs::read_to_string(&ptx).map_err(|e| format!("reading {}: {e}", ptx.display()))?)?;
        entries.push((m.name.clone(), ptx, cubin));
    }
    Ok((entries, manifest.nvcc_version))
}

fn write_ptx_rs(out: &Path, origin: Origin, source_sha256: &str, entries: &[Entry]) {
    let (have, origin) = match origin {
        Origin::Nvcc(s) | Origin::Committed(s) => (true, s),
        Origin::None => (false, "none (no nvcc at build time and no usable kernels/generated/)".to_string()),
    };
    let mut s = String::from("// Generated by build.rs.\n");
    let _ = writeln!(
        s,
        "/// Whether every kernel module is embedded (PTX and sm_90 cubin).\npub const HAVE_PTX: bool = {have};"
    );
    let _ = writeln!(s, "/// Where the embedded kernels come from.\npub const KERNEL_ORIGIN: &str = {origin:?};");
    let _ = writeln!(
        s,
        "/// sha256 of the kernel sources (kernels/*.cu, *.cuh) the embedded kernels were compiled from.\n\
         pub const SOURCE_SHA256: &str = {source_sha256:?};"
    );
    let _ = writeln!(
        s,
        "/// Compute capability the embedded cubins are for.\npub const CUBIN_CC: (u32, u32) = {:?};",
        nvcc::CUBIN_CC
    );
    s += "/// (module name = kernels/<name>.cu stem, PTX text), compute_90.\npub const PTX_MODULES: &[(&str, &str)] = &[\n";
    for (name, ptx, _) in entries {
        let _ = writeln!(s, "    ({name:?}, include_str!({:?})),", ptx.display().to_string());
    }
    s += "];\n/// (module name, sm_90 cubin).\npub const CUBIN_MODULES: &[(&str, &[u8])] = &[\n";
    for (name, _, cubin) in entries {
        let _ = writeln!(s, "    ({name:?}, include_bytes!({:?})),", cubin.display().to_string());
    }
    s += "];\n";
    fs::write(out.join("ptx.rs"), s).unwrap_or_else(|e| fail(&format!("writing ptx.rs: {e}")));
}

// ------------------------------------------------------------- emulation lib

fn build_emu(modules: &[Module], fixtures: &[Module], kdir: &Path, out: &Path) {
    let emu_dir = out.join("emu");
    fs::create_dir_all(&emu_dir).unwrap_or_else(|e| fail(&format!("creating {}: {e}", emu_dir.display())));
    let header = kdir.join("emu").join("cuda_emu.h");
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .opt_level(2)
            .flag("-std=c++20")
            .flag("-pthread")
            .flag("-fno-strict-aliasing")
            // nvcc compiles with -fmad=false: neither side may contract a*b+c into an FMA.
            .flag("-ffp-contract=off")
            .flag("-Wno-unknown-pragmas")
            .flag("-Wno-unused-parameter")
            .include(kdir);
        b
    };

    // The kernels: every load and store calls a __tsan_* hook (runtime.cpp); no
    // ThreadSanitizer runtime is linked.
    let mut build = base();
    build
        .flag("-fsanitize=thread")
        .flag("--param=tsan-instrument-func-entry-exit=0")
        .flag("-include")
        .flag(header.to_str().unwrap_or_else(|| fail("kernels/ path is not UTF-8")));
    // Kernels are extern "C" for nvcc; renaming them in the emulation build
    // keeps a kernel called e.g. `scale` from colliding with libc symbols.
    for m in modules.iter().chain(fixtures) {
        for k in &m.kernels {
            build.define(&k.name, Some(format!("rotvar_kernel_{}", k.name).as_str()));
        }
    }
    let mut table = String::from("// Generated by build.rs from kernels/*.cu and tests/emu_fixtures/*.cu.\n");
    table += "unsafe extern \"C\" {\n    fn rotvar_emu_last_error() -> *const ::std::ffi::c_char;\n";
    let mut consts = String::from("pub const EMU_KERNELS: &[EmuKernel] = &[\n");
    let mut fixture_consts = String::from("pub const EMU_FIXTURES: &[EmuKernel] = &[\n");
    for (m, is_fixture) in modules.iter().map(|m| (m, false)).chain(fixtures.iter().map(|m| (m, true))) {
        // The shims share the kernels' translation unit, so the compiler checks
        // the parsed signature against the real definition.
        let mut cpp = format!("// Generated by build.rs.\n#include {:?}\n\n", m.path.display().to_string());
        for k in &m.kernels {
            let _ = writeln!(
                cpp,
                "extern \"C\" int rotvar_emu_{}(const rotvar_emu::EmuLaunch* cfg, void** args) {{",
                k.name
            );
            for (i, p) in k.params.iter().enumerate() {
                let _ = writeln!(cpp, "    {} a{i} = *static_cast<{}*>(args[{i}]);", p.cty, p.cty);
            }
            // Pointer arguments by name: the sanitizer checks that each is device memory and
            // names the argument a bad access went through.
            let ptrs: Vec<(usize, &Param)> =
                k.params.iter().enumerate().filter(|(_, p)| p.cty.ends_with('*')).collect();
            let names: Vec<String> = ptrs.iter().map(|(_, p)| format!("{:?}", p.name)).collect();
            let vals: Vec<String> = ptrs.iter().map(|(i, _)| format!("(const void*)a{i}")).collect();
            let _ = writeln!(
                cpp,
                "    static const char* const names[] = {{{}nullptr}};",
                names.iter().map(|n| format!("{n}, ")).collect::<String>()
            );
            let _ = writeln!(
                cpp,
                "    const void* const ptrs[] = {{{}nullptr}};",
                vals.iter().map(|v| format!("{v}, ")).collect::<String>()
            );
            let call: Vec<String> = (0..k.params.len()).map(|i| format!("a{i}")).collect();
            let _ = writeln!(
                cpp,
                "    return rotvar_emu::launch(cfg, {:?}, names, ptrs, {}, [=]() {{ {}({}); }});\n}}\n",
                k.name,
                ptrs.len(),
                k.name,
                call.join(", ")
            );
            let _ = writeln!(
                table,
                "    fn rotvar_emu_{}(cfg: *const EmuLaunch, args: *const *mut ::std::ffi::c_void) -> ::std::ffi::c_int;",
                k.name
            );
            let ps: Vec<String> = k
                .params
                .iter()
                .map(|p| format!("Param {{ kind: ParamKind::{}, name: {:?} }}", p.kind, p.name))
                .collect();
            let _ = writeln!(
                if is_fixture { &mut fixture_consts } else { &mut consts },
                "    EmuKernel {{ name: {:?}, module: {:?}, params: &[{}], func: rotvar_emu_{} }},",
                k.name,
                m.name,
                ps.join(", "),
                k.name
            );
        }
        let path = emu_dir.join(format!("{}{}.cpp", if is_fixture { "fixture_" } else { "" }, m.name));
        write_file(&path, &cpp);
        build.file(&path);
    }
    table += "}\n\n";
    table += &consts;
    table += "];\n";
    table += &fixture_consts;
    table += "];\n";
    build.compile("rotvar_emu");
    // The runtime implements the sanitizer's hooks, so it is compiled without them; linked after
    // the kernels, which need its symbols.
    base().file(kdir.join("emu").join("runtime.cpp")).compile("rotvar_emu_runtime");
    fs::write(out.join("emu_table.rs"), table).unwrap_or_else(|e| fail(&format!("writing emu_table.rs: {e}")));
}

fn write_file(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| fail(&format!("writing {}: {e}", path.display())));
}
