//! `confer node check` and `confer coordinator check`: preflight checks an
//! IT team runs before starting a server (and a unit's `ExecStartPre` may
//! run): the same validation as start, without starting. Each line says
//! what passed or what to change; the exit code is 0 when everything
//! passed, 2 when only warnings remain (a certificate about to expire, a
//! clock a little off), 1 when something would stop the server or the
//! network.

use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use confer_transport::TlsFiles;
use confer_transport::pki::CertKind;

/// Days before expiry from which a certificate is a warning.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// Clock offset to a node beyond which the check warns, and fails.
const CLOCK_WARN: Duration = Duration::from_secs(5);
const CLOCK_FAIL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Fail,
}

/// The checks' outcome, when any did not pass (the CLI maps it to its
/// exit code: 1 for a failure, 2 for warnings only).
#[derive(Debug)]
pub struct Outcome {
    /// The process's exit code.
    pub code: u8,
    summary: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary)
    }
}

impl std::error::Error for Outcome {}

struct Checks {
    items: Vec<(Level, String, String)>,
}

impl Checks {
    fn new(title: String) -> Self {
        println!("{title}");
        Self { items: Vec::new() }
    }

    fn add(&mut self, level: Level, what: &str, detail: impl Into<String>) {
        let detail = detail.into();
        let tag = match level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        println!("  {tag}  {what:<18} {detail}");
        self.items.push((level, what.to_string(), detail));
    }

    fn ok(&mut self, what: &str, detail: impl Into<String>) {
        self.add(Level::Ok, what, detail);
    }

    fn warn(&mut self, what: &str, detail: impl Into<String>) {
        self.add(Level::Warn, what, detail);
    }

    fn fail(&mut self, what: &str, detail: impl Into<String>) {
        self.add(Level::Fail, what, detail);
    }

