//! A live service to trace: the node HTTP server of fixtures/http_server.js, the code pages of
//! a process read back byte for byte, the tracer's BPF programs and links as bpftool lists
//! them, and attach/detach cycles with given tracer arguments. Used by tests/live_e2e.rs; the
//! load itself is in `load.rs`.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::load::{Load, LoadConfig, Outcome, RawResponse, fetch_reference};
use super::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, RECORDING_TIMEOUT, bpf_programs, describe_status,
    fixtures_dir, tracer_bin,
};

pub const NODE: &str = "/usr/bin/node";

/// The node HTTP server, killed when dropped.
pub struct Service {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Service {
    /// Starts `node fixtures/http_server.js` and waits for its port.
    pub fn start() -> Service {
        assert!(
            std::path::Path::new(NODE).is_file(),
            "{NODE} is missing; the live-service tests expect node 20 there"
        );
        let script = fixtures_dir().join("http_server.js");
        let mut proc = Proc::spawn("node http_server.js", Command::new(NODE).arg(script));
        let line = proc
            .stdout
            .wait_for(LINE_TIMEOUT, |l| l.starts_with("listening "))
            .unwrap_or_else(|why| {
                panic!(
                    "the HTTP server fixture never said `listening PORT`: {why}\n--- stderr ---\n{}",
                    proc.stderr.read_to_end(Duration::from_millis(200)).join("\n")
                )
            });
        let port: u16 = line["listening ".len()..]
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("bad port in {line:?}: {e}"));
        Service {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }
}

/// `n` item paths spread over the item numbers, so bodies of every size are asked for.
pub fn item_paths(n: u32) -> Vec<String> {
    (0..n).map(|i| format!("/item/{}", i * 257 + 3)).collect()
}

// ---------------------------------------------------------------------------------------------
// Code pages

/// The executable file mappings of a process (its program's text, libc's, every shared
/// object's), read through /proc/PID/mem and kept as one hash per 4 KiB page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeSnapshot {
    /// (path, start, end, page hashes), sorted by start.
    pub mappings: Vec<(String, u64, u64, Vec<u64>)>,
}

impl CodeSnapshot {
    pub fn bytes(&self) -> u64 {
        self.mappings.iter().map(|(_, s, e, _)| e - s).sum()
    }

    /// What differs from `later`, one line per mapping (first differing page named), or
    /// nothing when every byte reads back the same.
    pub fn differences(&self, later: &CodeSnapshot) -> Vec<String> {
        let mut out = Vec::new();
        let index: HashMap<(u64, &str), &(String, u64, u64, Vec<u64>)> = later
            .mappings
            .iter()
            .map(|m| ((m.1, m.0.as_str()), m))
            .collect();
        for (path, start, end, pages) in &self.mappings {
            match index.get(&(*start, path.as_str())) {
                None => out.push(format!(
                    "{path} at {start:#x}-{end:#x} is no longer mapped there"
                )),
                Some((_, _, end2, _)) if end2 != end => out.push(format!(
                    "{path} at {start:#x} ended at {end:#x}, now at {end2:#x}"
                )),
                Some((_, _, _, pages2)) => {
                    let changed: Vec<usize> = pages
                        .iter()
                        .zip(pages2.iter())
                        .enumerate()
                        .filter(|(_, (a, b))| a != b)
                        .map(|(i, _)| i)
                        .collect();
                    if let Some(&first) = changed.first() {
                        out.push(format!(
                            "{path} at {start:#x}-{end:#x}: {} of {} pages differ, the first at {:#x}",
                            changed.len(),
                            pages.len(),
                            start + first as u64 * 4096
                        ));
                    }
                }
            }
        }
        out
    }
}

