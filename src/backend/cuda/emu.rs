//! Host emulation of the CUDA kernels in `kernels/*.cu` (see
//! `kernels/emu/README.md`). build.rs compiles every kernel with g++ against
//! `kernels/emu/cuda_emu.h` and generates one launch shim per kernel; this
//! module checks a launch against the kernel's parsed signature and runs it.
//!
//! [`KArg`], [`PackedArgs`], [`check_args`] and [`check_launch_dims`] are
//! meant to be shared with the real GPU launcher: the packed argument array
//! has exactly the layout `cuLaunchKernel` expects for `kernelParams`, and a
//! device pointer is just a `KArg::Ptr(u64)` there.

use anyhow::{bail, Result};
use std::ffi::{c_int, c_void};
use std::fmt;

/// One kernel argument. Pointers are plain addresses: host addresses for the
/// emulator, `CUdeviceptr` values for the GPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KArg {
    Ptr(u64),
    /// A host slice (tests of single kernels): the emulator copies it into a [`DeviceMem`] at
    /// the same address modulo 256 for the launch, so the sanitizer checks accesses against
    /// the slice's own bounds, and copies it back after (`write`).
    Host {
        addr: u64,
        bytes: u64,
        write: bool,
    },
    I32(i32),
    U32(u32),
    F32(f32),
    I64(i64),
    U64(u64),
}

impl KArg {
    pub fn ptr<T>(p: *const T) -> Self {
        KArg::Ptr(p as usize as u64)
    }
    pub fn ptr_mut<T>(p: *mut T) -> Self {
        KArg::Ptr(p as usize as u64)
    }
    /// A host slice the kernel reads (emulator only).
    pub fn slice<T>(s: &[T]) -> Self {
        KArg::Host { addr: s.as_ptr() as usize as u64, bytes: std::mem::size_of_val(s) as u64, write: false }
    }
    /// A host slice the kernel may write (emulator only).
    pub fn slice_mut<T>(s: &mut [T]) -> Self {
        KArg::Host { addr: s.as_mut_ptr() as usize as u64, bytes: std::mem::size_of_val(s) as u64, write: true }
    }
    fn type_name(&self) -> &'static str {
        match self {
            KArg::Ptr(_) | KArg::Host { .. } => "pointer",
            KArg::I32(_) => "I32 (int)",
            KArg::U32(_) => "U32 (unsigned)",
            KArg::F32(_) => "F32 (float)",
            KArg::I64(_) => "I64 (long long)",
            KArg::U64(_) => "U64 (unsigned long long)",
        }
    }
}

impl From<i32> for KArg {
    fn from(v: i32) -> Self {
        KArg::I32(v)
    }
}
impl From<u32> for KArg {
    fn from(v: u32) -> Self {
        KArg::U32(v)
    }
}
impl From<f32> for KArg {
    fn from(v: f32) -> Self {
        KArg::F32(v)
    }
}
impl From<i64> for KArg {
    fn from(v: i64) -> Self {
        KArg::I64(v)
    }
}
impl From<u64> for KArg {
    fn from(v: u64) -> Self {
        KArg::U64(v)
    }
}

/// Parameter type of a kernel, as parsed from its `.cu` signature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    PtrF32,
    PtrF32Const,
    PtrF64,
    PtrF64Const,
    PtrI32,
    PtrI32Const,
    PtrU32,
    PtrU32Const,
    I32,
    U32,
    F32,
    I64,
    U64,
}

impl ParamKind {
    pub fn c_type(self) -> &'static str {
        match self {
            ParamKind::PtrF32 => "float*",
            ParamKind::PtrF32Const => "const float*",
            ParamKind::PtrF64 => "double*",
            ParamKind::PtrF64Const => "const double*",
            ParamKind::PtrI32 => "int*",
            ParamKind::PtrI32Const => "const int*",
            ParamKind::PtrU32 => "unsigned*",
            ParamKind::PtrU32Const => "const unsigned*",
            ParamKind::I32 => "int",
            ParamKind::U32 => "unsigned",
            ParamKind::F32 => "float",
            ParamKind::I64 => "long long",
            ParamKind::U64 => "unsigned long long",
        }
    }
    pub fn is_ptr(self) -> bool {
        self.c_type().ends_with('*')
    }
    /// Exact match only: no implicit int/float conversions, so a swapped
    /// argument is an error rather than a silently reinterpreted value.
    pub fn accepts(self, a: &KArg) -> bool {
        matches!(
            (self, a),
            (k, KArg::Ptr(_) | KArg::Host { .. }) if k.is_ptr()
        ) || matches!(
            (self, a),
            (ParamKind::I32, KArg::I32(_))
                | (ParamKind::U32, KArg::U32(_))
                | (ParamKind::F32, KArg::F32(_))
                | (ParamKind::I64, KArg::I64(_))
                | (ParamKind::U64, KArg::U64(_))
        )
    }
}

