//! Evaluation as releasable counts: [`evaluate`], and the metrics computed
//! from (possibly noisy) counts: [`accuracy`], [`mean_loss`],
//! [`auc_from_histograms`].
//!
//! A node does not release predictions or per-row losses. It releases
//! [`EvalCounts`]: sums to which each example adds a bounded amount, so the
//! caller can add DP noise calibrated to [`EvalConfig::l1_sensitivity`] or
//! [`EvalConfig::l2_sensitivity`] (or sum them across nodes with secure
//! aggregation through [`EvalCounts::to_flat`]). The metric functions accept
//! the noisy result: negative counts are clamped to zero and a metric whose
//! denominator is not positive is `None`.

use serde::{Deserialize, Serialize};
#[cfg(feature = "torch")]
use tch::{Device, Tensor};

#[cfg(feature = "torch")]
use crate::data::{Dataset, Targets};
use crate::error::{Error, Result};
#[cfg(feature = "torch")]
use crate::model::Model;
#[cfg(feature = "torch")]
use crate::train::check_data;

/// Histogram bins used unless configured otherwise.
pub const DEFAULT_BINS: usize = 20;
/// Per-example loss clamp (nats) used unless configured otherwise.
pub const DEFAULT_LOSS_CLAMP: f64 = 10.0;
/// Rows scored per forward pass during evaluation.
#[cfg(feature = "torch")]
const EVAL_CHUNK_ROWS: usize = 8192;

/// How evaluation summarises predictions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Number of equal-width score bins over [0, 1] for the positive and
    /// negative histograms (AUC resolution).
    pub bins: usize,
    /// Each example's loss is clamped to `[0, loss_clamp]` before summing,
    /// which bounds one example's contribution to `loss_sum`. 10 nats
    /// corresponds to a predicted probability of about 4.5e-5 for the true
    /// class: only confidently wrong predictions are clipped.
    pub loss_clamp: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            bins: DEFAULT_BINS,
            loss_clamp: DEFAULT_LOSS_CLAMP,
        }
    }
}

impl EvalConfig {
    /// Checks the fields.
    pub fn validate(&self) -> Result<()> {
        if self.bins == 0 || self.bins > 1 << 16 {
            return Err(Error::config(
                "evaluation",
                "bins",
                format!("= {} must be between 1 and 65536", self.bins),
            ));
        }
        if !(self.loss_clamp.is_finite() && self.loss_clamp > 0.0) {
            return Err(Error::config(
                "evaluation",
                "loss_clamp",
                format!("= {} must be finite and > 0", self.loss_clamp),
            ));
        }
        Ok(())
    }

    /// L1 sensitivity of [`EvalCounts::to_flat`] when one example is added
    /// or removed: 1 (examples) + `loss_clamp` + 1 (one confusion cell) + 1
    /// (one histogram bin). Double it for replace-one neighbouring.
    pub fn l1_sensitivity(&self) -> f64 {
        3.0 + self.loss_clamp
    }

    /// L2 sensitivity of [`EvalCounts::to_flat`] under add/remove-one:
    /// `sqrt(3 + loss_clamp^2)`.
    pub fn l2_sensitivity(&self) -> f64 {
        (3.0 + self.loss_clamp * self.loss_clamp).sqrt()
    }
}

/// Evaluation of a binary classifier as sums over examples.
///
/// Exact counts are whole numbers held as `f64` (exact up to 2^53) so that
/// the same type carries noisy releases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalCounts {
    /// Number of examples.
    pub examples: f64,
    /// Sum of per-example binary cross-entropy, each clamped to
    /// `[0, loss_clamp]`.
    pub loss_sum: f64,
    /// Positives predicted positive (score > 0.5).
    pub true_positives: f64,
    /// Negatives predicted positive.
    pub false_positives: f64,
    /// Negatives predicted negative (score <= 0.5).
    pub true_negatives: f64,
    /// Positives predicted negative.
    pub false_negatives: f64,
    /// Scores of positive examples in `bins` equal bins over [0, 1]
    /// (bin `min(floor(score * bins), bins - 1)`).
    pub positive_histogram: Vec<f64>,
    /// Scores of negative examples, same bins.
    pub negative_histogram: Vec<f64>,
}

