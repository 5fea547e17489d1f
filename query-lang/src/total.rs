//! Expressions that cannot fail on a row: the allowlist of functions,
//! casts and operators a DP query or a feature query may use.
//!
//! Whether a query fails while it runs is a fact about the rows that no
//! noise hides: a conversion that fails on one person's value tells the
//! researcher that such a value exists. So every expression of the query a
//! node runs (the local bounded query, CTEs and subqueries included) is
//! checked, after DataFusion's type coercion so that the casts it adds are
//! seen too, against these rules:
//!
//! * an expression that reads no column (a constant: `DATE '2024-01-01'`,
//!   `to_timestamp('2024-01-01')`, `1 + 2`) is evaluated here, once; it is
//!   accepted if that succeeds;
//! * a cast must be total for its types ([`cast_is_total`]): widening
//!   numbers, numbers to text, text between its encodings. Casts the
//!   researcher writes are compiled to `TRY_CAST`, which gives NULL instead
//!   of failing; a cast that DataFusion adds itself to compare a text
//!   column with a number fails on text that is not a number, and is
//!   refused with what to write instead;
//! * arithmetic: `+ - *` on integers wrap and on floats give infinities,
//!   never an error; `/` and `%` on floats likewise. On integers, `/` and
//!   `%` need a constant divisor other than 0 and -1 (`i64::MIN / -1`
//!   overflows);
//! * `LIKE`, `SIMILAR TO` and the regular-expression operators need a
//!   constant pattern, checked here;
//! * a scalar function must be in [`FUNCTIONS`], with its rule; an
//!   aggregate in [`AGGREGATES`]; a window function in [`WINDOW_FUNCTIONS`];
//! * a scalar subquery must return at most one row by its shape (an
//!   aggregate without GROUP BY, or LIMIT 1): otherwise DataFusion fails
//!   when it returns two.
//!
//! Everything else is refused, naming the expression. The tests in this
//! module run every function of the list, every cast declared total and
//! every operator over adversarial values (extreme integers, NaN,
//! infinities, empty and long text, extreme dates, NULLs) and fail if any
//! of them errs: the list is proven, not assumed.

use std::sync::Arc;

use datafusion::arrow::array::{RecordBatch, RecordBatchOptions};
use datafusion::arrow::compute::can_cast_types;
use datafusion::arrow::datatypes::{DataType, Schema};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::logical_expr::{
    Expr, ExprSchemable, LogicalPlan, Operator, expr::WindowFunctionDefinition,
};
use datafusion::prelude::SessionContext;

use crate::error::{QueryError, Result};

