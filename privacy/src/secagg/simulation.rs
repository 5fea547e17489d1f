//! Runs a whole session in one process: every node and the coordinator,
//! with dropouts at chosen rounds, timing each party and counting the bytes
//! each sends ([`WireSize::byte_len`]). Used by the tests and the benchmark;
//! also a reference for the message flow a transport must implement.
//!
//! Nodes of one round run on [`Threads::nodes`] threads (each node's own
//! work is single-threaded; one thread gives the fairest per-node times);
//! the coordinator runs on the calling thread and unmasks on
//! [`Threads::server`] threads.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chacha20::ChaCha20Rng;
use ed25519_dalek::{SigningKey, VerifyingKey};
use rand_core::SeedableRng;

use super::crypto::hkdf32;
use super::messages::WireSize;
use super::topology::Topology;
use super::{Aggregate, Client, Config, Result, SecAggError, Server};

/// Which nodes disappear before sending which round's message. A node that
/// drops before a round sends nothing from that round on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dropouts {
    /// Before advertising keys (round 0).
    pub advertise: Vec<u32>,
    /// Before sharing keys (round 1).
    pub share_keys: Vec<u32>,
    /// Before sending the masked input (round 2).
    pub masked_input: Vec<u32>,
    /// Before signing the survivor set (round 3).
    pub consistency: Vec<u32>,
    /// Before revealing shares (round 4).
    pub unmask: Vec<u32>,
}

impl Dropouts {
    /// No dropouts.
    pub fn none() -> Dropouts {
        Dropouts::default()
    }

    /// `fractions[r]` of the nodes still present drop before round `r`
    /// (rounds 0 to 4), picked at random from `seed`.
    pub fn random(n: usize, fractions: [f64; 5], seed: [u8; 32]) -> Dropouts {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut alive: Vec<u32> = (0..n as u32).collect();
        let mut rounds: [Vec<u32>; 5] = Default::default();
        for (r, fraction) in fractions.iter().enumerate() {
            let k = ((alive.len() as f64) * fraction).round() as usize;
            for _ in 0..k.min(alive.len()) {
                let i = super::crypto::uniform_below(&mut rng, alive.len() as u64) as usize;
                rounds[r].push(alive.swap_remove(i));
            }
            rounds[r].sort_unstable();
        }
        let [advertise, share_keys, masked_input, consistency, unmask] = rounds;
        Dropouts {
            advertise,
            share_keys,
            masked_input,
            consistency,
            unmask,
        }
    }

    fn round_of(&self, id: u32) -> usize {
        let lists = [
            &self.advertise,
            &self.share_keys,
            &self.masked_input,
            &self.consistency,
            &self.unmask,
        ];
        lists
            .iter()
            .position(|l| l.contains(&id))
            .unwrap_or(usize::MAX)
    }
}

/// Timings and traffic of one simulated session.
#[derive(Debug, Clone)]
pub struct Report {
    /// The coordinator's output.
    pub aggregate: Aggregate,
    /// Per node, time spent in its own computation over all rounds.
    pub node_time: Vec<Duration>,
    /// Per round (0 to 4), node time summed over nodes.
    pub node_time_per_round: [Duration; 5],
    /// Per round (0 to 4), how many nodes sent a message.
    pub node_count_per_round: [usize; 5],
    /// Coordinator time (receiving, relaying, unmasking).
    pub server_time: Duration,
    /// Per node, bytes it sent.
    pub node_bytes: Vec<usize>,
    /// Bytes the coordinator sent to all nodes together.
    pub server_bytes: usize,
}

impl Report {
    /// Mean node time over nodes that took part in round 2 or later.
    pub fn mean_node_time(&self) -> Duration {
        let times: Vec<&Duration> = self.node_time.iter().filter(|t| !t.is_zero()).collect();
        if times.is_empty() {
            return Duration::ZERO;
        }
        times.iter().copied().sum::<Duration>() / times.len() as u32
    }

    /// The largest number of bytes any node sent.
    pub fn max_node_bytes(&self) -> usize {
        self.node_bytes.iter().copied().max().unwrap_or(0)
    }
}

