//! The feature query of a training job: plain SQL, checked against a
//! catalog without data (at the coordinator against the network catalog,
//! at each node again against its own), then run only at the nodes, whose
//! rows never leave.

use arrow::datatypes::{DataType, SchemaRef};

use crate::catalog::Catalog;
use crate::engine::empty_context;
use crate::error::{QueryError, Result};
use crate::parse::{Statement, parse};

/// A checked feature query.
#[derive(Debug, Clone)]
pub struct FeatureQuery {
    /// What a node runs: the named columns of the query, ordered by the unit.
    pub sql: String,
    /// The tables it reads.
    pub tables: Vec<String>,
    /// The schema of the rows: `columns` in order.
    pub schema: SchemaRef,
    /// Why one person's rows could multiply the query's work, if they can
    /// (the node then answers the preparation at a fixed time).
    pub amplification: Option<String>,
}

/// Quotes an identifier for SQL.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Checks `query` (plain SQL, no DP clause) and wraps it to select
/// `columns` (the unit first, then numeric or boolean columns) ordered by
/// the unit. Errors name the column or construct to change.
pub async fn feature_query(
    query: &str,
    columns: &[&str],
    catalog: &Catalog,
) -> Result<FeatureQuery> {
    let parsed = match parse(query)? {
        Statement::Query(q) if q.options.is_none() => q,
        Statement::Query(_) => {
            return Err(QueryError::Rejected(
                "the feature query is plain SQL: remove WITH DIFFERENTIAL_PRIVACY (its rows never leave the node)"
                    .into(),
            ));
        }
        _ => {
            return Err(QueryError::Rejected(
                "the feature query must be a SELECT".into(),
            ));
        }
    };
    // Casts, divisions and IN subqueries are made total as in DP queries:
    // a feature query that fails on one person's row would tell so.
    let mut query = (*parsed.query).clone();
    crate::compile::make_total(&mut query)?;
    let Some((unit, values)) = columns.split_first() else {
        return Err(QueryError::Internal("a feature query needs columns".into()));
    };
    let sql = format!(
        "SELECT {} FROM ({}) AS confer_features ORDER BY {}",
        columns
            .iter()
            .map(|c| quote(c))
            .collect::<Vec<_>>()
            .join(", "),
        query,
        quote(unit)
    );
    let ctx = empty_context(catalog)?;
    // Every row must be one person's, computed from that person's records
    // only (the DP analysis of standardisation, gradients and evaluation
    // counts rests on it): the same provenance rules as a DP query's source.
    let inner = crate::engine::analyzed(&ctx, &query.to_string())
        .await
        .map_err(|e| QueryError::Plan(format!("the feature query does not plan: {e}")))?;
    let provenance = crate::analyze::provenance(&inner, catalog).map_err(|e| {
        QueryError::Rejected(format!(
            "the feature query must give each person's row from that person's records only: {e}"
        ))
    })?;
    if !provenance.is_private() {
        return Err(QueryError::Rejected(
            "the feature query reads no person-level table: training rows are persons' rows".into(),
        ));
    }
    let unit_index = inner.schema().index_of_column_by_name(None, unit);
    if !unit_index.is_some_and(|i| provenance.unit_fields.contains(&i)) {
        return Err(QueryError::Rejected(format!(
            "data.unit = {unit} is not the privacy unit of the rows the feature query returns: select the \
             tables' privacy unit column (see `confer catalog`) and name it in data.unit"
        )));
    }
    let plan = crate::engine::analyzed(&ctx, &sql).await.map_err(|e| {
        QueryError::Plan(format!(
            "the feature query does not plan: {e} (it must return the columns {})",
            columns.join(", ")
        ))
    })?;
    crate::total::check_plan(&plan).map_err(|e| {
        QueryError::Rejected(format!(
            "the feature query may compute only what cannot fail on a row: {e}"
        ))
    })?;
    let schema = plan.schema().as_arrow().clone();
    for name in values {
        let field = schema
            .field_with_name(name)
            .map_err(|_| QueryError::Plan(format!("the feature query returns no column {name}")))?;
        let t = field.data_type();
        if !(t.is_numeric() || *t == DataType::Boolean) {
            return Err(QueryError::Rejected(format!(
                "column {name} of the feature query is {t}: features and targets must be numeric or boolean \
                 (CAST it, or encode categories as 0/1 columns)"
            )));
        }
    }
    Ok(FeatureQuery {
        sql,
        tables: provenance.tables.into_iter().collect(),
        schema: std::sync::Arc::new(schema),
        amplification: crate::analyze::amplification(&inner, catalog),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use confer_protocol::catalog::{CatalogInfo, ColumnInfo, ColumnType, TableInfo};

    fn catalog() -> Catalog {
        let column = |name: &str, column_type| ColumnInfo {
            name: name.into(),
            column_type,
            bounds: None,
            domain: None,
            unique: false,
        };
        Catalog::for_node(&CatalogInfo {
            node: "a".into(),
            tables: vec![TableInfo {
                name: "heart".into(),
                privacy_unit: Some("patient".into()),
                columns: vec![
                    column("patient", ColumnType::Int64),
                    column("age", ColumnType::Float64),
                    column("note", ColumnType::Utf8),
                    column("num", ColumnType::Int64),
                ],
                one_row_per_unit: true,
            }],
        })
    }

    #[tokio::test]
    async fn feature_queries_are_wrapped_and_checked() {
        let q = feature_query(
            "SELECT patient, age, CAST(num > 0 AS DOUBLE) AS label FROM heart WHERE age IS NOT NULL",
            &["patient", "age", "label"],
            &catalog(),
        )
        .await
        .expect("valid");
        assert_eq!(q.tables, vec!["heart".to_string()]);
        assert!(q.sql.ends_with("ORDER BY \"patient\""), "{}", q.sql);
        assert_eq!(q.schema.fields().len(), 3);
    }

    #[tokio::test]
    async fn bad_feature_queries_say_what_to_change() {
        let cases = [
            (
                "SELECT patient, age FROM heart",
                vec!["patient", "age", "label"],
                "No field named label",
            ),
            (
                "SELECT patient, note FROM heart",
                vec!["patient", "note"],
                "numeric or boolean",
            ),
            (
                "SELECT patient, age FROM nowhere",
                vec!["patient", "age"],
                "does not plan",
            ),
            ("DELETE FROM heart", vec!["patient"], "SELECT"),
            (
                "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1, delta = 1e-6) COUNT(*) FROM heart",
                vec!["patient"],
                "plain SQL",
            ),
            (
                "SELECT num AS patient, age FROM heart",
                vec!["patient", "age"],
                "drops the privacy unit",
            ),
            (
                "SELECT patient, num AS pid, age FROM heart",
                vec!["pid", "age"],
                "not the privacy unit",
            ),
            (
                "SELECT patient, age, (SELECT AVG(age) FROM heart) AS avg_age FROM heart",
                vec!["patient", "age", "avg_age"],
                "from that person's records only",
            ),
            (
                "SELECT patient, age FROM heart ORDER BY age LIMIT 10",
                vec!["patient", "age"],
                "from that person's records only",
            ),
        ];
        for (sql, columns, want) in cases {
            let err = feature_query(sql, &columns, &catalog())
                .await
                .expect_err(sql)
                .to_string();
            assert!(err.contains(want), "{sql}: {err}");
        }
    }
}
