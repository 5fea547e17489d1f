//! Models, local trainers and server optimisers for confer's federated
//! training, on tch (libtorch). CUDA is used where present, CPU otherwise.
//!
//! This crate starts with what every other part needs from libtorch: the
//! runtime it found ([`TorchRuntime`]), which `confer doctor` reports.

use serde::Serialize;
use tch::{Cuda, Device, Kind, Tensor};

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

#[cfg(test)]
mod tests {
    #[test]
    fn libtorch_loads_and_computes() {
        let rt = super::runtime().expect("libtorch runtime");
        assert_eq!(rt.cuda_available, rt.cuda_devices > 0);
    }
}
