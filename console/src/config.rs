//! `[console]` in `coordinator.toml` and `node.toml`.

use std::net::SocketAddr;
use std::time::Duration;

use confer_transport::{ServerTls, TlsFiles};
use serde::Deserialize;
use tokio::net::TcpListener;

/// Where a console listens.
///
/// ```toml
/// [console]
/// listen = "127.0.0.1:8443"   # HTTPS with the server's [tls] certificate; plain HTTP only on loopback with --insecure-loopback
/// session_hours = 8           # how long a sign-in lasts
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Address to serve the console on (`host:port`; port 0 picks one).
    pub listen: String,
    /// How long a sign-in lasts, in hours.
    #[serde(default = "default_session_hours")]
    pub session_hours: u64,
}

fn default_session_hours() -> u64 {
    8
}

impl ConsoleConfig {
    /// How long a session lasts.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_hours.max(1) * 3600)
    }

    /// The listening address, checked.
    pub fn addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|e| {
            format!(
                "console.listen = {:?}: {e}; give host:port, e.g. \"127.0.0.1:8443\"",
                self.listen
            )
        })
    }

    /// Binds the console's address: TLS when `tls` is given, else only a
    /// loopback address (`role` names the server in errors and logs).
    pub async fn bind(
        &self,
        tls: Option<&TlsFiles>,
        role: &'static str,
    ) -> Result<(TcpListener, Option<ServerTls>), String> {
        let addr = self.addr()?;
        let tls = match tls {
            Some(files) => Some(ServerTls::for_web(files, role).map_err(|e| e.to_string())?),
            None if confer_transport::plaintext_allowed(&addr) => None,
            None => {
                return Err(format!(
                    "console.listen = {addr}: plain HTTP is allowed only on a loopback address; \
                     configure [tls] (the console then serves HTTPS) or listen on 127.0.0.1"
                ));
            }
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr} (console.listen): {e}"))?;
        Ok((listener, tls))
    }
}
