//! Differential-privacy mechanisms and accounting for confer.
//!
//! This crate knows the noise formulas; the node and the coordinator do not.
//! Every random draw comes from OpenDP's exact discrete samplers (discrete
//! Gaussian, discrete Laplace; floats integerised at granularity 2^k), which
//! draw their randomness from the operating system through `rand`'s
//! thread-local ChaCha20 generator seeded by `getrandom`. There is no seed
//! to set, and no floating-point sampler anywhere in confer.
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
//! * [`stats`]: the normal quantile and exact variances used for standard
//!   errors and confidence intervals (post-processing only).

pub mod accounting;
pub mod mechanisms;
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
