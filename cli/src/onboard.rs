//! Onboarding a node: `confer node init` (a commented node.toml from the
//! data, the node's key and certificate request), `confer pki enrol` (the
//! network's operator signs the request into an enrolment bundle) and
//! `confer node enrol` (the node checks the bundle and puts it in place).
//!
//! The bundle signs identities, not tunables: the CA certificate, the
//! node's certificate for its own key and name, and the coordinator's
//! public signing key. Every policy line stays the steward's to edit.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use confer_transport::pki::{self, CertKind};

/// The files of an enrolment bundle, besides `<site>.pem`.
const BUNDLE_CA: &str = "ca.pem";
const BUNDLE_COORDINATOR_KEY: &str = "coordinator.key.pub";
const BUNDLE_README: &str = "README.txt";

/// `confer node init`.
#[derive(Debug, Clone)]
pub struct InitArgs {
    /// The data directory.
    pub data: PathBuf,
    /// The site's name.
    pub site: String,
    /// Where to write node.toml and pki/.
    pub out: PathBuf,
    /// The node's listen address.
    pub listen: String,
    /// Host names / addresses for the certificate request.
    pub hosts: Vec<String>,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Replace an existing node.toml and key.
    pub force: bool,
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(confer_protocol::signing::sha256_hex(&bytes))
}

/// Runs `confer node init`.
pub async fn init(args: InitArgs) -> anyhow::Result<()> {
    let config = args.out.join("node.toml");
    if config.exists() && !args.force {
        bail!(
            "{} already exists: edit it, or pass --force to write a new one in its place (the old one is kept as node.toml.old)",
            config.display()
        );
    }
    let mut hosts = args.hosts.clone();
    if hosts.is_empty() {
        let host = args
            .listen
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
            .unwrap_or_default();
        if host.is_empty() || host == "0.0.0.0" || host == "::" {
            bail!(
                "--listen {} names no address the coordinator can reach: pass --host with this server's name or address (repeatable), as the coordinator will connect to it",
                args.listen
            );
        }
        hosts.push(host);
    }
    eprintln!("surveying {} ...", args.data.display());
    let survey = confer_node::onboard::survey(&args.data)
        .await
        .map_err(|e| anyhow!(e))?;
    let pki_dir = args.out.join("pki");
    let requested = pki::request(&pki_dir, &args.site, &hosts, args.force)?;
    let text = confer_node::onboard::render(
        &survey,
        &confer_node::onboard::InitOptions {
            site: args.site.clone(),
            listen: args.listen.clone(),
            state_dir: args.state_dir.clone(),
            pki_dir: PathBuf::from("pki"),
        },
    );
    if config.exists() {
        std::fs::copy(&config, args.out.join("node.toml.old"))
            .with_context(|| format!("cannot keep {} as node.toml.old", config.display()))?;
    }
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    use confer_node::onboard::Finding;
    println!("wrote {}:", config.display());
    for source in &survey.sources {
        let what = match &source.finding {
            Finding::OmopPersons => {
                "served: OMOP CDM, privacy unit person_id, passes the start-up checks".to_string()
            }
            Finding::OmopVocabulary => "served: OMOP vocabulary, public".to_string(),
            Finding::OmopHeld(why) => format!("HELD (commented out): {why}"),
            Finding::Other { columns, .. } => format!(
                "TO CONFIRM (commented out): not OMOP; {} column(s) with inferred types, choose a privacy unit",
                columns.len()
            ),
            Finding::Unreadable(why) => format!("UNREADABLE: {why}"),
        };
        println!("  {:<24} {what}", source.table);
    }
    for (path, why) in &survey.ignored {
        println!("  (ignored) {}: {why}", path.display());
    }
    println!(
        "wrote the node's key {} (stays here) and certificate request {} for {} ({})",
        requested.key.display(),
        requested.csr.display(),
        args.site,
        hosts.join(", ")
    );
    println!(
        "next: send {} to the network's operator, who runs\n  confer pki enrol --dir <ca-dir> --request {}.csr --coordinator-key coordinator.key.pub\nand sends back a bundle; then\n  confer node enrol --bundle <bundle-dir> --config {}\n  confer node check --config {}\n(request fingerprint sha256 {}: read it to the operator to compare)",
        requested.csr.display(),
        args.site,
        config.display(),
        config.display(),
        sha256_file(&requested.csr)?
    );
    Ok(())
}

