//! `cargo xtask fuzz [TARGET...]`: runs the libFuzzer targets of fuzz/ (cargo-fuzz, nightly,
//! AddressSanitizer, debug assertions and overflow checks on) against the parsers that read
//! files a user controls, each for a while, under a 1 GiB memory ceiling and a per-input time
//! limit. The corpus of each run starts from the saved one (fuzz/corpus/TARGET, which the test
//! suite replays) and from real files of this machine; what the run adds stays in
//! target/fuzz/corpus. Writes target/fuzz/summary.md.
//!
//! Environment (defaults in brackets):
//!   FUZZ_SECONDS [600]   how long each target runs
//!
//! A finding (a panic, a timeout, an input over the memory ceiling) is kept by libFuzzer under
//! target/fuzz/artifacts/TARGET/; the command fails naming it. Fix the bug, then copy the input
//! into fuzz/corpus/TARGET/ (named after what broke) so the replay test keeps it fixed.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{prereqs, util};

/// The targets, as fuzz/fuzz_targets and tracer::fuzzing name them, with the largest input
/// each gets (bigger ones only slow the fuzzer down).
const TARGETS: &[(&str, usize)] = &[
    ("symbolizer", 256 << 10),
    ("perfmap", 64 << 10),
    ("maps", 64 << 10),
    ("smaps", 64 << 10),
    ("report", 64 << 10),
];
/// libFuzzer's -rss_limit_mb and -malloc_limit_mb.
const MEMORY_LIMIT_MB: u64 = 1024;
/// libFuzzer's -timeout: one input taking longer is a hang.
const INPUT_TIMEOUT_S: u64 = 10;

struct Outcome {
    target: &'static str,
    seconds: f64,
    executions: u64,
    corpus_before: usize,
    corpus_after: usize,
    finding: Option<String>,
}

pub fn fuzz(selected: &[String]) -> Result<u8> {
    let seconds: u64 = match std::env::var("FUZZ_SECONDS") {
        Ok(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .with_context(|| format!("FUZZ_SECONDS={v}: expected a positive number of seconds"))?,
        Err(_) => 600,
    };
    for name in selected {
        if !TARGETS.iter().any(|(t, _)| t == name) {
            bail!(
                "no fuzz target {name:?}; the targets are {}",
                TARGETS.iter().map(|t| t.0).collect::<Vec<_>>().join(", ")
            );
        }
    }
    let targets: Vec<(&'static str, usize)> = TARGETS
        .iter()
        .copied()
        .filter(|(t, _)| selected.is_empty() || selected.iter().any(|s| s == t))
        .collect();

    prereqs::prereqs()?;
    ensure_cargo_fuzz()?;
    let root = util::workspace_root();
    util::run(util::command("cargo").args(["+nightly", "fuzz", "build", "--fuzz-dir", "fuzz"]))?;

    let work = util::target_dir().join("fuzz");
    let seeds = work.join("seeds");
    fs::create_dir_all(&seeds).with_context(|| format!("create {}", seeds.display()))?;
    real_seeds(&root, &seeds)?;

    let mut outcomes = Vec::new();
    for &(target, max_len) in &targets {
        let saved = root.join("fuzz/corpus").join(target);
        let corpus = work.join("corpus").join(target);
        let artifacts = work.join("artifacts").join(target);
        for dir in [&corpus, &artifacts] {
            fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        }
        copy_files(&saved, &corpus)?;
        copy_files(&seeds.join(target), &corpus)?;
        let corpus_before = count_files(&corpus);
        eprintln!("xtask: fuzzing {target} for {seconds} s from {corpus_before} inputs");
        let started = Instant::now();
        let out = util::output(
            util::command("cargo")
                .args(["+nightly", "fuzz", "run", "--fuzz-dir", "fuzz", target])
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-rss_limit_mb={MEMORY_LIMIT_MB}"))
                .arg(format!("-malloc_limit_mb={MEMORY_LIMIT_MB}"))
                .arg(format!("-timeout={INPUT_TIMEOUT_S}"))
                .arg(format!("-max_len={max_len}"))
                .arg("-print_final_stats=1")
                .arg(format!("-artifact_prefix={}/", artifacts.display())),
        )?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let log_path = work.join(format!("{target}.log"));
        fs::write(&log_path, &log).with_context(|| format!("write {}", log_path.display()))?;
        let executions = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let finding = if out.status.success() {
            None
        } else {
            let artifact = log
                .lines()
                .rev()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim().to_owned()));
            let cause = log
                .lines()
                .find(|l| l.contains("ERROR: libFuzzer") || l.contains("panicked at") || l.contains("ERROR: AddressSanitizer"))
                .unwrap_or("the fuzzer failed")
                .trim()
                .to_owned();
            Some(format!(
                "{cause}; input: {}; log: {}",
                artifact.as_deref().unwrap_or("(none written)"),
                log_path.display()
            ))
        };
        let outcome = Outcome {
            target,
            seconds: started.elapsed().as_secs_f64(),
            executions,
            corpus_before,
            corpus_after: count_files(&corpus),
            finding,
        };
        eprintln!(
            "xtask: {target}: {} executions in {:.0} s{}",
            outcome.executions,
            outcome.seconds,
            outcome
                .finding
                .as_deref()
                .map(|f| format!("; FOUND: {f}"))
                .unwrap_or_default()
        );
        outcomes.push(outcome);
    }

    let summary = render(&outcomes, seconds);
    let path = work.join("summary.md");
    fs::write(&path, &summary).with_context(|| format!("write {}", path.display()))?;
    print!("{summary}");
    eprintln!("xtask: wrote {}", path.display());
    let found = outcomes.iter().filter(|o| o.finding.is_some()).count();
    if found > 0 {
        eprintln!(
            "xtask: {found} target(s) found a bug; fix it, then copy the input into \
             fuzz/corpus/TARGET/ so that the replay test (tracer/tests/fuzz_corpus.rs) keeps it fixed"
        );
        return Ok(1);
    }
    Ok(0)
}

