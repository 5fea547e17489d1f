//! The options of `WITH DIFFERENTIAL_PRIVACY OPTIONS (...)`.

use serde::{Deserialize, Serialize};

use crate::error::{QueryError, Result};
use crate::parse::OptionValue;

/// How noise is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// Discrete Gaussian, accounted in zCDP (the default).
    Gaussian,
    /// Discrete Laplace, pure epsilon-DP.
    Laplace,
}

impl Mechanism {
    /// Lower-case name, as written in queries.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Gaussian => "gaussian",
            Mechanism::Laplace => "laplace",
        }
    }
}

/// Where partials are summed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Each node releases its own DP partial; the coordinator sums them.
    PerSite,
    /// Nodes add shares of the noise and mask their partials; the
    /// coordinator learns only the noisy network total.
    Secure,
}

/// Validated options of a DP query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpOptions {
    /// Total epsilon of the query.
    pub epsilon: f64,
    /// Total delta of the query.
    pub delta: f64,
    /// The column identifying a person, if the query names one.
    pub privacy_unit_column: Option<String>,
    /// Groups one person may contribute to.
    pub max_groups_contributed: u32,
    /// Rows one person may contribute to one group.
    pub max_rows_contributed: u32,
    /// Noise mechanism.
    pub mechanism: Mechanism,
    /// Per-site or secure aggregation.
    pub aggregation: Aggregation,
    /// Confidence level of the reported intervals.
    pub confidence: f64,
    /// Fewest sites that must answer (confer extension; default: the study's, else all).
    pub min_sites: Option<usize>,
    /// Counts, and sums whose bounds are not negative, are shown clamped
    /// at 0 with their intervals (post-processing); `false` keeps the raw
    /// noisy values (unbiased, for summing results downstream).
    #[serde(default = "yes")]
    pub nonnegative: bool,
}

fn yes() -> bool {
    true
}

/// Upper limit on contribution bounds: beyond this the noise swamps any answer
/// and integer sensitivities risk overflow.
const MAX_CONTRIBUTION: f64 = 1_000_000.0;

impl DpOptions {
    pub(crate) fn from_pairs(pairs: Vec<(String, OptionValue)>) -> Result<Self> {
        let mut epsilon = None;
        let mut delta = None;
        let mut unit = None;
        let mut groups = 1;
        let mut rows = 1;
        let mut mechanism = Mechanism::Gaussian;
        let mut aggregation = Aggregation::PerSite;
        let mut confidence = 0.95;
        let mut min_sites = None;
        let mut nonnegative = true;
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in pairs {
            if seen.contains(&name) {
                return Err(QueryError::Rejected(format!(
                    "option {name} is given twice: keep one"
                )));
            }
            seen.push(name.clone());
            match name.as_str() {
                "epsilon" => {
                    let v = number(&name, &value)?;
                    if !(v.is_finite() && v > 0.0) {
                        return Err(QueryError::Rejected(format!(
                            "epsilon must be a positive number, not {v}"
                        )));
                    }
                    epsilon = Some(v);
                }
                "delta" => {
                    let v = number(&name, &value)?;
                    if !(0.0..1.0).contains(&v) {
                        return Err(QueryError::Rejected(format!(
                            "delta must be at least 0 and below 1 (typically 1e-6 or smaller), not {v}"
                        )));
                    }
                    delta = Some(v);
                }
                "privacy_unit_column" => {
                    unit = Some(text(&name, &value)?.to_ascii_lowercase());
                }
                "max_groups_contributed" => groups = count(&name, &value)?,
                "max_rows_contributed" => rows = count(&name, &value)?,
                "mechanism" => {
                    mechanism = match text(&name, &value)?.to_ascii_lowercase().as_str() {
                        "gaussian" => Mechanism::Gaussian,
                        "laplace" => Mechanism::Laplace,
                        other => {
                            return Err(QueryError::Rejected(format!(
                                "mechanism '{other}' is unknown: use 'gaussian' or 'laplace'"
                            )));
                        }
                    }
                }
                "aggregation" => {
                    aggregation = match text(&name, &value)?.to_ascii_lowercase().as_str() {
                        "per_site" => Aggregation::PerSite,
                        "secure" => Aggregation::Secure,
                        other => {
                            return Err(QueryError::Rejected(format!(
                                "aggregation '{other}' is unknown: use 'per_site' or 'secure'"
                            )));
                        }
                    }
                }
                "confidence" => {
                    let v = number(&name, &value)?;
                    if !(v > 0.0 && v < 1.0) {
                        return Err(QueryError::Rejected(format!(
                            "confidence must be between 0 and 1 (for example 0.95), not {v}"
                        )));
                    }
                    confidence = v;
                }
                "min_sites" => min_sites = Some(count(&name, &value)? as usize),
                "nonnegative" => {
                    nonnegative = match text(&name, &value)?.to_ascii_lowercase().as_str() {
                        "true" => true,
                        "false" => false,
                        other => {
                            return Err(QueryError::Rejected(format!(
                                "nonnegative = '{other}': use 'true' (counts shown clamped at 0, the default) \
                                 or 'false' (raw noisy values, for unbiased sums downstream)"
                            )));
                        }
                    }
                }
                other => {
                    return Err(QueryError::Rejected(format!(
                        "unknown option {other}: the options are epsilon, delta, privacy_unit_column, \
                         max_groups_contributed, max_rows_contributed, mechanism, aggregation, confidence, min_sites, \
                         nonnegative"
                    )));
                }
            }
        }
        let epsilon = epsilon.ok_or_else(|| {
            QueryError::Rejected(
                "the DP clause needs epsilon: add OPTIONS (epsilon = 1.0, delta = 1e-6)".into(),
            )
        })?;
        let delta = match (delta, mechanism) {
            (Some(d), _) => d,
            (None, Mechanism::Laplace) => 0.0,
            (None, Mechanism::Gaussian) => {
                return Err(QueryError::Rejected(
                    "the Gaussian mechanism needs delta > 0: add delta = 1e-6 to OPTIONS, \
                     or use mechanism = 'laplace' for pure epsilon-DP"
                        .into(),
                ));
            }
        };
        if mechanism == Mechanism::Gaussian && delta == 0.0 {
            return Err(QueryError::Rejected(
                "the Gaussian mechanism needs delta > 0: set delta = 1e-6 (or smaller), \
                 or use mechanism = 'laplace' for pure epsilon-DP"
                    .into(),
            ));
        }
        Ok(Self {
            epsilon,
            delta,
            privacy_unit_column: unit,
            max_groups_contributed: groups,
            max_rows_contributed: rows,
            mechanism,
            aggregation,
            confidence,
            min_sites,
            nonnegative,
        })
    }
}

