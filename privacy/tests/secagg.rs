//! Secure aggregation end to end, in process: exact sums under dropouts in
//! every round, a lying coordinator, tampered messages, and the noise that
//! the distributed discrete Gaussian encoding leaves in decoded sums.

use std::collections::BTreeMap;
use std::sync::Arc;

use confer_privacy::secagg::encoding::{Encoder, EncodingConfig};
use confer_privacy::secagg::simulation::{self, Dropouts, Threads};
use confer_privacy::secagg::{
    ChaCha20Rng, Client, Config, ConsistencySignature, Graph, SecAggError, SeedableRng, Server,
    SigningKey, SurvivorSet, UnmaskRequest, VerifyingKey,
};
use confer_privacy::stats::discrete_gaussian_variance;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Sends a message through JSON, as a transport would.
fn wire<T: Serialize + DeserializeOwned>(msg: T) -> T {
    serde_json::from_str(&serde_json::to_string(&msg).expect("encode")).expect("decode")
}

fn input_for(config: &Config) -> impl Fn(u32) -> Vec<u64> + Sync + use<> {
    let (len, mask) = (config.vector_len, config.bits);
    move |id: u32| {
        (0..len as u64)
            .map(|j| {
                let v = (u64::from(id) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j * 31 + 7);
                if mask == 64 { v } else { v & ((1 << mask) - 1) }
            })
            .collect()
    }
}

/// Runs a simulated session and checks the sum is exact over the nodes
/// whose masked inputs arrived.
fn check_exact(config: &Config, dropouts: &Dropouts, seed: u8) {
    let input = input_for(config);
    let report = simulation::run(config, &input, dropouts, [seed; 32], Threads::all(2))
        .unwrap_or_else(|e| panic!("{dropouts:?}: {e}"));
    let gone: Vec<u32> = [
        &dropouts.advertise,
        &dropouts.share_keys,
        &dropouts.masked_input,
    ]
    .into_iter()
    .flatten()
    .copied()
    .collect();
    let expected: Vec<u32> = (0..config.n as u32).filter(|v| !gone.contains(v)).collect();
    assert_eq!(report.aggregate.contributors, expected);
    assert_eq!(
        report.aggregate.sum,
        simulation::expected_sum(config, &input, &expected),
        "{dropouts:?}"
    );
}

/// `fraction` of the nodes drop before each round in turn.
fn dropout_each_round(config: &Config, fraction: f64, seed: u8) {
    for round in 0..5 {
        let mut fractions = [0.0; 5];
        fractions[round] = fraction;
        let seed = seed + round as u8;
        check_exact(
            config,
            &Dropouts::random(config.n, fractions, [seed; 32]),
            seed,
        );
        if fraction == 0.0 {
            break;
        }
    }
}

// The workspace optimises the curve, cipher and hash crates in debug
// builds too (Cargo.toml, [profile.dev.package]), so `make test` runs the
// full dropout matrix.

#[test]
fn complete_graph_sum_is_exact_under_dropouts() {
    let n = 20;
    let config = Config::new(n, 32, 64, [1; 32]).expect("config");
    assert_eq!(config.graph, Graph::Complete);
    for (fraction, seed) in [(0.0, 10), (0.1, 20), (0.3, 30)] {
        dropout_each_round(&config, fraction, seed);
    }
    // 10% before every round: 20, 18, 16, 14, 13, 12 remain.
    check_exact(&config, &Dropouts::random(n, [0.1; 5], [40; 32]), 40);
}

/// With a sparse graph the threshold is per neighbourhood: 30% random
/// dropouts can leave a neighbourhood below it (a legitimate failure), so
/// those cases use a degree at which 30% of n cannot reach half of it.
#[test]
fn sparse_graph_sum_is_exact_under_dropouts() {
    let config = Config::new(60, 32, 64, [2; 32]).expect("config");
    assert_eq!(config.graph, Graph::Sparse { degree: 24 });
    for (fraction, seed) in [(0.0, 60), (0.1, 70)] {
        dropout_each_round(&config, fraction, seed);
    }
    // 5% before every round (14 nodes gone by the unmask round).
    check_exact(&config, &Dropouts::random(60, [0.05; 5], [80; 32]), 80);
    let wide =
        Config::with_graph(60, Graph::Sparse { degree: 36 }, 32, 64, [3; 32]).expect("config");
    dropout_each_round(&wide, 0.3, 90);
}

