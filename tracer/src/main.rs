//! The `tracer` command line: parse, run, map the outcome to an exit status.
use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use tracer::{
    options::{Format, RecordOptions, TargetSpec, parse_duration},
    probe::ebpf::Limits,
};

/// Native memory allocation tracer: which call stacks hold memory that was allocated and
/// not freed.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Record allocations of a running process (--pid) or of a command it starts (-- CMD).
    Record(RecordArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Text,
    Json,
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
    /// Stacks to show, most live bytes first; 0 shows all.
    #[arg(long, default_value_t = 20)]
    top: usize,
    #[arg(long, short = 'f', value_enum, default_value = "text")]
    format: FormatArg,
    /// Write the report here instead of stdout.
    #[arg(long, short = 'o')]
    output: Option<PathBuf>,
    /// Live blocks tracked at once in the kernel; more are counted as dropped.
    #[arg(long, default_value_t = Limits::default().max_live, value_parser = clap::value_parser!(u32).range(1..))]
    max_live: u32,
    /// Distinct stacks kept in the kernel; more are counted as dropped.
    #[arg(long, default_value_t = Limits::default().max_stacks, value_parser = clap::value_parser!(u32).range(1..))]
    max_stacks: u32,
    /// Command to start and trace from its first instruction.
    #[arg(last = true)]
    command: Vec<OsString>,
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
        Ok(RecordOptions {
            target,
            duration: self.duration,
            interval: self.interval,
            top: self.top,
            format: match self.format {
                FormatArg::Text => Format::Text,
                FormatArg::Json => Format::Json,
            },
            output: self.output,
            limits: Limits {
                max_live: self.max_live,
                max_stacks: self.max_stacks,
            },
        })
    }
}

/// Bad input and failures exit with this status.
const EXIT_ERROR: u8 = 2;

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("tracer: {message}");
    ExitCode::from(EXIT_ERROR)
}

fn main() -> ExitCode {
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
    match cli.command {
        Command::Record(args) => {
            let opts = match args.into_options() {
                Ok(opts) => opts,
                Err(message) => return fail(message),
            };
            match tracer::record::record(&opts) {
                Ok(outcome) => match outcome.exit_code {
                    Some(code) => ExitCode::from(code.clamp(0, 255) as u8),
                    None => ExitCode::SUCCESS,
                },
                Err(e) => fail(format!("{e:#}")),
            }
        }
    }
}
