//! Typed admissions: a handler asks the gate for its kind of task.

use super::*;

/// A task past admission ([`NodeService::admit_as`]): signed by the
/// coordinator for this node, not expired, its study approved here and its
/// researcher a member; with the study's rules and its own kind, typed, so
/// no handler matches on the kind again.
pub(crate) struct Admitted<K> {
    /// The verified task.
    pub(crate) task: Task,
    /// The study's rules at this node.
    pub(crate) rules: StudyRules,
    /// What the task asks, as its kind's own type.
    pub(crate) kind: K,
}

/// A kind of task a handler asks admission for.
pub(crate) trait AdmittedKind: Sized {
    /// The kind, as a refusal names it.
    const NAME: &'static str;
    /// The task's kind, if it is this one.
    fn of(kind: &TaskKind) -> Option<Self>;
}

impl AdmittedKind for QueryTask {
    const NAME: &'static str = "a DP query task";
    fn of(kind: &TaskKind) -> Option<Self> {
        match kind {
            TaskKind::Query(q) => Some(q.clone()),
            _ => None,
        }
    }
}

impl AdmittedKind for SecureQueryTask {
    const NAME: &'static str = "a secure query task";
    fn of(kind: &TaskKind) -> Option<Self> {
        match kind {
            TaskKind::SecureQuery(q) => Some(q.clone()),
            _ => None,
        }
    }
}

impl AdmittedKind for TrainTask {
    const NAME: &'static str = "a training job task";
    fn of(kind: &TaskKind) -> Option<Self> {
        match kind {
            TaskKind::Train(t) => Some(t.clone()),
            _ => None,
        }
    }
}
