//! Server-side aggregation: [`ServerOptimizer`] applies the aggregated
//! update to the global parameters with FedAvg, FedAdagrad, FedAdam or
//! FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization").
//!
//! # Secure aggregation and weighting
//!
//! With secure aggregation the coordinator never sees one node's update,
//! only sums. Weighted averaging therefore happens before aggregation: node
//! `k` submits `w_k * update_k` (e.g. [`crate::LocalResult::weighted_update`]
//! with `w_k` = its example count, for FedAvg) and its weight `w_k`; the
//! coordinator learns `update_sum = sum_k w_k * update_k` and
//! `weight_total = sum_k w_k`, and [`ServerOptimizer::step`] uses their
//! ratio, the weighted mean update, as the pseudo-gradient. For uniform
//! weighting every node uses `w_k = 1`. The weights themselves are then
//! released in aggregate; if they must be private, noise them (and the
//! sums) before the step and keep `weight_total` positive.
//!
//! FedProx needs nothing here: its server step is FedAvg's, and its
//! proximal term `mu` is part of local training ([`crate::LocalConfig`]).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The server update rule and its hyperparameters.
///
/// ```toml
/// strategy = "fed_adam"
/// server_learning_rate = 0.01
/// beta1 = 0.9
/// beta2 = 0.99
/// tau = 0.001
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "strategy", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerStrategy {
    /// `x += eta * delta` with `delta` the weighted mean update; `eta = 1` is
    /// McMahan et al.'s FedAvg (the new global model is the weighted mean of
    /// the local models). Also the server side of FedProx.
    FedAvg {
        /// Server learning rate `eta`.
        #[serde(default = "one")]
        server_learning_rate: f64,
    },
    /// `m = b1 m + (1 - b1) delta; v = v + delta^2;
    /// x += eta m / (sqrt(v) + tau)`.
    FedAdagrad {
        /// Server learning rate `eta`.
        server_learning_rate: f64,
        /// Momentum of the pseudo-gradient.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Adaptivity: added to `sqrt(v)`, and `v` starts at `tau^2`.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// `m = b1 m + (1 - b1) delta; v = b2 v + (1 - b2) delta^2;
    /// x += eta m / (sqrt(v) + tau)` (no bias correction, as in the paper).
    FedAdam {
        /// Server learning rate `eta`.
        server_learning_rate: f64,
        /// Momentum of the pseudo-gradient.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Decay of the second moment.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Adaptivity: added to `sqrt(v)`, and `v` starts at `tau^2`.
        #[serde(default = "default_tau")]
        tau: f64,
    },
    /// As FedAdam but `v = v - (1 - b2) delta^2 sign(v - delta^2)`, which
    /// lets `v` grow only as fast as the new squared update requires.
    FedYogi {
        /// Server learning rate `eta`.
        server_learning_rate: f64,
        /// Momentum of the pseudo-gradient.
        #[serde(default = "default_beta1")]
        beta1: f64,
        /// Decay of the second moment.
        #[serde(default = "default_beta2")]
        beta2: f64,
        /// Adaptivity: added to `sqrt(v)`, and `v` starts at `tau^2`.
        #[serde(default = "default_tau")]
        tau: f64,
    },
}

fn one() -> f64 {
    1.0
}
/// Reddi et al.'s defaults: beta1 = 0.9, beta2 = 0.99, tau = 1e-3.
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.99
}
fn default_tau() -> f64 {
    1e-3
}

impl ServerStrategy {
    /// FedAvg with server learning rate 1.
    pub fn fed_avg() -> Self {
        ServerStrategy::FedAvg {
            server_learning_rate: 1.0,
        }
    }

    /// FedAdagrad with Reddi et al.'s defaults for beta1 and tau.
    pub fn fed_adagrad(server_learning_rate: f64) -> Self {
        ServerStrategy::FedAdagrad {
            server_learning_rate,
            beta1: default_beta1(),
            tau: default_tau(),
        }
    }

