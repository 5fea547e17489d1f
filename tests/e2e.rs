//! End-to-end tests: real `confer` coordinator and node processes on
//! loopback ports, over the OHDSI GiBleed data split into sites by person.

/// The web console over HTTPS: certificates, tokens, roles, cookies.
mod console;
/// SIGKILL at random moments never loses a debit or charges twice.
mod crash;
/// At epsilon = 1e9, DP answers equal the bounded query in plain DataFusion.
mod dp_semantics;
/// Bad queries are refused before any task is sent; a node that is down is named.
mod failures;
/// A node killed mid-query, one past its deadline, one answering garbage.
mod faults;
/// Starting a federation of real processes; plain DataFusion over the unsplit data.
mod fixture;
/// Budgets, policy, approval, signatures, replays and the audit log.
mod governance;
/// Issue 13's attack shapes, one regression test each: refused, bounded or charged.
mod guarantee;
/// `confer node init`, `pki enrol`, `node enrol`: onboarding and bad bundles.
mod onboard;
/// `confer node check` and `confer coordinator check`: exit codes, messages.
mod preflight;
/// A slow link and a rogue node, for the fault tests.
mod proxy;
/// Intervals that cover at small scales; empty and multi-batch releases.
mod releases;
/// aggregation = 'secure' over real nodes: exact sums up to noise, dropouts.
mod secure_query;
/// The dialect's semantics as .slt files: DP answers equal plain bounded queries.
mod slt;
/// Supervision statistics over a synthetic region: exact at large epsilon.
mod supervision;
/// `confer synth` output served by real nodes; `confer catalog`.
mod synth_network;
/// Mutual TLS, tokens, client certificates, roles, refused certificates.
mod tls;
/// Federated training over the four UCI heart-disease centres.
mod train;
