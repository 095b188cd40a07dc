//! Recycling of host buffers.
//!
//! A training step allocates the same set of buffer sizes every time. Fresh large allocations
//! come from the kernel as new pages, and faulting them in cost more than a tenth of a
//! SimpleConv step; keeping freed buffers by length and handing them out again removes that.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::thread::LocalKey;

/// Buffers shorter than this are cheap to allocate and not worth keeping.
const MIN_LEN: usize = 4096;
/// At most this many idle buffers of one length, and this many idle bytes in all.
const MAX_PER_LEN: usize = 32;
const MAX_BYTES: usize = 1 << 30;

#[derive(Default)]
struct Cache {
    free: HashMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// A zero-filled buffer of `len` values, reused when one is idle.
pub fn zeroed(len: usize) -> Vec<f32> {
    let mut v = reused(len);
    v.fill(0.0);
    v
}

/// A buffer of `len` values with unspecified contents, reused when one is idle.
pub fn reused(len: usize) -> Vec<f32> {
    if len >= MIN_LEN {
        let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cache) = guard.as_mut() {
            if let Some(v) = cache.free.get_mut(&len).and_then(|l| l.pop()) {
                cache.bytes -= len * 4;
                drop(guard);
                return v;
            }
        }
    }
    vec![0.0; len]
}

/// Take back a buffer that is no longer used.
pub fn recycle(v: Vec<f32>) {
    let len = v.len();
    if len < MIN_LEN || v.capacity() != len {
        return;
    }
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(Cache::default);
    let list = cache.free.entry(len).or_default();
    if list.len() < MAX_PER_LEN && cache.bytes + len * 4 <= MAX_BYTES {
        cache.bytes += len * 4;
        list.push(v);
    }
}

/// f32 values in one 64-byte cache line.
pub const LINE: usize = 16;

/// Run `f` with `len` values of the calling thread's scratch buffer `key`, grown as needed and
/// kept across calls, so that its pages are faulted in once per thread. The values start on a
/// cache line: the allocator aligns large buffers to 16 bytes only, and then every 64-byte
/// vector of the Winograd and direct kernels straddled two lines.
pub fn with_scratch<R>(key: &'static LocalKey<RefCell<Vec<f32>>>, len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    key.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len + LINE - 1 {
            s.resize(len + LINE - 1, 0.0);
        }
        let skip = s.as_ptr().align_offset(LINE * 4).min(LINE - 1);
        f(&mut s[skip..skip + len])
    })
}