/// Threads for a simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// Threads that run nodes side by side.
    pub nodes: usize,
    /// Threads the coordinator unmasks on.
    pub server: usize,
}

impl Threads {
    /// `n` threads for both.
    pub fn all(n: usize) -> Threads {
        Threads {
            nodes: n,
            server: n,
        }
    }
}

/// One node's round: its id, and the result and duration of its step.
type Step<T> = (u32, Result<T>, Duration);

/// Runs `step` for each of `ids` on `threads` threads.
fn par_step<T: Send, F>(
    clients: &mut BTreeMap<u32, Client>,
    ids: &[u32],
    threads: usize,
    step: F,
) -> Vec<Step<T>>
where
    F: Fn(&mut Client) -> Result<T> + Sync,
{
    let mut work: Vec<(u32, &mut Client)> = clients
        .iter_mut()
        .filter(|(id, _)| ids.binary_search(id).is_ok())
        .map(|(&id, c)| (id, c))
        .collect();
    let per = work.len().div_ceil(threads.max(1)).max(1);
    let step = &step;
    std::thread::scope(|scope| {
        let handles: Vec<_> = work
            .chunks_mut(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter_mut()
                        .map(|(id, client)| {
                            let start = Instant::now();
                            let out = step(client);
                            (*id, out, start.elapsed())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a simulated node panicked"))
            .collect()
    })
}

/// Runs a session of `config.n` nodes, node `u` contributing `input(u)`,
/// with the given dropouts. All randomness (identity keys, each node's
/// generator) derives from `seed`.
pub fn run(
    config: &Config,
    input: &(dyn Fn(u32) -> Vec<u64> + Sync),
    dropouts: &Dropouts,
    seed: [u8; 32],
    threads: Threads,
) -> Result<Report> {
    config.validate()?;
    let n = config.n;
    let (server_threads, threads) = (threads.server.max(1), threads.nodes.max(1));
    let node_rng = |id: u32| ChaCha20Rng::from_seed(hkdf32(&seed, &id.to_le_bytes(), &[b"node"]));
    let keys: Vec<SigningKey> = (0..n as u32)
        .map(|id| SigningKey::from_bytes(&hkdf32(&seed, &id.to_le_bytes(), &[b"identity"])))
        .collect();
    let identities: Arc<[VerifyingKey]> = keys.iter().map(SigningKey::verifying_key).collect();
    let topology = Arc::new(Topology::new(config));

    let mut node_time = vec![Duration::ZERO; n];
    let mut node_time_per_round = [Duration::ZERO; 5];
    let mut node_count_per_round = [0usize; 5];
    let mut node_bytes = vec![0usize; n];
    let mut server_bytes = 0usize;
    let mut server_time = Duration::ZERO;
    let alive = |round: usize, id: u32| dropouts.round_of(id) > round;
    let mut record = |round: usize, id: u32, took: Duration, bytes: usize| {
        node_time[id as usize] += took;
        node_time_per_round[round] += took;
        node_count_per_round[round] += 1;
        node_bytes[id as usize] += bytes;
    };

    let start = Instant::now();
    let mut server = Server::with_topology(config.clone(), topology.clone(), identities.clone())?
        .with_threads(server_threads);
    server_time += start.elapsed();

    // Round 0.
    let mut clients = BTreeMap::new();
    let mut rngs = BTreeMap::new();
    for (id, key) in keys.into_iter().enumerate() {
        let id = id as u32;
        if !alive(0, id) {
            continue;
        }
        let mut rng = node_rng(id);
        let start = Instant::now();
        let (client, msg) = Client::with_topology(
            id,
            config.clone(),
            topology.clone(),
            key,
            identities.clone(),
            &mut rng,
        )?;
        record(0, id, start.elapsed(), msg.byte_len());
        let start = Instant::now();
        server.receive_advertise(msg)?;
        server_time += start.elapsed();
        clients.insert(id, client);
        rngs.insert(id, std::sync::Mutex::new(rng));
    }

    // Round 1.
    let start = Instant::now();
    let directories = server.key_directories()?;
    server_time += start.elapsed();
    let ids: Vec<u32> = directories
        .keys()
        .copied()
        .filter(|&id| alive(1, id))
        .collect();
    server_bytes += directories.values().map(WireSize::byte_len).sum::<usize>();
    let results = par_step(&mut clients, &ids, threads, |c| {
        let mut rng = rngs[&c.id()].lock().expect("rng lock");
        c.share_keys(&directories[&c.id()], &mut *rng)
    });
    for (id, msg, took) in results {
        let msg = msg?;
        record(1, id, took, msg.byte_len());
        let start = Instant::now();
        server.receive_shares(msg)?;
        server_time += start.elapsed();
    }

    // Round 2, in batches so that at most a few masked inputs are in memory.
    let start = Instant::now();
    let forwarded = server.forward_shares()?;
    server_time += start.elapsed();
    server_bytes += forwarded.values().map(WireSize::byte_len).sum::<usize>();
    let ids: Vec<u32> = forwarded
        .keys()
        .copied()
        .filter(|&id| alive(2, id))
        .collect();
    for batch in ids.chunks(4 * threads) {
        let inputs: BTreeMap<u32, Vec<u64>> = batch.iter().map(|&id| (id, input(id))).collect();
        let results = par_step(&mut clients, batch, threads, |c| {
            c.masked_input(&forwarded[&c.id()], &inputs[&c.id()])
        });
        drop(inputs);
        for (id, msg, took) in results {
            let msg = msg?;
            record(2, id, took, msg.byte_len());
            let start = Instant::now();
            server.receive_masked_input(msg)?;
            server_time += start.elapsed();
        }
    }

    // Round 3.
    let start = Instant::now();
    let set = server.survivor_set()?;
    server_time += start.elapsed();
    server_bytes += set.byte_len() * set.survivors.len();
    let ids: Vec<u32> = set
        .survivors
        .iter()
        .copied()
        .filter(|&id| alive(3, id))
        .collect();
    let results = par_step(&mut clients, &ids, threads, |c| c.consistency(&set));
    for (id, msg, took) in results {
        let msg = msg?;
        record(3, id, took, msg.byte_len());
        let start = Instant::now();
        server.receive_consistency(msg)?;
        server_time += start.elapsed();
    }

    // Round 4.
    let start = Instant::now();
    let request = server.unmask_request()?;
    server_time += start.elapsed();
    server_bytes += request.byte_len() * request.signatures.len();
    let signers: Vec<u32> = request.signatures.iter().map(|s| s.from).collect();
    let ids: Vec<u32> = signers.iter().copied().filter(|&id| alive(4, id)).collect();
    let results = par_step(&mut clients, &ids, threads, |c| c.unmask(&request));
    for (id, msg, took) in results {
        let msg = msg?;
        record(4, id, took, msg.byte_len());
        let start = Instant::now();
        server.receive_unmask(msg)?;
        server_time += start.elapsed();
    }
    let start = Instant::now();
    let aggregate = server.finish()?;
    server_time += start.elapsed();
    if aggregate.contributors.is_empty() {
        return Err(SecAggError::Internal("empty aggregate".into()));
    }
    Ok(Report {
        aggregate,
        node_time,
        node_time_per_round,
        node_count_per_round,
        server_time,
        node_bytes,
        server_bytes,
    })
}

/// The expected sum mod 2^bits of `input` over `contributors` (for tests).
pub fn expected_sum(
    config: &Config,
    input: &(dyn Fn(u32) -> Vec<u64> + Sync),
    contributors: &[u32],
) -> Vec<u64> {
    let mask = config.modulus_mask();
    let mut sum = vec![0u64; config.vector_len];
    for &id in contributors {
        for (s, x) in sum.iter_mut().zip(input(id)) {
            *s = s.wrapping_add(x) & mask;
        }
    }
    sum
}

/// Adds the ChaCha20 mask stream of `key` to `acc`, as a node does for each
/// mask: exposed so that benchmarks can measure the PRG's throughput.
pub fn add_mask_stream(key: &[u8; 32], acc: &mut [u32]) {
    super::crypto::apply_masks(
        acc,
        0,
        &[super::crypto::Mask {
            key: *key,
            sign: super::crypto::Sign::Add,
        }],
    );
}
