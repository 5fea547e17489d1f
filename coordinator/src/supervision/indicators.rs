//! The indicator catalogue: indicators as data (`indicators.toml`), each a
//! numerator and an optional denominator written as DP aggregates over
//! OMOP, and the measures (distinct DP queries) they need.
//!
//! The standard catalogue ships in the binary (`standard_indicators.toml`);
//! `[supervision] indicators = "..."` in `coordinator.toml` replaces it
//! with a file of the same shape (`confer supervision indicators --write
//! FILE` writes the standard one to start from).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::period::{Period, PeriodType};
use crate::error::{CoordinatorError, Result};

/// The standard catalogue, as shipped.
pub const STANDARD: &str = include_str!("standard_indicators.toml");

/// What an indicator's value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A count or a sum (the numerator alone, times the factor).
    Count,
    /// A share of the denominator (numerator ⊆ denominator): factor ×
    /// numerator / denominator, kept within [0, factor].
    Proportion,
    /// Any other ratio: factor × numerator / denominator.
    Ratio,
    /// The share of institutions under a unit whose node reported.
    Completeness,
    /// The share of institutions under a unit whose node reported at the
    /// first attempt of the period's run.
    Timeliness,
}

/// Which way is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    /// Higher values are better.
    Higher,
    /// Lower values are better.
    Lower,
    /// Neither.
    Neutral,
}

/// A numerator or denominator: one DP aggregate over OMOP, per care site
/// and period.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    /// The FROM clause (a table, or person-level tables joined on the
    /// person and a unique key).
    pub from: String,
    /// A condition (SQL), `{concepts}` standing for the concept list.
    #[serde(default, rename = "where")]
    pub condition: Option<String>,
    /// Concept ids the condition uses; each must exist in the network's
    /// `concept` table.
    #[serde(default)]
    pub concepts: Vec<i64>,
    /// The date column that places a row in a period.
    pub date: String,
    /// The DP aggregate, e.g. `COUNT(*)`, `COUNT(DISTINCT person_id)`,
    /// `SUM(x, contribution_bounds_per_group => (0, 2000))`.
    pub aggregate: String,
    /// The column holding the care site (default `care_site_id`).
    #[serde(default = "default_unit_column")]
    pub unit_column: String,
    /// The column holding the person (default `person_id`), for
    /// disaggregations that read `person`.
    #[serde(default = "default_person_column")]
    pub person_column: String,
    /// Rows one person may contribute per care site and period.
    #[serde(default = "one")]
    pub max_rows: u32,
    /// Care sites one person may contribute to per period.
    #[serde(default = "one")]
    pub max_units: u32,
    /// Only units of these groups count (post-processing of the same
    /// release: group set id → options), e.g. `{ tier = ["township",
    /// "village"] }` for primary care's share.
    #[serde(default)]
    pub units: BTreeMap<String, Vec<String>>,
}

impl Aggregate {
    /// The condition for `period`: `{concepts}`, `{start}` and `{end}`
    /// filled in.
    pub fn condition_for(&self, period: &Period) -> Option<String> {
        let concepts = self
            .concepts
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        self.condition.as_ref().map(|c| {
            c.replace("{concepts}", &concepts)
                .replace("{start}", &period.start().to_string())
                .replace("{end}", &period.end().to_string())
        })
    }
}

fn default_unit_column() -> String {
    "care_site_id".into()
}

fn default_person_column() -> String {
    "person_id".into()
}

fn one() -> u32 {
    1
}

