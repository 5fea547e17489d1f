//! `confer supervision`: the health commission's supervision statistics.
//!
//! * `confer supervision indicators` lists the indicators the coordinator
//!   releases, their definitions and what a period costs each node;
//!   `--write FILE` writes the standard catalogue to start your own from.
//! * `confer supervision run --period 2026-10` releases a period (or
//!   completes it, or returns it as stored) and prints a compact report.
//! * `confer supervision report --period 2026-10 --out report.xlsx` exports
//!   a period (CSV, Parquet or an Excel workbook, from the extension).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use arrow::array::{Array, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::DataType;

use crate::ConnectArgs;
use crate::client::Client;

/// Arguments of `confer supervision`.
#[derive(Debug, clap::Args)]
pub struct SupervisionArgs {
    /// Where and who.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: SupervisionAction,
}

/// Names in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// English.
    En,
    /// Chinese.
    Zh,
}

/// `confer supervision` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum SupervisionAction {
    /// The indicators, their definitions, and each period's budget.
    Indicators {
        /// Write the standard catalogue to FILE (to edit and name in
        /// coordinator.toml's [supervision] indicators) instead.
        #[arg(long)]
        write: Option<PathBuf>,
    },
    /// Release a period's statistics (a stored complete period is returned as it is, nothing spent).
    Run {
        /// 2026-10 (a month), 2026-Q3 (a quarter) or 2026 (a year).
        #[arg(long)]
        period: String,
        /// Deepest level shown in the printed report (1: the region only).
        #[arg(long, default_value_t = 2)]
        depth: usize,
        /// Language of the names.
        #[arg(long, value_enum, default_value_t = Lang::En)]
        lang: Lang,
    },
    /// A released period as a report: printed, or written to --out (.csv, .parquet, .xlsx).
    Report {
        /// The period.
        #[arg(long)]
        period: String,
        /// Write to this file; the extension picks the format.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Deepest level shown (printed report and CSV; the workbook holds every unit).
        #[arg(long, default_value_t = 2)]
        depth: usize,
        /// Language of the names.
        #[arg(long, value_enum, default_value_t = Lang::En)]
        lang: Lang,
    },
}

/// Runs `confer supervision`.
pub async fn supervision(args: SupervisionArgs) -> anyhow::Result<()> {
    if let SupervisionAction::Indicators { write: Some(path) } = &args.action {
        if path.exists() {
            bail!("{} exists: choose a new file", path.display());
        }
        std::fs::write(path, confer_coordinator::supervision::indicators::STANDARD)
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!(
            "wrote the standard catalogue to {}: edit it, then set indicators = \"{}\" under [supervision] in coordinator.toml",
            path.display(),
            path.display()
        );
        return Ok(());
    }
    let mut client = Client::connect_with(&args.connect).await?;
    match args.action {
        SupervisionAction::Indicators { write: None } => indicators(&mut client).await,
        SupervisionAction::Indicators { write: Some(_) } => Ok(()),
        SupervisionAction::Run {
            period,
            depth,
            lang,
        } => {
            print!(
                "{}",
                run_and_report(&mut client, &period, depth, lang).await?
            );
            Ok(())
        }
        SupervisionAction::Report {
            period,
            out,
            depth,
            lang,
        } => {
            let table = Report::fetch(&mut client, &period).await?;
            match out {
                None => {
                    print!("{}", table.text(depth, lang));
                    Ok(())
                }
                Some(path) => {
                    table.write(&path, depth, lang)?;
                    println!("wrote {}", path.display());
                    Ok(())
                }
            }
        }
    }
}

