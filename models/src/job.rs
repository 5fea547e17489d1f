//! Federated training jobs: what a data scientist asks for ([`JobSpec`],
//! read from `job.toml`), and everything the coordinator and every node
//! derive from it on their own: the privacy plan ([`JobSpec::privacy_plan`]),
//! the encodings of the secure sums, the layout of update vectors, the
//! standardisation, and the privacy statement that goes with the model.
//!
//! ```toml
//! name = "heart"
//! rounds = 15
//! seed = 42
//!
//! [model]                      # inputs defaults to the number of features
//! architecture = "logistic_regression"
//!
//! [data]
//! query = "SELECT patient, age, chol, CAST(num > 0 AS DOUBLE) AS label FROM heart"
//! features = ["age", "chol"]
//! label = "label"              # cox: time = "...", event = "..."
//! unit = "patient"             # one row per person, checked at each node
//! train_fraction = 0.66        # rows go to training by a hash of split_seed and their values
//! split_seed = 43
//! bounds = { age = [20, 90], chol = [0, 610] }
//!
//! [local]                      # confer_models::LocalConfig
//! budget = { steps = 100 }
//! batch_size = 4
//! learning_rate = 0.001
//! optimizer = { kind = "sgd" }
//!
//! [server]                     # confer_models::ServerStrategy
//! strategy = "fed_avg"
//!
//! [privacy]
//! epsilon = 1.0                # the whole job, at each node
//! delta = 1e-5
//! dp_training = true           # false: updates are only secure-aggregated
//! clip_norm = 1.0
//! ```
//!
//! # Privacy
//!
//! The unit is the person (add/remove one person's row at one node). The
//! job's budget, `rho` for `(epsilon, delta)`, is split: a share for the
//! standardisation moments (one secure sum), a share for evaluation (one DP
//! release per site per evaluated round), and the rest, evenly over the
//! rounds, for the model updates when `dp_training` is on. Every part is
//! calibrated to spend at most its share, so the total is at most `rho`:
//! what each node charges to its ledger before round one.

use std::collections::BTreeMap;

use confer_privacy::federated::{SumEncoding, update_encoding, update_rho};
use confer_privacy::secagg::encoding::EncodingConfig;
use serde::{Deserialize, Serialize};

use crate::data::{Dataset, Targets};
use crate::error::{Error, Result};
use crate::eval::{EvalConfig, EvalCounts};
use crate::local::LocalConfig;
use crate::server::ServerStrategy;
use crate::spec::ModelSpec;

/// What is clipped, and so what one person can change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clipping {
    /// Each node's whole update (DP-FedAvg): local training as configured;
    /// one person can move their node's update anywhere in the clipping
    /// ball, so the noise must hide a whole node's update.
    #[default]
    Update,
    /// Each person's gradient (DP-SGD across the federation): every round
    /// each node sums its examples' gradients at the global model, each
    /// clipped to `clip_norm`; the server steps with `local.learning_rate`
    /// times the mean. One person moves the sum by one clipped gradient, so
    /// far less noise is needed with few, large nodes. Classifiers only;
    /// `local.budget`, `batch_size` and `optimizer` are not used.
    Example,
}

/// How node updates are weighted in the mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Every node counts the same.
    Uniform,
    /// Nodes count by their training examples, up to `weight_cap`; the
    /// weights are summed securely (with noise when `dp_training`).
    Examples,
}

/// A federated training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for people.
    #[serde(default)]
    pub name: String,
    /// Rounds of federated training.
    pub rounds: u32,
    /// Seed of the initial model, client sampling and local shuffling (not
    /// of any noise: noise is always seeded from the operating system).
    #[serde(default)]
    pub seed: u64,
    /// Nodes to train at; empty for every node the coordinator knows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sites: Vec<String>,
    /// Nodes sampled in each round; all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients_per_round: Option<usize>,
    /// t: the fewest nodes whose updates make a round. Each node adds the
    /// noise share σ²/t, so any t carry the full noise. Default: a majority
    /// of the nodes in a round, at least 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_sites: Option<usize>,
    /// The model (architecture and sizes).
    pub model: ModelSpec,
    /// Where the training data come from.
    pub data: DataSpec,
    /// Local training each round.
    pub local: LocalConfig,
    /// The server's update rule.
    pub server: ServerStrategy,
    /// Federated evaluation.
    #[serde(default)]
    pub evaluation: EvaluationSpec,
    /// Privacy budget and clipping.
    pub privacy: PrivacySpec,
}

/// The feature query and how its columns are used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Plain SQL over the node's tables (no DP clause): one row per person.
    pub query: String,
    /// Feature columns, in model input order.
    pub features: Vec<String>,
    /// Binary label column (0 or 1), for classifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Follow-up time column, for cox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Event indicator column (0 censored, 1 event), for cox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// The privacy-unit column: rows are ordered by it, and each unit may
    /// appear once.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// Declared `[lo, hi]` of every feature: values are clamped to them,
    /// and standardisation moments are computed on the clamped values.
    #[serde(default)]
    pub bounds: BTreeMap<String, [f64; 2]>,
    /// Expected share of each node's rows used for training; the rest is
    /// its held-out evaluation split. Each row is assigned by a hash of
    /// `split_seed` and its own values (see [`split_datasets`]).
    #[serde(default = "default_train_fraction")]
    pub train_fraction: f64,
    /// Seed of the split.
    #[serde(default = "default_split_seed")]
    pub split_seed: u32,
}

