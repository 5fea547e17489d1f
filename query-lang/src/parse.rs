//! Parsing the confer dialect on top of DataFusion's SQL parser.
//!
//! The dialect adds three things to the SQL DataFusion already parses:
//!
//! * `SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (name = value, ...)` on the
//!   outermost SELECT;
//! * `EXPLAIN PRIVACY <query>`;
//! * `SHOW PRIVACY BUDGET [FOR STUDY <name>]`.
//!
//! We wrap the parser rather than fork it: the statement is tokenized with
//! sqlparser's tokenizer, the confer-specific tokens are recognised and
//! removed, and the remaining tokens are handed to sqlparser's own parser.
//! Named aggregate arguments (`contribution_bounds_per_group => (0, 110)`)
//! are already standard sqlparser syntax.

use datafusion::sql::sqlparser::ast::{
    Expr, Query, Statement as SqlStatement, UnaryOperator, Value,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Token, TokenWithSpan, Tokenizer};

use crate::error::{QueryError, Result};
use crate::options::DpOptions;

/// A statement of the confer dialect.
#[derive(Debug, Clone, PartialEq)]
pub enum Statement {
    /// A query: with the DP clause, a DP query; without, a query that may
    /// read public tables only.
    Query(ParsedQuery),
    /// `EXPLAIN PRIVACY <query>`: describe the plan and its cost, spend nothing.
    ExplainPrivacy(ParsedQuery),
    /// `SHOW PRIVACY BUDGET [FOR STUDY s]`.
    ShowPrivacyBudget {
        /// The study named, if any.
        study: Option<String>,
    },
}

/// A query with its DP options (if it had the clause) taken out.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedQuery {
    /// The options of the `WITH DIFFERENTIAL_PRIVACY` clause, validated.
    pub options: Option<DpOptions>,
    /// The query without the clause.
    pub query: Box<Query>,
}

/// Longest statement accepted, in bytes: every byte costs about 90 bytes
/// of memory in each process that plans it.
pub const MAX_SQL_BYTES: usize = 256 * 1024;

/// Most operators (arithmetic, comparison, AND / OR / NOT, concatenation)
/// in one statement. Planning recurses once per operator of a chain such
/// as `a + b + c + ...` and some passes take time quadratic in its length
/// (a chain of 400 `+` plans in about 2 s in a debug build); the servers'
/// stacks hold this many with a wide margin, and real queries stay far
/// below it (a long list of values is one `IN (...)`).
pub const MAX_OPERATORS: usize = 500;

