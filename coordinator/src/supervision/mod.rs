//! Supervision statistics for the health commission: the region's org
//! tree, an indicator catalogue, and one release per period of every
//! indicator for every org unit at every level, under a yearly budget the
//! nodes' policies enforce. See `docs/supervision.md`.
//!
//! * [`region`]: the tree (`region.toml`) and which node holds which units;
//! * [`indicators`]: the catalogue and the DP queries (measures) it needs;
//! * [`period`]: months, quarters, years;
//! * [`run`]: asking the nodes, storing their releases, assembling values;
//! * [`estimate`]: the consistent tree, ratios, intervals, "insufficient";
//! * [`tables`]: the released values as Flight SQL tables.

pub mod estimate;
pub mod indicators;
pub mod period;
pub mod pivot;
pub mod region;
pub mod run;
pub mod tables;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::error::{CoordinatorError, Result};
use crate::state::CoordinatorState;
use indicators::Catalogue;
use period::{Period, PeriodType};
use region::{Holdings, Region};

/// `[supervision]` in `coordinator.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// The org tree (relative to the config file).
    pub region: PathBuf,
    /// An indicator catalogue replacing the standard one.
    #[serde(default)]
    pub indicators: Option<PathBuf>,
    /// The standing study supervision runs under (nodes give it a budget).
    #[serde(default = "default_study")]
    pub study: String,
    /// The user tasks are signed for (a member of the study at the nodes).
    #[serde(default = "default_user")]
    pub user: String,
    /// What one year of supervision may spend at each node, as epsilon at
    /// `delta` (converted to zCDP rho and split over the periods).
    #[serde(default = "default_epsilon")]
    pub epsilon_per_year: f64,
    /// Delta of the yearly budget and of each query.
    #[serde(default = "default_delta")]
    pub delta: f64,
    /// How the year's budget is shared by the period types.
    #[serde(default)]
    pub shares: Shares,
    /// Confidence of the intervals.
    #[serde(default = "default_confidence")]
    pub confidence: f64,
    /// Day of the month on which the coordinator releases the month before
    /// (and the quarter or year before, when one has just ended) by itself;
    /// 0: only on demand.
    #[serde(default)]
    pub run_day: u32,
    /// Minutes between attempts while a scheduled release misses nodes.
    #[serde(default = "default_retry_minutes")]
    pub retry_minutes: u64,
}

/// Shares of the yearly budget: each month spends `month / 12` of it, each
/// quarter `quarter / 4`, the year `year`. They sum to at most 1, so a year
/// of releases spends at most `epsilon_per_year`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Shares {
    /// Monthly releases' share.
    pub month: f64,
    /// Quarterly releases' share.
    pub quarter: f64,
    /// The yearly release's share.
    pub year: f64,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            month: 0.6,
            quarter: 0.2,
            year: 0.2,
        }
    }
}

impl Shares {
    /// The share of a period type.
    pub fn of(&self, kind: PeriodType) -> f64 {
        match kind {
            PeriodType::Month => self.month,
            PeriodType::Quarter => self.quarter,
            PeriodType::Year => self.year,
        }
    }
}

fn default_study() -> String {
    "supervision".into()
}
fn default_user() -> String {
    "commission".into()
}
fn default_epsilon() -> f64 {
    12.0
}
fn default_delta() -> f64 {
    1e-6
}
fn default_confidence() -> f64 {
    0.95
}
fn default_retry_minutes() -> u64 {
    60
}

impl SupervisionConfig {
    /// Resolves relative paths against the config file's directory.
    pub fn resolve(&mut self, base: &std::path::Path) {
        if self.region.is_relative() {
            self.region = base.join(&self.region);
        }
        if let Some(p) = &mut self.indicators
            && p.is_relative()
        {
            *p = base.join(&*p);
        }
    }

    /// Checks the numbers.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoordinatorError::Config(format!("supervision.{m}")));
        if !(self.epsilon_per_year.is_finite() && self.epsilon_per_year > 0.0) {
            return bad(format!(
                "epsilon_per_year = {}: give a positive number",
                self.epsilon_per_year
            ));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return bad(format!(
                "delta = {}: give a number between 0 and 1 (e.g. 1e-6)",
                self.delta
            ));
        }
        let s = self.shares;
        if [s.month, s.quarter, s.year]
            .iter()
            .any(|v| !(v.is_finite() && *v >= 0.0))
            || s.month + s.quarter + s.year > 1.0 + 1e-9
        {
            return bad(format!(
                "shares = {{ month = {}, quarter = {}, year = {} }}: non-negative shares summing to at most 1",
                s.month, s.quarter, s.year
            ));
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return bad(format!("confidence = {}: between 0 and 1", self.confidence));
        }
        if self.run_day > 28 {
            return bad(format!(
                "run_day = {}: a day from 1 to 28 (0: on demand only)",
                self.run_day
            ));
        }
        if self.retry_minutes == 0 {
            return bad("retry_minutes must be at least 1".into());
        }
        Ok(())
    }
}

