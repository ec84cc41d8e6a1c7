//! JavaScript frames named from V8's own objects: node runs a chain of named functions in
//! every tier and spins in the innermost; the test stops it with ptrace, walks the frame
//! pointers, and names each JS frame through `tracer::v8` (function, script, start line and
//! column), checking every one against node's perf map. Then the same chain without
//! `--interpreted-frames-native-stack`, where interpreted frames all run in the one embedded
//! InterpreterEntryTrampoline, must still name each frame by its own function.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::ptrace;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;
use object::{Object, ObjectSegment, ObjectSymbol};
use support::{TempDir, fixtures_dir, require_root};
use tracer::symbolize::perfmap::PerfMap;
use tracer::v8::{
    CachedMemory, JsFunction, Memory, ProcessMemory, V8Error, V8Layout, current_position,
    read_frame, resolve_frame, resolve_function,
};

const NODE: &str = "/usr/bin/node";
const MAX_FRAMES: usize = 256;

/// A node process running the fixture; killed (and its perf map removed) when dropped.
struct Node {
    child: Child,
    /// node's working directory: the perf-map flags also make it write a V8 log there.
    _dir: TempDir,
}

impl Node {
    fn start(extra: &[&str]) -> Node {
        Node::start_script("v8_frames.js", extra)
    }

    fn start_script(name: &str, extra: &[&str]) -> Node {
        assert!(
            Path::new(NODE).is_file(),
            "{NODE} is missing; this test needs node 20 there"
        );
        let script = fixtures_dir().join(name);
        let dir = TempDir::new("v8-frames");
        let mut child = Command::new(NODE)
            .current_dir(dir.path())
            .args(extra)
            .arg("--allow-natives-syntax")
            .arg(&script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("start {NODE}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the fixture's first line");
        assert_eq!(
            line.trim(),
            "spinning",
            "the fixture should say it is spinning (did node reject a flag?)"
        );
        // Let it get into the loop.
        std::thread::sleep(Duration::from_millis(300));
        Node { child, _dir: dir }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(format!("/tmp/perf-{}.map", self.pid()));
    }
}

/// One frame of the frame-pointer chain: the pc running in it and its frame pointer.
#[derive(Debug, Clone, Copy)]
struct Frame {
    pc: u64,
    fp: u64,
}

/// Stops the main thread, takes its registers and walks rbp; then lets node go on.
fn stop_and_walk(pid: i32, mem: &ProcessMemory) -> Vec<Frame> {
    stop_walk_and(pid, mem, |_| ()).0
}

/// Like [`stop_and_walk`], and runs `while_stopped` on the frames before node goes on.
fn stop_walk_and<T>(
    pid: i32,
    mem: &ProcessMemory,
    while_stopped: impl FnOnce(&[Frame]) -> T,
) -> (Vec<Frame>, T) {
    let p = Pid::from_raw(pid);
    ptrace::attach(p).unwrap_or_else(|e| panic!("ptrace attach {pid}: {e}"));
    match waitpid(p, Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, _)) => {}
        other => panic!("node {pid} did not stop after attach: {other:?}"),
    }
    let regs = ptrace::getregs(p).unwrap_or_else(|e| panic!("getregs {pid}: {e}"));
    let mut frames = vec![Frame {
        pc: regs.rip,
        fp: regs.rbp,
    }];
    let mut fp = regs.rbp;
    while frames.len() < MAX_FRAMES {
        let (Ok(next), Ok(ret)) = (mem.read_u64(fp), mem.read_u64(fp + 8)) else {
            break;
        };
        // The stack grows down: a caller's frame is above its callee's.
        if next <= fp || ret == 0 {
            break;
        }
        frames.push(Frame { pc: ret, fp: next });
        fp = next;
    }
    let out = while_stopped(&frames);
    ptrace::detach(p, None).unwrap_or_else(|e| panic!("ptrace detach {pid}: {e}"));
    (frames, out)
}

/// What node's perf map says of a JS frame: `JS:<tier marker><name> <script>:<line>:<column>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PerfName {
    marker: String,
    name: String,
    script: String,
    line: u32,
    column: u32,
}