/// One indicator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Indicator {
    /// Identifier (letters, digits, `_`).
    pub id: String,
    /// Chinese name.
    pub name_zh: String,
    /// English name.
    pub name_en: String,
    /// Domain group (workload, efficiency, cost, drugs, quality, referral,
    /// chronic, reporting...).
    pub group: String,
    /// What the value is.
    pub kind: Kind,
    /// Multiplier: 100 for a percentage, 1000 for per 1,000.
    #[serde(default = "unit_factor")]
    pub factor: f64,
    /// Unit of the value, in words (`%`, `visits`, `days`, `USD`).
    #[serde(default)]
    pub unit: String,
    /// The shortest period it is released for.
    #[serde(default = "default_period")]
    pub period: PeriodType,
    /// Disaggregations (`sex`), each released besides the total.
    #[serde(default)]
    pub disaggregations: Vec<String>,
    /// Red line (a limit not to cross in the "worse" direction).
    #[serde(default)]
    pub red_line: Option<f64>,
    /// Target.
    #[serde(default)]
    pub target: Option<f64>,
    /// Which way is better.
    #[serde(default = "neutral")]
    pub better: Better,
    /// Widest useful interval half-width, in the value's unit; wider is
    /// "insufficient data". Default: half the value (10 points for a
    /// percentage).
    #[serde(default)]
    pub max_half_width: Option<f64>,
    /// What it means, in words.
    #[serde(default)]
    pub description: String,
    /// The numerator (absent for completeness and timeliness).
    #[serde(default)]
    pub numerator: Option<Aggregate>,
    /// The denominator (proportions and ratios).
    #[serde(default)]
    pub denominator: Option<Aggregate>,
}

fn unit_factor() -> f64 {
    1.0
}

fn default_period() -> PeriodType {
    PeriodType::Month
}

fn neutral() -> Better {
    Better::Neutral
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogueFile {
    #[serde(rename = "indicator")]
    indicators: Vec<Indicator>,
}

/// A disaggregation: a column of `person` with a public domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disaggregation {
    /// Its name in the catalogue.
    pub name: &'static str,
    /// The `person` column.
    pub column: &'static str,
    /// The column's values, each a category.
    pub categories: &'static [i64],
}

/// Disaggregations this version knows.
pub const DISAGGREGATIONS: &[Disaggregation] = &[Disaggregation {
    name: "sex",
    column: "gender_concept_id",
    categories: &[8507, 8532],
}];

/// The disaggregation called `name`.
pub fn disaggregation(name: &str) -> Option<&'static Disaggregation> {
    DISAGGREGATIONS.iter().find(|d| d.name == name)
}

/// A checked catalogue.
#[derive(Debug, Clone)]
pub struct Catalogue {
    /// The indicators, in file order.
    pub indicators: Vec<Indicator>,
}

/// One DP query a period's run needs: an aggregate, with or without a
/// disaggregation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Measure {
    /// The aggregate (its `units` filter aside: that is post-processing).
    pub aggregate: Aggregate,
    /// A disaggregation, or none for the total.
    pub by: Option<String>,
}

impl Measure {
    /// A stable key naming the measure (stored with its releases).
    pub fn key(&self) -> String {
        let text = format!(
            "{}|{:?}|{}|{}|{}|{}|{:?}|{}|{}|{:?}",
            self.aggregate.from,
            self.aggregate.condition,
            self.aggregate.date,
            self.aggregate.aggregate,
            self.aggregate.unit_column,
            self.aggregate.person_column,
            self.aggregate.concepts,
            self.aggregate.max_rows,
            self.aggregate.max_units,
            self.by
        );
        confer_protocol::signing::sha256_hex(text.as_bytes())[..16].to_string()
    }

