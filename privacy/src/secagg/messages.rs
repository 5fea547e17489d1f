//! The messages of each round: plain serde types, so that any transport
//! (one Arrow Flight action per round, say) can ship them. Keys, signatures
//! and vectors are raw bytes; [`WireSize::byte_len`] is the size of a
//! compact binary encoding (u32 ids and lengths, raw bytes), which is what
//! the communication benchmark counts.

use serde::{Deserialize, Serialize};

/// Size of a message in a compact binary encoding: 4 bytes per id and per
/// length prefix, keys, signatures, shares and ciphertexts as raw bytes.
/// A serde format adds its own framing on top.
pub trait WireSize {
    /// Encoded size in bytes.
    fn byte_len(&self) -> usize;
}

const ID: usize = 4;
const LEN: usize = 4;
const KEY: usize = 32;
const SIG: usize = 64;

/// Round 0, node → coordinator: the node's two X25519 public keys, signed
/// with its long-term Ed25519 identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    /// The sender.
    pub from: u32,
    /// X25519 public key for encrypting shares (c).
    pub encryption_key: [u8; 32],
    /// X25519 public key for pairwise masks (s).
    pub mask_key: [u8; 32],
    /// Ed25519 signature over session, id and both keys.
    #[serde(with = "byte_array")]
    pub signature: [u8; 64],
}

impl WireSize for AdvertiseKeys {
    fn byte_len(&self) -> usize {
        ID + 2 * KEY + SIG
    }
}

/// Round 0, coordinator → node: the advertised keys of the node's neighbours
/// (those that advertised).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyDirectory {
    /// One entry per neighbour that advertised, in id order.
    pub keys: Vec<AdvertiseKeys>,
}

impl WireSize for KeyDirectory {
    fn byte_len(&self) -> usize {
        LEN + self.keys.iter().map(WireSize::byte_len).sum::<usize>()
    }
}

/// One encrypted share pair (mask-key share, self-mask share) on its way to
/// `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedShare {
    /// The recipient.
    pub to: u32,
    /// ChaCha20-Poly1305 ciphertext (80 bytes).
    pub ciphertext: Vec<u8>,
}

/// Round 1, node → coordinator: one sealed share per neighbour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareKeys {
    /// The sender.
    pub from: u32,
    /// Shares, one per neighbour in the key directory.
    pub shares: Vec<SealedShare>,
}

impl WireSize for ShareKeys {
    fn byte_len(&self) -> usize {
        ID + LEN
            + self
                .shares
                .iter()
                .map(|s| ID + LEN + s.ciphertext.len())
                .sum::<usize>()
    }
}

/// A sealed share as delivered, labelled with its sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveredShare {
    /// The sender.
    pub from: u32,
    /// ChaCha20-Poly1305 ciphertext (80 bytes).
    pub ciphertext: Vec<u8>,
}

/// Round 1, coordinator → node: the shares addressed to the node by
/// neighbours that completed round 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwardedShares {
    /// Shares in sender order.
    pub shares: Vec<DeliveredShare>,
}

impl WireSize for ForwardedShares {
    fn byte_len(&self) -> usize {
        LEN + self
            .shares
            .iter()
            .map(|s| ID + LEN + s.ciphertext.len())
            .sum::<usize>()
    }
}

/// Round 2, node → coordinator: the masked input, `ceil(bits / 8)`
/// little-endian bytes per element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskedInput {
    /// The sender.
    pub from: u32,
    /// Packed elements (base64 in JSON, so a vector of n elements of b
    /// bytes costs about 4nb/3 characters, not the 3.5nb of a number list).
    #[serde(with = "packed")]
    pub data: Vec<u8>,
}

impl WireSize for MaskedInput {
    fn byte_len(&self) -> usize {
        ID + LEN + self.data.len()
    }
}

/// Round 2, coordinator → all: the nodes whose masked inputs arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurvivorSet {
    /// Ids in increasing order.
    pub survivors: Vec<u32>,
}

impl WireSize for SurvivorSet {
    fn byte_len(&self) -> usize {
        LEN + ID * self.survivors.len()
    }
}

/// Round 3, node → coordinator: the node's signature on the survivor set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsistencySignature {
    /// The signer.
    pub from: u32,
    /// Ed25519 signature over session and survivor set.
    #[serde(with = "byte_array")]
    pub signature: [u8; 64],
}

