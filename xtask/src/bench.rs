//! `cargo xtask bench`: the cost of one malloc+free pair, untraced and under `tracer record`.
//! The bench program times its own loop, so tracer's start-up is not counted as per-call cost.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};

use crate::{build, util};

/// Runs of each kind, alternated so that drift in the machine's speed hits both alike.
const RUNS: usize = 5;
/// Mirrors the default in bench/malloc_free.c, for the report.
const DEFAULT_PAIRS: u64 = 2_000_000;

pub fn bench(pairs: Option<u64>) -> Result<()> {
    let tracer = build::build()?;

    let out_dir = util::target_dir().join("xtask");
    fs::create_dir_all(&out_dir).with_context(|| format!("create {}", out_dir.display()))?;
    let program = out_dir.join("malloc_free");
    util::run(
        util::command("cc")
            .args(["-O2", "-fno-omit-frame-pointer", "-o"])
            .arg(&program)
            .arg("bench/malloc_free.c"),
    )?;

    let bench_command = |traced: bool| {
        let mut cmd = if traced {
            let mut cmd = util::command(&tracer);
            cmd.args(["record", "--format", "json", "-o", "/dev/null", "--"])
                .arg(&program);
            cmd
        } else {
            util::command(&program)
        };
        if let Some(pairs) = pairs {
            cmd.arg(pairs.to_string());
        }
        cmd
    };

    let mut untraced = Vec::new();
    let mut traced = Vec::new();
    for run in 1..=RUNS {
        for (name, is_traced, results) in [
            ("untraced", false, &mut untraced),
            ("traced", true, &mut traced),
        ] {
            let ns = ns_per_pair(&mut bench_command(is_traced))?;
            eprintln!("xtask: run {run}/{RUNS} {name}: {ns:.1} ns per pair");
            results.push(ns);
        }
    }

    let report = report(pairs.unwrap_or(DEFAULT_PAIRS), &untraced, &traced);
    let report_dir = util::target_dir().join("bench");
    fs::create_dir_all(&report_dir).with_context(|| format!("create {}", report_dir.display()))?;
    let report_path = report_dir.join("malloc.md");
    fs::write(&report_path, &report).with_context(|| format!("write {}", report_path.display()))?;
    print!("{report}");
    eprintln!("xtask: wrote {}", report_path.display());
    Ok(())
}

/// Runs the bench (directly or under tracer) and returns the `ns_per_pair=` value it prints.
fn ns_per_pair(cmd: &mut Command) -> Result<f64> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{}`", util::describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}", util::describe(cmd), out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match parse_ns_per_pair(&stdout) {
        Some(ns) => Ok(ns),
        None => bail!(
            "`{}` printed no ns_per_pair=<number> line; its stdout was:\n{stdout}",
            util::describe(cmd)
        ),
    }
}

fn parse_ns_per_pair(stdout: &str) -> Option<f64> {
    stdout
        .lines()
        .find_map(|line| line.trim().strip_prefix("ns_per_pair="))
        .and_then(|value| value.parse().ok())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

fn min_max(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn report(pairs: u64, untraced: &[f64], traced: &[f64]) -> String {
    let row = |name: &str, values: &[f64]| {
        let (min, max) = min_max(values);
        format!("| {name} | {:.1} | {min:.1}–{max:.1} |\n", median(values))
    };
    format!(
        "# malloc(64) + free: cost per pair\n\
         \n\
         {pairs} pairs per run, {runs} runs of each kind, alternating; each run times its own loop \
         (bench/malloc_free.c), so tracer's start-up is not included.\n\
         \n\
         | mode | median ns/pair | min–max ns/pair |\n\
         |---|---:|---:|\n\
         {untraced_row}\
         {traced_row}\
         \n\
         Median ratio traced / untraced: {ratio:.1}×\n",
        runs = untraced.len(),
        untraced_row = row("untraced", untraced),
        traced_row = row("traced (`tracer record --format json`)", traced),
        ratio = median(traced) / median(untraced),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ns_per_pair_among_other_lines() {
        assert_eq!(parse_ns_per_pair("hello\nns_per_pair=15.25\n"), Some(15.25));
        assert_eq!(parse_ns_per_pair("ns_per_pair=abc\n"), None);
        assert_eq!(parse_ns_per_pair(""), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0, 2.0, 4.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn report_shows_medians_ranges_and_ratio() {
        let report = report(10, &[10.0, 12.0, 11.0], &[100.0, 130.0, 110.0]);
        assert!(
            report.contains("| untraced | 11.0 | 10.0–12.0 |"),
            "{report}"
        );
        assert!(report.contains("| 110.0 | 100.0–130.0 |"), "{report}");
        assert!(
            report.contains("Median ratio traced / untraced: 10.0×"),
            "{report}"
        );
    }
}
