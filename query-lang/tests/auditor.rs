//! The sensitivity auditor: DP queries generated from a grammar, compiled
//! as a node compiles them, and run as a node runs them on a dataset D and
//! on D without one person. For every query the compiler accepts, each
//! partial of each group may move by at most its declared per-group bound,
//! at most `max_groups_contributed` groups may move, and the query may not
//! fail on either dataset. Refusals are counted, not judged.
//!
//! The dataset is built to break things: a person with many groups, one
//! with many rows, a person listed twice in a table declared one row per
//! person, NULLs in every column (units included), NaN, infinities, values
//! of 1e300, and extreme dates. The persons removed are those, plus random
//! ones. The grammar covers joins, CTEs, derived tables, DISTINCT and
//! DISTINCT ON, UNION, IN / NOT IN / EXISTS subqueries, casts (lossless and
//! lossy, of the unit too), CASE, functions on and off the allowlist,
//! public and private keys, every aggregate and the bounding options;
//! among its shapes are those of the attacks in issue 13.
//!
//! `make test` runs a few hundred seeded queries; set
//! `CONFER_AUDIT_QUERIES=20000` (and `CONFER_AUDIT_SEED`) for a long run.
//! A violation prints the seed and the query.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use confer_protocol::catalog::{
    CatalogInfo, ColumnInfo, ColumnType, Domain, DomainValue, TableInfo,
};
use confer_query::plan::FederatedPlan;
use confer_query::{Catalog, CompileOptions, Statement, compile_with, parse};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

/// SplitMix64: a small, seeded generator for the grammar and the data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

fn col(name: &str, ty: ColumnType) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        column_type: ty,
        bounds: None,
        domain: None,
        unique: false,
    }
}

fn catalog() -> Catalog {
    let int = ColumnType::Int64;
    let mut gender = col("gender_concept_id", int);
    gender.domain = Some(Domain::Values {
        values: vec![DomainValue::Int(8507), DomainValue::Int(8532)],
    });
    let mut year = col("year_of_birth", int);
    year.bounds = Some((1900.0, 2030.0));
    let mut mconcept = col("measurement_concept_id", int);
    mconcept.domain = Some(Domain::Values {
        values: vec![
            DomainValue::Int(1),
            DomainValue::Int(2),
            DomainValue::Int(3),
        ],
    });
    let mut value = col("value_as_number", ColumnType::Float64);
    value.bounds = Some((0.0, 600.0));
    Catalog::for_node(&CatalogInfo {
        node: "site-a".into(),
        tables: vec![
            TableInfo {
                name: "person".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![
                    col("person_id", int),
                    gender,
                    year,
                    col("care_site_id", int),
                    col("person_source_value", ColumnType::Utf8),
                ],
                one_row_per_unit: true,
            },
            TableInfo {
                name: "condition_occurrence".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![
                    col("person_id", int),
                    col("condition_concept_id", int),
                    col("condition_start_date", ColumnType::Date),
                    col("provider_id", int),
                    col("condition_source_value", ColumnType::Utf8),
                ],
                one_row_per_unit: false,
            },
            TableInfo {
                name: "measurement".into(),
                privacy_unit: Some("person_id".into()),
                columns: vec![col("person_id", int), mconcept, value],
                one_row_per_unit: false,
            },
            TableInfo {
                name: "concept".into(),
                privacy_unit: None,
                columns: vec![
                    col("concept_id", int),
                    col("concept_name", ColumnType::Utf8),
                    col("domain_id", ColumnType::Utf8),
                ],
                one_row_per_unit: false,
            },
        ],
    })
}

/// A person row: id, gender, year of birth, care site, source value.
type PersonRow = (
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<String>,
);
/// A condition row: person, concept, start date (days), provider, source value.
type ConditionRow = (
    Option<i64>,
    Option<i64>,
    Option<i32>,
    Option<i64>,
    Option<String>,
);
/// A measurement row: person, concept, value.
type MeasurementRow = (Option<i64>, Option<i64>, Option<f64>);

/// The rows of the private tables (the public concept table is fixed).
#[derive(Clone)]
struct Data {
    person: Vec<PersonRow>,
    condition: Vec<ConditionRow>,
    measurement: Vec<MeasurementRow>,
}