fn number(name: &str, value: &OptionValue) -> Result<f64> {
    match value {
        OptionValue::Number(n) => Ok(*n),
        OptionValue::Text(t) => Err(QueryError::Rejected(format!(
            "option {name} takes a number, not '{t}'"
        ))),
    }
}

fn text<'a>(name: &str, value: &'a OptionValue) -> Result<&'a str> {
    match value {
        OptionValue::Text(t) => Ok(t),
        OptionValue::Number(n) => Err(QueryError::Rejected(format!(
            "option {name} takes a name, not the number {n}"
        ))),
    }
}

fn count(name: &str, value: &OptionValue) -> Result<u32> {
    let v = number(name, value)?;
    if v.fract() != 0.0 || !(1.0..=MAX_CONTRIBUTION).contains(&v) {
        return Err(QueryError::Rejected(format!(
            "{name} must be a whole number from 1 to {MAX_CONTRIBUTION}, not {v}"
        )));
    }
    Ok(v as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, OptionValue)]) -> Result<DpOptions> {
        DpOptions::from_pairs(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn defaults() {
        let o = opts(&[
            ("epsilon", OptionValue::Number(1.0)),
            ("delta", OptionValue::Number(1e-6)),
        ])
        .expect("valid");
        assert_eq!(o.max_groups_contributed, 1);
        assert_eq!(o.max_rows_contributed, 1);
        assert_eq!(o.mechanism, Mechanism::Gaussian);
        assert_eq!(o.confidence, 0.95);
    }

    #[test]
    fn laplace_defaults_delta_to_zero() {
        let o = opts(&[
            ("epsilon", OptionValue::Number(1.0)),
            ("mechanism", OptionValue::Text("laplace".into())),
        ])
        .expect("valid");
        assert_eq!(o.delta, 0.0);
    }

    #[test]
    fn bad_options_say_what_to_change() {
        let cases: Vec<(Vec<(&str, OptionValue)>, &str)> = vec![
            (vec![("delta", OptionValue::Number(1e-6))], "needs epsilon"),
            (
                vec![("epsilon", OptionValue::Number(1.0))],
                "needs delta > 0",
            ),
            (vec![("epsilon", OptionValue::Number(-1.0))], "positive"),
            (
                vec![
                    ("epsilon", OptionValue::Number(1.0)),
                    ("delta", OptionValue::Number(1.5)),
                ],
                "below 1",
            ),
            (
                vec![
                    ("epsilon", OptionValue::Number(1.0)),
                    ("foo", OptionValue::Number(1.0)),
                ],
                "unknown option foo",
            ),
            (
                vec![
                    ("epsilon", OptionValue::Number(1.0)),
                    ("max_groups_contributed", OptionValue::Number(0.5)),
                ],
                "whole number",
            ),
            (
                vec![
                    ("epsilon", OptionValue::Number(1.0)),
                    ("epsilon", OptionValue::Number(2.0)),
                ],
                "twice",
            ),
            (
                vec![
                    ("epsilon", OptionValue::Number(1.0)),
                    ("mechanism", OptionValue::Text("uniform".into())),
                ],
                "'gaussian' or 'laplace'",
            ),
        ];
        for (pairs, want) in cases {
            let err = opts(&pairs).expect_err("must be refused").to_string();
            assert!(err.contains(want), "{err} should contain {want}");
        }
    }
}