async fn indicators(client: &mut Client) -> anyhow::Result<()> {
    let o = client
        .action(
            confer_protocol::coordinator::actions::SUPERVISION_INDICATORS,
            Vec::new(),
        )
        .await?;
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    println!(
        "{} units in {} levels; study {}; {} per year at each node (epsilon at delta {})",
        o["units"],
        o["levels"].as_array().map_or(0, Vec::len),
        s(&o["study"]),
        o["epsilon_per_year"],
        o["delta"]
    );
    for p in o["periods"].as_array().into_iter().flatten() {
        println!(
            "  a {}: {} indicators from {} DP queries per node, epsilon {:.4} each; the period spends rho {:.5} (epsilon {:.3})",
            s(&p["period"]),
            p["indicators"],
            p["measures"],
            p["epsilon_per_measure"].as_f64().unwrap_or(0.0),
            p["rho"].as_f64().unwrap_or(0.0),
            p["epsilon"].as_f64().unwrap_or(0.0)
        );
    }
    println!();
    for i in o["indicators"].as_array().into_iter().flatten() {
        let mut line = format!(
            "{} — {} / {} [{}; {}",
            s(&i["id"]),
            s(&i["name_en"]),
            s(&i["name_zh"]),
            s(&i["group"]),
            s(&i["kind"])
        );
        if !s(&i["unit"]).is_empty() {
            line.push_str(&format!(", {}", s(&i["unit"])));
        }
        if let Some(r) = i["red_line"].as_f64() {
            line.push_str(&format!(", red line {r}"));
        }
        if let Some(t) = i["target"].as_f64() {
            line.push_str(&format!(", target {t}"));
        }
        line.push(']');
        println!("{line}");
        if !s(&i["description"]).is_empty() {
            println!("    {}", s(&i["description"]));
        }
        for part in ["numerator", "denominator"] {
            let a = &i[part];
            if a.is_null() {
                continue;
            }
            let concepts: Vec<String> = a["concepts"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c.to_string())
                .collect();
            let mut cond = s(&a["where"]).replace("{concepts}", &concepts.join(", "));
            if cond.is_empty() {
                cond = "(all rows)".into();
            }
            println!(
                "    {part}: {} FROM {} WHERE {cond}; by {} in the period; at most {} rows per person and care site, {} care sites per person",
                s(&a["aggregate"]),
                s(&a["from"]),
                s(&a["date"]),
                a["max_rows"],
                a["max_units"]
            );
        }
    }
    Ok(())
}

/// Releases `period` and returns what to print: the run's summary and,
/// unless `depth` is 0, the report down to that level.
pub async fn run_and_report(
    client: &mut Client,
    period: &str,
    depth: usize,
    lang: Lang,
) -> anyhow::Result<String> {
    let body = serde_json::to_vec(&serde_json::json!({ "period": period }))?;
    let report = client
        .action(confer_protocol::coordinator::actions::SUPERVISION_RUN, body)
        .await?;
    let mut out = run_summary(&report);
    if depth > 0 {
        let table = Report::fetch(client, period).await?;
        out.push('\n');
        out.push_str(&table.text(depth, lang));
    }
    Ok(out)
}

fn run_summary(r: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let period = r["period"].as_str().unwrap_or("");
    if r["stored"].as_bool() == Some(true) {
        let _ = writeln!(
            out,
            "{period}: already released; the stored release is shown (nothing asked, nothing spent)"
        );
    } else {
        let _ = writeln!(
            out,
            "{period}: {} DP queries at each node (epsilon {:.4}, delta {} each): the period spends rho {:.5} at each node; {} values ({} insufficient data); {:.1} s",
            r["measures"],
            r["epsilon_per_measure"].as_f64().unwrap_or(0.0),
            r["delta"],
            r["rho_per_node"].as_f64().unwrap_or(0.0),
            r["values"],
            r["insufficient"],
            r["millis"].as_f64().unwrap_or(0.0) / 1000.0
        );
    }
    for n in r["nodes"].as_array().into_iter().flatten() {
        if n["complete"].as_bool() != Some(true) {
            let _ = writeln!(
                out,
                "  node {} missing ({}): its units are flagged incomplete; run the period again to ask it again",
                n["node"].as_str().unwrap_or(""),
                n["missing"].as_str().unwrap_or("")
            );
        }
    }
    out
}

/// One indicator value in a report.
#[derive(Debug, Clone)]
struct Cell {
    value: Option<f64>,
    ci: Option<(f64, f64)>,
    flags: String,
}