const PERSONS: i64 = 40;
/// Persons built to stress the bounds (see `dataset`).
const MANY_GROUPS: i64 = 3;
const MANY_ROWS: i64 = 5;
const LISTED_TWICE: i64 = 7;
const NULLS: i64 = 11;
const EXTREMES: i64 = 13;

fn dataset(rng: &mut Rng) -> Data {
    let mut d = Data {
        person: Vec::new(),
        condition: Vec::new(),
        measurement: Vec::new(),
    };
    for p in 1..=PERSONS {
        let gender = if p == NULLS {
            None
        } else {
            Some(*rng.pick(&[8507, 8532, 8507, 0]))
        };
        let year = match p {
            NULLS => None,
            EXTREMES => Some(i64::MIN),
            _ => Some(1930 + rng.below(80) as i64),
        };
        d.person.push((
            Some(p),
            gender,
            year,
            Some(rng.below(4) as i64),
            Some(format!("P{p}")),
        ));
        if p == LISTED_TWICE {
            // One row per person is declared, and broken.
            d.person
                .push((Some(p), Some(8532), Some(1950), Some(9), Some("dup".into())));
        }
        let conditions = match p {
            MANY_GROUPS => 40,
            MANY_ROWS => 25,
            _ => rng.below(5),
        };
        for i in 0..conditions {
            let concept = match p {
                MANY_GROUPS => Some(100 + i as i64),
                MANY_ROWS => Some(101),
                NULLS if i == 0 => None,
                _ => Some(100 + rng.below(8) as i64),
            };
            let date = match p {
                EXTREMES => Some(*rng.pick(&[i32::MIN, i32::MAX, 0])),
                NULLS => None,
                _ => Some(18_000 + rng.below(2000) as i32),
            };
            let source = match p {
                EXTREMES => Some("2020-13-45".to_string()),
                NULLS => None,
                _ => Some(format!("C{}", rng.below(6))),
            };
            d.condition
                .push((Some(p), concept, date, Some(rng.below(5) as i64), source));
        }
        let measurements = match p {
            MANY_ROWS => 30,
            _ => rng.below(4),
        };
        for _ in 0..measurements {
            let value = match p {
                EXTREMES => {
                    Some(*rng.pick(&[f64::INFINITY, f64::NEG_INFINITY, 1e300, -1e300, f64::MAX]))
                }
                NULLS => Some(*rng.pick(&[f64::NAN, f64::NAN])),
                _ => Some(rng.below(700) as f64 - 50.0),
            };
            d.measurement
                .push((Some(p), Some(1 + rng.below(3) as i64), value));
        }
    }
    // Rows that belong to nobody.
    d.condition
        .push((None, Some(100), Some(18_000), Some(1), Some("C1".into())));
    d.measurement.push((None, Some(1), Some(5.0)));
    d
}

impl Data {
    fn without(&self, p: i64) -> Data {
        Data {
            person: self
                .person
                .iter()
                .filter(|r| r.0 != Some(p))
                .cloned()
                .collect(),
            condition: self
                .condition
                .iter()
                .filter(|r| r.0 != Some(p))
                .cloned()
                .collect(),
            measurement: self
                .measurement
                .iter()
                .filter(|r| r.0 != Some(p))
                .cloned()
                .collect(),
        }
    }

