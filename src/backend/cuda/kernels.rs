//! The GPU kernels embedded in this binary (build.rs): per module of kernels/*.cu, PTX
//! (compute_90, JIT-compiled by the driver on any GPU of compute capability 9.0 or newer) and an
//! sm_90 cubin (loaded as is on H100/H200). Compiled by nvcc at build time, or taken from the
//! committed kernels/generated/ on a machine without nvcc. Empty with `HAVE_PTX == false` when
//! neither was possible; the emulator (`super::emu`) works regardless.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// PTX text of module `name` (the file stem of kernels/<name>.cu).
pub fn ptx_module(name: &str) -> Option<&'static str> {
    PTX_MODULES.iter().find(|(n, _)| *n == name).map(|(_, ptx)| *ptx)
}

/// sm_90 cubin of module `name`.
pub fn cubin_module(name: &str) -> Option<&'static [u8]> {
    CUBIN_MODULES.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// Module that defines kernel `kernel`, for loading it by kernel name alone.
pub fn module_of(kernel: &str) -> Option<&'static str> {
    super::emu::find_kernel(kernel).map(|k| k.module)
}

/// What `rotvar info` says about the embedded kernels, one line per module after a header.
pub fn describe() -> Vec<String> {
    if !HAVE_PTX {
        return vec![format!("not embedded: {KERNEL_ORIGIN}")];
    }
    let mut lines = vec![
        format!("{KERNEL_ORIGIN}"),
        format!("sources sha256 {SOURCE_SHA256} (kernels/*.cu, *.cuh)"),
        format!(
            "{} modules, {} kernels; PTX compute_90 for any GPU of compute capability >= 9.0, cubin sm_{}{} loaded without JIT",
            PTX_MODULES.len(),
            super::emu::kernels().len(),
            CUBIN_CC.0,
            CUBIN_CC.1
        ),
    ];
    for (name, ptx) in PTX_MODULES {
        let n = super::emu::kernels().iter().filter(|k| k.module == *name).count();
        let cubin =
            cubin_module(name).map_or("no cubin".to_string(), |c| format!("cubin {} KiB", c.len().div_ceil(1024)));
        lines.push(format!("  {name}: {n} kernels, PTX {} KiB, {cubin}", ptx.len().div_ceil(1024)));
    }
    lines
}