impl EvalCounts {
    /// All-zero counts with `bins` histogram bins.
    pub fn zeros(bins: usize) -> Self {
        EvalCounts {
            examples: 0.0,
            loss_sum: 0.0,
            true_positives: 0.0,
            false_positives: 0.0,
            true_negatives: 0.0,
            false_negatives: 0.0,
            positive_histogram: vec![0.0; bins],
            negative_histogram: vec![0.0; bins],
        }
    }

    /// Number of histogram bins.
    pub fn bins(&self) -> usize {
        self.positive_histogram.len()
    }

    /// Adds another node's counts (same bins).
    pub fn add(&mut self, other: &EvalCounts) -> Result<()> {
        if other.bins() != self.bins() || other.negative_histogram.len() != self.bins() {
            return Err(Error::InvalidAggregate(format!(
                "cannot add evaluation counts with {} bins to counts with {}",
                other.bins(),
                self.bins()
            )));
        }
        let mut flat = self.to_flat();
        for (a, b) in flat.iter_mut().zip(other.to_flat()) {
            *a += b;
        }
        *self = EvalCounts::from_flat(self.bins(), &flat)?;
        Ok(())
    }

    /// The counts as one vector, for secure aggregation and vector noise:
    /// `[examples, loss_sum, tp, fp, tn, fn, positive_histogram..,
    /// negative_histogram..]`, length `6 + 2 * bins`.
    pub fn to_flat(&self) -> Vec<f64> {
        let mut v = vec![
            self.examples,
            self.loss_sum,
            self.true_positives,
            self.false_positives,
            self.true_negatives,
            self.false_negatives,
        ];
        v.extend_from_slice(&self.positive_histogram);
        v.extend_from_slice(&self.negative_histogram);
        v
    }

    /// Inverse of [`EvalCounts::to_flat`].
    pub fn from_flat(bins: usize, flat: &[f64]) -> Result<Self> {
        if flat.len() != 6 + 2 * bins {
            return Err(Error::InvalidAggregate(format!(
                "evaluation vector has {} values; {bins} bins need {}",
                flat.len(),
                6 + 2 * bins
            )));
        }
        Ok(EvalCounts {
            examples: flat[0],
            loss_sum: flat[1],
            true_positives: flat[2],
            false_positives: flat[3],
            true_negatives: flat[4],
            false_negatives: flat[5],
            positive_histogram: flat[6..6 + bins].to_vec(),
            negative_histogram: flat[6 + bins..].to_vec(),
        })
    }
}

#[cfg(feature = "torch")]
/// Evaluates a classifier with [`EvalConfig::default`].
pub fn evaluate(model: &Model, data: &Dataset) -> Result<EvalCounts> {
    evaluate_with(model, data, &EvalConfig::default())
}

#[cfg(feature = "torch")]
/// Evaluates a classifier (logistic regression or MLP) on `data`.
pub fn evaluate_with(model: &Model, data: &Dataset, config: &EvalConfig) -> Result<EvalCounts> {
    config.validate()?;
    if !model.spec().is_classifier() {
        return Err(Error::TargetKind(
            "evaluate is for classifiers; evaluate a cox model with evaluate_survival".into(),
        ));
    }
    check_data(model, data)?;
    let Targets::Binary(labels) = data.targets() else {
        return Err(Error::Internal(
            "classifier data without binary labels".into(),
        ));
    };
    let logits = score(model, data)?;
    let bins = config.bins;
    let mut c = EvalCounts::zeros(bins);
    for (&z, &y) in logits.iter().zip(labels) {
        // A model that overflows on a row (weights from elsewhere) scores it
        // at the clamp, never NaN: the counts stay well defined.
        let z = if z.is_nan() {
            0.0
        } else {
            f64::from(z).clamp(-1e4, 1e4)
        };
        let positive = y > 0.5;
        // Binary cross-entropy on the logit, stable for large |z|.
        let loss = z.max(0.0) - if positive { z } else { 0.0 } + (-z.abs()).exp().ln_1p();
        let p = 1.0 / (1.0 + (-z).exp());
        let bin = ((p * bins as f64).floor() as usize).min(bins - 1);
        c.examples += 1.0;
        c.loss_sum += loss.clamp(0.0, config.loss_clamp);
        match (positive, p > 0.5) {
            (true, true) => c.true_positives += 1.0,
            (true, false) => c.false_negatives += 1.0,
            (false, true) => c.false_positives += 1.0,
            (false, false) => c.true_negatives += 1.0,
        }
        if positive {
            c.positive_histogram[bin] += 1.0;
        } else {
            c.negative_histogram[bin] += 1.0;
        }
    }
    Ok(c)
}

