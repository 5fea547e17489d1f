//! Administration: users (on the coordinator's machine), studies and node
//! status (through the coordinator, as an authenticated user), and the
//! network's certificate authority.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::{DateTime, Utc};
use confer_coordinator::store::{NodeStatus, Role, SqliteStore, Store, Study, User};
use confer_protocol::catalog::Domain;
use confer_protocol::coordinator::actions as custom;
use confer_protocol::coordinator::{CatalogListing, NewStudy, StudyEdit};
use confer_transport::pki::{self, CertKind, IssueRequest};

use crate::ConnectArgs;
use crate::client::Client;

/// `confer coordinator user ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CoordinatorAction {
    /// Manage users (run on the coordinator's machine; it opens the state database).
    #[command(subcommand)]
    User(UserAction),
    /// Nodes as the coordinator keeps them (run on the coordinator's machine).
    #[command(subcommand)]
    Node(NodeAction),
    /// The coordinator's own audit log (run on the coordinator's machine).
    #[command(subcommand)]
    Audit(CoordinatorAuditAction),
    /// Preflight: check the config, signing key, state, certificates, ports
    /// and every node (reachable, the right name, its clock), without
    /// starting. Exit code 0 all passed, 2 warnings only, 1 a failure.
    Check {
        /// Check for a start with --insecure-loopback (plaintext on loopback).
        #[arg(long)]
        insecure_loopback: bool,
    },
}

/// The coordinator's audit log.
#[derive(Debug, clap::Subcommand)]
pub enum CoordinatorAuditAction {
    /// Check the log's hash chain: exits non-zero if a record was edited,
    /// deleted, inserted or moved.
    Verify,
}

/// Node administration at the coordinator.
#[derive(Debug, clap::Subcommand)]
pub enum NodeAction {
    /// Show the audit record each node's chain is anchored at.
    Anchors,
    /// Accept that a node's ledger was lost for good: forget its anchor, so
    /// the node is used again (with the ledger it has now) at the next
    /// health check. Only when its steward cannot restore the ledger from
    /// a backup; recorded in the coordinator's audit log.
    AcceptLedger {
        /// The node's site name.
        #[arg(long)]
        name: String,
        /// Why (for the audit log), e.g. the incident ticket.
        #[arg(long)]
        reason: String,
    },
}

/// User administration.
#[derive(Debug, clap::Subcommand)]
pub enum UserAction {
    /// Create a user and print its bearer token (shown once; only its hash is kept).
    Add {
        /// Login name.
        #[arg(long)]
        name: String,
        /// researcher, analyst, data_scientist or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// Also accept this client certificate (PEM) as the user's credential.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
    /// List users.
    List,
    /// Revoke a user: its token and certificates stop working (the name
    /// may be given again later, with a new token).
    Revoke {
        /// Login name.
        #[arg(long)]
        name: String,
    },
    /// Give a user a new token (printed once); the old one stops working.
    Rotate {
        /// Login name.
        #[arg(long)]
        name: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    Role::parse(s).ok_or_else(|| {
        format!("unknown role {s:?}: use researcher, analyst, data_scientist or admin")
    })
}

fn time(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) -> anyhow::Result<String> {
    let schema = Arc::new(Schema::new(
        headers
            .iter()
            .map(|h| Field::new(*h, DataType::Utf8, false))
            .collect::<Vec<_>>(),
    ));
    let columns = (0..headers.len())
        .map(|i| {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r[i].as_str()),
            )) as _
        })
        .collect();
    let batch = RecordBatch::try_new(schema, columns)?;
    Ok(arrow::util::pretty::pretty_format_batches(&[batch])?.to_string())
}