fn default_unit() -> String {
    "person_id".into()
}
fn default_train_fraction() -> f64 {
    0.66
}
fn default_split_seed() -> u32 {
    43
}

/// Federated evaluation on each node's held-out split.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Evaluate after every `every` rounds (and always after the last);
    /// 0: after the last round only.
    #[serde(default = "one")]
    pub every: u32,
    /// Score histogram bins (AUC resolution).
    #[serde(default = "default_bins")]
    pub bins: usize,
    /// Per-example loss clamp (nats).
    #[serde(default = "default_loss_clamp")]
    pub loss_clamp: f64,
}

fn one() -> u32 {
    1
}
fn default_bins() -> usize {
    crate::eval::DEFAULT_BINS
}
fn default_loss_clamp() -> f64 {
    crate::eval::DEFAULT_LOSS_CLAMP
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        EvaluationSpec {
            every: 1,
            bins: default_bins(),
            loss_clamp: default_loss_clamp(),
        }
    }
}

/// The job's privacy parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// Epsilon of the whole job at each node.
    pub epsilon: f64,
    /// Delta of the whole job at each node.
    pub delta: f64,
    /// Noise on the model updates. Off: updates are clipped and securely
    /// aggregated without noise, and the budget pays only for
    /// standardisation and evaluation.
    #[serde(default = "yes")]
    pub dp_training: bool,
    /// L2 norm each node's update (or, with `clipping = "example"`, each
    /// example's gradient) is clipped to; clipping is counted.
    #[serde(default = "default_clip")]
    pub clip_norm: f64,
    /// What is clipped: `update` (default) or `example`.
    #[serde(default)]
    pub clipping: Clipping,
    /// Share of the budget for the standardisation moments.
    #[serde(default = "default_share")]
    pub standardisation_share: f64,
    /// Share of the budget for evaluation.
    #[serde(default = "default_share")]
    pub evaluation_share: f64,
    /// Weighting of node updates: `examples` without DP training, `uniform`
    /// with it, unless set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weighting: Option<Weighting>,
    /// With `weighting = "examples"`, the example count at which a node's
    /// weight stops growing.
    #[serde(default = "default_weight_cap")]
    pub weight_cap: f64,
}

fn yes() -> bool {
    true
}
fn default_clip() -> f64 {
    1.0
}
fn default_share() -> f64 {
    0.1
}
fn default_weight_cap() -> f64 {
    100_000.0
}

impl PrivacySpec {
    /// The weighting in force.
    pub fn weighting(&self) -> Weighting {
        self.weighting.unwrap_or(if self.dp_training {
            Weighting::Uniform
        } else {
            Weighting::Examples
        })
    }
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidJob(message.into())
}

fn privacy(e: impl std::fmt::Display) -> Error {
    Error::Privacy(e.to_string())
}

