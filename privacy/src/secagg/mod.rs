//! Secure aggregation: the coordinator learns the sum of the nodes' integer
//! vectors and nothing else, even when nodes drop out mid-round.
//!
//! The protocol is Bonawitz et al., "Practical Secure Aggregation for
//! Privacy-Preserving Machine Learning" (CCS 2017), with the sparse
//! neighbour graph of Bell et al., "Secure Single-Server Aggregation with
//! (Poly)Logarithmic Overhead" (CCS 2020, "SecAgg+"). This module is pure:
//! no transport, no clock, no global randomness. Every function that needs
//! randomness takes a [`rand_core::CryptoRng`] (rand_core 0.10, the
//! generation curve25519-dalek 5 and ed25519-dalek 3 use), so thousands of
//! parties can be simulated deterministically in one process.
//!
//! # Rounds
//!
//! | round | node ([`Client`])            | coordinator ([`Server`])                        |
//! |-------|------------------------------|-------------------------------------------------|
//! | 0     | [`Client::new`] → [`AdvertiseKeys`] | [`Server::receive_advertise`], then [`Server::key_directories`] → one [`KeyDirectory`] per node |
//! | 1     | [`Client::share_keys`] → [`ShareKeys`] | [`Server::receive_shares`], then [`Server::forward_shares`] → one [`ForwardedShares`] per node |
//! | 2     | [`Client::masked_input`] → [`MaskedInput`] | [`Server::receive_masked_input`], then [`Server::survivor_set`] → [`SurvivorSet`] (same for all) |
//! | 3     | [`Client::consistency`] → [`ConsistencySignature`] | [`Server::receive_consistency`], then [`Server::unmask_request`] → [`UnmaskRequest`] (same for all) |
//! | 4     | [`Client::unmask`] → [`UnmaskShares`] | [`Server::receive_unmask`], then [`Server::finish`] → [`Aggregate`] |
//!
//! * Round 0: each node makes two X25519 key pairs, one to encrypt shares
//!   (c) and one to derive pairwise masks (s), and signs both public keys
//!   with its long-term Ed25519 identity. Secret keys are curve25519
//!   [`Scalar`](curve25519_dalek::Scalar)s, so the mask key is directly an
//!   element of the prime field that Shamir sharing works in.
//! * Round 1: each node Shamir-shares (threshold t) its mask key s and a
//!   fresh self-mask seed b among its neighbours and itself; each share
//!   travels encrypted with ChaCha20-Poly1305 under a key that HKDF-SHA256
//!   derives from the pairwise X25519 secret, with associated data binding
//!   session, sender and recipient.
//! * Round 2: `y = x + PRG(b) + Σ_v ±PRG(s_uv) mod 2^bits`, `+` when the
//!   node's id is below its neighbour's. The PRG is ChaCha20 keyed with the
//!   full 256-bit HKDF output.
//! * Round 3: survivors sign the survivor set. A node that is shown a set
//!   others did not sign, or too few signatures, aborts without revealing
//!   anything.
//! * Round 4: each node reveals, per neighbour, its share of b if the
//!   neighbour survived or its share of s if it dropped, never both; a
//!   request that asks for both for one node gets neither.
//!
//! A node missing from a round is a dropout; the coordinator recovers from
//! dropouts in any round as long as every survivor keeps `threshold` share
//! holders and at least `min_survivors` nodes sent masked inputs.
//!
//! # Example
//!
//! Five nodes on a complete graph; node 4 drops out after sharing its keys,
//! so the sum covers nodes 0 to 3.
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::sync::Arc;
//! use confer_privacy::secagg::{
//!     ChaCha20Rng, Client, Config, Graph, SeedableRng, Server, SigningKey, VerifyingKey,
//! };
//!
//! let mut rng = ChaCha20Rng::from_seed([7; 32]); // use an OS-seeded CSPRNG in production
//! let config = Config::new(5, 16, 3, [1; 32]).unwrap(); // 5 nodes, 16-bit sums, 3 elements
//! assert_eq!(config.graph, Graph::Complete);
//! let keys: Vec<SigningKey> = (0..5).map(|_| SigningKey::generate(&mut rng)).collect();
//! let identities: Arc<[VerifyingKey]> = keys.iter().map(|k| k.verifying_key()).collect();
//! let mut server = Server::new(config.clone(), identities.clone()).unwrap();
//!
//! // Round 0: advertise keys.
//! let mut clients = BTreeMap::new();
//! for (id, key) in keys.into_iter().enumerate() {
//!     let (client, msg) = Client::new(id as u32, config.clone(), key, identities.clone(), &mut rng).unwrap();
//!     server.receive_advertise(msg).unwrap();
//!     clients.insert(id as u32, client);
//! }
//! // Round 1: share keys.
//! for (id, directory) in server.key_directories().unwrap() {
//!     let msg = clients.get_mut(&id).unwrap().share_keys(&directory, &mut rng).unwrap();
//!     server.receive_shares(msg).unwrap();
//! }
//! // Round 2: masked inputs; node 4 has gone.
//! let inputs = |id: u32| vec![id as u64, 10 * id as u64, 65_535];
//! for (id, shares) in server.forward_shares().unwrap() {
//!     if id == 4 {
//!         continue;
//!     }
//!     let msg = clients.get_mut(&id).unwrap().masked_input(&shares, &inputs(id)).unwrap();
//!     server.receive_masked_input(msg).unwrap();
//! }
//! // Round 3: consistency check.
//! let survivors = server.survivor_set().unwrap();
//! for &id in &survivors.survivors {
//!     let msg = clients.get_mut(&id).unwrap().consistency(&survivors).unwrap();
//!     server.receive_consistency(msg).unwrap();
//! }
//! // Round 4: unmask.
//! let request = server.unmask_request().unwrap();
//! for &id in &survivors.survivors {
//!     let msg = clients.get_mut(&id).unwrap().unmask(&request).unwrap();
//!     server.receive_unmask(msg).unwrap();
//! }
//! let aggregate = server.finish().unwrap();
//! assert_eq!(aggregate.contributors, vec![0, 1, 2, 3]);
//! // 0+1+2+3 = 6, 0+10+20+30 = 60, 4 * 65535 mod 2^16 = 65532.
//! assert_eq!(aggregate.sum, vec![6, 60, 65_532]);
//! ```
//!
//! For distributed differential privacy, encode real vectors with
//! [`encoding::Encoder`] (clip, rotate, scale, round, add this node's share
//! of discrete Gaussian noise) before [`Client::masked_input`], and decode
//! the [`Aggregate`] with the same encoder. [`simulation`] runs a whole
//! federation in one process for tests and benchmarks.