/// Reads every r-xp file mapping of `pid` (path starting with '/').
pub fn code_snapshot(pid: i32) -> CodeSnapshot {
    let maps_path = format!("/proc/{pid}/maps");
    let maps =
        std::fs::read_to_string(&maps_path).unwrap_or_else(|e| panic!("read {maps_path}: {e}"));
    let mem_path = format!("/proc/{pid}/mem");
    let mem = std::fs::File::open(&mem_path).unwrap_or_else(|e| panic!("open {mem_path}: {e}"));
    let mut mappings = Vec::new();
    let mut buf = vec![0u8; 4096];
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] != "r-xp" || !fields[5].starts_with('/') {
            continue;
        }
        let (s, e) = fields[0].split_once('-').expect("start-end");
        let start = u64::from_str_radix(s, 16).expect("hex start");
        let end = u64::from_str_radix(e, 16).expect("hex end");
        let mut pages = Vec::with_capacity(((end - start) / 4096) as usize);
        let mut addr = start;
        while addr < end {
            mem.read_exact_at(&mut buf, addr)
                .unwrap_or_else(|e| panic!("read {mem_path} at {addr:#x} ({}): {e}", fields[5]));
            let mut h = DefaultHasher::new();
            h.write(&buf);
            pages.push(h.finish());
            addr += 4096;
        }
        mappings.push((fields[5..].join(" "), start, end, pages));
    }
    assert!(
        !mappings.is_empty(),
        "process {pid} has no executable file mappings"
    );
    CodeSnapshot { mappings }
}

// ---------------------------------------------------------------------------------------------
// BPF links

/// A BPF link as `bpftool link show --json` lists it.
#[derive(Clone, Debug)]
pub struct BpfLink {
    pub id: u64,
    pub prog_id: u64,
    pub kind: String,
}

pub fn bpf_links() -> Vec<BpfLink> {
    let output = Command::new("bpftool")
        .args(["link", "show", "--json"])
        .output()
        .unwrap_or_else(|e| {
            panic!("run `bpftool link show --json`: {e}; run `cargo xtask prereqs`")
        });
    assert!(
        output.status.success(),
        "`bpftool link show --json` failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let list: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "`bpftool link show --json` printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    list.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|l| BpfLink {
            id: l["id"].as_u64().unwrap_or(0),
            prog_id: l["prog_id"].as_u64().unwrap_or(0),
            kind: l["type"].as_str().unwrap_or("?").to_owned(),
        })
        .collect()
}

/// The BPF programs and links a process holds, by id, from its file descriptors' fdinfo
/// (bpftool here cannot tell which process holds what).
#[derive(Clone, Debug, Default)]
pub struct HeldBpf {
    pub programs: Vec<u64>,
    pub links: Vec<u64>,
}

pub fn bpf_held_by(holder: i32) -> HeldBpf {
    let mut held = HeldBpf::default();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{holder}/fd")) else {
        return held;
    };
    for fd in fds.filter_map(Result::ok) {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let key = match &*target {
            "anon_inode:bpf-prog" => "prog_id:",
            "anon_inode:bpf_link" => "link_id:",
            _ => continue,
        };
        let info = format!("/proc/{holder}/fdinfo/{}", fd.file_name().to_string_lossy());
        let id = std::fs::read_to_string(&info).ok().and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        match (key, id) {
            ("prog_id:", Some(id)) => held.programs.push(id),
            (_, Some(id)) => held.links.push(id),
            _ => {}
        }
    }
    held.programs.sort_unstable();
    held.programs.dedup();
    held.links.sort_unstable();
    held
}

/// Of the programs and links the tracers held, those still loaded, and any link still
/// pointing at one of those programs.
pub fn leftovers(held: &HeldBpf) -> (Vec<String>, Vec<String>) {
    let progs = bpf_programs()
        .into_iter()
        .filter(|p| held.programs.contains(&p.id))
        .map(|p| format!("prog {} {}", p.id, p.name))
        .collect();
    let links = bpf_links()
        .into_iter()
        .filter(|l| held.links.contains(&l.id) || held.programs.contains(&l.prog_id))
        .map(|l| format!("link {} ({}) to prog {}", l.id, l.kind, l.prog_id))
        .collect();
    (progs, links)
}

// ---------------------------------------------------------------------------------------------
// Attach/detach cycles