#[test]
fn every_element_width_sums_exactly() {
    for bits in [1, 20, 40, 64] {
        let config = Config::new(6, bits, 33, [bits as u8; 32]).expect("config");
        check_exact(
            &config,
            &Dropouts::random(6, [0.0, 0.0, 0.2, 0.0, 0.0], [3; 32]),
            3,
        );
    }
}

#[test]
fn too_many_dropouts_fail_clearly() {
    let config = Config::new(10, 32, 4, [5; 32]).expect("config");
    let input = input_for(&config);
    let dropouts = Dropouts {
        masked_input: vec![0, 1, 2, 3, 4],
        ..Dropouts::none()
    };
    let err = simulation::run(&config, &input, &dropouts, [5; 32], Threads::all(1)).unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert!(
        err.to_string()
            .contains("masked-input round: 5 nodes remain but at least 6 are needed"),
        "{err}"
    );
}

/// A hand-driven session, messages passing through JSON, with hooks for a
/// misbehaving coordinator.
struct Federation {
    clients: BTreeMap<u32, Client>,
    server: Server,
}

impl Federation {
    /// Rounds 0 and 1 done; every node's masked input sent.
    fn through_masked_input(n: usize, seed: u8) -> Federation {
        let config = Config::new(n, 16, 5, [seed; 32]).expect("config");
        let mut rng = ChaCha20Rng::from_seed([seed; 32]);
        let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
        let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
        let mut server = Server::new(config.clone(), identities.clone()).expect("server");
        let mut clients = BTreeMap::new();
        for (id, key) in keys.into_iter().enumerate() {
            let (client, msg) =
                Client::new(id as u32, config.clone(), key, identities.clone(), &mut rng)
                    .expect("client");
            server.receive_advertise(wire(msg)).expect("advertise");
            clients.insert(id as u32, client);
        }
        for (id, dir) in server.key_directories().expect("directories") {
            let msg = clients
                .get_mut(&id)
                .expect("client")
                .share_keys(&wire(dir), &mut rng)
                .expect("share keys");
            server.receive_shares(wire(msg)).expect("shares");
        }
        for (id, shares) in server.forward_shares().expect("forward") {
            let msg = clients
                .get_mut(&id)
                .expect("client")
                .masked_input(&wire(shares), &[u64::from(id); 5])
                .expect("masked input");
            server.receive_masked_input(wire(msg)).expect("masked");
        }
        Federation { clients, server }
    }

    fn client(&mut self, id: u32) -> &mut Client {
        self.clients.get_mut(&id).expect("client")
    }
}

#[test]
fn different_survivor_sets_are_detected_before_anything_is_revealed() {
    let mut fed = Federation::through_masked_input(7, 10);
    let honest = fed.server.survivor_set().expect("set");
    // The coordinator tells node 0 that node 6 dropped, everyone else that it survived.
    let lie = SurvivorSet {
        survivors: honest.survivors[..6].to_vec(),
    };
    let mut signatures = Vec::new();
    for id in 0..7u32 {
        let set = if id == 0 { &lie } else { &honest };
        signatures.push(
            fed.client(id)
                .consistency(&wire(set.clone()))
                .expect("sign"),
        );
    }
    // The honest server would reject node 0's signature outright.
    let err = fed
        .server
        .receive_consistency(signatures[0].clone())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "node 0: signature on the survivor set is invalid"
    );
    // A lying coordinator forwards all signatures: every node notices.
    let request = UnmaskRequest {
        signatures: signatures.clone(),
        dropped: vec![],
    };
    for id in [1u32, 3] {
        let err = fed.client(id).unmask(&wire(request.clone())).unwrap_err();
        assert!(
            matches!(err, SecAggError::Inconsistent { node, .. } if node == id),
            "{err}"
        );
        assert!(err.to_string().contains("node 0's signature"), "{err}");
    }
    // Node 0, told that 6 dropped, is asked for 6's mask key with only the
    // signatures over its own set: too few, so it refuses.
    let request = UnmaskRequest {
        signatures: vec![signatures[0].clone()],
        dropped: vec![6],
    };
    let err = fed.client(0).unmask(&wire(request)).unwrap_err();
    assert!(err.to_string().contains("only 1 survivors signed"), "{err}");
    // An aborted node stays aborted.
    let again = UnmaskRequest {
        signatures: signatures[1..].to_vec(),
        dropped: vec![],
    };
    assert!(matches!(
        fed.client(1).unmask(&again),
        Err(SecAggError::Aborted { node: 1, .. })
    ));
}

