//! What a client of the coordinator speaks besides Flight SQL: the study
//! header, the custom actions (each declared once: its name, what it does,
//! its request and its answer) and their JSON types. Clients (the CLI, the
//! Python client) depend on this, not on the coordinator's internals; the
//! coordinator's `list_actions`, its unknown-action error and who may call
//! each action are made from [`ACTIONS`].

/// gRPC header naming the study a request runs under.
pub const STUDY_HEADER: &str = "x-confer-study";

pub use crate::{Access, ActionSpec};

/// Names of the coordinator's custom actions.
pub mod actions {
    /// Node registry and health.
    pub const NODES: &str = "confer.nodes";
    /// The calling user.
    pub const WHOAMI: &str = "confer.whoami";
    /// Create a study (admin).
    pub const STUDY_CREATE: &str = "confer.study.create";
    /// Change a study's title, principal investigator, members or min_sites (admin).
    pub const STUDY_EDIT: &str = "confer.study.edit";
    /// Studies the caller may use (all for admins).
    pub const STUDY_LIST: &str = "confer.study.list";
    /// One study.
    pub const STUDY_SHOW: &str = "confer.study.show";
    /// Users (admin).
    pub const USER_LIST: &str = "confer.user.list";
    /// The network catalog: tables, columns, types, bounds, domains and the
    /// sites publishing each table; never row counts or values of private tables.
    pub const CATALOG: &str = "confer.catalog";
    /// Start a training job.
    pub const TRAIN_SUBMIT: &str = "confer.train.submit";
    /// A job's status and history.
    pub const TRAIN_STATUS: &str = "confer.train.status";
    /// The jobs the caller may see.
    pub const TRAIN_LIST: &str = "confer.train.list";
    /// Stop a job after the step under way.
    pub const TRAIN_CANCEL: &str = "confer.train.cancel";
    /// A job's latest model, standardisation and privacy statement.
    pub const MODEL_EXPORT: &str = "confer.model.export";
    /// Release (or complete) a period's supervision statistics.
    pub const SUPERVISION_RUN: &str = "confer.supervision.run";
    /// The supervision indicator catalogue and org tree.
    pub const SUPERVISION_INDICATORS: &str = "confer.supervision.indicators";
}

/// Every custom action of the coordinator, in the order `list_actions` gives them.
pub const ACTIONS: &[ActionSpec] = &[
    ActionSpec {
        name: actions::NODES,
        doc: "node registry and health (JSON)",
        request: "empty",
        response: "list of node statuses",
        access: Access::NodeStatus,
    },
    ActionSpec {
        name: actions::WHOAMI,
        doc: "the calling user (JSON)",
        request: "empty",
        response: "user",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::CATALOG,
        doc: "the network catalog (JSON)",
        request: "empty",
        response: "CatalogListing",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::STUDY_CREATE,
        doc: "create a study (admin; body: JSON)",
        request: "NewStudy",
        response: "study",
        access: Access::ManageStudies,
    },
    ActionSpec {
        name: actions::STUDY_EDIT,
        doc: "change a study's title, PI, members or min_sites (admin; body: JSON)",
        request: "StudyEdit",
        response: "study",
        access: Access::ManageStudies,
    },
    ActionSpec {
        name: actions::STUDY_LIST,
        doc: "studies you may use (JSON)",
        request: "empty",
        response: "list of studies",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::STUDY_SHOW,
        doc: "one study (body: its name)",
        request: "the study's name",
        response: "study",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::USER_LIST,
        doc: "users (admin; JSON)",
        request: "empty",
        response: "list of users",
        access: Access::ManageUsers,
    },
    ActionSpec {
        name: actions::TRAIN_SUBMIT,
        doc: "start a training job (body: JSON)",
        request: "train::TrainSubmit",
        response: "train::JobStatus",
        access: Access::Train,
    },
    ActionSpec {
        name: actions::TRAIN_STATUS,
        doc: "a training job's status and history",
        request: "train::JobRef",
        response: "train::JobStatus",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::TRAIN_LIST,
        doc: "training jobs you may see",
        request: "empty",
        response: "list of train::JobStatus",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::TRAIN_CANCEL,
        doc: "stop a training job",
        request: "train::JobRef",
        response: "train::JobStatus",
        access: Access::Train,
    },
    ActionSpec {
        name: actions::MODEL_EXPORT,
        doc: "a training job's model and privacy statement",
        request: "train::JobRef",
        response: "train::ModelExport",
        access: Access::Member,
    },
    ActionSpec {
        name: actions::SUPERVISION_RUN,
        doc: "releases a period's supervision statistics (or completes it; a complete period is answered from the store, nothing spent)",
        request: "{\"period\": \"2026-10\"}",
        response: "supervision RunReport",
        access: Access::Supervise,
    },
    ActionSpec {
        name: actions::SUPERVISION_INDICATORS,
        doc: "the supervision indicators, their definitions, the measures a period needs and its budget",
        request: "{\"period\": \"month\"} or empty",
        response: "supervision Overview",
        access: Access::Member,
    },
];

