//! Mutual TLS with rustls.
//!
//! A server built from [`TlsFiles`] accepts TCP connections, runs each TLS
//! handshake in its own task (a slow peer cannot stall others), and hands
//! tonic only the streams that completed. A refused handshake is logged with
//! the peer address and a plain reason (expired certificate, certificate
//! from another CA, no certificate, wrong kind of certificate).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::pki::{self, CertKind};
use crate::{Result, TransportError};

/// How long a peer may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]` in node.toml and coordinator.toml.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// This server's certificate (PEM), issued by the network CA.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The network CA certificate (PEM): peers must present certificates it issued.
    pub ca: PathBuf,
    /// Whether clients must present a certificate: `required` (nodes:
    /// only the coordinator may call), `optional` (the coordinator: clients
    /// may use tokens instead), or `off`.
    #[serde(default = "default_client_certs")]
    pub client_certs: ClientCerts,
}

fn default_client_certs() -> ClientCerts {
    ClientCerts::Required
}

/// Client certificate policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCerts {
    /// Every client must present a certificate from the CA.
    Required,
    /// A certificate is checked if presented.
    Optional,
    /// Client certificates are not asked for.
    Off,
}

impl TlsFiles {
    /// Resolves relative paths against `base`.
    pub fn resolve(&mut self, base: &Path) {
        for p in [&mut self.cert, &mut self.key, &mut self.ca] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path)
        .map_err(|e| TransportError::Files(format!("tls.{what} = {}: {e}", path.display())))
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path, what)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| {
            TransportError::Files(format!(
                "tls.{what} = {}: not PEM certificates: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(TransportError::Files(format!(
            "tls.{what} = {}: holds no certificate",
            path.display()
        )));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read(path, "key")?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| TransportError::Files(format!("tls.key = {}: {e}", path.display())))?
        .ok_or_else(|| {
            TransportError::Files(format!(
                "tls.key = {}: holds no private key",
                path.display()
            ))
        })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for c in certs(path, "ca")? {
        store
            .add(c)
            .map_err(|e| TransportError::Files(format!("tls.ca = {}: {e}", path.display())))?;
    }
    Ok(Arc::new(store))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    peer_kind: Option<CertKind>,
    role: &'static str,
}

impl ServerTls {
    /// A server that presents `files.cert`, trusts `files.ca` for client
    /// certificates, and (if `peer_kind` is set) accepts only client
    /// certificates of that kind. `role` names the server in log lines.
    pub fn new(files: &TlsFiles, peer_kind: Option<CertKind>, role: &'static str) -> Result<Self> {
        Self::build(files, files.client_certs, peer_kind, role, &[b"h2"])
    }

    /// A server for browsers (the web consoles): the same certificate,
    /// speaking HTTP/2 or HTTP/1.1. A client certificate from the CA is
    /// checked if the browser presents one but is not required (unless
    /// `files` turns them off): a console signs users in with their
    /// tokens, and a browser rarely holds a node's certificate.
    pub fn for_web(files: &TlsFiles, role: &'static str) -> Result<Self> {
        let certs = match files.client_certs {
            ClientCerts::Off => ClientCerts::Off,
            _ => ClientCerts::Optional,
        };
        Self::build(files, certs, None, role, &[b"h2", b"http/1.1"])
    }