/// A period's released values, pivoted: indicators × units.
struct Report {
    period: String,
    /// (id, name_en, name_zh, unit, red_line)
    indicators: Vec<(String, String, String, String, Option<f64>)>,
    /// (code, name_en, name_zh, level, depth), tree order.
    units: Vec<(String, String, String, String, usize)>,
    cells: BTreeMap<(String, String), Cell>,
    /// The long table, for Parquet.
    long: Vec<RecordBatch>,
}

fn strings(b: &RecordBatch, name: &str) -> anyhow::Result<Vec<Option<String>>> {
    let col = b
        .column_by_name(name)
        .ok_or_else(|| anyhow!("the answer has no column {name}"))?;
    let col = arrow::compute::cast(col, &DataType::Utf8)?;
    let a = col
        .as_any()
        .downcast_ref::<StringArray>()
        .ok_or_else(|| anyhow!("column {name}"))?;
    Ok((0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
        .collect())
}

fn floats(b: &RecordBatch, name: &str) -> anyhow::Result<Vec<Option<f64>>> {
    let col = b
        .column_by_name(name)
        .ok_or_else(|| anyhow!("the answer has no column {name}"))?;
    let col = arrow::compute::cast(col, &DataType::Float64)?;
    let a = col
        .as_any()
        .downcast_ref::<Float64Array>()
        .ok_or_else(|| anyhow!("column {name}"))?;
    Ok((0..a.len())
        .map(|i| (!a.is_null(i)).then(|| a.value(i)))
        .collect())
}

impl Report {
    async fn fetch(client: &mut Client, period: &str) -> anyhow::Result<Self> {
        let period = period.trim().to_string();
        if period.contains('\'') {
            bail!("period {period:?}: write 2026-10, 2026-Q3 or 2026");
        }
        let inds = client
            .run(
                "SELECT id, name_en, name_zh, unit, red_line FROM supervision.indicators",
                None,
            )
            .await?;
        let units = client
            .run(
                "SELECT code, name_en, name_zh, level, depth, path FROM supervision.org_units ORDER BY path",
                None,
            )
            .await?;
        let values = client
            .run(
                &format!(
                    "SELECT * FROM supervision.values WHERE period = '{period}' ORDER BY indicator, unit, category"
                ),
                None,
            )
            .await?;
        let mut report = Report {
            period: period.clone(),
            indicators: Vec::new(),
            units: Vec::new(),
            cells: BTreeMap::new(),
            long: values.batches.clone(),
        };
        for b in &inds.batches {
            let (id, en, zh, unit) = (
                strings(b, "id")?,
                strings(b, "name_en")?,
                strings(b, "name_zh")?,
                strings(b, "unit")?,
            );
            let red = floats(b, "red_line")?;
            for i in 0..b.num_rows() {
                report.indicators.push((
                    id[i].clone().unwrap_or_default(),
                    en[i].clone().unwrap_or_default(),
                    zh[i].clone().unwrap_or_default(),
                    unit[i].clone().unwrap_or_default(),
                    red[i],
                ));
            }
        }
        for b in &units.batches {
            let (code, en, zh, level) = (
                strings(b, "code")?,
                strings(b, "name_en")?,
                strings(b, "name_zh")?,
                strings(b, "level")?,
            );
            let depth = floats(b, "depth")?;
            for i in 0..b.num_rows() {
                report.units.push((
                    code[i].clone().unwrap_or_default(),
                    en[i].clone().unwrap_or_default(),
                    zh[i].clone().unwrap_or_default(),
                    level[i].clone().unwrap_or_default(),
                    depth[i].unwrap_or(0.0) as usize,
                ));
            }
        }
        let mut rows = 0;
        for b in &values.batches {
            let (unit, ind, cat, flags) = (
                strings(b, "unit")?,
                strings(b, "indicator")?,
                strings(b, "category")?,
                strings(b, "flags")?,
            );
            let (value, lo, hi) = (
                floats(b, "value")?,
                floats(b, "ci_low")?,
                floats(b, "ci_high")?,
            );
            for i in 0..b.num_rows() {
                rows += 1;
                if cat[i].as_deref().is_some_and(|c| !c.is_empty()) {
                    continue;
                }
                report.cells.insert(
                    (
                        ind[i].clone().unwrap_or_default(),
                        unit[i].clone().unwrap_or_default(),
                    ),
                    Cell {
                        value: value[i],
                        ci: lo[i].zip(hi[i]),
                        flags: flags[i].clone().unwrap_or_default(),
                    },
                );
            }
        }
        if rows == 0 {
            bail!(
                "no values for period {period}: release it first with `confer supervision run --period {period}`"
            );
        }
        Ok(report)
    }

    fn name<'a>(lang: Lang, en: &'a str, zh: &'a str) -> &'a str {
        match lang {
            Lang::En => en,
            Lang::Zh => zh,
        }
    }

    fn cell_text(c: Option<&Cell>) -> String {
        match c {
            None => "—".into(),
            Some(c) => match c.value {
                None => "insufficient".into(),
                Some(v) => {
                    let mut s = if v.abs() >= 100.0 {
                        format!("{v:.0}")
                    } else {
                        format!("{v:.1}")
                    };
                    if c.flags.contains("red line") {
                        s.push('!');
                    }
                    if c.flags.contains("incomplete") {
                        s.push('*');
                    }
                    s
                }
            },
        }
    }

    fn columns(&self, depth: usize) -> Vec<&(String, String, String, String, usize)> {
        self.units.iter().filter(|u| u.4 < depth.max(1)).collect()
    }

    fn text(&self, depth: usize, lang: Lang) -> String {
        let cols = self.columns(depth);
        let mut header = vec![format!("{} ({})", "indicator", self.period)];
        header.extend(
            cols.iter()
                .map(|u| Self::name(lang, &u.1, &u.2).to_string()),
        );
        let mut rows = vec![header];
        for (id, en, zh, unit, _) in &self.indicators {
            let mut row = vec![format!(
                "{}{}",
                Self::name(lang, en, zh),
                if unit.is_empty() {
                    String::new()
                } else {
                    format!(" ({unit})")
                }
            )];
            if cols
                .iter()
                .all(|u| !self.cells.contains_key(&(id.clone(), u.0.clone())))
            {
                continue;
            }
            row.extend(
                cols.iter()
                    .map(|u| Self::cell_text(self.cells.get(&(id.clone(), u.0.clone())))),
            );
            rows.push(row);
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (k, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .enumerate()
                .map(|(c, v)| {
                    let pad = widths[c] - v.chars().count();
                    if c == 0 {
                        format!("{v}{}", " ".repeat(pad))
                    } else {
                        format!("{}{v}", " ".repeat(pad))
                    }
                })
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if k == 0 {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 2 * (widths.len() - 1)));
                out.push('\n');
            }
        }
        out.push_str("! beyond the red line   * incomplete (a node did not report)   insufficient: interval too wide to be useful\n");
        out
    }

    fn write(&self, path: &Path, depth: usize, lang: Lang) -> anyhow::Result<()> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "csv" => self.write_csv(path, depth, lang),
            "parquet" => self.write_parquet(path),
            "xlsx" => self.write_xlsx(path, lang),
            other => bail!(
                "--out {}: the extension .{other} is not one of .csv, .parquet, .xlsx",
                path.display()
            ),
        }
    }

    fn write_csv(&self, path: &Path, depth: usize, lang: Lang) -> anyhow::Result<()> {
        let mut w = csv::Writer::from_path(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let cols = self.columns(depth);
        let mut header = vec!["indicator".to_string(), "name".into(), "unit".into()];
        header.extend(
            cols.iter()
                .map(|u| format!("{} {}", u.0, Self::name(lang, &u.1, &u.2))),
        );
        w.write_record(&header)?;
        for (id, en, zh, unit, _) in &self.indicators {
            let mut row = vec![
                id.clone(),
                Self::name(lang, en, zh).to_string(),
                unit.clone(),
            ];
            row.extend(
                cols.iter()
                    .map(|u| match self.cells.get(&(id.clone(), u.0.clone())) {
                        None => String::new(),
                        Some(c) => match c.value {
                            None => "insufficient data".into(),
                            Some(v) => format!(
                                "{v}{}",
                                if c.flags.contains("red line") {
                                    " (red line)"
                                } else {
                                    ""
                                }
                            ),
                        },
                    }),
            );
            w.write_record(&row)?;
        }
        w.flush()?;
        Ok(())
    }

    fn write_parquet(&self, path: &Path) -> anyhow::Result<()> {
        let schema = self
            .long
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| Arc::new(arrow::datatypes::Schema::empty()));
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        let mut writer = datafusion::parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
        for b in &self.long {
            writer.write(b)?;
        }
        writer.close()?;
        Ok(())
    }

    fn write_xlsx(&self, path: &Path, lang: Lang) -> anyhow::Result<()> {
        use rust_xlsxwriter::{Color, Format, Workbook};
        let mut book = Workbook::new();
        let bold = Format::new().set_bold();
        let breach = Format::new()
            .set_background_color(Color::RGB(0xF8CBAD))
            .set_num_format("0.0");
        let plain = Format::new().set_num_format("0.0");
        let grey = Format::new().set_italic().set_font_color(Color::Gray);
        let sheet = book.add_worksheet();
        sheet.set_name("Report")?;
        let title = match lang {
            Lang::En => format!(
                "Supervision indicators, {} (red: beyond the red line)",
                self.period
            ),
            Lang::Zh => format!("监管指标 {}（红色：超出红线）", self.period),
        };
        sheet.write_string_with_format(0, 0, &title, &bold)?;
        sheet.write_string_with_format(1, 0, "indicator", &bold)?;
        sheet.write_string_with_format(1, 1, "unit", &bold)?;
        sheet.write_string_with_format(1, 2, "red line", &bold)?;
        for (k, u) in self.units.iter().enumerate() {
            let col = 3 + k as u16;
            sheet.write_string_with_format(
                1,
                col,
                format!("{} {}", u.0, Self::name(lang, &u.1, &u.2)),
                &bold,
            )?;
        }
        for (r, (id, en, zh, unit, red)) in self.indicators.iter().enumerate() {
            let row = 2 + r as u32;
            sheet.write_string(row, 0, Self::name(lang, en, zh))?;
            sheet.write_string(row, 1, unit)?;
            if let Some(v) = red {
                sheet.write_number(row, 2, *v)?;
            }
            for (k, u) in self.units.iter().enumerate() {
                let col = 3 + k as u16;
                match self.cells.get(&(id.clone(), u.0.clone())) {
                    None => {}
                    Some(Cell { value: None, .. }) => {
                        sheet.write_string_with_format(row, col, "insufficient data", &grey)?;
                    }
                    Some(c @ Cell { value: Some(v), .. }) => {
                        let f = if c.flags.contains("red line") {
                            &breach
                        } else {
                            &plain
                        };
                        sheet.write_number_with_format(row, col, *v, f)?;
                    }
                }
            }
        }
        sheet.set_freeze_panes(2, 3)?;
        sheet.set_column_width(0, 40)?;
        let long = book.add_worksheet();
        long.set_name("Values")?;
        for (c, h) in ["indicator", "unit", "value", "ci_low", "ci_high", "flags"]
            .iter()
            .enumerate()
        {
            long.write_string_with_format(0, c as u16, *h, &bold)?;
        }
        for (r, ((ind, unit), cell)) in self.cells.iter().enumerate() {
            let row = 1 + r as u32;
            long.write_string(row, 0, ind)?;
            long.write_string(row, 1, unit)?;
            if let Some(v) = cell.value {
                long.write_number(row, 2, v)?;
            }
            if let Some((lo, hi)) = cell.ci {
                long.write_number(row, 3, lo)?;
                long.write_number(row, 4, hi)?;
            }
            long.write_string(row, 5, &cell.flags)?;
        }
        book.save(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }
}