impl JobSpec {
    /// Reads a job from TOML. `[model] inputs` may be left out: it is the
    /// number of features.
    pub fn from_toml_str(text: &str) -> Result<Self> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| Error::ParseSpec {
            format: "TOML",
            message: e.to_string(),
        })?;
        let features = value
            .get("data")
            .and_then(|d| d.get("features"))
            .and_then(|f| f.as_array())
            .map(Vec::len);
        if let (Some(n), Some(toml::Value::Table(model))) = (features, value.get_mut("model"))
            && !model.contains_key("inputs")
        {
            model.insert("inputs".into(), toml::Value::Integer(n as i64));
        }
        let spec: JobSpec = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::ParseSpec {
                format: "TOML",
                message: e.to_string(),
            })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Reads a job from JSON (as it travels in a task).
    pub fn from_json_value(value: serde_json::Value) -> Result<Self> {
        let spec: JobSpec = serde_json::from_value(value).map_err(|e| Error::ParseSpec {
            format: "JSON",
            message: e.to_string(),
        })?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; errors name the field and what to write.
    pub fn validate(&self) -> Result<()> {
        if self.rounds == 0 || self.rounds > 100_000 {
            return Err(bad(format!("rounds = {} must be 1 to 100000", self.rounds)));
        }
        self.model.validate()?;
        self.local.validate()?;
        self.server.validate()?;
        EvalConfig {
            bins: self.evaluation.bins,
            loss_clamp: self.evaluation.loss_clamp,
        }
        .validate()?;
        let d = &self.data;
        if d.query.trim().is_empty() {
            return Err(bad(
                "data.query is empty: give the SQL that selects the features",
            ));
        }
        if d.features.is_empty() {
            return Err(bad("data.features is empty: name the feature columns"));
        }
        if self.model.inputs != d.features.len() {
            return Err(bad(format!(
                "model.inputs = {} but data.features names {} columns: they must agree \
                 (leave inputs out to take the number of features)",
                self.model.inputs,
                d.features.len()
            )));
        }
        let mut seen = std::collections::BTreeSet::new();
        for f in &d.features {
            if !seen.insert(f.as_str()) {
                return Err(bad(format!("data.features names {f} twice")));
            }
            match d.bounds.get(f) {
                None => {
                    return Err(bad(format!(
                        "feature {f} has no bounds: add {f} = [lo, hi] to data.bounds \
                         (values are clamped to them; standardisation needs them for DP)"
                    )));
                }
                Some([lo, hi]) if !(lo.is_finite() && hi.is_finite() && lo < hi) => {
                    return Err(bad(format!(
                        "data.bounds.{f} = [{lo}, {hi}] must be finite with lo < hi"
                    )));
                }
                Some(_) => {}
            }
        }
        if let Some(extra) = d.bounds.keys().find(|k| !d.features.contains(k)) {
            return Err(bad(format!(
                "data.bounds names {extra}, which is not among data.features"
            )));
        }
        match (self.model.is_classifier(), &d.label, &d.time, &d.event) {
            (true, Some(_), None, None) => {}
            (true, ..) => {
                return Err(bad(format!(
                    "a {} model needs data.label (a 0/1 column) and neither data.time nor data.event",
                    self.model.architecture
                )));
            }
            (false, None, Some(_), Some(_)) => {}
            (false, ..) => {
                return Err(bad(
                    "a cox model needs data.time and data.event, and no data.label",
                ));
            }
        }
        if !(d.train_fraction > 0.0 && d.train_fraction < 1.0) {
            return Err(bad(format!(
                "data.train_fraction = {} must be strictly between 0 and 1",
                d.train_fraction
            )));
        }
        let p = &self.privacy;
        if !(p.epsilon > 0.0 && p.epsilon.is_finite()) {
            return Err(bad(format!(
                "privacy.epsilon = {} must be positive and finite",
                p.epsilon
            )));
        }
        if !(p.delta > 0.0 && p.delta < 1.0) {
            return Err(bad(format!(
                "privacy.delta = {} must be in (0, 1)",
                p.delta
            )));
        }
        if !(p.clip_norm > 0.0 && p.clip_norm.is_finite()) {
            return Err(bad(format!(
                "privacy.clip_norm = {} must be positive and finite",
                p.clip_norm
            )));
        }
        for (field, share) in [
            ("standardisation_share", p.standardisation_share),
            ("evaluation_share", p.evaluation_share),
        ] {
            if !(share > 0.0 && share < 1.0) {
                return Err(bad(format!(
                    "privacy.{field} = {share} must be strictly between 0 and 1"
                )));
            }
        }
        if p.dp_training && p.standardisation_share + p.evaluation_share >= 1.0 {
            return Err(bad(
                "privacy.standardisation_share + evaluation_share must leave a share for training (sum < 1)",
            ));
        }
        if p.clipping == Clipping::Example {
            if !p.dp_training {
                return Err(bad(
                    "privacy.clipping = \"example\" is DP training: set dp_training = true (or clip updates)",
                ));
            }
            if !self.model.is_classifier() {
                return Err(bad(
                    "privacy.clipping = \"example\" needs a classifier: a cox partial likelihood has no \
                     per-person gradient; use clipping = \"update\"",
                ));
            }
        }
        if !(p.weight_cap >= 1.0 && p.weight_cap.is_finite()) {
            return Err(bad(format!(
                "privacy.weight_cap = {} must be at least 1",
                p.weight_cap
            )));
        }
        if let Some(m) = self.clients_per_round
            && m < 2
        {
            return Err(bad(format!(
                "clients_per_round = {m}: secure aggregation needs at least 2 nodes per round"
            )));
        }
        if let Some(t) = self.min_sites {
            if t < 2 {
                return Err(bad(format!(
                    "min_sites = {t}: secure aggregation needs at least 2 nodes per round"
                )));
            }
            if let Some(m) = self.clients_per_round
                && t > m
            {
                return Err(bad(format!(
                    "min_sites = {t} exceeds clients_per_round = {m}"
                )));
            }
        }
        self.privacy_plan()?;
        Ok(())
    }

    /// The rounds (1-based) after which the model is evaluated.
    pub fn evaluation_rounds(&self) -> Vec<u32> {
        let every = self.evaluation.every;
        (1..=self.rounds)
            .filter(|&r| r == self.rounds || (every > 0 && r % every == 0))
            .collect()
    }

    /// The columns the node reads from the feature query: unit, features,
    /// then the targets.
    pub fn columns(&self) -> Vec<&str> {
        let d = &self.data;
        std::iter::once(d.unit.as_str())
            .chain(d.features.iter().map(String::as_str))
            .chain(d.label.as_deref())
            .chain(d.time.as_deref())
            .chain(d.event.as_deref())
            .collect()
    }

    /// The split of the job's budget.
    pub fn privacy_plan(&self) -> Result<PrivacyPlan> {
        let p = &self.privacy;
        let rho = confer_privacy::accounting::rho_for_epsilon_delta(p.epsilon, p.delta)
            .map_err(privacy)?;
        let evaluations = self.evaluation_rounds().len() as u32;
        let (stats, eval, train) = if p.dp_training {
            let train = 1.0 - p.standardisation_share - p.evaluation_share;
            (p.standardisation_share, p.evaluation_share, train)
        } else {
            let sum = p.standardisation_share + p.evaluation_share;
            (p.standardisation_share / sum, p.evaluation_share / sum, 0.0)
        };
        Ok(PrivacyPlan {
            rho,
            epsilon: p.epsilon,
            delta: p.delta,
            standardisation_rho: rho * stats,
            evaluation_rho: rho * eval / f64::from(evaluations),
            evaluations,
            round_rho: p.dp_training.then(|| rho * train / f64::from(self.rounds)),
            rounds: self.rounds,
        })
    }

    /// t for a round of `members` nodes.
    pub fn min_survivors(&self, members: usize) -> usize {
        self.min_sites.unwrap_or(members / 2 + 1).max(2)
    }

    /// The layout of update vectors for a model of `parameters` parameters.
    pub fn update_layout(&self, parameters: usize) -> UpdateLayout {
        UpdateLayout {
            parameters,
            weight: self.privacy.weighting() == Weighting::Examples,
            clip_flag: !self.privacy.dp_training,
            clip: self.privacy.clip_norm,
        }
    }

    /// The encoding of one round's updates in a session of `nodes` with
    /// threshold `min_survivors`.
    pub fn update_encoding(
        &self,
        parameters: usize,
        nodes: usize,
        min_survivors: usize,
    ) -> Result<EncodingConfig> {
        let layout = self.update_layout(parameters);
        let plan = self.privacy_plan()?;
        update_encoding(
            layout.dim(),
            layout.bound(),
            plan.round_rho,
            nodes,
            min_survivors,
        )
        .map_err(privacy)
    }

    /// The encoding of one round's clipped per-example gradient sums
    /// (`clipping = "example"`): the sum and the example count times C, so
    /// one person adds at most sqrt(2) C.
    pub fn gradient_encoding(
        &self,
        parameters: usize,
        min_survivors: usize,
    ) -> Result<SumEncoding> {
        let plan = self.privacy_plan()?;
        let rho = plan.round_rho.ok_or_else(|| {
            Error::Privacy("per-example clipping needs dp_training = true".into())
        })?;
        SumEncoding::with_person_l2(
            parameters + 1,
            std::f64::consts::SQRT_2 * self.privacy.clip_norm,
            rho,
            min_survivors,
        )
        .map_err(privacy)
    }

    /// The encoding of the standardisation moments for threshold `t`.
    pub fn moments_encoding(&self, min_survivors: usize) -> Result<SumEncoding> {
        let plan = self.privacy_plan()?;
        SumEncoding::new(
            moments_dims(self.data.features.len()),
            plan.standardisation_rho,
            min_survivors,
        )
        .map_err(privacy)
    }

    /// The evaluation summary for this job's settings.
    pub fn eval_config(&self) -> EvalConfig {
        EvalConfig {
            bins: self.evaluation.bins,
            loss_clamp: self.evaluation.loss_clamp,
        }
    }

    /// The privacy statement that travels with the model.
    pub fn privacy_statement(&self, parameters: usize, nodes: usize) -> Result<PrivacyStatement> {
        let plan = self.privacy_plan()?;
        let t = self.min_survivors(nodes);
        let update = match (plan.round_rho, self.privacy.clipping) {
            (Some(_), Clipping::Update) => {
                let c = self.update_encoding(parameters, nodes, t)?;
                Some(update_rho(&c).map_err(privacy)? * f64::from(self.rounds))
            }
            (Some(_), Clipping::Example) => {
                let c = self.gradient_encoding(parameters, t)?;
                Some(c.rho().map_err(privacy)? * f64::from(self.rounds))
            }
            (None, _) => None,
        };
        Ok(PrivacyStatement {
            unit: format!(
                "one person (one row of the feature query, keyed by {})",
                self.data.unit
            ),
            neighbouring: "add or remove one person's row at any one node".into(),
            epsilon: plan.epsilon,
            delta: plan.delta,
            rho: plan.rho,
            standardisation_rho: plan.standardisation_rho,
            evaluation_rho: plan.evaluation_rho * f64::from(plan.evaluations),
            training_rho: update,
            dp_training: self.privacy.dp_training,
            clip_norm: self.privacy.clip_norm,
            min_survivors: t,
            summary: if self.privacy.clipping == Clipping::Example {
                format!(
                    "({}, {:e})-DP per node for every person (zCDP rho {:.6}): in each of {} rounds every \
                     person's gradient was clipped to L2 norm {} and each node's sum carried its share of \
                     distributed discrete Gaussian noise, so that any {t} nodes' sum holds the full noise; \
                     the coordinator saw only secure sums. Standardisation and evaluation are included. \
                     A person seen at k institutions is covered at k times this cost.",
                    plan.epsilon, plan.delta, plan.rho, self.rounds, self.privacy.clip_norm
                )
            } else if self.privacy.dp_training {
                format!(
                    "({}, {:e})-DP per node for every person (zCDP rho {:.6}): each node's update was clipped to L2 \
                     norm {} and carried its share of distributed discrete Gaussian noise, so that any {t} \
                     nodes' sum holds the full noise; the coordinator saw only secure sums. Standardisation \
                     and evaluation are included. A person seen at k institutions is covered at k times \
                     this cost.",
                    plan.epsilon, plan.delta, plan.rho, self.privacy.clip_norm
                )
            } else {
                format!(
                    "The model itself is NOT differentially private: node updates were only clipped to L2 norm {} \
                     and securely aggregated (the coordinator saw only sums). Standardisation and evaluation \
                     releases are ({}, {:e})-DP per node (zCDP rho {:.6}).",
                    self.privacy.clip_norm, plan.epsilon, plan.delta, plan.rho
                )
            },
        })
    }
}

