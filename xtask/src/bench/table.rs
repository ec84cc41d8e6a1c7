//! The bench's arithmetic and its Markdown: medians and ranges of runs, ratios taken pair by
//! pair (each contender run against the untraced run of the same round and size), and the
//! tables written to target/bench/.

use std::fmt::Write as _;

/// One run of a contender, next to the untraced run it is compared with.
#[derive(Clone, Debug, PartialEq)]
pub struct Paired {
    /// The workload's own figure (ns per pair, or ms for the rounds).
    pub value: f64,
    /// The same figure, untraced, from the same round at the same size.
    pub baseline: f64,
}

/// What a tracer run cost the tracer itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OwnCost {
    /// CPU time of the tracer while the workload ran (after attaching, before the report),
    /// per wall-clock time over the same span, in % of one core.
    pub cpu_percent: f64,
    /// CPU time and wall time from the tracer's start until it was attached.
    pub attach_cpu_seconds: f64,
    pub attach_seconds: f64,
    /// Peak RSS (VmHWM) when the workload ended, before the report.
    pub rss_before_report_kib: u64,
    /// Peak RSS over the whole run, report included (the tracer's own rusage).
    pub rss_peak_kib: u64,
}

/// Every run of one contender on one workload.
#[derive(Clone, Debug)]
pub struct Series {
    pub contender: String,
    /// Pairs or rounds per run.
    pub size: u64,
    pub runs: Vec<Paired>,
    pub costs: Vec<OwnCost>,
    /// What the contender reported about its own run, as a sanity check (e.g. "2010000 mallocs").
    pub notes: Vec<String>,
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[mid],
        _ => (sorted[mid - 1] + sorted[mid]) / 2.0,
    }
}

pub fn min_max(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

impl Series {
    pub fn values(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.value).collect()
    }

    pub fn ratios(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.value / r.baseline).collect()
    }

    /// What the contender adds to the workload's figure, run by run.
    pub fn added(&self) -> Vec<f64> {
        self.runs.iter().map(|r| r.value - r.baseline).collect()
    }
}

/// Formats with a precision that suits the magnitude: 7.2, 215, 2099.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "–".to_owned()
    } else if v.abs() < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// `| tool | size | median | min–max | × untraced | added |` for one workload.
pub fn workload_table(series: &[Series], size_name: &str, unit: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| tool | {size_name} | {unit}, median | min–max | × untraced, median (min–max) | added {unit}, median |"
    );
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for s in series {
        let values = s.values();
        let (lo, hi) = min_max(&values);
        let ratios = s.ratios();
        let (rlo, rhi) = min_max(&ratios);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}–{} | {:.2} ({:.2}–{:.2}) | {} |",
            s.contender,
            s.size,
            num(median(&values)),
            num(lo),
            num(hi),
            median(&ratios),
            rlo,
            rhi,
            num(median(&s.added())),
        );
    }
    out
}

/// The tracer's own CPU and memory, for the series that carry them.
pub fn cost_table(rows: &[(&str, &Series)]) -> String {
    let mut out = String::new();
    out.push_str(
        "| workload | mode | CPU while recording, % of a core, median (min–max) | attaching: CPU s / wall s, median | peak RSS before the report, MiB (max) | peak RSS with the report, MiB (max) |\n",
    );
    out.push_str("|---|---|---:|---:|---:|---:|\n");
    for (workload, s) in rows {
        if s.costs.is_empty() {
            continue;
        }
        let cpu: Vec<f64> = s.costs.iter().map(|c| c.cpu_percent).collect();
        let (lo, hi) = min_max(&cpu);
        let attach_cpu = median(
            &s.costs
                .iter()
                .map(|c| c.attach_cpu_seconds)
                .collect::<Vec<_>>(),
        );
        let attach_wall = median(&s.costs.iter().map(|c| c.attach_seconds).collect::<Vec<_>>());
        let mib = |kib: u64| kib as f64 / 1024.0;
        let before = s
            .costs
            .iter()
            .map(|c| c.rss_before_report_kib)
            .max()
            .unwrap_or(0);
        let peak = s.costs.iter().map(|c| c.rss_peak_kib).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "| {workload} | {} | {:.1} ({:.1}–{:.1}) | {attach_cpu:.2} / {attach_wall:.2} | {:.1} | {:.1} |",
            s.contender,
            median(&cpu),
            lo,
            hi,
            mib(before),
            mib(peak)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(name: &str, pairs: &[(f64, f64)]) -> Series {
        Series {
            contender: name.into(),
            size: 1000,
            runs: pairs
                .iter()
                .map(|&(value, baseline)| Paired { value, baseline })
                .collect(),
            costs: Vec::new(),
            notes: Vec::new(),
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[5.0, 1.0, 3.0, 2.0, 4.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn ratios_are_taken_pair_by_pair() {
        // Baseline drifts 10 -> 20; the contender is always 10x its own round's baseline.
        let s = series("x", &[(100.0, 10.0), (150.0, 15.0), (200.0, 20.0)]);
        assert_eq!(s.ratios(), vec![10.0, 10.0, 10.0]);
        assert_eq!(median(&s.added()), 135.0);
    }

    #[test]
    fn table_rows_show_medians_ranges_and_ratios() {
        let table = workload_table(
            &[
                series("untraced", &[(10.0, 10.0), (12.0, 12.0), (11.0, 11.0)]),
                series("tracer", &[(2100.0, 10.0), (2200.0, 12.0), (2000.0, 11.0)]),
            ],
            "pairs",
            "ns per pair",
        );
        assert!(
            table.contains("| untraced | 1000 | 11.0 | 10.0–12.0 | 1.00 (1.00–1.00) | 0.0 |"),
            "{table}"
        );
        assert!(
            table.contains("| tracer | 1000 | 2100 | 2000–2200 | 183.33 (181.82–210.00) | 2090 |"),
            "{table}"
        );
    }

    #[test]
    fn cost_table_reports_cpu_and_memory() {
        let mut s = series("tracer full", &[(1.0, 1.0)]);
        let cost = |cpu_percent, before, peak| OwnCost {
            cpu_percent,
            attach_cpu_seconds: 0.25,
            attach_seconds: 0.5,
            rss_before_report_kib: before,
            rss_peak_kib: peak,
        };
        s.costs = vec![
            cost(2.0, 20480, 40960),
            cost(4.0, 30720, 51200),
            cost(3.0, 25600, 45000),
        ];
        let table = cost_table(&[("node", &s)]);
        assert!(
            table.contains("| node | tracer full | 3.0 (2.0–4.0) | 0.25 / 0.50 | 30.0 | 50.0 |"),
            "{table}"
        );
    }
}