    /// The DP SQL of this measure for `period`, at `epsilon` and `delta`
    /// per node. Groups: `care_site_id` (and the disaggregation's column);
    /// value column `value`; raw (not clamped) values, and every site may
    /// be missing (the run records who answered).
    pub fn sql(&self, period: &Period, epsilon: f64, delta: f64, confidence: f64) -> String {
        let a = &self.aggregate;
        let mut sql = format!(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = {epsilon:e}, delta = {delta:e}, \
             max_groups_contributed = {}, max_rows_contributed = {}, nonnegative = 'false', \
             min_sites = 1, confidence = {confidence})\n  {} AS care_site_id",
            a.max_units, a.max_rows, a.unit_column
        );
        let by = self
            .by
            .as_deref()
            .and_then(disaggregation)
            .map(|d| d.column);
        if let Some(col) = by {
            let _ = write!(sql, ", person_sex.{col} AS {col}");
        }
        let _ = write!(sql, ", {} AS value\nFROM {}", a.aggregate, a.from);
        if by.is_some() {
            let _ = write!(
                sql,
                " JOIN person person_sex ON person_sex.person_id = {}",
                a.person_column
            );
        }
        let _ = write!(
            sql,
            "\nWHERE {d} >= DATE '{}' AND {d} < DATE '{}'",
            period.start(),
            period.end(),
            d = a.date
        );
        if let Some(c) = a.condition_for(period) {
            let _ = write!(sql, " AND ({c})");
        }
        let _ = write!(sql, "\nGROUP BY {}", a.unit_column);
        if let Some(col) = by {
            let _ = write!(sql, ", person_sex.{col}");
        }
        sql
    }
}

impl Catalogue {
    /// The standard catalogue.
    pub fn standard() -> Result<Self> {
        Self::parse(STANDARD)
    }