fn parse_perf_name(entry: &str) -> Option<PerfName> {
    let rest = entry.strip_prefix("JS:")?;
    let (head, location) = rest.rsplit_once(' ')?;
    let mut parts = location.rsplitn(3, ':');
    let column = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    let script = parts.next()?.to_string();
    let marker_len = head.starts_with(['~', '^', '+', '*']) as usize;
    Some(PerfName {
        marker: head[..marker_len].to_string(),
        name: head[marker_len..].to_string(),
        script,
        line,
        column,
    })
}

fn tier(marker: &str) -> &'static str {
    match marker {
        "~" | "" => "interpreted",
        "^" => "baseline",
        "+" => "maglev",
        "*" => "turbofan",
        _ => "unknown",
    }
}

fn read_perf_map(pid: i32) -> PerfMap {
    let path = format!("/tmp/perf-{pid}.map");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut map = PerfMap::default();
    map.feed(&bytes);
    assert!(!map.is_empty(), "{path} has no entries");
    map
}

/// Where node's embedded InterpreterEntryTrampoline lies, as link-time addresses, and a way to
/// map a pc to one (node's builtins are also mapped a second time at a 0x7f... address).
struct Trampoline {
    start: u64,
    end: u64,
    /// (start, end, file offset) of executable mappings of the node binary.
    maps: Vec<(u64, u64, u64)>,
    /// (file offset, vaddr, size) of the binary's PT_LOAD segments.
    loads: Vec<(u64, u64, u64)>,
    /// Link-time ranges of the bytecode handlers (`Builtins_*Handler`), where the pc of the
    /// innermost interpreted frame lies.
    handlers: Vec<(u64, u64)>,
}

impl Trampoline {
    fn find(pid: i32, elf: &object::File) -> Trampoline {
        let sym = elf
            .symbols()
            .find(|s| s.name() == Ok("Builtins_InterpreterEntryTrampoline"))
            .expect("node has a Builtins_InterpreterEntryTrampoline symbol");
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
            .unwrap()
            .lines()
            .filter(|l| {
                l.ends_with(NODE) && l.split_whitespace().nth(1).is_some_and(|p| p.contains('x'))
            })
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (a, b) = f[0].split_once('-').unwrap();
                (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                    u64::from_str_radix(f[2], 16).unwrap(),
                )
            })
            .collect();
        let loads = elf
            .segments()
            .map(|s| (s.file_range().0, s.address(), s.size()))
            .collect();
        let handlers = elf
            .symbols()
            .filter(|s| {
                s.name()
                    .is_ok_and(|n| n.starts_with("Builtins_") && n.ends_with("Handler"))
            })
            .map(|s| (s.address(), s.address() + s.size().max(1)))
            .collect();
        Trampoline {
            handlers,
            start: sym.address(),
            end: sym.address() + sym.size().max(1),
            maps,
            loads,
        }
    }

    /// The node binary's link-time address for a pc in one of its executable mappings.
    fn link_address(&self, pc: u64) -> Option<u64> {
        let &(start, _, off) = self.maps.iter().find(|(s, e, _)| (*s..*e).contains(&pc))?;
        let file_off = pc - start + off;
        self.loads
            .iter()
            .find(|&&(fo, _, size)| (fo..fo + size).contains(&file_off))
            .map(|&(fo, va, _)| file_off - fo + va)
    }

    fn contains(&self, pc: u64) -> bool {
        self.link_address(pc)
            .is_some_and(|a| (self.start..self.end).contains(&a))
    }

    fn in_handler(&self, pc: u64) -> bool {
        self.link_address(pc)
            .is_some_and(|a| self.handlers.iter().any(|(s, e)| (*s..*e).contains(&a)))
    }
}

/// A JS frame found on the stack, with what the resolver made of it.
struct Seen {
    depth: usize,
    how: String,
    resolved: Result<JsFunction, String>,
    bytecode_offset: Option<u32>,
    took: Duration,
}