/// The split of a job's budget (zCDP rho, at each node).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPlan {
    /// The whole job: what each node charges before round one.
    pub rho: f64,
    /// As requested.
    pub epsilon: f64,
    /// As requested.
    pub delta: f64,
    /// The standardisation moments.
    pub standardisation_rho: f64,
    /// Each evaluation release.
    pub evaluation_rho: f64,
    /// Number of evaluation releases.
    pub evaluations: u32,
    /// Each round's update, when updates carry noise.
    pub round_rho: Option<f64>,
    /// Rounds.
    pub rounds: u32,
}

/// What a trained model's privacy guarantee is, in words and figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrivacyStatement {
    /// The privacy unit.
    pub unit: String,
    /// The neighbouring relation.
    pub neighbouring: String,
    /// Epsilon per node.
    pub epsilon: f64,
    /// Delta per node.
    pub delta: f64,
    /// zCDP rho per node (what each ledger was charged).
    pub rho: f64,
    /// Part of rho for standardisation.
    pub standardisation_rho: f64,
    /// Part of rho for evaluation.
    pub evaluation_rho: f64,
    /// Part of rho spent on updates (None without DP training).
    pub training_rho: Option<f64>,
    /// Whether updates carried noise.
    pub dp_training: bool,
    /// Update clipping norm.
    pub clip_norm: f64,
    /// t: nodes whose noise any round's sum holds at least.
    pub min_survivors: usize,
    /// The guarantee in one paragraph.
    pub summary: String,
}