/// Runs `confer pki enrol`: signs a node's request into a bundle.
pub fn pki_enrol(
    dir: &Path,
    request: &Path,
    coordinator_key: &Path,
    site: Option<&str>,
    hosts: &[String],
    days: i64,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    if days <= 0 {
        bail!("--days must be positive");
    }
    let csr = std::fs::read_to_string(request)
        .with_context(|| format!("cannot read the request {}", request.display()))?;
    let key_text = std::fs::read_to_string(coordinator_key).with_context(|| {
        format!(
            "cannot read the coordinator's public key {} (written by `confer keygen` beside its secret key)",
            coordinator_key.display()
        )
    })?;
    confer_protocol::signing::PublicKey::from_hex(key_text.trim()).map_err(|e| {
        anyhow!(
            "{} is not a coordinator public key ({e}): give the .pub file `confer keygen` wrote, never the secret key",
            coordinator_key.display()
        )
    })?;
    let (pem, info) = pki::sign_request(dir, &csr, site, hosts, days)?;
    let bundle = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| dir.join("bundles").join(&info.name));
    if bundle.exists()
        && std::fs::read_dir(&bundle)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        bail!(
            "{} already holds files: move them away, or give --out another directory (nothing was written)",
            bundle.display()
        );
    }
    std::fs::create_dir_all(&bundle)
        .with_context(|| format!("cannot create {}", bundle.display()))?;
    let cert = bundle.join(format!("{}.pem", info.name));
    std::fs::write(&cert, &pem)?;
    std::fs::copy(dir.join("ca.pem"), bundle.join(BUNDLE_CA))?;
    std::fs::write(
        bundle.join(BUNDLE_COORDINATOR_KEY),
        format!("{}\n", key_text.trim()),
    )?;
    let readme = format!(
        "Enrolment bundle for node \"{name}\"
================================

What it holds:
  {name}.pem           the node's certificate: a *node* certificate for
                       \"{name}\", valid for {hosts}, for {days} days,
                       for the key that stayed on the node (pki/{name}.key)
  ca.pem               the network's CA certificate
                       (sha256 {ca_fp})
  coordinator.key.pub  the coordinator's public signing key: the node runs
                       only tasks it signed
                       ({coord})

It signs identities, not tunables: nothing here sets a budget, a table or
a policy line. The steward edits node.toml freely.

On the node's server (as the user that owns /etc/confer):

  confer node enrol --bundle <this directory> --config /etc/confer/node.toml
  confer node check --config /etc/confer/node.toml

`node enrol` refuses a bundle for another site, a certificate for another
key, or a CA or coordinator key different from the ones already installed
(unless --replace-trust), and overwrites nothing when it refuses.

Request fingerprint (sha256 of the .csr this was signed from): {csr_fp}
Compare it with the one `confer node init` printed at the site.
",
        name = info.name,
        hosts = info.hosts.join(", "),
        ca_fp = sha256_file(&dir.join("ca.pem"))?,
        coord = key_text.trim(),
        csr_fp = confer_protocol::signing::sha256_hex(csr.as_bytes()),
    );
    std::fs::write(bundle.join(BUNDLE_README), readme)?;
    println!(
        "signed a node certificate for \"{}\" ({}; {days} days); enrolment bundle: {}\n  (request fingerprint sha256 {}: compare it with the site's)",
        info.name,
        info.hosts.join(", "),
        bundle.display(),
        confer_protocol::signing::sha256_hex(csr.as_bytes())
    );
    Ok(())
}

/// What `node enrol` reads of node.toml: only the names and paths, so that
/// a config whose certificate and key file do not exist yet can be read.
#[derive(Debug, serde::Deserialize)]
struct EnrolView {
    node: EnrolNode,
    tls: Option<confer_transport::TlsFiles>,
}

#[derive(Debug, serde::Deserialize)]
struct EnrolNode {
    name: String,
    coordinator_key_file: Option<PathBuf>,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_relative() {
        base.join(p)
    } else {
        p.to_path_buf()
    }
}

