//! Serving a console: TLS (HTTP/2 or HTTP/1.1) with the server's
//! certificate, or plain HTTP on loopback.

use std::io;
use std::net::SocketAddr;

use axum::Router;
use axum::serve::Listener;
use confer_transport::ServerTls;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;

/// Completed TLS connections (the handshakes run in the background, so a
/// slow client does not hold up the others).
struct TlsListener {
    incoming: ReceiverStream<io::Result<TlsStream<TcpStream>>>,
    local: SocketAddr,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.incoming.next().await {
                Some(Ok(stream)) => {
                    let Ok(peer) = stream.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (stream, peer);
                }
                Some(Err(e)) => tracing::warn!("console: accept failed: {e}"),
                // The acceptor stopped: serve nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `router` on `listener` until `shutdown` fires: over TLS when
/// `tls` is given, else plain HTTP (the caller checks that the address is
/// a loopback one).
pub fn spawn(
    router: Router,
    listener: TcpListener,
    tls: Option<ServerTls>,
    shutdown: oneshot::Receiver<()>,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let signal = async {
        let _ = shutdown.await;
    };
    Ok(match tls {
        None => tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(signal)
                .await
        }),
        Some(tls) => {
            let local = listener.local_addr()?;
            let listener = TlsListener {
                incoming: tls.incoming(listener),
                local,
            };
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(signal)
                    .await
            })
        }
    })
}
