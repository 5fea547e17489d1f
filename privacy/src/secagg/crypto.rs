//! Cryptographic building blocks: key derivation, key agreement,
//! authenticated encryption of shares, transcripts to sign, and the
//! ChaCha20 mask generator.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit, StreamCipher, StreamCipherSeek};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{ChaCha20Poly1305, KeyInit};
use curve25519_dalek::{MontgomeryPoint, Scalar};
use hkdf::Hkdf;
use rand_core::CryptoRng;
use sha2::Sha256;

/// Labels that separate every use of a key or a signature.
pub(crate) mod label {
    pub(crate) const ADVERTISE: &[u8] = b"confer-secagg/v1/advertise";
    pub(crate) const SHARE_KEY: &[u8] = b"confer-secagg/v1/share-key";
    pub(crate) const SHARE_AD: &[u8] = b"confer-secagg/v1/share";
    pub(crate) const PAIR_MASK: &[u8] = b"confer-secagg/v1/pair-mask";
    pub(crate) const SELF_MASK: &[u8] = b"confer-secagg/v1/self-mask";
    pub(crate) const SURVIVORS: &[u8] = b"confer-secagg/v1/survivors";
}

/// HKDF-SHA256 with the session as salt and the concatenated `info` parts,
/// expanded to a full 256-bit key.
pub(crate) fn hkdf32(salt: &[u8; 32], ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(salt), ikm)
        .expand_multi_info(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// A uniform integer in `0..n` (`n > 0`), by rejection: no modulo bias.
pub(crate) fn uniform_below<R: CryptoRng + ?Sized>(rng: &mut R, n: u64) -> u64 {
    debug_assert!(n > 0);
    // Largest multiple of n that fits, as a rejection zone.
    let zone = u64::MAX - (u64::MAX - n + 1) % n;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % n;
        }
    }
}

/// The X25519 public key of a secret scalar: `X25519_BASEPOINT * sk`.
pub(crate) fn public_key(sk: &Scalar) -> [u8; 32] {
    MontgomeryPoint::mul_base(sk).to_bytes()
}

/// The X25519 shared secret `pk * sk`, refusing the all-zero output that a
/// small-order public key forces (a contributory check).
pub(crate) fn agree(sk: &Scalar, pk: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = (MontgomeryPoint(*pk) * sk).to_bytes();
    if shared == [0u8; 32] {
        None
    } else {
        Some(shared)
    }
}

/// The transcript a node signs when advertising its keys.
pub(crate) fn advertise_transcript(
    session: &[u8; 32],
    id: u32,
    encryption_key: &[u8; 32],
    mask_key: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(label::ADVERTISE.len() + 100);
    m.extend_from_slice(label::ADVERTISE);
    m.extend_from_slice(session);
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(encryption_key);
    m.extend_from_slice(mask_key);
    m
}

/// The transcript a survivor signs in the consistency round.
pub(crate) fn survivors_transcript(session: &[u8; 32], survivors: &[u32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(label::SURVIVORS.len() + 36 + 4 * survivors.len());
    m.extend_from_slice(label::SURVIVORS);
    m.extend_from_slice(session);
    m.extend_from_slice(&(survivors.len() as u32).to_le_bytes());
    for id in survivors {
        m.extend_from_slice(&id.to_le_bytes());
    }
    m
}

/// Bytes of one encrypted share: two 32-byte field elements and a 16-byte tag.
pub(crate) const SHARE_CIPHERTEXT_LEN: usize = 64 + 16;

/// The key and associated data for the share `sender` sends `recipient`.
/// The key is per direction, so each key encrypts exactly one message and a
/// zero nonce is safe.
fn share_key_and_ad(
    session: &[u8; 32],
    shared: &[u8; 32],
    sender: u32,
    recipient: u32,
) -> ([u8; 32], Vec<u8>) {
    let (s, r) = (sender.to_le_bytes(), recipient.to_le_bytes());
    let key = hkdf32(session, shared, &[label::SHARE_KEY, &s, &r]);
    let mut ad = Vec::with_capacity(label::SHARE_AD.len() + 40);
    ad.extend_from_slice(label::SHARE_AD);
    ad.extend_from_slice(session);
    ad.extend_from_slice(&s);
    ad.extend_from_slice(&r);
    (key, ad)
}

/// Encrypts the pair (mask-key share, self-mask share) for `recipient`.
pub(crate) fn seal_share(
    session: &[u8; 32],
    shared: &[u8; 32],
    sender: u32,
    recipient: u32,
    plaintext: &[u8; 64],
) -> Vec<u8> {
    let (key, ad) = share_key_and_ad(session, shared, sender, recipient);
    ChaCha20Poly1305::new(&key.into())
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: plaintext,
                aad: &ad,
            },
        )
        .expect("a 64-byte plaintext is within ChaCha20-Poly1305's limits")
}