#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub kind: ParamKind,
    pub name: &'static str,
}

/// Launch configuration handed to the C++ shims; mirrors
/// `rotvar_emu::EmuLaunch` in cuda_emu.h.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EmuLaunch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
}

/// Generated shim: runs the kernel over the whole grid; 0 on success.
pub type EmuFn = unsafe extern "C" fn(*const EmuLaunch, *const *mut c_void) -> c_int;

#[derive(Clone, Copy)]
pub struct EmuKernel {
    pub name: &'static str,
    /// kernels/<module>.cu, also the PTX module name.
    pub module: &'static str,
    pub params: &'static [Param],
    pub func: EmuFn,
}

impl fmt::Display for EmuKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, p) in self.params.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{} {}", p.kind.c_type(), p.name)?;
        }
        write!(f, ")")
    }
}

mod table {
    use super::{EmuKernel, EmuLaunch, Param, ParamKind};
    use std::ffi::CStr;
    include!(concat!(env!("OUT_DIR"), "/emu_table.rs"));

    unsafe extern "C" {
        pub(super) fn rotvar_emu_mem_alloc(bytes: usize, misalign: usize) -> *mut ::std::ffi::c_void;
        pub(super) fn rotvar_emu_mem_free(p: *mut ::std::ffi::c_void);
    }

    pub(super) fn last_error() -> String {
        // SAFETY: returns a pointer to a thread-local std::string's buffer
        // that stays valid until the next launch on this thread.
        let p = unsafe { rotvar_emu_last_error() };
        if p.is_null() {
            return String::from("unknown emulator error");
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

/// Every kernel found in kernels/*.cu, with its parsed signature.
pub fn kernels() -> &'static [EmuKernel] {
    table::EMU_KERNELS
}

pub fn find_kernel(name: &str) -> Option<&'static EmuKernel> {
    table::EMU_KERNELS.iter().find(|k| k.name == name)
}

/// The deliberately broken kernels of tests/emu_fixtures/*.cu, which prove that the
/// sanitizer catches each class of bug. Emulator only; not part of [`kernels`].
pub fn fixtures() -> &'static [EmuKernel] {
    table::EMU_FIXTURES
}

/// Emulated device memory: the only memory an emulated kernel may be given. Each buffer lies
/// between guard pages and red zones, starts 256-byte aligned like `cudaMalloc`'s, and is
/// registered with the sanitizer, which checks every access a kernel makes against its bounds
/// (memcheck) and for races. A fresh buffer holds 0xff bytes (NaN as f32/f64), since device
/// memory is never zeroed for you (initcheck).
pub struct DeviceMem<T: bytemuck::Pod> {
    ptr: std::ptr::NonNull<T>,
    len: usize,
}

// SAFETY: DeviceMem owns its mapping exclusively, like a Vec.
unsafe impl<T: bytemuck::Pod + Send> Send for DeviceMem<T> {}
unsafe impl<T: bytemuck::Pod + Sync> Sync for DeviceMem<T> {}

