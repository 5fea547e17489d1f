//! Supervision statistics: what a node declares about the org units of the
//! region whose records it holds.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A node's answer to [`crate::actions::SUPERVISION_UNITS`]: for each org
/// unit code of the region's tree whose records it holds, the OMOP
/// `care_site_id`s of that unit's records. Empty when the node declares no
/// `[supervision]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisionUnits {
    /// The node's name.
    pub node: String,
    /// Org unit code → its care sites at this node.
    pub units: BTreeMap<String, Vec<i64>>,
}
