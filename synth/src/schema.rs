//! Arrow schemas and row buffers for the OMOP CDM 5.4 tables the generator
//! writes.
//!
//! Column names, order and types follow `confer_node::omop` exactly (a test
//! checks it): integers are Int64, floats Float64, dates Date32, datetimes
//! Timestamp(Microsecond, None) and text Utf8. Columns the CDM requires are
//! declared non-nullable, so a batch with a missing required value cannot be
//! built.
//!
//! Each table has a row struct (`Person`, ...) whose required fields are plain
//! values and whose optional fields are `Option`s, and a buffer (`PersonBuf`,
//! ...) that appends rows to Arrow builders and hands out record batches.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use datafusion::arrow::array::{
    ArrayRef, Date32Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

/// Text values: mostly static strings, owned where built per row.
pub(crate) type Text = Cow<'static, str>;

macro_rules! col_ty {
    (I, req) => { i64 };
    (I, opt) => { Option<i64> };
    (F, req) => { f64 };
    (F, opt) => { Option<f64> };
    (S, req) => { Text };
    (S, opt) => { Option<Text> };
    (D, req) => { i32 };
    (D, opt) => { Option<i32> };
    (T, req) => { i64 };
    (T, opt) => { Option<i64> };
}

macro_rules! builder_ty {
    (I) => {
        Int64Builder
    };
    (F) => {
        Float64Builder
    };
    (S) => {
        StringBuilder
    };
    (D) => {
        Date32Builder
    };
    (T) => {
        TimestampMicrosecondBuilder
    };
}

macro_rules! data_ty {
    (I) => {
        DataType::Int64
    };
    (F) => {
        DataType::Float64
    };
    (S) => {
        DataType::Utf8
    };
    (D) => {
        DataType::Date32
    };
    (T) => {
        DataType::Timestamp(TimeUnit::Microsecond, None)
    };
}

macro_rules! new_builder {
    (S, $n:expr) => {
        StringBuilder::with_capacity($n, $n * 8)
    };
    (I, $n:expr) => {
        Int64Builder::with_capacity($n)
    };
    (F, $n:expr) => {
        Float64Builder::with_capacity($n)
    };
    (D, $n:expr) => {
        Date32Builder::with_capacity($n)
    };
    (T, $n:expr) => {
        TimestampMicrosecondBuilder::with_capacity($n)
    };
}

macro_rules! nullable {
    (req) => {
        false
    };
    (opt) => {
        true
    };
}

macro_rules! push_col {
    ($b:expr, $v:expr, S, req) => {
        $b.append_value(&$v)
    };
    ($b:expr, $v:expr, S, opt) => {
        $b.append_option($v.as_deref())
    };
    ($b:expr, $v:expr, $k:ident, req) => {
        $b.append_value($v)
    };
    ($b:expr, $v:expr, $k:ident, opt) => {
        $b.append_option($v)
    };
}

macro_rules! tables {
    ($( $Row:ident / $Buf:ident = $name:literal { $($col:ident : $k:ident $r:ident),* $(,)? } )*) => {
        $(
            #[doc = concat!("One row of `", $name, "`.")]
            #[derive(Debug, Clone, Default, PartialEq)]
            pub(crate) struct $Row {
                $(
                    #[doc = concat!("`", stringify!($col), "`")]
                    pub(crate) $col: col_ty!($k, $r),
                )*
            }

            #[doc = concat!("Rows of `", $name, "` on their way to a record batch.")]
            pub(crate) struct $Buf {
                len: usize,
                $($col: builder_ty!($k),)*
            }

            impl $Buf {
                /// The table's name.
                pub(crate) const NAME: &'static str = $name;

                /// An empty buffer with room for `rows` rows.
                pub(crate) fn with_capacity(rows: usize) -> Self {
                    Self { len: 0, $($col: new_builder!($k, rows),)* }
                }

                /// The table's Arrow schema.
                pub(crate) fn schema() -> SchemaRef {
                    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
                    SCHEMA
                        .get_or_init(|| {
                            Arc::new(Schema::new(vec![
                                $(Field::new(stringify!($col), data_ty!($k), nullable!($r)),)*
                            ]))
                        })
                        .clone()
                }

                /// Appends one row.
                pub(crate) fn push(&mut self, row: $Row) {
                    $(push_col!(self.$col, row.$col, $k, $r);)*
                    self.len += 1;
                }

                /// Rows appended since the last batch.
                #[allow(dead_code)] // the public tables are built in one go
                pub(crate) fn len(&self) -> usize {
                    self.len
                }

                /// The rows appended so far, as a batch; the buffer is empty after.
                pub(crate) fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
                    let columns: Vec<ArrayRef> = vec![$(Arc::new(self.$col.finish()),)*];
                    self.len = 0;
                    RecordBatch::try_new(Self::schema(), columns)
                }
            }
        )*
    };
}

