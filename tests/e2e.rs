//! End-to-end tests: real `confer` coordinator and node processes on
//! loopback ports, over the OHDSI GiBleed data split into sites by person.
//!
//! Modules:
mod dp_semantics; // at epsilon = 1e9, DP answers equal the bounded query in plain DataFusion
mod failures;
mod fixture; // starting a federation of real processes; plain DataFusion over the unsplit data // bad queries are refused before any task is sent; a node that is down is named
