//! PTX for the real GPU backend, compiled from kernels/*.cu by build.rs
//! (nvcc -ptx -arch=compute_90). Empty with `HAVE_PTX == false` when the
//! build machine has no nvcc; the emulator (`super::emu`) works regardless.

include!(concat!(env!("OUT_DIR"), "/ptx.rs"));

/// PTX text of module `name` (the file stem of kernels/<name>.cu).
pub fn ptx_module(name: &str) -> Option<&'static str> {
    PTX_MODULES.iter().find(|(n, _)| *n == name).map(|(_, ptx)| *ptx)
}

/// Module that defines kernel `kernel`, for loading it by kernel name alone.
pub fn module_of(kernel: &str) -> Option<&'static str> {
    super::emu::find_kernel(kernel).map(|k| k.module)
}
