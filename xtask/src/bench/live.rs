//! The bench's live workload (BENCH_WORKLOADS=live): what attaching costs a running service.
//! Each run starts the node service of bench/live_service untraced, warms it up, attaches the
//! contender to its pid (nothing for the untraced run), times a fixed number of requests
//! from the closed-loop client, detaches and stops the service. Figures per request: the
//! service's CPU plus the tracer's own in that window, and the wall time of the requests.

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};

use super::{
    live_service::{self, Load, STOP_TIMEOUT, Service, Tracer},
    probes::EmptyUprobes,
    run::{ATTACH_TIMEOUT, Env, Tool},
    table::{Paired, Series, median, min_max, num},
};

/// How much load a run puts on the service.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// The timed requests.
    pub load: Load,
    /// Requests before attaching, at the same concurrency (JIT compilation, heap growth).
    pub warmup: u64,
}

/// One run, per request of its timed window.
#[derive(Clone, Debug)]
pub struct Run {
    pub service_cpu_us: f64,
    pub tracer_cpu_us: f64,
    pub wall_us: f64,
    /// The service's RSS after the warm-up and after the timed requests.
    pub rss_warm_kib: u64,
    pub rss_end_kib: u64,
    /// What the contender counted, as a check that it traced the run.
    pub note: Option<String>,
}

impl Run {
    /// What the request cost the machine: the service's CPU and the tracer's.
    pub fn cpu_us(&self) -> f64 {
        self.service_cpu_us + self.tracer_cpu_us
    }
}

enum Attached {
    Nothing,
    Tracer(Box<Tracer>),
    Floor(EmptyUprobes, String),
}

/// One run of `tool` on a fresh service. A request answered wrongly or not at all fails it.
pub fn run_once(env: &Env, tool: &Tool, settings: &Settings) -> Result<Run> {
    let service = Service::start()?;
    live_service::load(
        &service,
        Load {
            requests: settings.warmup,
            ..settings.load
        },
    )
    .context("warm-up requests")?;
    let rss_warm_kib = service.rss_kib()?;
    let pid = service.pid();
    let attached = match tool {
        Tool::Untraced => Attached::Nothing,
        Tool::Tracer {
            sample_bytes,
            unwind,
            backend,
        } => {
            let mut args = Vec::new();
            if let Some(n) = sample_bytes {
                args.extend(["--sample-bytes", n]);
            }
            if let Some(b) = backend {
                args.extend(["--backend", b]);
            }
            if let Some(u) = unwind {
                args.extend(["--unwind", u]);
            }
            let tracer = Tracer::attach(&env.tracer, pid, &args)
                .context("attach the tracer to the service")?;
            Attached::Tracer(Box::new(tracer))
        }
        Tool::Floor => {
            let (probes, free) = EmptyUprobes::attach_floor(pid, ATTACH_TIMEOUT)
                .context("attach the floor's uprobes to the service")?;
            Attached::Floor(probes, free)
        }
        Tool::Bpftrace { .. } | Tool::Heaptrack | Tool::Massif => {
            bail!("{tool:?} is not a contender of the live workload")
        }
    };
    let tracer_pid = match &attached {
        Attached::Tracer(t) => Some(t.pid()),
        _ => None,
    };
    let window = live_service::measure(&service, settings.load, tracer_pid)
        .context("the timed requests")?;
    let rss_end_kib = service.rss_kib()?;
    let note = match attached {
        Attached::Nothing => None,
        Attached::Tracer(t) => {
            let detached = t.detach().context("detach the tracer")?;
            let allocs = detached.report["totals"]["allocs"].as_u64().unwrap_or(0);
            Some(format!("{allocs} allocations in its report"))
        }
        Attached::Floor(probes, free) => {
            drop(probes);
            Some(format!("empty program on malloc and {free}"))
        }
    };
    service.stop(STOP_TIMEOUT)?;
    let answered = &window.answered;
    answered.check()?;
    let per_request = |seconds: f64| seconds * 1e6 / answered.requests as f64;
    Ok(Run {
        service_cpu_us: per_request(window.service_cpu),
        tracer_cpu_us: per_request(window.tracer_cpu),
        wall_us: per_request(answered.wall.as_secs_f64()),
        rss_warm_kib,
        rss_end_kib,
        note,
    })
}

