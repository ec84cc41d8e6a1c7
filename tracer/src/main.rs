//! The `tracer` command line: parse, run, map the outcome to an exit status.
use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tracer::{
    diff::{DiffFormat, DiffOptions},
    options::{BackendChoice, Format, RecordOptions, TargetSpec, parse_bytes, parse_duration},
    probe::ebpf::Limits,
    report::folded::Metric,
    top::TopOptions,
};

/// Native memory allocation tracer: which call stacks hold memory that was allocated and
/// not freed.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Print long error messages (a BPF verifier log) whole on stderr, instead of their first
    /// line and the name of a file that holds them.
    #[arg(long, short = 'v', global = true)]
    verbose: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Record allocations of a running process (--pid) or of a command it starts (-- CMD).
    Record(RecordArgs),
    /// Live view in the terminal: the stacks holding the most memory, refreshed every second
    /// (q quits and detaches; the target runs on).
    Top(TopArgs),
    /// Print the memory map of a running process by owner class (V8 heap, malloc, stacks, code...).
    Map(MapArgs),
    /// Compare two JSON reports: which stacks grew and which shrank.
    Diff(DiffArgs),
    /// Render a saved JSON report as text, folded stacks, an SVG flamegraph or pprof.
    Report(ReportArgs),
    /// Ask glibc inside a running process how much of its heap is in use and how much is
    /// free memory it keeps (calls mallinfo2 and malloc_info at a safe moment).
    MallocStats(MallocStatsArgs),
    /// Debugging aid for tests (hidden): injects the in-process sampler into --pid, holds it
    /// for --hold seconds, removes it. A separate process that a test can kill.
    #[command(hide = true)]
    InjectTest(InjectTestArgs),
}

