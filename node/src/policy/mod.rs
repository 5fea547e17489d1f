//! The data steward's policy: which studies and researchers may use this
//! node, how much privacy each may spend, and what each may read.
//!
//! ```toml
//! [policy]
//! approval = "manual"               # "auto": listed studies are approved when first seen
//! max_query_epsilon = 2.0           # per-task cap, compared in zCDP rho at max_query_delta
//! max_query_delta = 1e-5            # largest delta a task may use (default 1e-5)
//! min_query_epsilon = 0.01          # smaller epsilons are refused (default 0.01)
//! min_charge_epsilon = 1.0          # a task that fails after admission costs at least this (default 1.0)
//! min_group_size = 10               # released counts below this are suppressed (0 = off)
//! node_budget = { epsilon = 50.0, delta = 1e-6 }              # all studies together (required with a default budget)
//! researcher_total_budget = { epsilon = 20.0, delta = 1e-6 }  # one researcher over all studies
//! default_study_budget = { epsilon = 5.0, delta = 1e-6 }   # for studies not listed; omit to refuse them
//! default_models = ["logistic_regression"]  # what studies not listed may train (default: nothing)
//! max_failures_per_researcher = 3   # charged failures before the steward must review (`confer node lift`)
//!
//! [policy.limits]                   # per task, at this node
//! memory_mb = 2048                  # DataFusion memory pool of one task
//! time_limit_secs = 600             # a task still running then fails (charged)
//! max_concurrent_tasks = 4          # more are refused as busy (nothing charged)
//! padded_secs = 30                  # tasks one person could slow down: answered at this time
//! max_public_rows = 100000          # most rows a query over public tables returns
//!
//! [policy.secure]                   # aggregation = 'secure' and training sums
//! min_survivors = 2                 # fewest nodes whose noise makes a sum
//! max_corrupt_peers = 0             # peers that may collude with the coordinator
//! peers = { site-b = "3f9a..." }    # pinned identity keys (plaintext networks)
//!
//! [policy.studies.gi_bleed]
//! budget = { epsilon = 10.0, delta = 1e-6 }   # or { rho = 0.5, delta = 1e-6 }
//! researchers = ["alice", "bob"]              # omit: any researcher
//! researcher_budget = { epsilon = 4.0, delta = 1e-6 }  # per researcher within the study
//! tables = ["person", "condition_occurrence"] # omit: every table
//! models = ["logistic_regression"]            # architectures this study may train
//! allow_non_dp_training = false               # secure aggregation without DP noise
//! ```
//!
//! The policy is re-read from `node.toml` whenever the file changes, so a
//! steward's edit takes effect without a restart. Budgets are kept in zCDP
//! rho, which composes by addition; (epsilon, delta) budgets are converted
//! with the same conversion queries use. A budget's delta also caps the
//! sum of the deltas spent by partition selection (private group keys),
//! which add up across releases instead of converting into rho; a rho
//! budget without delta allows none. A study within budget `(epsilon,
//! delta)` has thus spent at most `(epsilon, 2 delta)` in all.
//!
//! Caps compare what a task really costs: the per-task cap is converted to
//! rho at `max_query_delta` and compared with the task's rho (a pure-DP
//! Laplace task also passes with its epsilon at or below the cap), so a
//! task cannot make its epsilon look small by choosing a large delta; and
//! no task may use a delta above `max_query_delta`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::{NodeError, Result};

