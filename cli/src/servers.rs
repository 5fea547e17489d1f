//! `confer node` and `confer coordinator`: start, announce, wait, stop.

use std::io::Write as _;

use std::path::PathBuf;

use anyhow::Context;
use tokio::io::AsyncReadExt;

use crate::ServeOptions;

pub(crate) async fn node(config_path: PathBuf, serve: ServeOptions) -> anyhow::Result<()> {
    let config = confer_node::NodeConfig::load(&config_path)?;
    let transport = if serve.insecure_loopback {
        confer_node::Transport::InsecureLoopback
    } else {
        confer_node::Transport::Tls
    };
    let node = confer_node::start(config, transport)
        .await
        .with_context(|| format!("node from {} did not start", config_path.display()))?;
    if let Some(console) = node.console_addr {
        announce(&format!(
            "confer node {} steward page console at {}://{console}/",
            node.name,
            if node.console_tls { "https" } else { "http" }
        ))?;
    }
    announce(&format!(
        "confer node {} listening on {}",
        node.name, node.addr
    ))?;
    wait_for_stop(serve.stop_on_stdin_eof).await;
    stop_within("node", node.shutdown()).await
}

pub(crate) async fn coordinator(config_path: PathBuf, serve: ServeOptions) -> anyhow::Result<()> {
    let config = confer_coordinator::CoordinatorConfig::load(&config_path)?;
    let transport = if serve.insecure_loopback {
        confer_coordinator::Transport::InsecureLoopback
    } else {
        confer_coordinator::Transport::Tls
    };
    let coordinator = confer_coordinator::start(config, transport)
        .await
        .with_context(|| format!("coordinator from {} did not start", config_path.display()))?;
    if let Some(console) = coordinator.console_addr {
        // Before the `listening on` line, which tells a parent the
        // coordinator is ready.
        announce(&format!(
            "confer coordinator console at {}://{console}/",
            if coordinator.console_tls {
                "https"
            } else {
                "http"
            }
        ))?;
    }
    announce(&format!(
        "confer coordinator listening on {}",
        coordinator.addr
    ))?;
    wait_for_stop(serve.stop_on_stdin_eof).await;
    stop_within("coordinator", coordinator.shutdown()).await
}

/// How long a stopping server lets the calls under way finish.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Stops a server: new calls are refused at once, and calls under way get
/// [`SHUTDOWN_GRACE`] (or until a second Ctrl-C or SIGTERM) to finish;
/// then the process exits anyway. A DP task cut off so is a charged
/// failure when the node starts again (its debit is already on disk).
async fn stop_within<E: Into<anyhow::Error>>(
    what: &str,
    shutdown: impl Future<Output = Result<(), E>>,
) -> anyhow::Result<()> {
    tokio::select! {
        done = shutdown => done.map_err(Into::into),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(
                "{what}: calls still under way after {} s of shutdown are cut off",
                SHUTDOWN_GRACE.as_secs()
            );
            std::process::exit(0)
        }
        _ = wait_for_stop(false) => {
            tracing::warn!("{what}: asked again to stop: calls under way are cut off");
            std::process::exit(0)
        }
    }
}

fn announce(line: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

/// Waits for Ctrl-C, SIGTERM, or (when asked) the end of standard input.
async fn wait_for_stop(stop_on_stdin_eof: bool) {
    let stdin_closed = async {
        if stop_on_stdin_eof {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = stdin_closed => {}
    }
}