/// How a scalar function may be called on values read from rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Never fails, whatever its (type-checked) arguments.
    Total,
    /// Never fails on floating-point arguments; an integer argument may
    /// overflow (`abs(i64::MIN)`), so integer arguments must be cast to
    /// DOUBLE first.
    Float,
    /// The arguments at these positions must be constants; integer
    /// constants between -10,000 and 10,000 (output sizes stay bounded). The
    /// call is tried once here with the constants and neutral values for the
    /// other arguments, so an invalid pattern or a negative length is
    /// refused before anything runs.
    Constants(&'static [usize]),
    /// Only on arguments that are not text (parsing text fails on text
    /// that does not parse).
    NotText,
    /// [`Rule::Constants`] at these positions, and floating-point values
    /// elsewhere (integer results can overflow).
    FloatConstants(&'static [usize]),
}

/// Scalar functions accepted on values read from rows, and how.
pub const FUNCTIONS: &[(&str, Rule)] = &[
    // Conditionals.
    ("coalesce", Rule::Total),
    ("nullif", Rule::Total),
    ("nvl", Rule::Total),
    ("ifnull", Rule::Total),
    ("nvl2", Rule::Total),
    ("greatest", Rule::Total),
    ("least", Rule::Total),
    // Mathematics.
    ("abs", Rule::Float),
    ("ceil", Rule::Float),
    ("floor", Rule::Float),
    ("trunc", Rule::FloatConstants(&[1])),
    ("round", Rule::FloatConstants(&[1])),
    ("signum", Rule::Float),
    ("cbrt", Rule::Float),
    ("exp", Rule::Float),
    ("ln", Rule::Float),
    ("log", Rule::Float),
    ("log2", Rule::Float),
    ("log10", Rule::Float),
    ("sin", Rule::Float),
    ("cos", Rule::Float),
    ("tan", Rule::Float),
    ("asin", Rule::Float),
    ("acos", Rule::Float),
    ("atan", Rule::Float),
    ("atan2", Rule::Float),
    ("sinh", Rule::Float),
    ("cosh", Rule::Float),
    ("tanh", Rule::Float),
    ("asinh", Rule::Float),
    ("acosh", Rule::Float),
    ("atanh", Rule::Float),
    ("cot", Rule::Float),
    ("degrees", Rule::Float),
    ("radians", Rule::Float),
    ("isnan", Rule::Float),
    ("iszero", Rule::Float),
    ("nanvl", Rule::Float),
    ("random", Rule::Total),
    // Text.
    ("lower", Rule::Total),
    ("upper", Rule::Total),
    ("btrim", Rule::Total),
    ("ltrim", Rule::Total),
    ("rtrim", Rule::Total),
    ("length", Rule::Total),
    ("char_length", Rule::Total),
    ("character_length", Rule::Total),
    ("octet_length", Rule::Total),
    ("bit_length", Rule::Total),
    ("concat", Rule::Total),
    ("concat_ws", Rule::Total),
    ("reverse", Rule::Total),
    ("strpos", Rule::Total),
    ("instr", Rule::Total),
    ("starts_with", Rule::Total),
    ("ends_with", Rule::Total),
    ("contains", Rule::Total),
    ("initcap", Rule::Total),
    ("ascii", Rule::Total),
    ("md5", Rule::Total),
    // The local bounded query's keyed hash (see `crate::bounding::hash`).
    (crate::bounding::hash::NAME, Rule::Total),
    ("sha224", Rule::Total),
    ("sha256", Rule::Total),
    ("sha384", Rule::Total),
    ("sha512", Rule::Total),
    ("to_hex", Rule::Total),
    ("left", Rule::Constants(&[1])),
    ("right", Rule::Constants(&[1])),
    ("substr", Rule::Constants(&[1, 2])),
    ("substring", Rule::Constants(&[1, 2])),
    ("split_part", Rule::Constants(&[1, 2])),
    ("translate", Rule::Constants(&[1, 2])),
    ("regexp_like", Rule::Constants(&[1, 2])),
    ("regexp_count", Rule::Constants(&[1, 2, 3])),
    // Dates and times.
    ("date_part", Rule::Constants(&[0])),
    ("datepart", Rule::Constants(&[0])),
    ("now", Rule::Total),
    ("current_date", Rule::Total),
    ("current_time", Rule::Total),
];

/// Aggregate functions accepted (in per-person summaries, and the ones the
/// local bounded query uses itself), on numbers or on any type.
pub const AGGREGATES: &[(&str, bool)] = &[
    // (name, numbers only)
    ("count", false),
    ("sum", true),
    ("avg", true),
    ("mean", true),
    ("min", false),
    ("max", false),
    ("bool_and", false),
    ("bool_or", false),
    ("var_pop", true),
    ("var_samp", true),
    ("stddev_pop", true),
    ("stddev_samp", true),
];

/// Window functions accepted: the local bounded query's own sampling.
pub const WINDOW_FUNCTIONS: &[&str] = &["row_number", "dense_rank", "rank"];

/// The largest integer constant a function with [`Rule::Constants`] accepts.
pub const MAX_CONSTANT: i64 = 10_000;

/// The longest text constant a function with [`Rule::Constants`] accepts.
/// (Functions whose output can grow by a factor, such as `repeat`, `lpad`
/// or `replace`, are not on the list at all: nested, they could make one
/// person's row fail or slow the query down.)
pub const MAX_CONSTANT_TEXT: usize = 256;

fn refuse(msg: impl Into<String>) -> QueryError {
    QueryError::Rejected(msg.into())
}

fn is_integer(t: &DataType) -> bool {
    t.is_integer()
}

fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View)
}

/// Whether a cast from `from` to `to` never fails on a value (DataFusion
/// casts with `safe = false`: a value that does not convert is an error).
pub fn cast_is_total(from: &DataType, to: &DataType) -> bool {
    use DataType::*;
    if from == to || *from == Null {
        return true;
    }
    if crate::analyze::lossless_cast(from, to) {
        return true;
    }
    let numeric = |t: &DataType| is_integer(t) || is_float(t);
    match (from, to) {
        // Integers and floats to floats: rounding, never an error.
        (f, Float32 | Float64) if numeric(f) => true,
        (Decimal128(_, _), Float64) => true,
        // Numbers and booleans to booleans and back.
        (f, Boolean) if numeric(f) => true,
        (Boolean, t) if numeric(t) => true,
        // To text.
        (f, Utf8 | LargeUtf8 | Utf8View) if numeric(f) || is_text(f) || *f == Boolean => true,
        // Integers to decimals with room for every digit.
        (f, Decimal128(p, sc)) if is_integer(f) => {
            let digits = match f {
                Int8 | UInt8 => 3,
                Int16 | UInt16 => 5,
                Int32 | UInt32 => 10,
                Int64 => 19,
                _ => 20,
            };
            i32::from(*p) - i32::from(*sc) >= digits
        }
        // Days to milliseconds.
        (Date32, Date64) => true,
        _ => false,
    }
}