/// `[policy]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// How new studies are approved.
    #[serde(default)]
    pub approval: Approval,
    /// Largest epsilon one release may report.
    #[serde(default)]
    pub max_query_epsilon: Option<f64>,
    /// Released counts below this are suppressed (0 turns the rule off).
    #[serde(default)]
    pub min_group_size: u64,
    /// Budget for studies that are not listed; without it they are refused.
    #[serde(default)]
    pub default_study_budget: Option<BudgetConfig>,
    /// Model architectures that studies admitted by the default budget may
    /// train (`logistic_regression`, `mlp`, `cox`); none when empty.
    #[serde(default)]
    pub default_models: Vec<String>,
    /// Largest delta one task may use.
    #[serde(default)]
    pub max_query_delta: Option<f64>,
    /// Smallest epsilon one task may use.
    #[serde(default)]
    pub min_query_epsilon: Option<f64>,
    /// What a task that fails after admission costs at least (epsilon at
    /// `max_query_delta`).
    #[serde(default)]
    pub min_charge_epsilon: Option<f64>,
    /// The node's budget over all studies.
    #[serde(default)]
    pub node_budget: Option<BudgetConfig>,
    /// One researcher's budget over all studies.
    #[serde(default)]
    pub researcher_total_budget: Option<BudgetConfig>,
    /// Charged failures a researcher may have before the steward reviews
    /// them (`confer node lift`).
    #[serde(default)]
    pub max_failures_per_researcher: Option<u64>,
    /// Per-task resource limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Secure aggregation.
    #[serde(default)]
    pub secure: SecureConfig,
    /// Studies by name.
    #[serde(default)]
    pub studies: BTreeMap<String, StudyPolicy>,
}

/// `[policy.limits]`: what one task may use at this node.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// DataFusion memory pool of one task, in MiB (default 2048).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// A task still running after this many seconds fails, charged (default 600).
    #[serde(default)]
    pub time_limit_secs: Option<u64>,
    /// Tasks that may run at once; more are refused as busy (default 4).
    #[serde(default)]
    pub max_concurrent_tasks: Option<usize>,
    /// A task whose work one person's rows could multiply (a join on a
    /// column that is not unique, see `confer_query::analyze::amplification`)
    /// runs within this many seconds and is answered exactly then, whatever
    /// its real run time, so that its latency tells nothing (default 30).
    #[serde(default)]
    pub padded_secs: Option<u64>,
    /// The most rows a query over public tables returns (default 100000);
    /// a longer answer is refused, nothing charged.
    #[serde(default)]
    pub max_public_rows: Option<usize>,
}

/// `[policy.secure]`: whom this node sums with.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SecureConfig {
    /// The fewest nodes that must contribute to a sum (default 2).
    #[serde(default)]
    pub min_survivors: Option<usize>,
    /// How many of a session's other members may collude with the
    /// coordinator (default 0): this node adds enough noise that the honest
    /// survivors' noise alone protects it.
    #[serde(default)]
    pub max_corrupt_peers: Option<usize>,
    /// Pinned identity keys of the peers, by site name (hex). With mutual
    /// TLS, peers may instead prove their keys with certificates of the
    /// network CA; on a plaintext network, only pinned peers are accepted.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            approval: Approval::Manual,
            max_query_epsilon: None,
            min_group_size: 0,
            default_study_budget: None,
            default_models: Vec::new(),
            max_query_delta: None,
            min_query_epsilon: None,
            min_charge_epsilon: None,
            node_budget: None,
            researcher_total_budget: None,
            max_failures_per_researcher: None,
            limits: LimitsConfig::default(),
            secure: SecureConfig::default(),
            studies: BTreeMap::new(),
        }
    }
}

/// Approval mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    /// Studies the policy admits are approved when first seen.
    Auto,
    /// A new study waits until the steward runs `confer node approve`.
    #[default]
    Manual,
}

/// A budget, as (epsilon, delta) or directly as zCDP rho.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum BudgetConfig {
    /// (epsilon, delta), converted to the largest rho within it.
    EpsilonDelta {
        /// Epsilon.
        epsilon: f64,
        /// Delta.
        delta: f64,
    },
    /// zCDP rho, and optionally a cap on summed selection delta.
    Rho {
        /// rho.
        rho: f64,
        /// Cap on the summed delta of partition selection (default 0).
        #[serde(default)]
        delta: Option<f64>,
    },
}