fn name_frame(
    mem: &ProcessMemory,
    layout: &V8Layout,
    fp: u64,
) -> (Result<JsFunction, String>, Option<u32>, Duration) {
    let t = Instant::now();
    let r = read_frame(mem, layout, fp)
        .map_err(|e| format!("frame: {e}"))
        .and_then(|f| {
            resolve_function(mem, layout, f.shared)
                .map(|j| (j, f.bytecode_offset))
                .map_err(|e| format!("resolve: {e}"))
        });
    let took = t.elapsed();
    match r {
        Ok((j, off)) => (Ok(j), off, took),
        Err(e) => (Err(e), None, took),
    }
}

fn show(j: &Result<JsFunction, String>) -> String {
    match j {
        Ok(j) => format!("{:?} {}:{}:{}", j.name, j.script, j.line, j.column),
        Err(e) => format!("UNNAMED ({e})"),
    }
}

fn still_running(pid: i32) {
    let stat = || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &s[s.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split_whitespace().collect();
        (f[0].to_string(), f[11].parse::<u64>().unwrap())
    };
    let (state, utime) = stat();
    std::thread::sleep(Duration::from_millis(300));
    let (state2, utime2) = stat();
    assert!(
        !matches!(state.as_str(), "t" | "T") && !matches!(state2.as_str(), "t" | "T"),
        "node should run on after the detach, state {state} then {state2}"
    );
    assert!(
        utime2 > utime,
        "node should keep spinning after the detach (utime {utime} -> {utime2})"
    );
}

/// Where each interpreted function of the fixture is executing (its call to the next), as
/// V8's own `new Error().stack` gives it from inside the same chain (line, column).
const CURRENT_POSITIONS: &[(&str, (u32, u32))] = &[
    ("spinVia", (14, 10)),
    ("Klass", (23, 14)),
    ("anonymous", (27, 42)),
    ("methodInterp", (30, 28)),
    ("obj.assigned", (32, 42)),
    ("arrow", (34, 26)),
    ("outermostInterpreted", (41, 10)),
    // The script's top level, calling outermostInterpreted().
    ("", (62, 1)),
];

/// The chain of the fixture, innermost first, as the perf map names it.
const CHAIN: &[&str] = &[
    "spinForever",
    "spinVia",
    "optimizedMiddle",
    "Klass",
    "anonymous",
    "methodInterp",
    "obj.assigned",
    "arrow",
    "baselineOuter",
    "outermostInterpreted",
];

