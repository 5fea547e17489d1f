//! The node side: a state machine that moves one round per call and aborts
//! for good at the first error.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use curve25519_dalek::Scalar;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use super::crypto::{self, Mask, Sign, Word};
use super::messages::{
    AdvertiseKeys, ConsistencySignature, ForwardedShares, KeyDirectory, MaskedInput, RevealedShare,
    SealedShare, ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
};
use super::shamir;
use super::topology::Topology;
use super::{Config, Result, Round, SecAggError};

/// One node's part in one session. Create it with [`Client::new`] (round 0)
/// and call [`share_keys`](Client::share_keys),
/// [`masked_input`](Client::masked_input),
/// [`consistency`](Client::consistency) and [`unmask`](Client::unmask) in
/// order, each with the coordinator's message for that round. After any
/// error the client refuses every later call ([`SecAggError::Aborted`]).
///
/// A call for the wrong round, including a repeat of the last one, aborts
/// the node: answering a round twice could hand out two different sharings
/// of one secret, or reveal shares twice. A transport that retries must keep
/// and resend the node's first answer.
pub struct Client {
    id: u32,
    config: Config,
    topology: Arc<Topology>,
    identity: SigningKey,
    identities: Arc<[VerifyingKey]>,
    encryption_sk: Zeroizing<Scalar>,
    mask_sk: Zeroizing<Scalar>,
    encryption_pk: [u8; 32],
    mask_pk: [u8; 32],
    state: State,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("round", &self.round())
            .finish_non_exhaustive()
    }
}

/// A neighbour's advertised mask key and the secret shared with it for
/// encrypting shares (computed once, in round 1).
struct Peer {
    mask_key: [u8; 32],
    encryption_secret: Zeroizing<[u8; 32]>,
}

/// The shares of one peer's secrets that this node holds.
struct Held {
    mask_key: Zeroizing<Scalar>,
    self_mask: Zeroizing<Scalar>,
}

enum State {
    /// Round 0 done; waiting for the key directory.
    Advertised,
    /// Round 1 done; waiting for the forwarded shares.
    SharedKeys {
        peers: BTreeMap<u32, Peer>,
        seed: Zeroizing<Scalar>,
        own: Held,
    },
    /// Round 2 done; waiting for the survivor set. `held` includes this node.
    Masked { held: BTreeMap<u32, Held> },
    /// Round 3 done; waiting for the unmask request.
    Signed {
        held: BTreeMap<u32, Held>,
        survivors: Vec<u32>,
    },
    /// Round 4 done.
    Done,
    /// An earlier call failed.
    Aborted(String),
}

impl Client {
    /// Round 0: makes the node's key pairs and the signed advertisement.
    ///
    /// `identity` is this node's long-term Ed25519 key; `identities[v]` is
    /// node v's verifying key, for all `n` nodes (the coordinator's roster).
    pub fn new<R: CryptoRng + ?Sized>(
        id: u32,
        config: Config,
        identity: SigningKey,
        identities: Arc<[VerifyingKey]>,
        rng: &mut R,
    ) -> Result<(Client, AdvertiseKeys)> {
        let topology = Arc::new(Topology::new(&config));
        Client::with_topology(id, config, topology, identity, identities, rng)
    }

    /// [`Client::new`] with a precomputed [`Topology`] (saves O(n) per node
    /// when simulating many nodes in one process).
    pub fn with_topology<R: CryptoRng + ?Sized>(
        id: u32,
        config: Config,
        topology: Arc<Topology>,
        identity: SigningKey,
        identities: Arc<[VerifyingKey]>,
        rng: &mut R,
    ) -> Result<(Client, AdvertiseKeys)> {
        config.validate()?;
        check_roster(&config, &identities, &topology)?;
        if id as usize >= config.n {
            return Err(SecAggError::InvalidParameter(format!(
                "node id {id} is outside 0..{}",
                config.n
            )));
        }
        if identities[id as usize] != identity.verifying_key() {
            return Err(SecAggError::InvalidParameter(format!(
                "node {id}: the identity key does not match entry {id} of the roster"
            )));
        }
        let encryption_sk = Zeroizing::new(Scalar::random(rng));
        let mask_sk = Zeroizing::new(Scalar::random(rng));
        let encryption_pk = crypto::public_key(&encryption_sk);
        let mask_pk = crypto::public_key(&mask_sk);
        let transcript =
            crypto::advertise_transcript(&config.session, id, &encryption_pk, &mask_pk);
        let signature = identity.sign(&transcript).to_bytes();
        let client = Client {
            id,
            config,
            topology,
            identity,
            identities,
            encryption_sk,
            mask_sk,
            encryption_pk,
            mask_pk,
            state: State::Advertised,
        };
        let msg = AdvertiseKeys {
            from: id,
            encryption_key: encryption_pk,
            mask_key: mask_pk,
            signature,
        };
        Ok((client, msg))
    }