#[cfg(feature = "torch")]
/// The model's raw outputs (logits or risk scores) for every row, on CPU.
fn score(model: &Model, data: &Dataset) -> Result<Vec<f32>> {
    let width = data.width();
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.features().chunks(EVAL_CHUNK_ROWS * width) {
        let rows = (chunk.len() / width) as i64;
        let x = Tensor::f_from_slice(chunk)?
            .f_view([rows, width as i64])?
            .f_to_device(model.device())?;
        let z = tch::no_grad(|| model.forward(&x, false))?;
        out.extend(Vec::<f32>::try_from(&z.f_to_device(Device::Cpu)?)?);
    }
    Ok(out)
}

fn clamp0(v: f64) -> f64 {
    if v.is_finite() { v.max(0.0) } else { 0.0 }
}

/// Accuracy at threshold 0.5 from (possibly noisy) confusion counts.
pub fn accuracy(counts: &EvalCounts) -> Option<f64> {
    let right = clamp0(counts.true_positives) + clamp0(counts.true_negatives);
    let wrong = clamp0(counts.false_positives) + clamp0(counts.false_negatives);
    let total = right + wrong;
    (total > 0.0).then(|| right / total)
}

/// Mean per-example (clamped) loss from (possibly noisy) counts, clamped to
/// `[0, loss_clamp]` as a mean of clamped values must be.
pub fn mean_loss(counts: &EvalCounts, loss_clamp: f64) -> Option<f64> {
    let n = clamp0(counts.examples);
    (n > 0.0).then(|| (clamp0(counts.loss_sum) / n).min(loss_clamp))
}

/// Area under the ROC curve from score histograms of positives and
/// negatives over the same bins (in increasing score order).
///
/// This is the Mann-Whitney statistic with scores rounded to their bin: a
/// positive beats every negative in a lower bin and half of those in its own
/// bin, i.e. the trapezoidal AUC of the binned ROC curve. Counts may be
/// noisy: negative or non-finite entries count as zero. `None` when either
/// class has no (positive) mass or the histograms differ in length.
pub fn auc_from_histograms(positive: &[f64], negative: &[f64]) -> Option<f64> {
    if positive.len() != negative.len() {
        return None;
    }
    let mut negatives_below = 0.0;
    let mut wins = 0.0;
    let mut total_pos = 0.0;
    for (&p, &n) in positive.iter().zip(negative) {
        let (p, n) = (clamp0(p), clamp0(n));
        wins += p * (negatives_below + 0.5 * n);
        negatives_below += n;
        total_pos += p;
    }
    let pairs = total_pos * negatives_below;
    (pairs > 0.0).then(|| wins / pairs)
}

/// Evaluation of a Cox model as sums over the dataset.
///
/// Unlike [`EvalCounts`], these are not per-example bounded: one person
/// changes the risk sets of everyone who outlived them and up to `n`
/// comparable pairs, so release them with noise calibrated to that, or
/// only within the node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SurvivalCounts {
    /// Number of examples.
    pub examples: f64,
    /// Number of observed events.
    pub events: f64,
    /// Negative Breslow partial log-likelihood over the whole dataset, each
    /// event's term clamped to `[0, loss_clamp]`.
    pub loss_sum: f64,
    /// Comparable pairs (an event strictly before another's time) where the
    /// earlier one has the higher risk score.
    pub concordant: f64,
    /// Comparable pairs ordered the other way.
    pub discordant: f64,
    /// Comparable pairs with equal risk scores.
    pub tied_risk: f64,
}

