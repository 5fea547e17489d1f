//! The node's side of `aggregation = 'secure'`: an identity key for secure
//! aggregation, and the sessions in flight.
//!
//! Round 0 carries the signed task. The node admits it like any task
//! (signature, expiry, study, policy, tables, per-task cap, budget), runs
//! the bounded query, encodes its partials with its share of the noise
//! ([`confer_query::secure::node_input`]) and commits the debit to its
//! ledger **before** it answers: the masked input of round 2 is the only
//! thing derived from records that leaves, and the debit precedes it. A
//! session that fails later has spent its budget (never less than was
//! released). Rounds 1 to 4 run the protocol of `confer_privacy::secagg`;
//! the session is forgotten after round 4, on any protocol error, or after
//! [`SESSION_TTL`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use confer_privacy::secagg::{
    ChaCha20Rng, Client, Config, ForwardedShares, KeyDirectory, SeedableRng, SigningKey,
    SurvivorSet, UnmaskRequest, VerifyingKey,
};
use confer_protocol::{ErrorKind, ProtocolError};
use uuid::Uuid;

use crate::error::{NodeError, Result};

/// How long a session may sit between rounds.
pub const SESSION_TTL: Duration = Duration::from_secs(600);

/// A session in flight.
struct Session {
    client: Client,
    input: Vec<u64>,
    touched: Instant,
    /// Whether the ledger holds this task's debit: no round runs before.
    debited: bool,
}

/// Secure-aggregation identity and sessions.
pub struct SecureSessions {
    key: SigningKey,
    sessions: Mutex<HashMap<Uuid, Session>>,
}

/// A CSPRNG seeded from the operating system.
pub fn os_rng() -> Result<ChaCha20Rng> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| fail(format!("the OS random source failed: {e}")))?;
    Ok(ChaCha20Rng::from_seed(seed))
}

