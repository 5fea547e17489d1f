//! Node health checks, and the anchoring of each node's audit chain
//! (see [`crate::anchor`]).

use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::fanout::{self, NodeHandle};
use crate::state::CoordinatorState;
use crate::store::{NodeStatus, now_ms};

impl CoordinatorState {
    /// Checks every node's health once and records it.
    pub async fn check_health(&self) {
        let timeout = Duration::from_secs(5);
        let store = &self.store;
        let results = fanout::each(&self.nodes, |n| async move {
            // An anchor that cannot be read now (the store busy) is not
            // "no anchor": the node is then not judged this time.
            let anchor = store.anchor(&n.name);
            if let Err(e) = &anchor {
                warn!(node = %n.name, "cannot read the node's audit anchor: {e}");
            }
            let started = Instant::now();
            let seq = anchor.as_ref().ok().and_then(|a| a.as_ref().map(|a| a.0));
            n.health(timeout, seq)
                .await
                .map(|h| (h, started.elapsed(), anchor.ok()))
        })
        .await;
        for (handle, (name, r)) in self.nodes.iter().zip(results) {
            let previous = self.health.read().ok().and_then(|m| m.get(&name).cloned());
            let r = r.map(|(h, rtt, anchor)| {
                let held = match anchor {
                    Some(anchor) => self.judge_anchor(handle, anchor.as_ref(), h.audit.as_ref()),
                    None => handle.held(),
                };
                (h, rtt, held)
            });
            let status = match r {
                Ok((h, rtt, Some(held))) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: false,
                    checked_ms: now_ms(),
                    last_seen_ms: Some(now_ms()),
                    latency_ms: Some(rtt.as_secs_f64() * 1000.0),
                    version: Some(h.version),
                    error: Some(held),
                },
                Ok((h, rtt, None)) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: true,
                    checked_ms: now_ms(),
                    last_seen_ms: Some(now_ms()),
                    latency_ms: Some(rtt.as_secs_f64() * 1000.0),
                    version: Some(h.version),
                    error: None,
                },
                Err(e) => NodeStatus {
                    name: name.clone(),
                    url: handle.url.clone(),
                    healthy: false,
                    checked_ms: now_ms(),
                    last_seen_ms: previous.as_ref().and_then(|p| p.last_seen_ms),
                    latency_ms: None,
                    version: previous.and_then(|p| p.version),
                    error: Some(e.message),
                },
            };
            if let Err(e) = self.store.set_node_status(&status) {
                warn!("cannot record node status: {e}");
            }
            if let Ok(mut m) = self.health.write() {
                m.insert(name, status);
            }
        }
    }

    /// Why `node` is held now, if its audit chain is shorter than `anchor`,
    /// its anchor as read before the check was sent (a health check may
    /// move it on meanwhile); the node is then held as at a health check.
    pub(crate) fn chain_cut_back(
        &self,
        node: &NodeHandle,
        anchor: Option<&(i64, String)>,
        head: Option<&confer_protocol::catalog::AuditHead>,
    ) -> Option<String> {
        let (head, anchor) = (head?, anchor?);
        if head.seq >= anchor.0 {
            return None;
        }
        self.judge_anchor(node, Some(anchor), Some(head))
    }

    /// Moves `node`'s anchor along its audit chain, or holds the node out
    /// of every task when its chain does not extend the anchor (see
    /// [`crate::anchor`]); changes of state are audited. Returns why the
    /// node is held, if it is.
    pub(crate) fn judge_anchor(
        &self,
        node: &NodeHandle,
        anchor: Option<&(i64, String)>,
        head: Option<&confer_protocol::catalog::AuditHead>,
    ) -> Option<String> {
        let was_held = node.held();
        match crate::anchor::judge(anchor, head) {
            crate::anchor::Verdict::Extend { seq, hash } => {
                if let Err(e) = self.store.set_anchor(&node.name, seq, &hash) {
                    warn!(node = %node.name, "cannot record the node's audit anchor: {e}");
                }
                if was_held.is_some() {
                    node.hold(None);
                    if let Err(e) = self.store.set_hold(&node.name, None) {
                        warn!(node = %node.name, "cannot record that the node is used again: {e}");
                    }
                    info!(node = %node.name, "the node's audit chain extends its anchor again: used again");
                    self.audit(
                        "coordinator",
                        None,
                        "node_ledger",
                        "restored",
                        format!(
                            "node {}: its audit chain extends its anchor again (record {seq})",
                            node.name
                        ),
                    );
                }
                None
            }
            crate::anchor::Verdict::Hold(why) => {
                let message = crate::anchor::held_message(&node.name, &why);
                if was_held.as_deref() != Some(message.as_str()) {
                    warn!(node = %node.name, "{message}");
                    self.audit("coordinator", None, "node_ledger", "held", message.clone());
                }
                node.hold(Some(message.clone()));
                if let Err(e) = self.store.set_hold(&node.name, Some(&message)) {
                    warn!(node = %node.name, "cannot record that the node is held: {e}");
                }
                Some(message)
            }
            crate::anchor::Verdict::Unknown => was_held,
        }
    }

    /// The node registry with the latest health checks.
    pub fn node_statuses(&self) -> Vec<NodeStatus> {
        let map = self.health.read().map(|m| m.clone()).unwrap_or_default();
        self.nodes
            .iter()
            .map(|n| {
                map.get(&n.name).cloned().unwrap_or(NodeStatus {
                    name: n.name.clone(),
                    url: n.url.clone(),
                    healthy: false,
                    checked_ms: 0,
                    last_seen_ms: None,
                    latency_ms: None,
                    version: None,
                    error: Some("not checked yet".into()),
                })
            })
            .collect()
    }
}