    /// This node's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The round this node expects next (`Finished` when done or aborted).
    pub fn round(&self) -> Round {
        round_of(&self.state)
    }

    /// Runs one round: takes the state, and on error leaves `Aborted`.
    fn advance<T>(
        &mut self,
        round: Round,
        step: impl FnOnce(&Self, State) -> Result<(T, State)>,
    ) -> Result<T> {
        let state = std::mem::replace(&mut self.state, State::Done);
        let state = match state {
            State::Aborted(reason) => {
                let err = SecAggError::Aborted {
                    node: self.id,
                    reason: reason.clone(),
                };
                self.state = State::Aborted(reason);
                return Err(err);
            }
            s => s,
        };
        if round_of(&state) != round {
            let err = SecAggError::Protocol(format!(
                "node {} got a {round} message while expecting {}",
                self.id,
                round_of(&state)
            ));
            self.state = State::Aborted(err.to_string());
            return Err(err);
        }
        match step(self, state) {
            Ok((out, next)) => {
                self.state = next;
                Ok(out)
            }
            Err(err) => {
                self.state = State::Aborted(err.to_string());
                Err(err)
            }
        }
    }

    /// Round 1: checks the neighbours' signed keys and sends each of them an
    /// encrypted share of this node's mask key and of a fresh self-mask seed.
    pub fn share_keys<R: CryptoRng + ?Sized>(
        &mut self,
        directory: &KeyDirectory,
        rng: &mut R,
    ) -> Result<ShareKeys> {
        self.advance(Round::ShareKeys, |me, _| me.do_share_keys(directory, rng))
    }