/// Harrell's concordance index from (possibly noisy) pair counts; tied
/// risk scores count half.
pub fn concordance_index(counts: &SurvivalCounts) -> Option<f64> {
    let c = clamp0(counts.concordant);
    let d = clamp0(counts.discordant);
    let t = clamp0(counts.tied_risk);
    let total = c + d + t;
    (total > 0.0).then(|| (c + 0.5 * t) / total)
}

#[cfg(feature = "torch")]
/// Evaluates a Cox model on `data`: partial likelihood and concordance.
pub fn evaluate_survival(
    model: &Model,
    data: &Dataset,
    config: &EvalConfig,
) -> Result<SurvivalCounts> {
    config.validate()?;
    if model.spec().is_classifier() {
        return Err(Error::TargetKind(
            "evaluate_survival is for cox models; evaluate a classifier with evaluate".into(),
        ));
    }
    check_data(model, data)?;
    let Targets::Survival { time, event } = data.targets() else {
        return Err(Error::Internal("cox data without survival targets".into()));
    };
    let risk: Vec<f64> = score(model, data)?.into_iter().map(f64::from).collect();
    let n = risk.len();
    // Rows by decreasing time; tie groups share a risk set.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| time[b].total_cmp(&time[a]));

    let mut loss_sum = 0.0;
    let mut log_risk_set = f64::NEG_INFINITY;
    let mut start = 0;
    while start < n {
        let mut end = start;
        while end + 1 < n && time[order[end + 1]] == time[order[start]] {
            end += 1;
        }
        for &i in &order[start..=end] {
            log_risk_set = log_add_exp(log_risk_set, risk[i]);
        }
        for &i in &order[start..=end] {
            if event[i] {
                loss_sum += (log_risk_set - risk[i]).clamp(0.0, config.loss_clamp);
            }
        }
        start = end + 1;
    }

    let (concordant, discordant, tied_risk) = concordance_pairs(&order, time, event, &risk);
    Ok(SurvivalCounts {
        examples: n as f64,
        events: event.iter().filter(|&&e| e).count() as f64,
        loss_sum,
        concordant,
        discordant,
        tied_risk,
    })
}

#[cfg(feature = "torch")]
fn log_add_exp(a: f64, b: f64) -> f64 {
    if a == f64::NEG_INFINITY {
        return b;
    }
    let m = a.max(b);
    m + ((a - m).exp() + (b - m).exp()).ln()
}

/// Counts Harrell's pairs in O(n log n): walking times downwards, every row
/// that outlived the current tie group is in a Fenwick tree keyed by the
/// rank of its risk score; each event in the group is compared with them.
#[cfg(feature = "torch")]
fn concordance_pairs(
    order: &[usize],
    time: &[f32],
    event: &[bool],
    risk: &[f64],
) -> (f64, f64, f64) {
    let n = order.len();
    let mut sorted_risk: Vec<f64> = risk.to_vec();
    sorted_risk.sort_by(f64::total_cmp);
    sorted_risk.dedup();
    let rank = |r: f64| sorted_risk.partition_point(|&s| s < r);
    let mut tree = Fenwick::new(sorted_risk.len());
    let (mut conc, mut disc, mut tied) = (0.0, 0.0, 0.0);
    let mut inserted = 0u64;
    let mut start = 0;
    while start < n {
        let mut end = start;
        while end + 1 < n && time[order[end + 1]] == time[order[start]] {
            end += 1;
        }
        for &i in &order[start..=end] {
            if event[i] {
                let k = rank(risk[i]);
                let below = tree.prefix(k); // later rows with lower risk
                let at_or_below = tree.prefix(k + 1);
                conc += below as f64;
                tied += (at_or_below - below) as f64;
                disc += (inserted - at_or_below) as f64;
            }
        }
        for &i in &order[start..=end] {
            tree.add(rank(risk[i]));
            inserted += 1;
        }
        start = end + 1;
    }
    (conc, disc, tied)
}

