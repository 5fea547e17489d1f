//! Local training on one node: [`train_local`].

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Reduction, Tensor};

use crate::data::{Dataset, Targets};
use crate::error::{Error, Result};
use crate::local::{Budget, LocalConfig, LocalOptimizer};
use crate::model::Model;

/// What one round of local training produced.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalResult {
    /// New parameters minus the parameters at the start of the round, in
    /// the flat order of [`Model::parameters`].
    pub update: Vec<f32>,
    /// Rows in the local dataset.
    pub num_examples: usize,
    /// Optimiser steps taken (for Cox, batches without an event are
    /// skipped and not counted).
    pub steps: usize,
    /// Mean training loss over the round, before any proximal term:
    /// binary cross-entropy per example for classifiers, negative partial
    /// log-likelihood per event (Breslow, risk sets within the batch) for Cox.
    pub mean_loss: f64,
}

impl LocalResult {
    /// The update multiplied by `weight`, in f64: what a node submits to
    /// secure aggregation so that the sum, divided by the summed weights,
    /// is the weighted mean update (FedAvg weights are example counts:
    /// `weighted_update(num_examples as f64)`).
    pub fn weighted_update(&self, weight: f64) -> Vec<f64> {
        self.update.iter().map(|&u| f64::from(u) * weight).collect()
    }
}

/// Trains `model` on `data` for one round and returns the update.
///
/// The parameters the model holds on entry are the round's global
/// parameters (for FedProx's proximal term and for the update). On return
/// the model holds the locally trained parameters; set the next global
/// parameters with [`Model::set_parameters`] before the next round.
///
/// Losses: binary cross-entropy on logits for logistic regression and MLP
/// (mean over the batch); for Cox, the negative Breslow partial
/// log-likelihood with risk sets formed within each batch, averaged over the
/// batch's events (a batch without events contributes no gradient).
pub fn train_local(model: &mut Model, data: &Dataset, config: &LocalConfig) -> Result<LocalResult> {
    config.validate()?;
    check_data(model, data)?;
    if data.is_empty() {
        return Err(Error::InvalidDataset(
            "no rows to train on: a node with no data should skip the round".into(),
        ));
    }
    let device = model.device();
    let n = data.len();
    let x_all = data.feature_tensor(device)?;
    let y_all = data.label_tensor(device)?;
    let params: Vec<Tensor> = model
        .parameter_tensors()
        .into_iter()
        .map(Tensor::shallow_clone)
        .collect();
    let global: Vec<Tensor> = params
        .iter()
        .map(|p| deep_copy(&p.f_detach()?))
        .collect::<Result<_, _>>()?;
    let mut optimizer = OptimizerState::new(config.optimizer, &params)?;

    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let mut order: Vec<usize> = (0..n).collect();
    let total_steps = match config.budget {
        Budget::Epochs(e) => (e as usize) * n.div_ceil(config.batch_size),
        Budget::Steps(s) => s as usize,
    };
    let mut cursor = n; // forces a shuffle before the first batch
    let mut loss_sum = Tensor::f_zeros([], (Kind::Double, device))?;
    let mut loss_weight = 0f64;
    let mut steps = 0usize;
    for _ in 0..total_steps {
        if cursor >= n {
            order.shuffle(&mut rng);
            cursor = 0;
        }
        let end = (cursor + config.batch_size).min(n);
        let batch = &order[cursor..end];
        cursor = end;

        let (loss, weight) = match (&y_all, data.targets()) {
            (Some(y_all), Targets::Binary(_)) => {
                let idx = index_tensor(batch, device)?;
                let xb = x_all.f_index_select(0, &idx)?;
                let yb = y_all.f_index_select(0, &idx)?;
                let logits = model.forward(&xb, true)?;
                let loss = logits.f_binary_cross_entropy_with_logits::<Tensor>(
                    &yb,
                    None,
                    None,
                    Reduction::Mean,
                )?;
                (loss, batch.len() as f64)
            }
            (None, Targets::Survival { time, event }) => {
                let batch = CoxBatch::new(batch, time, event);
                if batch.events == 0 {
                    continue;
                }
                let idx = index_tensor(&batch.rows, device)?;
                let xb = x_all.f_index_select(0, &idx)?;
                let risk = model.forward(&xb, true)?;
                let loss = batch.loss(&risk, device)?;
                (loss, batch.events as f64)
            }
            _ => return Err(Error::Internal("targets and label tensor disagree".into())),
        };
        for p in &params {
            p.shallow_clone().zero_grad();
        }
        loss.f_backward()?;
        tch::no_grad(|| -> Result<()> {
            let _ = loss_sum.f_add_(
                &loss
                    .f_detach()?
                    .f_to_kind(Kind::Double)?
                    .f_mul_scalar(weight)?,
            )?;
            optimizer.step(&params, &global, config)
        })?;
        loss_weight += weight;
        steps += 1;
    }
    for p in &params {
        p.shallow_clone().zero_grad();
    }

    let mean_loss = if loss_weight > 0.0 {
        loss_sum.f_double_value(&[])? / loss_weight
    } else {
        0.0
    };
    if !mean_loss.is_finite() {
        return Err(Error::Diverged(format!(
            "mean training loss is {mean_loss}"
        )));
    }
    let deltas: Vec<Tensor> = params
        .iter()
        .zip(&global)
        .map(|(p, g)| p.f_detach()?.f_sub(g)?.f_reshape([-1]))
        .collect::<Result<_, _>>()?;
    let update = Vec::<f32>::try_from(
        &Tensor::f_cat(&deltas, 0)?
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?,
    )?;
    if let Some(i) = update.iter().position(|v| !v.is_finite()) {
        return Err(Error::Diverged(format!(
            "update entry {i} is {}",
            update[i]
        )));
    }
    Ok(LocalResult {
        update,
        num_examples: n,
        steps,
        mean_loss,
    })
}

