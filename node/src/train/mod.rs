//! Federated training at the node.
//!
//! * **Prepare** (`confer.train.prepare`): admit the signed job like any
//!   task (signature, expiry, study approval, researcher), check the
//!   steward's policy (architecture, tables, per-query epsilon cap, budget),
//!   run the feature query, check its rows (one per person, finite values,
//!   binary labels with both classes) and split them. Nothing is charged
//!   and nothing leaves but "ready" or the reason it is not.
//! * **Commit** (`confer.train.commit`): debit the whole job's cost in one
//!   durable ledger transaction under the job's task id. A repeated commit
//!   charges nothing again.
//! * **Secure sums** (`confer.train.start`, then the secure-aggregation
//!   rounds): the standardisation moments once, and one model update per
//!   round. Each is allowed once per job and recorded in the ledger (at no
//!   further cost: the job paid for it) before its masked input can leave.
//!   The node derives every noise level from the job spec itself.
//! * **Evaluation** (`confer.train.evaluate`): counts of the global model
//!   on the held-out split, released with OpenDP's discrete Gaussian at the
//!   job's evaluation budget, recorded (a retry gets the same release).
//!
//! A node that restarts mid-job rebuilds its data from the job envelope
//! that every request carries; its ledger remembers what was committed and
//! released.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use confer_models::Dataset;
use confer_models::job::JobSpec;
use confer_protocol::signing::sha256_hex;
use confer_protocol::train::TrainPhase;
use confer_protocol::{ErrorKind, ProtocolError};
use uuid::Uuid;

/// A job's training and held-out sets, standardised.
type Standardised = Arc<(Dataset, Dataset)>;

/// A prepared job's data, raw (unstandardised) features.
pub(crate) struct JobData {
    spec: JobSpec,
    /// The job's budget split (computed once).
    plan: confer_models::job::PrivacyPlan,
    payload_hash: String,
    bounds: Vec<[f64; 2]>,
    train: Dataset,
    test: Dataset,
    /// The last standardisation applied, with the standardised sets.
    standardised: Mutex<Option<(Vec<f64>, Standardised)>>,
    /// Serialises this job's rounds, so a round is never released twice.
    round_lock: tokio::sync::Mutex<()>,
}

/// Prepared jobs, by job id.
#[derive(Default)]
pub struct TrainJobs {
    jobs: Mutex<HashMap<Uuid, Arc<JobData>>>,
}

impl TrainJobs {
    fn get(&self, id: Uuid, payload_hash: &str) -> Option<Arc<JobData>> {
        let jobs = self.jobs.lock().ok()?;
        jobs.get(&id)
            .filter(|j| j.payload_hash == payload_hash)
            .cloned()
    }

    fn insert(&self, id: Uuid, job: Arc<JobData>) {
        if let Ok(mut jobs) = self.jobs.lock() {
            // Few jobs run at once; forget finished ones beyond a handful.
            if jobs.len() >= 16 {
                jobs.clear();
            }
            jobs.insert(id, job);
        }
    }
}

/// The ledger id of a round's record: derived from the job, phase and round.
fn round_record_id(job: Uuid, phase: TrainPhase, round: u32) -> Uuid {
    let digest = sha256_hex(format!("{job}/{}/{round}", phase.name()).as_bytes());
    let bytes = hex::decode(&digest[..32]).unwrap_or_default();
    let mut raw = [0u8; 16];
    raw.copy_from_slice(&bytes[..16]);
    Uuid::from_bytes(raw)
}

fn invalid(message: String) -> ProtocolError {
    ProtocolError::new(ErrorKind::InvalidArgument, message).with_retryable(false)
}

mod compute;
mod data;
mod handlers;

pub use compute::local_seed;
use compute::{evaluation, node_input};
pub use data::{JobDataError, job_datasets};
use data::{check_round_inputs, job_cost, standardised, zero_charge};