mod client;
mod crypto;
pub mod encoding;
mod messages;
mod server;
mod shamir;
pub mod simulation;
mod topology;

use serde::{Deserialize, Serialize};

pub use client::Client;
pub use messages::{
    AdvertiseKeys, ConsistencySignature, DeliveredShare, ForwardedShares, KeyDirectory,
    MaskedInput, RevealedShare, SealedShare, ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
    WireSize,
};
pub use server::{Aggregate, Server};
pub use topology::Topology;

// Re-exported so that callers use the same versions as this module.
pub use chacha20::ChaCha20Rng;
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use rand_core::{CryptoRng, SeedableRng};

/// Which pairs of nodes share masks and hold each other's secret shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Graph {
    /// Every node is every other node's neighbour (Bonawitz et al. 2017).
    Complete,
    /// Each node has exactly `degree` neighbours (even, below n - 1): the
    /// nodes sit on a ring in an order drawn from the session id and each is
    /// joined to the `degree / 2` nearest on either side (a Harary graph with
    /// random labels, as in SecAgg+ deployments). Cost per node is
    /// O(degree) instead of O(n).
    Sparse {
        /// Number of neighbours per node.
        degree: usize,
    },
}

impl Graph {
    /// The graph [`Config::new`] picks: complete up to 50 nodes, past that a
    /// sparse graph of degree `4 * ceil(log2 n)` rounded up to even.
    ///
    /// The degree is a heuristic that favours cost. With the default
    /// threshold (half the holders plus one) and 10% of nodes dropping at
    /// random, the chance that some neighbourhood falls below its threshold
    /// (so that the session fails) is below 1e-8 for n up to 10,000 (8e-9 at
    /// n = 500); at 20% it is about 0.5%. For higher dropout rates use a
    /// degree near n / 2, or the complete graph. Against a coordinator that
    /// corrupts a large fraction of nodes, choose the degree from Bell et
    /// al.'s bounds instead.
    pub fn default_for(n: usize) -> Graph {
        if n <= 50 {
            return Graph::Complete;
        }
        let log2 = usize::BITS - (n - 1).leading_zeros();
        let degree = 4 * log2 as usize;
        if degree >= n - 1 {
            Graph::Complete
        } else {
            Graph::Sparse { degree }
        }
    }
}