    fn do_share_keys<R: CryptoRng + ?Sized>(
        &self,
        directory: &KeyDirectory,
        rng: &mut R,
    ) -> Result<(ShareKeys, State)> {
        let id = self.id;
        let mut peers = BTreeMap::new();
        let mut seen_keys: HashSet<[u8; 32]> = HashSet::new();
        seen_keys.insert(self.encryption_pk);
        seen_keys.insert(self.mask_pk);
        for entry in &directory.keys {
            let v = entry.from;
            if !self.topology.are_neighbours(id, v) {
                return Err(SecAggError::Protocol(format!(
                    "node {id}: the key directory lists node {v}, which is not its neighbour"
                )));
            }
            if peers.contains_key(&v) {
                return Err(SecAggError::Protocol(format!(
                    "node {id}: the key directory lists node {v} twice"
                )));
            }
            if entry.encryption_key == entry.mask_key {
                return Err(SecAggError::Protocol(format!(
                    "node {v} advertised the same key for encryption and masks"
                )));
            }
            if !seen_keys.insert(entry.encryption_key) || !seen_keys.insert(entry.mask_key) {
                return Err(SecAggError::Protocol(format!(
                    "node {id}: node {v} advertised a public key already in use"
                )));
            }
            let encryption_secret = Zeroizing::new(
                crypto::agree(&self.encryption_sk, &entry.encryption_key)
                    .ok_or_else(|| small_order(id, v, "encryption"))?,
            );
            peers.insert(
                v,
                Peer {
                    mask_key: entry.mask_key,
                    encryption_secret,
                },
            );
        }
        // Check all signatures at once; name the first bad one.
        let transcripts: Vec<Vec<u8>> = directory
            .keys
            .iter()
            .map(|e| {
                crypto::advertise_transcript(
                    &self.config.session,
                    e.from,
                    &e.encryption_key,
                    &e.mask_key,
                )
            })
            .collect();
        let signed: Vec<(u32, &[u8], [u8; 64])> = directory
            .keys
            .iter()
            .zip(&transcripts)
            .map(|(e, t)| (e.from, t.as_slice(), e.signature))
            .collect();
        if let Some(signer) = first_invalid_signature(&self.identities, &signed) {
            return Err(SecAggError::BadSignature {
                signer,
                what: "advertised keys",
            });
        }
        let threshold = self.config.threshold;
        if peers.len() + 1 < threshold {
            return Err(SecAggError::TooFewSurvivors {
                round: Round::ShareKeys,
                have: peers.len() + 1,
                need: threshold,
                detail: format!(
                    "share holders of node {id}: its neighbours that advertised keys, and itself"
                ),
            });
        }
        let seed = Zeroizing::new(Scalar::random(rng));
        let holders: Vec<u32> = {
            let mut h: Vec<u32> = peers.keys().copied().collect();
            let at = h.partition_point(|&v| v < id);
            h.insert(at, id);
            h
        };
        let mask_shares = Zeroizing::new(shamir::split(&self.mask_sk, threshold, &holders, rng));
        let seed_shares = Zeroizing::new(shamir::split(&seed, threshold, &holders, rng));
        let mut shares = Vec::with_capacity(peers.len());
        let mut own = None;
        for (i, &h) in holders.iter().enumerate() {
            if h == id {
                own = Some(Held {
                    mask_key: Zeroizing::new(mask_shares[i]),
                    self_mask: Zeroizing::new(seed_shares[i]),
                });
                continue;
            }
            let shared = &peers[&h].encryption_secret;
            let mut plaintext = Zeroizing::new([0u8; 64]);
            plaintext[..32].copy_from_slice(mask_shares[i].as_bytes());
            plaintext[32..].copy_from_slice(seed_shares[i].as_bytes());
            shares.push(SealedShare {
                to: h,
                ciphertext: crypto::seal_share(&self.config.session, shared, id, h, &plaintext),
            });
        }
        let own = own.ok_or_else(|| SecAggError::Internal("own share missing".into()))?;
        let msg = ShareKeys { from: id, shares };
        Ok((msg, State::SharedKeys { peers, seed, own }))
    }

    /// Round 2: decrypts the shares that neighbours sent, and returns
    /// `input + PRG(b) + Σ ±PRG(s_uv) mod 2^bits` over the neighbours whose
    /// shares arrived. Every element of `input` must be below `2^bits`.
    pub fn masked_input(
        &mut self,
        forwarded: &ForwardedShares,
        input: &[u64],
    ) -> Result<MaskedInput> {
        self.advance(Round::MaskedInput, |me, state| match state {
            State::SharedKeys { peers, seed, own } => {
                me.do_masked_input(forwarded, input, peers, seed, own)
            }
            _ => Err(SecAggError::Internal("state/round mismatch".into())),
        })
    }

