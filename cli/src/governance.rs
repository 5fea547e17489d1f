//! The data steward's commands: `confer node approve|deny|studies|failures|
//! lift|identity`, `confer audit verify|show|export`, and `confer keygen`.
//!
//! They open the node's ledger directly (the steward works on the node's
//! machine), so they work whether the node is running or not.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{DateTime, NaiveDate, Utc};
use confer_node::ledger::{AuditFilter, AuditRecord, Ledger};
use confer_node::policy::BudgetConfig;

/// `confer node approve|deny|studies`.
#[derive(Debug, clap::Subcommand)]
pub enum NodeAction {
    /// Approve a study at this node (optionally setting its budget here).
    Approve {
        /// The study.
        study: String,
        /// Budget epsilon (with --delta), overriding the policy's.
        #[arg(long, requires = "delta", conflicts_with = "rho")]
        epsilon: Option<f64>,
        /// Budget delta (with --epsilon).
        #[arg(long, requires = "epsilon")]
        delta: Option<f64>,
        /// Budget as zCDP rho, overriding the policy's.
        #[arg(long)]
        rho: Option<f64>,
        /// Who decides (recorded in the audit log).
        #[arg(long, default_value = "steward")]
        by: String,
    },
    /// Deny a study at this node; researchers see the reason.
    Deny {
        /// The study.
        study: String,
        /// Why (shown to the researcher).
        #[arg(long)]
        reason: String,
        /// Who decides (recorded in the audit log).
        #[arg(long, default_value = "steward")]
        by: String,
    },
    /// List the studies this node knows, with approval state and spending.
    Studies,
    /// List the tasks that failed after admission (each charged), by
    /// researcher, with how many count toward each one's quota.
    Failures,
    /// After reviewing a researcher's charged failures, let the node take
    /// their tasks again (their count starts from zero). Audited.
    Lift {
        /// The researcher.
        #[arg(long)]
        researcher: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Who decides (recorded in the audit log).
        #[arg(long, default_value = "steward")]
        by: String,
    },
    /// Print this node's secure-aggregation identity key (created on first
    /// use), for peers that pin it in policy.secure.peers.
    Identity,
    /// Create a new token for the steward's web page (`[console]`),
    /// printed once; the previous token and its sessions stop working.
    StewardToken,
    /// Onboarding: survey a data directory and write a commented node.toml
    /// (OMOP CDM tables recognised and checked; other files held with
    /// inferred types for the steward to confirm), the node's key and a
    /// certificate request for the network's operator (`confer pki enrol`).
    Init {
        /// The directory of the node's tables (CSV / Parquet files, or
        /// directories of them).
        #[arg(long)]
        data: PathBuf,
        /// The site's name (as the network will know it).
        #[arg(long)]
        site: String,
        /// Where to write node.toml and pki/ (the key and request).
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// The address the node serves on.
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: String,
        /// This server's name or address as the coordinator reaches it
        /// (repeatable); default: the --listen address.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// The node's state directory (the systemd unit allows this one).
        #[arg(long, default_value = "/var/lib/confer/node")]
        state_dir: PathBuf,
        /// Replace an existing node.toml (kept as node.toml.old) and key.
        #[arg(long)]
        force: bool,
    },
    /// Install an enrolment bundle from the network's operator: checks that
    /// it is for this site and this node's key, then puts the certificate,
    /// CA and coordinator key where node.toml names them.
    Enrol {
        /// The bundle directory `confer pki enrol` wrote.
        #[arg(long)]
        bundle: PathBuf,
        /// Accept a CA or coordinator key different from the installed ones.
        #[arg(long)]
        replace_trust: bool,
    },
    /// Preflight: check the config, tables, state directory, ledger,
    /// certificates and ports as the node's start would, without starting.
    /// Exit code 0 all passed, 2 warnings only, 1 a failure.
    Check {
        /// Check for a start with --insecure-loopback (plaintext on loopback).
        #[arg(long)]
        insecure_loopback: bool,
    },
}

/// `confer audit ...`.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The node's config (its state_dir holds the audit log).
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub action: AuditAction,
}