    fn build(
        files: &TlsFiles,
        client_certs: ClientCerts,
        peer_kind: Option<CertKind>,
        role: &'static str,
        alpn: &[&[u8]],
    ) -> Result<Self> {
        let chain = certs(&files.cert, "cert")?;
        let key = key(&files.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TransportError::Tls(e.to_string()))?;
        let builder = match client_certs {
            ClientCerts::Off => builder.with_no_client_auth(),
            mode => {
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider());
                let verifier = if mode == ClientCerts::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| {
                    TransportError::Tls(format!("tls.ca = {}: {e}", files.ca.display()))
                })?)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TransportError::Files(format!("tls.cert / tls.key do not match: {e}")))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            peer_kind,
            role,
        })
    }

    /// The stream of completed TLS connections accepted on `listener`.
    pub fn incoming(
        self,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(role = self.role, "accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                let this = self.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, this.acceptor.accept(tcp)).await {
                        Err(_) => warn!(
                            role = this.role,
                            %peer,
                            "refused TLS connection from {peer}: the handshake did not finish within {} s",
                            HANDSHAKE_TIMEOUT.as_secs()
                        ),
                        Ok(Err(e)) => warn!(
                            role = this.role,
                            %peer,
                            "refused TLS connection from {peer}: {}",
                            explain_handshake_error(&e)
                        ),
                        Ok(Ok(stream)) => {
                            if let Some(wanted) = this.peer_kind {
                                let presented = stream
                                    .get_ref()
                                    .1
                                    .peer_certificates()
                                    .and_then(|c| c.first())
                                    .and_then(|c| pki::describe(c.as_ref()));
                                match presented {
                                    Some((Some(kind), _)) if kind == wanted => {}
                                    Some((kind, name)) => {
                                        warn!(
                                            role = this.role,
                                            %peer,
                                            "refused TLS connection from {peer}: certificate {name:?} is a {} certificate, \
                                             only {wanted} certificates may connect",
                                            kind.map(|k| k.to_string()).unwrap_or_else(|| "non-confer".into())
                                        );
                                        return;
                                    }
                                    None => {
                                        warn!(role = this.role, %peer, "refused TLS connection from {peer}: no client certificate");
                                        return;
                                    }
                                }
                            }
                            info!(role = this.role, %peer, "TLS connection accepted");
                            let _ = tx.send(Ok(stream)).await;
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

/// A plain reason for a failed handshake.
pub fn explain_handshake_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    let t = text.to_ascii_lowercase().replace([' ', '_'], "");
    let reason = if t.contains("expired") {
        "the peer's certificate has expired"
    } else if t.contains("notvalidyet") {
        "the peer's certificate is not valid yet"
    } else if t.contains("unknownissuer") || t.contains("badsignature") {
        "the peer's certificate was not issued by this network's CA"
    } else if t.contains("nocertificatespresented") || t.contains("peersentnocertificates") {
        "the peer presented no client certificate"
    } else if t.contains("notvalidforname") {
        "the certificate is not valid for this host name"
    } else {
        return format!("TLS handshake failed: {text}");
    };
    format!("{reason} ({text})")
}

/// TLS settings for connecting to a TLS server.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: tonic::transport::ClientTlsConfig,
}

impl ClientTls {
    /// Trusts `ca`; presents `identity` (cert, key) if given.
    pub fn new(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self> {
        let ca_pem = read(ca, "ca")?;
        certs(ca, "ca")?;
        let mut config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem));
        if let Some((cert, key_path)) = identity {
            certs(cert, "cert")?;
            key(key_path)?;
            config = config.identity(tonic::transport::Identity::from_pem(
                read(cert, "cert")?,
                read(key_path, "key")?,
            ));
        }
        Ok(Self { config })
    }

    /// From `[tls]` files (the coordinator connecting to nodes).
    pub fn from_files(files: &TlsFiles) -> Result<Self> {
        Self::new(&files.ca, Some((&files.cert, &files.key)))
    }

    /// The tonic configuration, for `host`.
    pub fn for_host(&self, host: &str) -> tonic::transport::ClientTlsConfig {
        self.config.clone().domain_name(host)
    }
}

