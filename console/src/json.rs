//! Arrow batches as JSON: `{"columns": [{"name", "type"}], "rows": [[...]],
//! "metadata": {...}}`. Numbers stay numbers (NaN and infinities become
//! null), booleans booleans, everything else its Arrow text form.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::{Map, Value, json};

fn column(array: &dyn Array) -> Result<Vec<Value>, String> {
    let n = array.len();
    let dt = array.data_type();
    let out = if dt.is_integer() && *dt != DataType::UInt64 {
        let a = cast(array, &DataType::Int64).map_err(|e| e.to_string())?;
        let a = a.as_primitive::<Int64Type>();
        (0..n)
            .map(|i| {
                if a.is_null(i) {
                    Value::Null
                } else {
                    json!(a.value(i))
                }
            })
            .collect()
    } else if dt.is_numeric() {
        let a = cast(array, &DataType::Float64).map_err(|e| e.to_string())?;
        let a = a.as_primitive::<Float64Type>();
        (0..n)
            .map(|i| {
                if a.is_null(i) {
                    Value::Null
                } else {
                    serde_json::Number::from_f64(a.value(i)).map_or(Value::Null, Value::Number)
                }
            })
            .collect()
    } else if *dt == DataType::Boolean {
        let a = array.as_boolean();
        (0..n)
            .map(|i| {
                if a.is_null(i) {
                    Value::Null
                } else {
                    Value::Bool(a.value(i))
                }
            })
            .collect()
    } else {
        let f =
            ArrayFormatter::try_new(array, &FormatOptions::default()).map_err(|e| e.to_string())?;
        (0..n)
            .map(|i| {
                if array.is_null(i) {
                    Value::Null
                } else {
                    Value::String(f.value(i).to_string())
                }
            })
            .collect()
    };
    Ok(out)
}

/// The rows of `batches` (all of `schema`) as JSON.
pub fn table(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Value, String> {
    let columns: Vec<Value> = schema
        .fields()
        .iter()
        .map(|f| json!({"name": f.name(), "type": f.data_type().to_string()}))
        .collect();
    let mut rows: Vec<Value> = Vec::new();
    for b in batches {
        let cols = b
            .columns()
            .iter()
            .map(|c| column(c.as_ref()))
            .collect::<Result<Vec<_>, _>>()?;
        for i in 0..b.num_rows() {
            rows.push(Value::Array(cols.iter().map(|c| c[i].clone()).collect()));
        }
    }
    let metadata: Map<String, Value> = schema
        .metadata()
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    Ok(json!({"columns": columns, "rows": rows, "metadata": metadata}))
}

/// The rows of `batches` as objects keyed by column name.
pub fn records(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<Map<String, Value>>, String> {
    let t = table(schema, batches)?;
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    Ok(t["rows"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    names
                        .iter()
                        .cloned()
                        .zip(r.as_array().cloned().unwrap_or_default())
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{BooleanArray, Float64Array, Int32Array, StringArray};
    use arrow::datatypes::{Field, Schema};

    use super::*;

    #[test]
    fn types_and_nulls() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("n", DataType::Int32, true),
            Field::new("x", DataType::Float64, true),
            Field::new("s", DataType::Utf8, true),
            Field::new("b", DataType::Boolean, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int32Array::from(vec![Some(1), None])),
                Arc::new(Float64Array::from(vec![Some(0.5), Some(f64::NAN)])),
                Arc::new(StringArray::from(vec![Some("a"), None])),
                Arc::new(BooleanArray::from(vec![Some(true), None])),
            ],
        )
        .expect("batch");
        let t = table(&schema, std::slice::from_ref(&batch)).expect("json");
        assert_eq!(
            t["rows"],
            json!([[1, 0.5, "a", true], [null, null, null, null]])
        );
        assert_eq!(t["columns"][0], json!({"name": "n", "type": "Int32"}));
        let r = records(&schema, &[batch]).expect("records");
        assert_eq!(r[0]["s"], json!("a"));
    }
}
