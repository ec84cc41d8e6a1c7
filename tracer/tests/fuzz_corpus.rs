//! Replays the saved fuzzing corpus (fuzz/corpus/<target>/) through the same entry points the
//! fuzzer calls (`tracer::fuzzing`): every input must return, without a panic, within a time
//! limit, and the process must stay under the fuzzer's memory ceiling. The corpus holds the
//! seeds and every input that once found a bug, so a fixed bug stays fixed. A missing or empty
//! corpus directory fails: it would otherwise test nothing.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Generous next to what any input takes (milliseconds): a loaded machine must not fail it,
/// a hang must.
const PER_INPUT: Duration = Duration::from_secs(20);
/// `cargo xtask fuzz` runs libFuzzer with -rss_limit_mb=1024; the replay holds the same line.
const RSS_LIMIT: u64 = 1 << 30;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/self/status")
        * 1024
}

fn replay(name: &str) {
    let target = tracer::fuzzing::target(name)
        .unwrap_or_else(|| panic!("no fuzz target {name} in tracer::fuzzing::TARGETS"));
    let dir = corpus_dir(name);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "the corpus of fuzz target {name} is missing: {} ({e}); it is part of the \
                 repository (fuzz/corpus), restore it",
                dir.display()
            )
        })
        .map(|e| e.expect("read corpus directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(
        !inputs.is_empty(),
        "the corpus of fuzz target {name} ({}) is empty: nothing would be replayed",
        dir.display()
    );

    let mut failures = Vec::new();
    let started = Instant::now();
    for path in &inputs {
        let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let (tx, rx) = mpsc::channel();
        let run = target.run;
        let handle = std::thread::spawn(move || {
            run(&data);
            let _ = tx.send(());
        });
        match rx.recv_timeout(PER_INPUT) {
            Ok(()) => {
                let _ = handle.join();
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                // The thread ended without sending: it panicked (its message is on stderr).
                let why = handle
                    .join()
                    .err()
                    .and_then(|p| {
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    })
                    .unwrap_or_else(|| "unknown panic".into());
                failures.push(format!("{}: panicked: {why}", path.display()));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // The thread is left running; the test fails below.
                failures.push(format!("{}: still running after {PER_INPUT:?}", path.display()));
            }
        }
    }
    let peak = peak_rss();
    assert!(
        failures.is_empty(),
        "fuzz target {name}: {} of {} corpus inputs failed:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
    assert!(
        peak < RSS_LIMIT,
        "fuzz target {name}: the test process peaked at {peak} bytes of RSS replaying {} inputs, \
         above the fuzzer's {RSS_LIMIT}-byte ceiling",
        inputs.len()
    );
    eprintln!(
        "fuzz target {name}: {} inputs replayed in {:?}",
        inputs.len(),
        started.elapsed()
    );
}

#[test]
fn symbolizer_corpus_replays_cleanly() {
    replay("symbolizer");
}

#[test]
fn perfmap_corpus_replays_cleanly() {
    replay("perfmap");
}

#[test]
fn maps_corpus_replays_cleanly() {
    replay("maps");
}

#[test]
fn smaps_corpus_replays_cleanly() {
    replay("smaps");
}

#[test]
fn report_corpus_replays_cleanly() {
    replay("report");
}

/// Every target has a test above and every corpus directory belongs to a target.
#[test]
fn every_target_is_replayed_and_every_corpus_has_a_target() {
    let tested = ["symbolizer", "perfmap", "maps", "smaps", "report"];
    let targets: Vec<&str> = tracer::fuzzing::TARGETS.iter().map(|t| t.name).collect();
    assert_eq!(
        targets, tested,
        "tracer::fuzzing::TARGETS and the replay tests in this file must list the same targets"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    let mut dirs: Vec<String> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("the fuzz corpus {} is missing ({e})", root.display()))
        .map(|e| e.expect("read fuzz/corpus").file_name().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    let mut want: Vec<String> = tested.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    assert_eq!(dirs, want, "directories under {} should be exactly the targets", root.display());
}