/// Parses one statement of the dialect.
pub fn parse(sql: &str) -> Result<Statement> {
    if sql.len() > MAX_SQL_BYTES {
        return Err(QueryError::Syntax(format!(
            "the statement is {} bytes long; at most {MAX_SQL_BYTES} are accepted: shorten it (a long \
             list of values can often be a table or a range)",
            sql.len()
        )));
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| QueryError::Syntax(e.to_string()))?;
    let operators = tokens
        .iter()
        .filter(|t| match &t.token {
            Token::Plus
            | Token::Minus
            | Token::Mul
            | Token::Div
            | Token::Mod
            | Token::Eq
            | Token::DoubleEq
            | Token::Neq
            | Token::Lt
            | Token::Gt
            | Token::LtEq
            | Token::GtEq
            | Token::StringConcat
            | Token::Caret
            | Token::Ampersand
            | Token::Pipe => true,
            Token::Word(w) => matches!(w.keyword, Keyword::AND | Keyword::OR | Keyword::NOT),
            _ => false,
        })
        .count();
    if operators > MAX_OPERATORS {
        return Err(QueryError::Syntax(format!(
            "the statement has {operators} operators (arithmetic, comparisons, AND, OR, NOT); at most \
             {MAX_OPERATORS} are accepted: write long lists of alternatives as IN (...), or split the query"
        )));
    }
    let mut tokens = tokens;
    let mut words = significant(&tokens);

    // EXPLAIN PRIVACY <query>
    if is_word(&tokens, &words, 0, "EXPLAIN") && is_word(&tokens, &words, 1, "PRIVACY") {
        let rest = tokens.split_off(words[1] + 1);
        return Ok(Statement::ExplainPrivacy(parse_query_tokens(rest)?));
    }
    // SHOW PRIVACY BUDGET [FOR STUDY <name>]
    if is_word(&tokens, &words, 0, "SHOW") && is_word(&tokens, &words, 1, "PRIVACY") {
        if !is_word(&tokens, &words, 2, "BUDGET") {
            return Err(QueryError::Syntax(
                "expected SHOW PRIVACY BUDGET [FOR STUDY <name>]".into(),
            ));
        }
        words.retain(|&i| !matches!(tokens[i].token, Token::SemiColon));
        return match words.len() {
            3 => Ok(Statement::ShowPrivacyBudget { study: None }),
            6 if is_word(&tokens, &words, 3, "FOR") && is_word(&tokens, &words, 4, "STUDY") => {
                let study = match &tokens[words[5]].token {
                    Token::Word(w) => w.value.clone(),
                    Token::SingleQuotedString(s) => s.clone(),
                    other => {
                        return Err(QueryError::Syntax(format!(
                            "expected a study name after FOR STUDY, found {other}"
                        )));
                    }
                };
                Ok(Statement::ShowPrivacyBudget { study: Some(study) })
            }
            _ => Err(QueryError::Syntax(
                "expected SHOW PRIVACY BUDGET [FOR STUDY <name>]".into(),
            )),
        };
    }
    Ok(Statement::Query(parse_query_tokens(tokens)?))
}

/// Indices of the tokens that are not whitespace or comments.
fn significant(tokens: &[TokenWithSpan]) -> Vec<usize> {
    tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| !matches!(t.token, Token::Whitespace(_)))
        .map(|(i, _)| i)
        .collect()
}

fn is_word(tokens: &[TokenWithSpan], words: &[usize], nth: usize, word: &str) -> bool {
    words.get(nth).is_some_and(|&i| {
        matches!(&tokens[i].token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(word))
    })
}

