//! Runs kiln recipes: plan, build, inspect.
//!
//! - [`plan`] turns a validated [`Recipe`] into a [`BuildPlan`]: the checkpoint is opened and
//!   header-parsed, the model family detected, every tensor mapped to its GGUF name, transform and
//!   final type (with the rule that decided it, or the pin or fallback that overrode it), and the
//!   full GGUF metadata assembled. Nothing heavy happens and nothing is written.
//! - [`build`] executes a plan: tensors stream from the memory-mapped checkpoint through the
//!   quantizer to a temporary file beside the destination, in bounded chunks processed in
//!   parallel and written in order, so the bytes never depend on the thread count; the file is
//!   renamed into place only when everything succeeded. It returns a [`Report`].
//! - [`inspect`] describes a GGUF file or a safetensors checkpoint without converting anything.
//!
//! Progress goes through the [`Progress`] trait; this crate never prints.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod build;
pub mod calibrate;
pub mod diff;
mod error;
mod imatrix;
mod input;
mod inspect;
mod json;
mod model_report;
mod packed;
mod plan;
pub mod provenance;
mod stats;
pub mod verify;

pub use build::{build, BuildOptions, Progress, Report, TensorReport};
pub use error::PipelineError;
pub use inspect::{inspect, InspectedTensor, Inspection};
pub use json::meta_to_json;
pub use model_report::{model_report, DtypeCount, ModelReport, TokenizerReport};
pub use packed::{build_packed, PackedReport, PackedTensorReport};
pub use plan::{plan, BuildPlan, Decision, TensorPlan, WeightMethod};

pub use kiln_reader::MmapAccess;
pub use kiln_recipe::{Overrides, Recipe, TypeChoice};
