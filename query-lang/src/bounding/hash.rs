//! `confer_hash(salt, v1, v2, ...)`: a keyed 64-bit hash of a row's values,
//! computed once per row over Arrow arrays (no text formatting).
//!
//! The local bounded query orders each person's groups (and, for the
//! sensitivity auditor, each person's rows) by this hash keyed with a salt
//! drawn per task from the OS. The choice it makes is a function of the
//! person's own values and the salt only, so removing one person changes
//! no other person's choice. It is not a cryptographic PRF and need not
//! be: privacy rests on the bounds, not on which rows are kept.
//!
//! Values are absorbed by type: integers, dates and timestamps as their
//! 64-bit value, floats as their bits (with -0.0 read as 0.0 and every NaN
//! as one NaN), text as its bytes and length, anything else as its text
//! form. NULL is a value of its own. The function never fails and never
//! returns NULL.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Int64Array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result, plan_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// The function's SQL name.
pub const NAME: &str = "confer_hash";

/// The scalar function, to register in a session.
pub fn udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(ConferHash {
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ConferHash {
    signature: Signature,
}

impl ScalarUDFImpl for ConferHash {
    fn name(&self) -> &str {
        NAME
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        if arg_types.is_empty() {
            return plan_err!("{NAME} needs at least one argument");
        }
        Ok(DataType::Int64)
    }

    fn is_nullable(
        &self,
        _args: &[datafusion::logical_expr::Expr],
        _schema: &dyn datafusion::common::ExprSchema,
    ) -> bool {
        false
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        let all_scalar = args
            .args
            .iter()
            .all(|a| matches!(a, ColumnarValue::Scalar(_)));
        let n = if all_scalar { 1 } else { rows };
        let mut state = vec![SEED; n];
        for arg in &args.args {
            let array = match arg {
                ColumnarValue::Array(a) => Arc::clone(a),
                ColumnarValue::Scalar(s) => {
                    // A constant (the salt): absorbed once, then applied
                    // to every row.
                    let mut one = [SEED];
                    match s.to_array_of_size(1) {
                        Ok(a) => absorb_array(&a, &mut one),
                        Err(_) => one[0] = absorb(one[0], NULL_WORD),
                    }
                    for h in state.iter_mut() {
                        *h = absorb(*h, one[0]);
                    }
                    continue;
                }
            };
            absorb_array(&array, &mut state);
        }
        let out: Int64Array = state.into_iter().map(|h| finish(h) as i64).collect();
        if all_scalar {
            return Ok(ColumnarValue::Scalar(
                datafusion::common::ScalarValue::try_from_array(&out, 0)?,
            ));
        }
        Ok(ColumnarValue::Array(Arc::new(out)))
    }
}

const SEED: u64 = 0x243F_6A88_85A3_08D3;
const K1: u64 = 0x9E37_79B9_7F4A_7C15;
const K2: u64 = 0x1319_8A2E_0370_7344;
/// What a NULL absorbs.
const NULL_WORD: u64 = 0xA409_3822_299F_31D0;

/// The high and low halves of a 128-bit product, folded.
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = (a as u128).wrapping_mul(b as u128);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline]
fn absorb(h: u64, v: u64) -> u64 {
    fold(h ^ v ^ K1, h.rotate_left(29) ^ K2)
}

/// MurmurHash3's finaliser: every input bit reaches every output bit.
#[inline]
fn finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

fn absorb_bytes(mut h: u64, bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = absorb(h, u64::from_le_bytes(w));
    }
    let rest = chunks.remainder();
    let mut w = [0u8; 8];
    w[..rest.len()].copy_from_slice(rest);
    h = absorb(h, u64::from_le_bytes(w));
    absorb(h, bytes.len() as u64)
}

/// Absorbs one column into each row's state. Never fails: a column the
/// hash cannot read by value (no type reaching the local query today)
/// contributes whether each row is NULL.
fn absorb_array(array: &ArrayRef, state: &mut [u64]) {
    if try_absorb(array, state).is_err() {
        for (i, h) in state.iter_mut().enumerate() {
            *h = absorb(
                *h,
                if array.is_null(i) {
                    NULL_WORD
                } else {
                    !NULL_WORD
                },
            );
        }
    }
}

