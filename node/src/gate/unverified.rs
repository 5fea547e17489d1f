//! Refusals of requests without a verified task, audited in summary.

use super::*;

/// How often a refusal of a request without a verified task is audited.
pub const UNVERIFIED_WINDOW: Duration = Duration::from_secs(60);

/// Refusals of requests that carry no verified task (garbage tickets,
/// unsigned or forged tasks): the first of each [`UNVERIFIED_WINDOW`] is
/// audited with its reason, the others are counted and audited as one
/// summary, so that nobody without the coordinator's key can grow the audit
/// log at will.
#[derive(Default)]
pub struct Unverified(std::sync::Mutex<Window>);

#[derive(Default)]
struct Window {
    started: Option<Instant>,
    more: u64,
    last: String,
}

impl Window {
    fn summary(&self) -> Option<String> {
        (self.more > 0).then(|| {
            format!(
                "{} more requests without a verified task were refused within {} s of the one \
                 audited before (the last: {})",
                self.more,
                UNVERIFIED_WINDOW.as_secs(),
                self.last
            )
        })
    }
}

impl Unverified {
    /// The reasons to audit for a refusal now: none while a window is
    /// open, else a summary of the window that ended (if it counted any)
    /// and this refusal's own.
    pub fn note(&self, reason: &str) -> Vec<String> {
        let Ok(mut w) = self.0.lock() else {
            return vec![reason.to_string()];
        };
        match w.started {
            Some(t) if t.elapsed() < UNVERIFIED_WINDOW => {
                w.more += 1;
                w.last = reason.to_string();
                Vec::new()
            }
            _ => {
                let mut out: Vec<String> = w.summary().into_iter().collect();
                *w = Window {
                    started: Some(Instant::now()),
                    ..Window::default()
                };
                out.push(reason.to_string());
                out
            }
        }
    }

    /// The summary of a window that has ended, once (called periodically,
    /// so that a burst followed by silence is still recorded).
    pub fn flush(&self) -> Option<String> {
        let mut w = self.0.lock().ok()?;
        match w.started {
            Some(t) if t.elapsed() >= UNVERIFIED_WINDOW => {
                let summary = w.summary();
                *w = Window::default();
                summary
            }
            _ => None,
        }
    }
}

impl NodeState {
    /// Audits refusals of requests without a verified task (see
    /// [`Unverified`]).
    pub(crate) fn audit_unverified(&self, reasons: Vec<String>) -> Result<()> {
        for reason in reasons {
            self.ledger.audit(&AuditEntry {
                kind: "unknown".into(),
                decision: "refused".into(),
                reason: Some(reason),
                ..Default::default()
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod unverified_tests {
    use super::*;

    #[test]
    fn a_burst_of_unverified_requests_is_one_record_and_one_summary() {
        let u = Unverified::default();
        assert_eq!(u.note("garbage 1"), vec!["garbage 1".to_string()]);
        for i in 2..=1000 {
            assert!(u.note(&format!("garbage {i}")).is_empty());
        }
        assert_eq!(u.flush(), None, "the window is still open");
        // The window ends: the next refusal brings the summary first.
        u.0.lock().expect("lock").started = Some(Instant::now() - UNVERIFIED_WINDOW);
        let next = u.note("garbage 1001");
        assert_eq!(next.len(), 2);
        assert!(next[0].starts_with("999 more requests"), "{}", next[0]);
        assert!(next[0].contains("garbage 1000"), "{}", next[0]);
        assert_eq!(next[1], "garbage 1001");
        // A burst followed by silence is summarised by the periodic flush.
        u.note("garbage 1002");
        u.0.lock().expect("lock").started = Some(Instant::now() - UNVERIFIED_WINDOW);
        assert!(u.flush().expect("summary").starts_with("1 more"));
        assert_eq!(u.flush(), None, "once");
        assert_eq!(u.note("garbage 1003"), vec!["garbage 1003".to_string()]);
    }
}
