//! A network certificate authority and its certificates.
//!
//! `confer pki init --dir pki` writes `ca.pem` and `ca.key`;
//! `confer pki issue --dir pki --kind node --name site-a --host 127.0.0.1`
//! writes `site-a.pem` and `site-a.key` signed by it. Keys are ECDSA P-256,
//! written with owner-only permissions.

use std::fmt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

use crate::{Result, TransportError};

/// What a certificate is for; written as its organizational unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// A node: serves Flight to the coordinator.
    Node,
    /// The coordinator: serves clients, and is the client of nodes.
    Coordinator,
    /// A researcher's or tool's client certificate.
    Client,
}

impl CertKind {
    /// The organizational unit that marks the kind.
    pub fn unit(self) -> &'static str {
        match self {
            CertKind::Node => "confer-node",
            CertKind::Coordinator => "confer-coordinator",
            CertKind::Client => "confer-client",
        }
    }

    /// Parses `node`, `coordinator` or `client`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "node" => Some(CertKind::Node),
            "coordinator" => Some(CertKind::Coordinator),
            "client" => Some(CertKind::Client),
            _ => None,
        }
    }

    /// The kind named by an organizational unit.
    pub fn from_unit(unit: &str) -> Option<Self> {
        [CertKind::Node, CertKind::Coordinator, CertKind::Client]
            .into_iter()
            .find(|k| k.unit() == unit)
    }
}

impl fmt::Display for CertKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertKind::Node => "node",
            CertKind::Coordinator => "coordinator",
            CertKind::Client => "client",
        })
    }
}

/// Paths of a certificate and its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM).
    pub key: PathBuf,
}

fn cert_err(e: impl fmt::Display) -> TransportError {
    TransportError::Certificate(e.to_string())
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options
        .open(path)
        .map_err(|e| TransportError::Files(format!("cannot write {}: {e}", path.display())))?;
    // The mode above applies only to a file it creates: a key written over
    // an existing file is made private too.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| {
                TransportError::Files(format!("cannot restrict {}: {e}", path.display()))
            })?;
    }
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| TransportError::Files(format!("cannot write {}: {e}", path.display())))
}

/// Creates the network CA in `dir` (refuses to overwrite one).
pub fn init(dir: &Path, network: &str, days: i64) -> Result<Issued> {
    std::fs::create_dir_all(dir)
        .map_err(|e| TransportError::Files(format!("cannot create {}: {e}", dir.display())))?;
    let issued = Issued {
        cert: dir.join("ca.pem"),
        key: dir.join("ca.key"),
    };
    if issued.cert.exists() || issued.key.exists() {
        return Err(TransportError::Files(format!(
            "{} already holds a CA (ca.pem / ca.key): remove them first, or issue certificates from it",
            dir.display()
        )));
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{network} CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, network);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(days.max(1));
    let cert = params.self_signed(&key).map_err(cert_err)?;
    write_file(&issued.key, &key.serialize_pem(), true)?;
    write_file(&issued.cert, &cert.pem(), false)?;
    Ok(issued)
}

/// What to issue.
#[derive(Debug, Clone)]
pub struct IssueRequest<'a> {
    /// Kind of certificate.
    pub kind: CertKind,
    /// Common name: the node's site name, "coordinator", or a user name.
    pub name: &'a str,
    /// Host names and IP addresses the certificate is valid for (servers).
    pub hosts: &'a [String],
    /// Validity from now, in days (may be negative, for tests of expiry).
    pub days: i64,
    /// Replace the name's existing key and certificate (otherwise refused).
    pub replace: bool,
}

/// Issues a certificate from the CA in `dir`, written as `<name>.pem` / `<name>.key`.
pub fn issue(dir: &Path, request: &IssueRequest<'_>) -> Result<Issued> {
    let (ca_pem, ca_key_pem) = read_ca(dir)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_err)?;
    check_name(request.name)?;
    let issued = Issued {
        cert: dir.join(format!("{}.pem", request.name)),
        key: dir.join(format!("{}.key", request.name)),
    };
    if !request.replace && (issued.cert.exists() || issued.key.exists()) {
        return Err(TransportError::Files(format!(
            "{} already has a certificate or key for {} ({} / {}): keep them, or pass --replace to issue \
             a new key and certificate in their place",
            dir.display(),
            request.name,
            issued.cert.display(),
            issued.key.display()
        )));
    }
    let mut hosts = request.hosts.to_vec();
    if hosts.is_empty() && request.kind != CertKind::Client {
        hosts = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let params = leaf_params(request.kind, request.name, hosts, request.days)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err)?;
    write_file(&issued.key, &key.serialize_pem(), true)?;
    write_file(&issued.cert, &cert.pem(), false)?;
    Ok(issued)
}

