//! The live service under test: the harness shared with `cargo xtask bench` (the
//! live-harness crate: node bench/live_service/server.js, its byte-for-byte load client, the
//! tracer's attach cycles), here with the tests' timeouts and panics; and the checks only the
//! tests make: the code pages of a process read back byte for byte, the tracer's BPF programs
//! and links as bpftool lists them. Used by tests/live_e2e.rs and tests/sampler_live_e2e.rs.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hasher};
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

pub use live_harness::{Cycle, HeldBpf, Service, item_paths};

use super::load::{Load, RawResponse};
use super::{EXIT_TIMEOUT, RECORDING_TIMEOUT, bpf_programs, tracer_bin};

// ---------------------------------------------------------------------------------------------
// Code pages

/// The executable and read-only file mappings of a process (its program's text, libc's,
/// every shared object's, and their read-only data, which holds the GOT where the loader made
/// it read-only: all of it under full RELRO, as node is built here, the `.got` part under
/// partial RELRO, as glibc is), read through /proc/PID/mem and kept as one hash per 4 KiB
/// page; and the slots of each module's writable `.got.plt` (partial RELRO, bound lazily), one
/// by one, so that a slot already bound must read back the same while one still pointing at
/// its lazy-binding stub in `.plt` may be bound meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CodeSnapshot {
    /// (path, start, end, page hashes), sorted by start.
    pub mappings: Vec<(String, u64, u64, Vec<u64>)>,
    /// Writable GOTs, one per module that has one.
    pub gots: Vec<WritableGot>,
}

/// A module's `.got.plt` in a writable mapping: where it is, and its slots as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WritableGot {
    pub path: String,
    pub addr: u64,
    /// The module's `.plt` (and `.plt.sec`) at run time: a slot pointing there is not bound yet.
    pub stubs: Vec<(u64, u64)>,
    pub slots: Vec<u64>,
}

impl WritableGot {
    fn unbound(&self, value: u64) -> bool {
        self.stubs.iter().any(|&(s, e)| (s..e).contains(&value))
    }
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
        let later_gots: HashMap<(u64, &str), &WritableGot> =
            later.gots.iter().map(|g| ((g.addr, g.path.as_str()), g)).collect();
        for got in &self.gots {
            let Some(after) = later_gots.get(&(got.addr, got.path.as_str())) else {
                out.push(format!("{}: its .got.plt at {:#x} is no longer there", got.path, got.addr));
                continue;
            };
            for (i, (&a, &b)) in got.slots.iter().zip(after.slots.iter()).enumerate() {
                if a != b && !got.unbound(a) {
                    out.push(format!(
                        "{}: .got.plt slot {i} at {:#x} was bound to {a:#x}, now reads {b:#x}",
                        got.path,
                        got.addr + 8 * i as u64
                    ));
                }
            }
        }
        out
    }

    /// Panics unless `pid`'s code, read-only data and bound GOT slots read back as in this
    /// snapshot, which must have found at least one bound writable GOT slot (libc's), so that
    /// the GOT part cannot pass by finding nothing to compare.
    pub fn reads_back_in(&self, pid: i32) {
        let (slots, bound) = self.got_slots();
        assert!(
            bound > 0,
            "no bound .got.plt slot found in {pid} ({} writable GOTs, {slots} slots): the GOT check \
             would compare nothing",
            self.gots.len()
        );
        let changed = self.differences(&code_snapshot(pid));
        assert!(
            changed.is_empty(),
            "the service's code and read-only data ({} bytes in {} mappings) and its {bound} bound \
             writable GOT slots must read back exactly as before the first attach:\n{}",
            self.bytes(),
            self.mappings.len(),
            changed.join("\n")
        );
    }

    /// Writable GOT slots, and how many of them were bound before.
    pub fn got_slots(&self) -> (usize, usize) {
        let all = self.gots.iter().map(|g| g.slots.len()).sum();
        let bound = self.gots.iter().flat_map(|g| g.slots.iter().map(move |&v| !g.unbound(v))).filter(|&b| b).count();
        (all, bound)
    }
}

/// Reads every r-xp and r--p file mapping of `pid` (path starting with '/').
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
        if fields.len() < 6 || !matches!(fields[1], "r-xp" | "r--p") || !fields[5].starts_with('/') {
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
    let gots = writable_gots(pid, &maps, &mem);
    CodeSnapshot { mappings, gots }
}