/// Public parameters of one aggregation session, identical at every party.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Number of nodes; their ids are `0..n` and index the identity keys.
    pub n: usize,
    /// Shares needed to reconstruct a node's secrets, out of the node's
    /// share holders (its neighbours and itself: `n` for the complete graph,
    /// `degree + 1` for the sparse one). Must exceed half the holders.
    pub threshold: usize,
    /// The fewest inputs the coordinator may sum, and the fewest consistency
    /// signatures a node accepts before unmasking. Must exceed n / 2 so that
    /// a coordinator cannot gather signatures on two different survivor sets.
    /// Distributed-DP noise is calibrated to this many survivors.
    pub min_survivors: usize,
    /// The neighbour graph.
    pub graph: Graph,
    /// Sums are taken modulo `2^bits` (1 to 64).
    pub bits: u32,
    /// Number of elements in each input vector.
    pub vector_len: usize,
    /// Fresh, public, unique per session: binds every signature,
    /// ciphertext and mask to this session and seeds the sparse graph.
    pub session: [u8; 32],
}

impl Config {
    /// Defaults: the graph of [`Graph::default_for`], threshold = half the
    /// share holders plus one, `min_survivors` = n / 2 + 1 (equal to the
    /// threshold on the complete graph).
    pub fn new(n: usize, bits: u32, vector_len: usize, session: [u8; 32]) -> Result<Config> {
        Config::with_graph(n, Graph::default_for(n.max(1)), bits, vector_len, session)
    }

    /// Defaults for the given graph.
    pub fn with_graph(
        n: usize,
        graph: Graph,
        bits: u32,
        vector_len: usize,
        session: [u8; 32],
    ) -> Result<Config> {
        let holders = match graph {
            Graph::Complete => n,
            Graph::Sparse { degree } => degree + 1,
        };
        let config = Config {
            n,
            threshold: holders / 2 + 1,
            min_survivors: n / 2 + 1,
            graph,
            bits,
            vector_len,
            session,
        };
        config.validate()?;
        Ok(config)
    }

    /// Replaces the threshold (e.g. `2 * holders / 3 + 1` against an actively
    /// malicious coordinator).
    pub fn threshold(mut self, threshold: usize) -> Result<Config> {
        self.threshold = threshold;
        self.validate()?;
        Ok(self)
    }

    /// Replaces the minimum number of survivors.
    pub fn min_survivors(mut self, min_survivors: usize) -> Result<Config> {
        self.min_survivors = min_survivors;
        self.validate()?;
        Ok(self)
    }

    /// Share holders per node: its neighbours and itself.
    pub fn holders(&self) -> usize {
        match self.graph {
            Graph::Complete => self.n,
            Graph::Sparse { degree } => degree + 1,
        }
    }

    /// Bytes per element on the wire: `ceil(bits / 8)`.
    pub fn element_bytes(&self) -> usize {
        self.bits.div_ceil(8) as usize
    }

    /// Checks every parameter; the message says which one and what to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(SecAggError::InvalidParameter(msg));
        if self.n < 2 || self.n > u32::MAX as usize {
            return bad(format!(
                "secure aggregation needs at least 2 nodes (and ids that fit u32), not n = {}",
                self.n
            ));
        }
        if !(1..=64).contains(&self.bits) {
            return bad(format!("bits must be 1 to 64, not {}", self.bits));
        }
        // ChaCha20 (RFC 8439) has a 32-bit block counter: 2^38 bytes per key.
        let word = if self.bits <= 32 { 4 } else { 8 };
        if self.vector_len == 0 || (self.vector_len as u128) * word > 1 << 38 {
            return bad(format!(
                "vector_len must be 1 to 2^35 elements, not {}",
                self.vector_len
            ));
        }
        if let Graph::Sparse { degree } = self.graph {
            if degree < 2 || degree % 2 == 1 {
                return bad(format!(
                    "the sparse graph's degree must be even and at least 2, not {degree}"
                ));
            }
            if degree >= self.n - 1 {
                return bad(format!(
                    "degree {degree} reaches every other node of {}: use Graph::Complete",
                    self.n
                ));
            }
        }
        let holders = self.holders();
        if self.threshold <= holders / 2 || self.threshold > holders {
            return bad(format!(
                "threshold must be above half the {holders} share holders and at most {holders}, not {}: \
                 set it to {} (or up to {holders} to tolerate fewer dropouts)",
                self.threshold,
                holders / 2 + 1
            ));
        }
        if self.min_survivors <= self.n / 2 || self.min_survivors > self.n {
            return bad(format!(
                "min_survivors must be above n / 2 = {} and at most n = {}, not {}",
                self.n / 2,
                self.n,
                self.min_survivors
            ));
        }
        Ok(())
    }

    /// The mask applied to every element: `2^bits - 1`.
    pub(crate) fn modulus_mask(&self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }
}

