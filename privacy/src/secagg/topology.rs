//! The neighbour graph, derived from public parameters only, so that every
//! party computes the same one.

use chacha20::ChaCha20Rng;
use rand_core::SeedableRng;

use super::crypto::{hkdf32, uniform_below};
use super::{Config, Graph};

const GRAPH_LABEL: &[u8] = b"confer-secagg/v1/graph";

/// Who is whose neighbour in one session.
///
/// For [`Graph::Sparse`] the nodes are placed on a ring in a uniformly random
/// order drawn from the session id (ChaCha20 keyed by HKDF of the session,
/// Fisher-Yates with unbiased draws) and each node is joined to the
/// `degree / 2` nodes on either side: every node has exactly `degree`
/// neighbours and the relation is symmetric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    n: u32,
    kind: Kind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Complete,
    Ring {
        half: u32,
        /// position[id] = place on the ring.
        position: Vec<u32>,
        /// order[place] = id.
        order: Vec<u32>,
    },
}

impl Topology {
    /// The graph of `config` (assumed valid).
    pub fn new(config: &Config) -> Topology {
        let n = config.n as u32;
        match config.graph {
            Graph::Complete => Topology {
                n,
                kind: Kind::Complete,
            },
            Graph::Sparse { degree } => {
                let seed = hkdf32(&config.session, &[], &[GRAPH_LABEL]);
                let mut rng = ChaCha20Rng::from_seed(seed);
                let mut order: Vec<u32> = (0..n).collect();
                for i in (1..order.len()).rev() {
                    let j = uniform_below(&mut rng, i as u64 + 1) as usize;
                    order.swap(i, j);
                }
                let mut position = vec![0u32; order.len()];
                for (place, &id) in order.iter().enumerate() {
                    position[id as usize] = place as u32;
                }
                Topology {
                    n,
                    kind: Kind::Ring {
                        half: (degree / 2) as u32,
                        position,
                        order,
                    },
                }
            }
        }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.n as usize
    }

    /// Whether the graph has no nodes (never, for a valid config).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Whether `u` and `v` are distinct neighbours.
    pub fn are_neighbours(&self, u: u32, v: u32) -> bool {
        if u == v || u >= self.n || v >= self.n {
            return false;
        }
        match &self.kind {
            Kind::Complete => true,
            Kind::Ring { half, position, .. } => {
                let d = position[u as usize].abs_diff(position[v as usize]);
                d.min(self.n - d) <= *half
            }
        }
    }

    /// The neighbours of `u`, in increasing id order (without `u`).
    pub fn neighbours(&self, u: u32) -> Vec<u32> {
        match &self.kind {
            Kind::Complete => (0..self.n).filter(|&v| v != u).collect(),
            Kind::Ring {
                half,
                position,
                order,
            } => {
                let p = position[u as usize];
                let mut out: Vec<u32> = (1..=*half)
                    .flat_map(|k| {
                        [
                            order[((p + k) % self.n) as usize],
                            order[((p + self.n - k) % self.n) as usize],
                        ]
                    })
                    .collect();
                out.sort_unstable();
                out
            }
        }
    }

    /// The holders of `u`'s shares: its neighbours and itself, in id order.
    pub fn holders(&self, u: u32) -> Vec<u32> {
        let mut out = self.neighbours(u);
        let at = out.partition_point(|&v| v < u);
        out.insert(at, u);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_graph_is_regular_symmetric_and_seeded() {
        let config =
            Config::with_graph(60, Graph::Sparse { degree: 10 }, 32, 1, [3; 32]).expect("config");
        let t = Topology::new(&config);
        for u in 0..60 {
            let nb = t.neighbours(u);
            assert_eq!(nb.len(), 10);
            assert!(!nb.contains(&u));
            for &v in &nb {
                assert!(t.are_neighbours(u, v) && t.are_neighbours(v, u));
                assert!(t.neighbours(v).contains(&u));
            }
            let count = (0..60).filter(|&v| t.are_neighbours(u, v)).count();
            assert_eq!(count, 10);
            assert_eq!(t.holders(u).len(), 11);
        }
        assert_eq!(t, Topology::new(&config));
        let other = Config {
            session: [4; 32],
            ..config
        };
        assert_ne!(t, Topology::new(&other));
    }

    #[test]
    fn complete_graph() {
        let config = Config::new(5, 32, 1, [0; 32]).expect("config");
        let t = Topology::new(&config);
        assert_eq!(t.neighbours(2), vec![0, 1, 3, 4]);
        assert_eq!(t.holders(2), vec![0, 1, 2, 3, 4]);
        assert!(!t.are_neighbours(2, 2));
    }
}