    fn finish(self) -> anyhow::Result<()> {
        let count = |l| self.items.iter().filter(|i| i.0 == l).count();
        let (ok, warn, fail) = (count(Level::Ok), count(Level::Warn), count(Level::Fail));
        let line = format!("{ok} passed, {warn} warning(s), {fail} failure(s)");
        match self.items.iter().map(|i| i.0).max() {
            None | Some(Level::Ok) => {
                println!("{line}");
                Ok(())
            }
            Some(Level::Warn) => Err(Outcome {
                code: 2,
                summary: format!("{line}: it will start, but see the warnings above"),
            }
            .into()),
            Some(Level::Fail) => Err(Outcome {
                code: 1,
                summary: format!("{line}: fix the failures above before starting"),
            }
            .into()),
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

use confer_transport::tls::utc_date as date;

/// The directory holds durable state: it can be created, written, synced
/// to disk (file and directory) and renamed in, as the ledger needs.
fn writable(c: &mut Checks, what: &str, key: &str, dir: &Path) {
    let attempt = || -> std::io::Result<()> {
        use std::io::Write as _;
        std::fs::create_dir_all(dir)?;
        let probe = dir.join(".confer-check");
        let moved = dir.join(".confer-check.done");
        {
            let mut f = std::fs::File::create(&probe)?;
            f.write_all(b"confer preflight check\n")?;
            f.sync_all()?;
        }
        std::fs::rename(&probe, &moved)?;
        std::fs::File::open(dir)?.sync_all()?;
        let back = std::fs::read(&moved)?;
        std::fs::remove_file(&moved)?;
        if back != b"confer preflight check\n" {
            return Err(std::io::Error::other("what was written did not read back"));
        }
        Ok(())
    };
    match attempt() {
        Ok(()) => c.ok(
            what,
            format!(
                "{key} = {}: writable; writes reach the disk (fsync of file and directory)",
                dir.display()
            ),
        ),
        Err(e) => c.fail(
            what,
            format!(
                "{key} = {}: {e}: give the service's user a writable directory on a local disk",
                dir.display()
            ),
        ),
    }
}

/// The address can be listened on (nothing else holds it).
fn port_free(c: &mut Checks, key: &str, addr: SocketAddr) {
    if addr.port() == 0 {
        c.ok("port", format!("{key} = {addr}: any free port"));
        return;
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => c.ok("port", format!("{key} = {addr}: free")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => c.fail(
            "port",
            format!("{key} = {addr} is in use: is the service already running (systemctl status), or another program on that port?"),
        ),
        Err(e) => c.fail("port", format!("{key} = {addr}: cannot listen: {e}")),
    }
}

/// The certificate and key as a server would load them, for a server of
/// `kind` named `name` (when given), signed by the network CA, valid now
/// and for a while.
fn certificate(c: &mut Checks, files: &TlsFiles, kind: CertKind, name: Option<&str>, host: &str) {
    let report = match confer_transport::tls::inspect(files) {
        Ok(r) => r,
        Err(e) => {
            c.fail("certificate", e.to_string());
            return;
        }
    };
    let now = now_secs();
    let problems = report.problems(files, kind, name, now);
    let mut fine = problems.is_empty();
    for problem in problems {
        let what = if problem.contains("later than this machine's clock") {
            "clock"
        } else {
            "certificate"
        };
        c.fail(what, problem);
    }
    if fine && report.not_after - now < EXPIRY_WARNING_DAYS * 86_400 {
        fine = false;
        c.warn(
            "certificate",
            format!(
                "expires on {} ({} days): issue a new one with `confer pki issue --replace ...`",
                date(report.not_after),
                (report.not_after - now) / 86_400
            ),
        );
    }
    let wildcard = host == "0.0.0.0" || host == "::" || host == "[::]";
    if !wildcard
        && !report
            .hosts
            .iter()
            .any(|h| h == host.trim_matches(['[', ']']))
    {
        c.warn(
            "certificate",
            format!(
                "it names {} but the server listens on {host}: peers that connect to {host} will refuse it",
                report.hosts.join(", ")
            ),
        );
    }
    if fine {
        c.ok(
            "certificate",
            format!(
                "{kind} certificate {:?} signed by the network CA, valid until {} ({} days); names {}",
                report.name,
                date(report.not_after),
                (report.not_after - now) / 86_400,
                report.hosts.join(", ")
            ),
        );
    }
}

fn transport(
    c: &mut Checks,
    tls: Option<&TlsFiles>,
    insecure_loopback: bool,
    addr: SocketAddr,
    kind: CertKind,
    name: Option<&str>,
) {
    match (tls, insecure_loopback) {
        (_, true) if confer_transport::plaintext_allowed(&addr) => c.ok(
            "transport",
            format!("plaintext on loopback {addr} (--insecure-loopback: demos and tests only)"),
        ),
        (_, true) => c.fail(
            "transport",
            format!("--insecure-loopback on {addr}: plaintext is allowed only on a loopback address; configure [tls]"),
        ),
        (None, false) => c.fail(
            "transport",
            "no [tls] section: give cert, key and ca (`confer pki`), or run with --insecure-loopback on a loopback address",
        ),
        (Some(files), false) => certificate(c, files, kind, name, &addr.ip().to_string()),
    }
}

/// What `check` says of a store's schema version. `Some(copy)`: the store
/// is older, and `copy` is a snapshot of it in a temporary directory that
/// the caller opens (upgrading the copy, never the store) to prove the
/// upgrade works; `None` with nothing failed: open the store itself.
fn store_version(
    c: &mut Checks,
    what: &str,
    path: &Path,
    schema: &confer_store::Schema,
) -> Result<Option<tempfile::TempDir>, ()> {
    match confer_store::inspect(path, schema) {
        Ok(confer_store::Found::Missing) => Ok(None),
        Ok(confer_store::Found::Current(_)) => Ok(None),
        Ok(confer_store::Found::Older { from, to }) => {
            let copy = tempfile::tempdir().map_err(|e| {
                c.fail(what, format!("cannot make a temporary directory: {e}"));
            })?;
            let name = path.file_name().unwrap_or_default();
            if let Err(e) = confer_store::snapshot(path, &copy.path().join(name)) {
                c.fail(what, e.to_string());
                return Err(());
            }
            c.warn(
                &format!("{what} version"),
                format!(
                    "{} is at schema version {from}, written by an earlier confer: the first start upgrades it to version {to}, copying it to {}.schema-v{from}.bak first. The upgrade was tried on a copy:",
                    path.display(),
                    path.display()
                ),
            );
            Ok(Some(copy))
        }
        Err(e) => {
            c.fail(what, e.to_string());
            Err(())
        }
    }
}

/// The node's ledger: its version (an older one upgraded on a copy), its
/// audit chain, and the node it belongs to. Writes nothing.
fn ledger(c: &mut Checks, state: &Path, name: &str) {
    let path = state.join("ledger.sqlite");
    if !path.is_file() {
        c.ok(
            "ledger",
            "none yet: the node creates it when it first starts",
        );
        return;
    }
    let Ok(copy) = store_version(c, "ledger", &path, &confer_node::ledger::SCHEMA) else {
        return;
    };
    let dir = match &copy {
        Some(copy) => {
            // The chain's head file travels with the copy.
            let head = state.join("audit.head");
            if head.is_file()
                && let Err(e) = std::fs::copy(&head, copy.path().join("audit.head"))
            {
                c.fail("ledger", format!("cannot copy {}: {e}", head.display()));
                return;
            }
            copy.path()
        }
        None => state,
    };
    let opened =
        confer_node::ledger::Ledger::open(dir).and_then(|l| Ok((l.belongs_to(name)?, l.verify()?)));
    match opened {
        Ok((_, v)) if v.problem.is_none() => c.ok(
            "ledger",
            format!("{} audit record(s); the chain verifies", v.records),
        ),
        Ok((_, v)) => c.fail(
            "ledger",
            format!(
                "fails its check after {} record(s): {}; the node will not start on it: restore node.state_dir from a backup",
                v.records,
                v.problem.unwrap_or_default()
            ),
        ),
        Err(e) => c.fail(
            "ledger",
            e.to_string()
                .replace(&dir.join("ledger.sqlite").display().to_string(), &path.display().to_string()),
        ),
    }
}

/// The coordinator's state database: its version (an older one upgraded
/// on a copy) and its audit chain. Writes nothing to it.
fn coordinator_store(c: &mut Checks, state: &Path) {
    use confer_coordinator::store::Store as _;
    let schema = &confer_coordinator::store::SCHEMA;
    let Ok(copy) = store_version(c, "state", state, schema) else {
        return;
    };
    let target = match &copy {
        Some(copy) => copy.path().join(state.file_name().unwrap_or_default()),
        None => state.to_path_buf(),
    };
    match confer_coordinator::store::SqliteStore::open(&target).and_then(|s| s.verify_audit()) {
        Ok((records, None)) => c.ok(
            "state",
            format!(
                "{}: opens; {records} audit record(s), the chain verifies",
                state.display()
            ),
        ),
        Ok((records, Some(problem))) => c.fail(
            "state",
            format!(
                "{}: the audit log fails its check after {records} record(s): {problem}",
                state.display()
            ),
        ),
        Err(e) => c.fail(
            "state",
            e.to_string()
                .replace(&target.display().to_string(), &state.display().to_string()),
        ),
    }
}

/// `confer node check`.
pub async fn node(path: &Path, insecure_loopback: bool) -> anyhow::Result<()> {
    let mut c = Checks::new(format!("confer node check --config {}", path.display()));
    let config = match confer_node::NodeConfig::load(path) {
        Ok(config) => {
            c.ok(
                "config",
                format!("{} parses (node {:?})", path.display(), config.node.name),
            );
            config
        }
        Err(e) => {
            c.fail("config", e.to_string());
            return c.finish();
        }
    };
    match confer_node::policy::Policy::from_config(&config.policy) {
        Ok(p) => c.ok(
            "policy",
            format!(
                "valid (approval {}, node budget {})",
                format!("{:?}", p.approval).to_lowercase(),
                p.node_budget_rho
                    .map(|r| format!("rho {r}"))
                    .unwrap_or_else(|| "none".into())
            ),
        ),
        Err(e) => c.fail("policy", e.to_string()),
    }
    // The tables as the node checks them when it starts.
    let ctx = confer_query::bounding::context();
    match confer_node::catalog::load(&config, &ctx).await {
        Ok(info) => {
            let mut fine = true;
            if let Err(e) = confer_node::catalog::unique_public_columns(&ctx, &info).await {
                fine = false;
                c.fail("tables", e.to_string());
            }
            if let Some(section) = &config.supervision
                && let Err(e) = confer_node::catalog::check_supervision(&ctx, &info, section).await
            {
                fine = false;
                c.fail("supervision", e.to_string());
            }
            if fine {
                let names: Vec<&str> = info.tables.iter().map(|t| t.name.as_str()).collect();
                c.ok(
                    "tables",
                    format!(
                        "{} table(s) load and pass the start-up checks (types, one row per person, bounds): {}",
                        names.len(),
                        names.join(", ")
                    ),
                );
            }
        }
        Err(e) => c.fail("tables", e.to_string()),
    }
    let state = &config.node.state_dir;
    writable(&mut c, "state directory", "node.state_dir", state);
    ledger(&mut c, state, &config.node.name);
    let addr = match config.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            c.fail("config", e.to_string());
            return c.finish();
        }
    };
    transport(
        &mut c,
        config.tls.as_ref(),
        insecure_loopback,
        addr,
        CertKind::Node,
        Some(&config.node.name),
    );
    port_free(&mut c, "node.listen", addr);
    if let Some(console) = &config.console {
        match console.addr() {
            Ok(a) => {
                port_free(&mut c, "console.listen", a);
                if config.tls.is_none() && !confer_transport::plaintext_allowed(&a) {
                    c.fail(
                        "console",
                        format!(
                            "console.listen = {a}: plain HTTP only on loopback; configure [tls]"
                        ),
                    );
                }
            }
            Err(e) => c.fail("console", e),
        }
        if state.join(confer_node::console::TOKEN_FILE).is_file() {
            c.ok(
                "steward token",
                "set (`confer node steward-token` makes a new one)",
            );
        } else {
            c.warn(
                "steward token",
                "none yet: the steward page refuses every sign-in until `confer node steward-token --config ...` makes one",
            );
        }
    }
    c.finish()
}

/// `confer coordinator check`.
pub async fn coordinator(path: &Path, insecure_loopback: bool) -> anyhow::Result<()> {
    let mut c = Checks::new(format!(
        "confer coordinator check --config {}",
        path.display()
    ));
    let config = match confer_coordinator::CoordinatorConfig::load(path) {
        Ok(config) => {
            c.ok(
                "config",
                format!("{} parses ({} node(s))", path.display(), config.nodes.len()),
            );
            config
        }
        Err(e) => {
            c.fail("config", e.to_string());
            return c.finish();
        }
    };
    match confer_protocol::signing::Identity::load(&config.coordinator.signing_key) {
        Ok(id) => c.ok(
            "signing key",
            format!(
                "{}: nodes must hold its public key {}",
                config.coordinator.signing_key.display(),
                id.public_hex()
            ),
        ),
        Err(e) => c.fail(
            "signing key",
            format!(
                "coordinator.signing_key = {}: {} (create one with `confer keygen --out <file>`)",
                config.coordinator.signing_key.display(),
                e.message
            ),
        ),
    }
    if let Some(sup) = &config.supervision {
        match confer_coordinator::supervision::Supervision::load(sup.clone()) {
            Ok(s) => c.ok(
                "supervision",
                format!(
                    "{} org unit(s), {} indicator(s)",
                    s.region.units.len(),
                    s.catalogue.indicators.len()
                ),
            ),
            Err(e) => c.fail("supervision", e.to_string()),
        }
    }
    let state = &config.coordinator.state;
    if let Some(dir) = state.parent() {
        writable(&mut c, "state directory", "coordinator.state", dir);
    }
    coordinator_store(&mut c, state);
    let addr = match config.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            c.fail("config", e.to_string());
            return c.finish();
        }
    };
    transport(
        &mut c,
        config.tls.as_ref(),
        insecure_loopback,
        addr,
        CertKind::Coordinator,
        None,
    );
    port_free(&mut c, "coordinator.listen", addr);
    if let Some(console) = &config.console {
        match console.addr() {
            Ok(a) => port_free(&mut c, "console.listen", a),
            Err(e) => c.fail("console", e),
        }
    }
    // Every node, as the coordinator will reach it.
    let client_tls = match (&config.tls, insecure_loopback) {
        (Some(files), false) => match confer_transport::ClientTls::from_files(files) {
            Ok(t) => Some(t),
            Err(e) => {
                c.fail("nodes", format!("cannot use [tls] to reach the nodes: {e}"));
                return c.finish();
            }
        },
        _ => None,
    };
    for entry in &config.nodes {
        let what = format!("node {}", entry.name);
        let handle = match confer_coordinator::fanout::NodeHandle::new(entry, client_tls.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                c.fail(&what, e.to_string());
                continue;
            }
        };
        let started = Instant::now();
        let sent_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        match handle.health(Duration::from_secs(10), None).await {
            Ok(h) if h.node != entry.name => c.fail(
                &what,
                format!(
                    "{} answers as node {:?}: the [[nodes]] entry and that node's node.name must agree",
                    entry.url, h.node
                ),
            ),
            Ok(h) => {
                let rtt = started.elapsed();
                let detail = format!(
                    "{} answers in {} ms{} (confer {}, {} table(s))",
                    entry.url,
                    rtt.as_millis(),
                    if client_tls.is_some() { " over mutual TLS" } else { "" },
                    h.version,
                    h.tables
                );
                match h.time_ms {
                    Some(t) => {
                        let offset_ms = t - (sent_ms + rtt.as_millis() as i64 / 2);
                        let offset = Duration::from_millis(offset_ms.unsigned_abs());
                        if offset > CLOCK_FAIL {
                            c.fail(
                                &what,
                                format!(
                                    "{detail}; its clock is {:.1} s {} this one's: tasks expire by the clock (task_ttl_secs), set both with NTP",
                                    offset.as_secs_f64(),
                                    if offset_ms > 0 { "ahead of" } else { "behind" }
                                ),
                            );
                        } else if offset > CLOCK_WARN {
                            c.warn(
                                &what,
                                format!("{detail}; its clock is {:.1} s off this one's: check NTP", offset.as_secs_f64()),
                            );
                        } else {
                            c.ok(&what, format!("{detail}; clocks agree within {} s", CLOCK_WARN.as_secs()));
                        }
                    }
                    None => c.ok(&what, format!("{detail}; (an older node: its clock is not reported)")),
                }
            }
            Err(e) => c.fail(&what, e.message),
        }
    }
    c.finish()
}
