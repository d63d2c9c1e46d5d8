//! What every crate's `tests/fuzz.rs` shares (each includes this folder
//! with `#[path]`): the number of cases, a seeded proptest runner whose
//! every case is timed and watched for hangs, values of the wrong kind, and
//! byte-level mutations (bit flips, truncations, splices).
//!
//! Two modes. `cargo test` runs each target's short count; bench mode runs
//! the `#[ignore]`d `fuzz_<target>` tests at `TWINHEAD_FUZZ_CASES` cases:
//!
//! ```text
//! TWINHEAD_FUZZ_CASES=1000000 cargo test --release -p twinhead-proto --test fuzz -- --ignored fuzz_
//! ```
//!
//! `TWINHEAD_FUZZ_SEED` (a number) changes the inputs; the default seed
//! makes CI's short pass the same on every run.

pub mod text;

use std::collections::HashMap;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per target in bench mode.
pub const CASES_VAR: &str = "TWINHEAD_FUZZ_CASES";
/// Seed of the inputs.
pub const SEED_VAR: &str = "TWINHEAD_FUZZ_SEED";

/// A case running this long is a hang: the process is aborted with the
/// target's name (a panic could not stop the stuck thread).
pub const HANG: Duration = Duration::from_secs(60);

/// Cases to run: `TWINHEAD_FUZZ_CASES` when set, else `short`.
pub fn cases(short: u32) -> u32 {
    std::env::var(CASES_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(short)
}

fn seed() -> u64 {
    std::env::var(SEED_VAR)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(15)
}

/// Cases in flight, by target: when each started.
fn running() -> &'static Mutex<HashMap<String, Instant>> {
    static RUNNING: OnceLock<Mutex<HashMap<String, Instant>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

/// Where the last panic happened. The hook records it instead of printing
/// (a panic that code under test catches and turns into an error would
/// print a line per case); a failing target reports it.
fn last_panic() -> &'static Mutex<String> {
    static LAST: OnceLock<Mutex<String>> = OnceLock::new();
    LAST.get_or_init(Default::default)
}

fn quiet_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            *last_panic().lock().unwrap_or_else(|p| p.into_inner()) = at;
        }));
    });
}

fn start_watchdog() {
    static WATCHDOG: Once = Once::new();
    WATCHDOG.call_once(|| {
        std::thread::spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let stuck = running()
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .find(|(_, started)| started.elapsed() > HANG)
                    .map(|(name, started)| (name.clone(), started.elapsed()));
                if let Some((name, elapsed)) = stuck {
                    eprintln!("fuzz target {name}: one case has run for {elapsed:?}: a hang");
                    std::process::abort();
                }
            }
        });
    });
}

/// What a target run did.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub cases: u32,
    pub wall: Duration,
    pub slowest: Duration,
}