/// Audit log actions.
#[derive(Debug, clap::Subcommand)]
pub enum AuditAction {
    /// Check the hash chain; name the first edited, deleted or reordered record.
    Verify,
    /// Print audit records.
    Show {
        /// Only this study.
        #[arg(long)]
        study: Option<String>,
        /// Only records since this time: 2026-11-24, 2026-11-24T08:00:00Z, or 2h / 3d ago.
        #[arg(long)]
        since: Option<String>,
        /// Table for people, JSON lines for tools.
        #[arg(long, value_enum, default_value_t = AuditFormat::Table)]
        format: AuditFormat,
    },
    /// Write every record as JSON lines (for supervisors).
    Export {
        /// Output file ("-" for standard output).
        #[arg(long)]
        out: PathBuf,
    },
}

/// Audit output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFormat {
    /// Aligned table.
    Table,
    /// One JSON object per line.
    Jsonl,
}

fn open_ledger(config: Option<&Path>) -> anyhow::Result<Ledger> {
    let path = config.ok_or_else(|| anyhow!("--config <node.toml> is required"))?;
    let config = confer_node::NodeConfig::load(path)?;
    if !config.node.state_dir.join("ledger.sqlite").exists() {
        bail!(
            "no ledger at {}: the node has not run yet with this state_dir",
            config.node.state_dir.display()
        );
    }
    Ok(Ledger::open(&config.node.state_dir)?)
}

/// Runs a steward action on the node's ledger.
pub fn node_action(config: Option<&Path>, action: NodeAction) -> anyhow::Result<()> {
    let path = config.ok_or_else(|| anyhow!("--config <node.toml> is required"))?;
    let node = confer_node::NodeConfig::load(path)?;
    let ledger = Ledger::open(&node.node.state_dir)?;
    match action {
        NodeAction::Approve {
            study,
            epsilon,
            delta,
            rho,
            by,
        } => {
            let budget = match (epsilon, delta, rho) {
                (Some(epsilon), Some(delta), None) => {
                    Some(BudgetConfig::EpsilonDelta { epsilon, delta })
                }
                (None, None, Some(rho)) => Some(BudgetConfig::Rho { rho, delta: None }),
                _ => None,
            };
            let budget_rho = budget
                .map(|b| b.rho().map_err(|e| anyhow!("budget: {e}")))
                .transpose()?;
            ledger.approve(&study, budget_rho, &by)?;
            match budget_rho {
                Some(rho) => println!(
                    "study {study} approved at node {} with budget rho = {rho:.6}",
                    node.node.name
                ),
                None => println!(
                    "study {study} approved at node {} (budget from the policy)",
                    node.node.name
                ),
            }
        }
        NodeAction::Deny { study, reason, by } => {
            ledger.deny(&study, &reason, &by)?;
            println!("study {study} denied at node {}: {reason}", node.node.name);
        }
        NodeAction::Lift {
            researcher,
            reason,
            by,
        } => {
            let n = ledger.lift(&researcher, &by, &reason)?;
            println!(
                "researcher {researcher} may use node {} again ({n} charged failure(s) reviewed)",
                node.node.name
            );
        }
        NodeAction::Check { .. } | NodeAction::Init { .. } | NodeAction::Enrol { .. } => {
            bail!(
                "`confer node check`, `init` and `enrol` run on their own, without the ledger open"
            )
        }
        NodeAction::StewardToken => {
            let token = confer_node::console::new_steward_token(&node.node.state_dir)
                .with_context(|| {
                    format!(
                        "cannot write a steward token under {}",
                        node.node.state_dir.display()
                    )
                })?;
            let page = match &node.console {
                Some(c) => format!("the steward page at {} (console.listen)", c.listen),
                None => "the steward page (add [console] listen = \"127.0.0.1:8480\" to node.toml)"
                    .to_string(),
            };
            println!(
                "steward token for node {} (shown once; the previous one no longer signs in):\n{token}\nSign in with it at {page}.",
                node.node.name
            );
        }
        NodeAction::Identity => {
            let secure = confer_node::secure::SecureSessions::open(&node.node.state_dir)?;
            println!("{}", secure.identity());
        }
        NodeAction::Failures => {
            let policy = confer_node::policy::Policy::from_config(&node.policy)?;
            let failed: Vec<AuditRecord> = ledger
                .audit_records(&AuditFilter::default())?
                .into_iter()
                .filter(|r| r.decision == "failed")
                .collect();
            if failed.is_empty() {
                println!(
                    "no task has failed after admission at node {}",
                    node.node.name
                );
                return Ok(());
            }
            let mut researchers: Vec<String> =
                failed.iter().filter_map(|r| r.actor.clone()).collect();
            researchers.sort();
            researchers.dedup();
            for r in &researchers {
                let counted = ledger.failures_since_lift(r)?;
                println!(
                    "{r}: {counted} charged failure(s) count toward the quota of {}{}",
                    policy.max_failures_per_researcher,
                    if counted >= policy.max_failures_per_researcher {
                        " (refused until lifted)"
                    } else {
                        ""
                    }
                );
            }
            for r in failed {
                println!(
                    "  {}  {}  study {}  task {}  rho {:.6}  {}",
                    format_ms(r.at_ms),
                    r.actor.as_deref().unwrap_or("-"),
                    r.study.as_deref().unwrap_or("-"),
                    r.task_id.as_deref().unwrap_or("-"),
                    r.rho,
                    r.reason.as_deref().unwrap_or("")
                );
            }
        }
        NodeAction::Studies => {
            let rows = ledger.studies()?;
            if rows.is_empty() {
                println!("no study has reached node {} yet", node.node.name);
                return Ok(());
            }
            let schema = Arc::new(Schema::new(vec![
                Field::new("study", DataType::Utf8, false),
                Field::new("status", DataType::Utf8, false),
                Field::new("budget_rho (steward)", DataType::Float64, true),
                Field::new("spent_rho", DataType::Float64, false),
                Field::new("releases", DataType::Int64, false),
                Field::new("reason", DataType::Utf8, true),
                Field::new("description", DataType::Utf8, true),
            ]));
            let batch = RecordBatch::try_new(
                schema,
                vec![
                    Arc::new(StringArray::from_iter_values(
                        rows.iter().map(|r| printable(&r.study)),
                    )),
                    Arc::new(StringArray::from_iter_values(
                        rows.iter().map(|r| printable(&r.status)),
                    )),
                    Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.budget_rho))),
                    Arc::new(Float64Array::from_iter_values(
                        rows.iter().map(|r| r.spent_rho),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.releases as i64),
                    )),
                    Arc::new(StringArray::from_iter(
                        rows.iter().map(|r| r.reason.as_deref().map(printable)),
                    )),
                    Arc::new(StringArray::from_iter(
                        rows.iter().map(|r| r.description.as_deref().map(printable)),
                    )),
                ],
            )?;
            println!("{}", arrow::util::pretty::pretty_format_batches(&[batch])?);
        }
    }
    Ok(())
}