impl SecureSessions {
    /// Loads the identity key from `state_dir/secagg.key`, creating it on
    /// first start (mode 0600).
    pub fn open(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("secagg.key");
        let key = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        NodeError::Config(format!(
                            "{} is not a 64-digit hex key: delete it to make a new one",
                            path.display()
                        ))
                    })?;
                SigningKey::from_bytes(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                getrandom::fill(&mut bytes)
                    .map_err(|e| fail(format!("the OS random source failed: {e}")))?;
                std::fs::create_dir_all(state_dir)
                    .map_err(|e| NodeError::Config(format!("{}: {e}", state_dir.display())))?;
                write_private(&path, &hex::encode(bytes))?;
                SigningKey::from_bytes(&bytes)
            }
            Err(e) => return Err(NodeError::Config(format!("{}: {e}", path.display()))),
        };
        Ok(Self {
            key,
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// The public identity key, hex.
    pub fn identity(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// Starts a session: round 0. Returns the advertised keys (JSON).
    pub fn start(
        &self,
        task_id: Uuid,
        me: &str,
        config: Config,
        members: &[String],
        identities: &[String],
        input: Vec<u64>,
    ) -> Result<serde_json::Value> {
        let id = members.iter().position(|m| m == me).ok_or_else(|| {
            fail(format!(
                "this node ({me}) is not among the session's members"
            ))
        })?;
        if identities.get(id) != Some(&self.identity()) {
            return Err(fail(
                "the session lists another identity key for this node: refused".into(),
            ));
        }
        if members.len() != config.n || identities.len() != config.n {
            return Err(fail(format!(
                "the session has {} members, {} identities and n = {}",
                members.len(),
                identities.len(),
                config.n
            )));
        }
        if config.vector_len != input.len() {
            return Err(fail(format!(
                "the session expects vectors of {} elements; this query gives {}",
                config.vector_len,
                input.len()
            )));
        }
        let keys = identities
            .iter()
            .map(|h| {
                let bytes: [u8; 32] = hex::decode(h)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| fail(format!("bad identity key {h}")))?;
                VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| fail(format!("bad identity key {h}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut rng = os_rng()?;
        let (client, msg) = Client::new(id as u32, config, self.key.clone(), keys.into(), &mut rng)
            .map_err(secagg_error)?;
        let mut sessions = self.lock()?;
        sessions.retain(|_, s| s.touched.elapsed() < SESSION_TTL);
        if sessions.contains_key(&task_id) {
            return Err(fail(format!(
                "a secure-aggregation session for task {task_id} is already open here: refused"
            )));
        }
        sessions.insert(
            task_id,
            Session {
                client,
                input,
                touched: Instant::now(),
                debited: false,
            },
        );
        to_json(&msg)
    }

    /// Rounds 1 to 4.
    pub fn step(
        &self,
        task_id: Uuid,
        round: u8,
        payload: serde_json::Value,
    ) -> Result<serde_json::Value> {
        let mut sessions = self.lock()?;
        let session = sessions.get_mut(&task_id).ok_or_else(|| {
            fail(format!(
                "no secure-aggregation session {task_id} here (expired, finished or aborted)"
            ))
        })?;
        if !session.debited {
            return Err(fail(format!(
                "session {task_id} is not ready: its debit is not recorded yet"
            )));
        }
        session.touched = Instant::now();
        let bad = |e: serde_json::Error| fail(format!("round {round}: unreadable message: {e}"));
        let result = match round {
            1 => {
                let dir: KeyDirectory = serde_json::from_value(payload).map_err(bad)?;
                let mut rng = os_rng()?;
                session
                    .client
                    .share_keys(&dir, &mut rng)
                    .map_err(secagg_error)
                    .and_then(|m| to_json(&m))
            }
            2 => {
                let shares: ForwardedShares = serde_json::from_value(payload).map_err(bad)?;
                let input = std::mem::take(&mut session.input);
                session
                    .client
                    .masked_input(&shares, &input)
                    .map_err(secagg_error)
                    .and_then(|m| to_json(&m))
            }
            3 => {
                let set: SurvivorSet = serde_json::from_value(payload).map_err(bad)?;
                session
                    .client
                    .consistency(&set)
                    .map_err(secagg_error)
                    .and_then(|m| to_json(&m))
            }
            4 => {
                let request: UnmaskRequest = serde_json::from_value(payload).map_err(bad)?;
                session
                    .client
                    .unmask(&request)
                    .map_err(secagg_error)
                    .and_then(|m| to_json(&m))
            }
            other => Err(fail(format!(
                "secure-aggregation round {other} does not exist (1 to 4 follow the task)"
            ))),
        };
        if result.is_err() || round == 4 {
            sessions.remove(&task_id);
        }
        result
    }

    /// Marks a session's debit as durably recorded: its rounds may run.
    pub fn confirm(&self, task_id: Uuid) -> Result<()> {
        if let Some(s) = self.lock()?.get_mut(&task_id) {
            s.debited = true;
        }
        Ok(())
    }

    /// Drops a session (its debit could not be recorded).
    pub fn forget(&self, task_id: Uuid) -> Result<()> {
        self.lock()?.remove(&task_id);
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<Uuid, Session>>> {
        self.sessions
            .lock()
            .map_err(|_| fail("session table lock poisoned".into()))
    }
}

/// A session refusal or failure: the coordinator counts the node as dropped.
fn fail(message: String) -> NodeError {
    NodeError::Protocol(
        ProtocolError::new(ErrorKind::FailedPrecondition, message).with_retryable(false),
    )
}

fn secagg_error(e: confer_privacy::secagg::SecAggError) -> NodeError {
    fail(format!("secure aggregation: {e}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value> {
    serde_json::to_value(value).map_err(|e| fail(e.to_string()))
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| NodeError::Config(format!("cannot create {}: {e}", path.display())))?;
    file.write_all(text.as_bytes())
        .map_err(|e| NodeError::Config(format!("cannot write {}: {e}", path.display())))
}