    /// Reads and checks a catalogue file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordinatorError::Config(format!(
                "supervision.indicators: cannot read {}: {e}",
                path.display()
            ))
        })?;
        Self::parse(&text).map_err(|e| match e {
            CoordinatorError::Config(m) => {
                CoordinatorError::Config(format!("{}: {m}", path.display()))
            }
            other => other,
        })
    }

    /// Parses and checks catalogue text (the shape of each entry; whether
    /// its SQL compiles is checked against the network before a run).
    pub fn parse(text: &str) -> Result<Self> {
        let file: CatalogueFile =
            toml::from_str(text).map_err(|e| CoordinatorError::Config(e.to_string()))?;
        let mut ids = BTreeSet::new();
        for i in &file.indicators {
            let bad =
                |what: String| CoordinatorError::Config(format!("indicator {}: {what}", i.id));
            if i.id.is_empty() || !i.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(bad("the id uses letters, digits and '_'".into()));
            }
            if !ids.insert(i.id.clone()) {
                return Err(bad("the id is used twice".into()));
            }
            if !(i.factor.is_finite() && i.factor > 0.0) {
                return Err(bad(format!(
                    "factor = {}: give a positive number",
                    i.factor
                )));
            }
            let reporting = matches!(i.kind, Kind::Completeness | Kind::Timeliness);
            match (i.kind, &i.numerator, &i.denominator) {
                (Kind::Count, Some(_), None) => {}
                (Kind::Count, _, _) => {
                    return Err(bad("a count has a numerator and no denominator".into()));
                }
                (Kind::Proportion | Kind::Ratio, Some(_), Some(_)) => {}
                (Kind::Proportion | Kind::Ratio, _, _) => {
                    return Err(bad(
                        "a proportion or ratio needs a numerator and a denominator".into(),
                    ));
                }
                (_, None, None) => {}
                (_, _, _) => {
                    return Err(bad(
                        "completeness and timeliness come from the run itself: drop numerator and denominator"
                            .into(),
                    ));
                }
            }
            if reporting && !i.disaggregations.is_empty() {
                return Err(bad(
                    "completeness and timeliness have no disaggregations".into()
                ));
            }
            for d in &i.disaggregations {
                if disaggregation(d).is_none() {
                    return Err(bad(format!(
                        "disaggregation {d:?} is not known: use {}",
                        DISAGGREGATIONS
                            .iter()
                            .map(|d| d.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
            for (part, agg) in [("numerator", &i.numerator), ("denominator", &i.denominator)] {
                let Some(a) = agg else { continue };
                if a.from.trim().is_empty()
                    || a.aggregate.trim().is_empty()
                    || a.date.trim().is_empty()
                {
                    return Err(bad(format!(
                        "{part}: from, date and aggregate are required"
                    )));
                }
                if a.max_rows == 0 || a.max_units == 0 {
                    return Err(bad(format!(
                        "{part}: max_rows and max_units are at least 1"
                    )));
                }
                if a.condition
                    .as_deref()
                    .is_some_and(|c| c.contains("{concepts}"))
                    && a.concepts.is_empty()
                {
                    return Err(bad(format!(
                        "{part}: the condition uses {{concepts}} but concepts = [] is empty"
                    )));
                }
                for text in [
                    &a.from,
                    &a.aggregate,
                    &a.date,
                    &a.unit_column,
                    &a.person_column,
                ]
                .into_iter()
                .chain(a.condition.as_ref())
                {
                    if text.contains(';') || text.contains("--") || text.contains("/*") {
                        return Err(bad(format!(
                            "{part}: {text:?} holds ';' or a comment: write one expression"
                        )));
                    }
                }
            }
        }
        if file.indicators.is_empty() {
            return Err(CoordinatorError::Config(
                "the catalogue has no [[indicator]]".into(),
            ));
        }
        Ok(Self {
            indicators: file.indicators,
        })
    }

    /// The indicators released for periods of type `kind`: those whose
    /// period is that type or shorter.
    pub fn for_period(&self, kind: PeriodType) -> impl Iterator<Item = &Indicator> {
        self.indicators.iter().filter(move |i| i.period <= kind)
    }

    /// The distinct measures the indicators for `kind` need, in a stable
    /// order.
    pub fn measures(&self, kind: PeriodType) -> Vec<Measure> {
        let mut out = BTreeSet::new();
        for i in self.for_period(kind) {
            for a in [&i.numerator, &i.denominator].into_iter().flatten() {
                let mut agg = a.clone();
                agg.units.clear();
                for by in
                    std::iter::once(None).chain(i.disaggregations.iter().map(|d| Some(d.clone())))
                {
                    out.insert(Measure {
                        aggregate: agg.clone(),
                        by,
                    });
                }
            }
        }
        out.into_iter().collect()
    }
}

/// The measure of an aggregate (without its `units` filter).
pub fn measure_of(a: &Aggregate, by: Option<&str>) -> Measure {
    let mut agg = a.clone();
    agg.units.clear();
    Measure {
        aggregate: agg,
        by: by.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_catalogue_parses_and_shares_measures() {
        let c = Catalogue::standard().expect("standard");
        assert!(c.indicators.len() >= 15, "{}", c.indicators.len());
        let monthly = c.measures(PeriodType::Month);
        let numerators_and_denominators: usize = c
            .for_period(PeriodType::Month)
            .map(|i| {
                (1 + i.disaggregations.len())
                    * (i.numerator.is_some() as usize + i.denominator.is_some() as usize)
            })
            .sum();
        assert!(
            monthly.len() < numerators_and_denominators,
            "shared measures are run once"
        );
        let keys: BTreeSet<String> = monthly.iter().map(Measure::key).collect();
        assert_eq!(keys.len(), monthly.len());
    }

    #[test]
    fn a_measure_is_one_dp_query_for_its_period() {
        let c = Catalogue::standard().expect("standard");
        let m = c.measures(PeriodType::Month);
        let p = Period::parse("2024-10").expect("period");
        let sql = m[0].sql(&p, 0.5, 1e-6, 0.95);
        assert!(
            sql.contains(">= DATE '2024-10-01'") && sql.contains("< DATE '2024-11-01'"),
            "{sql}"
        );
        assert!(sql.contains("GROUP BY"), "{sql}");
        assert!(confer_query::parse(&sql).is_ok(), "{sql}");
    }

    #[test]
    fn bad_entries_name_the_indicator() {
        let text = STANDARD.replacen("kind = \"count\"", "kind = \"proportion\"", 1);
        let e = Catalogue::parse(&text).expect_err("refused").to_string();
        assert!(e.contains("indicator outpatient_emergency_visits:"), "{e}");
        let text = STANDARD.replacen(
            "disaggregations = [\"sex\"]",
            "disaggregations = [\"height\"]",
            1,
        );
        assert!(
            Catalogue::parse(&text)
                .unwrap_err()
                .to_string()
                .contains("height")
        );
    }
}