#[test]
fn asking_for_both_shares_of_a_node_gets_neither() {
    let mut fed = Federation::through_masked_input(5, 11);
    let set = fed.server.survivor_set().expect("set");
    let mut signatures: Vec<ConsistencySignature> = Vec::new();
    for id in 0..5u32 {
        let sig = fed.client(id).consistency(&set).expect("sign");
        fed.server.receive_consistency(sig.clone()).expect("accept");
        signatures.push(sig);
    }
    let mut request = fed.server.unmask_request().expect("request");
    // Node 2 survived, so its self-mask share is due; asking for its mask
    // key as well would unmask its input.
    request.dropped.push(2);
    let err = fed.client(4).unmask(&request).unwrap_err();
    assert_eq!(err, SecAggError::BothSharesRequested { node: 4, peer: 2 });
    assert!(err.to_string().contains("revealing neither"));
    // The honest request still works for the others, and the sum is exact
    // from the remaining four.
    request.dropped.clear();
    for id in 0..4u32 {
        let msg = fed.client(id).unmask(&request).expect("unmask");
        fed.server.receive_unmask(wire(msg)).expect("accept");
    }
    let aggregate = fed.server.finish().expect("sum");
    assert_eq!(aggregate.sum, vec![10; 5]);
}

#[test]
fn tampered_ciphertexts_are_rejected() {
    let n = 5;
    let config = Config::new(n, 16, 2, [12; 32]).expect("config");
    let mut rng = ChaCha20Rng::from_seed([12; 32]);
    let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
    let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
    let mut server = Server::new(config.clone(), identities.clone()).expect("server");
    let mut clients = Vec::new();
    for (id, key) in keys.into_iter().enumerate() {
        let (c, msg) = Client::new(id as u32, config.clone(), key, identities.clone(), &mut rng)
            .expect("client");
        server.receive_advertise(msg).expect("advertise");
        clients.push(c);
    }
    for (id, dir) in server.key_directories().expect("dirs") {
        let msg = clients[id as usize]
            .share_keys(&dir, &mut rng)
            .expect("shares");
        server.receive_shares(msg).expect("accept");
    }
    let mut forwarded = server.forward_shares().expect("forward");
    let to_three = forwarded.get_mut(&3).expect("node 3");
    let from = to_three.shares[1].from;
    to_three.shares[1].ciphertext[17] ^= 0x40;
    let err = clients[3]
        .masked_input(&forwarded[&3], &[1, 2])
        .unwrap_err();
    assert_eq!(
        err,
        SecAggError::Decryption {
            recipient: 3,
            sender: from
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "node 3: the share from node {from} fails to decrypt (tampered, misrouted or under another key)"
        )
    );
    // A share replayed under another sender's name fails too.
    let mut replay = forwarded[&2].clone();
    replay.shares[0].from = replay.shares[1].from;
    replay.shares.truncate(1);
    assert!(matches!(
        clients[2].masked_input(&replay, &[1, 2]),
        Err(SecAggError::Decryption { recipient: 2, .. })
    ));
}