/// What [`clipped_gradients`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedGradients {
    /// Σ_i clip(∇ loss_i, C) at the model's parameters, in the flat order
    /// of [`Model::parameters`] (f64; [`clipped_gradient_sum`] only).
    pub sum: Vec<f64>,
    /// Examples seen.
    pub examples: usize,
    /// Examples whose gradient norm exceeded C, or was not finite (those
    /// contribute a zero vector).
    pub clipped: usize,
    /// Mean loss over the examples with a finite loss (before the step).
    pub mean_loss: f64,
}

/// Calls `each` with every example's loss gradient at the model's current
/// parameters, clipped to L2 norm `clip` (a hair below, so that rounding
/// cannot exceed it), in the flat order of [`Model::parameters`]: what one
/// person contributes to DP-SGD's sum. A gradient that is not finite (a
/// model from elsewhere that overflows on the row) is passed as zeros, with
/// no error, which would tell something about the row. Classifiers only (a
/// Cox partial likelihood does not split into per-person terms). One
/// backward pass per example, dropout active as in training.
pub fn clipped_gradients(
    model: &Model,
    data: &Dataset,
    clip: f64,
    mut each: impl FnMut(&[f64]) -> Result<()>,
) -> Result<ClippedGradients> {
    check_data(model, data)?;
    if !(clip > 0.0 && clip.is_finite()) {
        return Err(Error::config(
            "per-example clipping",
            "clip_norm",
            format!("= {clip} must be positive and finite"),
        ));
    }
    let Targets::Binary(labels) = data.targets() else {
        return Err(Error::TargetKind(
            "per-example gradient clipping is for classifiers: a cox partial likelihood has no \
             per-person terms; use update clipping"
                .into(),
        ));
    };
    let device = model.device();
    let params: Vec<Tensor> = model
        .parameter_tensors()
        .into_iter()
        .map(Tensor::shallow_clone)
        .collect();
    let total: usize = params.iter().map(Tensor::numel).sum();
    let x_all = data.feature_tensor(device)?;
    let target_norm = clip * (1.0 - 1e-6);
    let zeros = vec![0f64; total];
    let (mut clipped, mut loss_sum, mut finite) = (0usize, 0f64, 0usize);
    for (i, &y) in labels.iter().enumerate() {
        for p in &params {
            p.shallow_clone().zero_grad();
        }
        let x = x_all.f_narrow(0, i as i64, 1)?;
        let logit = model.forward(&x, true)?;
        let target = Tensor::f_from_slice(&[y])?.f_to_device(device)?;
        let loss = logit.f_binary_cross_entropy_with_logits::<Tensor>(
            &target,
            None,
            None,
            Reduction::Sum,
        )?;
        loss.f_backward()?;
        let grads: Vec<Tensor> = params
            .iter()
            .map(|p| p.grad().f_reshape([-1]))
            .collect::<Result<_, _>>()?;
        let g = Vec::<f64>::try_from(
            &Tensor::f_cat(&grads, 0)?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Double)?,
        )?;
        let norm = g.iter().map(|v| v * v).sum::<f64>().sqrt();
        let value = loss.f_double_value(&[])?;
        if !(norm.is_finite() && value.is_finite()) {
            clipped += 1;
            each(&zeros)?;
            continue;
        }
        loss_sum += value;
        finite += 1;
        if norm > target_norm {
            clipped += 1;
            let scale = target_norm / norm;
            let scaled: Vec<f64> = g.iter().map(|v| v * scale).collect();
            each(&scaled)?;
        } else {
            each(&g)?;
        }
    }
    for p in &params {
        p.shallow_clone().zero_grad();
    }
    Ok(ClippedGradients {
        sum: Vec::new(),
        examples: labels.len(),
        clipped,
        mean_loss: if finite > 0 {
            loss_sum / finite as f64
        } else {
            0.0
        },
    })
}

