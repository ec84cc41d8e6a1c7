//! `cargo xtask bench`: what tracing costs, side by side with the tools people use today, on
//! a C malloc+free microbenchmark (all freed, and 10% kept), a node workload, and a live node
//! HTTP service the tracer attaches to while it serves (`live`, see below). Contenders:
//! this tracer (full and sampling), a memleak-style and a count-only bpftrace script, counting
//! uprobes without BPF (the kernel's floor), heaptrack and valgrind's massif. Each contender
//! run follows an untraced run of the same workload and size, and ratios are taken pair by
//! pair. Writes target/bench/overhead.md. A benchmark, not a test: no figure fails it.
//!
//! Sizes and selections come from the environment (defaults in brackets):
//!   BENCH_RUNS [5]              runs of each contender on each workload
//!   BENCH_PAIRS [2000000]       malloc+free pairs per C run (`cargo xtask bench PAIRS` too)
//!   BENCH_NODE_ROUNDS [6000]    rounds of bench/node_workload.js (about a second untraced)
//!   BENCH_TOOLS [all]           comma list of: full,full-fp,sampled,sampled-kernel,sampled-ptrace,
//!                               sampled-fp,bt-memleak,bt-count,floor,heaptrack,massif
//!   BENCH_WORKLOADS [all]       comma list of: malloc_free,malloc_keep10,cxx_deep,node,live,
//!                               latency
//!   BENCH_LIVE_REQUESTS [10000] timed requests per live run (2-4 s untraced here)
//!   BENCH_LIVE_CONCURRENCY [8]  the live client's keep-alive connections, one request each
//!   BENCH_LIVE_WARMUP [4000]    requests before attaching, at the same concurrency
//!   BENCH_TRACER [built here]   the tracer binary to measure (e.g. an older build, to compare)
//! `latency` times the tracer itself, alone (see `latency`): starting and stopping it.
//! `live` (see `live` and `live_service`): bench/live_service/server.js, a node HTTP service
//! doing JSON, string work, Buffers and some zlib per request, is started untraced and warmed
//! up; then the contender attaches to its pid and, once attached, a closed-loop client
//! (client.js: fixed request count and concurrency, every answer checked for status and body
//! length) sends the timed requests; then the contender detaches. Figures per request: the
//! service's CPU (utime+stime, where uprobe traps and BPF programs are charged) plus the
//! tracer's own CPU over the same window, and the wall time of the requests, each against an
//! untraced run of its own right before. Its contenders are full, full-fp, sampled,
//! sampled-kernel, sampled-ptrace, sampled-fp and floor; tools that must start the process, or whose attach mode crashes node
//! (heaptrack -p), do not run on it, nor do the bpftrace scripts.
//! The slowest contenders run a fraction of those sizes (see `contenders`); the tables say
//! which size each ran, and per-call figures and ratios do not depend on it.

mod latency;
mod live;
pub mod live_service;
mod probes;
mod run;
pub mod soak;
mod table;

use std::{fmt::Write as _, fs, path::Path, time::Instant};

use anyhow::{Context, Result, bail};
use run::{Env, Tool, Workload};
use table::{Paired, Series, median};

use crate::{build, util};

const SAMPLE_BYTES: &str = "512KiB";

/// A contender: its key for BENCH_TOOLS, its name in the tables, and how it runs.
struct Contender {
    key: &'static str,
    name: &'static str,
    tool: Tool,
    /// Runs 1/n of the pairs of the C workloads, and 1/n of the node rounds, for time's sake.
    c_divisor: u64,
    node_divisor: u64,
    /// Debian package that provides it.
    package: Option<&'static str>,
    /// Runs on the live workload: it attaches to a running process without harming it.
    live: bool,
}

struct Config {
    runs: usize,
    pairs: u64,
    node_rounds: u64,
    tools: Option<Vec<String>>,
    workloads: Option<Vec<String>>,
    tracer: Option<std::path::PathBuf>,
    live: live::Settings,
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => bail!("{name}={v}: expected a positive integer"),
        },
        Err(_) => Ok(None),
    }
}

fn env_list(name: &str) -> Option<Vec<String>> {
    std::env::var(name).ok().map(|v| {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    })
}