#[derive(clap::Args)]
struct InjectTestArgs {
    #[arg(long)]
    pid: i32,
    /// Mean bytes between samples.
    #[arg(long, default_value_t = 4096)]
    mean: u64,
    /// Seconds to keep the sampler in before removing it.
    #[arg(long, default_value_t = 1.0)]
    hold: f64,
    /// Also open the ring shared with the tracer (the ptrace fallback's install).
    #[arg(long)]
    ring: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReportFormatArg {
    Text,
    Json,
    Folded,
    Svg,
    Pprof,
}

impl From<ReportFormatArg> for Format {
    fn from(f: ReportFormatArg) -> Format {
        match f {
            ReportFormatArg::Text => Format::Text,
            ReportFormatArg::Json => Format::Json,
            ReportFormatArg::Folded => Format::Folded,
            ReportFormatArg::Svg => Format::Svg,
            ReportFormatArg::Pprof => Format::Pprof,
        }
    }
}

/// `--metric`: what every format ranks and weighs stacks by.
#[derive(Clone, Copy, ValueEnum)]
enum MetricArg {
    /// Bytes held: live bytes of malloc stacks, resident bytes of mmap/brk stacks.
    Held,
    /// Bytes allocated and not freed (committed bytes of mmap/brk stacks).
    Live,
    /// Bytes in RAM (for malloc stacks, their live bytes).
    Resident,
    /// The most live bytes each stack held at once.
    Peak,
    /// Bytes allocated while recording, freed or not.
    Allocated,
    /// Live bytes at the last --interval snapshot less at the first.
    Growth,
}

impl From<MetricArg> for Metric {
    fn from(m: MetricArg) -> Metric {
        match m {
            MetricArg::Live => Metric::Live,
            MetricArg::Allocated => Metric::Allocated,
            MetricArg::Growth => Metric::Growth,
            MetricArg::Held => Metric::Held,
            MetricArg::Resident => Metric::Resident,
            MetricArg::Peak => Metric::Peak,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum DiffFormatArg {
    Text,
    Folded,
    Svg,
}

/// `tracer diff BEFORE.json AFTER.json`
#[derive(clap::Args)]
struct DiffArgs {
    /// The earlier report (`tracer record --format json`).
    before: PathBuf,
    /// The later report.
    after: PathBuf,
    /// text: stacks that grew and shrank; folded: `stack BEFORE AFTER` lines; svg: a
    /// differential flamegraph (growth red, shrink blue).
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: DiffFormatArg,
    /// What stacks are compared by [default: held].
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
}

/// `tracer report FILE.json`
#[derive(clap::Args)]
struct ReportArgs {
    /// A report saved with `tracer record --format json`.
    input: PathBuf,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: ReportFormatArg,
    /// What stacks are ranked and weighed by [default: what the report was ranked by].
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Name the native frames again from this host's module files (e.g. after installing
    /// debug files) instead of keeping the names in the report.
    #[arg(long)]
    resymbolize: bool,
    /// Look for separate debug files here too (implies --resymbolize); repeatable.
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
}

#[derive(clap::Args)]
struct MapArgs {
    /// Process to look at.
    #[arg(long, short = 'p')]
    pid: u32,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: FormatArg,
}

#[derive(clap::Args)]
struct RecordArgs {
    /// Process to attach to.
    #[arg(long, short = 'p', conflicts_with = "command")]
    pid: Option<u32>,
    /// Stop after this long (e.g. 30s, 500ms, 2m); otherwise at Ctrl-C or when the target exits.
    #[arg(long, short = 'd', value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Print a snapshot to stderr this often.
    #[arg(long, short = 'i', value_parser = parse_duration)]
    interval: Option<Duration>,
    /// Stacks to show, first by --metric; 0 shows all [default: 20 for text and json, all
    /// for folded, svg and pprof].
    #[arg(long)]
    top: Option<usize>,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: ReportFormatArg,
    /// What every format ranks and weighs stacks by [default: growth with --interval, else
    /// held; peak when a launched command exits holding under half of its peak].
    #[arg(long, value_enum)]
    metric: Option<MetricArg>,
    /// When launching node, do not add --perf-basic-prof-only-functions
    /// --interpreted-frames-native-stack (which name JavaScript frames).
    #[arg(long)]
    no_jit_symbols: bool,
    /// Look for separate debug files (.build-id/xx/yyyy.debug, .gnu_debuglink names) here
    /// too, before /usr/lib/debug; repeatable.
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
    /// Write the report here instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Count as live only blocks at least this old when recording ends (e.g. 10s).
    #[arg(long, value_parser = parse_duration)]
    min_age: Option<Duration>,
    /// Live blocks tracked at once in the kernel; more are counted as dropped.
    #[arg(long, default_value_t = Limits::default().max_live, value_parser = clap::value_parser!(u32).range(1..))]
    max_live: u32,
    /// Distinct stacks kept in the kernel; more are counted as dropped.
    #[arg(long, default_value_t = Limits::default().max_stacks, value_parser = clap::value_parser!(u32).range(1..))]
    max_stacks: u32,
    /// Sample one allocation per N bytes on average (e.g. 512KiB) instead of recording every
    /// call; the report then shows estimates.
    #[arg(long, value_parser = parse_bytes, value_name = "N")]
    sample_bytes: Option<u64>,
    /// Probe backend: ebpf (uprobes), ptrace (breakpoints; where BPF is not allowed, far
    /// slower), or auto (eBPF, falling back to ptrace when BPF cannot be loaded or attached).
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// How stacks are walked: auto (unwind tables from .eh_frame where a module has them,
    /// frame pointers elsewhere), dwarf (unwind tables only), or fp (frame pointers only).
    #[arg(long, value_enum, default_value = "auto")]
    unwind: UnwindArg,
    /// At the end, also ask glibc's allocator for its own figures (mallinfo2, malloc_info),
    /// called inside the stopped target as `tracer malloc-stats` does.
    #[arg(long)]
    malloc_stats: bool,
    /// For tests: with --sample-bytes, probe the sites of an in-process sampler the target
    /// mapped itself (PATH:ALLOC_OFFSET:FREE_OFFSET) instead of its C library's allocators.
    #[arg(long, hide = true, value_parser = tracer::options::parse_sampler_sites, requires = "sample_bytes")]
    sampler_sites: Option<tracer::probe::ebpf::SamplerSites>,
    /// Command to start and trace from its first instruction.
    #[arg(last = true)]
    command: Vec<OsString>,
}

/// `tracer top --pid PID` or `tracer top -- CMD ARGS...`
#[derive(clap::Args)]
struct TopArgs {
    /// Process to attach to.
    #[arg(long, short = 'p', conflicts_with = "command")]
    pid: Option<u32>,
    /// With a command: where its stdout and stderr go [default: /tmp/tracer-top-PID.out].
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Sample one allocation per N bytes on average (e.g. 512KiB); figures become estimates.
    #[arg(long, value_parser = parse_bytes, value_name = "N")]
    sample_bytes: Option<u64>,
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// When launching node, do not add the flags that name its JavaScript frames.
    #[arg(long)]
    no_jit_symbols: bool,
    /// Look for separate debug files here too; repeatable.
    #[arg(long, value_name = "DIR")]
    debug_dir: Vec<PathBuf>,
    /// Command to start and watch from its first instruction.
    #[arg(last = true)]
    command: Vec<OsString>,
}

impl TopArgs {
    fn into_options(self) -> Result<TopOptions, String> {
        let target = match (self.pid, self.command.is_empty()) {
            (Some(0), _) => return Err("--pid 0 is not a process".into()),
            (Some(pid), true) => TargetSpec::Pid(pid),
            (None, false) => TargetSpec::Launch(self.command),
            (None, true) => return Err("say what to watch: --pid PID, or -- CMD [ARGS...]".into()),
            (Some(_), false) => return Err("give --pid or a command, not both".into()),
        };
        if self.output.is_some() && matches!(target, TargetSpec::Pid(_)) {
            return Err("--output is where a launched command's output goes; with --pid there is none".into());
        }
        Ok(TopOptions {
            target,
            command_output: self.output,
            backend: self.backend.into(),
            limits: Limits {
                sample_bytes: self.sample_bytes,
                ..Limits::default()
            },
            jit_symbols: !self.no_jit_symbols,
            debug_dirs: self.debug_dir,
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum UnwindArg {
    Auto,
    Dwarf,
    Fp,
}

impl From<UnwindArg> for tracer::unwind::UnwindMode {
    fn from(u: UnwindArg) -> Self {
        match u {
            UnwindArg::Auto => Self::Auto,
            UnwindArg::Dwarf => Self::Dwarf,
            UnwindArg::Fp => Self::Fp,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendArg {
    Ebpf,
    Ptrace,
    Auto,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> BackendChoice {
        match b {
            BackendArg::Ebpf => BackendChoice::Ebpf,
            BackendArg::Ptrace => BackendChoice::Ptrace,
            BackendArg::Auto => BackendChoice::Auto,
        }
    }
}

/// `tracer malloc-stats --pid PID`
#[derive(clap::Args)]
struct MallocStatsArgs {
    /// Process to inspect.
    #[arg(long, short = 'p')]
    pid: u32,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: FormatArg,
    /// Give up if no safe moment (no thread inside the allocator) is found within this long.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    wait: Duration,
}

impl RecordArgs {
    fn into_options(self) -> Result<RecordOptions, String> {
        let target = match (self.pid, self.command.is_empty()) {
            (Some(0), _) => return Err("--pid 0 is not a process".into()),
            (Some(pid), true) => TargetSpec::Pid(pid),
            (None, false) => TargetSpec::Launch(self.command),
            (None, true) => return Err("say what to trace: --pid PID, or -- CMD [ARGS...]".into()),
            (Some(_), false) => return Err("give --pid or a command, not both".into()),
        };
        if self.malloc_stats && matches!(target, TargetSpec::Launch(_)) {
            // A launched command is the tracer's child, waited for by another of its threads,
            // which would take the ptrace stops malloc-stats needs.
            return Err("--malloc-stats needs --pid (it cannot inspect a command the tracer launched)".into());
        }
        Ok(RecordOptions {
            target,
            duration: self.duration,
            interval: self.interval,
            // Flamegraphs and profiles are about the whole picture; a terminal wants the top.
            top: self.top.unwrap_or(match self.format {
                ReportFormatArg::Text | ReportFormatArg::Json => 20,
                _ => 0,
            }),
            format: self.format.into(),
            output: self.output,
            metric: self.metric.map(Metric::from),
            jit_symbols: !self.no_jit_symbols,
            debug_dirs: self.debug_dir,
            min_age: self.min_age,
            limits: Limits {
                max_live: self.max_live,
                max_stacks: self.max_stacks,
                sample_bytes: self.sample_bytes,
                unwind: self.unwind.into(),
                v8: None,
                sampler_sites: self.sampler_sites,
            },
            backend: self.backend.into(),
            malloc_stats: self.malloc_stats,
            command_output: None,
        })
    }
}

/// Bad input and failures exit with this status.
const EXIT_ERROR: u8 = 2;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    tracer::diag::warn(message);
    ExitCode::from(EXIT_ERROR)
}

/// `tracer inject-test`: install, hold, remove, saying each step on stdout.
fn inject_test(args: &InjectTestArgs) -> ExitCode {
    use tracer::inject::inject::Injected;
    // Test only: TRACER_INJECT_PAUSE_AT=N (or N:entry) stops the Nth system call run in the
    // target at its exit (entry) and waits there, for a test to kill this tracer.
    if let Ok(at) = std::env::var("TRACER_INJECT_PAUSE_AT") {
        let (n, entry) = match at.strip_suffix(":entry") {
            Some(n) => (n, true),
            None => (at.as_str(), false),
        };
        match n.parse() {
            Ok(n) => tracer::inject::stub::pause_at(n, entry),
            Err(_) => return fail(format!("TRACER_INJECT_PAUSE_AT={at}: not N or N:entry")),
        }
    }
    let installed = if args.ring {
        Injected::install_ring(args.pid, args.mean).map(|(i, ring)| (i, Some(ring)))
    } else {
        Injected::install(args.pid, args.mean).map(|i| (i, None))
    };
    let (injected, _ring) = match installed {
        Ok(i) => i,
        Err(e) => return fail(format!("{:#}", anyhow::Error::from(e))),
    };
    println!(
        "installed base={:#x} control={:#x} reused={} threads={} install_us={}",
        injected.base(),
        injected.control(),
        injected.report.reused,
        injected.report.threads,
        injected.report.elapsed.as_micros()
    );
    std::thread::sleep(Duration::from_secs_f64(args.hold));
    match injected.remove() {
        Ok(took) => {
            println!("removed remove_us={}", took.as_micros());
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("{:#}", anyhow::Error::from(e))),
    }
}

fn main() -> ExitCode {
    tracer::diag::ensure_standard_fds();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help, --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line: clap's first, without its usage block.
            let rendered = e.render().to_string();
            let first = rendered.lines().next().unwrap_or("bad arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    tracer::diag::set_verbose(cli.verbose);
    match cli.command {
        Command::Diff(args) => {
            let opts = DiffOptions {
                before: args.before,
                after: args.after,
                format: match args.format {
                    DiffFormatArg::Text => DiffFormat::Text,
                    DiffFormatArg::Folded => DiffFormat::Folded,
                    DiffFormatArg::Svg => DiffFormat::Svg,
                },
                metric: args.metric.map_or(Metric::Held, Metric::from),
                output: args.output,
            };
            match tracer::record::diff(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("{e:#}")),
            }
        }
        Command::Report(args) => {
            let written = tracer::record::convert(
                &args.input,
                args.format.into(),
                args.metric.map(Metric::from),
                args.output.as_deref(),
                (args.resymbolize || !args.debug_dir.is_empty()).then_some(args.debug_dir.as_slice()),
            );
            match written {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("{e:#}")),
            }
        }
        Command::Map(args) => match tracer::record::map(args.pid) {
            Ok(classes) => {
                let mut out = std::io::stdout().lock();
                let written = match args.format {
                    FormatArg::Text => tracer::report::text::write_memory_map(&classes, None, &mut out),
                    FormatArg::Json => serde_json::to_writer_pretty(&mut out, &classes)
                        .map_err(std::io::Error::other)
                        .and_then(|()| std::io::Write::write_all(&mut out, b"\n")),
                };
                match written {
                    Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(e),
                    _ => ExitCode::SUCCESS,
                }
            }
            Err(e) => fail(format!("{e:#}")),
        },
        Command::MallocStats(args) => {
            let run = || -> anyhow::Result<()> {
                let info = tracer::target::inspect(args.pid)?;
                let stats = tracer::mallocstats::inspect(args.pid, args.wait)?;
                let mut out = std::io::stdout().lock();
                match args.format {
                    FormatArg::Text => tracer::mallocstats::write_text(&stats, &info.command, &mut out)?,
                    FormatArg::Json => {
                        serde_json::to_writer_pretty(&mut out, &stats)?;
                        std::io::Write::write_all(&mut out, b"\n")?;
                    }
                }
                Ok(())
            };
            match run() {
                Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) => {
                    ExitCode::SUCCESS
                }
                Err(e) => fail(format!("{e:#}")),
                Ok(()) => ExitCode::SUCCESS,
            }
        }
        Command::InjectTest(args) => inject_test(&args),
        Command::Top(args) => {
            let opts = match args.into_options() {
                Ok(opts) => opts,
                Err(message) => return fail(message),
            };
            match tracer::top::top(&opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(format!("{e:#}")),
            }
        }
        Command::Record(args) => {
            let opts = match args.into_options() {
                Ok(opts) => opts,
                Err(message) => return fail(message),
            };
            match tracer::record::record(&opts) {
                Ok(outcome) => match outcome.exit_code.map(u8::try_from) {
                    Some(Ok(code)) => ExitCode::from(code),
                    // A launched command whose status could not be learned did not succeed
                    // as far as anyone can tell.
                    Some(Err(_)) => fail("the command's exit status is unknown (it was not seen to exit)"),
                    None => ExitCode::SUCCESS,
                },
                Err(e) => fail(format!("{e:#}")),
            }
        }
    }
}