/// The sum of [`clipped_gradients`], in f64 (for checks and in-process use;
/// a node sums them in whole granules instead).
pub fn clipped_gradient_sum(model: &Model, data: &Dataset, clip: f64) -> Result<ClippedGradients> {
    let mut sum = vec![0f64; model.num_parameters()];
    let mut seen = clipped_gradients(model, data, clip, |g| {
        for (s, v) in sum.iter_mut().zip(g) {
            *s += v;
        }
        Ok(())
    })?;
    seen.sum = sum;
    Ok(seen)
}

/// Checks that `data` suits `model` (feature width, kind of targets).
pub(crate) fn check_data(model: &Model, data: &Dataset) -> Result<()> {
    let spec = model.spec();
    if data.width() != spec.inputs {
        return Err(Error::FeatureWidth {
            model: spec.inputs,
            data: data.width(),
        });
    }
    match (spec.is_classifier(), data.targets()) {
        (true, Targets::Binary(_)) | (false, Targets::Survival { .. }) => Ok(()),
        (true, Targets::Survival { .. }) => Err(Error::TargetKind(format!(
            "a {} model needs binary labels: build the dataset with Dataset::binary, \
             or use architecture = \"cox\" for survival data",
            spec.architecture
        ))),
        (false, Targets::Binary(_)) => Err(Error::TargetKind(
            "a cox model needs survival targets (time and event): build the dataset \
             with Dataset::survival, or use a classifier for binary labels"
                .into(),
        )),
    }
}

/// A new tensor with `t`'s values and its own storage.
fn deep_copy(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut c = t.f_zeros_like()?;
    c.f_copy_(t)?;
    Ok(c)
}

pub(crate) fn index_tensor(rows: &[usize], device: Device) -> Result<Tensor> {
    let idx: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
    Ok(Tensor::f_from_slice(&idx)?.f_to_device(device)?)
}

/// A mini-batch of survival data sorted for the Breslow partial likelihood.
struct CoxBatch {
    /// Row indices, by decreasing time.
    rows: Vec<usize>,
    /// For each position, the last position with the same time: the risk
    /// set of position `i` is positions `0 ..= tie_end[i]`.
    tie_end: Vec<i64>,
    /// 1.0 where the event was observed.
    event: Vec<f32>,
    events: usize,
}

impl CoxBatch {
    fn new(batch: &[usize], time: &[f32], event: &[bool]) -> Self {
        let mut rows = batch.to_vec();
        rows.sort_by(|&a, &b| time[b].total_cmp(&time[a]));
        let mut tie_end = vec![0i64; rows.len()];
        let mut i = rows.len();
        while i > 0 {
            let end = i - 1;
            let mut start = end;
            while start > 0 && time[rows[start - 1]] == time[rows[end]] {
                start -= 1;
            }
            for slot in &mut tie_end[start..=end] {
                *slot = end as i64;
            }
            i = start;
        }
        let event: Vec<f32> = rows
            .iter()
            .map(|&r| f32::from(u8::from(event[r])))
            .collect();
        let events = event.iter().filter(|&&e| e > 0.0).count();
        CoxBatch {
            rows,
            tie_end,
            event,
            events,
        }
    }

