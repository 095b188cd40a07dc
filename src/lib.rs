//! rotvar: how invariant to rotation is a CNN, and where inside it?
//!
//! Read top to bottom: `tensor` and `autograd` (the engine), `backend` (one trait, CPU and CUDA
//! implementations), `ops` (differentiable ops over the backend), `nn` and `models` (layers and
//! the networks of docs/protocol.md), `optim`, `data`, `train`, and `cli`. The science behind
//! it (protocol, the measure V, rotation conventions, reproduction guide) is in docs/.

pub mod angle_eval;
pub mod augment;
pub mod autograd;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod experiment;
pub mod figures;
pub mod fsio;
pub mod inspect;
pub mod limits;
pub mod measure;
pub mod models;
pub mod nn;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod progress;
pub mod rank;
pub mod rng;
pub mod run;
pub mod selftest;
pub mod tensor;
pub mod train;
pub mod transform;
