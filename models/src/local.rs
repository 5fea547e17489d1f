//! How a node trains locally in one round ([`LocalConfig`]): part of a
//! job's spec, so free of libtorch; the trainer is in `train.rs`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How much local training one round does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Full passes over the local data (the last batch of a pass may be
    /// smaller). Nodes with more data take more steps.
    Epochs(u32),
    /// Optimiser steps (mini-batches), the same on every node whatever its
    /// size; passes restart with a fresh shuffle when the data run out.
    Steps(u32),
}

/// The optimiser a node uses during a round. Its state (momentum, moments)
/// lives for one round only: every round starts from the new global model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LocalOptimizer {
    /// SGD with heavy-ball momentum (PyTorch's form: `buf = m * buf + g`,
    /// `w -= lr * buf`); `momentum = 0` is plain SGD.
    Sgd {
        /// Momentum in [0, 1).
        #[serde(default)]
        momentum: f64,
    },
    /// Adam (Kingma and Ba), with bias correction as in PyTorch.
    Adam {
        /// First-moment decay.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Second-moment decay.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Added to the root of the second moment.
        #[serde(default = "default_eps")]
        eps: f64,
    },
}

fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}

impl LocalOptimizer {
    /// Plain SGD.
    pub fn sgd() -> Self {
        LocalOptimizer::Sgd { momentum: 0.0 }
    }

    /// Adam with PyTorch's defaults (0.9, 0.999, 1e-8).
    pub fn adam() -> Self {
        LocalOptimizer::Adam {
            beta1: default_beta1(),
            beta2: default_beta2(),
            eps: default_eps(),
        }
    }
}

/// Settings of one round of local training.
///
/// ```toml
/// budget = { steps = 100 }        # or { epochs = 1 }
/// batch_size = 32
/// learning_rate = 0.01
/// optimizer = { kind = "sgd", momentum = 0.9 }   # or { kind = "adam" }
/// proximal_mu = 0.01              # FedProx; 0 for FedAvg
/// seed = 17                       # shuffling; vary it per round and node
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// How long to train.
    pub budget: Budget,
    /// Rows per mini-batch. For Cox the risk sets are formed within a
    /// batch; a batch size of at least the dataset's size gives the exact
    /// full-data partial likelihood.
    pub batch_size: usize,
    /// Step size of the local optimiser.
    pub learning_rate: f64,
    /// The local optimiser.
    pub optimizer: LocalOptimizer,
    /// FedProx proximal weight `mu`: the local objective adds
    /// `mu / 2 * ||w - w_global||^2`, with `w_global` the parameters the
    /// model held when [`train_local`] was called. 0 disables it (FedAvg).
    #[serde(default)]
    pub proximal_mu: f64,
    /// Seed of the shuffling stream (ChaCha8). Dropout, where the spec has
    /// any, draws from libtorch's own generator and is not covered by it.
    #[serde(default)]
    pub seed: u64,
}

impl Default for LocalConfig {
    /// One epoch of plain SGD, batch 32, learning rate 0.01, no proximal term.
    fn default() -> Self {
        LocalConfig {
            budget: Budget::Epochs(1),
            batch_size: 32,
            learning_rate: 0.01,
            optimizer: LocalOptimizer::sgd(),
            proximal_mu: 0.0,
            seed: 0,
        }
    }
}

impl LocalConfig {
    /// Checks every field; the error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        const S: &str = "local training";
        match self.budget {
            Budget::Epochs(0) | Budget::Steps(0) => {
                return Err(Error::config(
                    S,
                    "budget",
                    "must be at least 1 epoch or 1 step",
                ));
            }
            _ => {}
        }
        if self.batch_size == 0 {
            return Err(Error::config(S, "batch_size", "must be at least 1"));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(Error::config(
                S,
                "learning_rate",
                format!("= {} must be finite and > 0", self.learning_rate),
            ));
        }
        if !(self.proximal_mu.is_finite() && self.proximal_mu >= 0.0) {
            return Err(Error::config(
                S,
                "proximal_mu",
                format!(
                    "= {} must be finite and >= 0 (0 disables FedProx)",
                    self.proximal_mu
                ),
            ));
        }
        match self.optimizer {
            LocalOptimizer::Sgd { momentum } => {
                if !(0.0..1.0).contains(&momentum) {
                    return Err(Error::config(
                        S,
                        "optimizer.momentum",
                        format!("= {momentum} must be in [0, 1)"),
                    ));
                }
            }
            LocalOptimizer::Adam { beta1, beta2, eps } => {
                for (field, b) in [("optimizer.beta1", beta1), ("optimizer.beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        return Err(Error::config(S, field, format!("= {b} must be in [0, 1)")));
                    }
                }
                if !(eps.is_finite() && eps > 0.0) {
                    return Err(Error::config(
                        S,
                        "optimizer.eps",
                        format!("= {eps} must be finite and > 0"),
                    ));
                }
            }
        }
        Ok(())
    }
}