/// The `.got.plt` of every module mapped by `pid` whose GOT lies in a writable mapping, read
/// through `mem`. A module's load bias is its offset-0 mapping's start less its first
/// PT_LOAD's page-aligned address.
fn writable_gots(pid: i32, maps: &str, mem: &std::fs::File) -> Vec<WritableGot> {
    use object::{Object as _, ObjectSection as _, ObjectSegment as _};
    // (start, end, perms, offset, path) of each file mapping.
    let lines: Vec<(u64, u64, &str, u64, &str)> = maps
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || !f[5].starts_with('/') || f.len() > 6 {
                return None;
            }
            let (s, e) = f[0].split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                f[1],
                u64::from_str_radix(f[2], 16).ok()?,
                f[5],
            ))
        })
        .collect();
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for &(start, _, _, offset, path) in &lines {
        if offset != 0 || !seen.insert(path) {
            continue;
        }
        let Ok(data) = std::fs::read(format!("/proc/{pid}/root{path}")) else { continue };
        let Ok(file) = object::File::parse(&*data) else { continue };
        let Some(first) = file.segments().map(|s| s.address()).min() else { continue };
        let bias = start.wrapping_sub(first & !0xfff);
        let Some(got) = file.section_by_name(".got.plt") else { continue };
        let addr = got.address().wrapping_add(bias);
        // Its first slots may end the RELRO part (read-only, compared with the pages above).
        let last = addr + got.size().saturating_sub(8);
        let writable = lines
            .iter()
            .any(|&(s, e, perms, _, p)| p == path && perms.starts_with("rw") && s <= last && last < e);
        if !writable {
            continue;
        }
        let stubs = [".plt", ".plt.sec"]
            .iter()
            .filter_map(|n| file.section_by_name(n))
            .map(|s| (s.address().wrapping_add(bias), s.address().wrapping_add(bias) + s.size()))
            .collect();
        let mut raw = vec![0u8; got.size() as usize];
        mem.read_exact_at(&mut raw, addr)
            .unwrap_or_else(|e| panic!("read {path}'s .got.plt at {addr:#x} in {pid}: {e}"));
        let slots = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        out.push(WritableGot { path: path.to_owned(), addr, stubs, slots });
    }
    out
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
// Attach/detach cycles and the service under load

/// [`live_harness::attach_cycle`] with this build's tracer and the tests' timeouts: attaches
/// to `pid` with `args` for `hold`, lets the tracer detach by itself at the end of
/// `--duration`, and checks the "recording" line, exit status 0 and a JSON report of this pid.
pub fn attach_cycle(pid: i32, args: &[&str], hold: Duration) -> Result<Cycle, String> {
    live_harness::attach_cycle(
        &tracer_bin(),
        pid as u32,
        args,
        hold,
        RECORDING_TIMEOUT,
        EXIT_TIMEOUT,
    )
    .map_err(|e| e.0)
}

/// The service, warmed up untraced with [`live_harness::WARM_UP_REQUESTS`] requests over 64
/// items (V8 compiles the handler), with the paths asked for and its answers to compare.
pub fn warm_service(
    connections: usize,
) -> (Service, Vec<String>, Arc<HashMap<String, RawResponse>>) {
    let warmed = live_harness::warm_service(item_paths(64), connections)
        .unwrap_or_else(|e| panic!("the live service: {e}"));
    eprintln!("untraced warm-up: {}", warmed.warm_up);
    (warmed.service, warmed.paths, warmed.reference)
}

/// Load on the warmed service until stopped (20 minutes at most).
pub fn endless_load(
    service: &Service,
    paths: &[String],
    reference: &Arc<HashMap<String, RawResponse>>,
    connections: usize,
) -> Load {
    Load::start(
        super::load::LoadConfig {
            addr: service.addr(),
            connections,
            paths: paths.to_vec(),
            max_requests: 10_000_000,
            max_duration: Duration::from_secs(20 * 60),
        },
        reference.clone(),
    )
}

/// SIGTERM ends the service with status 0, as it does untraced.
pub fn stop_service(service: Service) {
    service.stop(EXIT_TIMEOUT).unwrap_or_else(|e| {
        panic!("the service should end on SIGTERM with status 0, as it does untraced: {e}")
    });
}
