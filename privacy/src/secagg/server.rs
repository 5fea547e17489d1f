//! The coordinator side: collects each round's messages, treats a node
//! missing from a round as a dropout, and removes the masks at the end.
//!
//! A message the server rejects (wrong round, unknown sender, bad signature,
//! wrong length) changes nothing: the sender simply counts as dropped.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use curve25519_dalek::Scalar;
use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::client::{check_roster, verify_advertisement};
use super::crypto::{self, Mask, Sign, Word};
use super::messages::{
    AdvertiseKeys, ConsistencySignature, DeliveredShare, ForwardedShares, KeyDirectory,
    MaskedInput, RevealedShare, ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
};
use super::shamir;
use super::topology::Topology;
use super::{Config, Result, Round, SecAggError};

/// The outcome: the sum mod 2^bits of the contributors' inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aggregate {
    /// Element-wise sum mod 2^bits.
    pub sum: Vec<u64>,
    /// The nodes whose inputs are in the sum, in id order.
    pub contributors: Vec<u32>,
}

/// The running sum of masked inputs, in the word size of the modulus.
enum Acc {
    W32(Vec<u32>),
    W64(Vec<u64>),
}

/// The coordinator's state machine for one session. Feed it each round's
/// messages with `receive_*`, then close the round with the method that
/// produces the next round's messages; see the [module docs](super).
pub struct Server {
    config: Config,
    topology: Arc<Topology>,
    identities: Arc<[VerifyingKey]>,
    threads: usize,
    round: Round,
    /// U1: nodes that advertised keys.
    advertised: BTreeMap<u32, AdvertiseKeys>,
    /// U2: nodes that shared keys, and the shares addressed to each node.
    shared: BTreeSet<u32>,
    inbox: BTreeMap<u32, Vec<DeliveredShare>>,
    /// U3: nodes whose masked input is in `sum`.
    masked: BTreeSet<u32>,
    sum: Acc,
    /// U2 \ U3, fixed when round 2 closes.
    dropped: Vec<u32>,
    /// U4: consistency signatures.
    signatures: BTreeMap<u32, [u8; 64]>,
    /// U5: nodes that answered the unmask round.
    unmasked: BTreeSet<u32>,
    self_mask_shares: BTreeMap<u32, Vec<(u32, Scalar)>>,
    mask_key_shares: BTreeMap<u32, Vec<(u32, Scalar)>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("round", &self.round)
            .field("advertised", &self.advertised.len())
            .field("shared", &self.shared.len())
            .field("masked", &self.masked.len())
            .field("signed", &self.signatures.len())
            .field("unmasked", &self.unmasked.len())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// A coordinator for `config`; `identities[v]` is node v's Ed25519
    /// verifying key. Unmasking uses all available cores (see
    /// [`Server::with_threads`]).
    pub fn new(config: Config, identities: Arc<[VerifyingKey]>) -> Result<Server> {
        let topology = Arc::new(Topology::new(&config));
        Server::with_topology(config, topology, identities)
    }

    /// [`Server::new`] with a precomputed [`Topology`].
    pub fn with_topology(
        config: Config,
        topology: Arc<Topology>,
        identities: Arc<[VerifyingKey]>,
    ) -> Result<Server> {
        config.validate()?;
        check_roster(&config, &identities, &topology)?;
        let sum = if config.bits <= 32 {
            Acc::W32(vec![0; config.vector_len])
        } else {
            Acc::W64(vec![0; config.vector_len])
        };
        Ok(Server {
            config,
            topology,
            identities,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            round: Round::AdvertiseKeys,
            advertised: BTreeMap::new(),
            shared: BTreeSet::new(),
            inbox: BTreeMap::new(),
            masked: BTreeSet::new(),
            sum,
            dropped: Vec::new(),
            signatures: BTreeMap::new(),
            unmasked: BTreeSet::new(),
            self_mask_shares: BTreeMap::new(),
            mask_key_shares: BTreeMap::new(),
        })
    }

