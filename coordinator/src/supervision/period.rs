//! Reporting periods: a month (`2026-10`), a quarter (`2026-Q3`) or a year
//! (`2026`), each a half-open range of dates.

use std::fmt;

use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};

/// A period type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodType {
    /// A calendar month.
    Month,
    /// A calendar quarter.
    Quarter,
    /// A calendar year.
    Year,
}

impl PeriodType {
    /// How many periods of this type a year has.
    pub fn per_year(self) -> u32 {
        match self {
            PeriodType::Month => 12,
            PeriodType::Quarter => 4,
            PeriodType::Year => 1,
        }
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            PeriodType::Month => "month",
            PeriodType::Quarter => "quarter",
            PeriodType::Year => "year",
        }
    }
}

/// One period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Period {
    /// Its type.
    pub kind: PeriodType,
    /// Calendar year.
    pub year: i32,
    /// Month 1-12, quarter 1-4, or 1 for a year.
    pub index: u32,
}

impl Period {
    /// Parses `2026-10`, `2026-Q3` or `2026`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let err = || {
            format!(
                "period {text:?}: write a month as 2026-10, a quarter as 2026-Q3, or a year as 2026"
            )
        };
        let year = |y: &str| -> Result<i32, String> {
            let y: i32 = y.parse().map_err(|_| err())?;
            if !(1900..=9999).contains(&y) || t.len() < 4 {
                return Err(err());
            }
            Ok(y)
        };
        if let Some((y, rest)) = t.split_once('-') {
            let year = year(y)?;
            if let Some(q) = rest.strip_prefix('Q').or_else(|| rest.strip_prefix('q')) {
                let q: u32 = q.parse().map_err(|_| err())?;
                if !(1..=4).contains(&q) {
                    return Err(err());
                }
                return Ok(Period {
                    kind: PeriodType::Quarter,
                    year,
                    index: q,
                });
            }
            let m: u32 = rest.parse().map_err(|_| err())?;
            if !(1..=12).contains(&m) || rest.len() != 2 {
                return Err(err());
            }
            return Ok(Period {
                kind: PeriodType::Month,
                year,
                index: m,
            });
        }
        if t.len() != 4 {
            return Err(err());
        }
        Ok(Period {
            kind: PeriodType::Year,
            year: year(t)?,
            index: 1,
        })
    }

    /// The month before the one holding `day`.
    pub fn month_before(day: NaiveDate) -> Self {
        let (year, month) = if day.month() == 1 {
            (day.year() - 1, 12)
        } else {
            (day.year(), day.month() - 1)
        };
        Period {
            kind: PeriodType::Month,
            year,
            index: month,
        }
    }

    /// First day.
    pub fn start(&self) -> NaiveDate {
        let month = match self.kind {
            PeriodType::Month => self.index,
            PeriodType::Quarter => 3 * (self.index - 1) + 1,
            PeriodType::Year => 1,
        };
        NaiveDate::from_ymd_opt(self.year, month, 1).unwrap_or(NaiveDate::MIN)
    }

    /// The day after the last day.
    pub fn end(&self) -> NaiveDate {
        let months = match self.kind {
            PeriodType::Month => 1,
            PeriodType::Quarter => 3,
            PeriodType::Year => 12,
        };
        self.start()
            .checked_add_months(chrono::Months::new(months))
            .unwrap_or(NaiveDate::MAX)
    }

    /// Whether the period has ended by `today` (its last day is before it).
    pub fn is_over(&self, today: NaiveDate) -> bool {
        self.end() <= today
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            PeriodType::Month => write!(f, "{}-{:02}", self.year, self.index),
            PeriodType::Quarter => write!(f, "{}-Q{}", self.year, self.index),
            PeriodType::Year => write!(f, "{}", self.year),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_parse_and_span_their_dates() {
        let m = Period::parse("2026-10").expect("month");
        assert_eq!(m.to_string(), "2026-10");
        assert_eq!(m.start().to_string(), "2026-10-01");
        assert_eq!(m.end().to_string(), "2026-11-01");
        let q = Period::parse("2026-Q4").expect("quarter");
        assert_eq!(
            (q.start().to_string(), q.end().to_string()),
            ("2026-10-01".into(), "2027-01-01".into())
        );
        let y = Period::parse("2025").expect("year");
        assert_eq!(y.end().to_string(), "2026-01-01");
        for bad in ["2026-13", "2026-Q5", "26-10", "2026-1", "october", ""] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
        let today = NaiveDate::from_ymd_opt(2026, 12, 7).expect("date");
        assert!(m.is_over(today));
        assert!(!Period::parse("2026-12").expect("p").is_over(today));
        assert_eq!(Period::month_before(today).to_string(), "2026-11");
    }
}