/// Which round a message belongs to, for errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Round {
    /// Round 0: advertise keys.
    AdvertiseKeys,
    /// Round 1: share keys.
    ShareKeys,
    /// Round 2: masked input.
    MaskedInput,
    /// Round 3: consistency check.
    Consistency,
    /// Round 4: unmask.
    Unmask,
    /// After the coordinator computed the sum.
    Finished,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Round::AdvertiseKeys => "advertise-keys",
            Round::ShareKeys => "share-keys",
            Round::MaskedInput => "masked-input",
            Round::Consistency => "consistency",
            Round::Unmask => "unmask",
            Round::Finished => "finished",
        })
    }
}

/// Errors of secure aggregation. Node numbers are ids in `0..n`.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SecAggError {
    /// A parameter is out of range; the message says which and what to change.
    #[error("{0}")]
    InvalidParameter(String),
    /// A signature does not verify under the signer's identity key.
    #[error("node {signer}: signature on {what} is invalid")]
    BadSignature {
        /// The node whose signature failed.
        signer: u32,
        /// What was signed ("advertised keys", "the survivor set").
        what: &'static str,
    },
    /// An encrypted share failed authentication: tampered, misrouted or
    /// encrypted under a different key.
    #[error(
        "node {recipient}: the share from node {sender} fails to decrypt (tampered, misrouted or under another key)"
    )]
    Decryption {
        /// The node that tried to decrypt.
        recipient: u32,
        /// The node that sent the share.
        sender: u32,
    },
    /// The coordinator showed this node a survivor set that others did not
    /// sign, or too few signatures: the node aborts and reveals nothing.
    #[error("node {node}: inconsistent survivor set, aborting without revealing shares: {detail}")]
    Inconsistent {
        /// The node that detected it.
        node: u32,
        /// What it saw.
        detail: String,
    },
    /// The unmask request asked for both secrets of one peer.
    #[error(
        "node {node}: the unmask request asks for both the self-mask share and the mask-key share of node {peer}; revealing neither"
    )]
    BothSharesRequested {
        /// The node asked.
        node: u32,
        /// The peer whose shares were both requested.
        peer: u32,
    },
    /// Too many dropouts for the round to go on.
    #[error("{round} round: {have} nodes remain but at least {need} are needed ({detail})")]
    TooFewSurvivors {
        /// The round that ran short.
        round: Round,
        /// Nodes (or shares) present.
        have: usize,
        /// Nodes needed.
        need: usize,
        /// Whose count this is.
        detail: String,
    },
    /// A node's secret cannot be rebuilt, or was rebuilt wrongly.
    #[error("cannot unmask node {node}'s {what}: {detail}")]
    Reconstruction {
        /// The node whose secret is missing.
        node: u32,
        /// "self mask" or "mask key".
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A message breaks the protocol (wrong round, unknown or duplicate
    /// sender, wrong length); the message says what.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The node already aborted this session.
    #[error("node {node} aborted this session earlier: {reason}")]
    Aborted {
        /// The node.
        node: u32,
        /// The first error.
        reason: String,
    },
    /// A broken invariant inside this module: a bug, please report it.
    #[error("internal error (a bug in confer-privacy secagg): {0}")]
    Internal(String),
}

impl SecAggError {
    /// Whether running a fresh session may succeed (dropouts), as opposed to
    /// a misconfiguration or an attack that will recur.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            SecAggError::TooFewSurvivors { .. } | SecAggError::Reconstruction { .. }
        )
    }
}

/// Convenience alias.
pub type Result<T, E = SecAggError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = Config::new(20, 32, 10, [0; 32]).expect("config");
        assert_eq!(c.graph, Graph::Complete);
        assert_eq!(c.threshold, 11);
        assert_eq!(c.min_survivors, 11);
        let c = Config::new(500, 32, 10, [0; 32]).expect("config");
        assert_eq!(c.graph, Graph::Sparse { degree: 36 });
        assert_eq!(c.threshold, 19);
        assert_eq!(c.min_survivors, 251);
        assert_eq!(Graph::default_for(100), Graph::Sparse { degree: 28 });
    }

    #[test]
    fn bad_configs_are_explained() {
        let err = Config::new(10, 0, 10, [0; 32]).unwrap_err().to_string();
        assert!(err.contains("bits"), "{err}");
        let err = Config::with_graph(100, Graph::Sparse { degree: 7 }, 32, 10, [0; 32])
            .unwrap_err()
            .to_string();
        assert!(err.contains("even"), "{err}");
        let err = Config::new(10, 32, 10, [0; 32])
            .expect("config")
            .threshold(5)
            .unwrap_err()
            .to_string();
        assert!(err.contains("set it to 6"), "{err}");
        let err = Config::new(10, 32, 10, [0; 32])
            .expect("config")
            .min_survivors(3)
            .unwrap_err()
            .to_string();
        assert!(err.contains("min_survivors"), "{err}");
    }
}