impl<T: bytemuck::Pod> DeviceMem<T> {
    /// `len` values of poison (all bits set).
    pub fn poisoned(len: usize) -> Self {
        Self::poisoned_at(len, 0)
    }
    /// `len` values of poison starting `misalign` bytes (< 256) past a 256-byte boundary.
    fn poisoned_at(len: usize, misalign: usize) -> Self {
        let bytes = len.checked_mul(std::mem::size_of::<T>()).expect("emulated buffer size overflows usize");
        // SAFETY: the runtime returns a mapping of at least `bytes` bytes at the asked alignment, or null.
        let p = unsafe { table::rotvar_emu_mem_alloc(bytes, misalign % 256) };
        let Some(ptr) = std::ptr::NonNull::new(p.cast::<T>()) else {
            panic!("the CUDA emulator could not map {bytes} bytes of device memory")
        };
        DeviceMem { ptr, len }
    }
    pub fn from_slice(v: &[T]) -> Self {
        let mut m = Self::poisoned(v.len());
        m.copy_from_slice(v);
        m
    }
    pub fn filled(len: usize, v: T) -> Self {
        let mut m = Self::poisoned(len);
        m.fill(v);
        m
    }
    /// Back to all bits set, as a fresh allocation.
    pub fn poison(&mut self) {
        bytemuck::cast_slice_mut::<T, u8>(self).fill(0xff);
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for DeviceMem<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: ptr is valid for len values for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> std::ops::DerefMut for DeviceMem<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<T: bytemuck::Pod> Drop for DeviceMem<T> {
    fn drop(&mut self) {
        // SAFETY: allocated by rotvar_emu_mem_alloc and freed once.
        unsafe { table::rotvar_emu_mem_free(self.ptr.as_ptr().cast()) }
    }
}

impl<T: bytemuck::Pod + fmt::Debug> fmt::Debug for DeviceMem<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// Checks `args` against the kernel's signature.
pub fn check_args(kernel: &EmuKernel, args: &[KArg]) -> Result<()> {
    if args.len() != kernel.params.len() {
        bail!("kernel {kernel}: expected {} arguments, got {}", kernel.params.len(), args.len());
    }
    for (i, (p, a)) in kernel.params.iter().zip(args).enumerate() {
        if !p.kind.accepts(a) {
            bail!(
                "kernel {}: argument {i} `{}` is `{}` but got {} ({a:?})",
                kernel.name,
                p.name,
                p.kind.c_type(),
                a.type_name()
            );
        }
    }
    Ok(())
}

/// Limits of an sm_90 GPU, enforced identically by the emulator so an
/// emulated-green launch is not rejected by the driver later.
pub const MAX_THREADS_PER_BLOCK: u64 = 1024;
pub const MAX_BLOCK_DIM: [u32; 3] = [1024, 1024, 64];
pub const MAX_GRID_DIM: [u32; 3] = [i32::MAX as u32, 65535, 65535];
/// Opt-in maximum dynamic shared memory per block on H100 (227 KiB).
pub const MAX_SHARED_BYTES: u32 = 227 * 1024;

pub fn check_launch_dims(grid: (u32, u32, u32), block: (u32, u32, u32), shared_bytes: u32) -> Result<()> {
    let g = [grid.0, grid.1, grid.2];
    let b = [block.0, block.1, block.2];
    for d in 0..3 {
        if g[d] == 0 || g[d] > MAX_GRID_DIM[d] {
            bail!("grid {grid:?}: dimension {d} must be in 1..={}", MAX_GRID_DIM[d]);
        }
        if b[d] == 0 || b[d] > MAX_BLOCK_DIM[d] {
            bail!("block {block:?}: dimension {d} must be in 1..={}", MAX_BLOCK_DIM[d]);
        }
    }
    let threads = b.iter().map(|&x| x as u64).product::<u64>();
    if threads > MAX_THREADS_PER_BLOCK {
        bail!("block {block:?} has {threads} threads; at most {MAX_THREADS_PER_BLOCK}");
    }
    if shared_bytes > MAX_SHARED_BYTES {
        bail!("{shared_bytes} bytes of dynamic shared memory requested; at most {MAX_SHARED_BYTES}");
    }
    Ok(())
}

/// Arguments laid out for `cuLaunchKernel`'s `kernelParams`: `ptrs()[i]`
/// points at the value of argument i (8-byte slot, value at its start).
pub struct PackedArgs {
    slots: Box<[u64]>,
    ptrs: Vec<*mut c_void>,
}

impl PackedArgs {
    pub fn new(args: &[KArg]) -> Self {
        let mut slots = vec![0u64; args.len()].into_boxed_slice();
        for (slot, a) in slots.iter_mut().zip(args) {
            let s = slot as *mut u64;
            // SAFETY: every value is at most 8 bytes and u64 slots are 8-aligned.
            unsafe {
                match *a {
                    KArg::Ptr(v) | KArg::U64(v) | KArg::Host { addr: v, .. } => s.write(v),
                    KArg::I64(v) => s.cast::<i64>().write(v),
                    KArg::I32(v) => s.cast::<i32>().write(v),
                    KArg::U32(v) => s.cast::<u32>().write(v),
                    KArg::F32(v) => s.cast::<f32>().write(v),
                }
            }
        }
        // The boxed slice never moves or reallocates, so these stay valid.
        let ptrs = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        PackedArgs { slots, ptrs }
    }
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
    pub fn as_ptr(&self) -> *const *mut c_void {
        self.ptrs.as_ptr()
    }
}

/// Runs kernel `name` on the host emulator; blocks until the grid finished.
///
/// Unknown kernels, argument count/type mismatches, invalid launch dimensions and pointer
/// arguments that are not [`DeviceMem`] return an error without running anything. Launches are
/// serialised process-wide; within one, blocks run concurrently in a varying order. Any
/// sanitizer finding (out-of-bounds access, uninitialised shared read, race, divergent or
/// deadlocked barrier) makes the launch return an error that names the kernel.
///
/// # Safety
/// Every `KArg::Ptr` must be null or point into a live [`DeviceMem`]; accesses beyond its
/// bounds are caught and reported, but accesses that land in another live buffer are not.
pub unsafe fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_bytes: u32,
    args: &[KArg],
) -> Result<()> {
    let Some(kernel) = find_kernel(name).or_else(|| fixtures().iter().find(|k| k.name == name)) else {
        let names: Vec<&str> = kernels().iter().map(|k| k.name).collect();
        bail!("unknown kernel `{name}`; kernels: {}", names.join(", "));
    };
    check_args(kernel, args)?;
    check_launch_dims(grid, block, shared_bytes)
        .map_err(|e| anyhow::anyhow!("kernel {}: invalid launch: {e}", kernel.name))?;
    let cfg = EmuLaunch { grid: [grid.0, grid.1, grid.2], block: [block.0, block.1, block.2], shared_bytes };
    let (args, staged) = stage_host_slices(args);
    let packed = PackedArgs::new(&args);
    // SAFETY: signature checked above; pointer validity is the caller's contract.
    let rc = unsafe { (kernel.func)(&cfg, packed.as_ptr()) };
    for s in &staged {
        if s.write {
            // SAFETY: the caller's slices are valid for `bytes` (their KArg::Host came from them).
            unsafe { std::ptr::copy_nonoverlapping(s.mem.as_ptr(), s.lo as usize as *mut u8, s.mem.len()) };
        }
    }
    if rc != 0 {
        bail!("{}", table::last_error());
    }
    Ok(())
}

/// One device copy of a group of overlapping host slices.
struct Staged {
    lo: u64,
    write: bool,
    mem: DeviceMem<u8>,
}

/// Replaces every `KArg::Host` by a pointer into a device copy. Slices that overlap share one
/// copy, so arguments that alias on the host alias in the kernel too.
fn stage_host_slices(args: &[KArg]) -> (Vec<KArg>, Vec<Staged>) {
    let mut spans: Vec<(u64, u64, bool)> = args
        .iter()
        .filter_map(|a| match *a {
            KArg::Host { addr, bytes, write } => Some((addr, addr + bytes, write)),
            _ => None,
        })
        .collect();
    spans.sort_by_key(|s| s.0);
    let mut groups: Vec<(u64, u64, bool)> = Vec::new();
    for (lo, hi, w) in spans {
        match groups.last_mut() {
            Some(g) if lo < g.1 || (lo == g.0 && lo == hi) => {
                g.1 = g.1.max(hi);
                g.2 |= w;
            }
            _ => groups.push((lo, hi, w)),
        }
    }
    let staged: Vec<Staged> = groups
        .into_iter()
        .map(|(lo, hi, write)| {
            let mut mem = DeviceMem::<u8>::poisoned_at((hi - lo) as usize, (lo % 256) as usize);
            // SAFETY: [lo, hi) is covered by the caller's live slices.
            unsafe { std::ptr::copy_nonoverlapping(lo as usize as *const u8, mem.as_mut_ptr(), mem.len()) };
            Staged { lo, write, mem }
        })
        .collect();
    let out = args
        .iter()
        .map(|a| match *a {
            KArg::Host { addr, .. } => {
                let s = staged.iter().rev().find(|s| s.lo <= addr).expect("every host slice is staged");
                KArg::Ptr(s.mem.as_ptr() as usize as u64 + (addr - s.lo))
            }
            a => a,
        })
        .collect();
    (out, staged)
}