/// Runs `confer coordinator user ...`.
pub fn coordinator_action(config: &Path, action: CoordinatorAction) -> anyhow::Result<()> {
    let config = confer_coordinator::CoordinatorConfig::load(config)?;
    let store = SqliteStore::open(&config.coordinator.state)?;
    let action = match action {
        CoordinatorAction::User(action) => action,
        CoordinatorAction::Node(action) => return node_action(&config, &store, action),
        CoordinatorAction::Check { .. } => {
            bail!("`confer coordinator check` runs on its own (crate::check)")
        }
        CoordinatorAction::Audit(CoordinatorAuditAction::Verify) => {
            let (records, problem) = store.verify_audit()?;
            return match problem {
                None => {
                    println!(
                        "coordinator audit log {}: {records} records, hash chain intact",
                        config.coordinator.state.display()
                    );
                    Ok(())
                }
                Some(problem) => bail!(
                    "coordinator audit log {}: the first {records} records hold, then {problem}",
                    config.coordinator.state.display()
                ),
            };
        }
    };
    match action {
        UserAction::Add { name, role, cert } => {
            let token = store.add_user(&name, role)?;
            if let Some(cert) = cert {
                let pem = std::fs::read(&cert)
                    .with_context(|| format!("cannot read {}", cert.display()))?;
                let der = rustls_pem_first(&pem)
                    .ok_or_else(|| anyhow!("{} holds no PEM certificate", cert.display()))?;
                store.add_certificate(&name, &confer_protocol::signing::sha256_hex(&der))?;
                println!("client certificate {} registered to {name}", cert.display());
            }
            println!(
                "user {name} ({}) created. Token (shown once, keep it secret):\n{token}",
                role.name()
            );
        }
        UserAction::List => {
            let rows = store
                .users()?
                .into_iter()
                .map(|u| {
                    vec![
                        u.name,
                        u.role.name().to_string(),
                        time(u.created_ms),
                        u.revoked_ms.map(time).unwrap_or_default(),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["name", "role", "created (UTC)", "revoked (UTC)"], rows)?
            );
        }
        UserAction::Revoke { name } => {
            store.revoke_user(&name)?;
            println!("user {name} revoked");
        }
        UserAction::Rotate { name } => {
            let token = store.rotate_token(&name)?;
            println!(
                "user {name} has a new token (shown once, keep it secret; the old one no longer works):\n{token}"
            );
        }
    }
    Ok(())
}

/// Runs `confer coordinator node ...`.
fn node_action(
    config: &confer_coordinator::CoordinatorConfig,
    store: &SqliteStore,
    action: NodeAction,
) -> anyhow::Result<()> {
    match action {
        NodeAction::Anchors => {
            let rows = config
                .nodes
                .iter()
                .map(|n| {
                    let anchor = store.anchor(&n.name)?;
                    Ok(match anchor {
                        Some((seq, hash)) => {
                            vec![
                                n.name.clone(),
                                seq.to_string(),
                                hash.chars().take(16).collect(),
                            ]
                        }
                        None => vec![n.name.clone(), "none yet".into(), String::new()],
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            println!("{}", table(&["node", "anchored record", "hash"], rows)?);
        }
        NodeAction::AcceptLedger { name, reason } => {
            if !config.nodes.iter().any(|n| n.name == name) {
                bail!(
                    "coordinator.toml names no node {name:?}; its nodes are {}",
                    config
                        .nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if reason.trim().is_empty() {
                bail!(
                    "--reason must say why the ledger's loss is accepted (it goes to the audit log)"
                );
            }
            let had = store.anchor(&name)?;
            if had.is_none() {
                println!(
                    "node {name} has no anchor at this coordinator (it is not held for its ledger): \
                     nothing to accept"
                );
                return Ok(());
            }
            store.forget_anchor(&name)?;
            store.audit(&confer_coordinator::store::CoordinatorAudit {
                at_ms: confer_coordinator::store::now_ms(),
                user: whoami(),
                study: None,
                action: "node_ledger".into(),
                outcome: "accepted".into(),
                detail: format!(
                    "node {name}: the loss of its ledger is accepted and its anchor {} forgotten: {reason}",
                    had.map(|(s, _)| format!("at record {s}"))
                        .unwrap_or_else(|| "(none)".into())
                ),
            })?;
            println!(
                "node {name}: anchor forgotten; the coordinator uses the node again, with the ledger it has \
                 now, at its next health check"
            );
        }
    }
    Ok(())
}

/// Who runs this command, for the audit log.
fn whoami() -> String {
    std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .map(|u| format!("operator {u}"))
        .unwrap_or_else(|_| "operator".into())
}

fn rustls_pem_first(pem: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(pem).ok()?;
    let start = text.find("-----BEGIN CERTIFICATE-----")?;
    let body_start = start + "-----BEGIN CERTIFICATE-----".len();
    let end = text[body_start..].find("-----END CERTIFICATE-----")? + body_start;
    let b64: String = text[body_start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64_decode(&b64)
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// `confer study ...`.
#[derive(Debug, clap::Args)]
pub struct StudyArgs {
    /// Where and who.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// What to do.
    #[command(subcommand)]
    pub action: StudyAction,
}

/// Study commands.
#[derive(Debug, clap::Subcommand)]
pub enum StudyAction {
    /// Create a study (admin).
    Create {
        /// Short name queries use (letters, digits, '_', '-').
        #[arg(long)]
        name: String,
        /// Title.
        #[arg(long)]
        title: String,
        /// Principal investigator (a user).
        #[arg(long)]
        pi: String,
        /// Members (users), comma-separated.
        #[arg(long, value_delimiter = ',')]
        members: Vec<String>,
        /// Tables the study reads, comma-separated (default: any).
        #[arg(long, value_delimiter = ',')]
        tables: Vec<String>,
        /// Requested budget at each node: epsilon.
        #[arg(long)]
        epsilon: f64,
        /// Requested budget at each node: delta.
        #[arg(long, default_value_t = 1e-6)]
        delta: f64,
        /// Ethics approval reference.
        #[arg(long)]
        ethics_ref: String,
        /// Fewest sites that must answer a query (default: all).
        #[arg(long)]
        min_sites: Option<usize>,
    },
    /// Change a study (admin): its title, principal investigator, members
    /// or min_sites. The ethics reference, requested budget and tables that
    /// stewards approved do not change; for those, create a new study.
    Edit {
        /// The study.
        #[arg(long)]
        name: String,
        /// A new title.
        #[arg(long)]
        title: Option<String>,
        /// A new principal investigator (a user).
        #[arg(long)]
        pi: Option<String>,
        /// Users to add as members, comma-separated.
        #[arg(long, value_delimiter = ',')]
        add_members: Vec<String>,
        /// Members to remove, comma-separated.
        #[arg(long, value_delimiter = ',')]
        remove_members: Vec<String>,
        /// Fewest sites that must answer a query.
        #[arg(long, conflicts_with = "all_sites")]
        min_sites: Option<usize>,
        /// Every site must answer (the default min_sites).
        #[arg(long)]
        all_sites: bool,
    },
    /// Studies you may use.
    List,
    /// One study.
    Show {
        /// Its name.
        name: String,
    },
}

/// Runs `confer study ...`.
pub async fn study(args: StudyArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.connect).await?;
    match args.action {
        StudyAction::Create {
            name,
            title,
            pi,
            members,
            tables,
            epsilon,
            delta,
            ethics_ref,
            min_sites,
        } => {
            let new = NewStudy {
                name,
                title,
                principal_investigator: pi,
                members,
                tables,
                requested_epsilon: epsilon,
                requested_delta: delta,
                ethics_ref,
                min_sites,
            };
            let created: Study = serde_json::from_value(
                client
                    .action(custom::STUDY_CREATE, serde_json::to_vec(&new)?)
                    .await?,
            )?;
            println!("study {} created", created.name);
            print_study(&created);
        }
        StudyAction::Edit {
            name,
            title,
            pi,
            add_members,
            remove_members,
            min_sites,
            all_sites,
        } => {
            let edit = StudyEdit {
                name,
                title,
                principal_investigator: pi,
                add_members,
                remove_members,
                min_sites: if all_sites {
                    Some(None)
                } else {
                    min_sites.map(Some)
                },
            };
            let study: Study = serde_json::from_value(
                client
                    .action(custom::STUDY_EDIT, serde_json::to_vec(&edit)?)
                    .await?,
            )?;
            println!("study {} changed", study.name);
            print_study(&study);
        }
        StudyAction::List => {
            let studies: Vec<Study> =
                serde_json::from_value(client.action(custom::STUDY_LIST, Vec::new()).await?)?;
            if studies.is_empty() {
                println!("no studies you may use");
                return Ok(());
            }
            let rows = studies
                .into_iter()
                .map(|s| {
                    vec![
                        s.name,
                        s.title,
                        s.principal_investigator,
                        s.members.join(", "),
                        format!("eps {} delta {:e}", s.requested_epsilon, s.requested_delta),
                    ]
                })
                .collect();
            println!(
                "{}",
                table(
                    &[
                        "study",
                        "title",
                        "principal investigator",
                        "members",
                        "requested budget"
                    ],
                    rows
                )?
            );
        }
        StudyAction::Show { name } => {
            let study: Study = serde_json::from_value(
                client.action(custom::STUDY_SHOW, name.into_bytes()).await?,
            )?;
            print_study(&study);
        }
    }
    Ok(())
}

fn print_study(s: &Study) {
    println!("name:                   {}", s.name);
    println!("title:                  {}", s.title);
    println!("principal investigator: {}", s.principal_investigator);
    println!("members:                {}", s.members.join(", "));
    println!(
        "tables:                 {}",
        if s.tables.is_empty() {
            "any".to_string()
        } else {
            s.tables.join(", ")
        }
    );
    println!(
        "requested budget:       epsilon {} delta {:e} per node",
        s.requested_epsilon, s.requested_delta
    );
    println!("ethics approval:        {}", s.ethics_ref);
    println!(
        "min_sites:              {}",
        s.min_sites
            .map(|m| m.to_string())
            .unwrap_or_else(|| "all".into())
    );
    println!(
        "created:                {} by {}",
        time(s.created_ms),
        s.created_by
    );
}

/// Runs `confer nodes`.
pub async fn nodes(connect: ConnectArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&connect).await?;
    let who: User = serde_json::from_value(client.action(custom::WHOAMI, Vec::new()).await?)?;
    let statuses: Vec<NodeStatus> =
        serde_json::from_value(client.action(custom::NODES, Vec::new()).await?)?;
    let rows = statuses
        .into_iter()
        .map(|n| {
            vec![
                n.name,
                n.url,
                if n.healthy {
                    "up".into()
                } else {
                    "DOWN".into()
                },
                n.latency_ms
                    .map(|l| format!("{l:.1} ms"))
                    .unwrap_or_default(),
                n.last_seen_ms.map(time).unwrap_or_else(|| "never".into()),
                n.version.unwrap_or_default(),
                n.error.unwrap_or_default(),
            ]
        })
        .collect();
    println!(
        "{}",
        table(
            &[
                "node",
                "url",
                "status",
                "latency",
                "last seen (UTC)",
                "version",
                "error"
            ],
            rows
        )?
    );
    println!("(as {} / {})", who.name, who.role.name());
    Ok(())
}

/// Arguments of `confer catalog`.
#[derive(Debug, clap::Args)]
pub struct CatalogArgs {
    /// Where and who.
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print the catalog as JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Only this table.
    pub table: Option<String>,
}

/// `confer catalog`: the network catalog as the nodes publish it. It holds
/// declarations only (names, types, bounds, domains), never counts or values
/// of private tables.
pub async fn catalog(args: CatalogArgs) -> anyhow::Result<()> {
    let mut client = Client::connect_with(&args.connect).await?;
    let mut listing: CatalogListing =
        serde_json::from_value(client.action(custom::CATALOG, Vec::new()).await?)?;
    if let Some(only) = &args.table {
        listing
            .tables
            .retain(|t| t.info.name.eq_ignore_ascii_case(only));
        if listing.tables.is_empty() {
            bail!("no table {only} in the network catalog: run `confer catalog` to list them");
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
        return Ok(());
    }
    let rows = listing
        .tables
        .iter()
        .map(|t| {
            vec![
                t.info.name.clone(),
                match &t.info.privacy_unit {
                    Some(unit) if t.info.one_row_per_unit => {
                        format!("private (unit {unit}, one row each)")
                    }
                    Some(unit) => format!("private (unit {unit})"),
                    None => "public".into(),
                },
                t.info.columns.len().to_string(),
                if t.sites.len() == listing.sites.len() {
                    format!("all {}", t.sites.len())
                } else {
                    t.sites.join(", ")
                },
            ]
        })
        .collect();
    println!("{}", table(&["table", "kind", "columns", "sites"], rows)?);
    if args.table.is_some() {
        for t in &listing.tables {
            let rows = t
                .info
                .columns
                .iter()
                .map(|c| {
                    vec![
                        c.name.clone(),
                        c.column_type.to_string(),
                        c.bounds
                            .map(|(lo, hi)| format!("[{lo}, {hi}]"))
                            .unwrap_or_default(),
                        c.domain.as_ref().map(describe_domain).unwrap_or_default(),
                    ]
                })
                .collect();
            println!("{}", t.info.name);
            println!(
                "{}",
                table(&["column", "type", "bounds", "public domain"], rows)?
            );
        }
    } else {
        println!("(`confer catalog <table>` shows its columns, bounds and domains)");
    }
    if !listing.missing_sites.is_empty() {
        println!(
            "sites that did not answer: {} (their tables may be missing above)",
            listing.missing_sites.join(", ")
        );
    }
    Ok(())
}

fn describe_domain(domain: &Domain) -> String {
    match domain {
        Domain::Range { lo, hi } => format!("{lo}..={hi}"),
        Domain::Values { values } if values.len() <= 8 => values
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        Domain::Values { values } => format!(
            "{}, ... ({} values)",
            values[..6]
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            values.len()
        ),
    }
}

/// `confer pki ...`.
#[derive(Debug, clap::Args)]
pub struct PkiArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: PkiAction,
}

/// PKI commands.
#[derive(Debug, clap::Subcommand)]
pub enum PkiAction {
    /// Create the network CA (ca.pem, ca.key) in a directory.
    Init {
        /// Directory for the CA and the certificates it issues.
        #[arg(long)]
        dir: PathBuf,
        /// The network's name (in the CA's subject).
        #[arg(long, default_value = "confer network")]
        network: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
    },
    /// Issue a certificate from the CA.
    Issue {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// node, coordinator or client.
        #[arg(long, value_parser = parse_kind)]
        kind: CertKind,
        /// Site name, "coordinator", or a user name.
        #[arg(long)]
        name: String,
        /// Host names / IP addresses the certificate serves (repeat); default localhost and 127.0.0.1.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365, allow_hyphen_values = true)]
        days: i64,
        /// Replace the name's existing key and certificate.
        #[arg(long)]
        replace: bool,
    },
    /// Sign a node's certificate request (from `confer node init`) into an
    /// enrolment bundle: the node's certificate, the CA certificate, the
    /// coordinator's public key and a README for the site's operator.
    Enrol {
        /// The CA directory.
        #[arg(long)]
        dir: PathBuf,
        /// The node's request (<site>.csr).
        #[arg(long)]
        request: PathBuf,
        /// The coordinator's public signing key (coordinator.key.pub).
        #[arg(long)]
        coordinator_key: PathBuf,
        /// Refuse unless the request is for this site.
        #[arg(long)]
        site: Option<String>,
        /// Host names / addresses the certificate serves (repeat); default those the request lists.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Where to write the bundle (default <dir>/bundles/<site>).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn parse_kind(s: &str) -> Result<CertKind, String> {
    CertKind::parse(s).ok_or_else(|| format!("unknown kind {s:?}: use node, coordinator or client"))
}

/// Runs `confer pki ...`.
pub fn pki(args: PkiArgs) -> anyhow::Result<()> {
    match args.action {
        PkiAction::Init { dir, network, days } => {
            let issued = pki::init(&dir, &network, days)?;
            println!(
                "network CA created: {} (certificate, give it to every node, coordinator and client) and {} (keep it offline)",
                issued.cert.display(),
                issued.key.display()
            );
        }
        PkiAction::Issue {
            dir,
            kind,
            name,
            hosts,
            days,
            replace,
        } => {
            if days == 0 {
                bail!("--days must not be 0");
            }
            let issued = pki::issue(
                &dir,
                &IssueRequest {
                    kind,
                    name: &name,
                    hosts: &hosts,
                    days,
                    replace,
                },
            )?;
            println!(
                "{kind} certificate for {name}: {} and key {}",
                issued.cert.display(),
                issued.key.display()
            );
        }
        PkiAction::Enrol {
            dir,
            request,
            coordinator_key,
            site,
            hosts,
            days,
            out,
        } => crate::onboard::pki_enrol(
            &dir,
            &request,
            &coordinator_key,
            site.as_deref(),
            &hosts,
            days,
            out.as_deref(),
        )?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_certificates_decode() {
        let dir = tempfile::tempdir().expect("tempdir");
        pki::init(dir.path(), "t", 1).expect("ca");
        let pem = std::fs::read(dir.path().join("ca.pem")).expect("read");
        let der = rustls_pem_first(&pem).expect("decodes");
        assert!(pki::describe(&der).is_some());
    }
}