/// cargo-fuzz, installed with cargo when missing (only this command needs it).
fn ensure_cargo_fuzz() -> Result<()> {
    let present = util::output(util::command("cargo").args(["fuzz", "--version"]))
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !present {
        eprintln!("xtask: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
        util::run_quiet(util::command("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    Ok(())
}

/// Real files of this machine as seeds, one directory per target: ELF files with and without
/// DWARF (compressed, split), this process's maps and smaps, a node perf map, the golden reports.
fn real_seeds(root: &Path, seeds: &Path) -> Result<()> {
    let dir = |t: &str| -> Result<PathBuf> {
        let d = seeds.join(t);
        fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        Ok(d)
    };
    let elf = dir("symbolizer")?;
    for (name, flags) in [
        ("inlined-O2-g", &["-O2", "-g"][..]),
        ("inlined-O0-gdwarf4", &["-O0", "-gdwarf-4"][..]),
        ("inlined-O2-gz", &["-O2", "-g", "-gz=zlib"][..]),
        ("inlined-pie-O1", &["-O1", "-g", "-fPIE", "-pie"][..]),
    ] {
        util::run_quiet(
            util::command("cc")
                .args(flags)
                .args(["-Wl,-z,noseparate-code", "-o"])
                .arg(elf.join(name))
                .arg(root.join("tests/fixtures/inlined.c")),
        )?;
    }
    // A stripped executable of this machine (no DWARF, .dynsym only).
    let _ = fs::copy("/usr/bin/true", elf.join("usr-bin-true"));

    let maps = dir("maps")?;
    let smaps = dir("smaps")?;
    for (src, dst) in [
        ("/proc/self/maps", maps.join("xtask")),
        ("/proc/self/smaps", smaps.join("xtask")),
    ] {
        let text = fs::read(src).with_context(|| format!("read {src}"))?;
        // The first 64 KiB: the fuzzer's input limit.
        fs::write(&dst, &text[..text.len().min(64 << 10)])
            .with_context(|| format!("write {}", dst.display()))?;
    }

    let perf = dir("perfmap")?;
    let out = util::output(util::command("/usr/bin/node").args([
        "--perf-basic-prof-only-functions",
        "--interpreted-frames-native-stack",
        "-e",
        "function f(a){return a.map(x=>x*2)} for(let i=0;i<2000;i++) f([i]); console.log(process.pid)",
    ]))?;
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let map = PathBuf::from(format!("/tmp/perf-{pid}.map"));
    if let Ok(text) = fs::read(&map) {
        fs::write(perf.join("node"), &text[..text.len().min(64 << 10)])
            .with_context(|| format!("write {}", perf.join("node").display()))?;
        let _ = fs::remove_file(&map);
    }

    let report = dir("report")?;
    for name in ["report.json", "before.json", "after.json"] {
        let _ = fs::copy(root.join("tests/golden").join(name), report.join(name));
    }
    Ok(())
}

fn copy_files(from: &Path, to: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_file() {
            let dst = to.join(entry.file_name());
            fs::copy(&path, &dst)
                .with_context(|| format!("copy {} to {}", path.display(), dst.display()))?;
        }
    }
    Ok(())
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|e| e.filter_map(Result::ok).filter(|e| e.path().is_file()).count())
        .unwrap_or(0)
}

fn render(outcomes: &[Outcome], seconds: u64) -> String {
    let mut s = format!(
        "# Fuzzing (cargo xtask fuzz)\n\n{seconds} s per target, libFuzzer with AddressSanitizer, \
         debug assertions and overflow checks; -rss_limit_mb={MEMORY_LIMIT_MB}, \
         -timeout={INPUT_TIMEOUT_S}.\n\n\
         | target | time | executions | per second | corpus (start -> end) | found |\n\
         |---|---|---|---|---|---|\n"
    );
    for o in outcomes {
        s.push_str(&format!(
            "| {} | {:.0} s | {} | {:.0} | {} -> {} | {} |\n",
            o.target,
            o.seconds,
            o.executions,
            o.executions as f64 / o.seconds.max(1e-9),
            o.corpus_before,
            o.corpus_after,
            o.finding.as_deref().unwrap_or("nothing")
        ));
    }
    s
}