tables! {
    Person / PersonBuf = "person" {
        person_id: I req,
        gender_concept_id: I req,
        year_of_birth: I req,
        month_of_birth: I opt,
        day_of_birth: I opt,
        birth_datetime: T opt,
        race_concept_id: I req,
        ethnicity_concept_id: I req,
        location_id: I opt,
        provider_id: I opt,
        care_site_id: I opt,
        person_source_value: S opt,
        gender_source_value: S opt,
        gender_source_concept_id: I opt,
        race_source_value: S opt,
        race_source_concept_id: I opt,
        ethnicity_source_value: S opt,
        ethnicity_source_concept_id: I opt,
    }
    ObservationPeriod / ObservationPeriodBuf = "observation_period" {
        observation_period_id: I req,
        person_id: I req,
        observation_period_start_date: D req,
        observation_period_end_date: D req,
        period_type_concept_id: I req,
    }
    VisitOccurrence / VisitOccurrenceBuf = "visit_occurrence" {
        visit_occurrence_id: I req,
        person_id: I req,
        visit_concept_id: I req,
        visit_start_date: D req,
        visit_start_datetime: T opt,
        visit_end_date: D req,
        visit_end_datetime: T opt,
        visit_type_concept_id: I req,
        provider_id: I opt,
        care_site_id: I opt,
        visit_source_value: S opt,
        visit_source_concept_id: I opt,
        admitted_from_concept_id: I opt,
        admitted_from_source_value: S opt,
        discharged_to_concept_id: I opt,
        discharged_to_source_value: S opt,
        admitting_source_concept_id: I opt,
        admitting_source_value: S opt,
        discharge_to_concept_id: I opt,
        discharge_to_source_value: S opt,
        preceding_visit_occurrence_id: I opt,
    }
    ConditionOccurrence / ConditionOccurrenceBuf = "condition_occurrence" {
        condition_occurrence_id: I req,
        person_id: I req,
        condition_concept_id: I req,
        condition_start_date: D req,
        condition_start_datetime: T opt,
        condition_end_date: D opt,
        condition_end_datetime: T opt,
        condition_type_concept_id: I req,
        condition_status_concept_id: I opt,
        stop_reason: S opt,
        provider_id: I opt,
        visit_occurrence_id: I opt,
        visit_detail_id: I opt,
        condition_source_value: S opt,
        condition_source_concept_id: I opt,
        condition_status_source_value: S opt,
    }
    DrugExposure / DrugExposureBuf = "drug_exposure" {
        drug_exposure_id: I req,
        person_id: I req,
        drug_concept_id: I req,
        drug_exposure_start_date: D req,
        drug_exposure_start_datetime: T opt,
        drug_exposure_end_date: D req,
        drug_exposure_end_datetime: T opt,
        verbatim_end_date: D opt,
        drug_type_concept_id: I req,
        stop_reason: S opt,
        refills: I opt,
        quantity: F opt,
        days_supply: I opt,
        sig: S opt,
        route_concept_id: I opt,
        lot_number: S opt,
        provider_id: I opt,
        visit_occurrence_id: I opt,
        visit_detail_id: I opt,
        drug_source_value: S opt,
        drug_source_concept_id: I opt,
        route_source_value: S opt,
        dose_unit_source_value: S opt,
    }
    ProcedureOccurrence / ProcedureOccurrenceBuf = "procedure_occurrence" {
        procedure_occurrence_id: I req,
        person_id: I req,
        procedure_concept_id: I req,
        procedure_date: D req,
        procedure_datetime: T opt,
        procedure_end_date: D opt,
        procedure_end_datetime: T opt,
        procedure_type_concept_id: I req,
        modifier_concept_id: I opt,
        quantity: I opt,
        provider_id: I opt,
        visit_occurrence_id: I opt,
        visit_detail_id: I opt,
        procedure_source_value: S opt,
        procedure_source_concept_id: I opt,
        modifier_source_value: S opt,
    }
    Measurement / MeasurementBuf = "measurement" {
        measurement_id: I req,
        person_id: I req,
        measurement_concept_id: I req,
        measurement_date: D req,
        measurement_datetime: T opt,
        measurement_time: S opt,
        measurement_type_concept_id: I req,
        operator_concept_id: I opt,
        value_as_number: F opt,
        value_as_concept_id: I opt,
        unit_concept_id: I opt,
        range_low: F opt,
        range_high: F opt,
        provider_id: I opt,
        visit_occurrence_id: I opt,
        visit_detail_id: I opt,
        measurement_source_value: S opt,
        measurement_source_concept_id: I opt,
        unit_source_value: S opt,
        unit_source_concept_id: I opt,
        value_source_value: S opt,
        measurement_event_id: I opt,
        meas_event_field_concept_id: I opt,
    }
    Death / DeathBuf = "death" {
        person_id: I req,
        death_date: D req,
        death_datetime: T opt,
        death_type_concept_id: I opt,
        cause_concept_id: I opt,
        cause_source_value: S opt,
        cause_source_concept_id: I opt,
    }
    Cost / CostBuf = "cost" {
        cost_id: I req,
        cost_event_id: I req,
        cost_domain_id: S req,
        cost_type_concept_id: I req,
        currency_concept_id: I opt,
        total_charge: F opt,
        total_cost: F opt,
        total_paid: F opt,
        paid_by_payer: F opt,
        paid_by_patient: F opt,
        paid_patient_copay: F opt,
        paid_patient_coinsurance: F opt,
        paid_patient_deductible: F opt,
        paid_by_primary: F opt,
        paid_ingredient_cost: F opt,
        paid_dispensing_fee: F opt,
        payer_plan_period_id: I opt,
        amount_allowed: F opt,
        revenue_code_concept_id: I opt,
        revenue_code_source_value: S opt,
        drg_concept_id: I opt,
        drg_source_value: S opt,
        person_id: I opt,
    }
    Location / LocationBuf = "location" {
        location_id: I req,
        address_1: S opt,
        address_2: S opt,
        city: S opt,
        state: S opt,
        zip: S opt,
        county: S opt,
        location_source_value: S opt,
        country_concept_id: I opt,
        country_source_value: S opt,
        latitude: F opt,
        longitude: F opt,
    }
    CareSite / CareSiteBuf = "care_site" {
        care_site_id: I req,
        care_site_name: S opt,
        place_of_service_concept_id: I opt,
        location_id: I opt,
        care_site_source_value: S opt,
        place_of_service_source_value: S opt,
    }
    Provider / ProviderBuf = "provider" {
        provider_id: I req,
        provider_name: S opt,
        npi: S opt,
        dea: S opt,
        specialty_concept_id: I opt,
        care_site_id: I opt,
        year_of_birth: I opt,
        gender_concept_id: I opt,
        provider_source_value: S opt,
        specialty_source_value: S opt,
        specialty_source_concept_id: I opt,
        gender_source_value: S opt,
        gender_source_concept_id: I opt,
    }
    Concept / ConceptBuf = "concept" {
        concept_id: I req,
        concept_name: S req,
        domain_id: S req,
        vocabulary_id: S req,
        concept_class_id: S req,
        standard_concept: S opt,
        concept_code: S req,
        valid_start_date: D req,
        valid_end_date: D req,
        invalid_reason: S opt,
    }
    ConceptAncestor / ConceptAncestorBuf = "concept_ancestor" {
        ancestor_concept_id: I req,
        descendant_concept_id: I req,
        min_levels_of_separation: I req,
        max_levels_of_separation: I req,
    }
}