/// Counts per rank with prefix sums.
#[cfg(feature = "torch")]
struct Fenwick(Vec<u64>);

#[cfg(feature = "torch")]
impl Fenwick {
    fn new(n: usize) -> Self {
        Fenwick(vec![0; n + 1])
    }
    fn add(&mut self, i: usize) {
        let mut i = i + 1;
        while i < self.0.len() {
            self.0[i] += 1;
            i += i & i.wrapping_neg();
        }
    }
    /// Sum of counts at ranks `< i`.
    fn prefix(&self, i: usize) -> u64 {
        let mut i = i;
        let mut s = 0;
        while i > 0 {
            s += self.0[i];
            i -= i & i.wrapping_neg();
        }
        s
    }
}

#[cfg(all(test, feature = "torch"))]
mod tests {
    use super::*;
    use crate::spec::ModelSpec;

    #[test]
    fn auc_of_separated_overlapping_and_tied_scores() {
        assert_eq!(
            auc_from_histograms(&[0.0, 0.0, 3.0], &[2.0, 0.0, 0.0]),
            Some(1.0)
        );
        assert_eq!(auc_from_histograms(&[2.0, 0.0], &[0.0, 2.0]), Some(0.0));
        // Everything in one bin: a coin toss.
        assert_eq!(auc_from_histograms(&[5.0], &[7.0]), Some(0.5));
        // pos in bins [1, 2] = [1, 1], neg in bins [0, 1] = [1, 1]:
        // pairs 4; pos@1 beats neg@0 (1) + half neg@1 (0.5); pos@2 beats both (2).
        assert_eq!(
            auc_from_histograms(&[0.0, 1.0, 1.0], &[1.0, 1.0, 0.0]),
            Some(3.5 / 4.0)
        );
        // Noisy counts: negatives clamp to zero.
        assert_eq!(auc_from_histograms(&[-1.0, 2.0], &[3.0, -0.5]), Some(1.0));
        assert_eq!(auc_from_histograms(&[1.0], &[-2.0]), None);
        assert_eq!(auc_from_histograms(&[1.0], &[1.0, 1.0]), None);
    }

