//! The confer DP SQL dialect: parsing, compiling into federated plans,
//! releasing at nodes and combining at the coordinator.
//!
//! ```text
//!   SQL text ──parse──▶ ParsedQuery ──compile(catalog)──▶ FederatedPlan
//!                                                            │
//!            node: DataFusion runs plan.local_sql ──▶ exact partials
//!                  release(plan, partials) ─────────▶ noisy partials (OpenDP)
//!                                                            │
//!     coordinator: combine(plan, [noisy partials]) ──▶ answers + intervals
//!                  post_process (HAVING/ORDER/LIMIT) ─▶ result
//! ```
//!
//! Both sides compile the same SQL with this crate: the coordinator against
//! the network catalog (to validate and to know how to combine), each node
//! against its own catalog (so it never trusts the coordinator about
//! sensitivity, noise or cost).
//!
//! ```
//! use confer_query::{parse, compile, Catalog, Statement};
//! use confer_protocol::catalog::*;
//! let catalog = Catalog::for_node(&CatalogInfo {
//!     node: "site-a".into(),
//!     tables: vec![TableInfo {
//!         name: "person".into(),
//!         privacy_unit: Some("person_id".into()),
//!         columns: vec![
//!             ColumnInfo { name: "person_id".into(), column_type: ColumnType::Int64, bounds: None, domain: None, unique: false },
//!             ColumnInfo { name: "gender_concept_id".into(), column_type: ColumnType::Int64, bounds: None,
//!                          domain: Some(Domain::Values { values: vec![DomainValue::Int(8507), DomainValue::Int(8532)] }), unique: false },
//!         ],
//!         one_row_per_unit: true,
//!     }],
//! });
//! let Statement::Query(q) = parse(
//!     "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) \
//!      gender_concept_id, COUNT(*) AS n FROM person GROUP BY gender_concept_id").unwrap() else { panic!() };
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let plan = compile(&q, &catalog, Some("site-a")).await.unwrap();
//! assert_eq!(plan.group_keys().unwrap().len(), 2);
//! assert!(plan.cost.rho > 0.0);
//! # });
//! ```

pub mod analyze;
pub mod bounding;
pub mod catalog;
pub mod combine;
pub mod compile;
mod derive;
pub mod engine;
pub mod error;
pub mod explain;
pub mod features;
pub mod options;
pub mod parse;
pub mod plan;
pub mod public;
pub mod release;
pub mod secure;
pub mod secure_select;
pub mod total;

pub use catalog::Catalog;
pub use compile::{CompileOptions, compile, compile_with};
pub use error::{QueryError, Result};
pub use options::{Aggregation, DpOptions, Mechanism};
pub use parse::{ParsedQuery, Statement, parse};
pub use plan::FederatedPlan;