/// Decrypts a share sent by `sender` to `recipient`; `None` if it fails
/// authentication.
pub(crate) fn open_share(
    session: &[u8; 32],
    shared: &[u8; 32],
    sender: u32,
    recipient: u32,
    ciphertext: &[u8],
) -> Option<[u8; 64]> {
    if ciphertext.len() != SHARE_CIPHERTEXT_LEN {
        return None;
    }
    let (key, ad) = share_key_and_ad(session, shared, sender, recipient);
    let plain = ChaCha20Poly1305::new(&key.into())
        .decrypt(
            &[0u8; 12].into(),
            Payload {
                msg: ciphertext,
                aad: &ad,
            },
        )
        .ok()?;
    plain.try_into().ok()
}

/// The PRG key of the mask between `u` and `v` (same at both ends).
pub(crate) fn pair_mask_key(session: &[u8; 32], shared: &[u8; 32], u: u32, v: u32) -> [u8; 32] {
    let (lo, hi) = (u.min(v).to_le_bytes(), u.max(v).to_le_bytes());
    hkdf32(session, shared, &[label::PAIR_MASK, &lo, &hi])
}

/// The PRG key of node `u`'s self mask, from its seed b.
pub(crate) fn self_mask_key(session: &[u8; 32], seed: &Scalar, u: u32) -> [u8; 32] {
    hkdf32(
        session,
        seed.as_bytes(),
        &[label::SELF_MASK, &u.to_le_bytes()],
    )
}

/// An element type of the accumulator: `u32` when bits <= 32, else `u64`.
/// Arithmetic is wrapping, i.e. mod 2^32 or 2^64, and reduced to 2^bits at
/// the end (reduction mod 2^bits is a ring homomorphism).
pub(crate) trait Word: Copy + Default + Send + Sync + 'static {
    const BYTES: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn add(self, other: Self) -> Self;
    fn sub(self, other: Self) -> Self;
    fn to_u64(self) -> u64;
    fn from_u64(v: u64) -> Self;
}

impl Word for u32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn from_le(bytes: &[u8]) -> Self {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.wrapping_sub(other)
    }
    fn to_u64(self) -> u64 {
        u64::from(self)
    }
    fn from_u64(v: u64) -> Self {
        v as u32
    }
}

impl Word for u64 {
    const BYTES: usize = 8;
    #[inline(always)]
    fn from_le(bytes: &[u8]) -> Self {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[..8]);
        u64::from_le_bytes(b)
    }
    #[inline(always)]
    fn add(self, other: Self) -> Self {
        self.wrapping_add(other)
    }
    #[inline(always)]
    fn sub(self, other: Self) -> Self {
        self.wrapping_sub(other)
    }
    fn to_u64(self) -> u64 {
        self
    }
    fn from_u64(v: u64) -> Self {
        v
    }
}

/// Whether a mask is added or subtracted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sign {
    Add,
    Sub,
}

/// A mask to expand: a 256-bit ChaCha20 key (zero nonce) and its sign.
pub(crate) struct Mask {
    pub(crate) key: [u8; 32],
    pub(crate) sign: Sign,
}

/// Elements per keystream chunk: 16 KiB of u32, small enough that the
/// accumulator chunk and the keystream buffer stay in L1/L2 while every
/// mask passes over them.
const CHUNK_ELEMS: usize = 4096;