/// What a server's certificate files hold, for a preflight check (`confer
/// node check`, `confer coordinator check`): read, matched and checked
/// against the CA without serving.
#[derive(Debug, Clone, PartialEq)]
pub struct CertReport {
    /// The kind the certificate was issued for.
    pub kind: Option<CertKind>,
    /// Its common name (a site, `coordinator`, a user).
    pub name: String,
    /// Valid from, seconds since the epoch.
    pub not_before: i64,
    /// Valid until, seconds since the epoch.
    pub not_after: i64,
    /// The names and addresses it is valid for.
    pub hosts: Vec<String>,
    /// Whether `files.ca` signed it.
    pub issued_by_ca: bool,
}

/// Reads `files`: the certificate and key must match (as a server would
/// load them), the certificate must parse, and is checked against the CA.
pub fn inspect(files: &TlsFiles) -> Result<CertReport> {
    // Loads them as a server does: a key that does not match fails here.
    ServerTls::new(files, None, "check")?;
    let leaf = certs(&files.cert, "cert")?.remove(0);
    let ca = certs(&files.ca, "ca")?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| TransportError::Files(format!("tls.cert = {}: {e}", files.cert.display())))?;
    let issued_by_ca = ca.iter().any(|c| {
        x509_parser::parse_x509_certificate(c.as_ref()).is_ok_and(|(_, ca)| {
            cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
    });
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => hosts.push(d.to_string()),
                x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                    4 => {
                        hosts.push(std::net::Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]).to_string())
                    }
                    16 => {
                        let mut b = [0u8; 16];
                        b.copy_from_slice(ip);
                        hosts.push(std::net::Ipv6Addr::from(b).to_string());
                    }
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let (kind, name) = pki::describe(leaf.as_ref()).unwrap_or((None, String::new()));
    Ok(CertReport {
        kind,
        name,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        hosts,
        issued_by_ca,
    })
}

/// A date as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_date(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02} UTC",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

impl CertReport {
    /// Why a server of `kind` named `name` (when given) must not serve with
    /// this certificate at `now` (seconds since the epoch): another kind,
    /// another site's name, another network's CA, not valid yet (a clock
    /// behind), expired. Empty when it may. Each says what to change.
    pub fn problems(
        &self,
        files: &TlsFiles,
        kind: CertKind,
        name: Option<&str>,
        now: i64,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if self.kind != Some(kind) {
            problems.push(format!(
                "tls.cert = {} is {} certificate; this server needs a {kind} certificate (`confer pki issue --kind {kind} ...`, or `confer pki enrol` for a node)",
                files.cert.display(),
                self.kind
                    .map(|k| format!("a {k}"))
                    .unwrap_or_else(|| "not a confer".into())
            ));
        }
        if let Some(name) = name
            && self.name != name
        {
            problems.push(format!(
                "tls.cert = {} was issued to {:?}, but this {kind} is {name:?}: a certificate for another site (have one issued for {name}, or correct the name in the config)",
                files.cert.display(),
                self.name
            ));
        }
        if !self.issued_by_ca {
            problems.push(format!(
                "tls.cert = {} is not signed by tls.ca = {}: a certificate of another network, or the wrong CA file",
                files.cert.display(),
                files.ca.display()
            ));
        }
        if now < self.not_before {
            problems.push(format!(
                "tls.cert is valid only from {}, later than this machine's clock ({}): set the clock (NTP) or have it issued again",
                utc_date(self.not_before),
                utc_date(now)
            ));
        } else if now > self.not_after {
            problems.push(format!(
                "tls.cert = {} expired on {}: have a new one issued (`confer pki issue --replace ...` or `confer pki enrol`)",
                files.cert.display(),
                utc_date(self.not_after)
            ));
        }
        problems
    }
}

/// Refuses to serve with a certificate that [`CertReport::problems`]
/// finds fault with, before any port is opened.
pub fn check_own(files: &TlsFiles, kind: CertKind, name: Option<&str>) -> Result<CertReport> {
    let report = inspect(files)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let problems = report.problems(files, kind, name, now);
    if problems.is_empty() {
        Ok(report)
    } else {
        Err(TransportError::Certificate(problems.join("; ")))
    }
}