/// `confer audit ...`.
pub fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let ledger = open_ledger(args.config.as_deref())?;
    match args.action {
        AuditAction::Verify => {
            let v = ledger.verify()?;
            match v.problem {
                None => {
                    println!(
                        "audit log intact: {} records, hash chain and releases consistent",
                        v.records
                    );
                    Ok(())
                }
                Some(problem) => bail!(
                    "audit log check FAILED after {} good records: {problem}",
                    v.records
                ),
            }
        }
        AuditAction::Show {
            study,
            since,
            format,
        } => {
            let since_ms = since.as_deref().map(parse_since).transpose()?;
            let records = ledger.audit_records(&AuditFilter { study, since_ms })?;
            match format {
                AuditFormat::Jsonl => write_jsonl(&records, &mut std::io::stdout().lock()),
                AuditFormat::Table => {
                    if records.is_empty() {
                        println!("no audit records match");
                        return Ok(());
                    }
                    println!(
                        "{}",
                        arrow::util::pretty::pretty_format_batches(&[table(&records)?])?
                    );
                    Ok(())
                }
            }
        }
        AuditAction::Export { out } => {
            let records = ledger.audit_records(&AuditFilter::default())?;
            if out.as_os_str() == "-" {
                write_jsonl(&records, &mut std::io::stdout().lock())
            } else {
                let mut file = std::fs::File::create(&out)
                    .with_context(|| format!("cannot write {}", out.display()))?;
                write_jsonl(&records, &mut file)?;
                eprintln!("{} records written to {}", records.len(), out.display());
                Ok(())
            }
        }
    }
}

