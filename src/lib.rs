//! medcnn: a from-scratch CNN training engine with hand-written forward and backward passes.
//!
//! A batch walks the crate in one direction:
//! `data` (images -> normalised tensors) -> `layers` (forward) -> `layers::cross_entropy` (loss)
//! -> `layers` (backward) -> `optim` (Adam) -> `metrics` -> `report` (plots).
//! `backend` is the seam between the CPU path (the reference) and the CUDA path (`cuda`).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cuda;
pub mod dashboard;
pub mod data;
pub mod evaluate;
pub mod explain;
pub mod inspect;
pub mod layers;
pub mod metrics;
pub mod model;
pub mod model_file;
pub mod optim;
pub mod report;
pub mod serve;
pub mod spec;
pub mod stats;
pub mod tensor;
pub mod train;
pub mod watch;
pub mod web;