/// What one node's update vector holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateLayout {
    /// Model parameters (the first elements).
    pub parameters: usize,
    /// A weight element follows (weighting by examples).
    pub weight: bool,
    /// A clipped-or-not element follows (without DP training, so clipping
    /// is counted exactly).
    pub clip_flag: bool,
    /// The clipping norm C.
    pub clip: f64,
}

impl UpdateLayout {
    /// Elements per vector.
    pub fn dim(&self) -> usize {
        self.parameters + usize::from(self.weight) + usize::from(self.clip_flag)
    }

    /// L2 bound of a vector: C for the update, C for the weight element
    /// (weights are at most 1) and C for the flag.
    pub fn bound(&self) -> f64 {
        self.clip * ((1 + usize::from(self.weight) + usize::from(self.clip_flag)) as f64).sqrt()
    }

    /// A node's vector: its update clipped to C and scaled by its weight
    /// `w` in [0, 1], then `w C` and the clip flag times C. Returns the
    /// vector and whether the update was clipped.
    pub fn node_vector(&self, update: &[f32], weight: f64) -> Result<(Vec<f64>, bool)> {
        if update.len() != self.parameters {
            return Err(Error::ParameterWidth {
                what: "update",
                expected: self.parameters,
                got: update.len(),
            });
        }
        if !(0.0..=1.0).contains(&weight) {
            return Err(Error::Internal(format!(
                "node weight {weight} outside [0, 1]"
            )));
        }
        let norm = crate::server::l2_norm(update);
        let clipped = norm > self.clip;
        let factor = if clipped { self.clip / norm } else { 1.0 } * weight;
        let mut v: Vec<f64> = update.iter().map(|&u| f64::from(u) * factor).collect();
        if self.weight {
            v.push(weight * self.clip);
        }
        if self.clip_flag {
            v.push(if clipped { self.clip } else { 0.0 });
        }
        Ok((v, clipped))
    }

    /// Reads a decoded sum of `contributors` vectors: the update sum, the
    /// weight total (at least `floor` per contributor) and, where the layout
    /// has it, the number of clipped updates.
    pub fn read_sum(
        &self,
        decoded: &[f64],
        contributors: usize,
        floor: f64,
    ) -> Result<(Vec<f64>, f64, Option<f64>)> {
        if decoded.len() != self.dim() {
            return Err(Error::Internal(format!(
                "a decoded sum of {} elements for a layout of {}",
                decoded.len(),
                self.dim()
            )));
        }
        let sum = decoded[..self.parameters].to_vec();
        let mut at = self.parameters;
        let weight = if self.weight {
            at += 1;
            (decoded[at - 1] / self.clip).max(floor * contributors as f64)
        } else {
            contributors as f64
        };
        let clipped = self
            .clip_flag
            .then(|| (decoded[at] / self.clip).round().max(0.0));
        Ok((sum, weight, clipped))
    }
}

/// One person's vector for `clipping = "example"`: their clipped gradient,
/// then C (the count element; the sum of these counts the examples).
pub fn gradient_vector(gradient: &[f64], clip: f64) -> Vec<f64> {
    gradient
        .iter()
        .copied()
        .chain(std::iter::once(clip))
        .collect()
}

/// Reads a decoded sum of [`gradient_vector`]s: the gradient sum and the
/// (noisy) number of examples, at least 1.
pub fn read_gradient_sum(decoded: &[f64], clip: f64) -> Result<(Vec<f64>, f64)> {
    let (count, sum) = decoded
        .split_last()
        .ok_or_else(|| Error::Internal("an empty gradient sum".into()))?;
    Ok((sum.to_vec(), (count / clip).max(1.0)))
}

/// Elements of the standardisation vector for `features` features: the
/// rescaled values, their squares and a count.
pub fn moments_dims(features: usize) -> usize {
    2 * features + 1
}