    /// Sets how many threads expand masks when unmasking (default: all cores).
    pub fn with_threads(mut self, threads: usize) -> Server {
        self.threads = threads.max(1);
        self
    }

    /// The round whose messages the server is collecting.
    pub fn round(&self) -> Round {
        self.round
    }

    /// The session's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Nodes that shared keys but sent no masked input (known once round 2
    /// closes).
    pub fn dropped(&self) -> &[u32] {
        &self.dropped
    }

    fn expect(&self, round: Round, what: &str) -> Result<()> {
        if self.round != round {
            return Err(SecAggError::Protocol(format!(
                "{what} arrived during the {} round; it belongs to the {round} round",
                self.round
            )));
        }
        Ok(())
    }

    fn close(&mut self, round: Round, have: usize, detail: &str) -> Result<()> {
        if have < self.config.min_survivors {
            return Err(SecAggError::TooFewSurvivors {
                round,
                have,
                need: self.config.min_survivors,
                detail: detail.into(),
            });
        }
        Ok(())
    }

    /// Round 0: accepts a node's advertised keys after checking its signature.
    pub fn receive_advertise(&mut self, msg: AdvertiseKeys) -> Result<()> {
        self.expect(Round::AdvertiseKeys, "advertised keys")?;
        verify_advertisement(&self.config, &self.identities, &msg)?;
        if self.advertised.contains_key(&msg.from) {
            return Err(SecAggError::Protocol(format!(
                "node {} advertised keys twice",
                msg.from
            )));
        }
        self.advertised.insert(msg.from, msg);
        Ok(())
    }

    /// Closes round 0: for each node that advertised, the advertised keys of
    /// its neighbours.
    pub fn key_directories(&mut self) -> Result<BTreeMap<u32, KeyDirectory>> {
        self.expect(Round::AdvertiseKeys, "the request for key directories")?;
        self.close(
            Round::AdvertiseKeys,
            self.advertised.len(),
            "nodes that advertised keys",
        )?;
        let out = self
            .advertised
            .keys()
            .map(|&u| {
                let keys = self
                    .topology
                    .neighbours(u)
                    .into_iter()
                    .filter_map(|v| self.advertised.get(&v).cloned())
                    .collect();
                (u, KeyDirectory { keys })
            })
            .collect();
        self.round = Round::ShareKeys;
        Ok(out)
    }

    /// Round 1: accepts a node's encrypted shares, which must address
    /// exactly its neighbours that advertised keys.
    pub fn receive_shares(&mut self, msg: ShareKeys) -> Result<()> {
        self.expect(Round::ShareKeys, "shares")?;
        let u = msg.from;
        if !self.advertised.contains_key(&u) {
            return Err(SecAggError::Protocol(format!(
                "node {u} sent shares without having advertised keys"
            )));
        }
        if self.shared.contains(&u) {
            return Err(SecAggError::Protocol(format!("node {u} sent shares twice")));
        }
        let expected: Vec<u32> = self
            .topology
            .neighbours(u)
            .into_iter()
            .filter(|v| self.advertised.contains_key(v))
            .collect();
        let mut recipients: Vec<u32> = msg.shares.iter().map(|s| s.to).collect();
        recipients.sort_unstable();
        if recipients != expected {
            return Err(SecAggError::Protocol(format!(
                "node {u} must send one share to each of its {} neighbours that advertised keys, \
                 but addressed {:?}",
                expected.len(),
                recipients
            )));
        }
        if let Some(bad) = msg
            .shares
            .iter()
            .find(|s| s.ciphertext.len() != crypto::SHARE_CIPHERTEXT_LEN)
        {
            return Err(SecAggError::Protocol(format!(
                "node {u}'s share for node {} has {} bytes, not {}",
                bad.to,
                bad.ciphertext.len(),
                crypto::SHARE_CIPHERTEXT_LEN
            )));
        }
        for share in msg.shares {
            self.inbox
                .entry(share.to)
                .or_default()
                .push(DeliveredShare {
                    from: u,
                    ciphertext: share.ciphertext,
                });
        }
        self.shared.insert(u);
        Ok(())
    }