/// One `tracer record --pid PID --duration D ARGS...` run that went as it should.
#[derive(Debug)]
pub struct Cycle {
    pub args: Vec<String>,
    /// From the tracer's start to its exit.
    pub wall: Duration,
    /// From the tracer's start to its "recording" line.
    pub attach: Duration,
    pub report: Value,
    /// BPF programs and links it held while recording (none for the ptrace backend).
    pub held: HeldBpf,
    /// What the tracer said on stderr.
    pub stderr: String,
}

/// Attaches to `pid` with `args` for `hold`, lets the tracer detach by itself at the end of
/// `--duration`, and checks what every cycle must hold: the "recording" line, exit status 0,
/// a JSON report of this pid on stdout. Err says what went wrong, with the tracer's output.
pub fn attach_cycle(pid: i32, args: &[&str], hold: Duration) -> Result<Cycle, String> {
    let started = Instant::now();
    let mut cmd = Command::new(tracer_bin());
    cmd.args([
        "record",
        "--pid",
        &pid.to_string(),
        "--format",
        "json",
        "--top",
        "5",
    ])
    .arg("--duration")
    .arg(format!("{}ms", hold.as_millis()))
    .args(args);
    let label = format!("tracer record --pid {pid} {}", args.join(" "));
    let mut tracer = Proc::spawn(&label, &mut cmd);
    let wanted = format!("tracer: recording pid {pid}");
    let recording = tracer
        .stderr
        .wait_for(RECORDING_TIMEOUT, |l| l.contains(&wanted));
    let attach = started.elapsed();
    let held = if recording.is_ok() {
        bpf_held_by(tracer.pid())
    } else {
        HeldBpf::default()
    };
    let finished = tracer.finish(EXIT_TIMEOUT);
    let wall = started.elapsed();
    if let Err(why) = recording {
        return Err(format!(
            "`{label}` never said {wanted:?} ({why})\n{}",
            finished.describe()
        ));
    }
    if !finished.status.success() {
        return Err(format!(
            "`{label}` ended with {}\n{}",
            describe_status(finished.status),
            finished.describe()
        ));
    }
    let report: Value = serde_json::from_str(&finished.stdout).map_err(|e| {
        format!(
            "`{label}` printed no JSON report ({e})\n{}",
            finished.describe()
        )
    })?;
    if report["pid"].as_u64() != Some(pid as u64) {
        return Err(format!("`{label}`: the report is of pid {}", report["pid"]));
    }
    Ok(Cycle {
        args: args.iter().map(|s| (*s).to_owned()).collect(),
        wall,
        attach,
        report,
        held,
        stderr: finished.stderr,
    })
}

// ---------------------------------------------------------------------------------------------
// The service under load

/// The service, warmed up untraced with 2,000 requests (V8 compiles the handler), with the
/// paths asked for and its answers to compare.
pub fn warm_service(
    connections: usize,
) -> (Service, Vec<String>, Arc<HashMap<String, RawResponse>>) {
    let service = Service::start();
    let paths = item_paths(64);
    let reference = Arc::new(
        fetch_reference(service.addr, &paths)
            .unwrap_or_else(|e| panic!("reference answers from the service: {e}")),
    );
    let warm = Load::start(
        LoadConfig {
            addr: service.addr,
            connections,
            paths: paths.clone(),
            max_requests: 2_000,
            max_duration: Duration::from_secs(20),
        },
        reference.clone(),
    );
    while !warm.finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let warm = warm.stop();
    assert!(
        warm.errors.is_empty() && warm.count(Outcome::Same) == warm.requests.len(),
        "the service misbehaves untraced: {}\n{}",
        warm.summary(),
        warm.errors.join("\n")
    );
    eprintln!("untraced warm-up: {}", warm.summary());
    (service, paths, reference)
}

pub fn endless_load(
    service: &Service,
    paths: &[String],
    reference: &Arc<HashMap<String, RawResponse>>,
    connections: usize,
) -> Load {
    Load::start(
        LoadConfig {
            addr: service.addr,
            connections,
            paths: paths.to_vec(),
            max_requests: 10_000_000,
            max_duration: Duration::from_secs(20 * 60),
        },
        reference.clone(),
    )
}