    /// FedAdam with Reddi et al.'s defaults for beta1, beta2 and tau.
    pub fn fed_adam(server_learning_rate: f64) -> Self {
        ServerStrategy::FedAdam {
            server_learning_rate,
            beta1: default_beta1(),
            beta2: default_beta2(),
            tau: default_tau(),
        }
    }

    /// FedYogi with Reddi et al.'s defaults for beta1, beta2 and tau.
    pub fn fed_yogi(server_learning_rate: f64) -> Self {
        ServerStrategy::FedYogi {
            server_learning_rate,
            beta1: default_beta1(),
            beta2: default_beta2(),
            tau: default_tau(),
        }
    }

    /// The name used in configuration.
    pub fn name(&self) -> &'static str {
        match self {
            ServerStrategy::FedAvg { .. } => "fed_avg",
            ServerStrategy::FedAdagrad { .. } => "fed_adagrad",
            ServerStrategy::FedAdam { .. } => "fed_adam",
            ServerStrategy::FedYogi { .. } => "fed_yogi",
        }
    }

    /// Checks every field; the error names the field and what to change.
    pub fn validate(&self) -> Result<()> {
        const S: &str = "server strategy";
        let (eta, beta1, beta2, tau) = match *self {
            ServerStrategy::FedAvg {
                server_learning_rate,
            } => (server_learning_rate, None, None, None),
            ServerStrategy::FedAdagrad {
                server_learning_rate,
                beta1,
                tau,
            } => (server_learning_rate, Some(beta1), None, Some(tau)),
            ServerStrategy::FedAdam {
                server_learning_rate,
                beta1,
                beta2,
                tau,
            }
            | ServerStrategy::FedYogi {
                server_learning_rate,
                beta1,
                beta2,
                tau,
            } => (server_learning_rate, Some(beta1), Some(beta2), Some(tau)),
        };
        if !(eta.is_finite() && eta > 0.0) {
            return Err(Error::config(
                S,
                "server_learning_rate",
                format!("= {eta} must be finite and > 0"),
            ));
        }
        for (field, b) in [("beta1", beta1), ("beta2", beta2)] {
            if let Some(b) = b
                && !(0.0..1.0).contains(&b)
            {
                return Err(Error::config(S, field, format!("= {b} must be in [0, 1)")));
            }
        }
        if let Some(tau) = tau
            && !(tau.is_finite() && tau > 0.0)
        {
            return Err(Error::config(
                S,
                "tau",
                format!("= {tau} must be finite and > 0 (Reddi et al. use 1e-3)"),
            ));
        }
        Ok(())
    }
}

/// A server optimiser with its state, serialisable (serde) so that a
/// coordinator can checkpoint between rounds and resume.
///
/// The moment vectors are serialised as hexadecimal strings of their
/// little-endian IEEE-754 bytes, so a checkpoint restores them bit for bit
/// in any serde format (decimal floats in JSON need not round-trip, and
/// TOML cannot hold long arrays well); a resumed optimiser takes exactly
/// the steps the original would have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerOptimizer {
    strategy: ServerStrategy,
    num_parameters: usize,
    /// Rounds applied so far.
    rounds: u64,
    /// First moment (empty for FedAvg).
    #[serde(with = "f64_hex")]
    m: Vec<f64>,
    /// Second moment (empty for FedAvg).
    #[serde(with = "f64_hex")]
    v: Vec<f64>,
}

/// Serde for `Vec<f64>` as one hex string of little-endian bytes.
mod f64_hex {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f64], s: S) -> Result<S::Ok, S::Error> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(values.len() * 16);
        for v in values {
            for b in v.to_le_bytes() {
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 15)]));
            }
        }
        s.serialize_str(&out)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let text = String::deserialize(d)?;
        if !text.len().is_multiple_of(16) {
            return Err(D::Error::custom(
                "moment vector: hex length is not a multiple of 16 (8 bytes per f64)",
            ));
        }
        let nibble = |c: u8| -> Result<u8, D::Error> {
            match c {
                b'0'..=b'9' => Ok(c - b'0'),
                b'a'..=b'f' => Ok(c - b'a' + 10),
                b'A'..=b'F' => Ok(c - b'A' + 10),
                _ => Err(D::Error::custom("moment vector: not a hex digit")),
            }
        };
        text.as_bytes()
            .chunks(16)
            .map(|chunk| {
                let mut bytes = [0u8; 8];
                for (i, pair) in chunk.chunks(2).enumerate() {
                    bytes[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
                }
                Ok(f64::from_le_bytes(bytes))
            })
            .collect()
    }
}