/// Finds and removes the DP clause, parses its options, then parses the rest.
fn parse_query_tokens(mut tokens: Vec<TokenWithSpan>) -> Result<ParsedQuery> {
    let words = significant(&tokens);
    let mut depth: i64 = 0;
    let mut clause: Option<(usize, usize)> = None; // token range to remove, inclusive
    let mut options_tokens: Vec<TokenWithSpan> = Vec::new();
    let mut pos = 0;
    while pos < words.len() {
        let i = words[pos];
        match &tokens[i].token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            Token::Word(w) if w.keyword == Keyword::SELECT => {
                if is_word(&tokens, &words, pos + 1, "WITH")
                    && is_word(&tokens, &words, pos + 2, "DIFFERENTIAL_PRIVACY")
                {
                    if depth != 0 {
                        return Err(QueryError::Rejected(
                            "WITH DIFFERENTIAL_PRIVACY belongs on the outermost SELECT only: \
                             move it out of the subquery or CTE"
                                .into(),
                        ));
                    }
                    if clause.is_some() {
                        return Err(QueryError::Rejected(
                            "a query may have one WITH DIFFERENTIAL_PRIVACY clause".into(),
                        ));
                    }
                    let start = words[pos + 1];
                    let mut end = words[pos + 2];
                    let mut next = pos + 3;
                    if is_word(&tokens, &words, next, "OPTIONS") {
                        let open = next + 1;
                        if !matches!(
                            words.get(open).map(|&j| &tokens[j].token),
                            Some(Token::LParen)
                        ) {
                            return Err(QueryError::Syntax(
                                "expected '(' after WITH DIFFERENTIAL_PRIVACY OPTIONS".into(),
                            ));
                        }
                        let mut d = 0;
                        let mut close = None;
                        for (k, &j) in words.iter().enumerate().skip(open) {
                            match tokens[j].token {
                                Token::LParen => d += 1,
                                Token::RParen => {
                                    d -= 1;
                                    if d == 0 {
                                        close = Some(k);
                                        break;
                                    }
                                }
                                _ => {}
                            }
                        }
                        let close = close.ok_or_else(|| {
                            QueryError::Syntax(
                                "unclosed '(' in DIFFERENTIAL_PRIVACY OPTIONS".into(),
                            )
                        })?;
                        options_tokens = tokens[words[open] + 1..words[close]].to_vec();
                        end = words[close];
                        next = close + 1;
                    }
                    clause = Some((start, end));
                    pos = next;
                    continue;
                }
                if is_word(&tokens, &words, pos + 1, "DIFFERENTIAL_PRIVACY") {
                    return Err(QueryError::Syntax(
                        "write the clause as SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (...)".into(),
                    ));
                }
            }
            Token::Word(w)
                if w.quote_style.is_none()
                    && w.value.eq_ignore_ascii_case("DIFFERENTIAL_PRIVACY") =>
            {
                return Err(QueryError::Syntax(
                    "DIFFERENTIAL_PRIVACY may only appear as SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (...)"
                        .into(),
                ));
            }
            _ => {}
        }
        pos += 1;
    }

    let options = match clause {
        Some((start, end)) => {
            tokens.drain(start..=end);
            Some(parse_options(options_tokens)?)
        }
        None => None,
    };
    let dialect = GenericDialect {};
    let statements = Parser::new(&dialect)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .map_err(|e| QueryError::Syntax(e.to_string()))?;
    let mut statements = statements.into_iter();
    let query = match (statements.next(), statements.next()) {
        (Some(SqlStatement::Query(q)), None) => q,
        (Some(_), None) => {
            return Err(QueryError::Rejected(
                "only queries (SELECT ...) are accepted: confer never modifies data".into(),
            ));
        }
        (None, _) => return Err(QueryError::Syntax("the statement is empty".into())),
        (Some(_), Some(_)) => {
            return Err(QueryError::Syntax("send one statement at a time".into()));
        }
    };
    Ok(ParsedQuery { options, query })
}

/// A raw option value as written.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum OptionValue {
    Number(f64),
    Text(String),
}

fn parse_options(tokens: Vec<TokenWithSpan>) -> Result<DpOptions> {
    let dialect = GenericDialect {};
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens);
    let mut pairs: Vec<(String, OptionValue)> = Vec::new();
    loop {
        if parser.peek_token().token == Token::EOF {
            break;
        }
        let name = parser
            .parse_identifier()
            .map_err(|e| QueryError::Syntax(format!("in OPTIONS: {e}")))?;
        parser
            .expect_token(&Token::Eq)
            .map_err(|e| QueryError::Syntax(format!("in OPTIONS, after {name}: {e}")))?;
        let expr = parser
            .parse_expr()
            .map_err(|e| QueryError::Syntax(format!("in OPTIONS, value of {name}: {e}")))?;
        let value = option_value(&expr).ok_or_else(|| {
            QueryError::Syntax(format!(
                "OPTIONS value of {name} must be a number, a string or a column name, not {expr}"
            ))
        })?;
        pairs.push((name.value.to_ascii_lowercase(), value));
        if !parser.consume_token(&Token::Comma) {
            let t = parser.peek_token();
            if t.token != Token::EOF {
                return Err(QueryError::Syntax(format!(
                    "in OPTIONS: expected ',' or ')', found {}",
                    t.token
                )));
            }
        }
    }
    DpOptions::from_pairs(pairs)
}