impl BudgetConfig {
    /// The budget in rho.
    pub fn rho(&self) -> std::result::Result<f64, String> {
        match *self {
            BudgetConfig::Rho { rho, .. } if rho >= 0.0 && rho.is_finite() => Ok(rho),
            BudgetConfig::Rho { rho, .. } => {
                Err(format!("rho = {rho} must be a non-negative number"))
            }
            BudgetConfig::EpsilonDelta { epsilon, delta } => {
                confer_privacy::accounting::rho_for_epsilon_delta(epsilon, delta)
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// The cap on summed partition-selection delta.
    pub fn delta(&self) -> std::result::Result<f64, String> {
        let delta = match *self {
            BudgetConfig::EpsilonDelta { delta, .. } => delta,
            BudgetConfig::Rho { delta, .. } => delta.unwrap_or(0.0),
        };
        if (0.0..1.0).contains(&delta) {
            Ok(delta)
        } else {
            Err(format!("delta = {delta} must be at least 0 and below 1"))
        }
    }
}

/// `[policy.studies.<name>]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StudyPolicy {
    /// Total budget of the study at this node.
    pub budget: BudgetConfig,
    /// Researchers allowed; `None` allows any.
    #[serde(default)]
    pub researchers: Option<Vec<String>>,
    /// Budget of each researcher within the study.
    #[serde(default)]
    pub researcher_budget: Option<BudgetConfig>,
    /// Tables the study may read; `None` allows every table.
    #[serde(default)]
    pub tables: Option<Vec<String>>,
    /// Model architectures the study may train.
    #[serde(default)]
    pub models: Vec<String>,
    /// Whether the study may train without DP noise (secure aggregation
    /// only): the steward's explicit choice, off by default.
    #[serde(default)]
    pub allow_non_dp_training: bool,
}

/// Default of `max_query_delta`.
pub const DEFAULT_MAX_QUERY_DELTA: f64 = 1e-5;
/// Default of `min_query_epsilon`.
pub const DEFAULT_MIN_QUERY_EPSILON: f64 = 0.01;
/// Default of `min_charge_epsilon`.
pub const DEFAULT_MIN_CHARGE_EPSILON: f64 = 1.0;
/// Default of `max_failures_per_researcher`.
pub const DEFAULT_MAX_FAILURES: u64 = 3;
/// Default of `limits.memory_mb`.
pub const DEFAULT_MEMORY_MB: u64 = 2048;
/// Default of `limits.time_limit_secs`.
pub const DEFAULT_TIME_LIMIT_SECS: u64 = 600;
/// Default of `limits.max_concurrent_tasks`.
pub const DEFAULT_MAX_CONCURRENT_TASKS: usize = 4;
/// Default of `limits.max_public_rows`.
pub const DEFAULT_MAX_PUBLIC_ROWS: usize = 100_000;
/// Default of `limits.padded_secs`.
pub const DEFAULT_PADDED_SECS: u64 = 30;
/// Default of `secure.min_survivors`.
pub const DEFAULT_SECURE_MIN_SURVIVORS: usize = 2;

/// The policy, validated, with budgets in rho.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How new studies are approved.
    pub approval: Approval,
    /// Largest epsilon one task may cost, at `max_query_delta`.
    pub max_query_epsilon: Option<f64>,
    /// That cap in rho.
    pub max_query_rho: Option<f64>,
    /// Largest delta one task may use.
    pub max_query_delta: f64,
    /// Smallest epsilon one task may use.
    pub min_query_epsilon: f64,
    /// The floor of a failure's charge, as epsilon and in rho.
    pub min_charge_epsilon: f64,
    /// That floor in rho (at `max_query_delta`).
    pub min_charge_rho: f64,
    /// Small-cell threshold.
    pub min_group_size: u64,
    /// The node's budget over all studies (rho).
    pub node_budget_rho: Option<f64>,
    /// One researcher's budget over all studies (rho).
    pub researcher_total_budget_rho: Option<f64>,
    /// Charged failures before a researcher is refused.
    pub max_failures_per_researcher: u64,
    /// Per-task limits.
    pub limits: Limits,
    /// Secure aggregation.
    pub secure: SecureRules,
    default_budget: Option<(f64, f64)>,
    default_models: Vec<String>,
    studies: BTreeMap<String, StudyRules>,
}

/// Per-task resource limits, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory pool of one task, in bytes.
    pub memory_bytes: usize,
    /// Time limit of one task.
    pub time_limit: std::time::Duration,
    /// Tasks at once.
    pub max_concurrent_tasks: usize,
    /// Time limit of a task one person could slow down, and when it is
    /// answered.
    pub padded: std::time::Duration,
    /// Rows a query over public tables may return.
    pub max_public_rows: usize,
}