#[test]
fn v8_frames_are_named_as_the_perf_map_names_them() {
    require_root();
    let elf_bytes = std::fs::read(NODE)
        .unwrap_or_else(|e| panic!("{NODE}: {e}; this test needs node 20 there"));
    let layout = V8Layout::from_elf(&elf_bytes).unwrap_or_else(|e| panic!("{e}"));
    let elf = object::File::parse(&*elf_bytes).unwrap();
    let node = Node::start(&["--perf-basic-prof", "--interpreted-frames-native-stack"]);
    let pid = node.pid();
    let mem = ProcessMemory::new(pid);
    let trampoline = Trampoline::find(pid, &elf);

    let frames = stop_and_walk(pid, &mem);
    // The perf map is read after the stop: every code object on the stack is in it by then.
    let perf = read_perf_map(pid);

    let mut js = Vec::new();
    let mut mismatches = Vec::new();
    let mut tiers = std::collections::BTreeMap::new();
    let mut in_trampoline = 0;
    for (depth, f) in frames.iter().enumerate() {
        let entry = perf.lookup(f.pc);
        let expected = entry.and_then(parse_perf_name);
        let embedded = trampoline.contains(f.pc);
        if expected.is_none() && !embedded {
            continue;
        }
        let (resolved, bytecode_offset, took) = name_frame(&mem, &layout, f.fp);
        let how = match &expected {
            Some(p) => format!("perf map JS:{}{} ({})", p.marker, p.name, tier(&p.marker)),
            None => {
                in_trampoline += 1;
                "embedded InterpreterEntryTrampoline".to_string()
            }
        };
        if let Some(p) = &expected {
            *tiers.entry(tier(&p.marker)).or_insert(0) += 1;
            let agrees = resolved.as_ref().is_ok_and(|j| {
                j.name == p.name && j.script == p.script && j.line == p.line && j.column == p.column
            });
            if !agrees {
                mismatches.push(format!(
                    "#{depth} pc {:#x} fp {:#x}: perf map {}:{}:{} {:?}, resolver {}",
                    f.pc,
                    f.fp,
                    p.script,
                    p.line,
                    p.column,
                    p.name,
                    show(&resolved)
                ));
            }
            // Interpreted frames keep their bytecode offset and baseline ones keep other data
            // there. Optimized code entered by on-stack replacement runs in the interpreted
            // frame it replaced, whose slots still hold the loop's offset: any answer is right.
            let expect_offset = match tier(&p.marker) {
                "interpreted" => Some(true),
                "baseline" => Some(false),
                _ => None,
            };
            if expect_offset.is_some_and(|e| e != bytecode_offset.is_some()) {
                mismatches.push(format!(
                    "#{depth} {}: {} frame with bytecode offset {bytecode_offset:?}",
                    p.name,
                    tier(&p.marker)
                ));
            }
        } else if resolved.as_ref().map_or(true, |j| j.script.is_empty()) {
            mismatches.push(format!(
                "#{depth} pc {:#x} in the embedded trampoline: {}",
                f.pc,
                show(&resolved)
            ));
        }
        js.push(Seen {
            depth,
            how,
            resolved,
            bytecode_offset,
            took,
        });
    }
    still_running(pid);

    let listing: String = js
        .iter()
        .map(|s| {
            format!(
                "  #{:<3} {:<60} -> {} bytecode offset {:?} ({} us)\n",
                s.depth,
                s.how,
                show(&s.resolved),
                s.bytecode_offset,
                s.took.as_micros()
            )
        })
        .collect();
    let named = js.iter().filter(|s| s.resolved.is_ok()).count();
    let total_us: u128 = js.iter().map(|s| s.took.as_micros()).sum();
    eprintln!(
        "{} frames walked, {} JS frames ({in_trampoline} in the embedded trampoline), {named} named, \
         {:.1} us per frame (read + resolve, first time)\n{listing}",
        frames.len(),
        js.len(),
        total_us as f64 / js.len().max(1) as f64
    );
    assert!(
        mismatches.is_empty(),
        "{} JS frames disagree with the perf map:\n{}\nall JS frames:\n{listing}",
        mismatches.len(),
        mismatches.join("\n")
    );
    let ours: Vec<&str> = js
        .iter()
        .filter_map(|s| s.resolved.as_ref().ok())
        .filter(|j| j.script.ends_with("v8_frames.js") && !j.name.is_empty())
        .map(|j| j.name.as_str())
        .collect();
    assert_eq!(
        ours, CHAIN,
        "the fixture's functions, innermost first\n{listing}"
    );
    for t in ["interpreted", "baseline", "turbofan"] {
        assert!(
            tiers.get(t).copied().unwrap_or(0) > 0,
            "no {t} frame on the stack: the fixture did not force its tiers ({tiers:?})\n{listing}"
        );
    }

    // The cost of naming one frame again, once the objects are in the page cache.
    let (jsf, _) = js
        .iter()
        .find(|s| s.resolved.is_ok())
        .map(|s| (frames[s.depth], ()))
        .unwrap();
    let rounds = 2000;
    let t = Instant::now();
    for _ in 0..rounds {
        let f = read_frame(&mem, &layout, jsf.fp).unwrap();
        resolve_function(&mem, &layout, f.shared).unwrap();
    }
    let direct = t.elapsed();
    let t = Instant::now();
    for _ in 0..rounds {
        let cached = CachedMemory::new(&mem);
        let f = read_frame(&cached, &layout, jsf.fp).unwrap();
        resolve_function(&cached, &layout, f.shared).unwrap();
    }
    let with_cache = t.elapsed();
    // All of the chain's frames through one cache, as one stack would be named.
    let t = Instant::now();
    for _ in 0..rounds / 10 {
        let cached = CachedMemory::new(&mem);
        for s in &js {
            let f = read_frame(&cached, &layout, frames[s.depth].fp).unwrap();
            resolve_function(&cached, &layout, f.shared).unwrap();
        }
    }
    let stack = t.elapsed();
    eprintln!(
        "read_frame + resolve_function on {:?}: {:.1} us direct, {:.1} us through a fresh page cache; \
         a whole stack of {} JS frames through one cache: {:.1} us ({:.1} us per frame)",
        show(&js[0].resolved),
        direct.as_secs_f64() * 1e6 / rounds as f64,
        with_cache.as_secs_f64() * 1e6 / rounds as f64,
        js.len(),
        stack.as_secs_f64() * 1e6 / (rounds / 10) as f64,
        stack.as_secs_f64() * 1e6 / (rounds / 10 * js.len()) as f64,
    );
}

