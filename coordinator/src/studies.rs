//! Studies at the coordinator: creating and editing them (admin).

use confer_protocol::{ErrorKind, ProtocolError};

use crate::service::CoordinatorService;
use crate::store::{Study, User, now_ms};
use confer_protocol::coordinator::{NewStudy, StudyEdit};

impl CoordinatorService {
    /// Applies a [`StudyEdit`]; returns the study and the changes in words.
    pub(crate) fn edit_study(&self, body: &[u8]) -> Result<(Study, String), ProtocolError> {
        let edit: StudyEdit = serde_json::from_slice(body).map_err(|e| {
            ProtocolError::invalid(format!(
                "the study change is not valid JSON: {e} (it takes name, title, principal_investigator, \
                 add_members, remove_members and min_sites; the ethics reference, requested budget and \
                 tables that stewards approved cannot change: create a new study for those)"
            ))
        })?;
        let store = &self.state.store;
        let mut study = store
            .study(&edit.name)
            .map_err(ProtocolError::from)?
            .ok_or_else(|| {
                ProtocolError::new(
                    ErrorKind::NotFound,
                    format!(
                        "study {} does not exist: `confer study list` shows the studies",
                        edit.name
                    ),
                )
            })?;
        let is_user = |name: &str| -> Result<bool, ProtocolError> {
            Ok(store
                .user_by_name(name)
                .map_err(ProtocolError::from)?
                .is_some_and(|u| u.revoked_ms.is_none()))
        };
        let mut changes = Vec::new();
        if let Some(title) = edit.title {
            if title.trim().is_empty() {
                return Err(ProtocolError::invalid("a study's title cannot be empty"));
            }
            changes.push(format!("title {:?} -> {:?}", study.title, title));
            study.title = title;
        }
        if let Some(pi) = edit.principal_investigator {
            if !is_user(&pi)? {
                return Err(ProtocolError::invalid(format!(
                    "{pi} is not an active user: add users before naming them in a study"
                )));
            }
            changes.push(format!(
                "principal investigator {} -> {pi}",
                study.principal_investigator
            ));
            study.principal_investigator = pi;
        }
        for member in &edit.add_members {
            if !is_user(member)? {
                return Err(ProtocolError::invalid(format!(
                    "{member} is not an active user: add users before naming them in a study"
                )));
            }
            if !study.members.contains(member) {
                study.members.push(member.clone());
                changes.push(format!("member {member} added"));
            }
        }
        for member in &edit.remove_members {
            let before = study.members.len();
            study.members.retain(|m| m != member);
            if study.members.len() == before {
                return Err(ProtocolError::invalid(format!(
                    "{member} is not a member of study {}: its members are {}",
                    study.name,
                    study.members.join(", ")
                )));
            }
            changes.push(format!("member {member} removed"));
        }
        if let Some(min_sites) = edit.min_sites {
            if min_sites == Some(0) {
                return Err(ProtocolError::invalid("min_sites must be at least 1"));
            }
            changes.push(format!(
                "min_sites {} -> {}",
                study
                    .min_sites
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "all".into()),
                min_sites
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "all".into())
            ));
            study.min_sites = min_sites;
        }
        if changes.is_empty() {
            return Err(ProtocolError::invalid(
                "nothing to change: give a title, principal investigator, members to add or remove, or min_sites",
            ));
        }
        store.update_study(&study).map_err(ProtocolError::from)?;
        Ok((study, changes.join("; ")))
    }

    pub(crate) fn create_study(&self, user: &User, body: &[u8]) -> Result<Study, ProtocolError> {
        let new: NewStudy = serde_json::from_slice(body).map_err(|e| {
            ProtocolError::invalid(format!("the study description is not valid JSON: {e}"))
        })?;
        if new.name.is_empty()
            || !new
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(ProtocolError::invalid(format!(
                "study name {:?}: use letters, digits, '_' and '-'",
                new.name
            )));
        }
        let epsilon_ok = new.requested_epsilon > 0.0 && new.requested_epsilon.is_finite();
        if !epsilon_ok || !(0.0..1.0).contains(&new.requested_delta) {
            return Err(ProtocolError::invalid(
                "the requested budget needs epsilon > 0 and 0 <= delta < 1",
            ));
        }
        if new.ethics_ref.trim().is_empty() {
            return Err(ProtocolError::invalid(
                "a study needs its ethics approval reference (--ethics-ref)",
            ));
        }
        for person in std::iter::once(&new.principal_investigator).chain(&new.members) {
            if self
                .state
                .store
                .user_by_name(person)
                .map_err(ProtocolError::from)?
                .is_none()
            {
                return Err(ProtocolError::invalid(format!(
                    "{person} is not a user: add users before naming them in a study"
                )));
            }
        }
        let study = Study {
            name: new.name,
            title: new.title,
            principal_investigator: new.principal_investigator,
            members: new.members,
            tables: new.tables.iter().map(|t| t.to_ascii_lowercase()).collect(),
            requested_epsilon: new.requested_epsilon,
            requested_delta: new.requested_delta,
            ethics_ref: new.ethics_ref,
            min_sites: new.min_sites,
            created_ms: now_ms(),
            created_by: user.name.clone(),
        };
        self.state
            .store
            .create_study(&study)
            .map_err(ProtocolError::from)?;
        Ok(study)
    }
}
