//! `cargo xtask <command>`: installs the prerequisites, then builds, demos, tests or benchmarks
//! tracer. Every command needs root: each one starts by installing what is missing.

mod bench;
mod build;
mod demo;
mod fuzz;
mod prereqs;
mod symbench;
mod test;
mod util;

use std::process::ExitCode;

use anyhow::Result;

const USAGE: &str = "\
usage: cargo xtask <command>

commands (all need root):
  prereqs         install what is missing: rust-src (nightly), bpf-linker 0.10.1, gcc, bpftool,
                  binutils, golang-go
  build           prereqs, then cargo build --release -p tracer; prints the binary's path
  demo [c]        build, then attach to a node service growing outside the V8 heap under load
                  (examples/node-service) and print the report; `demo c`: trace examples/leaky.c
  test            build, then cargo test --release --workspace with TRACER_BIN set
  bench [PAIRS]   build, then measure this tracer's overhead next to bpftrace, heaptrack and
                  valgrind on a C microbench and a node workload (target/bench/overhead.md)
  bench soak      build, then trace a node HTTP service under load with --sample-bytes for
                  SOAK_SECONDS (600): the tracer's RSS and loss counters over time
                  (target/bench/soak.md; fails if RSS grows 10% after minute 1 or a loss counter grows)
  symbench        build, then time naming a node report's frames, cold and warm
                  (target/bench/symbolize.md; fails above 2 s or 500 MB cold)
  fuzz [TARGET..] install cargo-fuzz if missing, then fuzz the parsers (symbolizer, perfmap,
                  maps, smaps, report) for FUZZ_SECONDS (600) each (target/fuzz/summary.md)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = parse(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    if !is_root() {
        eprintln!(
            "xtask: `cargo xtask {}` must run as root (it installs packages and loads BPF programs)",
            args[0]
        );
        return ExitCode::from(2);
    }
    match run(command) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

enum Command {
    Prereqs,
    Build,
    Demo(demo::Demo),
    Test,
    Bench { pairs: Option<u64> },
    Soak,
    Symbench,
    Fuzz { targets: Vec<String> },
}

/// `None` means the arguments are not a command we know: print the usage.
fn parse(args: &[String]) -> Option<Command> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["prereqs"] => Some(Command::Prereqs),
        ["build"] => Some(Command::Build),
        ["demo"] => Some(Command::Demo(demo::Demo::Node)),
        ["demo", "c"] => Some(Command::Demo(demo::Demo::C)),
        ["test"] => Some(Command::Test),
        ["bench"] => Some(Command::Bench { pairs: None }),
        ["symbench"] => Some(Command::Symbench),
        ["bench", "soak"] => Some(Command::Soak),
        ["fuzz", targets @ ..] => Some(Command::Fuzz {
            targets: targets.iter().map(|t| (*t).to_owned()).collect(),
        }),
        ["bench", pairs] => Some(Command::Bench {
            pairs: Some(pairs.parse().ok()?),
        }),
        _ => None,
    }
}

/// Runs one command; returns the exit code to pass through (demo and test forward the
/// status of the program they run).
fn run(command: Command) -> Result<u8> {
    match command {
        Command::Prereqs => prereqs::prereqs().map(|()| 0),
        Command::Build => {
            let tracer = build::build()?;
            println!("{}", tracer.display());
            Ok(0)
        }
        Command::Demo(which) => demo::demo(which),
        Command::Test => test::test(),
        Command::Bench { pairs } => bench::bench(pairs).map(|()| 0),
        Command::Soak => bench::soak::soak().map(|()| 0),
        Command::Symbench => symbench::symbench().map(|()| 0),
        Command::Fuzz { targets } => fuzz::fuzz(&targets),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
