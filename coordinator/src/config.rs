//! `coordinator.toml`: where the coordinator listens and which nodes it knows.
//!
//! ```toml
//! [coordinator]
//! listen = "127.0.0.1:50050"
//! signing_key = "coordinator.key"  # Ed25519 secret key (`confer keygen`); nodes hold its public key
//! node_timeout_secs = 60     # per-node deadline for one task
//! task_ttl_secs = 300        # nodes refuse tasks older than this
//! max_sites_per_person = 1   # a resident may be seen at this many institutions
//! state = "state/coordinator.sqlite"  # users, studies, results, node registry, audit log
//! retries = 2                # further attempts after a retryable node failure (same task id)
//! health_interval_secs = 30  # how often nodes are checked
//! train_timeout_secs = 600   # per-node deadline of one training step (local training of a round)
//!
//! [[nodes]]
//! name = "site-a"
//! url = "http://127.0.0.1:50051"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{CoordinatorError, Result};

/// The whole config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// `[coordinator]`.
    pub coordinator: CoordinatorSection,
    /// `[[nodes]]`.
    #[serde(default)]
    pub nodes: Vec<NodeEntry>,
    /// TLS: the coordinator's certificate (presented to clients, and to
    /// nodes as its client certificate), its key, and the network CA.
    #[serde(default)]
    pub tls: Option<confer_transport::TlsFiles>,
    /// `[supervision]`: the health commission's supervision statistics.
    #[serde(default)]
    pub supervision: Option<crate::supervision::SupervisionConfig>,
    /// `[console]`: the web console (docs/console.md).
    #[serde(default)]
    pub console: Option<confer_console::ConsoleConfig>,
}

/// `[coordinator]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordinatorSection {
    /// Address for clients (Flight SQL).
    pub listen: String,
    /// The Ed25519 secret key that signs every task (relative paths are
    /// resolved against the config file's directory).
    pub signing_key: PathBuf,
    /// How many institutions one resident may appear at; the network-level
    /// privacy loss is reported for this many sites.
    #[serde(default = "default_max_sites")]
    pub max_sites_per_person: usize,
    /// The state database (relative to the config file's directory).
    #[serde(default = "default_state")]
    pub state: PathBuf,
    /// Further attempts after a retryable node failure.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Seconds between node health checks.
    #[serde(default = "default_health_interval")]
    pub health_interval_secs: u64,
    /// Per-node deadline for one task, in seconds.
    #[serde(default = "default_node_timeout")]
    pub node_timeout_secs: u64,
    /// How long a task stays valid at the nodes, in seconds.
    #[serde(default = "default_task_ttl")]
    pub task_ttl_secs: u64,
    /// Per-node deadline of one training step (preparing a job, one
    /// round's local training, an evaluation), in seconds.
    #[serde(default = "default_train_timeout")]
    pub train_timeout_secs: u64,
}

fn default_train_timeout() -> u64 {
    600
}

fn default_state() -> PathBuf {
    PathBuf::from("state/coordinator.sqlite")
}

fn default_retries() -> u32 {
    2
}

fn default_health_interval() -> u64 {
    30
}

fn default_max_sites() -> usize {
    1
}

fn default_node_timeout() -> u64 {
    60
}

fn default_task_ttl() -> u64 {
    300
}

/// `[[nodes]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The node's site name (must match its `node.name`).
    pub name: String,
    /// Its Flight address, e.g. `http://127.0.0.1:50051`.
    pub url: String,
}

impl CoordinatorConfig {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CoordinatorError::Config(format!("cannot read {}: {e}", path.display()))
        })?;
        let mut config = Self::parse(&text).map_err(|e| match e {
            CoordinatorError::Config(m) => {
                CoordinatorError::Config(format!("{}: {m}", path.display()))
            }
            other => other,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.coordinator.signing_key.is_relative() {
            config.coordinator.signing_key = base.join(&config.coordinator.signing_key);
        }
        if config.coordinator.state.is_relative() {
            config.coordinator.state = base.join(&config.coordinator.state);
        }
        if let Some(tls) = &mut config.tls {
            tls.resolve(base);
        }
        if let Some(s) = &mut config.supervision {
            s.resolve(base);
        }
        Ok(config)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self> {
        let config: CoordinatorConfig =
            toml::from_str(text).map_err(|e| CoordinatorError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.listen_addr()?;
        if self.nodes.is_empty() {
            return Err(CoordinatorError::Config(
                "no [[nodes]]: list at least one node with name and url".into(),
            ));
        }
        if self.coordinator.health_interval_secs == 0 {
            return Err(CoordinatorError::Config(
                "coordinator.health_interval_secs must be at least 1".into(),
            ));
        }
        if self.coordinator.max_sites_per_person == 0 {
            return Err(CoordinatorError::Config(
                "coordinator.max_sites_per_person must be at least 1".into(),
            ));
        }
        if self.coordinator.node_timeout_secs == 0 || self.coordinator.task_ttl_secs == 0 {
            return Err(CoordinatorError::Config(
                "coordinator.node_timeout_secs and task_ttl_secs must be at least 1".into(),
            ));
        }
        if let Some(s) = &self.supervision {
            s.validate()?;
        }
        for (i, n) in self.nodes.iter().enumerate() {
            if self.nodes[..i].iter().any(|m| m.name == n.name) {
                return Err(CoordinatorError::Config(format!(
                    "nodes[{i}].name = {:?} is listed twice",
                    n.name
                )));
            }
            let uri: tonic::codegen::http::Uri = n.url.parse().map_err(|e| {
                CoordinatorError::Config(format!("nodes[{i}].url = {:?} is not a URL: {e}", n.url))
            })?;
            if uri.scheme_str() != Some("http") && uri.scheme_str() != Some("https") {
                return Err(CoordinatorError::Config(format!(
                    "nodes[{i}].url = {:?}: write http://host:port",
                    n.url
                )));
            }
        }
        Ok(())
    }

    /// The listen address.
    pub fn listen_addr(&self) -> Result<SocketAddr> {
        self.coordinator.listen.parse().map_err(|e| {
            CoordinatorError::Config(format!(
                "coordinator.listen = {:?} is not host:port ({e}); for example \"127.0.0.1:50050\"",
                self.coordinator.listen
            ))
        })
    }

    /// The per-node deadline.
    pub fn node_timeout(&self) -> Duration {
        Duration::from_secs(self.coordinator.node_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[coordinator]
listen = "127.0.0.1:0"
signing_key = "coordinator.key"

[[nodes]]
name = "a"
url = "http://127.0.0.1:1"
"#;

    #[test]
    fn parses_with_defaults() {
        let c = CoordinatorConfig::parse(GOOD).expect("valid");
        assert_eq!(c.coordinator.node_timeout_secs, 60);
        assert_eq!(c.nodes[0].name, "a");
    }

    #[test]
    fn errors_name_the_field() {
        for (text, want) in [
            (GOOD.replace("127.0.0.1:0", "x"), "coordinator.listen"),
            (
                GOOD.replace("http://127.0.0.1:1", "ftp://x"),
                "nodes[0].url",
            ),
            (
                format!("{GOOD}\n[[nodes]]\nname = \"a\"\nurl = \"http://x:1\"\n"),
                "listed twice",
            ),
            (GOOD.replace("listen", "listn"), "listn"),
        ] {
            let err = CoordinatorConfig::parse(&text)
                .expect_err("invalid")
                .to_string();
            assert!(err.contains(want), "{err} should mention {want}");
        }
    }
}
