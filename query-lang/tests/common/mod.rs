//! The catalog the dialect's tests compile against: an OMOP-like person,
//! condition and measurement table, and a public vocabulary.

use confer_protocol::catalog::{
    CatalogInfo, ColumnInfo, ColumnType, Domain, DomainValue, TableInfo,
};

pub fn col(name: &str, ty: ColumnType) -> ColumnInfo {
    ColumnInfo {
        name: name.into(),
        column_type: ty,
        bounds: None,
        domain: None,
        unique: false,
    }
}

/// The tables each site publishes: an OMOP-like person, condition and
/// measurement table, and a public vocabulary.
pub fn catalog_info(node: &str) -> CatalogInfo {
    let int = ColumnType::Int64;
    let mut gender = col("gender_concept_id", int);
    gender.domain = Some(Domain::Values {
        values: vec![DomainValue::Int(8507), DomainValue::Int(8532)],
    });
    let mut year = col("year_of_birth", int);
    year.bounds = Some((1900.0, 2030.0));
    let person = TableInfo {
        name: "person".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("person_id", int),
            gender,
            year,
            col("care_site_id", int),
        ],
        one_row_per_unit: true,
    };
    let condition = TableInfo {
        name: "condition_occurrence".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("condition_occurrence_id", int),
            col("person_id", int),
            col("condition_concept_id", int),
            col("provider_id", int),
            col("condition_start_date", ColumnType::Date),
        ],
        one_row_per_unit: false,
    };
    let mut value = col("value_as_number", ColumnType::Float64);
    value.bounds = Some((0.0, 200.0));
    let mut unit = col("unit_concept_id", int);
    unit.domain = Some(Domain::Values {
        values: vec![DomainValue::Int(8840), DomainValue::Int(8713)],
    });
    let measurement = TableInfo {
        name: "measurement".into(),
        privacy_unit: Some("person_id".into()),
        columns: vec![
            col("measurement_id", int),
            col("person_id", int),
            col("measurement_concept_id", int),
            value,
            unit,
        ],
        one_row_per_unit: false,
    };
    let concept = TableInfo {
        name: "concept".into(),
        privacy_unit: None,
        columns: vec![
            col("concept_id", int),
            col("concept_name", ColumnType::Utf8),
        ],
        one_row_per_unit: false,
    };
    CatalogInfo {
        node: node.into(),
        tables: vec![concept, condition, measurement, person],
    }
}
