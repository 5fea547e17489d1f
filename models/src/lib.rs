//! Models, local trainers and server optimisers for confer's federated
//! training, on tch (libtorch). CUDA is used where present, CPU otherwise.
//!
//! # Data flow of one round
//!
//! ```text
//!  coordinator                                 node k (beside its records)
//!  ───────────                                 ───────────────────────────
//!  global: Vec<f32> ───────── broadcast ─────▶ Model::set_parameters(global)
//!                                              train_local(model, data, cfg)
//!                                                -> LocalResult { update, num_examples, .. }
//!                                              clip_l2(update, C)          (optional, for DP)
//!                                              weighted_update(w_k)        (w_k e.g. num_examples)
//!  secure aggregation: sums only  ◀───────── [w_k * update_k], w_k (+ DP noise shares)
//!  ServerOptimizer::step(global, sum, Σw)
//!    FedAvg | FedAdagrad | FedAdam | FedYogi
//!  evaluation: Σ EvalCounts::to_flat ◀─────── evaluate(model, test) -> EvalCounts
//!  accuracy / mean_loss / auc_from_histograms on the (noisy) sums
//! ```
//!
//! * [`ModelSpec`]: what to build (logistic regression, MLP, Cox), read from
//!   TOML or JSON and validated with errors that name the field.
//! * [`Model`]: the spec on a device, its parameters as one flat vector in a
//!   documented order, saved as safetensors with a JSON spec beside it.
//! * [`train_local`] with [`LocalConfig`]: epochs or steps, SGD with
//!   momentum or Adam, FedProx's proximal term; returns the update.
//! * [`evaluate`] / [`evaluate_survival`]: counts with bounded per-example
//!   contributions that the caller can release with DP, and pure metric
//!   functions that accept noisy counts.
//! * [`ServerOptimizer`]: the server rule on sums from secure aggregation,
//!   with serialisable state for checkpoints.
//!
//! Privacy accounting is not here (see `confer-privacy`); this crate offers
//! [`clip_l2`] to bound an update's norm before noise is added.
//!
//! # Example
//!
//! ```
//! use confer_models::*;
//!
//! # fn main() -> Result<()> {
//! let spec = ModelSpec::from_toml_str("architecture = \"logistic_regression\"\ninputs = 2")?;
//! let nodes = vec![
//!     Dataset::binary(vec![0.0, 1.0, 1.0, 0.0], 2, vec![0.0, 1.0])?,
//!     Dataset::binary(vec![0.5, 0.5, 2.0, 1.0], 2, vec![0.0, 1.0])?,
//! ];
//! let mut global = Model::new(&spec, 42)?.parameters()?;
//! let mut server = ServerOptimizer::new(ServerStrategy::fed_avg(), global.len())?;
//! let local = LocalConfig { budget: Budget::Steps(10), batch_size: 2, ..LocalConfig::default() };
//! for _round in 0..5 {
//!     let (mut sum, mut weight) = (vec![0.0; global.len()], 0.0);
//!     for data in &nodes {
//!         let mut model = Model::new(&spec, 0)?;
//!         model.set_parameters(&global)?;
//!         let result = train_local(&mut model, data, &local)?;
//!         let w = result.num_examples as f64;
//!         for (s, u) in sum.iter_mut().zip(result.weighted_update(w)) {
//!             *s += u;
//!         }
//!         weight += w;
//!     }
//!     server.step(&mut global, &sum, weight)?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The crate also reports what libtorch sees ([`runtime`]), which
//! `confer doctor` prints.

mod data;
mod error;
mod eval;
pub mod job;
mod local;
#[cfg(feature = "torch")]
mod model;
mod server;
mod spec;
pub mod split;
#[cfg(feature = "torch")]
mod train;

pub use data::{Dataset, Targets};
pub use error::{Error, Result};
pub use eval::{
    DEFAULT_BINS, DEFAULT_LOSS_CLAMP, EvalConfig, EvalCounts, SurvivalCounts, accuracy,
    auc_from_histograms, concordance_index, mean_loss,
};
#[cfg(feature = "torch")]
pub use eval::{evaluate, evaluate_survival, evaluate_with};
pub use local::{Budget, LocalConfig, LocalOptimizer};
#[cfg(feature = "torch")]
pub use model::{Model, spec_sidecar_path};
pub use server::{ServerOptimizer, ServerStrategy, clip_l2, l2_norm};
pub use spec::{
    Activation, Architecture, MAX_HIDDEN_LAYERS, MAX_HIDDEN_WIDTH, MAX_INPUTS, MAX_PARAMETERS,
    ModelSpec,
};
#[cfg(feature = "torch")]
pub use tch::Device;
#[cfg(feature = "torch")]
pub use train::{
    ClippedGradients, LocalResult, clipped_gradient_sum, clipped_gradients, train_local,
};

use serde::Serialize;
#[cfg(feature = "torch")]
use tch::{Cuda, Kind, Tensor};

/// What libtorch sees on this machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TorchRuntime {
    /// Version of libtorch confer was built against.
    pub libtorch_version: &'static str,
    /// Whether a CUDA device is usable.
    pub cuda_available: bool,
    /// Number of CUDA devices.
    pub cuda_devices: i64,
    /// Whether cuDNN is usable.
    pub cudnn_available: bool,
    /// The device training would use.
    pub device: String,
}

/// The libtorch version tch 0.26 requires.
pub const LIBTORCH_VERSION: &str = "2.13.0";

/// Probes libtorch: devices, and that a small computation runs on the chosen one.
#[cfg(feature = "torch")]
pub fn runtime() -> Result<TorchRuntime, tch::TchError> {
    let device = Device::cuda_if_available();
    // A real computation, so a broken install fails here and not mid-training.
    let x = Tensor::f_arange(4, (Kind::Float, device))?;
    let sum = x.f_sum(Kind::Float)?.f_double_value(&[])?;
    if (sum - 6.0).abs() > 1e-6 {
        return Err(tch::TchError::Kind(format!(
            "libtorch computed 0+1+2+3 = {sum}"
        )));
    }
    Ok(TorchRuntime {
        libtorch_version: LIBTORCH_VERSION,
        cuda_available: Cuda::is_available(),
        cuda_devices: Cuda::device_count(),
        cudnn_available: Cuda::cudnn_is_available(),
        device: format!("{device:?}"),
    })
}

#[cfg(all(test, feature = "torch"))]
mod tests {
    /// The node trains on a blocking thread and the coordinator keeps
    /// optimisers across tasks: both must be able to move between threads.
    #[test]
    fn public_types_are_send() {
        fn send<T: Send>() {}
        send::<super::Model>();
        send::<super::ServerOptimizer>();
        send::<super::Dataset>();
        send::<super::Error>();
    }

    #[test]
    fn libtorch_loads_and_computes() {
        let rt = super::runtime().expect("libtorch runtime");
        assert_eq!(rt.cuda_available, rt.cuda_devices > 0);
    }
}