/// [`absorb_array`]; on error `state` is untouched (each cast comes first).
fn try_absorb(array: &ArrayRef, state: &mut [u64]) -> Result<()> {
    let kind = |t: &DataType| match t {
        DataType::Boolean
        | DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64
        | DataType::Date32
        | DataType::Date64
        | DataType::Time32(_)
        | DataType::Time64(_)
        | DataType::Timestamp(_, _)
        | DataType::Duration(_) => 0,
        DataType::Float16 | DataType::Float32 | DataType::Float64 => 1,
        _ => 2,
    };
    match kind(array.data_type()) {
        0 => {
            // UInt64 above i64::MAX wraps: still one value per input.
            let ints = match array.data_type() {
                DataType::UInt64 => reinterpret_u64(array),
                DataType::Int64 => Arc::clone(array),
                _ => cast(array, &DataType::Int64)?,
            };
            let ints = ints.as_primitive::<Int64Type>();
            for (i, h) in state.iter_mut().enumerate() {
                let v = if ints.is_null(i) {
                    NULL_WORD
                } else {
                    ints.value(i) as u64
                };
                *h = absorb(*h, v);
            }
        }
        1 => {
            let floats = cast(array, &DataType::Float64)?;
            let floats = floats.as_primitive::<Float64Type>();
            for (i, h) in state.iter_mut().enumerate() {
                let v = if floats.is_null(i) {
                    NULL_WORD
                } else {
                    let x = floats.value(i);
                    if x.is_nan() {
                        f64::NAN.to_bits()
                    } else if x == 0.0 {
                        0
                    } else {
                        x.to_bits()
                    }
                };
                *h = absorb(*h, v);
            }
        }
        _ => {
            let text = cast(array, &DataType::Utf8)?;
            let text = text.as_string::<i32>();
            for (i, h) in state.iter_mut().enumerate() {
                *h = if text.is_null(i) {
                    absorb(*h, NULL_WORD)
                } else {
                    absorb_bytes(*h, text.value(i).as_bytes())
                };
            }
        }
    }
    Ok(())
}

/// A UInt64 column's bits as Int64 (the checked cast refuses values above
/// i64::MAX).
fn reinterpret_u64(array: &ArrayRef) -> ArrayRef {
    let u = array.as_primitive::<arrow::datatypes::UInt64Type>();
    let i: Int64Array = u.iter().map(|v| v.map(|v| v as i64)).collect();
    Arc::new(i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float64Array, StringArray};

    fn hash(columns: &[ArrayRef]) -> Vec<u64> {
        let mut state = vec![SEED; columns[0].len()];
        for c in columns {
            absorb_array(c, &mut state);
        }
        state.into_iter().map(finish).collect()
    }

    #[test]
    fn equal_rows_hash_equal_and_the_salt_changes_everything() {
        let a: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), Some(1), None, Some(2)]));
        let s: ArrayRef = Arc::new(StringArray::from(vec![
            Some("x"),
            Some("x"),
            None,
            Some("x"),
        ]));
        let h = hash(&[a.clone(), s.clone()]);
        assert_eq!(h[0], h[1]);
        assert_ne!(h[0], h[2]);
        assert_ne!(h[0], h[3]);
        let salt: ArrayRef = Arc::new(Int64Array::from(vec![7; 4]));
        let salted = hash(&[salt, a, s]);
        assert!(salted.iter().zip(&h).all(|(x, y)| x != y));
    }

    #[test]
    fn every_column_hashes_without_error() {
        let list: ArrayRef = Arc::new(arrow::array::ListArray::from_iter_primitive::<
            Int64Type,
            _,
            _,
        >(vec![Some(vec![Some(1)]), None]));
        let h = hash(&[list]);
        assert_ne!(h[0], h[1]);
    }

    #[test]
    fn floats_read_zero_and_nan_as_one_value() {
        let f: ArrayRef = Arc::new(Float64Array::from(vec![0.0, -0.0, f64::NAN, -f64::NAN]));
        let h = hash(&[f]);
        assert_eq!(h[0], h[1]);
        assert_eq!(h[2], h[3]);
    }

    #[test]
    fn the_hash_spreads_small_integers_evenly() {
        // Consecutive ids under one salt: each of the 64 bits is set in
        // about half of 100,000 hashes (binomial sd 158; 6 sd = 950).
        let ids: ArrayRef = Arc::new(Int64Array::from_iter_values(0..100_000));
        let salt: ArrayRef = Arc::new(Int64Array::from(vec![12345; 100_000]));
        let h = hash(&[salt, ids]);
        for bit in 0..64 {
            let ones = h.iter().filter(|v| (*v >> bit) & 1 == 1).count() as i64;
            assert!((ones - 50_000).abs() < 950, "bit {bit}: {ones}");
        }
        let distinct: std::collections::HashSet<_> = h.iter().collect();
        assert_eq!(distinct.len(), 100_000);
    }
}