impl Limits {
    /// The limits of a task: `amplified` ones run within, and are
    /// answered at, the padded time.
    pub fn for_task(&self, amplified: bool) -> Limits {
        if amplified {
            Limits {
                time_limit: self.padded,
                ..*self
            }
        } else {
            *self
        }
    }
}

/// Secure-aggregation rules, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureRules {
    /// The fewest survivors a session may set.
    pub min_survivors: usize,
    /// Peers that may collude with the coordinator.
    pub max_corrupt_peers: usize,
    /// Pinned identity keys by site.
    pub peers: BTreeMap<String, String>,
}

/// The architectures a policy may name.
const ARCHITECTURES: [&str; 3] = ["logistic_regression", "mlp", "cox"];

fn check_models(field: &str, models: &[String]) -> Result<()> {
    match models.iter().find(|m| !ARCHITECTURES.contains(&m.as_str())) {
        Some(m) => Err(NodeError::Config(format!(
            "{field}: unknown model architecture {m:?}: use {}",
            ARCHITECTURES.join(", ")
        ))),
        None => Ok(()),
    }
}

/// What the policy says about one study.
#[derive(Debug, Clone, PartialEq)]
pub struct StudyRules {
    /// Total budget (rho).
    pub budget_rho: f64,
    /// Cap on the study's summed partition-selection delta.
    pub budget_delta: f64,
    /// Allowed researchers (`None`: any).
    pub researchers: Option<Vec<String>>,
    /// Per-researcher budget (rho).
    pub researcher_budget_rho: Option<f64>,
    /// Readable tables (`None`: all).
    pub tables: Option<Vec<String>>,
    /// Trainable architectures.
    pub models: Vec<String>,
    /// Whether the study is listed (or admitted by the default budget).
    pub listed: bool,
    /// Whether the study may train without DP noise.
    pub allow_non_dp_training: bool,
}