    #[test]
    fn auc_equals_mann_whitney_on_distinct_bins() {
        // Brute force on integer scores, each its own bin.
        let pos = [3usize, 5, 5, 9];
        let neg = [0usize, 5, 7, 2, 9];
        let mut ph = [0.0; 10];
        let mut nh = [0.0; 10];
        pos.iter().for_each(|&s| ph[s] += 1.0);
        neg.iter().for_each(|&s| nh[s] += 1.0);
        let mut wins = 0.0;
        for &p in &pos {
            for &n in &neg {
                wins += if p > n {
                    1.0
                } else if p == n {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let want = wins / (pos.len() * neg.len()) as f64;
        assert!((auc_from_histograms(&ph, &nh).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn accuracy_and_loss_tolerate_noise() {
        let mut c = EvalCounts::zeros(2);
        c.true_positives = 3.0;
        c.true_negatives = 5.0;
        c.false_positives = -1.0;
        c.false_negatives = 2.0;
        assert_eq!(accuracy(&c), Some(0.8));
        c.examples = 10.0;
        c.loss_sum = 250.0;
        assert_eq!(mean_loss(&c, 10.0), Some(10.0));
        assert_eq!(accuracy(&EvalCounts::zeros(2)), None);
    }

    #[test]
    fn evaluate_counts_a_known_model() {
        let mut m = Model::with_device(&ModelSpec::logistic_regression(1), 0, Device::Cpu).unwrap();
        m.set_parameters(&[1.0, 0.0]).unwrap(); // p = sigmoid(x)
        let data = Dataset::binary(
            vec![3.0, -3.0, 1.0, -1.0, 40.0],
            1,
            vec![1.0, 1.0, 0.0, 0.0, 0.0],
        )
        .unwrap();
        let cfg = EvalConfig {
            bins: 4,
            loss_clamp: 10.0,
        };
        let c = evaluate_with(&m, &data, &cfg).unwrap();
        assert_eq!(c.examples, 5.0);
        assert_eq!((c.true_positives, c.false_negatives), (1.0, 1.0));
        assert_eq!((c.false_positives, c.true_negatives), (2.0, 1.0));
        // sigmoid(3)=0.95 -> bin 3, sigmoid(-3)=0.047 -> bin 0.
        assert_eq!(c.positive_histogram, vec![1.0, 0.0, 0.0, 1.0]);
        // sigmoid(1)=0.73 -> bin 2, sigmoid(-1)=0.27 -> bin 1, sigmoid(40) -> bin 3.
        assert_eq!(c.negative_histogram, vec![0.0, 1.0, 1.0, 1.0]);
        let sp = |z: f64| (1.0 + z.exp()).ln();
        let want = sp(-3.0) + sp(3.0) + sp(1.0) + sp(-1.0) + 10.0; // the last clamped from 40
        assert!((c.loss_sum - want).abs() < 1e-5, "{} vs {want}", c.loss_sum);
        let back = EvalCounts::from_flat(4, &c.to_flat()).unwrap();
        assert_eq!(back, c);
        let mut twice = c.clone();
        twice.add(&c).unwrap();
        assert_eq!(twice.examples, 10.0);
        assert!(twice.add(&EvalCounts::zeros(3)).is_err());
    }

    #[test]
    fn survival_counts_match_brute_force() {
        let mut m = Model::with_device(&ModelSpec::cox(1), 0, Device::Cpu).unwrap();
        m.set_parameters(&[0.7]).unwrap();
        let x = vec![0.3f32, -1.0, 2.0, 0.5, 0.5, -0.2, 1.0];
        let time = vec![5.0f32, 8.0, 1.0, 3.0, 3.0, 8.0, 2.0];
        let event = vec![true, false, true, true, false, true, false];
        let data = Dataset::survival(x.clone(), 1, time.clone(), event.clone()).unwrap();
        let c = evaluate_survival(&m, &data, &EvalConfig::default()).unwrap();
        let risk: Vec<f64> = x.iter().map(|&v| 0.7 * f64::from(v)).collect();
        let (mut conc, mut disc, mut tied, mut loss) = (0.0, 0.0, 0.0, 0.0);
        for i in 0..x.len() {
            if !event[i] {
                continue;
            }
            let set: f64 = (0..x.len())
                .filter(|&j| time[j] >= time[i])
                .map(|j| risk[j].exp())
                .sum();
            loss += set.ln() - risk[i];
            for j in 0..x.len() {
                if time[j] > time[i] {
                    if (risk[i] - risk[j]).abs() < 1e-6 {
                        tied += 1.0;
                    } else if risk[i] > risk[j] {
                        conc += 1.0;
                    } else {
                        disc += 1.0;
                    }
                }
            }
        }
        assert_eq!(
            (c.concordant, c.discordant, c.tied_risk),
            (conc, disc, tied)
        );
        assert!((c.loss_sum - loss).abs() < 1e-5);
        assert_eq!(c.events, 4.0);
        let ci = concordance_index(&c).unwrap();
        assert!((ci - (conc + 0.5 * tied) / (conc + disc + tied)).abs() < 1e-12);
    }

    #[test]
    fn wrong_evaluator_is_refused() {
        let m = Model::with_device(&ModelSpec::cox(1), 0, Device::Cpu).unwrap();
        let d = Dataset::binary(vec![1.0], 1, vec![1.0]).unwrap();
        let err = evaluate(&m, &d).unwrap_err().to_string();
        assert!(err.contains("evaluate_survival"), "{err}");
    }
}