impl ServerOptimizer {
    /// A fresh optimiser for a model with `num_parameters` parameters.
    pub fn new(strategy: ServerStrategy, num_parameters: usize) -> Result<Self> {
        strategy.validate()?;
        let (m, v) = match strategy {
            ServerStrategy::FedAvg { .. } => (Vec::new(), Vec::new()),
            ServerStrategy::FedAdagrad { tau, .. }
            | ServerStrategy::FedAdam { tau, .. }
            | ServerStrategy::FedYogi { tau, .. } => {
                (vec![0.0; num_parameters], vec![tau * tau; num_parameters])
            }
        };
        Ok(ServerOptimizer {
            strategy,
            num_parameters,
            rounds: 0,
            m,
            v,
        })
    }

    /// The strategy.
    pub fn strategy(&self) -> &ServerStrategy {
        &self.strategy
    }

    /// Rounds applied so far.
    pub fn rounds(&self) -> u64 {
        self.rounds
    }

    /// Applies one round: `update_sum` is the sum over nodes of
    /// `weight_k * update_k` and `weight_total` the sum of the weights (see
    /// the module docs). `global` is updated in place. Nothing changes if
    /// an error is returned.
    pub fn step(
        &mut self,
        global: &mut [f32],
        update_sum: &[f64],
        weight_total: f64,
    ) -> Result<()> {
        for (what, len) in [
            ("global parameters", global.len()),
            ("update sum", update_sum.len()),
        ] {
            if len != self.num_parameters {
                return Err(Error::ParameterWidth {
                    what,
                    expected: self.num_parameters,
                    got: len,
                });
            }
        }
        if self.m.len() != self.num_parameters
            && !matches!(self.strategy, ServerStrategy::FedAvg { .. })
            || self.v.len() != self.m.len()
        {
            return Err(Error::InvalidAggregate(format!(
                "optimiser state holds {} moments for {} parameters: the checkpoint is corrupt",
                self.m.len(),
                self.num_parameters
            )));
        }
        if !(weight_total.is_finite() && weight_total > 0.0) {
            return Err(Error::InvalidAggregate(format!(
                "total weight is {weight_total}; it must be positive (did every node drop out, \
                 or did noise push it below zero? skip the round instead)"
            )));
        }
        if let Some(i) = update_sum.iter().position(|u| !u.is_finite()) {
            return Err(Error::InvalidAggregate(format!(
                "update sum entry {i} is {}; refusing to apply it",
                update_sum[i]
            )));
        }
        let inv = 1.0 / weight_total;
        let apply = |x: f32, step: f64| -> f32 { (f64::from(x) + step) as f32 };
        let mut new = global.to_vec();
        match self.strategy {
            ServerStrategy::FedAvg {
                server_learning_rate: eta,
            } => {
                for (x, &u) in new.iter_mut().zip(update_sum) {
                    *x = apply(*x, eta * u * inv);
                }
            }
            ServerStrategy::FedAdagrad {
                server_learning_rate: eta,
                beta1,
                tau,
            } => {
                let (mut m, mut v) = (self.m.clone(), self.v.clone());
                for i in 0..new.len() {
                    let d = update_sum[i] * inv;
                    m[i] = beta1 * m[i] + (1.0 - beta1) * d;
                    v[i] += d * d;
                    new[i] = apply(new[i], eta * m[i] / (v[i].sqrt() + tau));
                }
                (self.m, self.v) = (m, v);
            }
            ServerStrategy::FedAdam {
                server_learning_rate: eta,
                beta1,
                beta2,
                tau,
            } => {
                let (mut m, mut v) = (self.m.clone(), self.v.clone());
                for i in 0..new.len() {
                    let d = update_sum[i] * inv;
                    m[i] = beta1 * m[i] + (1.0 - beta1) * d;
                    v[i] = beta2 * v[i] + (1.0 - beta2) * d * d;
                    new[i] = apply(new[i], eta * m[i] / (v[i].sqrt() + tau));
                }
                (self.m, self.v) = (m, v);
            }
            ServerStrategy::FedYogi {
                server_learning_rate: eta,
                beta1,
                beta2,
                tau,
            } => {
                let (mut m, mut v) = (self.m.clone(), self.v.clone());
                for i in 0..new.len() {
                    let d = update_sum[i] * inv;
                    let d2 = d * d;
                    m[i] = beta1 * m[i] + (1.0 - beta1) * d;
                    v[i] -= (1.0 - beta2) * d2 * (v[i] - d2).signum();
                    new[i] = apply(new[i], eta * m[i] / (v[i].sqrt() + tau));
                }
                (self.m, self.v) = (m, v);
            }
        }
        if let Some(i) = new.iter().position(|x| !x.is_finite()) {
            return Err(Error::Diverged(format!(
                "global parameter {i} would become {}",
                new[i]
            )));
        }
        global.copy_from_slice(&new);
        self.rounds += 1;
        Ok(())
    }
}

