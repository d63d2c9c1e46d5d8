//! Benchmarks of twinhead, each against a named peer or target in the same
//! run; results are recorded in BENCHMARKS.md at the repository root.
//!
//! # Layout
//! - `bin/coordinator_load`: 1,000 simulated workers against one
//!   coordinator process: heartbeat latency, report rate, CPU and memory.