fn option_value(expr: &Expr) -> Option<OptionValue> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok().map(OptionValue::Number),
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => {
                Some(OptionValue::Text(s.clone()))
            }
            _ => None,
        },
        Expr::UnaryOp {
            op: UnaryOperator::Minus,
            expr,
        } => match option_value(expr)? {
            OptionValue::Number(n) => Some(OptionValue::Number(-n)),
            OptionValue::Text(_) => None,
        },
        Expr::Identifier(id) => Some(OptionValue::Text(id.value.clone())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{Aggregation, Mechanism};

    fn query(sql: &str) -> ParsedQuery {
        match parse(sql).expect("parses") {
            Statement::Query(q) => q,
            other => panic!("not a query: {other:?}"),
        }
    }

    #[test]
    fn clause_is_removed_and_options_read() {
        let q = query(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS (epsilon = 1.5, delta = 1e-6, \
             max_groups_contributed = 2, mechanism = 'laplace', privacy_unit_column = person_id) \
             gender_concept_id, COUNT(*) FROM person GROUP BY gender_concept_id",
        );
        let o = q.options.expect("options");
        assert_eq!(o.epsilon, 1.5);
        assert_eq!(o.delta, 1e-6);
        assert_eq!(o.max_groups_contributed, 2);
        assert_eq!(o.mechanism, Mechanism::Laplace);
        assert_eq!(o.aggregation, Aggregation::PerSite);
        assert_eq!(o.privacy_unit_column.as_deref(), Some("person_id"));
        assert_eq!(
            q.query.to_string(),
            "SELECT gender_concept_id, COUNT(*) FROM person GROUP BY gender_concept_id"
        );
    }

    #[test]
    fn ctes_before_the_dp_select_are_kept() {
        let q = query(
            "WITH p AS (SELECT * FROM person) SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1, delta=1e-5) COUNT(*) FROM p",
        );
        assert!(q.options.is_some());
        assert!(q.query.with.is_some());
    }

    #[test]
    fn named_bounds_arguments_parse() {
        let q = query(
            "SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1, delta=1e-5) \
             AVG(2024 - year_of_birth, contribution_bounds_per_group => (0, 110)) FROM person",
        );
        assert!(
            q.query
                .to_string()
                .contains("contribution_bounds_per_group => (0, 110)")
        );
    }

    #[test]
    fn plain_queries_have_no_options() {
        assert!(query("SELECT concept_name FROM concept").options.is_none());
    }

    #[test]
    fn explain_and_show() {
        assert!(matches!(
            parse(
                "EXPLAIN PRIVACY SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1,delta=1e-5) COUNT(*) FROM person"
            ),
            Ok(Statement::ExplainPrivacy(ParsedQuery {
                options: Some(_),
                ..
            }))
        ));
        assert_eq!(
            parse("show privacy budget").expect("parses"),
            Statement::ShowPrivacyBudget { study: None }
        );
        assert_eq!(
            parse("SHOW PRIVACY BUDGET FOR STUDY gi_bleed;").expect("parses"),
            Statement::ShowPrivacyBudget {
                study: Some("gi_bleed".into())
            }
        );
    }

    #[test]
    fn misplaced_clauses_are_refused() {
        let err = parse(
            "SELECT COUNT(*) FROM (SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon=1) * FROM person) t",
        )
        .expect_err("nested clause");
        assert!(err.to_string().contains("outermost SELECT"), "{err}");
        let err = parse("SELECT DIFFERENTIAL_PRIVACY COUNT(*) FROM person").expect_err("bad form");
        assert!(
            err.to_string().contains("SELECT WITH DIFFERENTIAL_PRIVACY"),
            "{err}"
        );
        let err = parse("DELETE FROM person").expect_err("not a query");
        assert!(err.to_string().contains("only queries"), "{err}");
        let err = parse("SELECT WITH DIFFERENTIAL_PRIVACY OPTIONS(epsilon 1) COUNT(*) FROM person")
            .expect_err("bad option");
        assert!(err.to_string().contains("OPTIONS"), "{err}");
    }
}