/// The declaration of action `name`, if the coordinator serves it.
pub fn action(name: &str) -> Option<&'static ActionSpec> {
    ACTIONS.iter().find(|a| a.name == name)
}

/// The names of every action, comma-separated (for error messages).
pub fn action_names() -> String {
    crate::names_of(ACTIONS)
}

/// What a client sends to create a study.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct NewStudy {
    /// Short name.
    pub name: String,
    /// Title.
    pub title: String,
    /// Principal investigator (user name).
    pub principal_investigator: String,
    /// Members.
    #[serde(default)]
    pub members: Vec<String>,
    /// Tables (empty: any).
    #[serde(default)]
    pub tables: Vec<String>,
    /// Requested epsilon per node.
    pub requested_epsilon: f64,
    /// Requested delta per node.
    pub requested_delta: f64,
    /// Ethics approval reference.
    pub ethics_ref: String,
    /// Fewest sites that must answer.
    #[serde(default)]
    pub min_sites: Option<usize>,
}

/// A change to a study ([`actions::STUDY_EDIT`]). What every node's
/// steward approved (the ethics reference, the requested budget, the
/// tables) is not editable: such a change is a new study, which the
/// stewards approve anew.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudyEdit {
    /// The study.
    pub name: String,
    /// A new title.
    #[serde(default)]
    pub title: Option<String>,
    /// A new principal investigator (a user).
    #[serde(default)]
    pub principal_investigator: Option<String>,
    /// Users to add as members.
    #[serde(default)]
    pub add_members: Vec<String>,
    /// Members to remove.
    #[serde(default)]
    pub remove_members: Vec<String>,
    /// A new min_sites; `Some(None)` (JSON `null`) goes back to the
    /// default (every site).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub min_sites: Option<Option<usize>>,
}

/// A field that is present, even as `null`, is `Some`.
fn present<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// The network catalog as `confer.catalog` returns it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatalogListing {
    /// Sites that answered, in configuration order.
    pub sites: Vec<String>,
    /// Sites that did not answer (their tables may be missing here).
    pub missing_sites: Vec<String>,
    /// Tables, by name.
    pub tables: Vec<CatalogTable>,
}

/// One table of [`CatalogListing`].
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CatalogTable {
    /// The table as published (columns, privacy unit, bounds, domains).
    #[serde(flatten)]
    pub info: crate::catalog::TableInfo,
    /// The sites that publish it.
    pub sites: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_action_is_declared_once() {
        let mut names: Vec<&str> = ACTIONS.iter().map(|a| a.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ACTIONS.len());
        assert!(action(actions::STUDY_EDIT).is_some());
        assert!(action("confer.nope").is_none());
    }

    #[test]
    fn a_study_edit_tells_null_from_absent() {
        let reset: StudyEdit =
            serde_json::from_str(r#"{"name": "s", "min_sites": null}"#).expect("json");
        assert_eq!(reset.min_sites, Some(None));
        let absent: StudyEdit = serde_json::from_str(r#"{"name": "s"}"#).expect("json");
        assert_eq!(absent.min_sites, None);
        assert!(
            serde_json::from_str::<StudyEdit>(r#"{"name": "s", "requested_epsilon": 2}"#).is_err()
        );
    }
}

#[cfg(test)]
mod table_tests {
    use super::*;

    #[test]
    fn each_action_is_declared_once_with_who_may_call_it() {
        for table in [ACTIONS, crate::NODE_ACTIONS] {
            let mut names: Vec<&str> = table.iter().map(|a| a.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), table.len(), "a name declared twice");
        }
        assert!(ACTIONS.iter().all(|a| a.access != Access::Coordinator));
        assert!(
            crate::NODE_ACTIONS
                .iter()
                .all(|a| a.access == Access::Coordinator)
        );
        assert_eq!(
            action(actions::USER_LIST).map(|a| a.access),
            Some(Access::ManageUsers)
        );
        assert!(action("confer.nope").is_none());
    }
}
