//! Binding a node's secure-aggregation identity key to its certificate.
//!
//! In secure aggregation a node sums with peers the coordinator names. A
//! dishonest coordinator could name peers it controls, with keys it made,
//! and learn a node's input with too little noise. So each node proves its
//! identity key with the certificate the network CA issued it: it signs
//! `confer secure-aggregation identity`, its site name and the key with its
//! TLS private key, and sends the signature with its certificate. A peer
//! accepts the key only if the certificate chains to the network CA, is a
//! node certificate for that site name, and the signature verifies.

use std::path::Path;

pub use confer_protocol::task::IdentityProof as IdentityBinding;
use rustls::SignatureScheme;
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::pki::{self, CertKind};
use crate::tls::TlsFiles;
use crate::{Result, TransportError};

/// What a binding signs.
pub fn binding_message(site: &str, identity_hex: &str) -> Vec<u8> {
    format!("confer secure-aggregation identity\nsite {site}\nkey {identity_hex}\n").into_bytes()
}

fn bad(msg: impl Into<String>) -> TransportError {
    TransportError::Certificate(msg.into())
}

/// Signs `identity_hex` as `site`'s key with the TLS key of `files`.
pub fn bind(files: &TlsFiles, site: &str, identity_hex: &str) -> Result<IdentityBinding> {
    let cert_pem = std::fs::read_to_string(&files.cert)
        .map_err(|e| TransportError::Files(format!("tls.cert = {}: {e}", files.cert.display())))?;
    let key_pem = std::fs::read(&files.key)
        .map_err(|e| TransportError::Files(format!("tls.key = {}: {e}", files.key.display())))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| TransportError::Files(format!("tls.key = {}: {e}", files.key.display())))?
        .ok_or_else(|| {
            TransportError::Files(format!(
                "tls.key = {}: holds no private key",
                files.key.display()
            ))
        })?;
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(&key).map_err(|e| {
        bad(format!(
            "tls.key = {}: not an ECDSA key ({e}); issue node keys with `confer pki`",
            files.key.display()
        ))
    })?;
    let signer = signing
        .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| bad("the node's TLS key is not ECDSA P-256"))?;
    let signature = signer
        .sign(&binding_message(site, identity_hex))
        .map_err(|e| bad(format!("signing the identity key failed: {e}")))?;
    Ok(IdentityBinding {
        cert_pem,
        signature: hex_encode(&signature),
    })
}

/// Checks that `binding` proves `identity_hex` to be the key of the node
/// `site`, under the network CA in `ca_pem_path`.
pub fn verify(
    ca_pem_path: &Path,
    site: &str,
    identity_hex: &str,
    binding: &IdentityBinding,
) -> Result<()> {
    let ca_pem = std::fs::read(ca_pem_path)
        .map_err(|e| TransportError::Files(format!("tls.ca = {}: {e}", ca_pem_path.display())))?;
    let anchors: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut ca_pem.as_slice())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| TransportError::Files(format!("tls.ca: {e}")))?;
    let anchors: Vec<_> = anchors
        .iter()
        .filter_map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .ok()
                .map(|a| a.to_owned())
        })
        .collect();
    if anchors.is_empty() {
        return Err(bad("tls.ca holds no usable CA certificate"));
    }
    let der: CertificateDer<'static> = rustls_pemfile::certs(&mut binding.cert_pem.as_bytes())
        .next()
        .ok_or_else(|| bad(format!("{site} sent no certificate with its identity key")))?
        .map_err(|e| bad(format!("{site}'s certificate is not PEM: {e}")))?;
    let ee = webpki::EndEntityCert::try_from(&der)
        .map_err(|e| bad(format!("{site}'s certificate cannot be read: {e}")))?;
    let provider = rustls::crypto::ring::default_provider();
    let algs = provider.signature_verification_algorithms;
    ee.verify_for_usage(
        algs.all,
        &anchors,
        &[],
        UnixTime::now(),
        webpki::KeyUsage::server_auth(),
        None,
        None,
    )
    .map_err(|e| {
        bad(format!(
            "{site}'s certificate is not valid under the network CA: {e}"
        ))
    })?;
    match pki::describe(&der) {
        Some((Some(CertKind::Node), name)) if name == site => {}
        Some((kind, name)) => {
            return Err(bad(format!(
                "the certificate offered for {site} is a {} certificate for {name}",
                kind.map(|k| k.to_string())
                    .unwrap_or_else(|| "non-confer".into())
            )));
        }
        None => return Err(bad(format!("{site}'s certificate cannot be read"))),
    }
    let signature = hex_decode(&binding.signature)
        .ok_or_else(|| bad(format!("{site}'s identity signature is not hex")))?;
    let message = binding_message(site, identity_hex);
    let verified = algs
        .mapping
        .iter()
        .find(|(scheme, _)| *scheme == SignatureScheme::ECDSA_NISTP256_SHA256)
        .map(|(_, verifiers)| {
            verifiers
                .iter()
                .any(|v| ee.verify_signature(*v, &message, &signature).is_ok())
        })
        .unwrap_or(false);
    if !verified {
        return Err(bad(format!(
            "{site}'s identity key is not signed by its certificate: refused"
        )));
    }
    Ok(())
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{IssueRequest, init, issue};
    use crate::tls::ClientCerts;

    fn files(dir: &Path, name: &str) -> TlsFiles {
        let issued = issue(
            dir,
            &IssueRequest {
                kind: CertKind::Node,
                name,
                hosts: &[],
                days: 30,
                replace: false,
            },
        )
        .expect("issue");
        TlsFiles {
            cert: issued.cert,
            key: issued.key,
            ca: dir.join("ca.pem"),
            client_certs: ClientCerts::Required,
        }
    }

    #[test]
    fn a_bound_key_verifies_and_nothing_else_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        init(dir.path(), "net", 30).expect("ca");
        let a = files(dir.path(), "site-a");
        let key = "ab".repeat(32);
        let binding = bind(&a, "site-a", &key).expect("bind");
        verify(&a.ca, "site-a", &key, &binding).expect("verifies");
        // Another key, another site name: refused.
        assert!(verify(&a.ca, "site-a", &"cd".repeat(32), &binding).is_err());
        assert!(verify(&a.ca, "site-b", &key, &binding).is_err());
        // A certificate from another CA: refused.
        let other = tempfile::tempdir().expect("tempdir");
        init(other.path(), "evil", 30).expect("ca");
        let forged = bind(&files(other.path(), "site-a"), "site-a", &key).expect("bind");
        let err = verify(&a.ca, "site-a", &key, &forged).expect_err("other CA");
        assert!(
            err.to_string().contains("not valid under the network CA"),
            "{err}"
        );
    }
}