/// L2 norm of a vector (accumulated in f64).
pub fn l2_norm(values: &[f32]) -> f64 {
    values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

/// Scales `values` down so that their L2 norm is at most `bound`; returns
/// whether it did. Use it on a node's update before weighting and secure
/// aggregation, to bound its sensitivity for distributed DP noise.
///
/// A non-finite or negative `bound` is a caller bug and zeroes the vector
/// (the safe direction for privacy); `bound = 0` zeroes it too.
pub fn clip_l2(values: &mut [f32], bound: f32) -> bool {
    if !(bound.is_finite() && bound >= 0.0) {
        values.iter_mut().for_each(|v| *v = 0.0);
        return true;
    }
    let norm = l2_norm(values);
    if !norm.is_finite() {
        values.iter_mut().for_each(|v| *v = 0.0);
        return true;
    }
    if norm <= f64::from(bound) {
        return false;
    }
    let scale = f64::from(bound) / norm;
    values
        .iter_mut()
        .for_each(|v| *v = (f64::from(*v) * scale) as f32);
    // Rounding to f32 can leave the norm a hair above the bound.
    while l2_norm(values) > f64::from(bound) {
        values.iter_mut().for_each(|v| *v *= 1.0 - f32::EPSILON);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fed_avg_is_the_weighted_mean_of_local_models() {
        // Two nodes: 1 example moving to [1, 1], 3 examples moving to [5, -3].
        let mut global = vec![0.0f32, 0.0];
        let updates = [(1.0, [1.0, 1.0]), (3.0, [5.0, -3.0])];
        let mut sum = vec![0.0; 2];
        let mut weight = 0.0;
        for (w, u) in updates {
            for (s, x) in sum.iter_mut().zip(u) {
                *s += w * x;
            }
            weight += w;
        }
        let mut opt = ServerOptimizer::new(ServerStrategy::fed_avg(), 2).unwrap();
        opt.step(&mut global, &sum, weight).unwrap();
        assert_eq!(global, vec![4.0, -2.0]);
        assert_eq!(opt.rounds(), 1);
    }

    #[test]
    fn adaptive_first_step_matches_the_formula() {
        let d = 0.2f64;
        let tau = 1e-3;
        for (strategy, v1) in [
            (
                ServerStrategy::fed_adam(0.1),
                0.99 * tau * tau + 0.01 * d * d,
            ),
            (ServerStrategy::fed_adagrad(0.1), tau * tau + d * d),
            // v0 = tau^2 < d^2, so Yogi adds (1 - b2) d^2.
            (ServerStrategy::fed_yogi(0.1), tau * tau + 0.01 * d * d),
        ] {
            let mut x = vec![1.0f32];
            let mut opt = ServerOptimizer::new(strategy, 1).unwrap();
            opt.step(&mut x, &[d * 2.0], 2.0).unwrap();
            let want = 1.0 + 0.1 * (0.1 * d) / (v1.sqrt() + tau);
            assert!(
                (f64::from(x[0]) - want).abs() < 1e-6,
                "{}: {} vs {want}",
                strategy.name(),
                x[0]
            );
        }
    }

    #[test]
    fn fed_adam_converges_on_a_quadratic() {
        // Each round the "clients" move halfway to the optimum at [3, -2].
        let target = [3.0f32, -2.0];
        let mut x = vec![0.0f32, 0.0];
        let mut opt = ServerOptimizer::new(ServerStrategy::fed_adam(0.1), 2).unwrap();
        for _ in 0..300 {
            let sum: Vec<f64> = x
                .iter()
                .zip(target)
                .map(|(&a, b)| f64::from(0.5 * (b - a)))
                .collect();
            opt.step(&mut x, &sum, 1.0).unwrap();
        }
        assert!(
            (x[0] - 3.0).abs() < 0.05 && (x[1] + 2.0).abs() < 0.05,
            "{x:?}"
        );
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let mut a = ServerOptimizer::new(ServerStrategy::fed_yogi(0.05), 3).unwrap();
        let mut xa = vec![0.5f32, -0.5, 1.0];
        a.step(&mut xa, &[0.3, -0.1, 0.2], 2.0).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        let mut b: ServerOptimizer = serde_json::from_str(&json).unwrap();
        assert_eq!(a, b);
        let toml_text = toml::to_string(&a).unwrap();
        assert_eq!(toml::from_str::<ServerOptimizer>(&toml_text).unwrap(), a);
        let corrupt = json.replacen("\"m\":\"", "\"m\":\"00", 1);
        assert!(serde_json::from_str::<ServerOptimizer>(&corrupt).is_err());
        let mut xb = xa.clone();
        a.step(&mut xa, &[0.1, 0.1, -0.4], 1.0).unwrap();
        b.step(&mut xb, &[0.1, 0.1, -0.4], 1.0).unwrap();
        assert_eq!(xa, xb);
        assert_eq!(b.rounds(), 2);
    }

    #[test]
    fn bad_aggregates_change_nothing() {
        let mut opt = ServerOptimizer::new(ServerStrategy::fed_adam(0.1), 2).unwrap();
        let before = opt.clone();
        let mut x = vec![1.0f32, 2.0];
        assert!(opt.step(&mut x, &[1.0], 1.0).is_err());
        assert!(opt.step(&mut x, &[1.0, 1.0], 0.0).is_err());
        assert!(opt.step(&mut x, &[1.0, f64::NAN], 1.0).is_err());
        assert_eq!(x, vec![1.0, 2.0]);
        assert_eq!(opt, before);
    }

    #[test]
    fn strategy_reads_from_toml_and_validates() {
        let s: ServerStrategy =
            toml::from_str("strategy = \"fed_adam\"\nserver_learning_rate = 0.01").unwrap();
        assert_eq!(s, ServerStrategy::fed_adam(0.01));
        let s: ServerStrategy = toml::from_str("strategy = \"fed_avg\"").unwrap();
        assert_eq!(s, ServerStrategy::fed_avg());
        let err = ServerStrategy::FedAdam {
            server_learning_rate: 0.1,
            beta1: 1.0,
            beta2: 0.99,
            tau: 1e-3,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("beta1"), "{err}");
        assert!(ServerOptimizer::new(ServerStrategy::fed_yogi(0.0), 1).is_err());
    }

    #[test]
    fn clipping() {
        let mut v = vec![3.0f32, 4.0];
        assert!(!clip_l2(&mut v, 5.0));
        assert_eq!(v, vec![3.0, 4.0]);
        assert!(clip_l2(&mut v, 1.0));
        assert!(l2_norm(&v) <= 1.0);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let mut w = vec![1.0f32, f32::INFINITY];
        assert!(clip_l2(&mut w, 1.0));
        assert_eq!(w, vec![0.0, 0.0]);
    }
}