/// Whether `expr` reads no column and calls nothing volatile: its value is
/// the same for every row, and is computed here.
fn is_constant(expr: &Expr) -> bool {
    if expr.any_column_refs() || expr.contains_outer() || expr.is_volatile() {
        return false;
    }
    let mut nested = false;
    let _ = expr.apply(|e| {
        if matches!(
            e,
            Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::SetComparison(_)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_)
                | Expr::Placeholder(_)
                | Expr::ScalarVariable(..)
                | Expr::GroupingSet(_)
                | Expr::Unnest(_)
        ) {
            nested = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    !nested
}

/// Evaluates a constant expression (`now()` and the like at this moment).
pub fn evaluate_constant(expr: &Expr) -> Result<ScalarValue> {
    use datafusion::optimizer::simplify_expressions::{ExprSimplifier, SimplifyContext};
    let ctx = SessionContext::new();
    let schema = DFSchema::empty();
    let simplifier = ExprSimplifier::new(SimplifyContext::builder().with_current_time().build());
    // Simplification leaves in place what fails to evaluate; the physical
    // evaluation below then reports the error.
    let expr = simplifier.simplify(expr.clone())?;
    let physical = ctx.create_physical_expr(expr, &schema)?;
    let batch = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        vec![],
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )?;
    let value = physical.evaluate(&batch)?;
    let array = value.into_array(1)?;
    Ok(ScalarValue::try_from_array(&array, 0)?)
}

fn constant_error(expr: &Expr, e: &QueryError) -> QueryError {
    refuse(format!(
        "{expr} cannot be computed ({}): fix the constant, since a query that fails would tell \
         whether any row reached it",
        e.to_string()
            .trim_start_matches("query error: ")
            .trim_start_matches("Execution error: ")
    ))
}

/// Checks every expression of `plan` (its subqueries included).
pub fn check_plan(plan: &LogicalPlan) -> Result<()> {
    let mut outcome = Ok(());
    let _ = plan.apply_with_subqueries(|node| {
        let mut schema = DFSchema::empty();
        for input in node.inputs() {
            schema.merge(input.schema());
        }
        if let LogicalPlan::Limit(l) = node {
            // Constants, checked by DataFusion when it plans.
            let _ = l;
            return Ok(TreeNodeRecursion::Continue);
        }
        let mut result = Ok(());
        let _ = node.apply_expressions(|e| {
            result = check_expr(e, &schema);
            Ok(if result.is_ok() {
                TreeNodeRecursion::Continue
            } else {
                TreeNodeRecursion::Stop
            })
        });
        match result {
            Ok(()) => Ok(TreeNodeRecursion::Continue),
            Err(e) => {
                outcome = Err(e);
                Ok(TreeNodeRecursion::Stop)
            }
        }
    });
    outcome
}

fn type_of(expr: &Expr, schema: &DFSchema) -> Result<DataType> {
    expr.get_type(schema).map_err(QueryError::from)
}

/// Checks one expression evaluated over rows of `schema`.
pub fn check_expr(expr: &Expr, schema: &DFSchema) -> Result<()> {
    if is_constant(expr) {
        if matches!(expr, Expr::Literal(..)) {
            return Ok(());
        }
        return evaluate_constant(expr)
            .map(|_| ())
            .map_err(|e| constant_error(expr, &e));
    }
    let check = |e: &Expr| check_expr(e, schema);
    match expr {
        Expr::Column(_) | Expr::OuterReferenceColumn(..) | Expr::Literal(..) => Ok(()),
        Expr::Alias(a) => check(&a.expr),
        Expr::Not(e)
        | Expr::IsNull(e)
        | Expr::IsNotNull(e)
        | Expr::IsTrue(e)
        | Expr::IsFalse(e)
        | Expr::IsUnknown(e)
        | Expr::IsNotTrue(e)
        | Expr::IsNotFalse(e)
        | Expr::IsNotUnknown(e) => check(e),
        Expr::Negative(e) => {
            let t = type_of(e, schema)?;
            if is_integer(&t) || is_float(&t) {
                check(e)
            } else {
                Err(refuse(format!(
                    "{expr}: negating a {t} value is not on the list of expressions that cannot fail"
                )))
            }
        }
        Expr::Between(b) => {
            check(&b.expr)?;
            check(&b.low)?;
            check(&b.high)
        }
        Expr::Case(c) => {
            if let Some(e) = &c.expr {
                check(e)?;
            }
            for (w, t) in &c.when_then_expr {
                check(w)?;
                check(t)?;
            }
            if let Some(e) = &c.else_expr {
                check(e)?;
            }
            Ok(())
        }
        Expr::InList(l) => {
            check(&l.expr)?;
            l.list.iter().try_for_each(check)
        }
        Expr::Like(l) | Expr::SimilarTo(l) => {
            check(&l.expr)?;
            if !is_constant(&l.pattern) {
                return Err(refuse(format!(
                    "{expr}: the pattern must be a constant (a pattern read from a row can be invalid)"
                )));
            }
            // The pattern is tried once on a neutral value.
            let mut probe = l.clone();
            probe.expr = Box::new(Expr::Literal(ScalarValue::Utf8(Some("x".into())), None));
            let probe = if matches!(expr, Expr::Like(_)) {
                Expr::Like(probe)
            } else {
                Expr::SimilarTo(probe)
            };
            evaluate_constant(&probe)
                .map(|_| ())
                .map_err(|e| constant_error(expr, &e))
        }
        Expr::Cast(c) => {
            check(&c.expr)?;
            let from = type_of(&c.expr, schema)?;
            let to = c.field.data_type();
            if cast_is_total(&from, to) {
                Ok(())
            } else {
                Err(refuse(format!(
                    "{expr} converts {from} values to {to}, which fails on a value that does not convert \
                     (and would tell that such a value exists): compare and combine values of the same type \
                     (for example a text column with a quoted literal), or write TRY_CAST(... AS ...) \
                     yourself, which gives NULL instead"
                )))
            }
        }
        Expr::TryCast(c) => {
            check(&c.expr)?;
            let from = type_of(&c.expr, schema)?;
            let to = c.field.data_type();
            // Formatting a date or time fails on values outside the
            // calendar, even in TRY_CAST.
            let temporal = matches!(
                from,
                DataType::Date32
                    | DataType::Date64
                    | DataType::Timestamp(_, _)
                    | DataType::Time32(_)
                    | DataType::Time64(_)
            );
            if can_cast_types(&from, to) && !(temporal && is_text(to)) {
                Ok(())
            } else {
                Err(refuse(format!(
                    "{expr}: {from} values cannot be converted to {to}"
                )))
            }
        }
        Expr::BinaryExpr(b) => {
            check(&b.left)?;
            check(&b.right)?;
            check_operator(expr, b, schema)
        }
        Expr::ScalarFunction(f) => check_function(expr, f, schema),
        Expr::AggregateFunction(f) => {
            let name = f.func.name().to_ascii_lowercase();
            let Some((_, numeric)) = AGGREGATES.iter().find(|(n, _)| *n == name) else {
                return Err(refuse(format!(
                    "the aggregate {name} is not allowed here: per-person summaries may use {}",
                    AGGREGATES
                        .iter()
                        .map(|(n, _)| n.to_ascii_uppercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            };
            for a in &f.params.args {
                check(a)?;
                if *numeric && !matches!(a, Expr::Literal(..)) {
                    let t = type_of(a, schema)?;
                    if !(is_integer(&t) || is_float(&t)) {
                        return Err(refuse(format!(
                            "{expr}: {} takes integers or floating-point numbers here, not {t}: cast to DOUBLE",
                            name.to_ascii_uppercase()
                        )));
                    }
                }
            }
            if let Some(filter) = &f.params.filter {
                check(filter)?;
            }
            for s in &f.params.order_by {
                check(&s.expr)?;
            }
            Ok(())
        }
        Expr::WindowFunction(w) => {
            let name = match &w.fun {
                WindowFunctionDefinition::AggregateUDF(f) => f.name().to_ascii_lowercase(),
                WindowFunctionDefinition::WindowUDF(f) => f.name().to_ascii_lowercase(),
            };
            if !WINDOW_FUNCTIONS.contains(&name.as_str()) {
                return Err(refuse(format!(
                    "window functions (OVER ...) are not allowed in DP queries: {name}"
                )));
            }
            for e in w.params.args.iter().chain(&w.params.partition_by) {
                check(e)?;
            }
            for s in &w.params.order_by {
                check(&s.expr)?;
            }
            Ok(())
        }
        Expr::ScalarSubquery(s) => {
            if at_most_one_row(&s.subquery) {
                Ok(())
            } else {
                Err(refuse(
                    "a scalar subquery must return at most one row by its shape, or the query fails when it \
                     returns two: aggregate it (SELECT MIN(...) FROM ...) or add LIMIT 1",
                ))
            }
        }
        Expr::Exists(_) => Ok(()),
        Expr::InSubquery(x) => check(&x.expr),
        other => Err(refuse(format!(
            "{other} is not on the list of expressions a DP query may compute"
        ))),
    }
}

/// Whether a plan returns at most one row, whatever the data.
fn at_most_one_row(plan: &LogicalPlan) -> bool {
    match plan {
        LogicalPlan::Projection(p) => at_most_one_row(&p.input),
        LogicalPlan::SubqueryAlias(a) => at_most_one_row(&a.input),
        LogicalPlan::Filter(f) => at_most_one_row(&f.input),
        LogicalPlan::Sort(s) => at_most_one_row(&s.input),
        LogicalPlan::Aggregate(a) => a.group_expr.is_empty(),
        LogicalPlan::Limit(l) => {
            matches!(
                l.get_fetch_type(),
                Ok(datafusion::logical_expr::FetchType::Literal(Some(n))) if n <= 1
            ) || at_most_one_row(&l.input)
        }
        LogicalPlan::EmptyRelation(_) => true,
        LogicalPlan::Values(v) => v.values.len() <= 1,
        _ => false,
    }
}

fn check_operator(
    expr: &Expr,
    b: &datafusion::logical_expr::BinaryExpr,
    schema: &DFSchema,
) -> Result<()> {
    use Operator::*;
    let lt = type_of(&b.left, schema)?;
    let rt = type_of(&b.right, schema)?;
    let numbers = (is_integer(&lt) || is_float(&lt)) && (is_integer(&rt) || is_float(&rt));
    match b.op {
        Eq | NotEq | Lt | LtEq | Gt | GtEq | IsDistinctFrom | IsNotDistinctFrom | And | Or
        | StringConcat => Ok(()),
        Plus | Minus | Multiply if numbers => Ok(()),
        Minus if lt == DataType::Date32 && rt == DataType::Date32 => Ok(()),
        BitwiseAnd | BitwiseOr | BitwiseXor if is_integer(&lt) && is_integer(&rt) => Ok(()),
        Divide | Modulo | IntegerDivide if numbers => {
            if is_float(&lt) || is_float(&rt) {
                return Ok(());
            }
            // Integer division: only by a constant other than 0 and -1.
            let divisor = if is_constant(&b.right) {
                evaluate_constant(&b.right).ok()
            } else {
                None
            };
            let safe = divisor.is_some_and(|v| {
                !v.is_null()
                    && v.cast_to(&DataType::Int64)
                        .ok()
                        .and_then(|v| match v {
                            ScalarValue::Int64(Some(n)) => Some(n != 0 && n != -1),
                            _ => None,
                        })
                        .unwrap_or(false)
            });
            if safe {
                Ok(())
            } else {
                Err(refuse(format!(
                    "{expr} divides integers by a value read from a row, which fails for some values \
                     (-9223372036854775808 / -1 overflows): divide as floating point, \
                     CAST(... AS DOUBLE) / ..., or by a constant"
                )))
            }
        }
        RegexMatch | RegexIMatch | RegexNotMatch | RegexNotIMatch | LikeMatch | ILikeMatch
        | NotLikeMatch | NotILikeMatch => {
            if !is_constant(&b.right) {
                return Err(refuse(format!(
                    "{expr}: the pattern must be a constant (a pattern read from a row can be invalid)"
                )));
            }
            let probe = Expr::BinaryExpr(datafusion::logical_expr::BinaryExpr {
                left: Box::new(Expr::Literal(ScalarValue::Utf8(Some("x".into())), None)),
                op: b.op,
                right: b.right.clone(),
            });
            evaluate_constant(&probe)
                .map(|_| ())
                .map_err(|e| constant_error(expr, &e))
        }
        op => Err(refuse(format!(
            "{expr}: the operator {op} on {lt} and {rt} values is not on the list of expressions that \
             cannot fail on a row"
        ))),
    }
}

/// A neutral constant of type `t`, to try a call whose other arguments are
/// constants.
fn neutral(t: &DataType) -> Option<ScalarValue> {
    Some(match t {
        t if is_text(t) => ScalarValue::Utf8(Some("x".into())).cast_to(t).ok()?,
        t if is_integer(t) || is_float(t) => ScalarValue::Int64(Some(1)).cast_to(t).ok()?,
        DataType::Boolean => ScalarValue::Boolean(Some(true)),
        DataType::Date32 => ScalarValue::Date32(Some(19_000)),
        DataType::Timestamp(_, _) => {
            ScalarValue::TimestampNanosecond(Some(1_600_000_000_000_000_000), None)
                .cast_to(t)
                .ok()?
        }
        _ => return None,
    })
}

fn check_function(
    expr: &Expr,
    f: &datafusion::logical_expr::expr::ScalarFunction,
    schema: &DFSchema,
) -> Result<()> {
    let name = f.func.name().to_ascii_lowercase();
    let Some((_, rule)) = FUNCTIONS.iter().find(|(n, _)| *n == name) else {
        return Err(refuse(format!(
            "{name} may fail on some rows (or is not on the list of functions checked never to fail) and \
             is not allowed on values read from rows in DP queries; the functions allowed are listed in \
             docs/dp-sql.md"
        )));
    };
    for a in &f.args {
        check_expr(a, schema)?;
    }
    match rule {
        Rule::Total => Ok(()),
        Rule::Float => {
            for a in &f.args {
                let t = type_of(a, schema)?;
                if !is_float(&t) && !is_constant(a) {
                    return Err(refuse(format!(
                        "{expr}: {name} of integers can overflow on extreme values: apply it to \
                         CAST(... AS DOUBLE)"
                    )));
                }
            }
            Ok(())
        }
        Rule::NotText => {
            for a in &f.args {
                let t = type_of(a, schema)?;
                if is_text(&t) && !is_constant(a) {
                    return Err(refuse(format!(
                        "{expr}: {name} of text fails on text that does not parse: apply it to date or \
                         timestamp columns"
                    )));
                }
            }
            Ok(())
        }
        Rule::Constants(positions) | Rule::FloatConstants(positions) => {
            if matches!(rule, Rule::FloatConstants(_)) {
                for (i, a) in f.args.iter().enumerate() {
                    if !positions.contains(&i) && !is_float(&type_of(a, schema)?) {
                        return Err(refuse(format!(
                            "{expr}: {name} of integers can overflow on extreme values: apply it to \
                             CAST(... AS DOUBLE)"
                        )));
                    }
                }
            }
            let mut probe_args = Vec::with_capacity(f.args.len());
            for (i, a) in f.args.iter().enumerate() {
                if positions.contains(&i) {
                    if !is_constant(a) {
                        return Err(refuse(format!(
                            "{expr}: argument {} of {name} must be a constant",
                            i + 1
                        )));
                    }
                    let v = evaluate_constant(a).map_err(|e| constant_error(expr, &e))?;
                    if let ScalarValue::Utf8(Some(t))
                    | ScalarValue::LargeUtf8(Some(t))
                    | ScalarValue::Utf8View(Some(t)) = &v
                        && t.len() > MAX_CONSTANT_TEXT
                    {
                        return Err(refuse(format!(
                            "{expr}: argument {} of {name} is longer than {MAX_CONSTANT_TEXT} characters",
                            i + 1
                        )));
                    }
                    if let Ok(ScalarValue::Int64(Some(n))) = v.cast_to(&DataType::Int64)
                        && is_integer(&v.data_type())
                        && n.abs() > MAX_CONSTANT
                    {
                        return Err(refuse(format!(
                            "{expr}: argument {} of {name} must be between -{MAX_CONSTANT} and {MAX_CONSTANT}",
                            i + 1
                        )));
                    }
                    probe_args.push(Expr::Literal(v, None));
                } else {
                    let t = type_of(a, schema)?;
                    let v = neutral(&t).ok_or_else(|| {
                        refuse(format!(
                            "{expr}: {name} of a {t} value is not on the list of expressions that cannot \
                             fail on a row"
                        ))
                    })?;
                    probe_args.push(Expr::Literal(v, None));
                }
            }
            let probe = Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction {
                func: f.func.clone(),
                args: probe_args,
            });
            evaluate_constant(&probe)
                .map(|_| ())
                .map_err(|e| constant_error(expr, &e))
        }
    }
}

#[cfg(test)]
mod tests {
    //! The allowlist, proven: every expression over adversarial values that
    //! [`check_plan`] accepts must run without error.

    use std::sync::Arc;

    use datafusion::arrow::array::{
        ArrayRef, BooleanArray, Date32Array, Float64Array, Int32Array, Int64Array, RecordBatch,
        StringArray, TimestampNanosecondArray, UInt64Array,
    };
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    use super::*;

    /// Columns of every type a catalog declares (and a few DataFusion
    /// produces), holding the values that make functions fail if anything does.
    fn probe() -> SessionContext {
        let long = "x".repeat(10_000);
        let columns: Vec<(&str, ArrayRef)> = vec![
            (
                "i",
                Arc::new(Int64Array::from(vec![
                    Some(i64::MIN),
                    Some(-1),
                    Some(0),
                    Some(1),
                    Some(i64::MAX),
                    None,
                    Some(10_001),
                    Some(-10_001),
                ])),
            ),
            (
                "i32",
                Arc::new(Int32Array::from(vec![
                    Some(i32::MIN),
                    Some(-1),
                    Some(0),
                    Some(1),
                    Some(i32::MAX),
                    None,
                    Some(7),
                    Some(-7),
                ])),
            ),
            (
                "u",
                Arc::new(UInt64Array::from(vec![
                    Some(0),
                    Some(1),
                    Some(u64::MAX),
                    None,
                    Some(u64::MAX / 2 + 1),
                    Some(2),
                    Some(3),
                    Some(4),
                ])),
            ),
            (
                "f",
                Arc::new(Float64Array::from(vec![
                    Some(f64::NAN),
                    Some(f64::INFINITY),
                    Some(f64::NEG_INFINITY),
                    Some(-0.0),
                    Some(f64::MAX),
                    Some(f64::MIN),
                    Some(5e-324),
                    None,
                ])),
            ),
            (
                "s",
                Arc::new(StringArray::from(vec![
                    Some(""),
                    Some("a"),
                    Some("ÿ€😀"),
                    Some(long.as_str()),
                    Some("%_\\"),
                    Some("2020-13-45"),
                    Some("NaN"),
                    None,
                ])),
            ),
            (
                "d",
                Arc::new(Date32Array::from(vec![
                    Some(i32::MIN),
                    Some(i32::MAX),
                    Some(0),
                    Some(-1),
                    Some(19_000),
                    None,
                    Some(2_932_896),
                    Some(-719_162),
                ])),
            ),
            (
                "ts",
                Arc::new(TimestampNanosecondArray::from(vec![
                    Some(i64::MIN),
                    Some(i64::MAX),
                    Some(0),
                    None,
                    Some(-1),
                    Some(1_600_000_000_000_000_000),
                    Some(1),
                    Some(i64::MIN + 1),
                ])),
            ),
            (
                "b",
                Arc::new(BooleanArray::from(vec![
                    Some(true),
                    Some(false),
                    None,
                    Some(true),
                    Some(false),
                    None,
                    Some(true),
                    Some(false),
                ])),
            ),
        ];
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
        .expect("probe batch");
        let ctx = crate::bounding::context();
        ctx.register_table(
            "probe",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).expect("table")),
        )
        .expect("register");
        ctx
    }

    const COLUMNS: &[&str] = &["i", "i32", "u", "f", "s", "d", "ts", "b"];
    const SMALL_COLUMNS: &[&str] = &["i", "f", "s", "d"];
    const SMALL_CONSTANTS: &[&str] = &["-1", "0", "3", "10000", "''", "'a'", "'('", "'year'"];
    const CONSTANTS: &[&str] = &[
        "-10000", "-1", "0", "1", "3", "10000", "''", "'a'", "'%'", "'[a-z]+'", "'('", "'i'",
        "'year'", "'day'", "2.5",
    ];

    /// Runs `expr` over the probe rows if the checker accepts it; returns
    /// whether it was accepted, and panics if an accepted one fails.
    async fn accepted_runs(ctx: &SessionContext, expr: &str) -> bool {
        let sql = format!("SELECT {expr} AS v FROM probe");
        let Ok(plan) = crate::engine::analyzed(ctx, &sql).await else {
            return false; // Does not plan: refused before anything runs.
        };
        if check_plan(&plan).is_err() {
            return false;
        }
        let df = ctx.sql(&sql).await.expect("plans again");
        let run = std::panic::AssertUnwindSafe(df.collect());
        match futures::FutureExt::catch_unwind(run).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => FAILURES.lock().expect("lock").push(format!("{expr}: {e}")),
            Err(_) => FAILURES
                .lock()
                .expect("lock")
                .push(format!("{expr}: panicked")),
        }
        true
    }

    static FAILURES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    fn assert_no_failures() {
        let failures = FAILURES.lock().expect("lock");
        assert!(
            failures.is_empty(),
            "accepted as total but failing on the probe rows:\n{}",
            failures.join("\n")
        );
    }

    #[tokio::test]
    async fn every_allowed_function_is_total_on_adversarial_values() {
        let ctx = probe();
        let registered: Vec<String> = ctx
            .state()
            .scalar_functions()
            .keys()
            .map(|k| k.to_ascii_lowercase())
            .collect();
        let mut accepted = 0usize;
        for (name, rule) in FUNCTIONS {
            assert!(
                registered.iter().any(|r| r == name),
                "{name} is listed but DataFusion has no such function"
            );
            let constant_positions: &[usize] = match rule {
                Rule::Constants(p) | Rule::FloatConstants(p) => p,
                _ => &[],
            };
            let mut any = false;
            let max_arity = 3.max(2 + constant_positions.len().min(2));
            for arity in 0..=max_arity {
                // Each position: every column, or every constant where the
                // rule wants constants (fewer when there are two).
                let pool: &[&str] = if arity > 2 {
                    SMALL_CONSTANTS
                } else {
                    CONSTANTS
                };
                let choices: Vec<Vec<&str>> = (0..arity)
                    .map(|i| {
                        if constant_positions.contains(&i) {
                            pool.to_vec()
                        } else if arity > 2 {
                            SMALL_COLUMNS.to_vec()
                        } else {
                            COLUMNS.to_vec()
                        }
                    })
                    .collect();
                let mut index = vec![0usize; arity];
                loop {
                    let args: Vec<&str> = index.iter().zip(&choices).map(|(i, c)| c[*i]).collect();
                    let expr = format!("{name}({})", args.join(", "));
                    if accepted_runs(&ctx, &expr).await {
                        accepted += 1;
                        any = true;
                    }
                    // Next combination.
                    let mut pos = 0;
                    while pos < arity {
                        index[pos] += 1;
                        if index[pos] < choices[pos].len() {
                            break;
                        }
                        index[pos] = 0;
                        pos += 1;
                    }
                    if pos == arity {
                        break;
                    }
                }
            }
            assert!(any, "{name} is listed but no call of it was accepted");
        }
        assert!(accepted > 200, "only {accepted} calls were accepted");
        assert_no_failures();
    }

    #[tokio::test]
    async fn operators_and_casts_accepted_are_total() {
        let ctx = probe();
        let ops = [
            "+",
            "-",
            "*",
            "/",
            "%",
            "=",
            "<>",
            "<",
            ">=",
            "||",
            "&",
            "|",
            "#",
            "AND",
            "OR",
            "IS DISTINCT FROM",
            "<<",
            ">>",
        ];
        for l in COLUMNS {
            for r in COLUMNS.iter().chain(&["2", "-1", "0", "2.5", "'a'"]) {
                for op in ops {
                    accepted_runs(&ctx, &format!("{l} {op} {r}")).await;
                }
            }
            for t in [
                "BIGINT",
                "INT",
                "SMALLINT",
                "BIGINT UNSIGNED",
                "DOUBLE",
                "REAL",
                "VARCHAR",
                "BOOLEAN",
                "DATE",
                "TIMESTAMP",
                "DECIMAL(10, 2)",
                "DECIMAL(38, 0)",
            ] {
                accepted_runs(&ctx, &format!("CAST({l} AS {t})")).await;
                accepted_runs(&ctx, &format!("TRY_CAST({l} AS {t})")).await;
                accepted_runs(&ctx, &format!("arrow_cast({l}, 'Int64')")).await;
            }
            accepted_runs(&ctx, &format!("-{l}")).await;
            for p in ["'a%'", "'%\\'", "'['", "s"] {
                accepted_runs(&ctx, &format!("{l} LIKE {p}")).await;
                accepted_runs(&ctx, &format!("{l} SIMILAR TO {p}")).await;
                accepted_runs(&ctx, &format!("{l} ~ {p}")).await;
            }
        }
        // Integer division: by a column refused, by a safe constant accepted.
        assert!(!accepted_runs(&ctx, "i / i32").await);
        assert!(!accepted_runs(&ctx, "i % NULLIF(i, 0)").await);
        assert!(!accepted_runs(&ctx, "i / -1").await);
        assert!(accepted_runs(&ctx, "i / 2").await);
        assert!(accepted_runs(&ctx, "f / NULLIF(f, 0)").await);
        // A text column compared with a number: DataFusion casts the text.
        assert!(!accepted_runs(&ctx, "s = 5").await);
        assert!(accepted_runs(&ctx, "s = '5'").await);
        // Constants are evaluated here.
        assert!(!accepted_runs(&ctx, "i + CAST('x' AS INT)").await);
        assert!(accepted_runs(&ctx, "d >= DATE '2020-01-01'").await);
        assert_no_failures();
    }

    #[tokio::test]
    async fn scalar_subqueries_must_return_one_row_by_shape() {
        let ctx = probe();
        assert!(!accepted_runs(&ctx, "(SELECT i FROM probe LIMIT 2)").await);
        assert!(accepted_runs(&ctx, "(SELECT MAX(i) FROM probe)").await);
        assert!(accepted_runs(&ctx, "(SELECT i FROM probe LIMIT 1)").await);
    }

    #[tokio::test]
    async fn allowed_aggregates_are_total() {
        let ctx = probe();
        for (name, _) in AGGREGATES {
            for c in COLUMNS {
                let sql = format!("SELECT {name}({c}) AS v FROM probe");
                let Ok(plan) = crate::engine::analyzed(&ctx, &sql).await else {
                    continue;
                };
                if check_plan(&plan).is_err() {
                    continue;
                }
                if let Err(e) = ctx.sql(&sql).await.expect("plans").collect().await {
                    panic!("{name}({c}) is accepted but fails: {e}");
                }
            }
        }
    }
}