#[test]
fn v8_frames_in_the_embedded_interpreter_trampoline_are_told_apart() {
    require_root();
    let elf_bytes = std::fs::read(NODE)
        .unwrap_or_else(|e| panic!("{NODE}: {e}; this test needs node 20 there"));
    let layout = V8Layout::from_elf(&elf_bytes).unwrap_or_else(|e| panic!("{e}"));
    let elf = object::File::parse(&*elf_bytes).unwrap();
    // Without --interpreted-frames-native-stack every interpreted function runs in the same
    // embedded trampoline: only the frame's own slots can tell them apart.
    let node = Node::start(&["--perf-basic-prof"]);
    let pid = node.pid();
    let mem = ProcessMemory::new(pid);
    let trampoline = Trampoline::find(pid, &elf);
    let frames = stop_and_walk(pid, &mem);
    let perf = read_perf_map(pid);

    let mut names = Vec::new();
    let mut listing = String::new();
    let mut in_trampoline = 0;
    let mut unnamed = 0;
    for (depth, f) in frames.iter().enumerate() {
        let perf_name = perf.lookup(f.pc).and_then(parse_perf_name);
        let embedded = trampoline.contains(f.pc);
        if perf_name.is_none() && !embedded {
            continue;
        }
        let (resolved, offset, _) = name_frame(&mem, &layout, f.fp);
        if embedded {
            in_trampoline += 1;
            if offset.is_none() {
                listing.push_str("  (no bytecode offset in an interpreted frame)\n");
                unnamed += 1;
            }
        }
        if let (Some(p), Ok(j)) = (&perf_name, &resolved)
            && (p.name != j.name || p.line != j.line)
        {
            unnamed += 1;
        }
        listing.push_str(&format!(
            "  #{depth:<3} {:<40} -> {}\n",
            if embedded {
                "embedded trampoline".to_string()
            } else {
                format!(
                    "JS:{}{}",
                    perf_name.as_ref().unwrap().marker,
                    perf_name.as_ref().unwrap().name
                )
            },
            show(&resolved)
        ));
        match resolved {
            Ok(j) => {
                if j.script.ends_with("v8_frames.js") && !j.name.is_empty() {
                    names.push(j.name);
                }
            }
            Err(_) => unnamed += 1,
        }
    }
    still_running(pid);
    eprintln!("{in_trampoline} frames in the embedded trampoline\n{listing}");
    assert_eq!(
        unnamed, 0,
        "frames left unnamed or named differently from the perf map\n{listing}"
    );
    assert_eq!(
        names, CHAIN,
        "each trampoline frame named by its own function\n{listing}"
    );
    // spinVia, Klass, anonymous, methodInterp, obj.assigned, arrow, outermostInterpreted run
    // interpreted here, so in the one trampoline.
    assert!(
        in_trampoline >= 7,
        "{in_trampoline} frames in the trampoline, expected at least 7\n{listing}"
    );
}

/// Executable anonymous mappings: where V8 puts the code it generates.
fn jit_ranges(pid: i32) -> Vec<(u64, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[1].contains('x')).then(|| {
                let (a, b) = f[0].split_once('-').unwrap();
                (
                    u64::from_str_radix(a, 16).unwrap(),
                    u64::from_str_radix(b, 16).unwrap(),
                )
            })
        })
        .collect()
}

/// (name, script, line, column) of the fixture's own frames, innermost first.
type Named = (String, String, u32, u32);

fn fixture_frames(named: impl Iterator<Item = JsFunction>) -> Vec<Named> {
    named
        .filter(|j| j.script.ends_with("v8_frames.js") && !j.name.is_empty())
        .map(|j| (j.name, j.script, j.line, j.column))
        .collect()
}