impl Config {
    fn from_env(pairs: Option<u64>) -> Result<Config> {
        let pairs = match pairs {
            Some(p) => p,
            None => env_u64("BENCH_PAIRS")?.unwrap_or(2_000_000),
        };
        Ok(Config {
            runs: env_u64("BENCH_RUNS")?.unwrap_or(5) as usize,
            pairs,
            node_rounds: env_u64("BENCH_NODE_ROUNDS")?.unwrap_or(6000),
            tools: env_list("BENCH_TOOLS"),
            workloads: env_list("BENCH_WORKLOADS"),
            tracer: std::env::var_os("BENCH_TRACER").map(Into::into),
            live: live::Settings {
                load: live_service::Load {
                    requests: env_u64("BENCH_LIVE_REQUESTS")?.unwrap_or(10_000),
                    concurrency: u32::try_from(env_u64("BENCH_LIVE_CONCURRENCY")?.unwrap_or(8))
                        .context("BENCH_LIVE_CONCURRENCY: too large")?,
                },
                warmup: env_u64("BENCH_LIVE_WARMUP")?.unwrap_or(4000),
            },
        })
    }
}

fn contenders(bench_dir: &Path) -> Vec<Contender> {
    vec![
        Contender {
            key: "full",
            name: "tracer, full (every call, stacks)",
            tool: Tool::Tracer { sample_bytes: None, unwind: None, backend: None },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "full-fp",
            name: "tracer, full, --unwind fp (frame pointers only)",
            tool: Tool::Tracer { sample_bytes: None, unwind: Some("fp"), backend: None },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "sampled",
            name: "tracer, --sample-bytes 512KiB (in-process sampler)",
            tool: Tool::Tracer {
                sample_bytes: Some(SAMPLE_BYTES),
                unwind: None,
                backend: None,
            },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "sampled-kernel",
            name: "tracer, --sample-bytes 512KiB --backend ebpf (sampled in the kernel)",
            tool: Tool::Tracer {
                sample_bytes: Some(SAMPLE_BYTES),
                unwind: None,
                backend: Some("ebpf"),
            },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "sampled-ptrace",
            name: "tracer, --sample-bytes 512KiB --backend ptrace (in-process sampler, no BPF)",
            tool: Tool::Tracer {
                sample_bytes: Some(SAMPLE_BYTES),
                unwind: None,
                backend: Some("ptrace"),
            },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "sampled-fp",
            name: "tracer, --sample-bytes 512KiB --unwind fp (in-process sampler)",
            tool: Tool::Tracer {
                sample_bytes: Some(SAMPLE_BYTES),
                unwind: Some("fp"),
                backend: None,
            },
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "bt-memleak",
            name: "bpftrace, memleak-style (bench/memleak.bt)",
            tool: Tool::Bpftrace {
                script: bench_dir.join("memleak.bt"),
                probes: &["malloc", "calloc", "realloc", "free"],
            },
            // About 20 us a pair: the single-stepped probe on free's first instruction.
            c_divisor: 20,
            node_divisor: 3,
            live: false,
            package: Some("bpftrace"),
        },
        Contender {
            key: "bt-count",
            name: "bpftrace, count malloc+free (bench/count.bt)",
            tool: Tool::Bpftrace {
                script: bench_dir.join("count.bt"),
                probes: &["malloc", "free"],
            },
            c_divisor: 20,
            node_divisor: 3,
            live: false,
            package: Some("bpftrace"),
        },
        Contender {
            key: "floor",
            name: "uprobes on malloc and free+3, empty BPF program (the floor)",
            tool: Tool::Floor,
            c_divisor: 1,
            node_divisor: 1,
            live: true,
            package: None,
        },
        Contender {
            key: "heaptrack",
            name: "heaptrack (LD_PRELOAD)",
            tool: Tool::Heaptrack,
            c_divisor: 1,
            node_divisor: 1,
            live: false,
            package: Some("heaptrack"),
        },
        Contender {
            key: "massif",
            name: "valgrind --tool=massif",
            tool: Tool::Massif,
            // Valgrind runs node's JIT code about 10-30x slower, after seconds of start-up.
            c_divisor: 1,
            node_divisor: 10,
            live: false,
            package: Some("valgrind"),
        },
    ]
}

