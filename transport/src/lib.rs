//! Transport security for confer.
//!
//! * [`pki`]: a network certificate authority and the certificates it issues
//!   to nodes, coordinators and clients (`confer pki init|issue`). The kind
//!   of a certificate is its organizational unit (`confer-node`,
//!   `confer-coordinator`, `confer-client`).
//! * [`tls`]: serving Flight over mutual TLS (rustls only), with every
//!   refused handshake logged with the peer address and the reason, and
//!   connecting to a TLS server with a client certificate.
//! * [`identity`]: a node's secure-aggregation identity key bound to its
//!   certificate, so that peers accept only keys the network CA vouches for.
//! * [`serve`]: one way to start a tonic server on a bound listener, over
//!   plaintext (loopback only, decided by the caller) or TLS.
//!
//! ```text
//! coordinator ──mTLS (coordinator cert)──▶ node      node requires a coordinator cert from the CA
//! client ──TLS (optional client cert)──▶ coordinator  clients authenticate by token or certificate
//! ```

pub mod identity;
pub mod pki;
pub mod tls;

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::{Router, TcpIncoming};

pub use tls::{ClientTls, ServerTls, TlsFiles};

/// Errors of this crate; each names the file or the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A certificate, key or CA file is missing, unreadable or invalid.
    #[error("{0}")]
    Files(String),
    /// Generating or signing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// The TLS configuration is inconsistent.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Convenience alias.
pub type Result<T, E = TransportError> = std::result::Result<T, E>;

/// Whether an address may carry plaintext: loopback only.
pub fn plaintext_allowed(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// The host of a URL, without the brackets of an IPv6 address.
pub fn url_host(url: &str) -> Option<String> {
    let uri = url.parse::<tonic::codegen::http::Uri>().ok()?;
    uri.host()
        .map(|h| h.trim_matches(|c| c == '[' || c == ']').to_string())
}

/// Whether `host` (a name or an address, without brackets) is this machine.
pub fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Serves `router` on `listener` until `shutdown` fires: plaintext when
/// `tls` is `None`, else mutual TLS.
pub fn spawn(
    router: Router,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: oneshot::Receiver<()>,
) -> JoinHandle<std::result::Result<(), tonic::transport::Error>> {
    let signal = async {
        let _ = shutdown.await;
    };
    match tls {
        None => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal))
        }
        Some(tls) => {
            tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), signal))
        }
    }
}