#[test]
fn forged_signatures_are_rejected() {
    let n = 4;
    let config = Config::new(n, 16, 2, [13; 32]).expect("config");
    let mut rng = ChaCha20Rng::from_seed([13; 32]);
    let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
    let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
    let mut server = Server::new(config.clone(), identities.clone()).expect("server");
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for (id, key) in keys.iter().enumerate() {
        let (c, msg) = Client::new(
            id as u32,
            config.clone(),
            key.clone(),
            identities.clone(),
            &mut rng,
        )
        .expect("client");
        clients.push(c);
        adverts.push(msg);
    }
    // Swapped key: the signature no longer covers it.
    let mut tampered = adverts[3].clone();
    tampered.mask_key[0] ^= 1;
    let err = server.receive_advertise(tampered.clone()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node 3: signature on advertised keys is invalid"
    );
    // A genuine signature of node 3, but over other keys.
    let mut forged = adverts[3].clone();
    let (_, other) = Client::new(
        3,
        config.clone(),
        keys[3].clone(),
        identities.clone(),
        &mut rng,
    )
    .expect("client");
    forged.signature = other.signature;
    assert!(matches!(
        server.receive_advertise(forged),
        Err(SecAggError::BadSignature { signer: 3, .. })
    ));
    // A client given a tampered directory refuses too (it does not trust the coordinator).
    for msg in &adverts {
        server.receive_advertise(msg.clone()).expect("advertise");
    }
    let mut dirs = server.key_directories().expect("dirs");
    let dir0 = dirs.get_mut(&0).expect("node 0");
    let at = dir0
        .keys
        .iter()
        .position(|k| k.from == 3)
        .expect("node 3 listed");
    dir0.keys[at] = tampered;
    let err = clients[0].share_keys(&dirs[&0], &mut rng).unwrap_err();
    assert_eq!(
        err.to_string(),
        "node 3: signature on advertised keys is invalid"
    );
    // An identity key that is not the roster's is refused at once.
    let stranger = SigningKey::generate(&mut rng);
    assert!(Client::new(2, config, stranger, identities, &mut rng).is_err());
}

#[test]
fn tampered_consistency_signatures_abort_the_node() {
    let mut fed = Federation::through_masked_input(5, 14);
    let set = fed.server.survivor_set().expect("set");
    let mut sigs = Vec::new();
    for id in 0..5u32 {
        sigs.push(fed.client(id).consistency(&set).expect("sign"));
    }
    let mut bad = sigs[2].clone();
    bad.signature[40] ^= 1;
    assert!(matches!(
        fed.server.receive_consistency(bad.clone()),
        Err(SecAggError::BadSignature { signer: 2, .. })
    ));
    let mut forged = sigs.clone();
    forged[2] = bad;
    let err = fed
        .client(0)
        .unmask(&UnmaskRequest {
            signatures: forged,
            dropped: vec![],
        })
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("node 2's signature on the survivor set is invalid"),
        "{err}"
    );
    // A duplicated signature does not count twice.
    let mut doubled = sigs.clone();
    doubled.push(sigs[1].clone());
    let err = fed
        .client(1)
        .unmask(&UnmaskRequest {
            signatures: doubled,
            dropped: vec![],
        })
        .unwrap_err();
    assert!(err.to_string().contains("appears twice"), "{err}");
}

/// Encodes each node's vector, aggregates securely, decodes.
fn encode_aggregate_decode(
    encoder: &Encoder,
    config: &Config,
    inputs: &[Vec<f64>],
    dropouts: &Dropouts,
    seed: u8,
) -> (Vec<f64>, Vec<u32>) {
    let mut rng = ChaCha20Rng::from_seed([seed; 32]);
    let encoded: Vec<Vec<u64>> = inputs
        .iter()
        .map(|x| encoder.encode(x, &mut rng).expect("encode").values)
        .collect();
    let input = |id: u32| encoded[id as usize].clone();
    let report =
        simulation::run(config, &input, dropouts, [seed; 32], Threads::all(2)).expect("session");
    let decoded = encoder.decode(&report.aggregate.sum).expect("decode");
    (decoded, report.aggregate.contributors)
}

#[test]
fn encoded_sums_decode_within_rounding_error() {
    let n = 8;
    let dim = 100;
    let inputs: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..dim)
                .map(|j| (((i * 13 + j * 7) % 17) as f64 - 8.0) / 100.0)
                .collect()
        })
        .collect();
    for rotation in [None, Some([3u8; 32])] {
        let mut enc = EncodingConfig::new(dim, 2.0, 1000.0, 0.0, n, 5, 24).expect("encoding");
        enc.rotation_seed = rotation;
        let config = Config::new(n, 24, enc.encoded_len(), [15; 32]).expect("config");
        enc.check_session(&config).expect("compatible");
        let encoder = Encoder::new(enc).expect("encoder");
        let dropouts = Dropouts {
            masked_input: vec![4],
            ..Dropouts::none()
        };
        let (decoded, contributors) =
            encode_aggregate_decode(&encoder, &config, &inputs, &dropouts, 15);
        let truth: Vec<f64> = (0..dim)
            .map(|j| contributors.iter().map(|&i| inputs[i as usize][j]).sum())
            .collect();
        let err = decoded
            .iter()
            .zip(&truth)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            .sqrt();
        let bound = ((contributors.len() * dim.next_power_of_two()) as f64).sqrt() / 1000.0;
        assert!(
            err < bound,
            "rotation {rotation:?}: error {err} over {bound}"
        );
    }
}