/// Adds each mask's keystream, read as little-endian words, to `acc`, where
/// `acc[0]` is element `first` of the whole vector (so that threads can
/// split a vector and each seek to its part).
pub(crate) fn apply_masks<W: Word>(acc: &mut [W], first: usize, masks: &[Mask]) {
    if masks.is_empty() || acc.is_empty() {
        return;
    }
    let mut ciphers: Vec<(ChaCha20, Sign)> = masks
        .iter()
        .map(|m| {
            let mut c = ChaCha20::new(&m.key.into(), &[0u8; 12].into());
            c.seek((first * W::BYTES) as u64);
            (c, m.sign)
        })
        .collect();
    let mut buf = vec![0u8; CHUNK_ELEMS * W::BYTES];
    for chunk in acc.chunks_mut(CHUNK_ELEMS) {
        let bytes = &mut buf[..chunk.len() * W::BYTES];
        for (cipher, sign) in ciphers.iter_mut() {
            cipher.write_keystream(bytes);
            let words = bytes.chunks_exact(W::BYTES);
            match sign {
                Sign::Add => chunk
                    .iter_mut()
                    .zip(words)
                    .for_each(|(a, w)| *a = a.add(W::from_le(w))),
                Sign::Sub => chunk
                    .iter_mut()
                    .zip(words)
                    .for_each(|(a, w)| *a = a.sub(W::from_le(w))),
            }
        }
    }
}

/// [`apply_masks`] split over `threads` threads by element range.
pub(crate) fn apply_masks_parallel<W: Word>(acc: &mut [W], masks: &[Mask], threads: usize) {
    let threads = threads.max(1);
    if threads == 1 || acc.len() < 2 * CHUNK_ELEMS {
        apply_masks(acc, 0, masks);
        return;
    }
    let per = acc.len().div_ceil(threads).next_multiple_of(16);
    std::thread::scope(|scope| {
        for (i, part) in acc.chunks_mut(per).enumerate() {
            scope.spawn(move || apply_masks(part, i * per, masks));
        }
    });
}

/// Writes `len` bytes of the ChaCha20 keystream of `key` (used for public
/// randomness such as rotation signs, and by the benchmark).
pub(crate) fn keystream(key: &[u8; 32], out: &mut [u8]) {
    let mut c = ChaCha20::new(&(*key).into(), &[0u8; 12].into());
    c.write_keystream(out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use chacha20::ChaCha20Rng;
    use rand_core::SeedableRng;

    #[test]
    fn agreement_is_symmetric_and_shares_round_trip() {
        let mut rng = ChaCha20Rng::from_seed([1; 32]);
        let (a, b) = (Scalar::random(&mut rng), Scalar::random(&mut rng));
        let (pa, pb) = (public_key(&a), public_key(&b));
        let (sab, sba) = (agree(&a, &pb).expect("dh"), agree(&b, &pa).expect("dh"));
        assert_eq!(sab, sba);
        assert!(agree(&a, &[0u8; 32]).is_none());
        let session = [9; 32];
        let ct = seal_share(&session, &sab, 1, 2, &[5; 64]);
        assert_eq!(ct.len(), SHARE_CIPHERTEXT_LEN);
        assert_eq!(open_share(&session, &sba, 1, 2, &ct), Some([5; 64]));
        // Wrong direction, wrong session, tampered byte: all refused.
        assert_eq!(open_share(&session, &sba, 2, 1, &ct), None);
        assert_eq!(open_share(&[8; 32], &sba, 1, 2, &ct), None);
        let mut bad = ct.clone();
        bad[3] ^= 1;
        assert_eq!(open_share(&session, &sba, 1, 2, &bad), None);
    }

    #[test]
    fn masks_cancel_and_split_consistently() {
        let len = 3 * CHUNK_ELEMS + 123;
        let key = [7u8; 32];
        let mut whole = vec![0u32; len];
        apply_masks(
            &mut whole,
            0,
            &[Mask {
                key,
                sign: Sign::Add,
            }],
        );
        let mut split = vec![0u32; len];
        apply_masks_parallel(
            &mut split,
            &[Mask {
                key,
                sign: Sign::Add,
            }],
            3,
        );
        assert_eq!(whole, split);
        apply_masks(
            &mut whole,
            0,
            &[Mask {
                key,
                sign: Sign::Sub,
            }],
        );
        assert!(whole.iter().all(|&w| w == 0));
        let mut w64 = vec![0u64; 100];
        apply_masks(
            &mut w64,
            0,
            &[Mask {
                key,
                sign: Sign::Add,
            }],
        );
        let mut bytes = vec![0u8; 800];
        keystream(&key, &mut bytes);
        assert_eq!(
            w64[1],
            u64::from_le_bytes(bytes[8..16].try_into().expect("8"))
        );
    }

    #[test]
    fn uniform_below_covers_range() {
        let mut rng = ChaCha20Rng::from_seed([2; 32]);
        let mut seen = [false; 7];
        for _ in 0..200 {
            seen[uniform_below(&mut rng, 7) as usize] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(uniform_below(&mut rng, 1), 0);
    }
}
