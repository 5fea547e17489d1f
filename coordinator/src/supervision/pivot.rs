//! A released period as a pivot table (indicators down, units across),
//! exported by the console as CSV or Excel.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::Supervision;

/// One cell.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// The value; `None` when the data are insufficient.
    pub value: Option<f64>,
    /// The interval.
    pub ci: Option<(f64, f64)>,
    /// `insufficient data`, `incomplete`, `red line`, comma-separated.
    pub flags: String,
}

/// Indicators by units for one period (totals, not disaggregations).
#[derive(Debug, Clone)]
pub struct Pivot {
    period: String,
    zh: bool,
    /// (id, name, unit of measure, red line).
    indicators: Vec<(String, String, String, Option<f64>)>,
    /// (code, name).
    units: Vec<(String, String)>,
    cells: HashMap<(String, String), Cell>,
}

impl Pivot {
    /// From the rows of `supervision.values`: the units of `level` (every
    /// level if `None`) under `under` (itself included; the whole region if
    /// `None`), names in Chinese if `zh`.
    pub fn new(
        sup: &Supervision,
        values: &[Map<String, Value>],
        period: &str,
        level: Option<&str>,
        under: Option<&str>,
        zh: bool,
    ) -> Result<Self, String> {
        let region = &sup.region;
        if let Some(l) = level
            && !region.levels.iter().any(|x| x.id == l)
        {
            let known: Vec<&str> = region.levels.iter().map(|x| x.id.as_str()).collect();
            return Err(format!("level {l:?} is not in the region's tree (levels: {})", known.join(", ")));
        }
        let root = match under {
            Some(code) => Some(
                region
                    .position(code)
                    .ok_or_else(|| format!("org unit {code:?} is not in the region's tree"))?,
            ),
            None => None,
        };
        let text = |r: &Map<String, Value>, k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let num = |r: &Map<String, Value>, k: &str| r.get(k).and_then(Value::as_f64);
        let mut cells = HashMap::new();
        for r in values {
            if text(r, "period") != period || !text(r, "category").is_empty() {
                continue;
            }
            cells.insert(
                (text(r, "indicator"), text(r, "unit")),
                Cell {
                    value: num(r, "value"),
                    ci: num(r, "ci_low").zip(num(r, "ci_high")),
                    flags: text(r, "flags"),
                },
            );
        }
        if cells.is_empty() {
            return Err(format!(
                "period {period} has no released values: release it with `confer supervision run --period {period}`"
            ));
        }
        let name = |en: &str, zh_name: &str| if zh { zh_name } else { en }.to_string();
        let units = (0..region.units.len())
            .filter(|&i| level.is_none_or(|l| region.units[i].level == l))
            .filter(|&i| {
                root.is_none_or(|top| {
                    let code = &region.units[top].code;
                    region.path(i).split('/').any(|c| c == code)
                })
            })
            .map(|i| {
                let u = &region.units[i];
                (u.code.clone(), name(&u.name_en, &u.name_zh))
            })
            .collect();
        let indicators = sup
            .catalogue
            .indicators
            .iter()
            .filter(|i| cells.keys().any(|(ind, _)| ind == &i.id))
            .map(|i| (i.id.clone(), name(&i.name_en, &i.name_zh), i.unit.clone(), i.red_line))
            .collect();
        Ok(Self {
            period: period.to_string(),
            zh,
            indicators,
            units,
            cells,
        })
    }

    fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = if self.zh {
            vec!["指标编码".into(), "指标".into(), "单位".into(), "红线".into()]
        } else {
            vec!["indicator_id".into(), "indicator".into(), "unit".into(), "red_line".into()]
        };
        h.extend(self.units.iter().map(|(code, name)| format!("{code} {name}")));
        h
    }

    fn insufficient(&self) -> &'static str {
        if self.zh { "数据不足" } else { "insufficient data" }
    }

    /// CSV: one row per indicator; a cell holds the value, "insufficient
    /// data", or nothing (not released for that unit).
    pub fn csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        let mut rows: Vec<Vec<String>> = vec![self.header()];
        for (id, name, unit, red) in &self.indicators {
            let mut row = vec![
                id.clone(),
                name.clone(),
                unit.clone(),
                red.map(|v| v.to_string()).unwrap_or_default(),
            ];
            for (code, _) in &self.units {
                row.push(match self.cells.get(&(id.clone(), code.clone())) {
                    None => String::new(),
                    Some(Cell { value: None, .. }) => self.insufficient().to_string(),
                    Some(Cell { value: Some(v), .. }) => format!("{v}"),
                });
            }
            rows.push(row);
        }
        for r in rows {
            // Writing to a Vec cannot fail.
            let _ = w.write_record(&r);
        }
        String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
    }

    /// An Excel workbook: the pivot ("Report": beyond the red line filled
    /// red, insufficient data in grey italics) and every cell with its
    /// interval and flags ("Values").
    pub fn xlsx(&self) -> Result<Vec<u8>, String> {
        use rust_xlsxwriter::{Color, Format, Workbook};
        let err = |e: rust_xlsxwriter::XlsxError| format!("cannot write the workbook: {e}");
        let mut book = Workbook::new();
        let bold = Format::new().set_bold();
        let breach = Format::new()
            .set_background_color(Color::RGB(0xF8CBAD))
            .set_num_format("0.00");
        let plain = Format::new().set_num_format("0.00");
        let grey = Format::new().set_italic().set_font_color(Color::Gray);
        let sheet = book.add_worksheet();
        sheet.set_name("Report").map_err(err)?;
        let title = if self.zh {
            format!("监管指标 {}（红色：超出红线）", self.period)
        } else {
            format!("Supervision indicators, {} (red: beyond the red line)", self.period)
        };
        sheet.write_string_with_format(0, 0, &title, &bold).map_err(err)?;
        for (c, h) in self.header().iter().enumerate() {
            sheet.write_string_with_format(1, c as u16, h, &bold).map_err(err)?;
        }
        for (r, (id, name, unit, red)) in self.indicators.iter().enumerate() {
            let row = 2 + r as u32;
            sheet.write_string(row, 0, id).map_err(err)?;
            sheet.write_string(row, 1, name).map_err(err)?;
            sheet.write_string(row, 2, unit).map_err(err)?;
            if let Some(v) = red {
                sheet.write_number(row, 3, *v).map_err(err)?;
            }
            for (k, (code, _)) in self.units.iter().enumerate() {
                let col = 4 + k as u16;
                match self.cells.get(&(id.clone(), code.clone())) {
                    None => {}
                    Some(Cell { value: None, .. }) => {
                        sheet
                            .write_string_with_format(row, col, self.insufficient(), &grey)
                            .map_err(err)?;
                    }
                    Some(c @ Cell { value: Some(v), .. }) => {
                        let f = if c.flags.contains("red line") { &breach } else { &plain };
                        sheet.write_number_with_format(row, col, *v, f).map_err(err)?;
                    }
                }
            }
        }
        sheet.set_freeze_panes(2, 4).map_err(err)?;
        sheet.set_column_width(1, 36).map_err(err)?;
        let long = book.add_worksheet();
        long.set_name("Values").map_err(err)?;
        for (c, h) in ["indicator", "unit", "value", "ci_low", "ci_high", "flags"].iter().enumerate() {
            long.write_string_with_format(0, c as u16, *h, &bold).map_err(err)?;
        }
        let mut keys: Vec<&(String, String)> = self.cells.keys().collect();
        keys.sort();
        for (r, key) in keys.into_iter().enumerate() {
            let cell = &self.cells[key];
            let row = 1 + r as u32;
            long.write_string(row, 0, &key.0).map_err(err)?;
            long.write_string(row, 1, &key.1).map_err(err)?;
            if let Some(v) = cell.value {
                long.write_number(row, 2, v).map_err(err)?;
            }
            if let Some((lo, hi)) = cell.ci {
                long.write_number(row, 3, lo).map_err(err)?;
                long.write_number(row, 4, hi).map_err(err)?;
            }
            long.write_string(row, 5, &cell.flags).map_err(err)?;
        }
        book.save_to_buffer().map_err(err)
    }
}