/// Runs `confer node enrol`: checks a bundle against this node (its name,
/// its key, the trust already installed) and copies it into the places
/// node.toml names. Writes nothing unless every check passes.
pub fn node_enrol(config: &Path, bundle: &Path, replace_trust: bool) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let view: EnrolView =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {e}", config.display()))?;
    let base = config.parent().unwrap_or(Path::new("."));
    let tls = view.tls.ok_or_else(|| {
        anyhow!(
            "{} has no [tls] section: add cert, key and ca (as `confer node init` writes them)",
            config.display()
        )
    })?;
    let key_file = view.node.coordinator_key_file.ok_or_else(|| {
        anyhow!(
            "{}: node.coordinator_key_file is not set: add coordinator_key_file = \"pki/coordinator.key.pub\"",
            config.display()
        )
    })?;
    let name = view.node.name;
    let target = confer_transport::TlsFiles {
        cert: resolve(base, &tls.cert),
        key: resolve(base, &tls.key),
        ca: resolve(base, &tls.ca),
        client_certs: tls.client_certs,
    };
    let key_file = resolve(base, &key_file);
    let cert = bundle.join(format!("{name}.pem"));
    if !cert.is_file() {
        let others: Vec<String> = std::fs::read_dir(bundle)
            .with_context(|| format!("cannot read the bundle {}", bundle.display()))?
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|f| f.ends_with(".pem") && f != BUNDLE_CA)
            .collect();
        bail!(
            "{} holds no certificate for this node \"{name}\" (it has {}): a bundle for another site; ask the network's operator for this site's (nothing was changed)",
            bundle.display(),
            if others.is_empty() {
                "none".to_string()
            } else {
                others.join(", ")
            }
        );
    }
    // The bundle as it would be served: its certificate with this node's
    // key, checked against the bundle's CA.
    let staged = confer_transport::TlsFiles {
        cert: cert.clone(),
        key: target.key.clone(),
        ca: bundle.join(BUNDLE_CA),
        client_certs: target.client_certs,
    };
    confer_transport::tls::check_own(&staged, CertKind::Node, Some(&name)).map_err(|e| {
        anyhow!(
            "the bundle {} does not fit this node: {e} (nothing was changed)",
            bundle.display()
        )
    })?;
    let coordinator = std::fs::read_to_string(bundle.join(BUNDLE_COORDINATOR_KEY))
        .with_context(|| format!("the bundle lacks {BUNDLE_COORDINATOR_KEY}"))?;
    confer_protocol::signing::PublicKey::from_hex(coordinator.trim()).map_err(|e| {
        anyhow!(
            "the bundle's {BUNDLE_COORDINATOR_KEY} is not a public key ({e}): nothing was changed"
        )
    })?;
    // Trust already installed is replaced only on purpose.
    for (installed, incoming, what) in [
        (&target.ca, bundle.join(BUNDLE_CA), "network CA"),
        (
            &key_file,
            bundle.join(BUNDLE_COORDINATOR_KEY),
            "coordinator key",
        ),
    ] {
        if installed.is_file()
            && std::fs::read(installed)?.trim_ascii() != std::fs::read(&incoming)?.trim_ascii()
            && !replace_trust
        {
            bail!(
                "the bundle's {what} differs from the one installed at {}: a bundle from another network, or the network changed it. Pass --replace-trust if the network's operator says so (nothing was changed)",
                installed.display()
            );
        }
    }
    for (from, to) in [
        (bundle.join(BUNDLE_CA), &target.ca),
        (cert, &target.cert),
        (bundle.join(BUNDLE_COORDINATOR_KEY), &key_file),
    ] {
        if let Some(dir) = to.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Written beside and renamed in: a crash leaves the old file or the new.
        let tmp = to.with_extension("enrol-tmp");
        std::fs::copy(&from, &tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
        std::fs::rename(&tmp, to)
            .with_context(|| format!("cannot put {} in place", to.display()))?;
    }
    let report = confer_transport::tls::inspect(&target)?;
    println!(
        "node \"{name}\" enrolled: certificate valid until {} for {}; CA {}; coordinator key {}\nnext: confer node check --config {}",
        confer_transport::tls::utc_date(report.not_after),
        report.hosts.join(", "),
        target.ca.display(),
        key_file.display(),
        config.display()
    );
    Ok(())
}