impl Policy {
    /// Validates a `[policy]` section; errors name the field.
    pub fn from_config(config: &PolicyConfig) -> Result<Self> {
        let budget = |field: &str, b: &BudgetConfig| {
            b.rho()
                .map_err(|e| NodeError::Config(format!("{field}: {e}")))
        };
        let budget_delta = |field: &str, b: &BudgetConfig| {
            b.delta()
                .map_err(|e| NodeError::Config(format!("{field}: {e}")))
        };
        if let Some(e) = config.max_query_epsilon
            && !(e > 0.0 && e.is_finite())
        {
            return Err(NodeError::Config(format!(
                "policy.max_query_epsilon = {e}: use a positive number"
            )));
        }
        let default_budget = config
            .default_study_budget
            .as_ref()
            .map(|b| {
                Ok::<_, NodeError>((
                    budget("policy.default_study_budget", b)?,
                    budget_delta("policy.default_study_budget", b)?,
                ))
            })
            .transpose()?;
        check_models("policy.default_models", &config.default_models)?;
        let mut studies = BTreeMap::new();
        for (name, s) in &config.studies {
            let field = format!("policy.studies.{name}");
            check_models(&format!("{field}.models"), &s.models)?;
            let rules = StudyRules {
                budget_rho: budget(&format!("{field}.budget"), &s.budget)?,
                budget_delta: budget_delta(&format!("{field}.budget"), &s.budget)?,
                researchers: s.researchers.clone(),
                researcher_budget_rho: s
                    .researcher_budget
                    .as_ref()
                    .map(|b| budget(&format!("{field}.researcher_budget"), b))
                    .transpose()?,
                tables: s
                    .tables
                    .as_ref()
                    .map(|t| t.iter().map(|n| n.to_ascii_lowercase()).collect()),
                models: s.models.clone(),
                listed: true,
                allow_non_dp_training: s.allow_non_dp_training,
            };
            studies.insert(name.clone(), rules);
        }
        let max_query_delta = config.max_query_delta.unwrap_or(DEFAULT_MAX_QUERY_DELTA);
        if !(max_query_delta > 0.0 && max_query_delta < 1.0) {
            return Err(NodeError::Config(format!(
                "policy.max_query_delta = {max_query_delta}: use a number above 0 and below 1, such as 1e-5"
            )));
        }
        let positive = |field: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(v)
            } else {
                Err(NodeError::Config(format!(
                    "policy.{field} = {v}: use a positive number"
                )))
            }
        };
        let min_query_epsilon = positive(
            "min_query_epsilon",
            config
                .min_query_epsilon
                .unwrap_or(DEFAULT_MIN_QUERY_EPSILON),
        )?;
        let min_charge_epsilon = positive(
            "min_charge_epsilon",
            config
                .min_charge_epsilon
                .unwrap_or(DEFAULT_MIN_CHARGE_EPSILON),
        )?;
        let rho_at = |field: &str, epsilon: f64| {
            confer_privacy::accounting::rho_for_epsilon_delta(epsilon, max_query_delta)
                .map_err(|e| NodeError::Config(format!("policy.{field}: {e}")))
        };
        let max_query_rho = config
            .max_query_epsilon
            .map(|e| rho_at("max_query_epsilon", e))
            .transpose()?;
        let min_charge_rho = rho_at("min_charge_epsilon", min_charge_epsilon)?;
        if let (Some(cap), Some(e)) = (config.max_query_epsilon, config.min_query_epsilon)
            && e > cap
        {
            return Err(NodeError::Config(format!(
                "policy.min_query_epsilon = {e} is above policy.max_query_epsilon = {cap}: no task could run"
            )));
        }
        let node_budget_rho = config
            .node_budget
            .as_ref()
            .map(|b| budget("policy.node_budget", b))
            .transpose()?;
        let researcher_total_budget_rho = config
            .researcher_total_budget
            .as_ref()
            .map(|b| budget("policy.researcher_total_budget", b))
            .transpose()?;
        if config.default_study_budget.is_some() && node_budget_rho.is_none() {
            return Err(NodeError::Config(
                "policy.default_study_budget gives every new study name a fresh budget, so nothing would \
                 bound this node's total loss: set policy.node_budget (all studies together), for example \
                 node_budget = { epsilon = 50.0, delta = 1e-6 }"
                    .into(),
            ));
        }
        let limits = &config.limits;
        let memory_mb = limits.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
        let time_limit_secs = limits.time_limit_secs.unwrap_or(DEFAULT_TIME_LIMIT_SECS);
        let max_concurrent_tasks = limits
            .max_concurrent_tasks
            .unwrap_or(DEFAULT_MAX_CONCURRENT_TASKS);
        let padded_secs = limits.padded_secs.unwrap_or(DEFAULT_PADDED_SECS);
        let max_public_rows = limits.max_public_rows.unwrap_or(DEFAULT_MAX_PUBLIC_ROWS);
        if memory_mb == 0
            || time_limit_secs == 0
            || max_concurrent_tasks == 0
            || padded_secs == 0
            || max_public_rows == 0
        {
            return Err(NodeError::Config(
                "policy.limits: memory_mb, time_limit_secs, max_concurrent_tasks, padded_secs and \
                 max_public_rows must be at least 1"
                    .into(),
            ));
        }
        let secure = SecureRules {
            min_survivors: config
                .secure
                .min_survivors
                .unwrap_or(DEFAULT_SECURE_MIN_SURVIVORS),
            max_corrupt_peers: config.secure.max_corrupt_peers.unwrap_or(0),
            peers: config.secure.peers.clone(),
        };
        if secure.min_survivors < 2 {
            return Err(NodeError::Config(format!(
                "policy.secure.min_survivors = {}: a secure sum needs at least 2 nodes",
                secure.min_survivors
            )));
        }
        if secure.max_corrupt_peers >= secure.min_survivors {
            return Err(NodeError::Config(format!(
                "policy.secure.max_corrupt_peers = {} must be below policy.secure.min_survivors = {}: at \
                 least one survivor besides the corrupt ones must be honest",
                secure.max_corrupt_peers, secure.min_survivors
            )));
        }
        for (site, key) in &secure.peers {
            if hex::decode(key).map(|b| b.len()) != Ok(32) {
                return Err(NodeError::Config(format!(
                    "policy.secure.peers.{site}: {key:?} is not a 64-digit hex key (the peer's \
                     `confer node identity` prints it)"
                )));
            }
        }
        Ok(Self {
            approval: config.approval,
            max_query_epsilon: config.max_query_epsilon,
            max_query_rho,
            max_query_delta,
            min_query_epsilon,
            min_charge_epsilon,
            min_charge_rho,
            min_group_size: config.min_group_size,
            node_budget_rho,
            researcher_total_budget_rho,
            max_failures_per_researcher: config
                .max_failures_per_researcher
                .unwrap_or(DEFAULT_MAX_FAILURES),
            limits: Limits {
                memory_bytes: (memory_mb as usize).saturating_mul(1024 * 1024),
                time_limit: std::time::Duration::from_secs(time_limit_secs),
                max_concurrent_tasks,
                padded: std::time::Duration::from_secs(padded_secs),
                max_public_rows,
            },
            secure,
            default_budget,
            default_models: config.default_models.clone(),
            studies,
        })
    }

    /// The rules for `study`, or why the policy does not admit it.
    pub fn study(&self, study: &str) -> std::result::Result<StudyRules, String> {
        if let Some(rules) = self.studies.get(study) {
            return Ok(rules.clone());
        }
        match self.default_budget {
            Some((rho, delta)) => Ok(StudyRules {
                budget_rho: rho,
                budget_delta: delta,
                researchers: None,
                researcher_budget_rho: None,
                tables: None,
                models: self.default_models.clone(),
                listed: false,
                allow_non_dp_training: false,
            }),
            None => Err(format!(
                "study {study} is not admitted by this node's policy (it is not listed under [policy.studies] \
                 and there is no default_study_budget)"
            )),
        }
    }
}

impl StudyRules {
    /// Whether `researcher` may work in the study.
    pub fn allows_researcher(&self, researcher: &str) -> bool {
        self.researchers
            .as_ref()
            .is_none_or(|list| list.iter().any(|r| r == researcher))
    }

    /// The first table of `tables` the study may not read.
    pub fn forbidden_table<'a>(&self, tables: &'a [String]) -> Option<&'a str> {
        let allowed = self.tables.as_ref()?;
        tables
            .iter()
            .find(|t| !allowed.iter().any(|a| a.eq_ignore_ascii_case(t)))
            .map(String::as_str)
    }

    /// Whether the study may train `architecture`.
    pub fn allows_model(&self, architecture: &str) -> bool {
        self.models.iter().any(|m| m == architecture)
    }
}

#[cfg(test)]
mod tests;