    /// Closes round 1: for each node that shared keys, the shares addressed
    /// to it by others that did.
    pub fn forward_shares(&mut self) -> Result<BTreeMap<u32, ForwardedShares>> {
        self.expect(Round::ShareKeys, "the request to forward shares")?;
        self.close(
            Round::ShareKeys,
            self.shared.len(),
            "nodes that shared keys",
        )?;
        let mut inbox = std::mem::take(&mut self.inbox);
        let out = self
            .shared
            .iter()
            .map(|&u| {
                let mut shares = inbox.remove(&u).unwrap_or_default();
                shares.sort_by_key(|s| s.from);
                (u, ForwardedShares { shares })
            })
            .collect();
        self.round = Round::MaskedInput;
        Ok(out)
    }

    /// Round 2: adds a node's masked input to the running sum.
    pub fn receive_masked_input(&mut self, msg: MaskedInput) -> Result<()> {
        self.expect(Round::MaskedInput, "a masked input")?;
        let u = msg.from;
        if !self.shared.contains(&u) {
            return Err(SecAggError::Protocol(format!(
                "node {u} sent a masked input without having shared keys"
            )));
        }
        if self.masked.contains(&u) {
            return Err(SecAggError::Protocol(format!(
                "node {u} sent its masked input twice"
            )));
        }
        let width = self.config.element_bytes();
        if msg.data.len() != self.config.vector_len * width {
            return Err(SecAggError::Protocol(format!(
                "node {u}'s masked input has {} bytes, not vector_len * {width} = {}",
                msg.data.len(),
                self.config.vector_len * width
            )));
        }
        match &mut self.sum {
            Acc::W32(acc) => add_packed(acc, &msg.data, width),
            Acc::W64(acc) => add_packed(acc, &msg.data, width),
        }
        self.masked.insert(u);
        Ok(())
    }

    /// Closes round 2: the survivor set, to send to every survivor.
    pub fn survivor_set(&mut self) -> Result<SurvivorSet> {
        self.expect(Round::MaskedInput, "the request for the survivor set")?;
        self.close(
            Round::MaskedInput,
            self.masked.len(),
            "nodes whose masked inputs arrived",
        )?;
        self.dropped = self.shared.difference(&self.masked).copied().collect();
        self.round = Round::Consistency;
        Ok(SurvivorSet {
            survivors: self.masked.iter().copied().collect(),
        })
    }

    /// Round 3: accepts a survivor's signature on the survivor set.
    pub fn receive_consistency(&mut self, msg: ConsistencySignature) -> Result<()> {
        self.expect(Round::Consistency, "a consistency signature")?;
        let u = msg.from;
        if !self.masked.contains(&u) {
            return Err(SecAggError::Protocol(format!(
                "node {u} signed the survivor set but is not a survivor"
            )));
        }
        if self.signatures.contains_key(&u) {
            return Err(SecAggError::Protocol(format!(
                "node {u} signed the survivor set twice"
            )));
        }
        let survivors: Vec<u32> = self.masked.iter().copied().collect();
        let transcript = crypto::survivors_transcript(&self.config.session, &survivors);
        self.identities[u as usize]
            .verify_strict(&transcript, &Signature::from_bytes(&msg.signature))
            .map_err(|_| SecAggError::BadSignature {
                signer: u,
                what: "the survivor set",
            })?;
        self.signatures.insert(u, msg.signature);
        Ok(())
    }

