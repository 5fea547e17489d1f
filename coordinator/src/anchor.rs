//! Anchoring each node's audit chain outside the node's disk.
//!
//! A node's ledger and audit chain live on its own disk, where whoever
//! runs the machine can delete or rewrite them: a node whose ledger is
//! deleted would start again with every budget full. So at every health
//! check the coordinator keeps the newest audit record each node reports
//! (its sequence number and chain hash) and, the next time, asks the node
//! for the hash of that very record. A chain that grew answers with the
//! same hash; a chain that was reset, cut back or rewritten cannot. Such a
//! node is held out of every task until its steward restores the ledger
//! from a backup (the check passes again by itself) or an operator of the
//! coordinator accepts the loss (`confer coordinator node accept-ledger`),
//! both audited.

use confer_protocol::catalog::AuditHead;

/// What a health check's audit head means for a node's anchor.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The chain extends the anchor (or there was none): anchor it here.
    Extend {
        /// Newest record.
        seq: i64,
        /// Its hash.
        hash: String,
    },
    /// The chain does not extend the anchor: why, for the operator.
    Hold(String),
    /// Neither an anchor nor an audit head (a node from before anchors):
    /// nothing to judge.
    Unknown,
}

/// Judges `head` (the node's answer) against `anchor` (what the coordinator
/// saw last).
pub fn judge(anchor: Option<&(i64, String)>, head: Option<&AuditHead>) -> Verdict {
    let Some(head) = head else {
        return match anchor {
            // It reported its chain before: an older binary now, or the
            // report withheld, is not a chain that extends the anchor.
            Some((seq, _)) => Verdict::Hold(format!(
                "it no longer reports its audit chain, which had reached record {seq} (is it running an \
                 older confer?)"
            )),
            None => Verdict::Unknown,
        };
    };
    let extend = Verdict::Extend {
        seq: head.seq,
        hash: head.hash.clone(),
    };
    let Some((seq, hash)) = anchor else {
        return extend;
    };
    if head.seq < *seq {
        return Verdict::Hold(format!(
            "its audit chain ends at record {} but it had reached record {seq}: records were deleted or \
             the ledger was reset",
            head.seq
        ));
    }
    match &head.at_anchor {
        Some(h) if h == hash => extend,
        Some(h) => Verdict::Hold(format!(
            "its audit record {seq} has hash {} but had hash {}: the ledger was replaced or rewritten",
            short(h),
            short(hash)
        )),
        None => Verdict::Hold(format!(
            "its audit chain has no record {seq}, which it had before: the ledger was replaced"
        )),
    }
}

/// What the operator is told about a held node.
pub fn held_message(node: &str, why: &str) -> String {
    format!(
        "node {node} is left out of every task: {why}. Its data steward should stop the node and restore \
         ledger.sqlite and audit.head from a backup (`confer audit verify` checks them); the node is \
         used again at the next health check. If the records are lost for good, an operator of the \
         coordinator accepts the loss with `confer coordinator node accept-ledger --name {node} \
         --reason ...` (audited)"
    )
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(seq: i64, hash: &str, at: Option<&str>) -> AuditHead {
        AuditHead {
            seq,
            hash: hash.into(),
            at_anchor: at.map(Into::into),
        }
    }

    #[test]
    fn a_chain_that_grew_moves_its_anchor() {
        let anchor = (5, "h5".to_string());
        assert_eq!(
            judge(Some(&anchor), Some(&head(9, "h9", Some("h5")))),
            Verdict::Extend {
                seq: 9,
                hash: "h9".into()
            }
        );
        assert_eq!(
            judge(None, Some(&head(3, "h3", None))),
            Verdict::Extend {
                seq: 3,
                hash: "h3".into()
            }
        );
        assert_eq!(judge(None, None), Verdict::Unknown);
    }

    #[test]
    fn a_chain_reset_cut_back_or_rewritten_is_held() {
        let anchor = (5, "h5".to_string());
        // Deleted and started again.
        let Verdict::Hold(why) = judge(Some(&anchor), Some(&head(0, "genesis", None))) else {
            panic!("a reset ledger passed");
        };
        assert!(why.contains("reset"), "{why}");
        // Started again and grew past the anchor.
        let Verdict::Hold(why) = judge(Some(&anchor), Some(&head(40, "x", Some("other")))) else {
            panic!("a replaced ledger passed");
        };
        assert!(why.contains("replaced or rewritten"), "{why}");
        // Newest records deleted.
        assert!(matches!(
            judge(Some(&anchor), Some(&head(4, "h4", None))),
            Verdict::Hold(_)
        ));
        // An anchored node that stops reporting its chain.
        assert!(matches!(judge(Some(&anchor), None), Verdict::Hold(_)));
        // A record missing at the anchor.
        assert!(matches!(
            judge(Some(&anchor), Some(&head(7, "h7", None))),
            Verdict::Hold(_)
        ));
    }
}
