//! What a recording is asked to do, independent of how it was asked (the CLI builds these).
use std::{ffi::OsString, path::PathBuf, time::Duration};

use crate::probe::ebpf::Limits;

#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// Attach to a running process.
    Pid(u32),
    /// Start this command, held until the probes are attached.
    Launch(Vec<OsString>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    /// Collapsed stacks for flamegraph tools, weighed by [`RecordOptions::metric`].
    Folded,
    /// An interactive flamegraph (inferno).
    Svg,
    /// A gzipped pprof heap profile.
    Pprof,
}

#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub target: TargetSpec,
    /// Stop after this long; otherwise at SIGINT/SIGTERM or when the target exits.
    pub duration: Option<Duration>,
    /// Print a text snapshot to stderr this often.
    pub interval: Option<Duration>,
    /// Stacks in the report; 0 for all.
    pub top: usize,
    pub format: Format,
    /// Where the final report goes; stdout when None.
    pub output: Option<PathBuf>,
    /// What every format ranks and weighs stacks by; None: growth with `interval`, else
    /// bytes held, or peak when a launched command exits holding under half its peak.
    pub metric: Option<crate::report::folded::Metric>,
    /// When launching node, add the flags that make it write a perf map of its JIT code.
    pub jit_symbols: bool,
    /// Directories searched for separate debug files before ROOT/usr/lib/debug.
    pub debug_dirs: Vec<PathBuf>,
    /// Only blocks at least this old count as live: separates a leak from a working set.
    pub min_age: Option<Duration>,
    pub limits: Limits,
    /// Which probe backend records.
    pub backend: BackendChoice,
    /// Ask glibc for its own figures (mallinfo2, malloc_info) at the end, next to the map.
    pub malloc_stats: bool,
    /// A launched command's stdout and stderr go to this file (inherited when None).
    pub command_output: Option<PathBuf>,
}

/// `--backend`: eBPF uprobes, ptrace breakpoints, or eBPF with ptrace as the fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    Ebpf,
    Ptrace,
    Auto,
}

/// Parses `30s`, `500ms`, `2m`, `1h` or a bare number of seconds; zero is refused, since a
/// recording of no time answers nothing. (Small enough not to need a crate.)
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration (try 30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("'{text}': the duration must be more than zero"));
    }
    if seconds > 1e9 {
        return Err(format!("'{text}' is too long"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a byte count for `--sample-bytes`: `524288`, `512KiB`, `512k`, `1MiB`, `1M`,
/// `2GiB` (k/M/G and KiB/MiB/GiB are all powers of 1024, as in tcmalloc's settings). The range
/// is 1 byte to 16 GiB, the largest mean the kernel side's fixed-point arithmetic handles.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if unit.starts_with(['.', ',']) {
        return Err(format!("'{text}': use a whole number (512KiB, not 0.5MiB)"));
    }
    let value: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a byte count (try 512KiB, 1MiB, 65536)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("'{text}': unknown unit '{unit}' (use KiB, MiB or GiB)")),
    };
    let max = tracer_common::sampling::MAX_MEAN;
    match value.checked_mul(1 << shift) {
        Some(0) => Err(format!("'{text}': the byte count must be more than zero")),
        Some(bytes) if bytes <= max => Ok(bytes),
        _ => Err(format!("'{text}' is too large (at most 16GiB)")),
    }
}

/// Parses `PATH:ALLOC_OFFSET:FREE_OFFSET` (offsets in hex with `0x`, or decimal): where the
/// in-process sampler's probe sites are, for tests that map a sampler themselves (the hidden
/// `--sampler-sites` of `tracer record`).
pub fn parse_sampler_sites(text: &str) -> Result<crate::probe::ebpf::SamplerSites, String> {
    let offset = |t: &str| match t.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    }
    .map_err(|_| format!("'{text}': '{t}' is not a file offset"));
    let mut parts = text.rsplitn(3, ':');
    let (Some(free), Some(alloc), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(format!("'{text}' is not PATH:ALLOC_OFFSET:FREE_OFFSET"));
    };
    Ok(crate::probe::ebpf::SamplerSites {
        path: path.into(),
        alloc_offset: offset(alloc)?,
        free_offset: offset(free)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_sites() {
        let s = parse_sampler_sites("/proc/1/map_files/7f00-7f10:0x1a0:416").expect("valid");
        assert_eq!(
            (s.path.to_str(), s.alloc_offset, s.free_offset),
            (Some("/proc/1/map_files/7f00-7f10"), 0x1a0, 416)
        );
        assert!(parse_sampler_sites("/x:0x10").is_err());
        assert!(parse_sampler_sites("/x:zz:1").is_err());
    }

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("524288"), Ok(524_288));
        assert_eq!(parse_bytes("512KiB"), Ok(524_288));
        assert_eq!(parse_bytes("512k"), Ok(524_288));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("1M"), Ok(1 << 20));
        assert_eq!(parse_bytes("16GiB"), Ok(16 << 30));
        assert_eq!(parse_bytes("1"), Ok(1));
        for bad in ["0", "0KiB", "17GiB", "abc", "", "1.5MiB", "-1", "10x", "KiB", "99999999999999999999"] {
            assert!(parse_bytes(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "0s", "abc", "10x", "", "-1s", "s"] {
            assert!(parse_duration(bad).is_err(), "{bad} accepted");
        }
    }
}
