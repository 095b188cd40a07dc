//! A minimal tape: reverse-mode autograd as a list of backward closures run in reverse.
//!
//! While a `Tape` is alive on this thread, every op that reads a tracked tensor pushes one
//! closure that turns the gradient of its output into gradients of its inputs. Without a tape
//! (inference, evaluation, measuring) nothing is recorded and no activation is kept alive.

use crate::tensor::{Tensor, TensorId};
use anyhow::{bail, Result};
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;

pub type BackwardFn = Box<dyn FnOnce(&mut Gradients) -> Result<()>>;

thread_local! {
    static TAPE: RefCell<Option<Vec<BackwardFn>>> = const { RefCell::new(None) };
}

/// Gradients by tensor identity. Intermediate gradients are taken out as soon as they are
/// consumed, so after `backward` only the tracked leaves (parameters) remain.
#[derive(Default)]
pub struct Gradients {
    map: HashMap<TensorId, Tensor>,
}

impl Gradients {
    pub fn get(&self, t: &Tensor) -> Option<&Tensor> {
        self.map.get(&t.id())
    }

    /// Remove and return the gradient of `t` (the op that produced `t` is its only consumer).
    pub fn take(&mut self, t: &Tensor) -> Option<Tensor> {
        self.map.remove(&t.id())
    }

    pub fn take_id(&mut self, id: TensorId) -> Option<Tensor> {
        self.map.remove(&id)
    }

    /// Add `g` into the gradient of `t`, if `t` wants one.
    pub fn accumulate(&mut self, t: &Tensor, g: Tensor) -> Result<()> {
        if !t.is_tracked() {
            return Ok(());
        }
        if g.shape() != t.shape() {
            bail!("gradient of shape {:?} for a tensor of shape {:?}", g.shape(), t.shape());
        }
        match self.map.get(&t.id()) {
            Some(acc) => {
                let backend = acc.backend().clone();
                backend.accumulate(&mut acc.storage_mut(), &g.storage())?;
            }
            None => {
                self.map.insert(t.id(), g);
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// Records ops on this thread while alive. Not `Send`: the tape is thread-local.
pub struct Tape {
    _thread_bound: PhantomData<*const ()>,
}

impl Tape {
    pub fn start() -> Result<Tape> {
        TAPE.with(|t| {
            let mut t = t.borrow_mut();
            if t.is_some() {
                bail!("a tape is already recording on this thread");
            }
            *t = Some(Vec::new());
            Ok(())
        })?;
        Ok(Tape { _thread_bound: PhantomData })
    }

    /// Run the recorded closures in reverse from d(loss)/d(loss) = 1 and stop recording.
    pub fn backward(self, loss: &Tensor) -> Result<Gradients> {
        if loss.numel() != 1 {
            bail!("backward needs a scalar loss, got shape {:?}", loss.shape());
        }
        let entries = TAPE.with(|t| t.borrow_mut().take()).unwrap_or_default();
        let mut grads = Gradients::default();
        if !loss.is_tracked() {
            return Ok(grads);
        }
        grads.map.insert(loss.id(), Tensor::full(loss.backend(), loss.shape(), 1.0)?);
        for f in entries.into_iter().rev() {
            f(&mut grads)?;
        }
        Ok(grads)
    }
}

impl Drop for Tape {
    fn drop(&mut self) {
        TAPE.with(|t| t.borrow_mut().take());
    }
}

pub fn is_recording() -> bool {
    TAPE.with(|t| t.borrow().is_some())
}

/// Whether an op over these inputs must record a backward closure (and track its output).
pub fn needs_grad(inputs: &[&Tensor]) -> bool {
    inputs.iter().any(|t| t.is_tracked()) && is_recording()
}

/// Push a backward closure; ops call this only when `needs_grad` said so.
pub fn push(f: BackwardFn) {
    TAPE.with(|t| {
        if let Some(tape) = t.borrow_mut().as_mut() {
            tape.push(f);
        }
    });
}
