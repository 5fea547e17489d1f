//! Differential-privacy mechanisms and accounting for confer.
//!
//! This crate knows the noise formulas; the node and the coordinator do not.
//! Central noise ([`Noise`]) comes from OpenDP's exact discrete samplers
//! (discrete Gaussian, discrete Laplace; floats integerised at granularity
//! 2^k), which draw their randomness from the operating system through
//! `rand`'s thread-local ChaCha20 generator seeded by `getrandom`: there is
//! no seed to set. Distributed noise ([`secagg::encoding`]) comes from this
//! crate's exact discrete Gaussian sampler, fed by a CSPRNG the caller
//! injects. There is no floating-point sampler anywhere in confer.
//!
//! ```
//! use confer_privacy::{accounting, Noise};
//! // A query allowed (epsilon = 1, delta = 1e-6) spends rho in zCDP:
//! let rho = accounting::rho_for_epsilon_delta(1.0, 1e-6).unwrap();
//! // Counts where one person changes one group by at most 1 (L2 sensitivity 1):
//! let noise = Noise::gaussian(1.0, rho).unwrap();
//! let noisy = noise.apply_i64(&[120, 45, 3]).unwrap();
//! assert_eq!(noisy.len(), 3);
//! assert!(noise.cost_rho().unwrap() <= rho * (1.0 + 1e-9));
//! ```
//!
//! * [`accounting`]: zCDP rho <-> (epsilon, delta) through OpenDP's
//!   conversion, and pure-DP epsilon -> rho.
//! * [`mechanisms`]: [`Noise`], a calibrated mechanism that adds noise to
//!   integer or float vectors and reports its own cost and spread.
//! * [`selection`]: DP partition selection (thresholded noisy person counts)
//!   for group keys without a public domain.
//! * [`stats`]: the normal quantile and exact variances used for standard
//!   errors and confidence intervals (post-processing only).
//! * [`secagg`]: secure aggregation (Bonawitz et al. 2017 with the SecAgg+
//!   sparse graph) and the distributed discrete Gaussian encoding (Kairouz,
//!   Liu, Steinke 2021). Unlike the rest of the crate it takes its
//!   randomness from an injected CSPRNG, so that whole federations can be
//!   simulated deterministically; its discrete Gaussian sampler is exact
//!   (Canonne, Kamath, Steinke 2020) in integer arithmetic.

pub mod accounting;
pub mod federated;
pub mod mechanisms;
pub mod secagg;
pub mod selection;
pub mod stats;

pub use mechanisms::{Mechanism, Noise};

/// Errors of this crate.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum PrivacyError {
    /// A parameter is out of range; the message says which and what to change.
    #[error("{0}")]
    InvalidParameter(String),
    /// OpenDP refused or failed; the message carries its explanation.
    #[error("OpenDP: {0}")]
    OpenDp(String),
    /// Secure aggregation or its encoding failed.
    #[error(transparent)]
    SecAgg(#[from] secagg::SecAggError),
}

/// Convenience alias.
pub type Result<T, E = PrivacyError> = std::result::Result<T, E>;

impl From<opendp::error::Error> for PrivacyError {
    fn from(err: opendp::error::Error) -> Self {
        PrivacyError::OpenDp(match &err.message {
            Some(m) => format!("{}: {m}", err.variant),
            None => err.variant.to_string(),
        })
    }
}