/// One released value (a row of `supervision.values`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueRow {
    /// Period (`2026-10`).
    pub period: String,
    /// Org unit code.
    pub unit: String,
    /// The unit's level.
    pub level: String,
    /// Indicator id.
    pub indicator: String,
    /// Disaggregation category (`sex=8532`), empty for the total.
    pub category: String,
    /// The value; none when the data are insufficient.
    pub value: Option<f64>,
    /// Interval, low end.
    pub ci_low: Option<f64>,
    /// Interval, high end.
    pub ci_high: Option<f64>,
    /// The numerator after consistency (value units).
    pub numerator: Option<f64>,
    /// The denominator after consistency.
    pub denominator: Option<f64>,
    /// `insufficient data`, `incomplete`, `red line`, comma-separated.
    pub flags: String,
}

/// The supervision capability of a running coordinator.
pub struct Supervision {
    /// Its config.
    pub config: SupervisionConfig,
    /// The org tree.
    pub region: Region,
    /// The indicators.
    pub catalogue: Catalogue,
    /// One run at a time.
    running: tokio::sync::Mutex<()>,
    /// The units nodes declared when last asked.
    last_holdings: Mutex<Holdings>,
}

impl Supervision {
    /// Loads and checks the tree and the catalogue.
    pub fn load(config: SupervisionConfig) -> Result<Self> {
        config.validate()?;
        let region = Region::load(&config.region)?;
        let catalogue = match &config.indicators {
            Some(p) => Catalogue::load(p)?,
            None => Catalogue::standard()?,
        };
        for i in &catalogue.indicators {
            for a in [&i.numerator, &i.denominator].into_iter().flatten() {
                for (set, options) in &a.units {
                    let g = region.group_sets.iter().find(|g| &g.id == set).ok_or_else(|| {
                        CoordinatorError::Config(format!(
                            "indicator {}: units filter on group set {set:?}, which region.toml does not declare",
                            i.id
                        ))
                    })?;
                    if let Some(o) = options
                        .iter()
                        .find(|o| !g.options.iter().any(|x| &x.id == *o))
                    {
                        return Err(CoordinatorError::Config(format!(
                            "indicator {}: {o:?} is not an option of group set {set}",
                            i.id
                        )));
                    }
                }
            }
        }
        Ok(Self {
            config,
            region,
            catalogue,
            running: tokio::sync::Mutex::new(()),
            last_holdings: Mutex::new(Holdings::default()),
        })
    }

    /// The periods a scheduled run releases on `today`: the month before,
    /// and the quarter or year that ended with it.
    pub fn due(today: chrono::NaiveDate) -> Vec<Period> {
        let month = Period::month_before(today);
        let mut out = vec![month];
        if month.index.is_multiple_of(3) {
            out.push(Period {
                kind: PeriodType::Quarter,
                year: month.year,
                index: month.index / 3,
            });
        }
        if month.index == 12 {
            out.push(Period {
                kind: PeriodType::Year,
                year: month.year,
                index: 1,
            });
        }
        out
    }
}