    /// Mean negative partial log-likelihood over the events, given the risk
    /// scores of `rows` in order.
    fn loss(&self, risk: &Tensor, device: Device) -> Result<Tensor> {
        let log_risk_set = risk.f_logcumsumexp(0)?.f_index_select(
            0,
            &Tensor::f_from_slice(&self.tie_end)?.f_to_device(device)?,
        )?;
        let event = Tensor::f_from_slice(&self.event)?.f_to_device(device)?;
        Ok(log_risk_set
            .f_sub(risk)?
            .f_mul(&event)?
            .f_sum(Kind::Float)?
            .f_div_scalar(self.events as f64)?)
    }
}

/// Per-round optimiser state.
enum OptimizerState {
    Sgd {
        momentum: f64,
        buffers: Vec<Option<Tensor>>,
    },
    Adam {
        beta1: f64,
        beta2: f64,
        eps: f64,
        t: i32,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
    },
}

impl OptimizerState {
    fn new(kind: LocalOptimizer, params: &[Tensor]) -> Result<Self> {
        Ok(match kind {
            LocalOptimizer::Sgd { momentum } => OptimizerState::Sgd {
                momentum,
                buffers: params.iter().map(|_| None).collect(),
            },
            LocalOptimizer::Adam { beta1, beta2, eps } => OptimizerState::Adam {
                beta1,
                beta2,
                eps,
                t: 0,
                m: params
                    .iter()
                    .map(Tensor::f_zeros_like)
                    .collect::<Result<_, _>>()?,
                v: params
                    .iter()
                    .map(Tensor::f_zeros_like)
                    .collect::<Result<_, _>>()?,
            },
        })
    }