    /// Closes round 3: the unmask request (the same for every signer).
    pub fn unmask_request(&mut self) -> Result<UnmaskRequest> {
        self.expect(Round::Consistency, "the request for the unmask request")?;
        self.close(
            Round::Consistency,
            self.signatures.len(),
            "survivors that signed the survivor set",
        )?;
        self.round = Round::Unmask;
        Ok(UnmaskRequest {
            signatures: self
                .signatures
                .iter()
                .map(|(&from, &signature)| ConsistencySignature { from, signature })
                .collect(),
            dropped: self.dropped.clone(),
        })
    }

    /// Round 4: accepts a signer's revealed shares.
    pub fn receive_unmask(&mut self, msg: UnmaskShares) -> Result<()> {
        self.expect(Round::Unmask, "unmask shares")?;
        let w = msg.from;
        if !self.signatures.contains_key(&w) {
            return Err(SecAggError::Protocol(format!(
                "node {w} sent unmask shares without having signed the survivor set"
            )));
        }
        if self.unmasked.contains(&w) {
            return Err(SecAggError::Protocol(format!(
                "node {w} sent unmask shares twice"
            )));
        }
        let holds = |v: u32| v == w || self.topology.are_neighbours(v, w);
        let parse = |r: &RevealedShare, owners: &dyn Fn(u32) -> bool, what: &str| {
            if !owners(r.of) || !holds(r.of) {
                return Err(SecAggError::Protocol(format!(
                    "node {w} revealed a {what} share of node {}, which it should not hold or which was not requested",
                    r.of
                )));
            }
            Option::<Scalar>::from(Scalar::from_canonical_bytes(r.share)).ok_or_else(|| {
                SecAggError::Protocol(format!(
                    "node {w}'s {what} share of node {} is not a canonical field element",
                    r.of
                ))
            })
        };
        let is_survivor = |v: u32| self.masked.contains(&v);
        let is_dropped = |v: u32| self.dropped.binary_search(&v).is_ok();
        let mut seen = BTreeSet::new();
        let mut self_mask = Vec::with_capacity(msg.self_mask_shares.len());
        for r in &msg.self_mask_shares {
            self_mask.push((r.of, parse(r, &is_survivor, "self-mask")?));
            if !seen.insert(r.of) {
                return Err(SecAggError::Protocol(format!(
                    "node {w} revealed two shares for node {}",
                    r.of
                )));
            }
        }
        let mut mask_key = Vec::with_capacity(msg.mask_key_shares.len());
        for r in &msg.mask_key_shares {
            mask_key.push((r.of, parse(r, &is_dropped, "mask-key")?));
            if !seen.insert(r.of) {
                return Err(SecAggError::Protocol(format!(
                    "node {w} revealed two shares for node {}",
                    r.of
                )));
            }
        }
        for (v, s) in self_mask {
            self.self_mask_shares.entry(v).or_default().push((w, s));
        }
        for (v, s) in mask_key {
            self.mask_key_shares.entry(v).or_default().push((w, s));
        }
        self.unmasked.insert(w);
        Ok(())
    }

    /// Closes round 4: rebuilds the survivors' self-mask seeds and the
    /// dropped nodes' mask keys, removes every mask and returns the sum.
    pub fn finish(&mut self) -> Result<Aggregate> {
        self.expect(Round::Unmask, "the request to finish")?;
        let threshold = self.config.threshold;
        let session = self.config.session;
        let mut lagrange: HashMap<Vec<u32>, Vec<Scalar>> = HashMap::new();
        let mut rebuild = |v: u32, shares: Option<&Vec<(u32, Scalar)>>, what: &'static str| {
            let mut shares = shares.cloned().unwrap_or_default();
            if shares.len() < threshold {
                return Err(SecAggError::Reconstruction {
                    node: v,
                    what,
                    detail: format!(
                        "{} of the {threshold} shares needed arrived (its share holders that answered the unmask round)",
                        shares.len()
                    ),
                });
            }
            shares.sort_by_key(|s| s.0);
            shares.truncate(threshold);
            let ids: Vec<u32> = shares.iter().map(|s| s.0).collect();
            let coefficients = lagrange
                .entry(ids)
                .or_insert_with_key(|ids| shamir::lagrange_at_zero(ids));
            Ok(Zeroizing::new(shamir::combine(&shares, coefficients)))
        };