pub fn bench(pairs: Option<u64>) -> Result<()> {
    let config = Config::from_env(pairs)?;
    let tracer = match &config.tracer {
        Some(path) => path.clone(),
        None => build::build()?,
    };
    let root = util::workspace_root();
    let bench_dir = root.join("bench");

    let out_dir = util::target_dir().join("xtask");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let malloc_free = out_dir.join("malloc_free");
    util::run(
        util::command("cc")
            .args(["-O2", "-fno-omit-frame-pointer", "-o"])
            .arg(&malloc_free)
            .arg(bench_dir.join("malloc_free.c")),
    )?;

    let deep_new = out_dir.join("deep_new");
    util::run(
        util::command("g++")
            .args(["-O2", "-fno-omit-frame-pointer", "-o"])
            .arg(&deep_new)
            .arg(bench_dir.join("deep_new.cpp")),
    )?;

    let wanted = |key: &str, list: &Option<Vec<String>>| {
        list.as_ref().is_none_or(|l| l.iter().any(|k| k == key))
    };
    let all = contenders(&bench_dir);
    if let Some(list) = &config.tools {
        for key in list {
            if !all.iter().any(|c| c.key == key) {
                bail!("BENCH_TOOLS: unknown tool {key:?}");
            }
        }
    }
    let run_latency = wanted("latency", &config.workloads);
    let run_live = wanted("live", &config.workloads);
    let mut chosen: Vec<&Contender> = all
        .iter()
        .filter(|c| wanted(c.key, &config.tools))
        .collect();
    if config
        .workloads
        .as_ref()
        .is_some_and(|l| l.iter().all(|k| k == "latency"))
    {
        // Only the latency part: no contender runs, nothing to install.
        chosen.clear();
    }

    let workloads: Vec<(Workload, u64)> = [
        (
            Workload {
                key: "malloc_free",
                title: "malloc(64) + free (bench/malloc_free.c)".into(),
                argv: vec![malloc_free.clone().into()],
                metric: "ns_per_pair=",
                size_name: "pairs",
                unit: "ns per pair",
            },
            config.pairs,
        ),
        (
            Workload {
                key: "malloc_keep10",
                title: "malloc(64), 9 in 10 freed (bench/malloc_free.c --keep-every 10)".into(),
                argv: vec![
                    malloc_free.clone().into(),
                    "--keep-every".into(),
                    "10".into(),
                ],
                metric: "ns_per_pair=",
                size_name: "pairs",
                unit: "ns per call pair",
            },
            config.pairs,
        ),
        (
            Workload {
                key: "cxx_deep",
                title: "new char[64] + delete[] 20 frames deep (bench/deep_new.cpp)".into(),
                argv: vec![deep_new.clone().into()],
                metric: "ns_per_pair=",
                size_name: "pairs",
                unit: "ns per pair",
            },
            config.pairs,
        ),
        (
            Workload {
                key: "node",
                title: "node workload (bench/node_workload.js)".into(),
                argv: vec![
                    "/usr/bin/node".into(),
                    bench_dir.join("node_workload.js").into(),
                ],
                metric: "elapsed_ms=",
                size_name: "rounds",
                unit: "ms",
            },
            config.node_rounds,
        ),
    ]
    .into_iter()
    .filter(|(w, _)| wanted(w.key, &config.workloads))
    .collect();
    if let Some(list) = &config.workloads {
        for key in list {
            if key != "latency" && key != "live" && !workloads.iter().any(|(w, _)| w.key == key) {
                bail!("BENCH_WORKLOADS: unknown workload {key:?}");
            }
        }
    }
    // The packaged tools run only on the workloads that start a program.
    let mut packages: Vec<&str> = chosen
        .iter()
        .filter(|_| !workloads.is_empty())
        .filter_map(|c| c.package)
        .collect();
    packages.dedup();
    install(&packages)?;
    let live_chosen: Vec<&Contender> = chosen
        .iter()
        .copied()
        .filter(|c| run_live && c.live)
        .collect();
    let mut live_results: Vec<live::LiveSeries> = live_chosen
        .iter()
        .map(|c| live::LiveSeries::new(c.name))
        .collect();

    let scratch = std::env::temp_dir().join(format!("tracer-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("create {}", scratch.display()))?;
    // A copy, so that a rebuild of the tree while the bench runs does not change what it runs.
    let tracer_copy = out_dir.join("tracer-under-bench");
    fs::copy(&tracer, &tracer_copy).with_context(|| format!("copy {}", tracer.display()))?;
    let env = Env {
        tracer: tracer_copy,
        scratch: scratch.clone(),
    };

    let began = Instant::now();
    // results[workload][contender]; the untraced runs first.
    let mut results: Vec<Vec<Series>> = workloads
        .iter()
        .map(|_| {
            std::iter::once("untraced")
                .chain(chosen.iter().map(|c| c.name))
                .map(|name| Series {
                    contender: name.to_owned(),
                    size: 0,
                    runs: Vec::new(),
                    costs: Vec::new(),
                    notes: Vec::new(),
                })
                .collect()
        })
        .collect();
    // The scratch directory goes whether the runs succeed or not.
    let ran = (|| -> Result<()> {
        for round in 0..config.runs {
            for (w, (workload, full_size)) in workloads.iter().enumerate() {
                // Rotate the order, so that no contender always runs first or last in a round.
                let n = chosen.len();
                for i in 0..n {
                    let c = chosen[(i + round) % n];
                    let divisor = if workload.key == "node" {
                        c.node_divisor
                    } else {
                        c.c_divisor
                    };
                    let size = (*full_size / divisor).max(1);
                    let baseline = run::run_once(&env, &Tool::Untraced, workload, size)
                        .with_context(|| format!("{} untraced", workload.key))?
                        .value;
                    let outcome = run::run_once(&env, &c.tool, workload, size)
                        .with_context(|| format!("{} under {}", workload.key, c.name))?;
                    eprintln!(
                        "xtask: bench {}/{} {} {} ({size}): {} vs {} untraced{}",
                        round + 1,
                        config.runs,
                        workload.key,
                        c.key,
                        table::num(outcome.value),
                        table::num(baseline),
                        outcome
                            .note
                            .as_deref()
                            .map(|n| format!("; {n}"))
                            .unwrap_or_default()
                    );
                    let row = &mut results[w];
                    // The untraced row shows the full-size runs; smaller ones only pair up.
                    if size == *full_size {
                        row[0].size = size;
                        row[0].runs.push(Paired {
                            value: baseline,
                            baseline,
                        });
                    }
                    let s =
                        &mut row[(chosen.iter().position(|x| x.key == c.key).expect("chosen")) + 1];
                    s.size = size;
                    s.runs.push(Paired {
                        value: outcome.value,
                        baseline,
                    });
                    s.costs.extend(outcome.cost);
                    s.notes.extend(outcome.note);
                }
            }
            let n = live_chosen.len();
            for i in 0..n {
                let (c, series) = (
                    live_chosen[(i + round) % n],
                    &mut live_results[(i + round) % n],
                );
                live_pair(&env, &config, c, series, round);
            }
        }
        Ok(())
    })();
    let latency = match ran {
        Ok(()) if run_latency => latency::measure(&env, config.runs, &bench_dir),
        Ok(()) => Ok(Vec::new()),
        Err(e) => Err(e),
    };
    let _ = fs::remove_dir_all(&scratch);
    let latency = latency?;

    let mut report = render(
        &config,
        &workloads,
        &results,
        run_live.then_some(&live_results[..]),
        began.elapsed().as_secs_f64(),
    );
    if !latency.is_empty() {
        let _ = writeln!(
            report,
            "## Starting and stopping\n\n{}\nThe node rows attach to bench/node_hold.js (64 Buffers \
             of 64 KiB held, Buffers and JSON made every 5 ms), record {:.1} s and send SIGINT. \
             Released: no breakpoint left on the allocator functions and free in the target's \
             memory (ptrace: also TracerPid 0); the tracer then still writes its report.\n",
            latency::table(&latency),
            latency::RECORD_FOR.as_secs_f64()
        );
    }
    let report_dir = util::target_dir().join("bench");
    fs::create_dir_all(&report_dir).with_context(|| format!("create {}", report_dir.display()))?;
    let report_path = report_dir.join("overhead.md");
    fs::write(&report_path, &report).with_context(|| format!("write {}", report_path.display()))?;
    print!("{report}");
    eprintln!("xtask: wrote {}", report_path.display());
    Ok(())
}

/// One pair on the live workload: an untraced run, then the contender's. A pair that fails
/// (a request answered wrongly or not at all, or a process that misbehaved) is recorded as
/// failed, with why, and the bench goes on.
fn live_pair(
    env: &run::Env,
    config: &Config,
    c: &Contender,
    series: &mut live::LiveSeries,
    round: usize,
) {
    let pair = live::run_once(env, &Tool::Untraced, &config.live)
        .context("the untraced run")
        .and_then(|untraced| Ok((live::run_once(env, &c.tool, &config.live)?, untraced)));
    let progress = format!("xtask: bench {}/{} live {}", round + 1, config.runs, c.key);
    match pair {
        Ok((traced, untraced)) => {
            eprintln!(
                "{progress}: CPU {} + {} µs and wall {} µs per request vs {} and {} untraced",
                table::num(traced.service_cpu_us),
                table::num(traced.tracer_cpu_us),
                table::num(traced.wall_us),
                table::num(untraced.cpu_us()),
                table::num(untraced.wall_us),
            );
            series.pairs.push((traced, untraced));
        }
        Err(e) => {
            eprintln!("{progress}: FAILED: {e:#}");
            series.failed.push(format!("{e:#}"));
        }
    }
}

/// Installs the Debian packages that provide the chosen contenders, if missing.
fn install(packages: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for &package in packages {
        let out = util::output(util::command("dpkg-query").args(["-W", "-f=${Status}", package]))?;
        if String::from_utf8_lossy(&out.stdout).trim() != "install ok installed" {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing {} (apt-get) for the bench",
        missing.join(", ")
    );
    util::run_quiet(util::command("apt-get").args(["update", "-q"]))?;
    util::run_quiet(
        util::command("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

/// First line of `program --version`, or "?".
fn version(program: &str, arg: &str) -> String {
    util::output(util::command(program).arg(arg))
        .ok()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("?")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| "?".to_owned())
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "?".into());
    // SAFETY: sysconf has no preconditions.
    let cores = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let virt = util::output(util::command("systemd-detect-virt").arg("--vm"))
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty() && v != "none")
        .map(|v| format!(", {v} guest"))
        .unwrap_or_default();
    format!(
        "{cpu}, {cores} cores{virt}, Linux {}, {}, node {}, {}, {}, {}",
        kernel.trim(),
        version("ldd", "--version").replace("ldd ", ""),
        version("/usr/bin/node", "--version"),
        version("bpftrace", "--version"),
        version("heaptrack", "--version"),
        version("valgrind", "--version"),
    )
}

/// The live workload's section of the report.
fn render_live(config: &Config, rows: &[live::LiveSeries]) -> String {
    let live::Settings { load, warmup } = config.live;
    let mut out = String::from(
        "## Live service: the tracer attached to a running node HTTP server \
         (bench/live_service)\n\n",
    );
    if rows.is_empty() {
        out.push_str(
            "No contender of this workload was chosen (full, full-fp, sampled, sampled-fp, \
             floor).\n\n",
        );
        return out;
    }
    out.push_str(&live::table(rows));
    let _ = writeln!(
        out,
        "\nEach run starts the service untraced and sends it {warmup} requests; then the \
         contender attaches to its pid (the tracer: until it says it is recording, its \
         breakpoints are on malloc and free (with the in-process sampler: its probe sites are \
         attached and the allocators' entries jump to it, which it says), and it has loaded the \
         symbol tables it loads right after attaching), and the client sends {} requests over {} keep-alive connections, one \
         request in flight on each, checking every answer's status and body length; then the \
         contender detaches. CPU per request: the service's utime+stime (uprobe traps and BPF \
         programs are charged to it) plus the tracer's own, over the window of the requests; \
         wall: the client's time from its first request to its last answer. Each traced run is \
         paired with the untraced run right before it, on a fresh service; a pair with any \
         failed request is counted as failed and left out of the figures. The client runs on \
         the same machine, so the tracer's CPU also slows the client, which shows in the wall \
         figures.\n",
        load.requests, load.concurrency
    );
    out.push_str(&live::notes(rows));
    out.push_str(
        "- heaptrack is not in this table: its attach mode (`heaptrack -p`, gdb injection) \
         crashed a live node 20 HTTP server with SIGSEGV in 2 of 2 tries on this machine, and \
         its LD_PRELOAD mode needs a restart. valgrind cannot attach at all; the bpftrace \
         scripts single-step free's first instruction (see above) and are left out.\n\n",
    );
    out
}

fn find<'a>(row: &'a [Series], prefix: &str) -> Option<&'a Series> {
    row.iter()
        .find(|s| s.contender.starts_with(prefix) && !s.runs.is_empty())
}

fn render(
    config: &Config,
    workloads: &[(Workload, u64)],
    results: &[Vec<Series>],
    live: Option<&[live::LiveSeries]>,
    seconds: f64,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Overhead: this tracer next to bpftrace, heaptrack and valgrind\n"
    );
    let _ = writeln!(out, "Machine: {}.\n", machine());
    if workloads.is_empty() && live.is_none() {
        return out;
    }
    let _ = writeln!(
        out,
        "{} runs of each contender per workload; every contender run follows an untraced run of \
         the same workload and size, and each ratio is taken against that run. Workloads wait \
         until the tool is attached, then time their own work (start-up, attaching and reports \
         are not in the figures). Slow contenders run a smaller size; per-call and ratio figures \
         do not depend on it. Bench time {:.0} s.\n",
        config.runs, seconds
    );
    for ((workload, _), row) in workloads.iter().zip(results) {
        let _ = writeln!(out, "## {}\n", workload.title);
        let present: Vec<Series> = row.iter().filter(|s| !s.runs.is_empty()).cloned().collect();
        out.push_str(&table::workload_table(
            &present,
            workload.size_name,
            workload.unit,
        ));
        let notes: Vec<String> = present
            .iter()
            .filter_map(|s| s.notes.first().map(|n| format!("- {}: {n}", s.contender)))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(
                out,
                "\nWhat each tool counted (first run):\n\n{}",
                notes.join("\n")
            );
        }
        out.push('\n');
    }
    if let Some(rows) = live {
        out.push_str(&render_live(config, rows));
    }

    let mut cost_rows = Vec::new();
    for ((workload, _), row) in workloads.iter().zip(results) {
        for s in row.iter().filter(|s| !s.costs.is_empty()) {
            cost_rows.push((workload.key, s));
        }
    }
    if !cost_rows.is_empty() {
        let _ = writeln!(out, "## The tracer's own cost\n");
        out.push_str(&table::cost_table(&cost_rows));
        let _ = writeln!(
            out,
            "\nCPU while recording: the tracer's user+system time from the moment it said it was \
             recording to the end of the workload, over the wall time of that span; attaching \
             (loading and verifying the BPF programs, reading libc and the target's maps, and \
             loading the symbol tables of the target's modules, which the tracer does on a \
             thread of its own right after; the workload starts once that thread is done) is \
             shown apart. RSS: VmHWM when the workload ended, and the tracer's peak over the \
             whole run (its rusage), which includes naming the frames for the report.\n"
        );
    }

    let _ = writeln!(out, "## Targets\n");
    let by_key = |key: &str| {
        workloads
            .iter()
            .position(|(w, _)| w.key == key)
            .map(|i| &results[i][..])
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some(row) = by_key("malloc_free") {
        if let Some(full) = find(row, "tracer, full") {
            let ns = median(&full.values());
            let _ = writeln!(
                out,
                "- Full mode under 3 µs per malloc+free pair: {} ns — {}.",
                table::num(ns),
                verdict(ns < 3000.0)
            );
        }
        if let Some(sampled) = find(row, "tracer, --sample") {
            let _ = writeln!(
                out,
                "- An unsampled malloc+free pair in sampling mode costs {} ns more than untraced \
                 (median of the per-run differences; at 64 bytes a call, one in about 8000 is sampled).",
                table::num(median(&sampled.added()))
            );
        }
    }
    // The C workloads' untraced pair takes a few nanoseconds, so their ratios mostly measure
    // that noise: they compare by time added per pair. node compares by slowdown.
    for (key, by_ratio) in [("malloc_free", false), ("node", true)] {
        let Some(row) = by_key(key) else { continue };
        let Some(sampled) = find(row, "tracer, --sample") else {
            continue;
        };
        let figure = |s: &Series| {
            if by_ratio {
                median(&s.ratios())
            } else {
                median(&s.added())
            }
        };
        let show = |v: f64| {
            if by_ratio {
                format!("{v:.2}× untraced")
            } else {
                format!("{} ns added per pair", table::num(v))
            }
        };
        let ours = figure(sampled);
        for (prefix, what) in [
            ("bpftrace, count", "the count-only bpftrace script"),
            (
                "uprobes on",
                "the kernel's floor (uprobes on malloc and free+3 running an empty BPF program)",
            ),
        ] {
            if let Some(other) = find(row, prefix) {
                let theirs = figure(other);
                let _ = writeln!(
                    out,
                    "- {key}: sampling at 512 KiB within 20% of {what}: {} vs {} — {}.",
                    show(ours),
                    show(theirs),
                    verdict(ours <= 1.2 * theirs)
                );
            }
        }
    }
    // Issue 11: what walking the unwind rows costs over frame pointers alone.
    if let Some(row) = by_key("cxx_deep") {
        if let (Some(auto), Some(fp)) = (find(row, "tracer, full (every"), find(row, "tracer, full, --unwind fp")) {
            let (a, f) = (median(&auto.added()), median(&fp.added()));
            let _ = writeln!(
                out,
                "- cxx_deep: full mode walking the unwind rows adds at most 0.5 µs per pair over                  frame pointers: {} vs {} ns added per pair, {} ns more — {}.",
                table::num(a),
                table::num(f),
                table::num(a - f),
                verdict(a - f <= 500.0)
            );
        }
    }
    if let Some(row) = by_key("node") {
        for (auto_name, fp_name, mode) in [
            ("tracer, full (every", "tracer, full, --unwind fp", "full"),
            ("tracer, --sample-bytes 512KiB", "tracer, --sample-bytes 512KiB --unwind fp", "sampling"),
        ] {
            let auto = row.iter().find(|s| s.contender.starts_with(auto_name) && !s.contender.contains("--unwind") && !s.runs.is_empty());
            if let (Some(auto), Some(fp)) = (auto, find(row, fp_name)) {
                let (a, f) = (median(&auto.ratios()), median(&fp.ratios()));
                let _ = writeln!(
                    out,
                    "- node, {mode}: the unwind rows slow node at most 10% more than frame pointers:                      {a:.2}× vs {f:.2}× untraced, {:+.1}% — {}.",
                    (a / f - 1.0) * 100.0,
                    verdict(a <= 1.10 * f)
                );
            }
        }
    }
    if let Some(sampled) = live
        .into_iter()
        .flatten()
        .find(|s| s.contender == "tracer, --sample-bytes 512KiB" && !s.pairs.is_empty())
    {
        let ratio = median(&sampled.cpu().ratios());
        let _ = writeln!(
            out,
            "- live: sampling at 512 KiB costs the service at most 1.10× its untraced CPU per \
             request, the tracer's own CPU included (issue 13, for the in-process sampler): \
             {ratio:.2}× — {}.",
            verdict(ratio <= 1.10)
        );
    }
    if let Some(row) = by_key("node") {
        if let (Some(full), Some(memleak)) =
            (find(row, "tracer, full"), find(row, "bpftrace, memleak"))
        {
            let (f, m) = (median(&full.ratios()), median(&memleak.ratios()));
            let _ = writeln!(
                out,
                "- node: full mode's slowdown under half the memleak-style script's: {f:.2}× vs \
                 {m:.2}× untraced, time added {:.0}% vs {:.0}% — {}.",
                (f - 1.0) * 100.0,
                (m - 1.0) * 100.0,
                verdict(f - 1.0 < (m - 1.0) / 2.0)
            );
        }
        for s in row.iter().filter(|s| !s.costs.is_empty()) {
            let cpu = median(&s.costs.iter().map(|c| c.cpu_percent).collect::<Vec<_>>());
            let peak = s.costs.iter().map(|c| c.rss_peak_kib).max().unwrap_or(0) as f64 / 1024.0;
            let before = s
                .costs
                .iter()
                .map(|c| c.rss_before_report_kib)
                .max()
                .unwrap_or(0) as f64
                / 1024.0;
            let _ = writeln!(
                out,
                "- node, {}: CPU {cpu:.1}% of a core while recording — {}; RSS {before:.1} MiB \
                 before the report, {peak:.1} MiB with it — {} (under 100 MB).",
                s.contender,
                verdict(cpu < 5.0),
                verdict(peak * 1024.0 * 1024.0 < 100e6)
            );
        }
    }
    out
}
