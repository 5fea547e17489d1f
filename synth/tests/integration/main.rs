//! Integration tests for confer-synth: one binary, one module per concern.

// Shared fixture: a 5-site, 2,000-resident Parquet network, generated once.
mod common;
// Every table of every site: readable, CDM columns and types, required
// columns non-null, ids unique, references resolve, concepts known.
mod tables;
// Residents shared between sites; distributions that differ between tiers.
mod realism;
// Same seed, same bytes; another seed, other rows.
mod determinism;
// The output directory: refused when not empty, replaced with force.
mod output_dir;
// node.toml parses and the node's own loader accepts the tables (Parquet and CSV).
mod node_config;
// Region mode: the tree, nodes holding villages, supervision indicators; the
// window's end; the default output pinned.
mod region;
