//! Tensors: a shape, a device buffer shared behind a lock, and an identity for the tape.
//!
//! f32, NCHW, contiguous. Cloning a `Tensor` clones a handle, not the data. A reshape shares the
//! buffer. Parameters are "tracked": ops that read a tracked tensor while a tape records push a
//! backward closure, and `Gradients` collects a gradient for every tracked leaf.

use crate::backend::{BackendRef, Device, Storage};
use anyhow::{bail, Result};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub type TensorId = u64;

fn next_id() -> TensorId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

#[derive(Clone)]
pub struct Tensor(Arc<Inner>);

struct Inner {
    id: TensorId,
    shape: Vec<usize>,
    storage: Arc<RwLock<Storage>>,
    backend: BackendRef,
    tracked: bool,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn from_storage(backend: &BackendRef, shape: &[usize], storage: Storage, tracked: bool) -> Result<Tensor> {
        if storage.len() != numel(shape) {
            bail!("tensor of shape {shape:?} needs {} values, got {}", numel(shape), storage.len());
        }
        Ok(Tensor(Arc::new(Inner {
            id: next_id(),
            shape: shape.to_vec(),
            storage: Arc::new(RwLock::new(storage)),
            backend: backend.clone(),
            tracked,
        })))
    }

    pub fn from_vec(backend: &BackendRef, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            bail!("tensor of shape {shape:?} needs {} values, got {}", numel(shape), data.len());
        }
        Tensor::from_storage(backend, shape, backend.upload(data)?, false)
    }

    pub fn zeros(backend: &BackendRef, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_storage(backend, shape, backend.zeros(numel(shape))?, false)
    }

    pub fn full(backend: &BackendRef, shape: &[usize], value: f32) -> Result<Tensor> {
        let mut s = backend.alloc(numel(shape))?;
        backend.fill(&mut s, value)?;
        Tensor::from_storage(backend, shape, s, false)
    }

    /// A trainable leaf with these values: the tape will produce its gradient.
    pub fn parameter(backend: &BackendRef, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        if data.len() != numel(shape) {
            bail!("parameter of shape {shape:?} needs {} values, got {}", numel(shape), data.len());
        }
        Tensor::from_storage(backend, shape, backend.upload(data)?, true)
    }

    /// A new handle to the same buffer under another shape (and a new identity).
    pub(crate) fn view(&self, shape: &[usize], tracked: bool) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            bail!("cannot view a tensor of shape {:?} as {shape:?}", self.shape());
        }
        Ok(Tensor(Arc::new(Inner {
            id: next_id(),
            shape: shape.to_vec(),
            storage: self.0.storage.clone(),
            backend: self.0.backend.clone(),
            tracked,
        })))
    }

    /// The same data, cut off from the tape.
    pub fn detach(&self) -> Tensor {
        self.view(self.shape(), false).expect("same shape")
    }

    pub fn id(&self) -> TensorId {
        self.0.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    pub fn dim(&self, i: usize) -> usize {
        self.0.shape[i]
    }
    pub fn rank(&self) -> usize {
        self.0.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel(&self.0.shape)
    }
    pub fn is_tracked(&self) -> bool {
        self.0.tracked
    }
    pub fn backend(&self) -> &BackendRef {
        &self.0.backend
    }
    pub fn device(&self) -> Device {
        self.0.backend.device()
    }

    pub fn storage(&self) -> RwLockReadGuard<'_, Storage> {
        self.0.storage.read().unwrap_or_else(|e| e.into_inner())
    }
    pub fn storage_mut(&self) -> RwLockWriteGuard<'_, Storage> {
        self.0.storage.write().unwrap_or_else(|e| e.into_inner())
    }

    pub fn to_vec(&self) -> Result<Vec<f32>> {
        self.0.backend.download(&self.storage())
    }

    /// The value of a one-element tensor.
    pub fn scalar(&self) -> Result<f32> {
        if self.numel() != 1 {
            bail!("scalar() on a tensor of shape {:?}", self.shape());
        }
        Ok(self.to_vec()?[0])
    }

    /// Overwrite the contents with host values of the same length (checkpoint loading).
    pub fn copy_from_host(&self, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            bail!(
                "copy_from_host: tensor of shape {:?} needs {} values, got {}",
                self.shape(),
                self.numel(),
                data.len()
            );
        }
        *self.storage_mut() = self.0.backend.upload(data)?;
        Ok(())
    }

    /// Same shape, new zeroed buffer on the same device.
    pub fn zeros_like(&self) -> Result<Tensor> {
        Tensor::zeros(self.backend(), self.shape())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor(id={}, shape={:?}, device={}, tracked={})",
            self.id(),
            self.shape(),
            self.device(),
            self.is_tracked()
        )
    }
}