/// What the CA writes into a certificate of `kind` for `name`: the name,
/// the kind as organizational unit, the usages of the kind, the hosts and
/// the validity. Nothing a requester asks for beyond its key and hosts.
fn leaf_params(
    kind: CertKind,
    name: &str,
    hosts: Vec<String>,
    days: i64,
) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(hosts).map_err(cert_err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, kind.unit());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match kind {
        CertKind::Node => vec![ExtendedKeyUsagePurpose::ServerAuth],
        CertKind::Coordinator => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        CertKind::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let now = OffsetDateTime::now_utc();
    if days >= 0 {
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(days.max(1));
    } else {
        // Already expired: for testing that expiry is refused.
        params.not_before = now + Duration::days(days * 2);
        params.not_after = now + Duration::days(days);
    }
    Ok(params)
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(TransportError::Certificate(format!(
            "name {name:?}: use letters, digits, '-', '_', '.' or '@'"
        )));
    }
    if name == "ca" {
        return Err(TransportError::Certificate(
            "the name ca is the network CA's own files (ca.pem / ca.key): choose another name"
                .into(),
        ));
    }
    Ok(())
}

/// Paths of a key and the certificate request made with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    /// The private key (PEM, owner-only); it never leaves the server.
    pub key: PathBuf,
    /// The certificate signing request (PEM) for the network's operator.
    pub csr: PathBuf,
}

/// Makes a server's key and a certificate signing request for `name` and
/// `hosts` in `dir` (`<name>.key`, `<name>.csr`): the key stays here, the
/// request goes to the network's operator (`confer pki enrol`). Refuses to
/// replace an existing key unless `replace`.
pub fn request(dir: &Path, name: &str, hosts: &[String], replace: bool) -> Result<Requested> {
    check_name(name)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| TransportError::Files(format!("cannot create {}: {e}", dir.display())))?;
    let requested = Requested {
        key: dir.join(format!("{name}.key")),
        csr: dir.join(format!("{name}.csr")),
    };
    if !replace && requested.key.exists() {
        return Err(TransportError::Files(format!(
            "{} already exists: this server has a key (keep it, and send {} again), or pass --force to make a new one (its certificate must then be issued again)",
            requested.key.display(),
            requested.csr.display()
        )));
    }
    let key = KeyPair::generate().map_err(cert_err)?;
    let mut params = CertificateParams::new(hosts.to_vec()).map_err(cert_err)?;
    params.distinguished_name.push(DnType::CommonName, name);
    let csr = params.serialize_request(&key).map_err(cert_err)?;
    write_file(&requested.key, &key.serialize_pem(), true)?;
    write_file(&requested.csr, &csr.pem().map_err(cert_err)?, false)?;
    Ok(requested)
}

/// What a certificate request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The common name (the site).
    pub name: String,
    /// The host names and addresses it lists.
    pub hosts: Vec<String>,
}

fn san_text(san: &rcgen::SanType) -> Option<String> {
    match san {
        rcgen::SanType::DnsName(d) => Some(d.to_string()),
        rcgen::SanType::IpAddress(ip) => Some(ip.to_string()),
        _ => None,
    }
}

/// Parses a certificate signing request (PEM) and checks its signature
/// (the requester holds the key).
pub fn read_request(
    csr_pem: &str,
) -> Result<(rcgen::CertificateSigningRequestParams, RequestInfo)> {
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        TransportError::Certificate(format!(
            "not a valid certificate signing request ({e}): send the .csr file `confer node init` wrote"
        ))
    })?;
    let name = match csr.params.distinguished_name.get(&DnType::CommonName) {
        Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
        Some(rcgen::DnValue::PrintableString(s)) => s.as_str().to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let hosts = csr
        .params
        .subject_alt_names
        .iter()
        .filter_map(san_text)
        .collect();
    Ok((csr, RequestInfo { name, hosts }))
}