        let mut masks = Vec::with_capacity(self.masked.len());
        for &v in &self.masked {
            let seed = rebuild(v, self.self_mask_shares.get(&v), "self mask")?;
            masks.push(Mask {
                key: crypto::self_mask_key(&session, &seed, v),
                sign: Sign::Sub,
            });
        }
        // Pairs (dropped v, surviving neighbour w) whose masks stay in the sum.
        let mut pairs: Vec<(u32, Zeroizing<Scalar>, u32)> = Vec::new();
        for &v in &self.dropped {
            let key = rebuild(v, self.mask_key_shares.get(&v), "mask key")?;
            if crypto::public_key(&key) != self.advertised[&v].mask_key {
                return Err(SecAggError::Reconstruction {
                    node: v,
                    what: "mask key",
                    detail: "the rebuilt key does not match the advertised one: a share holder sent a wrong share".into(),
                });
            }
            for &w in &self.masked {
                if self.topology.are_neighbours(v, w) {
                    pairs.push((v, key.clone(), w));
                }
            }
        }
        masks.extend(self.pair_masks(&pairs)?);
        let threads = self.threads;
        let mask = self.config.modulus_mask();
        let sum = match &mut self.sum {
            Acc::W32(acc) => finish_sum(acc, &masks, threads, mask),
            Acc::W64(acc) => finish_sum(acc, &masks, threads, mask),
        };
        self.round = Round::Finished;
        Ok(Aggregate {
            sum,
            contributors: self.masked.iter().copied().collect(),
        })
    }

    /// The masks between dropped nodes and their surviving neighbours, with
    /// the sign that removes them from the survivors' inputs (key agreement
    /// spread over the server's threads).
    fn pair_masks(&self, pairs: &[(u32, Zeroizing<Scalar>, u32)]) -> Result<Vec<Mask>> {
        let session = self.config.session;
        let one = |(v, key, w): &(u32, Zeroizing<Scalar>, u32)| -> Result<Mask> {
            let shared =
                Zeroizing::new(crypto::agree(key, &self.advertised[w].mask_key).ok_or_else(
                    || SecAggError::Protocol(format!("node {w}'s mask key is of small order")),
                )?);
            Ok(Mask {
                key: crypto::pair_mask_key(&session, &shared, *v, *w),
                // w added +PRG if w < v, so subtract it; and vice versa.
                sign: if w < v { Sign::Sub } else { Sign::Add },
            })
        };
        let per = pairs.len().div_ceil(self.threads).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = pairs
                .chunks(per)
                .map(|chunk| scope.spawn(move || chunk.iter().map(one).collect::<Result<Vec<_>>>()))
                .collect();
            let mut out = Vec::with_capacity(pairs.len());
            for h in handles {
                out.extend(h.join().map_err(|_| {
                    SecAggError::Internal("a key-agreement thread panicked".into())
                })??);
            }
            Ok(out)
        })
    }
}

fn finish_sum<W: Word>(acc: &mut [W], masks: &[Mask], threads: usize, mask: u64) -> Vec<u64> {
    crypto::apply_masks_parallel(acc, masks, threads);
    acc.iter().map(|w| w.to_u64() & mask).collect()
}

/// Adds packed little-endian elements of `width` bytes to `acc`.
fn add_packed<W: Word>(acc: &mut [W], data: &[u8], width: usize) {
    if width == W::BYTES {
        for (a, b) in acc.iter_mut().zip(data.chunks_exact(width)) {
            *a = a.add(W::from_le(b));
        }
    } else {
        for (a, b) in acc.iter_mut().zip(data.chunks_exact(width)) {
            let mut buf = [0u8; 8];
            buf[..width].copy_from_slice(b);
            *a = a.add(W::from_u64(u64::from_le_bytes(buf)));
        }
    }
}