/// Every pair of one contender: its run next to the untraced run before it.
#[derive(Clone, Debug)]
pub struct LiveSeries {
    pub contender: String,
    /// (traced, untraced), pair by pair.
    pub pairs: Vec<(Run, Run)>,
    /// Why each failed pair failed; a failed pair is in no figure.
    pub failed: Vec<String>,
}

impl LiveSeries {
    pub fn new(contender: &str) -> Self {
        LiveSeries {
            contender: contender.to_owned(),
            pairs: Vec::new(),
            failed: Vec::new(),
        }
    }

    fn series(&self, figure: impl Fn(&Run) -> f64) -> Series {
        Series {
            contender: self.contender.clone(),
            size: 0,
            runs: self
                .pairs
                .iter()
                .map(|(traced, untraced)| Paired {
                    value: figure(traced),
                    baseline: figure(untraced),
                })
                .collect(),
            costs: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// CPU per request (service and tracer), µs, against the paired untraced run.
    pub fn cpu(&self) -> Series {
        self.series(Run::cpu_us)
    }

    /// Wall time per request, µs, against the paired untraced run.
    pub fn wall(&self) -> Series {
        self.series(|r| r.wall_us)
    }
}

/// `median (min–max)` of ratios.
fn ratio_cell(ratios: &[f64]) -> String {
    if ratios.is_empty() {
        return "–".to_owned();
    }
    let (lo, hi) = min_max(ratios);
    format!("{:.2} ({lo:.2}–{hi:.2})", median(ratios))
}

fn pairs_cell(n: usize, failed: usize) -> String {
    match failed {
        0 => n.to_string(),
        f => format!("{n} ({f} failed)"),
    }
}

/// The table: an untraced row (every untraced run, each against their median, which shows
/// the run-to-run noise) and one row per contender.
pub fn table(rows: &[LiveSeries]) -> String {
    let mut out = String::new();
    out.push_str(
        "| contender | pairs | CPU per request, × untraced, median (min–max) | wall per request, \
         × untraced, median (min–max) | CPU per request, µs: service + tracer, median | \
         requests/s, median |\n|---|---:|---:|---:|---:|---:|\n",
    );
    let untraced: Vec<&Run> = rows
        .iter()
        .flat_map(|s| s.pairs.iter().map(|(_, u)| u))
        .collect();
    if !untraced.is_empty() {
        let cpu: Vec<f64> = untraced.iter().map(|r| r.cpu_us()).collect();
        let wall: Vec<f64> = untraced.iter().map(|r| r.wall_us).collect();
        let (cpu_m, wall_m) = (median(&cpu), median(&wall));
        let rate: Vec<f64> = wall.iter().map(|w| 1e6 / w).collect();
        let _ = writeln!(
            out,
            "| untraced (each run against their median) | {} | {} | {} | {} | {} |",
            untraced.len(),
            ratio_cell(&cpu.iter().map(|c| c / cpu_m).collect::<Vec<_>>()),
            ratio_cell(&wall.iter().map(|w| w / wall_m).collect::<Vec<_>>()),
            num(cpu_m),
            num(median(&rate)),
        );
    }
    for s in rows {
        let traced: Vec<&Run> = s.pairs.iter().map(|(t, _)| t).collect();
        let service: Vec<f64> = traced.iter().map(|r| r.service_cpu_us).collect();
        let tracer: Vec<f64> = traced.iter().map(|r| r.tracer_cpu_us).collect();
        let rate: Vec<f64> = traced.iter().map(|r| 1e6 / r.wall_us).collect();
        let cpu_cell = if traced.is_empty() {
            "–".to_owned()
        } else {
            format!("{} + {}", num(median(&service)), num(median(&tracer)))
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {cpu_cell} | {} |",
            s.contender,
            pairs_cell(s.pairs.len(), s.failed.len()),
            ratio_cell(&s.cpu().ratios()),
            ratio_cell(&s.wall().ratios()),
            if traced.is_empty() {
                "–".to_owned()
            } else {
                num(median(&rate))
            },
        );
    }
    out
}

/// What goes under the table: what each contender counted, failures, the service's memory.
pub fn notes(rows: &[LiveSeries]) -> String {
    let mut out = String::new();
    for s in rows {
        if let Some(note) = s.pairs.iter().find_map(|(t, _)| t.note.as_deref()) {
            let _ = writeln!(out, "- {} (first run): {note}", s.contender);
        }
        for why in &s.failed {
            let first = why.lines().next().unwrap_or("?");
            let _ = writeln!(out, "- {}: a pair FAILED: {first}", s.contender);
        }
    }
    let runs: Vec<&Run> = rows
        .iter()
        .flat_map(|s| s.pairs.iter().flat_map(|(t, u)| [t, u]))
        .collect();
    if !runs.is_empty() {
        let mib = |f: fn(&Run) -> u64| {
            let v: Vec<f64> = runs.iter().map(|r| f(r) as f64 / 1024.0).collect();
            let (lo, hi) = min_max(&v);
            format!("{lo:.0}–{hi:.0} MiB")
        };
        let _ = writeln!(
            out,
            "- The service's RSS after the warm-up: {}; after the timed requests: {} (every run, \
             traced or not).",
            mib(|r| r.rss_warm_kib),
            mib(|r| r.rss_end_kib)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(service: f64, tracer: f64, wall: f64) -> Run {
        Run {
            service_cpu_us: service,
            tracer_cpu_us: tracer,
            wall_us: wall,
            rss_warm_kib: 100 << 10,
            rss_end_kib: 110 << 10,
            note: None,
        }
    }

    #[test]
    fn ratios_count_the_tracers_cpu_and_failed_pairs_stay_out() {
        let mut s = LiveSeries::new("tracer");
        s.pairs = vec![
            (run(150.0, 50.0, 400.0), run(100.0, 0.0, 250.0)),
            (run(180.0, 20.0, 300.0), run(80.0, 0.0, 200.0)),
            (run(120.0, 30.0, 330.0), run(100.0, 0.0, 300.0)),
        ];
        s.failed = vec!["3 of 100 requests failed (first: GET /item/1: status 500)".into()];
        assert_eq!(s.cpu().ratios(), vec![2.0, 2.5, 1.5]);
        assert_eq!(s.wall().ratios(), vec![1.6, 1.5, 1.1]);
        let t = table(std::slice::from_ref(&s));
        assert!(
            t.contains("| untraced (each run against their median) | 3 | 1.00 (0.80–1.00) | 1.00 (0.80–1.20) | 100 | 4000 |"),
            "{t}"
        );
        assert!(
            t.contains("| tracer | 3 (1 failed) | 2.00 (1.50–2.50) | 1.50 (1.10–1.60) | 150 + 30.0 | 3030 |"),
            "{t}"
        );
        let n = notes(&[s]);
        assert!(
            n.contains("- tracer: a pair FAILED: 3 of 100 requests failed"),
            "{n}"
        );
        assert!(
            n.contains("after the warm-up: 100–100 MiB; after the timed requests: 110–110 MiB"),
            "{n}"
        );
    }

    #[test]
    fn a_contender_without_a_good_pair_shows_dashes() {
        let mut s = LiveSeries::new("floor");
        s.failed = vec!["attach".into()];
        let t = table(&[s]);
        assert!(
            t.contains("| floor | 0 (1 failed) | – | – | – | – |"),
            "{t}"
        );
    }
}
