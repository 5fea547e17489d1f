//! Starting confer servers as child processes and waiting until they listen.
//!
//! Used by `confer demo` and by the end-to-end tests, so both exercise the
//! real binary. A child is started with `--stop-on-stdin-eof`: when the
//! parent closes the pipe (or dies, however abruptly), the child shuts down,
//! so no orphan servers are left behind.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

/// A running server child.
pub struct ServerChild {
    /// What it is ("node site-a", "coordinator").
    pub label: String,
    /// The address it announced.
    pub addr: SocketAddr,
    /// Its web console's URL, if it announced one.
    pub console: Option<String>,
    child: Child,
    stdin: Option<ChildStdin>,
}

/// How to start a server child.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The confer executable.
    pub program: &'a Path,
    /// `node` or `coordinator`.
    pub role: &'a str,
    /// Name for messages.
    pub label: &'a str,
    /// Its config file.
    pub config: &'a Path,
    /// CONFER_LOG for the child.
    pub log_level: &'a str,
    /// Plaintext on loopback (else TLS from the config).
    pub insecure_loopback: bool,
    /// Write the child's log (standard error) here instead of inheriting it.
    pub log_file: Option<&'a Path>,
}

/// How long a server may take to load its data and start listening.
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

impl ServerChild {
    /// Starts `program <role> --config <config> --insecure-loopback` and
    /// waits for its `listening on <addr>` line.
    pub async fn start(
        program: &Path,
        role: &str,
        label: &str,
        config: &Path,
        log_level: &str,
    ) -> anyhow::Result<Self> {
        Self::launch(&Launch {
            program,
            role,
            label,
            config,
            log_level,
            insecure_loopback: true,
            log_file: None,
        })
        .await
    }

    /// Starts a server as `launch` says and waits until it listens.
    pub async fn launch(launch: &Launch<'_>) -> anyhow::Result<Self> {
        let Launch {
            program,
            role,
            label,
            config,
            log_level,
            insecure_loopback,
            log_file,
        } = *launch;
        let mut command = Command::new(program);
        command
            .arg(role)
            .arg("--config")
            .arg(config)
            .arg("--stop-on-stdin-eof");
        if insecure_loopback {
            command.arg("--insecure-loopback");
        }
        let stderr = match log_file {
            Some(path) => Stdio::from(
                std::fs::File::create(path)
                    .with_context(|| format!("cannot create {}", path.display()))?,
            ),
            None => Stdio::inherit(),
        };
        let mut child = command
            .env("CONFER_LOG", log_level)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {label} ({})", program.display()))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("{label}: no stdout pipe"))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut console = None;
        let wait_ready = async {
            while let Some(line) = lines.next_line().await? {
                if let Some((_, url)) = line.rsplit_once(" console at ") {
                    console = Some(url.trim().to_string());
                }
                if let Some((_, addr)) = line.rsplit_once(" listening on ") {
                    let addr: SocketAddr = addr
                        .trim()
                        .parse()
                        .with_context(|| format!("{label} announced an odd address: {line}"))?;
                    return Ok::<SocketAddr, anyhow::Error>(addr);
                }
            }
            Err(anyhow!(
                "{label} exited during start-up (its error is printed above)"
            ))
        };
        let addr = match tokio::time::timeout(START_TIMEOUT, wait_ready).await {
            Ok(Ok(addr)) => addr,
            Ok(Err(e)) => {
                let status = child.wait().await.ok();
                bail!("{e}; {}", status.map(|s| s.to_string()).unwrap_or_default());
            }
            Err(_) => bail!(
                "{label} did not start listening within {} s",
                START_TIMEOUT.as_secs()
            ),
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            label: label.to_string(),
            addr,
            console,
            child,
            stdin,
        })
    }

    /// The process id.
    pub fn id(&self) -> Option<u32> {
        self.child.id()
    }

    /// Asks the child to stop (closes its stdin), waits up to `grace`, then kills it.
    pub async fn stop(mut self, grace: Duration) -> anyhow::Result<()> {
        drop(self.stdin.take());
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => bail!("{} exited with {status}", self.label),
            Ok(Err(e)) => Err(anyhow!("{}: {e}", self.label)),
            Err(_) => {
                self.child.kill().await.ok();
                bail!(
                    "{} did not stop within {} s and was killed",
                    self.label,
                    grace.as_secs()
                )
            }
        }
    }

    /// Kills the child at once (as a crash would).
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {}", self.label))
    }
}