/// Runs `test` on `cases(short)` values of `strategy`. A panic (proptest
/// catches it and shrinks the input), a case slower than `limit`, or a
/// `TestCaseError` fails the test with the smallest input found; a case
/// that never returns aborts the process after [`HANG`].
pub fn run<S: Strategy>(
    target: &str,
    short: u32,
    limit: Duration,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Summary {
    run_with(target, short, limit, true, strategy, test)
}

/// [`run`], shrinking a failing input only when `shrink` (a stateful
/// target cannot replay a smaller input in the same state).
pub fn run_with<S: Strategy>(
    target: &str,
    short: u32,
    limit: Duration,
    shrink: bool,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> Summary {
    start_watchdog();
    quiet_panics();
    let cases = cases(short);
    let config = Config {
        cases,
        failure_persistence: None,
        // Inputs are rejected by the code under test, never by the runner.
        max_global_rejects: 0,
        max_shrink_iters: if shrink { 2048 } else { 0 },
        ..Config::default()
    };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed().to_le_bytes());
    seed_bytes[8..8 + target.len().min(24)]
        .copy_from_slice(&target.as_bytes()[..target.len().min(24)]);
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let slowest = Mutex::new(Duration::ZERO);
    let started = Instant::now();
    // A case that aborts the process (an allocation that fails) cannot be
    // shrunk or reported: TWINHEAD_FUZZ_TRACE=1 prints every input first.
    let trace = std::env::var_os("TWINHEAD_FUZZ_TRACE").is_some();
    let result = runner.run(&strategy, |value| {
        if trace {
            eprintln!("fuzz target {target}: case {value:?}");
        }
        let t0 = Instant::now();
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(target.to_string(), t0);
        let outcome = test(value);
        running()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(target);
        let took = t0.elapsed();
        {
            let mut s = slowest.lock().unwrap_or_else(|p| p.into_inner());
            *s = (*s).max(took);
        }
        outcome?;
        if took > limit {
            return Err(TestCaseError::fail(format!(
                "one case took {took:?}, more than {limit:?}"
            )));
        }
        Ok(())
    });
    let summary = Summary {
        cases,
        wall: started.elapsed(),
        slowest: slowest.into_inner().unwrap_or_else(|p| p.into_inner()),
    };
    if let Err(e) = result {
        let at = last_panic()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let _ = std::panic::take_hook();
        panic!("fuzz target {target}: {e} (last panic at {at:?})");
    }
    eprintln!(
        "fuzz target {target}: {} cases, 0 panics, 0 hangs, {:.1} s, slowest case {:?}",
        summary.cases,
        summary.wall.as_secs_f64(),
        summary.slowest
    );
    summary
}

/// A rejected input's message must be more than `location` and name one
/// of `names` (the key, field or path that was wrong).
pub fn names_one_of(message: &str, location: &str, names: &[&str]) -> Result<(), TestCaseError> {
    let rest = message.replace(location, "");
    if rest.trim().len() < 8 {
        return Err(TestCaseError::fail(format!(
            "the message {message:?} says nothing beyond {location:?}"
        )));
    }
    if !message.contains(location) {
        return Err(TestCaseError::fail(format!(
            "the message {message:?} does not name the input {location:?}"
        )));
    }
    if !names.is_empty() && !names.iter().any(|n| message.contains(n)) {
        return Err(TestCaseError::fail(format!(
            "the message {message:?} names none of {names:?}"
        )));
    }
    Ok(())
}

// ------------------------------------------------------------ wrong values

/// A value of the wrong kind or out of range, for any key.
#[derive(Debug, Clone, PartialEq)]
pub enum Wrong {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    /// An array of that many copies of a small value.
    Array(Vec<Wrong>),
    /// A table with one unknown key.
    Table(String, Box<Wrong>),
}

/// Integers at and around every boundary a config or message meets.
pub fn edge_int() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        Just(-1),
        Just(1),
        Just(2),
        Just(3),
        Just(7),
        Just(16),
        Just(i64::MIN),
        Just(i64::MAX),
        Just(i64::from(u32::MAX)),
        Just(i64::from(u32::MAX) + 1),
        Just(i64::from(u16::MAX) + 1),
        Just(1 << 53),
        any::<i64>(),
        -1000i64..1000,
    ]
}

/// Floats at the edges: NaN, infinities, zero of either sign, subnormals.
pub fn edge_float() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(f64::MIN_POSITIVE / 2.0),
        Just(1e308),
        Just(-1e308),
        Just(1.5),
        Just(-1.5),
        Just(0.999_999),
        Just(1e-300),
        any::<f64>(),
    ]
}

/// Short strings: empty, blank, unicode, control characters, token counts,
/// numbers as text, and any characters at all.
pub fn edge_str() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_string()),
        Just("\u{0}".to_string()),
        Just("é💥\u{202e}".to_string()),
        Just("1.7T".to_string()),
        Just("-5K".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
        Just("1e999".to_string()),
        Just("99999999999999999999999T".to_string()),
        Just("phase_end".to_string()),
        Just("../../etc/passwd".to_string()),
        Just("file:///nonexistent".to_string()),
        Just("x".repeat(5000)),
        prop::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter),
        prop::collection::vec(prop::char::range('a', 'z'), 1..12).prop_map(String::from_iter),
    ]
}

/// Any wrong value, nested at most twice.
pub fn wrong() -> impl Strategy<Value = Wrong> {
    let leaf = prop_oneof![
        3 => edge_int().prop_map(Wrong::Int),
        2 => edge_float().prop_map(Wrong::Float),
        3 => edge_str().prop_map(Wrong::Str),
        1 => any::<bool>().prop_map(Wrong::Bool),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Wrong::Array),
            (edge_str(), inner).prop_map(|(k, v)| Wrong::Table(k, Box::new(v))),
        ]
    })
}

/// A change to one key of a structured document.
#[derive(Debug, Clone, PartialEq)]
pub enum Edit {
    /// Remove the key.
    Remove,
    /// Give it a wrong value.
    Set(Wrong),
    /// Add an unknown key next to it.
    AddSibling(String, Wrong),
    /// Rename it (a typo).
    Rename(String),
    /// Make an array element or table entry appear twice.
    Duplicate,
}

pub fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => Just(Edit::Remove),
        6 => wrong().prop_map(Edit::Set),
        1 => (edge_str(), wrong()).prop_map(|(k, v)| Edit::AddSibling(k, v)),
        1 => edge_str().prop_map(Edit::Rename),
        1 => Just(Edit::Duplicate),
    ]
}

/// Up to `n` edits, each at a key picked by index (modulo the keys the
/// document has when it is applied).
pub fn edits(n: usize) -> impl Strategy<Value = Vec<(usize, Edit)>> {
    prop::collection::vec((any::<usize>(), edit()), 1..=n)
}