    fn context(&self) -> SessionContext {
        // One partition: the tables are tiny, and repartitioning them costs
        // more than the queries.
        let ctx = confer_query::bounding::context_with_config(
            datafusion::prelude::SessionConfig::new().with_target_partitions(1),
        );
        let register = |name: &str, columns: Vec<(&str, ArrayRef)>| {
            let schema = Arc::new(Schema::new(
                columns
                    .iter()
                    .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
                    .collect::<Vec<_>>(),
            ));
            let batch = RecordBatch::try_new(
                schema.clone(),
                columns.into_iter().map(|(_, a)| a).collect(),
            )
            .expect("batch");
            ctx.register_table(
                name,
                Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
            )
            .expect("register");
        };
        let p = &self.person;
        register(
            "person",
            vec![
                (
                    "person_id",
                    Arc::new(Int64Array::from_iter(p.iter().map(|r| r.0))),
                ),
                (
                    "gender_concept_id",
                    Arc::new(Int64Array::from_iter(p.iter().map(|r| r.1))),
                ),
                (
                    "year_of_birth",
                    Arc::new(Int64Array::from_iter(p.iter().map(|r| r.2))),
                ),
                (
                    "care_site_id",
                    Arc::new(Int64Array::from_iter(p.iter().map(|r| r.3))),
                ),
                (
                    "person_source_value",
                    Arc::new(StringArray::from_iter(p.iter().map(|r| r.4.clone()))),
                ),
            ],
        );
        let c = &self.condition;
        register(
            "condition_occurrence",
            vec![
                (
                    "person_id",
                    Arc::new(Int64Array::from_iter(c.iter().map(|r| r.0))),
                ),
                (
                    "condition_concept_id",
                    Arc::new(Int64Array::from_iter(c.iter().map(|r| r.1))),
                ),
                (
                    "condition_start_date",
                    Arc::new(Date32Array::from_iter(c.iter().map(|r| r.2))),
                ),
                (
                    "provider_id",
                    Arc::new(Int64Array::from_iter(c.iter().map(|r| r.3))),
                ),
                (
                    "condition_source_value",
                    Arc::new(StringArray::from_iter(c.iter().map(|r| r.4.clone()))),
                ),
            ],
        );
        let m = &self.measurement;
        register(
            "measurement",
            vec![
                (
                    "person_id",
                    Arc::new(Int64Array::from_iter(m.iter().map(|r| r.0))),
                ),
                (
                    "measurement_concept_id",
                    Arc::new(Int64Array::from_iter(m.iter().map(|r| r.1))),
                ),
                (
                    "value_as_number",
                    Arc::new(Float64Array::from_iter(m.iter().map(|r| r.2))),
                ),
            ],
        );
        let ids: Vec<i64> = (95..115).collect();
        register(
            "concept",
            vec![
                ("concept_id", Arc::new(Int64Array::from(ids.clone()))),
                (
                    "concept_name",
                    Arc::new(StringArray::from_iter_values(
                        ids.iter().map(|i| format!("concept {i}")),
                    )),
                ),
                (
                    "domain_id",
                    Arc::new(StringArray::from_iter_values(
                        ids.iter()
                            .map(|i| if i % 3 == 0 { "Condition" } else { "Drug" }),
                    )),
                ),
            ],
        );
        ctx
    }
}

/// A FROM clause, the unit to count persons by, and columns by kind.
struct Source {
    ctes: &'static str,
    from: &'static str,
    unit: &'static str,
    numbers: &'static [&'static str],
    keys: &'static [&'static str],
    texts: &'static [&'static str],
}

