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
            return Err(format!(
                "level {l:?} is not in the region's tree (levels: {})",
                known.join(", ")
            ));
        }
        let root = match under {
            Some(code) => Some(
                region
                    .position(code)
                    .ok_or_else(|| format!("org unit {code:?} is not in the region's tree"))?,
            ),
            None => None,
        };
        let text = |r: &Map<String, Value>, k: &str| {
            r.get(k).and_then(Value::as_str).unwrap_or("").to_string()
        };
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
            .map(|i| {
                (
                    i.id.clone(),
                    name(&i.name_en, &i.name_zh),
                    i.unit.clone(),
                    i.red_line,
                )
            })
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
            vec![
                "指标编码".into(),
                "指标".into(),
                "单位".into(),
                "红线".into(),
            ]
        } else {
            vec![
                "indicator_id".into(),
                "indicator".into(),
                "unit".into(),
                "red_line".into(),
            ]
        };
        h.extend(
            self.units
                .iter()
                .map(|(code, name)| format!("{code} {name}")),
        );
        h
    }

    fn insufficient(&self) -> &'static str {
        if self.zh {
            "数据不足"
        } else {
            "insufficient data"
        }
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
            format!(
                "Supervision indicators, {} (red: beyond the red line)",
                self.period
            )
        };
        sheet
            .write_string_with_format(0, 0, &title, &bold)
            .map_err(err)?;
        for (c, h) in self.header().iter().enumerate() {
            sheet
                .write_string_with_format(1, c as u16, h, &bold)
                .map_err(err)?;
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
                        let f = if c.flags.contains("red line") {
                            &breach
                        } else {
                            &plain
                        };
                        sheet
                            .write_number_with_format(row, col, *v, f)
                            .map_err(err)?;
                    }
                }
            }
        }
        sheet.set_freeze_panes(2, 4).map_err(err)?;
        sheet.set_column_width(1, 36).map_err(err)?;
        let long = book.add_worksheet();
        long.set_name("Values").map_err(err)?;
        for (c, h) in ["indicator", "unit", "value", "ci_low", "ci_high", "flags"]
            .iter()
            .enumerate()
        {
            long.write_string_with_format(0, c as u16, *h, &bold)
                .map_err(err)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TREE: &str = r#"
[[level]]
id = "city"
name_zh = "市"
name_en = "City"
[[level]]
id = "county"
name_zh = "县"
name_en = "County"

[[group_set]]
id = "tier"
name_zh = "机构类别"
name_en = "Tier"
[[group_set.option]]
id = "county"
name_zh = "县医院"
name_en = "County hospital"
[[group_set.option]]
id = "township"
name_zh = "乡镇卫生院"
name_en = "Township health centre"
[[group_set.option]]
id = "village"
name_zh = "村卫生室"
name_en = "Village clinic"

[[unit]]
code = "root"
name_zh = "市"
name_en = "City"
level = "city"

[[unit]]
code = "c1"
name_zh = "一县"
name_en = "County 1"
level = "county"
parent = "root"

[[unit]]
code = "c2"
name_zh = "二县"
name_en = "County 2"
level = "county"
parent = "root"
"#;

    fn supervision() -> (tempfile::TempDir, Supervision) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("region.toml"), TREE).expect("write");
        let mut config: crate::supervision::SupervisionConfig =
            toml::from_str("region = \"region.toml\"").expect("config");
        config.resolve(dir.path());
        (dir, Supervision::load(config).expect("load"))
    }

    fn row(unit: &str, indicator: &str, value: Option<f64>, flags: &str) -> Map<String, Value> {
        let v = json!({
            "period": "2026-10", "unit": unit, "indicator": indicator, "category": "",
            "value": value, "ci_low": value.map(|v| v - 1.0), "ci_high": value.map(|v| v + 1.0), "flags": flags,
        });
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn indicators_by_unit_as_csv_and_excel() {
        let (_dir, sup) = supervision();
        let values = vec![
            row("root", "outpatient_emergency_visits", Some(120.0), ""),
            row("c1", "outpatient_emergency_visits", Some(70.0), ""),
            row(
                "c2",
                "outpatient_emergency_visits",
                None,
                "insufficient data",
            ),
            row("c1", "drug_share_of_cost", Some(41.5), "red line"),
            // Another period and a disaggregation are not in the table.
            {
                let mut r = row("c2", "drug_share_of_cost", Some(1.0), "");
                r.insert("period".into(), json!("2026-09"));
                r
            },
            {
                let mut r = row("c2", "drug_share_of_cost", Some(2.0), "");
                r.insert("category".into(), json!("sex=8532"));
                r
            },
        ];
        let p = Pivot::new(
            &sup,
            &values,
            "2026-10",
            Some("county"),
            Some("root"),
            false,
        )
        .expect("pivot");
        let csv = p.csv();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "indicator_id,indicator,unit,red_line,c1 County 1,c2 County 2"
        );
        assert!(
            lines[1].starts_with("outpatient_emergency_visits,")
                && lines[1].ends_with(",70,insufficient data"),
            "{csv}"
        );
        assert!(
            lines[2].starts_with("drug_share_of_cost,") && lines[2].ends_with(",30,41.5,"),
            "{csv}"
        );
        assert_eq!(lines.len(), 3);
        let zh = Pivot::new(&sup, &values, "2026-10", None, None, true).expect("pivot");
        assert!(
            zh.csv()
                .starts_with("指标编码,指标,单位,红线,root 市,c1 一县,c2 二县"),
            "{}",
            zh.csv()
        );
        assert!(zh.csv().contains("数据不足"));
        let book = p.xlsx().expect("xlsx");
        assert_eq!(&book[..2], b"PK");

        let err = |r: Result<Pivot, String>| r.expect_err("refused");
        assert!(
            err(Pivot::new(&sup, &values, "2026-11", None, None, false))
                .contains("no released values")
        );
        assert!(
            err(Pivot::new(
                &sup,
                &values,
                "2026-10",
                Some("township"),
                None,
                false
            ))
            .contains("levels: city, county")
        );
        assert!(
            err(Pivot::new(
                &sup,
                &values,
                "2026-10",
                None,
                Some("x9"),
                false
            ))
            .contains("not in the region")
        );
    }
}