/// Checks, once the coordinator is up, that the units the nodes declare
/// fit the tree and do not overlap, and logs an error naming the node and
/// the unit otherwise (every run checks again, and refuses before any node
/// spends).
pub fn check_at_start(state: Arc<CoordinatorState>) {
    let Some(sup) = state.supervision.clone() else {
        return;
    };
    tokio::spawn(async move {
        match sup.holdings(&state).await {
            Ok(h) if h.unreachable.is_empty() => info!(
                nodes = h.nodes.len(),
                "supervision: every node's org units fit the region's tree"
            ),
            Ok(h) => warn!(
                "supervision: nodes not reachable at start, their org units are checked when they answer: {}",
                h.unreachable.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
            Err(e) => tracing::error!("supervision: {}", e.message),
        }
    });
}

/// Runs the schedule: from `run_day` of each month, the periods due are
/// released, and retried every `retry_minutes` while nodes are missing
/// (until the month ends).
pub fn spawn_schedule(state: Arc<CoordinatorState>) -> Option<tokio::task::JoinHandle<()>> {
    let sup = state.supervision.clone()?;
    if sup.config.run_day == 0 {
        return None;
    }
    let every = std::time::Duration::from_secs(60 * sup.config.retry_minutes);
    Some(tokio::spawn(async move {
        loop {
            let today = chrono::Local::now().date_naive();
            if chrono::Datelike::day(&today) >= sup.config.run_day {
                for period in Supervision::due(today) {
                    match sup.run(&state, period, "schedule").await {
                        Ok(r) if r.stored => {}
                        Ok(r) => info!(
                            period = %r.period,
                            missing = r.nodes.iter().filter(|n| !n.complete).count(),
                            "scheduled supervision release"
                        ),
                        Err(e) => {
                            warn!(period = %period, "scheduled supervision release failed: {}", e.message)
                        }
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    }))
}

/// The body of [`confer_protocol::coordinator::actions::SUPERVISION_RUN`].
#[derive(Debug, Deserialize)]
struct RunRequest {
    period: String,
}

fn not_configured() -> confer_protocol::ProtocolError {
    confer_protocol::ProtocolError::new(
        confer_protocol::ErrorKind::FailedPrecondition,
        "this coordinator has no [supervision] section: add one to coordinator.toml (region, and \
         optionally indicators; see docs/supervision.md) and restart it",
    )
}

/// `confer.supervision.run`.
pub async fn run_action(
    state: &Arc<CoordinatorState>,
    user: &crate::store::User,
    body: &[u8],
) -> std::result::Result<run::RunReport, confer_protocol::ProtocolError> {
    let sup = state.supervision.clone().ok_or_else(not_configured)?;
    let req: RunRequest = serde_json::from_slice(body).map_err(|e| {
        confer_protocol::ProtocolError::invalid(format!(
            "expected {{\"period\": \"2026-10\"}}: {e}"
        ))
    })?;
    let period = Period::parse(&req.period).map_err(confer_protocol::ProtocolError::invalid)?;
    sup.run(state, period, &user.name).await
}

/// What `confer supervision indicators` shows: the catalogue, the tree's
/// size, and for each period type the measures it needs and the budget.
#[derive(Debug, Serialize)]
pub struct Overview {
    /// The indicators.
    pub indicators: Vec<indicators::Indicator>,
    /// Levels of the tree.
    pub levels: Vec<region::Level>,
    /// Units in the tree.
    pub units: usize,
    /// Per period type: measures, epsilon per measure, rho per node.
    pub periods: Vec<PeriodBudget>,
    /// The yearly budget at each node.
    pub epsilon_per_year: f64,
    /// Its delta.
    pub delta: f64,
    /// The study.
    pub study: String,
}

/// The budget of one period type.
#[derive(Debug, Serialize)]
pub struct PeriodBudget {
    /// month, quarter or year.
    pub period: String,
    /// Indicators released.
    pub indicators: usize,
    /// DP queries per node.
    pub measures: usize,
    /// Epsilon of each.
    pub epsilon_per_measure: f64,
    /// The period's spend at a node (zCDP rho).
    pub rho: f64,
    /// That spend as epsilon at `delta`.
    pub epsilon: f64,
}

/// `confer.supervision.indicators`.
pub fn overview(
    state: &CoordinatorState,
    _body: &[u8],
) -> std::result::Result<Overview, confer_protocol::ProtocolError> {
    let sup = state.supervision.as_ref().ok_or_else(not_configured)?;
    let mut periods = Vec::new();
    for kind in [PeriodType::Month, PeriodType::Quarter, PeriodType::Year] {
        let measures = sup.catalogue.measures(kind).len();
        if measures == 0 || sup.config.shares.of(kind) == 0.0 {
            continue;
        }
        let (eps, rho) = sup.epsilon_per_measure(kind, measures)?;
        periods.push(PeriodBudget {
            period: kind.as_str().into(),
            indicators: sup.catalogue.for_period(kind).count(),
            measures,
            epsilon_per_measure: eps,
            rho,
            epsilon: confer_privacy::accounting::epsilon_for_rho(rho, sup.config.delta)
                .map_err(|e| confer_protocol::ProtocolError::internal(e.to_string()))?,
        });
    }
    Ok(Overview {
        indicators: sup.catalogue.indicators.clone(),
        levels: sup.region.levels.clone(),
        units: sup.region.units.len(),
        periods,
        epsilon_per_year: sup.config.epsilon_per_year,
        delta: sup.config.delta,
        study: sup.config.study.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedule_releases_the_periods_that_just_ended() {
        let day = |y, m, d| chrono::NaiveDate::from_ymd_opt(y, m, d).expect("date");
        let names = |d| {
            Supervision::due(d)
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(day(2026, 11, 5)), ["2026-10"]);
        assert_eq!(names(day(2026, 10, 5)), ["2026-09", "2026-Q3"]);
        assert_eq!(names(day(2027, 1, 5)), ["2026-12", "2026-Q4", "2026"]);
    }

    #[test]
    fn the_yearly_budget_is_split_over_the_periods() {
        let bad = |text: &str| {
            let mut c: SupervisionConfig =
                toml::from_str(&format!("region = \"r.toml\"\n{text}")).expect("config");
            c.resolve(std::path::Path::new("/"));
            c.validate().expect_err("refused").to_string()
        };
        assert!(bad("shares = { month = 0.8, quarter = 0.2, year = 0.2 }").contains("at most 1"));
        assert!(bad("epsilon_per_year = -1").contains("positive"));
        assert!(bad("run_day = 31").contains("1 to 28"));
    }
}
