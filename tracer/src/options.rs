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
    pub limits: Limits,
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

#[cfg(test)]
mod tests {
    use super::*;

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