fn write_jsonl(records: &[AuditRecord], out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    for r in records {
        serde_json::to_writer(&mut *out, r)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// A time in the audit log, as people read it (UTC).
fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn table(records: &[AuditRecord]) -> anyhow::Result<RecordBatch> {
    let time = format_ms;
    let cost = |r: &AuditRecord| {
        if r.rho > 0.0 {
            format!("eps {:.3}, delta {:e}", r.epsilon, r.delta)
        } else {
            String::new()
        }
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("seq", DataType::Int64, false),
        Field::new("time (UTC)", DataType::Utf8, false),
        Field::new("study", DataType::Utf8, true),
        Field::new("actor", DataType::Utf8, true),
        Field::new("kind", DataType::Utf8, false),
        Field::new("decision", DataType::Utf8, false),
        Field::new("cost", DataType::Utf8, false),
        Field::new("task", DataType::Utf8, true),
        Field::new("reason", DataType::Utf8, true),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from_iter_values(records.iter().map(|r| r.seq))),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| time(r.at_ms)),
            )),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.study.as_deref().map(printable)),
            )),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.actor.as_deref().map(printable)),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| printable(&r.kind)),
            )),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| printable(&r.decision)),
            )),
            Arc::new(StringArray::from_iter_values(records.iter().map(cost))),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.task_id.as_deref()),
            )),
            Arc::new(StringArray::from_iter(
                records.iter().map(|r| r.reason.as_deref().map(printable)),
            )),
        ],
    )?)
}

/// Text from elsewhere (a coordinator's study title, a researcher name),
/// safe to print on the steward's terminal: control characters (escape
/// sequences, carriage returns, newlines) are shown escaped, never obeyed.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Parses `--since`: a date, an RFC 3339 time, or an age like `90m`, `2h`, `3d`.
pub fn parse_since(text: &str) -> anyhow::Result<i64> {
    let t = text.trim();
    if let Some((n, unit)) = t.find(|c: char| !c.is_ascii_digit()).map(|i| t.split_at(i))
        && !n.is_empty()
        && let Ok(n) = n.parse::<i64>()
    {
        let secs = match unit {
            "s" => n,
            "m" => n * 60,
            "h" => n * 3600,
            "d" => n * 86_400,
            _ => -1,
        };
        if secs >= 0 {
            return Ok(Utc::now().timestamp_millis() - secs * 1000);
        }
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(t) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d")
        && let Some(dt) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(dt.and_utc().timestamp_millis());
    }
    bail!(
        "--since {text:?}: write a date (2026-11-24), a time (2026-11-24T08:00:00Z) or an age (90m, 2h, 3d)"
    )
}

/// `confer keygen`.
pub fn keygen(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() && !force {
        bail!(
            "{} exists: pass --force to replace it (nodes trusting the old key will refuse new tasks)",
            out.display()
        );
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let identity = confer_protocol::signing::Identity::generate()?;
    let public = identity.save(out)?;
    let mut pub_path = out.as_os_str().to_owned();
    pub_path.push(".pub");
    let pub_path = PathBuf::from(pub_path);
    std::fs::write(&pub_path, format!("{public}\n"))
        .with_context(|| format!("cannot write {}", pub_path.display()))?;
    println!(
        "secret key written to {} (keep it private: it is the coordinator's signing key)",
        out.display()
    );
    println!(
        "public key written to {}; give it to every node as node.coordinator_key_file, or inline:\ncoordinator_key = \"{public}\"",
        pub_path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_from_a_coordinator_cannot_drive_the_terminal() {
        let title = "Study\u{1b}[2J\u{1b}]0;pwned\u{7}\r\nfake row";
        let shown = printable(title);
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.contains("\\u{1b}[2J"), "{shown}");
        assert_eq!(printable("Étude 研究"), "Étude 研究");
    }

    use super::*;

    #[test]
    fn since_accepts_dates_times_and_ages() {
        assert_eq!(parse_since("2026-01-02").expect("date"), 1_767_312_000_000);
        assert_eq!(
            parse_since("2026-01-02T00:00:01Z").expect("time"),
            1_767_312_001_000
        );
        let two_hours = parse_since("2h").expect("age");
        assert!((Utc::now().timestamp_millis() - two_hours - 7_200_000).abs() < 5_000);
        assert!(parse_since("yesterday").is_err());
    }
}
