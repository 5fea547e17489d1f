//! The data steward's policy: which studies and researchers may use this
//! node, how much privacy each may spend, and what each may read.
//!
//! ```toml
//! [policy]
//! approval = "manual"               # "auto": listed studies are approved when first seen
//! max_query_epsilon = 2.0           # no single release may cost more (its reported epsilon)
//! min_group_size = 10               # released counts below this are suppressed (0 = off)
//! default_study_budget = { epsilon = 5.0, delta = 1e-6 }   # for studies not listed; omit to refuse them
//! default_models = ["logistic_regression"]  # what studies not listed may train (default: nothing)
//!
//! [policy.studies.gi_bleed]
//! budget = { epsilon = 10.0, delta = 1e-6 }   # or { rho = 0.5, delta = 1e-6 }
//! researchers = ["alice", "bob"]              # omit: any researcher
//! researcher_budget = { epsilon = 4.0, delta = 1e-6 }  # per researcher within the study
//! tables = ["person", "condition_occurrence"] # omit: every table
//! models = ["logistic_regression"]            # architectures this study may train
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
    /// Studies by name.
    #[serde(default)]
    pub studies: BTreeMap<String, StudyPolicy>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            approval: Approval::Manual,
            max_query_epsilon: None,
            min_group_size: 0,
            default_study_budget: None,
            default_models: Vec::new(),
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
}

/// The policy, validated, with budgets in rho.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// How new studies are approved.
    pub approval: Approval,
    /// Largest epsilon one release may report.
    pub max_query_epsilon: Option<f64>,
    /// Small-cell threshold.
    pub min_group_size: u64,
    default_budget: Option<(f64, f64)>,
    default_models: Vec<String>,
    studies: BTreeMap<String, StudyRules>,
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
            };
            studies.insert(name.clone(), rules);
        }
        Ok(Self {
            approval: config.approval,
            max_query_epsilon: config.max_query_epsilon,
            min_group_size: config.min_group_size,
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
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy> {
        #[derive(Deserialize)]
        struct Wrapper {
            policy: PolicyConfig,
        }
        let w: Wrapper = toml::from_str(text).map_err(|e| NodeError::Config(e.to_string()))?;
        Policy::from_config(&w.policy)
    }

    #[test]
    fn listed_and_default_studies() {
        let p = policy(
            r#"
[policy]
approval = "auto"
default_study_budget = { rho = 0.1 }
[policy.studies.s1]
budget = { epsilon = 1.0, delta = 1e-6 }
researchers = ["alice"]
tables = ["PERSON"]
"#,
        )
        .expect("valid");
        let s1 = p.study("s1").expect("listed");
        assert!(s1.budget_rho > 0.02 && s1.budget_rho < 0.03);
        assert!(s1.allows_researcher("alice") && !s1.allows_researcher("mallory"));
        assert_eq!(
            s1.forbidden_table(&["person".into(), "death".into()]),
            Some("death")
        );
        assert_eq!(s1.budget_delta, 1e-6);
        let other = p.study("other").expect("default budget");
        assert_eq!(other.budget_rho, 0.1);
        assert_eq!(
            other.budget_delta, 0.0,
            "a rho budget without delta allows none"
        );
        assert!(!other.listed);
        let p = policy(
            "[policy]
default_study_budget = { rho = 0.1, delta = 1e-7 }
",
        )
        .expect("valid");
        assert_eq!(p.study("x").expect("default").budget_delta, 1e-7);
    }

    #[test]
    fn unlisted_studies_are_refused_without_a_default() {
        let p = policy("[policy]\n").expect("valid");
        assert_eq!(p.approval, Approval::Manual);
        assert!(p.study("x").unwrap_err().contains("not admitted"));
    }

    #[test]
    fn errors_name_the_field() {
        let err = policy("[policy.studies.s]\nbudget = { epsilon = -1.0, delta = 1e-6 }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.studies.s.budget"), "{err}");
        let err = policy("[policy.studies.s]\nbudget = { rho = 1.0, delta = 2.0 }\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("policy.studies.s.budget: delta = 2"), "{err}");
        let err = policy("[policy]\nmax_query_epsilon = 0.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_query_epsilon"), "{err}");
    }
}