    fn do_masked_input(
        &self,
        forwarded: &ForwardedShares,
        input: &[u64],
        peers: BTreeMap<u32, Peer>,
        seed: Zeroizing<Scalar>,
        own: Held,
    ) -> Result<(MaskedInput, State)> {
        let id = self.id;
        let config = &self.config;
        if input.len() != config.vector_len {
            return Err(SecAggError::InvalidParameter(format!(
                "node {id}: the input has {} elements but the session expects vector_len = {}",
                input.len(),
                config.vector_len
            )));
        }
        let modulus_mask = config.modulus_mask();
        if let Some((i, v)) = input
            .iter()
            .enumerate()
            .find(|(_, v)| **v & !modulus_mask != 0)
        {
            return Err(SecAggError::InvalidParameter(format!(
                "node {id}: input element {i} is {v}, outside [0, 2^{}): reduce inputs modulo 2^bits \
                 (the encoding does) or raise bits",
                config.bits
            )));
        }
        let mut held = BTreeMap::new();
        for delivered in &forwarded.shares {
            let v = delivered.from;
            let Some(peer) = peers.get(&v) else {
                return Err(SecAggError::Protocol(format!(
                    "node {id}: got a share from node {v}, which is not a neighbour that advertised keys"
                )));
            };
            if held.contains_key(&v) {
                return Err(SecAggError::Protocol(format!(
                    "node {id}: got two shares from node {v}"
                )));
            }
            let plain = Zeroizing::new(
                crypto::open_share(
                    &config.session,
                    &peer.encryption_secret,
                    v,
                    id,
                    &delivered.ciphertext,
                )
                .ok_or(SecAggError::Decryption {
                    recipient: id,
                    sender: v,
                })?,
            );
            let scalar = |bytes: &[u8]| -> Result<Zeroizing<Scalar>> {
                let arr: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| SecAggError::Internal("share length".into()))?;
                Option::<Scalar>::from(Scalar::from_canonical_bytes(arr))
                    .map(Zeroizing::new)
                    .ok_or_else(|| {
                        SecAggError::Protocol(format!(
                            "node {id}: the share from node {v} is not a canonical field element"
                        ))
                    })
            };
            held.insert(
                v,
                Held {
                    mask_key: scalar(&plain[..32])?,
                    self_mask: scalar(&plain[32..])?,
                },
            );
        }
        if held.len() + 1 < config.threshold {
            return Err(SecAggError::TooFewSurvivors {
                round: Round::MaskedInput,
                have: held.len() + 1,
                need: config.threshold,
                detail: format!("node {id} and its neighbours whose shares reached it"),
            });
        }
        let mut masks = Vec::with_capacity(held.len() + 1);
        masks.push(Mask {
            key: crypto::self_mask_key(&config.session, &seed, id),
            sign: Sign::Add,
        });
        for &v in held.keys() {
            let shared = Zeroizing::new(
                crypto::agree(&self.mask_sk, &peers[&v].mask_key)
                    .ok_or_else(|| small_order(id, v, "mask"))?,
            );
            masks.push(Mask {
                key: crypto::pair_mask_key(&config.session, &shared, id, v),
                sign: if id < v { Sign::Add } else { Sign::Sub },
            });
        }
        let data = if config.bits <= 32 {
            mask_and_pack::<u32>(input, &masks, config)
        } else {
            mask_and_pack::<u64>(input, &masks, config)
        };
        for m in &mut masks {
            zeroize::Zeroize::zeroize(&mut m.key);
        }
        held.insert(id, own);
        Ok((MaskedInput { from: id, data }, State::Masked { held }))
    }

    /// Round 3: checks the survivor set and signs it.
    pub fn consistency(&mut self, set: &SurvivorSet) -> Result<ConsistencySignature> {
        self.advance(Round::Consistency, |me, state| match state {
            State::Masked { held } => me.do_consistency(set, held),
            _ => Err(SecAggError::Internal("state/round mismatch".into())),
        })
    }

    fn do_consistency(
        &self,
        set: &SurvivorSet,
        held: BTreeMap<u32, Held>,
    ) -> Result<(ConsistencySignature, State)> {
        let id = self.id;
        let survivors = &set.survivors;
        if survivors.windows(2).any(|w| w[0] >= w[1])
            || survivors
                .last()
                .is_some_and(|&v| v as usize >= self.config.n)
        {
            return Err(SecAggError::Protocol(format!(
                "node {id}: the survivor set must list distinct node ids in increasing order"
            )));
        }
        if survivors.binary_search(&id).is_err() {
            return Err(SecAggError::Inconsistent {
                node: id,
                detail: "the survivor set leaves out this node, which sent its masked input".into(),
            });
        }
        if survivors.len() < self.config.min_survivors {
            return Err(SecAggError::TooFewSurvivors {
                round: Round::Consistency,
                have: survivors.len(),
                need: self.config.min_survivors,
                detail: "nodes whose masked inputs arrived".into(),
            });
        }
        // Every surviving neighbour must be a mask partner. Then, since this
        // node's self mask can only be rebuilt from t >= 2 shares, at least
        // one share comes from a surviving neighbour, whose pairwise mask with
        // this node stays secret: the unmasked sum never exposes this input
        // alone. (A coordinator that withheld survivors' shares from this
        // node would otherwise drop every mask partner and unmask it. A node
        // that never reaches this round relies on the threshold instead:
        // t >= 2/3 of the holders against an actively malicious coordinator.)
        if let Some(v) = survivors
            .iter()
            .find(|&&v| self.topology.are_neighbours(id, v) && !held.contains_key(&v))
        {
            return Err(SecAggError::Inconsistent {
                node: id,
                detail: format!(
                    "node {v} is listed as a survivor but its shares never reached this node"
                ),
            });
        }
        let transcript = crypto::survivors_transcript(&self.config.session, survivors);
        let signature = self.identity.sign(&transcript).to_bytes();
        Ok((
            ConsistencySignature {
                from: id,
                signature,
            },
            State::Signed {
                held,
                survivors: survivors.clone(),
            },
        ))
    }

    /// Round 4: checks that enough survivors signed the same survivor set,
    /// then reveals, per peer, the self-mask share (survivors) or the
    /// mask-key share (nodes listed as dropped), never both.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskShares> {
        self.advance(Round::Unmask, |me, state| match state {
            State::Signed { held, survivors } => me.do_unmask(request, held, survivors),
            _ => Err(SecAggError::Internal("state/round mismatch".into())),
        })
    }

    fn do_unmask(
        &self,
        request: &UnmaskRequest,
        held: BTreeMap<u32, Held>,
        survivors: Vec<u32>,
    ) -> Result<(UnmaskShares, State)> {
        let id = self.id;
        let transcript = crypto::survivors_transcript(&self.config.session, &survivors);
        let mut signers = BTreeSet::new();
        for sig in &request.signatures {
            let v = sig.from;
            if survivors.binary_search(&v).is_err() {
                return Err(SecAggError::Inconsistent {
                    node: id,
                    detail: format!("node {v} signed but is not in the survivor set"),
                });
            }
            if !signers.insert(v) {
                return Err(SecAggError::Inconsistent {
                    node: id,
                    detail: format!("node {v}'s signature appears twice"),
                });
            }
        }
        let signed: Vec<(u32, &[u8], [u8; 64])> = request
            .signatures
            .iter()
            .map(|s| (s.from, transcript.as_slice(), s.signature))
            .collect();
        if let Some(culprit) = first_invalid_signature(&self.identities, &signed) {
            return Err(SecAggError::Inconsistent {
                node: id,
                detail: format!(
                    "node {culprit}'s signature on the survivor set is invalid (forged, or over a different \
                     survivor set: the coordinator may be showing different sets to different nodes)"
                ),
            });
        }
        if signers.len() < self.config.min_survivors {
            return Err(SecAggError::Inconsistent {
                node: id,
                detail: format!(
                    "only {} survivors signed the survivor set; at least min_survivors = {} must",
                    signers.len(),
                    self.config.min_survivors
                ),
            });
        }
        // Check the whole request before revealing anything.
        if let Some(&peer) = request
            .dropped
            .iter()
            .find(|v| survivors.binary_search(v).is_ok())
        {
            return Err(SecAggError::BothSharesRequested { node: id, peer });
        }
        let dropped: BTreeSet<u32> = request.dropped.iter().copied().collect();
        let mut self_mask_shares = Vec::new();
        let mut mask_key_shares = Vec::new();
        for (&v, shares) in &held {
            if survivors.binary_search(&v).is_ok() {
                self_mask_shares.push(RevealedShare {
                    of: v,
                    share: shares.self_mask.to_bytes(),
                });
            } else if dropped.contains(&v) {
                mask_key_shares.push(RevealedShare {
                    of: v,
                    share: shares.mask_key.to_bytes(),
                });
            }
        }
        Ok((
            UnmaskShares {
                from: id,
                self_mask_shares,
                mask_key_shares,
            },
            State::Done,
        ))
    }
}