/// Rescales a clamped feature value to [-1, 1] with its bounds.
fn unit_scale(x: f64, [lo, hi]: [f64; 2]) -> f64 {
    let mid = (lo + hi) / 2.0;
    let half = (hi - lo) / 2.0;
    ((x.clamp(lo, hi) - mid) / half).clamp(-1.0, 1.0)
}

/// One person's moment vector: `[u, u², 1]` with `u` each feature of their
/// row clamped and rescaled to [-1, 1] (every element within [-1, 1]).
pub fn moment_vector(row: &[f32], bounds: &[[f64; 2]]) -> Vec<f64> {
    let d = bounds.len();
    let mut out = vec![0.0; moments_dims(d)];
    for (j, (&x, &b)) in row.iter().zip(bounds).enumerate() {
        let u = unit_scale(f64::from(x), b);
        out[j] = u;
        out[d + j] = u * u;
    }
    out[2 * d] = 1.0;
    out
}

/// The exact moment sums over rows (row-major raw features, in `bounds`
/// order): the sum of their [`moment_vector`]s, in f64 (for in-process
/// use; a node sums quantised vectors instead).
pub fn moment_sums(features: &[f32], bounds: &[[f64; 2]]) -> Vec<f64> {
    let mut out = vec![0.0; moments_dims(bounds.len())];
    for row in features.chunks(bounds.len()) {
        for (o, v) in out.iter_mut().zip(moment_vector(row, bounds)) {
            *o += v;
        }
    }
    out
}

/// Per-feature standardisation: `(clamp(x) - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardisation {
    /// Means, in feature order.
    pub mean: Vec<f64>,
    /// Standard deviations, in feature order (positive).
    pub std: Vec<f64>,
    /// Where the figures come from (for the job's record).
    pub source: String,
}

impl Standardisation {
    /// From (noisy) summed moments: means and population standard
    /// deviations of the clamped features. Noise can make a variance
    /// negative or tiny: it is floored at (1% of the half-range)².
    pub fn from_moments(sums: &[f64], bounds: &[[f64; 2]], noise_stddev: f64) -> Result<Self> {
        let d = bounds.len();
        if sums.len() != moments_dims(d) {
            return Err(Error::Internal(format!(
                "{} moment sums for {d} features",
                sums.len()
            )));
        }
        let n = sums[2 * d].max(1.0);
        let mut mean = Vec::with_capacity(d);
        let mut std = Vec::with_capacity(d);
        for (j, &[lo, hi]) in bounds.iter().enumerate() {
            let mid = (lo + hi) / 2.0;
            let half = (hi - lo) / 2.0;
            let mu = (sums[j] / n).clamp(-1.0, 1.0);
            let var = (sums[d + j] / n - mu * mu).max(1e-4);
            mean.push(mid + half * mu);
            std.push(half * var.sqrt());
        }
        Ok(Standardisation {
            mean,
            std,
            source: format!(
                "DP moments over about {n:.0} training rows (noise sd {noise_stddev:.3} per sum)"
            ),
        })
    }

    /// From the bounds alone (midpoint and half-range): public, costs
    /// nothing; used when the moments were lost.
    pub fn from_bounds(bounds: &[[f64; 2]]) -> Self {
        Standardisation {
            mean: bounds.iter().map(|[lo, hi]| (lo + hi) / 2.0).collect(),
            std: bounds.iter().map(|[lo, hi]| (hi - lo) / 2.0).collect(),
            source: "declared bounds (midpoint, half-range)".into(),
        }
    }

    /// Clamps raw row-major features to `bounds` and standardises them.
    pub fn apply(&self, raw: &[f32], bounds: &[[f64; 2]]) -> Result<Vec<f32>> {
        let d = bounds.len();
        if self.mean.len() != d || self.std.len() != d || !raw.len().is_multiple_of(d.max(1)) {
            return Err(Error::InvalidJob(format!(
                "standardisation for {} features applied to rows of {d}",
                self.mean.len()
            )));
        }
        if let Some(s) = self.std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            return Err(Error::InvalidJob(format!(
                "standardisation has a standard deviation of {s}"
            )));
        }
        Ok(raw
            .chunks(d)
            .flat_map(|row| {
                row.iter()
                    .zip(bounds)
                    .zip(self.mean.iter().zip(&self.std))
                    .map(|((&x, &[lo, hi]), (m, s))| ((f64::from(x).clamp(lo, hi) - m) / s) as f32)
            })
            .collect())
    }
}

/// L2 sensitivity of [`eval_vector`] (add/remove one example): one count,
/// one loss element at most 1, one confusion cell, one histogram bin.
pub const EVAL_L2_SENSITIVITY: f64 = 2.0;

/// Evaluation counts as the vector a node releases with noise: the loss
/// sum divided by the loss clamp, so that every element moves by at most 1.
pub fn eval_vector(counts: &EvalCounts, config: &EvalConfig) -> Vec<f64> {
    let mut v = counts.to_flat();
    v[1] /= config.loss_clamp;
    v
}

/// Inverse of [`eval_vector`].
pub fn eval_counts(vector: &[f64], config: &EvalConfig) -> Result<EvalCounts> {
    let mut v = vector.to_vec();
    if v.len() > 1 {
        v[1] *= config.loss_clamp;
    }
    EvalCounts::from_flat(config.bins, &v)
}