#[test]
fn v8_frames_of_a_node_started_without_perf_map_flags_are_named_the_same() {
    require_root();
    let elf_bytes = std::fs::read(NODE)
        .unwrap_or_else(|e| panic!("{NODE}: {e}; this test needs node 20 there"));
    let layout = V8Layout::from_elf(&elf_bytes).unwrap_or_else(|e| panic!("{e}"));
    let elf = object::File::parse(&*elf_bytes).unwrap();

    // The reference: the same fixture with the perf-map flags, named by its perf map alone.
    let flagged = Node::start(&["--perf-basic-prof", "--interpreted-frames-native-stack"]);
    let mem = ProcessMemory::new(flagged.pid());
    let frames = stop_and_walk(flagged.pid(), &mem);
    let perf = read_perf_map(flagged.pid());
    // Every JS frame, node's own modules' included.
    let reference: Vec<Named> = frames
        .iter()
        .filter_map(|f| perf.lookup(f.pc).and_then(parse_perf_name))
        .map(|p| (p.name, p.script, p.line, p.column))
        .collect();
    drop(flagged);

    // No perf-map flags: the frames to name are those whose pc lies in generated code
    // (executable anonymous mappings) or in the embedded interpreter trampoline.
    let node = Node::start(&[]);
    let pid = node.pid();
    assert!(
        !Path::new(&format!("/tmp/perf-{pid}.map")).exists(),
        "node without flags should write no perf map"
    );
    let mem = ProcessMemory::new(pid);
    let trampoline = Trampoline::find(pid, &elf);
    let jit = jit_ranges(pid);
    let frames = stop_and_walk(pid, &mem);
    let mut listing = String::new();
    let mut named = Vec::new();
    let mut unnamed = Vec::new();
    let mut total = 0;
    let mut checked_current = 0;
    for (depth, f) in frames.iter().enumerate() {
        let in_jit = jit.iter().any(|(s, e)| (*s..*e).contains(&f.pc));
        let in_trampoline = trampoline.contains(f.pc);
        if !in_jit && !in_trampoline {
            continue;
        }
        total += 1;
        let (resolved, _, _) = name_frame(&mem, &layout, f.fp);
        let current =
            read_frame(&mem, &layout, f.fp).and_then(|fr| current_position(&mem, &layout, &fr));
        if let Ok(j) = &resolved
            && j.script.ends_with("v8_frames.js")
            && let Some((_, at)) = CURRENT_POSITIONS.iter().find(|(n, _)| *n == j.name)
        {
            checked_current += 1;
            if !matches!(current, Ok(Some(now)) if now == *at) {
                unnamed.push(format!(
                    "#{depth} {:?}: current position {current:?}, V8's stack trace says {at:?}",
                    j.name
                ));
            }
        }
        listing.push_str(&format!(
            "  #{depth:<3} {:<12} pc {:#x} -> {} now at {current:?}\n",
            if in_jit { "jit" } else { "trampoline" },
            f.pc,
            show(&resolved)
        ));
        match resolved {
            Ok(j) => named.push(j),
            Err(e) => unnamed.push(format!("#{depth}: {e}")),
        }
    }
    still_running(pid);
    eprintln!(
        "no flags: {total} frames in generated code or the trampoline, {} named, \
         current line checked in {checked_current}\n{listing}",
        named.len()
    );
    assert_eq!(
        checked_current,
        CURRENT_POSITIONS.len(),
        "every interpreted fixture function's current position checked\n{listing}"
    );
    let all: Vec<Named> = named
        .iter()
        .map(|j| {
            let j = j.clone();
            (j.name, j.script, j.line, j.column)
        })
        .collect();
    let ours = fixture_frames(named.into_iter());
    assert_eq!(
        ours.iter().map(|n| n.0.as_str()).collect::<Vec<_>>(),
        CHAIN,
        "the fixture's functions, innermost first\n{listing}"
    );
    assert_eq!(
        all, reference,
        "names, scripts, lines and columns should equal the flagged run's perf map\n{listing}"
    );
    assert!(
        unnamed.is_empty(),
        "{} of {total} frames in V8 code unnamed:\n{}\n{listing}",
        unnamed.len(),
        unnamed.join("\n")
    );
}