impl WireSize for ConsistencySignature {
    fn byte_len(&self) -> usize {
        ID + SIG
    }
}

/// Round 3, coordinator → all: the survivors' signatures, and the dropped
/// nodes whose mask keys must be rebuilt. Self-mask shares are revealed for
/// the signed survivor set; a node never reveals both for one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskRequest {
    /// Signatures on the survivor set, one per signer.
    pub signatures: Vec<ConsistencySignature>,
    /// Nodes that shared keys but sent no masked input.
    pub dropped: Vec<u32>,
}

impl WireSize for UnmaskRequest {
    fn byte_len(&self) -> usize {
        2 * LEN + (ID + SIG) * self.signatures.len() + ID * self.dropped.len()
    }
}

/// One revealed share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevealedShare {
    /// Whose secret this is a share of.
    pub of: u32,
    /// The share: a canonical little-endian scalar.
    pub share: [u8; 32],
}

/// Round 4, node → coordinator: shares of survivors' self-mask seeds and of
/// dropped nodes' mask keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskShares {
    /// The sender.
    pub from: u32,
    /// Shares of self-mask seeds b (for survivors).
    pub self_mask_shares: Vec<RevealedShare>,
    /// Shares of mask keys s (for dropped nodes).
    pub mask_key_shares: Vec<RevealedShare>,
}

impl WireSize for UnmaskShares {
    fn byte_len(&self) -> usize {
        ID + 2 * LEN + (ID + KEY) * (self.self_mask_shares.len() + self.mask_key_shares.len())
    }
}

/// serde for long byte vectors: base64 text in human-readable formats
/// (JSON), raw bytes in binary ones.
mod packed {
    use base64::Engine as _;
    use serde::de::Error;
    use serde::{Deserialize, Deserializer, Serializer};

    const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&B64.encode(bytes))
        } else {
            serializer.serialize_bytes(bytes)
        }
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            B64.decode(text.as_bytes())
                .map_err(|e| D::Error::custom(format!("packed elements are not base64: {e}")))
        } else {
            Vec::<u8>::deserialize(deserializer)
        }
    }
}

/// serde for byte arrays longer than serde's built-in 32: written as bytes,
/// read from bytes or from a sequence (so JSON and binary formats both work).
mod byte_array {
    use serde::de::{Error, SeqAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use std::fmt;

    pub(super) fn serialize<S: Serializer, const N: usize>(
        bytes: &[u8; N],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, const N: usize>(
        deserializer: D,
    ) -> Result<[u8; N], D::Error> {
        struct ArrayVisitor<const N: usize>;
        impl<'de, const N: usize> Visitor<'de> for ArrayVisitor<N> {
            type Value = [u8; N];
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{N} bytes")
            }
            fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Self::Value, E> {
                v.try_into().map_err(|_| E::invalid_length(v.len(), &self))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = [0u8; N];
                for (i, b) in out.iter_mut().enumerate() {
                    *b = seq
                        .next_element()?
                        .ok_or_else(|| A::Error::invalid_length(i, &self))?;
                }
                if seq.next_element::<u8>()?.is_some() {
                    return Err(A::Error::invalid_length(N + 1, &self));
                }
                Ok(out)
            }
        }
        deserializer.deserialize_bytes(ArrayVisitor::<N>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_survive_json() {
        let msg = ConsistencySignature {
            from: 3,
            signature: [7; 64],
        };
        let json = serde_json::to_string(&msg).expect("encode");
        let back: ConsistencySignature = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, msg);
        assert_eq!(msg.byte_len(), 68);
        let short = json.replace("7,7,", "");
        assert!(serde_json::from_str::<ConsistencySignature>(&short).is_err());
    }

    #[test]
    fn masked_inputs_travel_as_base64_in_json() {
        let msg = MaskedInput {
            from: 1,
            data: (0..=255).collect(),
        };
        let json = serde_json::to_string(&msg).expect("encode");
        assert!(json.len() < 400, "{} characters", json.len());
        let back: MaskedInput = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, msg);
        let bad = json.replace("AAEC", "!!!!");
        assert!(serde_json::from_str::<MaskedInput>(&bad).is_err());
    }
}
