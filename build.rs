//! Builds the CUDA kernels in kernels/*.cu two ways:
//!  * PTX via nvcc (OUT_DIR/ptx.rs), for the real GPU backend, when nvcc exists;
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
use std::process::Command;

const PIP_HINT: &str = "pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
     nvidia-cuda-runtime==13.0.96 nvidia-nvvm==13.0.88 (or `export NVCC=$(bash .ci/install-nvcc.sh)`), \
     then set NVCC=<site-packages>/nvidia/cu13/bin/nvcc";
/// The H100 driver in use (CUDA 13.0) rejects newer PTX ISA versions.
const MAX_PTX_VERSION: (u32, u32) = (9, 0);

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

fn find_nvcc() -> Result<Option<PathBuf>, String> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(Some(p)) } else { Err(format!("NVCC={} does not exist", p.display())) };
    }
    if let Some(home) = env::var_os("CUDA_HOME").filter(|p| !p.is_empty()) {
        let p = Path::new(&home).join("bin").join("nvcc");
        if p.is_file() {
            return Ok(Some(p));
        }
    }
    Ok(env::var_os("PATH").and_then(|path| env::split_paths(&path).map(|d| d.join("nvcc")).find(|p| p.is_file())))
}

fn ptx_version(ptx: &str) -> Option<(u32, u32)> {
    let line = ptx.lines().find(|l| l.trim_start().starts_with(".version"))?;
    let v = line.split_whitespace().nth(1)?;
    let (a, b) = v.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Compiles one module to PTX and assembles it with ptxas (when present) so
/// errors the driver's JIT would hit at load time surface at build time.
fn compile_ptx(nvcc: &Path, m: &Module, kdir: &Path, ptx_dir: &Path) -> Result<(PathBuf, String), String> {
    let ptx = ptx_dir.join(format!("{}.ptx", m.name));
    let mut cmd = Command::new(nvcc);
    cmd.args(["-ptx", "-arch=compute_90", "-O3", "--std=c++17", "-lineinfo"]).arg("-I").arg(kdir);
    if let Some(inc) = nvcc.parent().and_then(|b| b.parent()).map(|r| r.join("include")).filter(|p| p.is_dir()) {
        cmd.arg("-I").arg(inc);
    }
    cmd.arg("-o").arg(&ptx).arg(&m.path);
    let o = cmd.output().map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    let mut msgs = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    if !o.status.success() {
        return Err(format!("nvcc failed on {}.cu:\n{msgs}", m.name));
    }
    let text = fs::read_to_string(&ptx).map_err(|e| format!("reading {}: {e}", ptx.display()))?;
    match ptx_version(&text) {
        Some(v) if v <= MAX_PTX_VERSION => {}
        Some((a, b)) => {
            return Err(format!(
                "{}.ptx has PTX ISA .version {a}.{b}, newer than {}.{} which the CUDA 13.0 driver on the \
                 target accepts. Pin the compiler: pip install nvidia-nvvm==13.0.88 \
                 nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88",
                m.name, MAX_PTX_VERSION.0, MAX_PTX_VERSION.1
            ))
        }
        None => return Err(format!("{}.ptx has no .version line", m.name)),
    }
    for k in &m.kernels {
        if !text.contains(&format!(".entry {}(", k.name)) {
            return Err(format!("{}.ptx lacks entry `{}`; was it compiled out by #ifdef?", m.name, k.name));
        }
    }
    let ptxas = nvcc.with_file_name("ptxas");
    if ptxas.is_file() {
        let o = Command::new(&ptxas)
            .args(["-arch=sm_90", "-O3", "--warn-on-spills"])
            .arg("-o")
            .arg(ptx_dir.join(format!("{}.cubin", m.name)))
            .arg(&ptx)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
        let s = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            return Err(format!("ptxas rejected {}.ptx:\n{s}", m.name));
        }
        msgs += &s;
    }
    Ok((ptx, msgs))
}

fn build_ptx(modules: &[Module], kdir: &Path, out: &Path) {
    let require = env::var("ROTVAR_REQUIRE_NVCC").is_ok_and(|v| v == "1");
    let write = |have: bool, entries: &[(String, PathBuf)]| {
        let mut s = format!(
            "/// Whether nvcc compiled every kernel module at build time.\npub const HAVE_PTX: bool = {have};\n"
        );
        s += "/// (module name = kernels/<name>.cu stem, PTX text), compute_90.\npub const PTX_MODULES: &[(&str, &str)] = &[\n";
        for (name, path) in entries {
            let _ = writeln!(s, "    ({name:?}, include_str!({:?})),", path.display().to_string());
        }
        s += "];\n";
        fs::write(out.join("ptx.rs"), s).unwrap_or_else(|e| fail(&format!("writing ptx.rs: {e}")));
    };
    let nvcc = match find_nvcc() {
        Ok(Some(n)) => n,
        found => {
            let why = found.err().unwrap_or_else(|| "nvcc not found ($NVCC, $CUDA_HOME/bin, PATH)".into());
            if require {
                fail(&format!("ROTVAR_REQUIRE_NVCC=1 but {why}. Get it with: {PIP_HINT}"));
            }
            warn(&format!(
                "{why}: GPU kernels not compiled to PTX (emulated tests still run). Get nvcc with: {PIP_HINT}. \
                 PATH changes alone do not re-run this build script; set NVCC."
            ));
            write(false, &[]);
            return;
        }
    };
    let ptx_dir = out.join("ptx");
    fs::create_dir_all(&ptx_dir).unwrap_or_else(|e| fail(&format!("creating {}: {e}", ptx_dir.display())));
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = modules.iter().map(|m| s.spawn(|| compile_ptx(&nvcc, m, kdir, &ptx_dir))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("nvcc worker panicked".into()))).collect()
    });
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (m, r) in modules.iter().zip(results) {
        match r {
            Ok((path, msgs)) => {
                warn(&msgs);
                entries.push((m.name.clone(), path));
            }
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        let all = errors.join("\n");
        if require {
            fail(&format!("kernel compilation failed (ROTVAR_REQUIRE_NVCC=1):\n{all}"));
        }
        warn(&format!("kernel compilation failed; GPU backend disabled (HAVE_PTX=false):\n{all}"));
        write(false, &[]);
        return;
    }
    write(true, &entries);
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