const SOURCES: &[Source] = &[
    Source {
        ctes: "",
        from: "person p",
        unit: "p.person_id",
        numbers: &["p.year_of_birth", "p.care_site_id"],
        keys: &[
            "p.gender_concept_id",
            "p.care_site_id",
            "p.year_of_birth / 10",
        ],
        texts: &["p.person_source_value"],
    },
    Source {
        ctes: "",
        from: "condition_occurrence c",
        unit: "c.person_id",
        numbers: &["c.condition_concept_id", "c.provider_id"],
        keys: &[
            "c.condition_concept_id",
            "c.provider_id",
            "date_part('year', c.condition_start_date)",
        ],
        texts: &["c.condition_source_value"],
    },
    Source {
        ctes: "",
        from: "measurement m",
        unit: "m.person_id",
        numbers: &["m.value_as_number"],
        keys: &["m.measurement_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "person p JOIN condition_occurrence c ON c.person_id = p.person_id",
        unit: "p.person_id",
        numbers: &["p.year_of_birth", "c.condition_concept_id"],
        keys: &["p.gender_concept_id", "c.condition_concept_id"],
        texts: &["c.condition_source_value"],
    },
    Source {
        ctes: "",
        from: "person p LEFT JOIN measurement m ON m.person_id = p.person_id",
        unit: "p.person_id",
        numbers: &["m.value_as_number", "p.year_of_birth"],
        keys: &["p.gender_concept_id", "m.measurement_concept_id"],
        texts: &["p.person_source_value"],
    },
    Source {
        ctes: "",
        from: "condition_occurrence c JOIN concept k ON k.concept_id = c.condition_concept_id",
        unit: "c.person_id",
        numbers: &["k.concept_id"],
        keys: &["k.domain_id", "k.concept_name"],
        texts: &["k.concept_name"],
    },
    Source {
        ctes: "",
        from: "(SELECT person_id, COUNT(*) AS n, MAX(condition_concept_id) AS top FROM condition_occurrence GROUP BY person_id) s",
        unit: "s.person_id",
        numbers: &["s.n", "s.top"],
        keys: &["s.top", "s.n"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT DISTINCT person_id, condition_concept_id FROM condition_occurrence) d",
        unit: "d.person_id",
        numbers: &["d.condition_concept_id"],
        keys: &["d.condition_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT DISTINCT ON (person_id) person_id, condition_concept_id FROM condition_occurrence ORDER BY person_id, condition_start_date) d",
        unit: "d.person_id",
        numbers: &["d.condition_concept_id"],
        keys: &["d.condition_concept_id"],
        texts: &[],
    },
    // Issue 13, shape 1: DISTINCT ON rebinding the unit.
    Source {
        ctes: "",
        from: "(SELECT DISTINCT ON (c.condition_concept_id) k.concept_id AS person_id, c.condition_concept_id FROM condition_occurrence c JOIN concept k ON k.concept_id > 0 ORDER BY c.condition_concept_id) d",
        unit: "d.person_id",
        numbers: &["d.condition_concept_id"],
        keys: &["d.condition_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT DISTINCT ON (condition_concept_id) person_id, condition_concept_id FROM condition_occurrence) d",
        unit: "d.person_id",
        numbers: &["d.condition_concept_id"],
        keys: &["d.condition_concept_id"],
        texts: &[],
    },
    // Issue 13, shape 2: lossy casts of the unit.
    Source {
        ctes: "",
        from: "(SELECT CAST(person_id AS BOOLEAN) AS person_id, condition_concept_id FROM condition_occurrence) b",
        unit: "b.person_id",
        numbers: &["b.condition_concept_id"],
        keys: &["b.condition_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "person p JOIN condition_occurrence c ON CAST(c.person_id AS DOUBLE) * 0 = CAST(p.person_id AS DOUBLE) * 0",
        unit: "p.person_id",
        numbers: &["c.condition_concept_id"],
        keys: &["p.gender_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT CAST(person_id AS BIGINT) AS person_id, value_as_number FROM measurement) w",
        unit: "w.person_id",
        numbers: &["w.value_as_number"],
        keys: &[],
        texts: &[],
    },
    // Public rows kept by one person's rows (a semi join).
    Source {
        ctes: "",
        from: "person p CROSS JOIN (SELECT k.concept_id FROM concept k LEFT SEMI JOIN condition_occurrence c ON c.condition_concept_id = k.concept_id AND c.person_id = 3) s",
        unit: "p.person_id",
        numbers: &["s.concept_id"],
        keys: &["p.gender_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT person_id FROM condition_occurrence UNION SELECT person_id FROM measurement) u",
        unit: "u.person_id",
        numbers: &[],
        keys: &[],
        texts: &[],
    },
    Source {
        ctes: "WITH cohort AS (SELECT person_id FROM condition_occurrence WHERE condition_concept_id = 101) ",
        from: "person p",
        unit: "p.person_id",
        numbers: &["p.year_of_birth"],
        keys: &["p.gender_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "person p JOIN condition_occurrence c ON c.person_id = p.person_id AND c.provider_id > p.care_site_id",
        unit: "p.person_id",
        numbers: &["c.provider_id"],
        keys: &["c.condition_concept_id"],
        texts: &[],
    },
    Source {
        ctes: "",
        from: "(SELECT person_id, year_of_birth FROM person WHERE person_id = 3 OR person_id = 5) x",
        unit: "x.person_id",
        numbers: &["x.year_of_birth"],
        keys: &[],
        texts: &[],
    },
];

/// A WHERE condition for `s` (`{u}` is the unit).
fn condition(rng: &mut Rng, s: &Source) -> String {
    let u = s.unit;
    let number = s.numbers.first().copied().unwrap_or(u);
    let text = s.texts.first().copied();
    let forms: Vec<String> = vec![
        format!("{number} > {}", rng.below(200)),
        format!("{number} IS NOT NULL"),
        format!("{number} BETWEEN 100 AND 2000"),
        format!("{u} IN (SELECT person_id FROM measurement WHERE value_as_number > 100)"),
        format!("{u} IN (SELECT person_id FROM cohort_or_all)"),
        // Issue 13, shape 3: NOT IN over a subquery one person can fill with NULL.
        format!(
            "{u} NOT IN (SELECT c2.person_id FROM person p2 LEFT JOIN condition_occurrence c2 \
             ON c2.person_id = p2.person_id AND c2.condition_concept_id = 101)"
        ),
        format!(
            "{u} NOT IN (SELECT person_id FROM condition_occurrence WHERE condition_concept_id = 102)"
        ),
        format!("NOT ({u} IN (SELECT person_id FROM measurement))"),
        format!("({u} IN (SELECT person_id FROM measurement)) IS NOT TRUE"),
        format!("{u} IN (SELECT CAST(person_id AS BOOLEAN) FROM measurement)"),
        format!("CAST({u} AS BOOLEAN) IN (SELECT CAST(person_id AS BOOLEAN) FROM measurement)"),
        format!("EXISTS (SELECT 1 FROM concept k2 WHERE k2.concept_id = {number})"),
        format!("EXISTS (SELECT 1 FROM measurement m2 WHERE m2.person_id = {u})"),
        format!("{number} = (SELECT MAX(concept_id) FROM concept)"),
        format!("{number} = (SELECT concept_id FROM concept WHERE concept_id > 100)"),
        format!("{number} > (SELECT AVG(year_of_birth) FROM person)"),
        format!("abs({number}) > 10"),
        format!("abs(CAST({number} AS DOUBLE)) > 10"),
        format!("CAST({number} AS VARCHAR) = '3'"),
        format!("{number} / 7 > 2"),
        format!("{number} / {number} > 0"),
        format!("CAST({number} AS DOUBLE) / {number} > 0.5"),
        format!("CASE WHEN {number} > 50 THEN 1 ELSE 0 END = 1"),
        format!("{u} = 3"),
        format!("{u} % 2 = 0"),
        match text {
            Some(t) => format!("{t} LIKE 'C%'"),
            None => format!("{number} < 5000"),
        },
        match text {
            Some(t) => format!("to_timestamp({t}) IS NOT NULL"),
            None => format!("{number} <> 1"),
        },
        match text {
            Some(t) => format!("substr({t}, 1, 1) = 'C'"),
            None => format!("{number} >= 0"),
        },
        match text {
            Some(t) => format!("{t} = 5"),
            None => format!("{number} > -1"),
        },
        match text {
            Some(t) => format!("CAST({t} AS INT) > 0"),
            None => format!("{number} > -2"),
        },
        format!(
            "{u} IN (SELECT person_id FROM condition_occurrence c3 WHERE c3.provider_id = 2 GROUP BY person_id HAVING COUNT(*) > 0)"
        ),
    ];
    rng.pick(&forms).clone()
}

/// An aggregate over `s`.
fn aggregate(rng: &mut Rng, s: &Source) -> String {
    let number = if s.numbers.is_empty() {
        s.unit
    } else {
        *rng.pick(s.numbers)
    };
    let lo = *rng.pick(&[0.0, -100.0, 1900.0, 1e6]);
    let hi = lo + *rng.pick(&[10.0, 200.0, 1e4]);
    let forms = [
        "COUNT(*)".to_string(),
        format!("COUNT({number})"),
        format!("COUNT(DISTINCT {})", s.unit),
        format!("SUM({number}, contribution_bounds_per_group => ({lo}, {hi}))"),
        format!("AVG({number}, contribution_bounds_per_group => ({lo}, {hi}))"),
        format!("VAR_POP({number}, contribution_bounds_per_row => ({lo}, {hi}))"),
        format!("STDDEV_POP({number}, contribution_bounds_per_row => ({lo}, {hi}))"),
        format!("PERCENTILE_CONT({number}, 0.5, contribution_bounds_per_row => ({lo}, {hi}))"),
        format!("SUM({number})"),
        format!("AVG({number})"),
        format!("SUM({number}, contribution_bounds_per_group => (-1e300, 1e300))"),
    ];
    rng.pick(&forms).clone()
}

fn query(rng: &mut Rng) -> String {
    let s = rng.pick(SOURCES);
    let mut options = vec!["epsilon = 1".to_string(), "delta = 1e-6".to_string()];
    if rng.chance(0.7) {
        options.push(format!("max_groups_contributed = {}", 1 + rng.below(4)));
    }
    if rng.chance(0.7) {
        options.push(format!("max_rows_contributed = {}", 1 + rng.below(3)));
    }
    if rng.chance(0.2) {
        options.push("mechanism = 'laplace'".into());
    }
    let mut keys: Vec<String> = Vec::new();
    if !s.keys.is_empty() && rng.chance(0.7) {
        keys.push(rng.pick(s.keys).to_string());
        if rng.chance(0.25) {
            keys.push("site".into());
        }
    }
    let n_aggs = 1 + rng.below(3);
    let aggs: Vec<String> = (0..n_aggs).map(|_| aggregate(rng, s)).collect();
    let mut select: Vec<String> = keys.clone();
    select.extend(aggs.iter().enumerate().map(|(i, a)| format!("{a} AS a{i}")));
    let mut sql = s.ctes.to_string();
    let uses_cohort = rng.chance(0.3);
    let mut where_parts: Vec<String> = Vec::new();
    if rng.chance(0.7) {
        where_parts.push(condition(rng, s));
        if rng.chance(0.3) {
            where_parts.push(condition(rng, s));
        }
    }
    if s.ctes.contains("cohort") {
        where_parts.push(format!("{} IN (SELECT person_id FROM cohort)", s.unit));
    }
    let where_sql = where_parts
        .join(if rng.chance(0.8) { " AND " } else { " OR " })
        .replace(
            "cohort_or_all",
            if uses_cohort && s.ctes.contains("cohort") {
                "cohort"
            } else {
                "condition_occurrence"
            },
        );
    sql.push_str(&format!(
        "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS ({}) {} FROM {}",
        options.join(", "),
        select.join(", "),
        s.from
    ));
    if !where_sql.is_empty() {
        sql.push_str(&format!(" WHERE {where_sql}"));
    }
    if !keys.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", keys.join(", ")));
    }
    sql
}

/// The local query's output: per group key, its partial columns and persons.
type Output = BTreeMap<String, BTreeMap<String, f64>>;

async fn run(ctx: &SessionContext, plan: &FederatedPlan) -> Result<Output, String> {
    let batches = ctx
        .sql(&plan.local_sql)
        .await
        .map_err(|e| format!("plan: {e}"))?
        .collect()
        .await
        .map_err(|e| format!("run: {e}"))?;
    let mut out = Output::new();
    for b in &batches {
        let keys: Vec<ArrayRef> = (0..plan.groups.len())
            .map(|g| {
                cast(
                    b.column_by_name(&format!("__g{g}")).expect("key column"),
                    &DataType::Utf8,
                )
                .expect("key as text")
            })
            .collect();
        let mut columns: Vec<String> = plan
            .partials
            .iter()
            .flat_map(|p| p.columns.iter().cloned())
            .collect();
        columns.push("__persons".into());
        let values: Vec<(String, ArrayRef)> = columns
            .iter()
            .map(|c| {
                (
                    c.clone(),
                    cast(b.column_by_name(c).expect("partial"), &DataType::Float64)
                        .expect("as float"),
                )
            })
            .collect();
        for row in 0..b.num_rows() {
            let key = keys
                .iter()
                .map(|k| {
                    let a = k.as_any().downcast_ref::<StringArray>().expect("text");
                    if a.is_null(row) {
                        "NULL".to_string()
                    } else {
                        a.value(row).to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("|");
            let entry = out.entry(key).or_default();
            for (name, array) in &values {
                let a = array.as_any().downcast_ref::<Float64Array>().expect("f64");
                let v = if a.is_null(row) { 0.0 } else { a.value(row) };
                *entry.entry(name.clone()).or_insert(0.0) += v;
            }
        }
    }
    Ok(out)
}

/// Checks D against D without one person: the declared bounds hold.
fn compare(plan: &FederatedPlan, d: &Output, neighbour: &Output) -> Result<(), String> {
    let keys: BTreeSet<&String> = d.keys().chain(neighbour.keys()).collect();
    let empty = BTreeMap::new();
    let mut moved_groups = 0usize;
    for key in keys {
        let a = d.get(key).unwrap_or(&empty);
        let b = neighbour.get(key).unwrap_or(&empty);
        let value = |m: &BTreeMap<String, f64>, c: &str| m.get(c).copied().unwrap_or(0.0);
        let mut moved = false;
        for spec in &plan.partials {
            let mut l1 = 0.0;
            let mut scale = 0.0f64;
            for c in &spec.columns {
                let (x, y) = (value(a, c), value(b, c));
                if x.is_nan() || y.is_nan() {
                    // NaN partials are saturated to 0 by the release.
                    continue;
                }
                l1 += (x - y).abs();
                scale = scale.max(x.abs()).max(y.abs());
            }
            // Floating-point sums of many terms: a relative tolerance.
            let tolerance = 1e-9 * scale + 1e-9;
            if l1 > spec.per_group_bound + tolerance {
                return Err(format!(
                    "group {key}: partial {:?} moved by {l1} where its per-group bound is {}",
                    spec.columns, spec.per_group_bound
                ));
            }
            if l1 > tolerance {
                moved = true;
            }
        }
        let persons = (value(a, "__persons") - value(b, "__persons")).abs();
        if persons > 1.0 {
            return Err(format!("group {key}: the person count moved by {persons}"));
        }
        if moved || persons > 0.0 {
            moved_groups += 1;
        }
    }
    if moved_groups > plan.max_groups {
        return Err(format!(
            "{moved_groups} groups moved where a person may reach {}",
            plan.max_groups
        ));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_query_keeps_its_declared_sensitivity() {
    let count: usize = std::env::var("CONFER_AUDIT_QUERIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("CONFER_AUDIT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(13);
    let catalog = catalog();
    let mut data_rng = Rng(seed ^ 0xDA7A);
    let data = dataset(&mut data_rng);
    let d = data.context();
    let mut removed = vec![MANY_GROUPS, MANY_ROWS, LISTED_TWICE, NULLS, EXTREMES];
    removed.push(17 + data_rng.below(20) as i64);
    let neighbours: Vec<(i64, SessionContext)> = removed
        .iter()
        .map(|&p| (p, data.without(p).context()))
        .collect();

    let (mut accepted, mut refused) = (0usize, 0usize);
    let (mut compiling, mut running) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    let mut refusals: BTreeMap<String, usize> = BTreeMap::new();
    let mut violations = Vec::new();
    for i in 0..count {
        let query_seed = seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
        let mut rng = Rng(query_seed);
        let sql = query(&mut rng);
        let Ok(Statement::Query(parsed)) = parse(&sql) else {
            refused += 1;
            continue;
        };
        // No table is trusted to hold one row per person: the auditor's
        // data lists a person twice in such a table, and the query must
        // enforce it.
        let options = CompileOptions {
            sampling_salt: Some(query_seed),
            ..Default::default()
        };
        let started = std::time::Instant::now();
        let compiled = compile_with(&parsed, &catalog, Some("site-a"), &options).await;
        compiling += started.elapsed();
        let started = std::time::Instant::now();
        let plan = match compiled {
            Ok(p) => p,
            Err(e) => {
                refused += 1;
                let text = e.to_string();
                *refusals.entry(text.chars().take(60).collect()).or_default() += 1;
                continue;
            }
        };
        accepted += 1;
        let base = match run(&d, &plan).await {
            Ok(o) => o,
            Err(e) => {
                violations.push(format!("seed {query_seed}: {sql}\n    fails on D: {e}"));
                continue;
            }
        };
        let tasks: Vec<_> = neighbours
            .iter()
            .map(|(p, ctx)| {
                let (p, ctx, plan) = (*p, ctx.clone(), plan.clone());
                tokio::spawn(async move { (p, run(&ctx, &plan).await) })
            })
            .collect();
        for task in tasks {
            let (p, output) = task.await.expect("auditor task");
            let result = match output {
                Ok(o) => compare(&plan, &base, &o),
                Err(e) => Err(format!("fails without person {p}: {e}")),
            };
            if let Err(why) = result {
                violations.push(format!(
                    "seed {query_seed}, person {p} removed: {sql}\n    {why}"
                ));
                break;
            }
        }
        running += started.elapsed();
    }
    println!("compiling {compiling:?}, running {running:?}");
    println!(
        "sensitivity auditor: {count} queries generated, {accepted} accepted, {refused} refused, {} violations",
        violations.len()
    );
    for (why, n) in &refusals {
        println!("  refused {n:>4} x  {why}");
    }
    assert!(
        violations.is_empty(),
        "{} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
    assert!(
        accepted >= count / 5,
        "only {accepted} of {count} generated queries were accepted: the grammar no longer exercises the compiler"
    );
}