#[test]
fn v8_frames_captured_before_compacting_gcs_never_get_another_name() {
    require_root();
    let elf_bytes = std::fs::read(NODE)
        .unwrap_or_else(|e| panic!("{NODE}: {e}; this test needs node 20 there"));
    let layout = V8Layout::from_elf(&elf_bytes).unwrap_or_else(|e| panic!("{e}"));
    let node = Node::start_script(
        "v8_gc.js",
        &[
            "--expose-gc",
            "--compact-on-every-full-gc",
            "--stress-compaction",
        ],
    );
    let pid = node.pid();
    let mem = ProcessMemory::new(pid);

    // (frame captured, identity when captured)
    let mut captured = Vec::new();
    for _ in 0..40 {
        // Named while node is stopped: this is the truth the stale answers are held to.
        let (_, fresh) = stop_walk_and(pid, &mem, |frames| {
            let mut fresh = Vec::new();
            // Every frame is tried (read_frame refuses what is not a JS frame): the innermost
            // is often interpreted, its pc in a bytecode handler rather than the trampoline.
            for f in frames {
                if let Ok(frame) = read_frame(&mem, &layout, f.fp)
                    && let Ok(j) = resolve_function(&mem, &layout, frame.shared)
                    && j.name.starts_with("work")
                {
                    // The check resolve_frame adds must pass on a fresh capture.
                    let again = resolve_frame(&mem, &layout, &frame);
                    assert_eq!(
                        again.as_ref().ok().map(JsFunction::identity),
                        Some(j.identity()),
                        "a fresh capture through resolve_frame: {again:?}"
                    );
                    fresh.push((frame, j));
                }
            }
            fresh
        });
        captured.extend(fresh);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        captured.len() >= 20,
        "only {} work frames captured",
        captured.len()
    );
    // Let a few dozen compacting GCs run.
    std::thread::sleep(Duration::from_millis(1500));

    let (mut same, mut refused, mut wrong) = (0, 0, Vec::new());
    let (mut sfi_same, mut sfi_refused, mut sfi_wrong) = (0, 0, 0);
    for (frame, then) in &captured {
        match resolve_frame(&mem, &layout, frame) {
            Ok(now) if now.identity() == then.identity() => same += 1,
            Ok(now) => wrong.push(format!("{} became {}", then.name, now.name)),
            Err(_) => refused += 1,
        }
        // For comparison: the SharedFunctionInfo address alone, unchecked against its function.
        match resolve_function(&mem, &layout, frame.shared) {
            Ok(now) if now.identity() == then.identity() => sfi_same += 1,
            Ok(_) => sfi_wrong += 1,
            Err(_) => sfi_refused += 1,
        }
    }
    still_running(pid);
    eprintln!(
        "{} frames captured, resolved 1.5 s later through resolve_frame: {same} same, {refused} refused, \
         {} wrong; through the SFI address alone: {sfi_same} same, {sfi_refused} refused, {sfi_wrong} wrong",
        captured.len(),
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "stale captures named as other functions:\n{}",
        wrong.join("\n")
    );
}

