//! `SHOW PRIVACY BUDGET`: each node's figures for a study, its figures over
//! all studies (the node's total, and the asking researcher's across
//! studies), and the network-level worst case for a resident seen at
//! several institutions.

use std::sync::Arc;

use arrow::array::{Array, Float64Array, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use confer_protocol::ProtocolError;
use confer_query::combine::SitePartial;

/// Delta at which rho is shown as epsilon.
pub const DISPLAY_DELTA: f64 = 1e-6;

/// The answer's schema.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, false),
        Field::new("study", DataType::Utf8, false),
        Field::new("status", DataType::Utf8, false),
        Field::new("budget_rho", DataType::Float64, false),
        Field::new("spent_rho", DataType::Float64, false),
        Field::new("remaining_rho", DataType::Float64, false),
        Field::new("spent_epsilon", DataType::Float64, false),
        Field::new("remaining_epsilon", DataType::Float64, false),
        Field::new("delta", DataType::Float64, false),
        Field::new("releases", DataType::UInt64, false),
        Field::new("node_budget_rho", DataType::Float64, true),
        Field::new("node_spent_rho", DataType::Float64, true),
        Field::new("researcher_total_budget_rho", DataType::Float64, true),
        Field::new("researcher_total_spent_rho", DataType::Float64, true),
    ]))
}

struct Row {
    node: String,
    study: String,
    status: String,
    budget: f64,
    spent: f64,
    releases: u64,
    node_budget: Option<f64>,
    node_spent: Option<f64>,
    researcher_budget: Option<f64>,
    researcher_spent: Option<f64>,
}

fn epsilon(rho: f64) -> f64 {
    confer_privacy::accounting::epsilon_for_rho(rho.max(0.0), DISPLAY_DELTA).unwrap_or(f64::NAN)
}

/// One row per node, then the network row: a resident seen at up to
/// `max_sites` institutions is exposed to the sum of the `max_sites` largest
/// per-node spends (zCDP composes by addition).
pub fn combine(reports: &[SitePartial], max_sites: usize) -> Result<RecordBatch, ProtocolError> {
    let mut rows = Vec::new();
    for r in reports {
        let b = &r.batch;
        let text = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<StringArray>()
                .filter(|a| !a.is_empty())
                .map(|a| a.value(0).to_string())
        };
        let float = |i: usize| {
            b.column(i)
                .as_any()
                .downcast_ref::<Float64Array>()
                .filter(|a| !a.is_empty())
                .map(|a| a.value(0))
        };
        let count = b
            .column(5)
            .as_any()
            .downcast_ref::<UInt64Array>()
            .filter(|a| !a.is_empty())
            .map(|a| a.value(0));
        // Node-wide figures (NULL: no such budget; absent from nodes of
        // earlier versions).
        let optional = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>().cloned())
                .filter(|a| !a.is_empty() && a.is_valid(0))
                .map(|a| a.value(0))
        };
        match (text(0), text(1), text(2), float(3), float(4), count) {
            (Some(node), Some(study), Some(status), Some(budget), Some(spent), Some(releases)) => {
                rows.push(Row {
                    node,
                    study,
                    status,
                    budget,
                    spent,
                    releases,
                    node_budget: optional("node_budget_rho"),
                    node_spent: optional("node_spent_rho"),
                    researcher_budget: optional("researcher_budget_rho"),
                    researcher_spent: optional("researcher_spent_rho"),
                })
            }
            _ => {
                return Err(ProtocolError::internal(format!(
                    "node {} sent a malformed budget report",
                    r.site
                )));
            }
        }
    }
    rows.sort_by(|a, b| a.node.cmp(&b.node));
    if let Some(first) = rows.first() {
        let mut spent: Vec<f64> = rows.iter().map(|r| r.spent).collect();
        let mut budgets: Vec<f64> = rows.iter().map(|r| r.budget).collect();
        spent.sort_by(|a, b| b.total_cmp(a));
        budgets.sort_by(|a, b| b.total_cmp(a));
        let m = max_sites.min(rows.len());
        rows.push(Row {
            node: format!("network (worst case, {max_sites} site(s) per person)"),
            study: first.study.clone(),
            status: String::new(),
            budget: budgets[..m].iter().sum(),
            spent: spent[..m].iter().sum(),
            releases: rows.iter().map(|r| r.releases).sum(),
            node_budget: None,
            node_spent: None,
            researcher_budget: None,
            researcher_spent: None,
        });
    }
    RecordBatch::try_new(
        schema(),
        vec![
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.node.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.study.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r.status.as_str()),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| r.budget),
            )),
            Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.spent))),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| (r.budget - r.spent).max(0.0)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| epsilon(r.spent)),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|r| epsilon((r.budget - r.spent).max(0.0))),
            )),
            Arc::new(Float64Array::from_iter_values(
                rows.iter().map(|_| DISPLAY_DELTA),
            )),
            Arc::new(UInt64Array::from_iter_values(
                rows.iter().map(|r| r.releases),
            )),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.node_budget))),
            Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.node_spent))),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| r.researcher_budget),
            )),
            Arc::new(Float64Array::from_iter(
                rows.iter().map(|r| r.researcher_spent),
            )),
        ],
    )
    .map_err(|e| ProtocolError::internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, budget: f64, spent: f64) -> SitePartial {
        let batch =
            confer_protocol::release::budget_report(&confer_protocol::release::BudgetFigures {
                node: node.into(),
                study: "s".into(),
                status: "approved".into(),
                budget_rho: budget,
                spent_rho: spent,
                releases: 2,
                node_budget_rho: Some(10.0),
                node_spent_rho: spent * 2.0,
                researcher: "r".into(),
                researcher_budget_rho: None,
                researcher_spent_rho: spent,
            })
            .expect("batch");
        SitePartial {
            site: node.into(),
            batch,
        }
    }

    #[test]
    fn the_network_row_sums_the_largest_spends_for_max_sites() {
        let reports = [
            report("a", 1.0, 0.1),
            report("b", 2.0, 0.4),
            report("c", 0.5, 0.3),
        ];
        for (max_sites, spent, budget) in [(1, 0.4, 2.0), (2, 0.7, 3.0), (5, 0.8, 3.5)] {
            let batch = combine(&reports, max_sites).expect("combine");
            assert_eq!(batch.num_rows(), 4);
            let f = |i: usize| {
                batch
                    .column(i)
                    .as_any()
                    .downcast_ref::<Float64Array>()
                    .expect("f64")
                    .value(3)
            };
            assert!((f(4) - spent).abs() < 1e-12, "{max_sites}: spent {}", f(4));
            assert!(
                (f(3) - budget).abs() < 1e-12,
                "{max_sites}: budget {}",
                f(3)
            );
            let node = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("text")
                .value(3)
                .to_string();
            assert!(
                node.contains(&format!("{max_sites} site(s) per person")),
                "{node}"
            );
        }
    }
}
