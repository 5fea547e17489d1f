//! Ed25519 keys and signed task envelopes.
//!
//! The coordinator signs the exact JSON bytes of every task; a node
//! configured with the coordinator's public key accepts only envelopes whose
//! signature verifies (strict verification, no malleability). Keys are
//! stored as hex text: 64 hex digits for a secret key (the Ed25519 seed),
//! 64 for a public key.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::error::{ErrorKind, ProtocolError, Result};
use crate::task::{Envelope, Task};

/// A signing identity (the coordinator's).
pub struct Identity {
    key: SigningKey,
}

impl Identity {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Self> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| ProtocolError::internal(format!("no randomness from the OS: {e}")))?;
        Ok(Self {
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads a secret key file (64 hex digits).
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ProtocolError::invalid(format!("cannot read signing key {}: {e}", path.display()))
        })?;
        let bytes = decode_32(text.trim())
            .map_err(|e| ProtocolError::invalid(format!("signing key {}: {e}", path.display())))?;
        Ok(Self {
            key: SigningKey::from_bytes(&bytes),
        })
    }

    /// Writes the secret key (owner-only permissions on Unix) and returns the public key.
    pub fn save(&self, path: &Path) -> Result<String> {
        let text = format!("{}\n", hex::encode(self.key.to_bytes()));
        write_private(path, text.as_bytes()).map_err(|e| {
            ProtocolError::invalid(format!("cannot write signing key {}: {e}", path.display()))
        })?;
        Ok(self.public_hex())
    }

    /// The public key, hex.
    pub fn public_hex(&self) -> String {
        hex::encode(self.key.verifying_key().to_bytes())
    }

    /// The public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.verifying_key())
    }

    /// Signs a task into an envelope.
    pub fn sign(&self, task: &Task) -> Result<Envelope> {
        let mut envelope = Envelope::new(task)?;
        let signature = self.key.sign(envelope.payload.as_bytes());
        envelope.signature = Some(hex::encode(signature.to_bytes()));
        Ok(envelope)
    }

    /// Signs arbitrary bytes (hex signature).
    pub fn sign_bytes(&self, bytes: &[u8]) -> String {
        hex::encode(self.key.sign(bytes).to_bytes())
    }
}

/// A verifying key (what a node is configured with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self> {
        let bytes = decode_32(text.trim())?;
        VerifyingKey::from_bytes(&bytes)
            .map(Self)
            .map_err(|e| ProtocolError::invalid(format!("not an Ed25519 public key: {e}")))
    }

    /// Hex form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.to_bytes())
    }

    /// Checks the envelope's signature and returns its task. The signature
    /// covers the payload bytes exactly as received.
    pub fn verify(&self, envelope: &Envelope) -> Result<Task> {
        let refused = |why: &str| {
            ProtocolError::new(
                ErrorKind::PermissionDenied,
                format!(
                    "task refused: {why}; only tasks signed by the configured coordinator key are accepted"
                ),
            )
        };
        let sig_hex = envelope
            .signature
            .as_deref()
            .ok_or_else(|| refused("it is not signed"))?;
        let sig_bytes: [u8; 64] = hex::decode(sig_hex)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| refused("its signature is malformed"))?;
        let signature = Signature::from_bytes(&sig_bytes);
        self.0
            .verify_strict(envelope.payload.as_bytes(), &signature)
            .map_err(|_| refused("its signature does not verify"))?;
        envelope.task()
    }

    /// Checks a detached hex signature over `bytes`.
    pub fn verify_bytes(&self, bytes: &[u8], sig_hex: &str) -> bool {
        let Some(sig) = hex::decode(sig_hex)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        self.0
            .verify_strict(bytes, &Signature::from_bytes(&sig))
            .is_ok()
    }
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn decode_32(text: &str) -> Result<[u8; 32]> {
    hex::decode(text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| ProtocolError::invalid("expected 64 hexadecimal digits"))
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn signed_tasks_verify_and_tampering_is_refused() {
        let id = Identity::generate().expect("key");
        let public = PublicKey::from_hex(&id.public_hex()).expect("public");
        let task = Task::query("s", "r", "SELECT 1", Duration::from_secs(60));
        let env = id.sign(&task).expect("sign");
        assert_eq!(public.verify(&env).expect("valid"), task);

        let mut tampered = env.clone();
        tampered.payload = tampered.payload.replace("SELECT 1", "SELECT 2");
        assert!(
            public
                .verify(&tampered)
                .unwrap_err()
                .message
                .contains("does not verify")
        );

        let other = Identity::generate().expect("key");
        let forged = other.sign(&task).expect("sign");
        assert!(public.verify(&forged).is_err());

        let unsigned = Envelope::new(&task).expect("envelope");
        assert!(
            public
                .verify(&unsigned)
                .unwrap_err()
                .message
                .contains("not signed")
        );
    }

    #[test]
    fn the_task_a_node_verifies_is_the_task_the_coordinator_signed() {
        // Found by the task_envelope fuzz target: without exact float
        // parsing, 1e-86 read back one unit in the last place off.
        let identity = Identity::generate().expect("key");
        for delta in [1e-86, 1e-6, 0.1 + 0.2, f64::MIN_POSITIVE, 5e-324, 1e300] {
            let mut task = Task::query("s", "r", "SELECT 1", Duration::from_secs(60));
            task.study_info = Some(crate::task::StudyInfo {
                title: "t".into(),
                principal_investigator: "p".into(),
                ethics_ref: "e".into(),
                requested_epsilon: delta * 3.0,
                requested_delta: delta,
            });
            let verified = identity
                .public()
                .verify(&identity.sign(&task).expect("sign"))
                .expect("verify");
            assert_eq!(verified, task, "{delta:e}");
        }
    }

    #[test]
    fn keys_round_trip_through_files() {
        let dir = std::env::temp_dir().join(format!("confer-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("k");
        let id = Identity::generate().expect("key");
        let public = id.save(&path).expect("save");
        assert_eq!(Identity::load(&path).expect("load").public_hex(), public);
        std::fs::remove_dir_all(&dir).ok();
    }
}