/// Kills a child when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn v8_frames_of_an_http_server_under_load_are_named() {
    require_root();
    let elf_bytes = std::fs::read(NODE)
        .unwrap_or_else(|e| panic!("{NODE}: {e}; this test needs node 20 there"));
    let layout = V8Layout::from_elf(&elf_bytes).unwrap_or_else(|e| panic!("{e}"));
    let elf = object::File::parse(&*elf_bytes).unwrap();
    // The live service (bench/live_service/server.js, shared with the bench and the
    // live-service tests), started the way a service is: no flags at all.
    let service = live_harness::Service::start().unwrap_or_else(|e| panic!("{e}"));
    let port = service.port().to_string();
    let _client = Killed(
        Command::new(NODE)
            .arg(fixtures_dir().join("v8_http_client.js"))
            .arg(&port)
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(1500));
    let pid = service.pid() as i32;
    let mem = ProcessMemory::new(pid);
    let trampoline = Trampoline::find(pid, &elf);

    let (mut total, mut named, mut typed) = (0usize, 0usize, 0usize);
    let mut typed_kinds: std::collections::BTreeMap<String, usize> = Default::default();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut functions: std::collections::BTreeMap<String, usize> = Default::default();
    let mut took = Duration::ZERO;
    // Stops land in idle waits or in libc (no frame pointers) as often as not: stop until
    // enough JS frames are seen, within bounds.
    let mut samples = 0;
    while total < 300 && samples < 3000 {
        samples += 1;
        // Code is generated as the server runs: its mappings are read at each stop.
        let jit = jit_ranges(pid);
        let (_, (t, n, errs, names, dt, typed_here)) = stop_walk_and(pid, &mem, |frames| {
            let start = Instant::now();
            let cached = CachedMemory::new(&mem);
            let (mut t, mut n, mut errs, mut names) = (0, 0, Vec::new(), Vec::new());
            let mut typed_here = Vec::new();
            for f in frames {
                let in_jit = jit.iter().any(|(s, e)| (*s..*e).contains(&f.pc));
                let kind = if in_jit {
                    "jit"
                } else if trampoline.contains(f.pc) {
                    "trampoline"
                } else if trampoline.in_handler(f.pc) {
                    "bytecode handler"
                } else {
                    continue;
                };
                t += 1;
                names.push(format!("[{kind}]"));
                match read_frame(&cached, &layout, f.fp)
                    .and_then(|fr| resolve_function(&cached, &layout, fr.shared))
                {
                    Ok(j) => {
                        n += 1;
                        names.push(format!("{} {}:{}", j.name, j.script, j.line));
                    }
                    // Regexp code and stubs live in generated code too: V8 marks their
                    // frames with a type, and they run no JS function to name.
                    Err(V8Error::TypedFrame(marker)) => {
                        typed_here.push(format!("{kind} frame of V8 frame type {}", marker >> 1));
                    }
                    Err(e) => {
                        // Grouped by the message without its addresses.
                        let what = e.to_string().split(" at ").next().unwrap_or("").to_string();
                        errs.push(format!("{kind} frame: {what}"));
                    }
                }
            }
            (t, n, errs, names, start.elapsed(), typed_here)
        });
        total += t;
        named += n;
        took += dt;
        typed += typed_here.len();
        for e in typed_here {
            *typed_kinds.entry(e).or_default() += 1;
        }
        for e in errs {
            *errors.entry(e).or_default() += 1;
        }
        for n in names {
            *functions.entry(n).or_default() += 1;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    still_running(pid);
    let mut top: Vec<_> = functions.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    let top: String = top
        .iter()
        .take(15)
        .map(|(f, c)| format!("  {c:>5}  {f}\n"))
        .collect();
    let errs: String = errors
        .iter()
        .map(|(e, c)| format!("  {c:>5}  {e}\n"))
        .collect();
    let typed_list: String = typed_kinds
        .iter()
        .map(|(e, c)| format!("  {c:>5}  {e}\n"))
        .collect();
    // Frames that run a JS function: all but the typed ones (v8dbg_frametype_IrregexpFrame is
    // 27: compiled regular expressions).
    let js = total - typed;
    eprintln!(
        "{samples} stops of a flagless HTTP server under load: {total} frames in generated code, \
         the interpreter trampoline or bytecode handlers; {typed} typed (no JS function); \
         {named} of the other {js} named ({:.1}%), {:.1} us per frame while stopped\n\
         most seen:\n{top}typed:\n{typed_list}unnamed:\n{errs}",
        100.0 * named as f64 / js.max(1) as f64,
        took.as_secs_f64() * 1e6 / total.max(1) as f64
    );
    assert!(
        total >= 300,
        "only {total} frames in V8 code in {samples} stops\n{errs}"
    );
    assert!(
        functions.keys().any(|f| f.contains("live_service/server.js")),
        "no frame of the server's own file named\n{top}"
    );
    assert!(
        named * 100 >= js * 95,
        "{named} of {js} frames running JS functions named, under 95%\n{errs}"
    );
}