/// The noise in the decoded sum has the declared variance: m survivors each
/// adding N_Z(0, σ²/t). Every coordinate is an independent draw, so one
/// long vector gives many.
#[test]
fn decoded_noise_has_the_declared_variance() {
    let n = 8;
    let t = 5;
    let dim = 1 << 14;
    let sigma = 12.0; // integer units; γ = 2 halves it when decoding
    let scale = 2.0;
    for (rotation, drop) in [(None, vec![]), (Some([4u8; 32]), vec![1u32, 6])] {
        let mut enc = EncodingConfig::new(dim, 1e3, scale, sigma, n, t, 32).expect("encoding");
        enc.rotation_seed = rotation;
        let config = Config::new(n, 32, enc.encoded_len(), [16; 32])
            .expect("config")
            .min_survivors(t)
            .expect("t");
        let encoder = Encoder::new(enc.clone()).expect("encoder");
        // Integer inputs in the scaled domain round exactly; zero is simplest.
        let inputs = vec![vec![0.0; dim]; n];
        let dropouts = Dropouts {
            masked_input: drop.clone(),
            ..Dropouts::none()
        };
        let (decoded, contributors) =
            encode_aggregate_decode(&encoder, &config, &inputs, &dropouts, 16);
        assert_eq!(contributors.len(), n - drop.len());
        let m = contributors.len() as f64;
        let draws = decoded.len() as f64;
        let mean = decoded.iter().sum::<f64>() / draws;
        let var = decoded.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (draws - 1.0);
        let per_node =
            discrete_gaussian_variance(enc.node_noise().expect("noise").sigma_squared().sqrt());
        let declared = m * per_node / (scale * scale);
        // A sum of Gaussians: kurtosis 3, relative SE of the variance
        // sqrt(2 / N); 6.5 SE fails with probability below 1e-10.
        let tol = 6.5 * (2.0 / draws).sqrt();
        assert!(
            (var / declared - 1.0).abs() < tol,
            "rotation {rotation:?}: variance {var} vs declared {declared}"
        );
        assert!(mean.abs() < 6.5 * (declared / draws).sqrt(), "mean {mean}");
        // At least the target: t survivors' worth of σ².
        assert!(declared * scale * scale >= sigma * sigma * (1.0 - 1e-3));
    }
}

/// A coordinator that withholds a survivor's share from a node (so that
/// the node's input carries no mask with that survivor) is caught when the
/// node is asked to sign the survivor set.
#[test]
fn withheld_shares_are_detected_at_the_consistency_check() {
    let n = 5;
    let config = Config::new(n, 16, 2, [17; 32]).expect("config");
    let mut rng = ChaCha20Rng::from_seed([17; 32]);
    let keys: Vec<SigningKey> = (0..n).map(|_| SigningKey::generate(&mut rng)).collect();
    let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
    let mut server = Server::new(config.clone(), identities.clone()).expect("server");
    let mut clients = Vec::new();
    for (id, key) in keys.into_iter().enumerate() {
        let (c, msg) = Client::new(id as u32, config.clone(), key, identities.clone(), &mut rng)
            .expect("client");
        server.receive_advertise(msg).expect("advertise");
        clients.push(c);
    }
    for (id, dir) in server.key_directories().expect("dirs") {
        let msg = clients[id as usize]
            .share_keys(&dir, &mut rng)
            .expect("shares");
        server.receive_shares(msg).expect("accept");
    }
    let mut forwarded = server.forward_shares().expect("forward");
    let to_zero = forwarded.get_mut(&0).expect("node 0");
    let withheld = to_zero.shares.remove(0).from;
    for (id, shares) in &forwarded {
        let msg = clients[*id as usize]
            .masked_input(shares, &[1, 1])
            .expect("masked input");
        server.receive_masked_input(msg).expect("masked");
    }
    let set = server.survivor_set().expect("set");
    let err = clients[0].consistency(&set).unwrap_err();
    assert!(
        err.to_string().contains(&format!(
            "node {withheld} is listed as a survivor but its shares never reached this node"
        )),
        "{err}"
    );
}