    /// One update of every parameter from its gradient (plus the proximal
    /// gradient `mu * (w - w_global)`). Call under `no_grad`.
    fn step(&mut self, params: &[Tensor], global: &[Tensor], config: &LocalConfig) -> Result<()> {
        let lr = config.learning_rate;
        let mu = config.proximal_mu;
        if let OptimizerState::Adam { t, .. } = self {
            *t += 1;
        }
        for (i, (p, g0)) in params.iter().zip(global).enumerate() {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            let mut grad = grad.f_detach()?;
            if mu > 0.0 {
                grad = grad.f_add(&p.f_sub(g0)?.f_mul_scalar(mu)?)?;
            }
            let mut p = p.shallow_clone();
            match self {
                OptimizerState::Sgd { momentum, buffers } => {
                    let direction = if *momentum > 0.0 {
                        let buf = match buffers[i].take() {
                            None => deep_copy(&grad)?,
                            Some(mut buf) => {
                                let _ = buf.f_mul_scalar_(*momentum)?;
                                let _ = buf.f_add_(&grad)?;
                                buf
                            }
                        };
                        let d = buf.shallow_clone();
                        buffers[i] = Some(buf);
                        d
                    } else {
                        grad
                    };
                    let _ = p.f_sub_(&direction.f_mul_scalar(lr)?)?;
                }
                OptimizerState::Adam {
                    beta1,
                    beta2,
                    eps,
                    t,
                    m,
                    v,
                } => {
                    let _ = m[i].f_mul_scalar_(*beta1)?;
                    let _ = m[i].f_add_(&grad.f_mul_scalar(1.0 - *beta1)?)?;
                    let _ = v[i].f_mul_scalar_(*beta2)?;
                    let _ = v[i].f_add_(&grad.f_mul(&grad)?.f_mul_scalar(1.0 - *beta2)?)?;
                    let bc1 = 1.0 - beta1.powi(*t);
                    let bc2 = 1.0 - beta2.powi(*t);
                    let denom = v[i]
                        .f_sqrt()?
                        .f_div_scalar(bc2.sqrt())?
                        .f_add_scalar(*eps)?;
                    let _ = p.f_sub_(&m[i].f_div(&denom)?.f_mul_scalar(lr / bc1)?)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    fn separable(n: usize, seed: u64) -> Dataset {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut x = Vec::new();
        let mut y = Vec::new();
        for _ in 0..n {
            let a: f32 = rng.random_range(-1.0..1.0);
            let b: f32 = rng.random_range(-1.0..1.0);
            x.extend([a, b]);
            y.push(if 2.0 * a - b > 0.0 { 1.0 } else { 0.0 });
        }
        Dataset::binary(x, 2, y).unwrap()
    }

    #[test]
    fn logistic_regression_learns_a_separable_rule() {
        let data = separable(400, 1);
        let mut m = Model::with_device(&ModelSpec::logistic_regression(2), 0, Device::Cpu).unwrap();
        let before = m.parameters().unwrap();
        let cfg = LocalConfig {
            budget: Budget::Epochs(20),
            batch_size: 16,
            learning_rate: 0.05,
            optimizer: LocalOptimizer::adam(),
            ..LocalConfig::default()
        };
        let r = train_local(&mut m, &data, &cfg).unwrap();
        assert_eq!(r.num_examples, 400);
        assert_eq!(r.steps, 20 * 25);
        let after = m.parameters().unwrap();
        for i in 0..3 {
            assert!((after[i] - before[i] - r.update[i]).abs() < 1e-5);
        }
        assert!(r.mean_loss < 0.4, "loss {}", r.mean_loss);
        // The learned direction is about (2, -1).
        assert!(after[0] > 0.0 && after[1] < 0.0 && after[0] > -after[1]);
    }

    #[test]
    fn clipped_gradients_bound_each_example_and_sum_them() {
        let spec = ModelSpec::logistic_regression(2);
        let model = Model::with_device(&spec, 3, Device::Cpu).expect("model");
        let data = Dataset::binary(vec![10.0, 0.0, 0.0, 0.1, -5.0, 5.0], 2, vec![1.0, 0.0, 1.0])
            .expect("data");
        let wide = clipped_gradient_sum(&model, &data, 1e6).expect("unclipped");
        assert_eq!((wide.examples, wide.clipped), (3, 0));
        // The unclipped sum is the gradient of the summed loss.
        let mut one = Model::with_device(&spec, 3, Device::Cpu).expect("same model");
        let config = LocalConfig {
            budget: Budget::Steps(1),
            batch_size: 3,
            learning_rate: 1.0,
            optimizer: LocalOptimizer::sgd(),
            proximal_mu: 0.0,
            seed: 0,
        };
        let step = train_local(&mut one, &data, &config).expect("step");
        for (g, u) in wide.sum.iter().zip(&step.update) {
            // one mean-loss SGD step at lr 1 moves by -sum/3
            assert!((g / 3.0 + f64::from(*u)).abs() < 1e-5, "{g} vs {u}");
        }
        let tight = clipped_gradient_sum(&model, &data, 0.01).expect("clipped");
        assert!(tight.clipped >= 2);
        let norm = tight.sum.iter().map(|v| v * v).sum::<f64>().sqrt();
        assert!(norm <= 0.03 + 1e-6, "{norm}");
        let cox = Model::with_device(&ModelSpec::cox(2), 0, Device::Cpu).expect("cox");
        let survival = Dataset::survival(vec![1.0, 0.0], 2, vec![1.0], vec![true]).expect("data");
        assert!(clipped_gradient_sum(&cox, &survival, 1.0).is_err());
    }

    #[test]
    fn same_seed_same_update() {
        let data = separable(50, 2);
        let spec = ModelSpec::mlp(2, [8]);
        let cfg = LocalConfig {
            budget: Budget::Steps(7),
            batch_size: 8,
            optimizer: LocalOptimizer::Sgd { momentum: 0.9 },
            seed: 5,
            ..LocalConfig::default()
        };
        let mut a = Model::with_device(&spec, 3, Device::Cpu).unwrap();
        let mut b = Model::with_device(&spec, 3, Device::Cpu).unwrap();
        let ra = train_local(&mut a, &data, &cfg).unwrap();
        let rb = train_local(&mut b, &data, &cfg).unwrap();
        assert_eq!(ra.update, rb.update);
        assert_eq!(ra.steps, 7);
    }

    #[test]
    fn proximal_term_shrinks_the_update() {
        let data = separable(200, 3);
        let spec = ModelSpec::logistic_regression(2);
        let norm = |mu: f64| {
            let mut m = Model::with_device(&spec, 1, Device::Cpu).unwrap();
            let cfg = LocalConfig {
                budget: Budget::Epochs(5),
                batch_size: 10,
                learning_rate: 0.1,
                proximal_mu: mu,
                ..LocalConfig::default()
            };
            let r = train_local(&mut m, &data, &cfg).unwrap();
            r.update.iter().map(|u| u * u).sum::<f32>().sqrt()
        };
        assert!(norm(10.0) < 0.5 * norm(0.0));
    }

    #[test]
    fn cox_partial_likelihood_matches_a_hand_computation() {
        // Times 3, 2, 2, 1 (a tie at 2), events at 3 (censored), 2, 2, 1.
        let time = [2.0f32, 3.0, 1.0, 2.0];
        let event = [true, false, true, true];
        let batch = CoxBatch::new(&[0, 1, 2, 3], &time, &event);
        assert_eq!(batch.rows[0], 1);
        assert_eq!(batch.rows[3], 2);
        assert_eq!(batch.tie_end, vec![0, 2, 2, 3]);
        let r: Vec<f32> = batch
            .rows
            .iter()
            .map(|&i| [0.5f32, -0.2, 0.1, 0.3][i])
            .collect();
        let risk = Tensor::from_slice(&r);
        let got = batch.loss(&risk, Device::Cpu).unwrap().double_value(&[]);
        let e = |v: f32| f64::from(v).exp();
        let all3 = e(r[0]) + e(r[1]) + e(r[2]);
        let all4 = all3 + e(r[3]);
        let want = ((all3.ln() - f64::from(r[1]))
            + (all3.ln() - f64::from(r[2]))
            + (all4.ln() - f64::from(r[3])))
            / 3.0;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn cox_learns_the_sign_of_a_hazard() {
        use rand::Rng;
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (mut x, mut t, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..300 {
            let a: f32 = rng.random_range(-1.0..1.0);
            let u: f32 = rng.random_range(0.001..1.0);
            // Exponential time with hazard exp(1.5 a): higher a, earlier event.
            x.push(a);
            t.push(-u.ln() / (1.5 * a).exp());
            ev.push(rng.random_bool(0.8));
        }
        let data = Dataset::survival(x, 1, t, ev).unwrap();
        let mut m = Model::with_device(&ModelSpec::cox(1), 0, Device::Cpu).unwrap();
        let cfg = LocalConfig {
            budget: Budget::Epochs(100),
            batch_size: 300,
            learning_rate: 0.5,
            ..LocalConfig::default()
        };
        train_local(&mut m, &data, &cfg).unwrap();
        let beta = m.parameters().unwrap()[0];
        assert!((beta - 1.5).abs() < 0.4, "beta = {beta}");
    }

    #[test]
    fn mismatched_data_is_refused_with_advice() {
        let mut m = Model::with_device(&ModelSpec::cox(2), 0, Device::Cpu).unwrap();
        let err = train_local(&mut m, &separable(4, 0), &LocalConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("Dataset::survival"), "{err}");
        let mut m = Model::with_device(&ModelSpec::logistic_regression(3), 0, Device::Cpu).unwrap();
        let err = train_local(&mut m, &separable(4, 0), &LocalConfig::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("inputs = 3"), "{err}");
        let bad = LocalConfig {
            learning_rate: -1.0,
            ..LocalConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("learning_rate"), "{err}");
    }

    #[test]
    fn config_reads_from_toml() {
        let cfg: LocalConfig = toml::from_str(
            r#"
            budget = { steps = 100 }
            batch_size = 4
            learning_rate = 0.001
            optimizer = { kind = "adam" }
            proximal_mu = 0.01
            "#,
        )
        .unwrap();
        assert_eq!(cfg.budget, Budget::Steps(100));
        assert_eq!(cfg.optimizer, LocalOptimizer::adam());
        cfg.validate().unwrap();
    }
}