/// Verifies `(signer, message, signature)` triples under the roster's keys
/// in one batch (several times faster than one by one); if the batch fails,
/// returns the first signer whose signature fails strict verification.
fn first_invalid_signature(
    identities: &[VerifyingKey],
    signed: &[(u32, &[u8], [u8; 64])],
) -> Option<u32> {
    if signed.is_empty() {
        return None;
    }
    let messages: Vec<&[u8]> = signed.iter().map(|s| s.1).collect();
    let signatures: Vec<Signature> = signed.iter().map(|s| Signature::from_bytes(&s.2)).collect();
    let keys: Vec<VerifyingKey> = signed.iter().map(|s| identities[s.0 as usize]).collect();
    if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
        return None;
    }
    signed
        .iter()
        .zip(&signatures)
        .find(|((signer, message, _), signature)| {
            identities[*signer as usize]
                .verify_strict(message, signature)
                .is_err()
        })
        .map(|((signer, ..), _)| *signer)
}

fn round_of(state: &State) -> Round {
    match state {
        State::Advertised => Round::ShareKeys,
        State::SharedKeys { .. } => Round::MaskedInput,
        State::Masked { .. } => Round::Consistency,
        State::Signed { .. } => Round::Unmask,
        State::Done | State::Aborted(_) => Round::Finished,
    }
}