/// Signs a node's certificate request with the CA in `dir`: the
/// certificate names the request's site (which must be `expect_name` when
/// given), is a *node* certificate, and serves `hosts` (default: the hosts
/// the request lists). Returns the certificate (PEM) and what was signed.
pub fn sign_request(
    dir: &Path,
    csr_pem: &str,
    expect_name: Option<&str>,
    hosts: &[String],
    days: i64,
) -> Result<(String, RequestInfo)> {
    let (csr, mut info) = read_request(csr_pem)?;
    check_name(&info.name)?;
    if let Some(expected) = expect_name
        && expected != info.name
    {
        return Err(TransportError::Certificate(format!(
            "the request is for site {:?}, not {expected:?}: ask {expected} for its own request (nothing was signed)",
            info.name
        )));
    }
    if !hosts.is_empty() {
        info.hosts = hosts.to_vec();
    }
    if info.hosts.is_empty() {
        return Err(TransportError::Certificate(format!(
            "the request for {} names no host or address: pass --host with the address the coordinator connects to",
            info.name
        )));
    }
    let (ca_pem, ca_key_pem) = read_ca(dir)?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(cert_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(cert_err)?;
    let signed = rcgen::CertificateSigningRequestParams {
        params: leaf_params(CertKind::Node, &info.name, info.hosts.clone(), days)?,
        public_key: csr.public_key,
    }
    .signed_by(&issuer)
    .map_err(cert_err)?;
    Ok((signed.pem(), info))
}

/// The CA's certificate and key (PEM) in `dir`.
fn read_ca(dir: &Path) -> Result<(String, String)> {
    let ca_pem = std::fs::read_to_string(dir.join("ca.pem")).map_err(|e| {
        TransportError::Files(format!(
            "cannot read {}: {e} (create the CA with `confer pki init --dir {}`)",
            dir.join("ca.pem").display(),
            dir.display()
        ))
    })?;
    let ca_key_pem = std::fs::read_to_string(dir.join("ca.key")).map_err(|e| {
        TransportError::Files(format!("cannot read {}: {e}", dir.join("ca.key").display()))
    })?;
    Ok((ca_pem, ca_key_pem))
}

/// The kind and common name of a DER certificate, if it carries them.
pub fn describe(der: &[u8]) -> Option<(Option<CertKind>, String)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or("")
        .to_string();
    let kind = subject
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .find_map(CertKind::from_unit);
    Some((kind, cn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_certificates_that_name_their_kind() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test network", 30).expect("ca");
        assert!(
            init(dir.path(), "again", 30).is_err(),
            "an existing CA is not overwritten"
        );
        let issued = issue(
            dir.path(),
            &IssueRequest {
                kind: CertKind::Node,
                name: "site-a",
                hosts: &[],
                days: 30,
                replace: false,
            },
        )
        .expect("issue");
        let pem = std::fs::read(&issued.cert).expect("read");
        let der = rustls_pemfile::certs(&mut pem.as_slice())
            .next()
            .expect("one cert")
            .expect("valid pem");
        assert_eq!(
            describe(&der),
            Some((Some(CertKind::Node), "site-a".into()))
        );
        let err = issue(
            dir.path(),
            &IssueRequest {
                kind: CertKind::Client,
                name: "bad name",
                hosts: &[],
                days: 1,
                replace: false,
            },
        )
        .expect_err("bad name");
        assert!(err.to_string().contains("name"));
    }

    /// Issuing never overwrites the CA nor, unasked, an existing key; a key
    /// written over an existing file is private all the same.
    #[test]
    fn issuing_replaces_nothing_unasked_and_keys_stay_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "test network", 30).expect("ca");
        let request = |name: &'static str, replace: bool| IssueRequest {
            kind: CertKind::Node,
            name,
            hosts: &[],
            days: 30,
            replace,
        };
        let ca_key = std::fs::read(dir.path().join("ca.key")).expect("ca key");
        let err = issue(dir.path(), &request("ca", true)).expect_err("the CA's name");
        assert!(err.to_string().contains("choose another name"), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join("ca.key")).expect("ca key"),
            ca_key
        );

        let first = issue(dir.path(), &request("site-a", false)).expect("issue");
        let key = std::fs::read(&first.key).expect("key");
        let err = issue(dir.path(), &request("site-a", false)).expect_err("exists");
        assert!(err.to_string().contains("--replace"), "{err}");
        assert_eq!(std::fs::read(&first.key).expect("key"), key, "kept");

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&first.key, std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
            let again = issue(dir.path(), &request("site-a", true)).expect("replace");
            assert_ne!(std::fs::read(&again.key).expect("key"), key, "a new key");
            let mode = std::fs::metadata(&again.key)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
    }

    /// A node makes its key and request; the CA signs a node certificate
    /// for the site the request names, with the request's key, and refuses
    /// a request for another site or a tampered one.
    #[test]
    fn a_request_is_signed_into_a_node_certificate_for_its_own_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca");
        init(&ca_dir, "test network", 30).expect("ca");
        let node = dir.path().join("node");
        let req = request(&node, "site-a", &["10.0.0.5".into()], false).expect("request");
        assert!(
            request(&node, "site-a", &[], false).is_err(),
            "an existing key is kept"
        );
        let csr = std::fs::read_to_string(&req.csr).expect("csr");
        let err = sign_request(&ca_dir, &csr, Some("site-b"), &[], 30).expect_err("another site");
        assert!(err.to_string().contains("not \"site-b\""), "{err}");
        let (pem, info) = sign_request(&ca_dir, &csr, Some("site-a"), &[], 30).expect("sign");
        assert_eq!(info.name, "site-a");
        assert_eq!(info.hosts, ["10.0.0.5"]);
        let cert = node.join("site-a.pem");
        std::fs::write(&cert, &pem).expect("write");
        let files = crate::TlsFiles {
            cert,
            key: req.key.clone(),
            ca: ca_dir.join("ca.pem"),
            client_certs: crate::tls::ClientCerts::Required,
        };
        // The certificate and the node's key match, and the CA signed it.
        let report = crate::tls::inspect(&files).expect("inspect");
        assert_eq!(report.kind, Some(CertKind::Node));
        assert_eq!(report.name, "site-a");
        assert!(report.issued_by_ca);
        assert_eq!(report.hosts, ["10.0.0.5"]);
        // A request edited after signing fails its signature.
        let mut bytes = csr.into_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).expect("utf8");
        assert!(sign_request(&ca_dir, &tampered, None, &[], 30).is_err());
    }
}