/// Whether a row goes to the held-out split: a hash of the split seed and
/// the row's own values (features and targets), so that adding or removing
/// one person moves no one else between the splits (which the DP
/// sensitivities of the moments, gradients and evaluation counts rely on).
/// A row-position or permutation split (scikit-learn's) would reshuffle
/// everyone.
fn held_out(seed: u32, row: &[f32], target: &[u32], test_fraction: f64) -> bool {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"confer/split/v1");
    h.update(seed.to_le_bytes());
    for v in row {
        h.update(v.to_bits().to_le_bytes());
    }
    for t in target {
        h.update(t.to_le_bytes());
    }
    let digest = h.finalize();
    let mut word = [0u8; 8];
    word.copy_from_slice(&digest[..8]);
    let u = (u64::from_le_bytes(word) >> 11) as f64 / (1u64 << 53) as f64;
    u < test_fraction
}

/// Builds the training and held-out datasets of one node from its rows
/// (raw features, row-major; targets as read): each row goes to the
/// held-out split with probability `1 - train_fraction`, decided by a hash
/// of `split_seed` and its own values. Nothing about the rows is refused
/// (few rows, one class, an empty split): a refusal would reveal, outside
/// any DP mechanism, a fact a single person can decide. A node with no
/// training rows sends zero updates; one with no held-out rows releases
/// noisy zeros.
pub fn split_datasets(
    spec: &JobSpec,
    features: Vec<f32>,
    targets: Targets,
) -> Result<(Dataset, Dataset)> {
    let width = spec.data.features.len();
    let n = match &targets {
        Targets::Binary(y) => y.len(),
        Targets::Survival { time, .. } => time.len(),
    };
    let test_fraction = 1.0 - spec.data.train_fraction;
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for i in 0..n {
        let target: Vec<u32> = match &targets {
            Targets::Binary(y) => vec![y[i].to_bits()],
            Targets::Survival { time, event } => vec![time[i].to_bits(), u32::from(event[i])],
        };
        let row = &features[i * width..(i + 1) * width];
        if held_out(spec.data.split_seed, row, &target, test_fraction) {
            test.push(i);
        } else {
            train.push(i);
        }
    }
    let all = match targets {
        Targets::Binary(y) => Dataset::binary(features, width, y)?,
        Targets::Survival { time, event } => Dataset::survival(features, width, time, event)?,
    };
    Ok((all.select(&train), all.select(&test)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
rounds = 10
seed = 1
[model]
architecture = "logistic_regression"
[data]
query = "SELECT patient, age, chol, label FROM heart"
features = ["age", "chol"]
label = "label"
unit = "patient"
bounds = { age = [20, 90], chol = [0, 600] }
[local]
budget = { steps = 10 }
batch_size = 4
learning_rate = 0.01
optimizer = { kind = "sgd" }
[server]
strategy = "fed_avg"
[privacy]
epsilon = 1.0
delta = 1e-5
"#;

    #[test]
    fn jobs_read_from_toml_fill_inputs_and_plan_their_budget() {
        let job = JobSpec::from_toml_str(JOB).expect("job");
        assert_eq!(job.model.inputs, 2);
        let plan = job.privacy_plan().expect("plan");
        let parts = plan.standardisation_rho
            + plan.evaluation_rho * f64::from(plan.evaluations)
            + plan.round_rho.expect("dp") * 10.0;
        assert!((parts - plan.rho).abs() < 1e-12 * plan.rho);
        assert_eq!(job.evaluation_rounds(), (1..=10).collect::<Vec<_>>());
        let statement = job.privacy_statement(3, 4).expect("statement");
        assert!(
            statement.training_rho.expect("dp") <= plan.round_rho.unwrap() * 10.0 * (1.0 + 1e-9)
        );
        // The JSON form (as in a task) reads back the same.
        let back = JobSpec::from_json_value(serde_json::to_value(&job).unwrap()).expect("json");
        assert_eq!(back, job);
    }

    #[test]
    fn bad_jobs_name_the_field() {
        let cases = [
            (
                JOB.replace("chol = [0, 600]", "chol = [600, 0]"),
                "data.bounds.chol",
            ),
            (
                JOB.replace(", chol = [0, 600]", ""),
                "feature chol has no bounds",
            ),
            (JOB.replace("rounds = 10", "rounds = 0"), "rounds"),
            (JOB.replace("label = \"label\"\n", ""), "data.label"),
            (
                JOB.replace("epsilon = 1.0", "epsilon = -1"),
                "privacy.epsilon",
            ),
            (
                JOB.replace("[model]\n", "[model]\ninputs = 5\n"),
                "model.inputs = 5",
            ),
            (
                JOB.replace("seed = 1", "seed = 1\nmin_sites = 1"),
                "min_sites",
            ),
        ];
        for (text, want) in cases {
            let err = JobSpec::from_toml_str(&text).expect_err(want).to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn update_vectors_clip_weight_and_read_back() {
        let layout = UpdateLayout {
            parameters: 2,
            weight: true,
            clip_flag: true,
            clip: 1.0,
        };
        let (a, clipped) = layout.node_vector(&[3.0, 4.0], 0.5).expect("a");
        assert!(clipped);
        assert!((a[0] - 0.3).abs() < 1e-6 && (a[1] - 0.4).abs() < 1e-6);
        let (b, clipped) = layout.node_vector(&[0.1, 0.0], 1.0).expect("b");
        assert!(!clipped);
        let sum: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        let (update, weight, flags) = layout.read_sum(&sum, 2, 0.0).expect("read");
        assert!((weight - 1.5).abs() < 1e-9);
        assert_eq!(flags, Some(1.0));
        assert!((update[0] - 0.4).abs() < 1e-6);
        assert!(
            crate::server::l2_norm(&a.iter().map(|&v| v as f32).collect::<Vec<_>>())
                <= layout.bound() + 1e-6
        );
    }

    #[test]
    fn standardisation_from_exact_moments_matches_the_data() {
        let bounds = [[0.0, 10.0], [-1.0, 1.0]];
        let rows: Vec<f32> = vec![2.0, 0.5, 4.0, -0.5, 6.0, 0.5, 8.0, -0.5];
        let sums = moment_sums(&rows, &bounds);
        assert_eq!(sums[4], 4.0);
        let s = Standardisation::from_moments(&sums, &bounds, 0.0).expect("std");
        assert!((s.mean[0] - 5.0).abs() < 1e-9 && s.mean[1].abs() < 1e-9);
        assert!((s.std[0] - 5f64.sqrt()).abs() < 1e-9 && (s.std[1] - 0.5).abs() < 1e-9);
        let z = s.apply(&rows, &bounds).expect("apply");
        assert!((z[0] as f64 + 3.0 / 5f64.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn example_clipping_plans_its_budget_and_reads_back() {
        let text = JOB.replace(
            "delta = 1e-5",
            "delta = 1e-5\nclipping = \"example\"\nclip_norm = 0.5",
        );
        let job = JobSpec::from_toml_str(&text).expect("job");
        let plan = job.privacy_plan().expect("plan");
        let enc = job.gradient_encoding(3, 3).expect("encoding");
        assert!(enc.rho().expect("rho") <= plan.round_rho.expect("dp") * (1.0 + 1e-9));
        let statement = job.privacy_statement(3, 4).expect("statement");
        assert!(
            statement
                .summary
                .contains("every person's gradient was clipped")
        );
        let v: Vec<f64> = gradient_vector(&[0.1, -0.2, 0.05], 0.5)
            .iter()
            .map(|x| x * 10.0)
            .collect();
        let (sum, n) = read_gradient_sum(&v, 0.5).expect("read");
        assert!((n - 10.0).abs() < 1e-12 && (sum[1] + 2.0).abs() < 1e-12);
        let no_dp = text.replace("epsilon = 1.0", "epsilon = 1.0\ndp_training = false");
        assert!(
            JobSpec::from_toml_str(&no_dp)
                .expect_err("refused")
                .to_string()
                .contains("dp_training")
        );
    }

    #[test]
    fn the_split_of_a_row_does_not_depend_on_the_other_rows() {
        let job = JobSpec::from_toml_str(JOB).expect("job");
        let n = 400;
        let features: Vec<f32> = (0..n * 2).map(|i| (i % 97) as f32 * 0.5).collect();
        let labels: Vec<f32> = (0..n).map(|i| f32::from(u8::from(i % 3 == 0))).collect();
        let (train, test) =
            split_datasets(&job, features.clone(), Targets::Binary(labels.clone())).expect("split");
        assert_eq!(train.len() + test.len(), n);
        let share = test.len() as f64 / n as f64;
        assert!((share - 0.34).abs() < 0.08, "held-out share {share}");
        // Without the first row, every other row stays on its side.
        let (train2, test2) = split_datasets(
            &job,
            features[2..].to_vec(),
            Targets::Binary(labels[1..].to_vec()),
        )
        .expect("split");
        assert_eq!(train2.len() + test2.len(), n - 1);
        let first_in_test = test.features().chunks(2).any(|r| r == &features[..2]);
        assert_eq!(test2.len(), test.len() - usize::from(first_in_test));
        assert!(
            test2
                .features()
                .chunks(2)
                .all(|r| test.features().chunks(2).any(|t| t == r))
        );
    }

    #[test]
    #[cfg(feature = "torch")]
    fn nothing_about_the_rows_is_refused() {
        let job = JobSpec::from_toml_str(JOB).expect("job");
        // One class only, a handful of rows, and none at all: all split.
        for n in [20, 3, 0] {
            let features = vec![1.0f32; n * 2];
            let (train, test) =
                split_datasets(&job, features, Targets::Binary(vec![0.0; n])).expect("split");
            assert_eq!(train.len() + test.len(), n);
        }
        // A node left with no rows still takes part: zero gradients, zero
        // evaluation counts, no error.
        let (train, test) =
            split_datasets(&job, Vec::new(), Targets::Binary(Vec::new())).expect("split");
        let model = crate::Model::new(&job.model, 1).expect("model");
        let grads = crate::train::clipped_gradient_sum(&model, &train, 1.0).expect("gradients");
        assert!(grads.sum.iter().all(|&g| g == 0.0));
        let counts = crate::evaluate_with(&model, &test, &job.eval_config()).expect("evaluate");
        assert_eq!(
            eval_vector(&counts, &job.eval_config()).iter().sum::<f64>(),
            0.0
        );
    }
}