fn small_order(node: u32, peer: u32, which: &str) -> SecAggError {
    SecAggError::Protocol(format!(
        "node {node}: node {peer}'s {which} key is of small order (no shared secret)"
    ))
}

/// Checks that the roster has one key per node.
pub(crate) fn check_roster(
    config: &Config,
    identities: &[VerifyingKey],
    topology: &Topology,
) -> Result<()> {
    if identities.len() != config.n {
        return Err(SecAggError::InvalidParameter(format!(
            "the roster has {} identity keys for n = {} nodes",
            identities.len(),
            config.n
        )));
    }
    if topology.len() != config.n {
        return Err(SecAggError::InvalidParameter(format!(
            "the topology has {} nodes for n = {}",
            topology.len(),
            config.n
        )));
    }
    Ok(())
}

/// Verifies a node's signature on its advertised keys.
pub(crate) fn verify_advertisement(
    config: &Config,
    identities: &[VerifyingKey],
    msg: &AdvertiseKeys,
) -> Result<()> {
    let Some(key) = identities.get(msg.from as usize) else {
        return Err(SecAggError::Protocol(format!(
            "advertised keys come from node {}, outside 0..{}",
            msg.from, config.n
        )));
    };
    let transcript = crypto::advertise_transcript(
        &config.session,
        msg.from,
        &msg.encryption_key,
        &msg.mask_key,
    );
    key.verify_strict(&transcript, &Signature::from_bytes(&msg.signature))
        .map_err(|_| SecAggError::BadSignature {
            signer: msg.from,
            what: "advertised keys",
        })?;
    if msg.encryption_key == msg.mask_key {
        return Err(SecAggError::Protocol(format!(
            "node {} advertised the same key for encryption and masks",
            msg.from
        )));
    }
    Ok(())
}

/// Adds the masks to the input in `W` arithmetic and packs `ceil(bits/8)`
/// little-endian bytes per element.
fn mask_and_pack<W: Word>(input: &[u64], masks: &[Mask], config: &Config) -> Vec<u8> {
    let mut acc: Vec<W> = input.iter().map(|&v| W::from_u64(v)).collect();
    crypto::apply_masks(&mut acc, 0, masks);
    pack(&acc, config)
}

/// Packs elements reduced mod 2^bits, `ceil(bits/8)` bytes each.
pub(crate) fn pack<W: Word>(acc: &[W], config: &Config) -> Vec<u8> {
    let width = config.element_bytes();
    let mask = config.modulus_mask();
    let mut out = Vec::with_capacity(acc.len() * width);
    for &w in acc {
        out.extend_from_slice(&(w.to_u64() & mask).to_le_bytes()[..width]);
    }
    out
}
