//! JavaScript frames of a node process started without perf-map flags, named from V8's own
//! objects (`kind: "js"`: function, script, start line and column): an HTTP service under load
//! through forced compacting GCs, checked against an independent count of the frames that ran
//! in V8 code (executable anonymous mappings, node's interpreter and baseline builtins); the
//! same names as node's own perf map gives them; and one function named in every tier.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use object::{Object, ObjectSegment, ObjectSymbol};
use serde_json::Value;
use support::live::item_paths;
use support::load::{Load, LoadConfig, LoadReport, Outcome, RawResponse, fetch_reference};
use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, describe_status, describe_top, fixtures_dir, num,
    parse_report, record_launch_ok, setup, show_args, stacks, start_recording, tracer_bin,
};

const NODE: &str = "/usr/bin/node";
const SERVER: &str = "js_names_server.js";
const TIERS: &str = "js_names_tiers.js";
/// The service's request handler, and the helper that makes each response's Buffer.
const HANDLER: &str = "handleItem";
const BODY_MAKER: &str = "makeBody";
/// The tiers fixture's allocating function.
const MAKE_BUFFERS: &str = "makeBuffers";
/// node's ArrayBuffer allocator: a Buffer's backing store comes through one of its functions.
const ALLOCATOR: &str = "node::NodeArrayBufferAllocator::";
/// V8 flags of every service run: `gc()` for the fixture's timer, and a full GC that moves
/// objects (SharedFunctionInfos, scripts, code) every time.
const SERVER_V8_FLAGS: &[&str] = &[
    "--expose-gc",
    "--compact-on-every-full-gc",
    "--stress-compaction",
];
/// What the fixture's timer does every 2 s; the flagless recording must see most of them.
const GC_EVERY: Duration = Duration::from_secs(2);
const CONNECTIONS: usize = 4;
/// The share of frames in V8 code that must be named.
const MIN_NAMED_PERCENT: usize = 95;
/// Fewer frames in V8 code than this, and the share above would mean nothing.
const MIN_V8_FRAMES: usize = 50;

/// The tests of this file each run node under load and the tracer: one at a time, so that on a
/// small machine none starves another.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn require_node() {
    assert!(
        Path::new(NODE).is_file(),
        "{NODE} is missing; these tests expect node 20 there"
    );
}

// ---------------------------------------------------------------------------------------------
// The fixtures' source

/// A fixture's text and where each of its `function NAME(` declarations starts.
struct Source {
    path: PathBuf,
    text: String,
    /// Function name -> 1-based lines of `function NAME(`.
    starts: BTreeMap<String, Vec<u64>>,
}

impl Source {
    fn read(name: &str) -> Source {
        let path = fixtures_dir().join(name);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut starts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("function ") {
                rest = &rest[at + "function ".len()..];
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '$')
                    .collect();
                if !name.is_empty() && rest[name.len()..].trim_start().starts_with('(') {
                    starts.entry(name).or_default().push(i as u64 + 1);
                }
            }
        }
        Source { path, text, starts }
    }

    /// The one line where `function NAME(` starts.
    fn start(&self, name: &str) -> u64 {
        match self.starts.get(name).map(Vec::as_slice) {
            Some([line]) => *line,
            other => panic!(
                "{} should declare `function {name}(` exactly once, found it at lines {other:?}",
                self.path.display()
            ),
        }
    }

    /// The one line containing `needle`.
    fn line_of(&self, needle: &str) -> u64 {
        let lines: Vec<u64> = self
            .text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .map(|(i, _)| i as u64 + 1)
            .collect();
        match lines.as_slice() {
            [line] => *line,
            _ => panic!(
                "{} should contain {needle:?} on exactly one line, found it at {lines:?}",
                self.path.display()
            ),
        }
    }

    /// Whether a JS frame of this fixture may be `name` starting at `line`: a declared function
    /// at its declaration, or the anonymous CommonJS wrapper around the file, at line 1.
    fn allows(&self, name: &str, line: u64) -> bool {
        match self.starts.get(name) {
            Some(lines) => lines.contains(&line),
            None => name == "(anonymous)" && line == 1,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where a pc lies, from /proc/PID/maps and node's ELF file: independent of the tracer's kinds

/// Where V8 code runs in a node process.
#[derive(Debug, Clone, PartialEq, Eq)]
enum V8Code {
    /// An executable anonymous mapping: code V8 generated (baseline, optimized, the interpreter
    /// trampoline copies of --interpreted-frames-native-stack, regexps, stubs).
    Generated,
    /// One of node's interpreter or baseline builtins (named), through either mapping of the
    /// binary.
    Builtin(String),
}

struct CodeMap {
    /// Executable anonymous mappings seen in any snapshot.
    generated: Vec<(u64, u64)>,
    /// Executable mappings of the node binary: (start, end, file offset).
    node: Vec<(u64, u64, u64)>,
    /// node's PT_LOAD segments: (file offset, vaddr, file size).
    loads: Vec<(u64, u64, u64)>,
    /// Link-time ranges of the interpreter's and baseline code's builtins, with their names.
    builtins: Vec<(u64, u64, String)>,
    snapshots: usize,
}

/// The builtins a frame of interpreted or baseline JS code runs in: the interpreter's entry
/// trampoline, the bytecode handlers, the baseline helpers and the interpreter re-entries.
fn is_interpreter_builtin(name: &str) -> bool {
    name == "Builtins_InterpreterEntryTrampoline"
        || name == "Builtins_InterpreterEnterAtBytecode"
        || name == "Builtins_InterpreterEnterAtNextBytecode"
        || name.starts_with("Builtins_Baseline")
        || (name.starts_with("Builtins_") && name.ends_with("Handler"))
}

impl CodeMap {
    fn new() -> CodeMap {
        let bytes = std::fs::read(NODE).unwrap_or_else(|e| panic!("read {NODE}: {e}"));
        let elf = object::File::parse(&*bytes).unwrap_or_else(|e| panic!("parse {NODE}: {e}"));
        let loads = elf
            .segments()
            .map(|s| (s.file_range().0, s.address(), s.file_range().1))
            .collect();
        let mut builtins: Vec<(u64, u64, String)> = elf
            .symbols()
            .filter_map(|s| {
                let name = s.name().ok()?;
                is_interpreter_builtin(name)
                    .then(|| (s.address(), s.address() + s.size().max(1), name.to_owned()))
            })
            .collect();
        builtins.sort();
        assert!(
            builtins
                .iter()
                .any(|b| b.2 == "Builtins_InterpreterEntryTrampoline")
                && builtins.len() > 100,
            "{NODE}'s symbol table should have the interpreter's builtins (found {})",
            builtins.len()
        );
        CodeMap {
            generated: Vec::new(),
            node: Vec::new(),
            loads,
            builtins,
            snapshots: 0,
        }
    }

    /// Adds the executable mappings `pid` has now. Err if its maps cannot be read (it exited).
    fn snapshot(&mut self, pid: i32) -> Result<(), String> {
        let path = format!("/proc/{pid}/maps");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("read {path}: {e}"))?;
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 || !fields[1].contains('x') {
                continue;
            }
            let Some((a, b)) = fields[0].split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end), Ok(offset)) = (
                u64::from_str_radix(a, 16),
                u64::from_str_radix(b, 16),
                u64::from_str_radix(fields[2], 16),
            ) else {
                continue;
            };
            if fields.len() == 5 {
                if !self.generated.contains(&(start, end)) {
                    self.generated.push((start, end));
                }
            } else if fields[5..].join(" ") == NODE && !self.node.contains(&(start, end, offset)) {
                self.node.push((start, end, offset));
            }
        }
        self.snapshots += 1;
        Ok(())
    }

    fn link_address(&self, pc: u64) -> Option<u64> {
        let &(start, _, off) = self.node.iter().find(|(s, e, _)| (*s..*e).contains(&pc))?;
        let file_off = pc - start + off;
        self.loads
            .iter()
            .find(|&&(fo, _, size)| (fo..fo + size).contains(&file_off))
            .map(|&(fo, va, _)| file_off - fo + va)
    }

    fn at(&self, pc: u64) -> Option<V8Code> {
        if self.generated.iter().any(|(s, e)| (*s..*e).contains(&pc)) {
            return Some(V8Code::Generated);
        }
        let addr = self.link_address(pc)?;
        let i = self.builtins.partition_point(|b| b.0 <= addr);
        let (start, end, name) = self.builtins.get(i.checked_sub(1)?)?;
        (*start..*end)
            .contains(&addr)
            .then(|| V8Code::Builtin(name.clone()))
    }

    /// Where frame `depth` of a stack ran. A caller's address is a return address, which may
    /// be just past the end of its code: the byte before it counts too.
    fn frame_at(&self, address: u64, depth: usize) -> Option<V8Code> {
        self.at(address).or_else(|| {
            (depth > 0)
                .then(|| self.at(address.wrapping_sub(1)))
                .flatten()
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Frames of a report

/// The real frames of a stack (inlined entries share their frame's address and are left out),
/// with their depth among real frames.
fn real_frames(stack: &Value) -> Vec<(usize, &Value)> {
    stack["frames"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|f| f["inlined"].as_bool() != Some(true))
        .enumerate()
        .collect()
}

fn all_frames(stack: &Value) -> &[Value] {
    stack["frames"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A frame named from V8's memory: kind "js" with a function, a file and a line.
fn is_named_js(frame: &Value) -> bool {
    frame["kind"].as_str() == Some("js")
        && frame["function"].is_string()
        && frame["file"].is_string()
        && frame["line"].is_u64()
}

fn in_fixture(frame: &Value, fixture: &str) -> bool {
    frame["file"].as_str().is_some_and(|f| f.ends_with(fixture))
}

fn show_frame(frame: &Value) -> String {
    format!(
        "{} {} {}:{} col {} now {} [{} +{:#x} @ {:#x}]",
        frame["kind"],
        frame["function"],
        frame["file"],
        frame["line"],
        frame["column"],
        frame["current_line"],
        frame["module"],
        frame["offset"].as_u64().unwrap_or(0),
        frame["address"].as_u64().unwrap_or(0)
    )
}

fn show_stack(stack: &Value, code: Option<&CodeMap>) -> String {
    let mut out = format!(
        "  alloc_bytes={} allocs={} live_bytes={}\n",
        stack["alloc_bytes"], stack["allocs"], stack["live_bytes"]
    );
    for f in all_frames(stack).iter().take(40) {
        let at = code
            .and_then(|c| f["address"].as_u64().and_then(|a| c.at(a)))
            .map_or(String::new(), |w| format!(" <{w:?}>"));
        let _ = writeln!(out, "    {}{at}", show_frame(f));
    }
    out
}

fn is_buffer_stack(stack: &Value) -> bool {
    all_frames(stack).iter().any(|f| {
        f["function"]
            .as_str()
            .is_some_and(|n| n.starts_with(ALLOCATOR))
    })
}

/// The fixture's function names on a stack, innermost first.
fn fixture_names(stack: &Value, fixture: &str) -> Vec<String> {
    all_frames(stack)
        .iter()
        .filter(|f| in_fixture(f, fixture))
        .map(|f| f["function"].as_str().unwrap_or("<null>").to_owned())
        .collect()
}

/// The Buffer stack (one through node's ArrayBuffer allocator) with the most bytes allocated
/// among those called from JS: with a frame in V8 code by `code`'s own reckoning, so that
/// Buffers node makes for itself with no JS on the stack (socket reads) do not count, and
/// without asking the tracer which frames are JS.
fn top_buffer_stack<'a>(report: &'a Value, code: &CodeMap) -> &'a Value {
    stacks(report)
        .iter()
        .filter(|s| is_buffer_stack(s))
        .filter(|s| {
            real_frames(s).iter().any(|(depth, f)| {
                f["address"]
                    .as_u64()
                    .is_some_and(|a| code.frame_at(a, *depth).is_some())
            })
        })
        .max_by_key(|s| num(s, "alloc_bytes"))
        .unwrap_or_else(|| {
            panic!(
                "no stack through {ALLOCATOR}* has a frame in V8 code: the fixture's Buffers \
                 were not seen\n{}",
                describe_top(report, 15)
            )
        })
}

/// Frames that ran in V8 code, and how many of them the tracer named.
#[derive(Default)]
struct Coverage {
    total: usize,
    named: usize,
    /// Per place ("generated code", a builtin's name): (frames, named).
    by_place: BTreeMap<String, (usize, usize)>,
    unnamed: Vec<String>,
}

fn coverage(report: &Value, code: &CodeMap) -> Coverage {
    let mut c = Coverage::default();
    for (i, stack) in stacks(report).iter().enumerate() {
        for (depth, frame) in real_frames(stack) {
            let Some(at) = frame["address"]
                .as_u64()
                .and_then(|a| code.frame_at(a, depth))
            else {
                continue;
            };
            let place = match at {
                V8Code::Generated => "generated code".to_owned(),
                V8Code::Builtin(name) => name,
            };
            let named = is_named_js(frame);
            c.total += 1;
            let entry = c.by_place.entry(place.clone()).or_default();
            entry.0 += 1;
            if named {
                c.named += 1;
                entry.1 += 1;
                continue;
            }
            // A few from each place, not just the first frames of one long stack.
            if c.unnamed.len() < 40 && entry.0 - entry.1 <= 5 {
                c.unnamed.push(format!(
                    "stack {i} frame {depth} in {place}: {}",
                    show_frame(frame)
                ));
            }
        }
    }
    c
}

impl Coverage {
    fn describe(&self) -> String {
        let mut out = format!(
            "{} of {} frames in V8 code named ({:.1}%)\nby place (frames, named):\n",
            self.named,
            self.total,
            100.0 * self.named as f64 / self.total.max(1) as f64
        );
        let mut places: Vec<_> = self.by_place.iter().collect();
        places.sort_by_key(|(_, (n, _))| std::cmp::Reverse(*n));
        for (place, (n, named)) in places.iter().take(25) {
            let _ = writeln!(out, "  {n:>6} {named:>6}  {place}");
        }
        let _ = writeln!(out, "unnamed (first {}):", self.unnamed.len());
        for u in &self.unnamed {
            let _ = writeln!(out, "  {u}");
        }
        out
    }
}

/// Every fixture JS frame must start where the fixture declares a function of that name.
fn misplaced_fixture_frames(
    report: &Value,
    source: &Source,
    fixture: &str,
) -> (usize, usize, Vec<String>) {
    let mut seen = 0;
    let mut wrong = Vec::new();
    let mut wrong_total = 0;
    for stack in stacks(report) {
        for f in all_frames(stack) {
            if f["kind"].as_str() != Some("js") || !in_fixture(f, fixture) {
                continue;
            }
            seen += 1;
            let name = f["function"].as_str().unwrap_or("<null>");
            let ok = f["line"].as_u64().is_some_and(|l| source.allows(name, l));
            wrong_total += usize::from(!ok);
            if !ok && wrong.len() < 30 {
                wrong.push(format!(
                    "{} (the fixture declares {name:?} at lines {:?})",
                    show_frame(f),
                    source.starts.get(name)
                ));
            }
        }
    }
    (seen, wrong_total, wrong)
}

/// `totals.unnamed_js_frames`, for messages: printed before the assertions, which say more.
fn unnamed_js_frames(report: &Value) -> String {
    report["totals"]
        .get("unnamed_js_frames")
        .map_or_else(|| "missing".to_owned(), Value::to_string)
}

/// The contract's new total: captured V8 frames the tracer could not name.
fn require_unnamed_js_frames(report: &Value) {
    num(&report["totals"], "unnamed_js_frames");
}

// ---------------------------------------------------------------------------------------------
// The service

/// `listening PORT` from a process's stdout (the service, or a tracer that launched it), and
/// the pid it printed before.
fn wait_listening(proc: &mut Proc) -> (i32, SocketAddr) {
    let mut wait = |prefix: &str| -> String {
        match proc
            .stdout
            .wait_for(LINE_TIMEOUT, |l| l.starts_with(prefix))
        {
            Ok(line) => line[prefix.len()..].trim().to_owned(),
            Err(why) => panic!(
                "{}: the service never printed `{prefix}...` on stdout ({why})\n--- stdout ---\n{}\
                 --- stderr ---\n{}",
                proc.label,
                proc.stdout.text(),
                proc.stderr
                    .read_to_end(Duration::from_millis(300))
                    .join("\n")
            ),
        }
    };
    let pid = wait("pid ");
    let port = wait("listening ");
    let pid: i32 = pid
        .parse()
        .unwrap_or_else(|e| panic!("bad pid {pid:?}: {e}"));
    let port: u16 = port
        .parse()
        .unwrap_or_else(|e| panic!("bad port {port:?}: {e}"));
    (pid, SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The highest `gc N` the service printed so far (0 if none), reading what is pending first.
fn gcs_so_far(proc: &mut Proc) -> u64 {
    let _ = proc.stdout.wait_for(Duration::from_millis(200), |_| false);
    proc.stdout
        .seen()
        .iter()
        .filter_map(|l| l.strip_prefix("gc ")?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0)
}

fn start_load(
    addr: SocketAddr,
    paths: &[String],
    reference: &Arc<HashMap<String, RawResponse>>,
) -> Load {
    Load::start(
        LoadConfig {
            addr,
            connections: CONNECTIONS,
            paths: paths.to_vec(),
            max_requests: u64::MAX,
            max_duration: Duration::from_secs(3600),
        },
        reference.clone(),
    )
}

/// Every request answered byte for byte as before the tracer came, and the service still
/// answering the same afterwards: the tracer must not disturb it.
fn check_service_unharmed(
    traffic: &LoadReport,
    after: &Result<HashMap<String, RawResponse>, String>,
    reference: &HashMap<String, RawResponse>,
    alive: bool,
) {
    assert!(
        traffic.count(Outcome::Same) == traffic.requests.len()
            && traffic.errors.is_empty()
            && !traffic.requests.is_empty(),
        "while recorded, the service must answer every request as before: {}\nerrors (first 10):\n{}",
        traffic.summary(),
        traffic.errors[..traffic.errors.len().min(10)].join("\n")
    );
    match after {
        Ok(again) => assert!(
            again == reference,
            "after the recording, the service answers differently than before it"
        ),
        Err(e) => panic!("after the recording, the service does not answer: {e}"),
    }
    assert!(alive, "the service died during or after the recording");
}

/// What a recording of the service left: the report, where V8 code was, what the load saw.
struct ServiceRun {
    report: Value,
    code: CodeMap,
    /// Forced GCs from the tracer's "recording" line to its exit.
    gcs: u64,
    traffic: LoadReport,
    after: Result<HashMap<String, RawResponse>, String>,
    reference: HashMap<String, RawResponse>,
    alive: bool,
    /// The perf map read while node ran, when it wrote one.
    perf_map: Option<String>,
    pid: i32,
}

/// Snapshots `pid`'s maps every few seconds while `tracer` runs (and reads its perf map, when
/// it has one, at each snapshot, so the last read is from just before node is stopped).
fn watch(
    tracer: &mut Proc,
    pid: i32,
    code: &mut CodeMap,
    until: Instant,
    perf: &mut Option<String>,
) {
    let perf_path = format!("/tmp/perf-{pid}.map");
    loop {
        let _ = code.snapshot(pid);
        if let Ok(text) = std::fs::read_to_string(&perf_path) {
            *perf = Some(text);
        }
        if !tracer.running() || Instant::now() >= until {
            return;
        }
        thread::sleep(Duration::from_secs(3));
    }
}

/// Starts the service with no perf-map flags, loads it, attaches `tracer record -p PID
/// --duration D` and waits for it to finish by itself, then checks the service again.
fn record_flagless_service(dir: &TempDir, duration: Duration) -> ServiceRun {
    let script = fixtures_dir().join(SERVER);
    let mut cmd = Command::new(NODE);
    cmd.current_dir(dir.path())
        .args(SERVER_V8_FLAGS)
        .arg(&script);
    let mut service = Proc::spawn(&format!("node {SERVER}"), &mut cmd);
    let (pid, addr) = wait_listening(&mut service);
    assert_eq!(
        pid,
        service.pid(),
        "the service printed another pid than its own"
    );
    assert!(
        !Path::new(&format!("/tmp/perf-{pid}.map")).exists(),
        "node started without perf-map flags should write no perf map"
    );
    let paths = item_paths(64);
    let reference = fetch_reference(addr, &paths)
        .unwrap_or_else(|e| panic!("reference answers from the service: {e}"));
    let reference_arc = Arc::new(reference.clone());
    // The load starts cold, with the recording: the handler is interpreted, then baseline, then
    // optimized (and deoptimized now and then by the fixture's timer) while it records.
    let load = start_load(addr, &paths, &reference_arc);
    let out = dir.join("flagless.json");
    let secs = format!("{}s", duration.as_secs());
    let out_arg = out.to_string_lossy().into_owned();
    let mut tracer = start_recording(
        pid,
        &[
            "--duration",
            &secs,
            "--format",
            "json",
            "--top",
            "0",
            "-o",
            &out_arg,
        ],
    );
    let gcs_before = gcs_so_far(&mut service);
    let mut code = CodeMap::new();
    let mut perf = None;
    watch(
        &mut tracer,
        pid,
        &mut code,
        Instant::now() + duration + EXIT_TIMEOUT,
        &mut perf,
    );
    let finished = tracer.finish(EXIT_TIMEOUT);
    let gcs = gcs_so_far(&mut service) - gcs_before;
    // The service is still running: the last snapshot has every mapping the recording saw.
    let _ = code.snapshot(pid);
    thread::sleep(Duration::from_millis(500));
    let traffic = load.stop();
    let after = fetch_reference(addr, &paths);
    let alive = service.running();
    eprintln!(
        "flagless run of {duration:?}: {gcs} forced GCs while recording; load: {}",
        traffic.summary()
    );
    assert!(
        finished.status.success(),
        "`tracer record -p {pid} --duration {secs}` should exit 0\n{}",
        finished.describe()
    );
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| {
        panic!(
            "the tracer wrote no report to {} ({e})\n{}",
            out.display(),
            finished.describe()
        )
    });
    let report = parse_report(&text, &finished);
    if alive {
        service.signal(libc::SIGTERM);
        let status = service.wait_exit(EXIT_TIMEOUT);
        eprintln!("the service ended with {}", describe_status(status));
    }
    ServiceRun {
        report,
        code,
        gcs,
        traffic,
        after,
        reference,
        alive,
        perf_map: perf,
        pid,
    }
}

/// Kills a process by pid when dropped, if it still runs: the node a tracer launched would
/// outlive a failing test that kills only the tracer.
struct KillOnDrop(i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if support::proc_state(self.0).is_some_and(|s| s != 'Z') {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// Launches the service through the tracer with the perf-map flags (given to node here, with
/// `--no-jit-symbols`, so that the tracer leaves node's perf map in place), loads it for
/// `duration`, ends node with SIGTERM and reads the report and the whole perf map: code V8
/// compiles while node shuts down (the SIGTERM handler, `Server.close`) also allocates.
fn record_launched_service(dir: &TempDir, duration: Duration) -> ServiceRun {
    let script = fixtures_dir().join(SERVER);
    let out = dir.join("launched.json");
    let mut args: Vec<OsString> = ["record", "--no-jit-symbols", "--top", "0", "--format", "json", "-o"]
        .iter()
        .map(OsString::from)
        .collect();
    args.push(out.clone().into_os_string());
    args.push("--".into());
    args.push(NODE.into());
    args.push("--perf-basic-prof-only-functions".into());
    args.push("--interpreted-frames-native-stack".into());
    args.extend(SERVER_V8_FLAGS.iter().map(OsString::from));
    args.push(script.into_os_string());
    let mut cmd = Command::new(tracer_bin());
    // node's perf-map flags may make it write files in its working directory.
    cmd.current_dir(dir.path()).args(&args);
    let label = format!("tracer {}", show_args(&args));
    let mut tracer = Proc::spawn(&label, &mut cmd);
    let (pid, addr) = wait_listening(&mut tracer);
    let _node = KillOnDrop(pid);
    let paths = item_paths(64);
    let reference = fetch_reference(addr, &paths)
        .unwrap_or_else(|e| panic!("reference answers from the launched service: {e}"));
    let load = start_load(addr, &paths, &Arc::new(reference.clone()));
    let gcs_before = gcs_so_far(&mut tracer);
    let mut code = CodeMap::new();
    let mut perf = None;
    watch(
        &mut tracer,
        pid,
        &mut code,
        Instant::now() + duration,
        &mut perf,
    );
    let _ = code.snapshot(pid);
    if let Ok(text) = std::fs::read_to_string(format!("/tmp/perf-{pid}.map")) {
        perf = Some(text);
    }
    let traffic = load.stop();
    let after = fetch_reference(addr, &paths);
    let gcs = gcs_so_far(&mut tracer) - gcs_before;
    let alive = support::proc_state(pid).is_some_and(|s| s != 'Z');
    if alive {
        // SAFETY: kill has no memory-safety preconditions; pid is the node the tracer started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let finished = tracer.finish(EXIT_TIMEOUT);
    // The whole map, shutdown included.
    if let Ok(text) = std::fs::read_to_string(format!("/tmp/perf-{pid}.map")) {
        perf = Some(text);
    }
    eprintln!(
        "launched run of {duration:?}: {gcs} forced GCs; load: {}",
        traffic.summary()
    );
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| {
        panic!(
            "`{label}` wrote no report to {} ({e})\n{}",
            out.display(),
            finished.describe()
        )
    });
    let report = parse_report(&text, &finished);
    assert_eq!(
        finished.status.code(),
        Some(0),
        "`{label}` should pass on node's status 0 (SIGTERM ends the fixture with 0)\n{}",
        finished.describe()
    );
    let _ = std::fs::remove_file(format!("/tmp/perf-{pid}.map"));
    ServiceRun {
        report,
        code,
        gcs,
        traffic,
        after,
        reference,
        alive,
        perf_map: perf,
        pid,
    }
}

/// The checks every flagless recording of the service must pass: the frames in V8 code named,
/// the top Buffer stack reaching the handler by name, every fixture frame at a declared line.
fn check_flagless_names(run: &ServiceRun, source: &Source) {
    let report = &run.report;
    let unnamed_total = unnamed_js_frames(report);
    let cov = coverage(report, &run.code);
    eprintln!(
        "{} maps snapshots: {} generated-code mappings, {} node mappings; totals.unnamed_js_frames \
         = {unnamed_total}\n{}",
        run.code.snapshots,
        run.code.generated.len(),
        run.code.node.len(),
        cov.describe()
    );
    assert!(
        cov.total > MIN_V8_FRAMES,
        "only {} frames in V8 code (executable anonymous mappings of pid {}, or node's \
         interpreter/baseline builtins) across all stacks; expected more than {MIN_V8_FRAMES}\n{}\n{}",
        cov.total,
        run.pid,
        cov.describe(),
        describe_top(report, 10)
    );
    assert!(
        cov.named * 100 >= cov.total * MIN_NAMED_PERCENT,
        "frames in V8 code should be kind \"js\" with function, file and line in at least \
         {MIN_NAMED_PERCENT}% of cases\n{}",
        cov.describe()
    );

    let top = top_buffer_stack(report, &run.code);
    let handler_line = source.start(HANDLER);
    let reaches = all_frames(top).iter().any(|f| {
        f["kind"].as_str() == Some("js")
            && f["function"].as_str() == Some(HANDLER)
            && in_fixture(f, SERVER)
            && f["line"].as_u64() == Some(handler_line)
    });
    assert!(
        reaches,
        "the Buffer stack with the most bytes allocated from JS should reach the request \
         handler by name: a kind \"js\" frame {HANDLER} in {SERVER} at line {handler_line}\n{}",
        show_stack(top, Some(&run.code))
    );

    let (seen, wrong_total, wrong) = misplaced_fixture_frames(report, source, SERVER);
    assert!(
        seen > 0,
        "no kind \"js\" frame of {SERVER} in any stack\n{}",
        describe_top(report, 10)
    );
    assert!(
        wrong.is_empty(),
        "{} of {seen} js frames of {SERVER} do not start where the fixture declares their \
         function (first {}):\n{}",
        wrong_total,
        wrong.len(),
        wrong.join("\n")
    );
    require_unnamed_js_frames(report);
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn flagless_http_server_js_frames_are_named_through_compacting_gcs() {
    setup();
    require_node();
    let _serial = serial();
    let source = Source::read(SERVER);
    let dir = TempDir::new("js-names-flagless");
    let duration = Duration::from_secs(60);
    let run = record_flagless_service(&dir, duration);

    // Safety first: a tracer that broke the service makes the rest moot.
    check_service_unharmed(&run.traffic, &run.after, &run.reference, run.alive);

    // The recording spanned the forced compacting GCs (one every 2 s, so about 30 in 60 s).
    let want_gcs = duration.as_secs() / GC_EVERY.as_secs() * 2 / 3;
    assert!(
        run.gcs >= want_gcs,
        "only {} forced compacting GCs happened while recording (expected at least {want_gcs} in \
         {duration:?}): did node accept {SERVER_V8_FLAGS:?}?",
        run.gcs
    );

    check_flagless_names(&run, &source);

    // Compactions move every JSFunction and its code; a stack key holding their addresses
    // would make each GC a new set of stacks and fill the stack table.
    let dropped = &run.report["totals"]["dropped"];
    assert_eq!(
        num(dropped, "stack_map_full"),
        0,
        "stacks were lost to a full stack table across {} compacting GCs: {dropped}",
        run.gcs
    );
}

/// A perf-map entry: `JS:<tier marker><name> <script>:<line>:<column>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PerfName {
    marker: String,
    name: String,
    script: String,
    line: u64,
    column: u64,
}

fn parse_perf_name(entry: &str) -> Option<PerfName> {
    let rest = entry.strip_prefix("JS:")?;
    let (head, location) = rest.rsplit_once(' ').unwrap_or(("", rest));
    let mut parts = location.rsplitn(3, ':');
    let column = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    let script = parts.next()?.to_owned();
    let marker_len = usize::from(head.starts_with(['~', '^', '+', '*']));
    let name = &head[marker_len..];
    Some(PerfName {
        marker: head[..marker_len].to_owned(),
        // V8 writes nothing for a function without a name; the report says "(anonymous)".
        name: if name.is_empty() {
            "(anonymous)".to_owned()
        } else {
            name.to_owned()
        },
        script,
        line,
        column,
    })
}

/// A perf map's JS entries, indexed by start address. Entries are appended as code is made,
/// and freed code space is reused: at an address, the latest entry is the one in force now.
struct PerfIndex {
    /// (start, end, order in the file, name), sorted by start.
    entries: Vec<(u64, u64, usize, PerfName)>,
    max_size: u64,
}

impl PerfIndex {
    fn parse(text: &str) -> PerfIndex {
        let mut entries: Vec<(u64, u64, usize, PerfName)> = text
            .lines()
            .enumerate()
            .filter_map(|(order, l)| {
                let (start, rest) = l.split_once(' ')?;
                let (size, name) = rest.split_once(' ')?;
                let start = u64::from_str_radix(start, 16).ok()?;
                let size = u64::from_str_radix(size, 16).ok()?;
                Some((start, start + size, order, parse_perf_name(name)?))
            })
            .collect();
        entries.sort_by_key(|e| (e.0, e.2));
        let max_size = entries.iter().map(|e| e.1 - e.0).max().unwrap_or(0);
        PerfIndex { entries, max_size }
    }

    /// Every JS entry covering `addr`, oldest first.
    fn covering(&self, addr: u64) -> Vec<&PerfName> {
        let lo = self
            .entries
            .partition_point(|e| e.0 < addr.saturating_sub(self.max_size));
        let hi = self.entries.partition_point(|e| e.0 <= addr);
        let mut found: Vec<&(u64, u64, usize, PerfName)> =
            self.entries[lo..hi].iter().filter(|e| addr < e.1).collect();
        found.sort_by_key(|e| e.2);
        found.into_iter().map(|e| &e.3).collect()
    }
}

#[test]
fn perf_map_and_v8_names_agree() {
    setup();
    require_node();
    let _serial = serial();
    let source = Source::read(SERVER);
    let dir = TempDir::new("js-names-perfmap");

    // With the perf map: tracer record -- node ... (launch mode adds the flags).
    let flagged = record_launched_service(&dir, Duration::from_secs(20));
    check_service_unharmed(
        &flagged.traffic,
        &flagged.after,
        &flagged.reference,
        flagged.alive,
    );
    let perf_text = flagged.perf_map.as_deref().unwrap_or_else(|| {
        panic!(
            "/tmp/perf-{}.map never appeared: node was given --perf-basic-prof-only-functions",
            flagged.pid
        )
    });
    let index = PerfIndex::parse(perf_text);
    assert!(
        !index.entries.is_empty(),
        "node's perf map has no JS: entries ({} lines)",
        perf_text.lines().count()
    );

    let (mut agree, mut agree_earlier, mut uncovered, mut jit_named) = (0, 0, 0, 0);
    let mut disagree = Vec::new();
    for stack in stacks(&flagged.report) {
        for (_, frame) in real_frames(stack) {
            let Some(address) = frame["address"].as_u64() else {
                continue;
            };
            let covering = index.covering(address);
            match frame["kind"].as_str() {
                Some("js") => {}
                Some("jit") if frame["function"].is_string() && !covering.is_empty() => {
                    jit_named += 1;
                    continue;
                }
                _ => continue,
            }
            let Some(last) = covering.last() else {
                uncovered += 1;
                continue;
            };
            let same = |p: &PerfName| {
                frame["function"].as_str() == Some(p.name.as_str())
                    && frame["file"].as_str() == Some(p.script.as_str())
                    && frame["line"].as_u64() == Some(p.line)
                    && frame["column"].as_u64() == Some(p.column)
            };
            if same(last) {
                agree += 1;
            } else if covering.iter().any(|p| same(p)) {
                // The address held other code later (V8 reuses freed code space): the frame
                // agrees with what was there before.
                agree_earlier += 1;
            } else {
                disagree.push(format!(
                    "tracer {}\n      perf map JS:{}{} {}:{}:{}{}",
                    show_frame(frame),
                    last.marker,
                    last.name,
                    last.script,
                    last.line,
                    last.column,
                    if covering.len() > 1 {
                        format!(
                            " (and {} earlier entries at this address)",
                            covering.len() - 1
                        )
                    } else {
                        String::new()
                    }
                ));
            }
        }
    }
    eprintln!(
        "launched with perf map: js frames agreeing with the perf map {agree} (+{agree_earlier} \
         with an earlier entry at a reused address), disagreeing {}, not covered by it \
         {uncovered}; jit frames named through the perf map {jit_named}; \
         totals.unnamed_js_frames = {}",
        disagree.len(),
        unnamed_js_frames(&flagged.report)
    );
    assert!(
        disagree.is_empty(),
        "{} kind \"js\" frames are named differently from node's perf map (function, file, line, \
         column); the first 40:\n{}",
        disagree.len(),
        disagree
            .iter()
            .take(40)
            .map(|d| format!("  {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        agree + agree_earlier >= 20,
        "only {} kind \"js\" frames at addresses node's perf map names ({jit_named} frames there \
         were named kind \"jit\" instead); expected at least 20",
        agree + agree_earlier
    );

    // Without flags: the same stack to the fixture's Buffers, named the same.
    let flagless = record_flagless_service(&dir, Duration::from_secs(20));
    check_service_unharmed(
        &flagless.traffic,
        &flagless.after,
        &flagless.reference,
        flagless.alive,
    );
    check_flagless_names(&flagless, &source);
    let with_map = top_buffer_stack(&flagged.report, &flagged.code);
    let without = top_buffer_stack(&flagless.report, &flagless.code);
    let (names_with, names_without) = (
        fixture_names(with_map, SERVER),
        fixture_names(without, SERVER),
    );
    assert!(
        names_with.iter().any(|n| n == HANDLER),
        "the top Buffer stack of the run with the perf map should reach {HANDLER}\n{}",
        show_stack(with_map, Some(&flagged.code))
    );
    assert_eq!(
        names_with,
        names_without,
        "the top Buffer stack should go through the same functions of {SERVER} with and without \
         the perf map\n--- with ---\n{}--- without ---\n{}",
        show_stack(with_map, Some(&flagged.code)),
        show_stack(without, Some(&flagless.code))
    );
    require_unnamed_js_frames(&flagged.report);
    eprintln!(
        "top Buffer stack's fixture functions in both runs: {names_with:?} ({BODY_MAKER} may be inlined)"
    );
}

#[test]
fn tiers_are_named_in_every_state() {
    setup();
    require_node();
    let _serial = serial();
    let source = Source::read(TIERS);
    let start = source.start(MAKE_BUFFERS);
    // Where makeBuffers calls Buffer.alloc: the line an interpreted makeBuffers is running.
    let alloc_line = source.line_of("kept.push(Buffer.alloc(size))");
    let dir = TempDir::new("js-names-tiers");
    let script = fixtures_dir().join(TIERS);
    let launch = record_launch_ok(
        &dir,
        &["--no-jit-symbols"],
        &[
            OsString::from(NODE),
            OsString::from("--allow-natives-syntax"),
            script.into_os_string(),
        ],
    );
    let report = &launch.report;
    let stdout = &launch.finished.stdout;
    // (phase, bytes per Buffer, the tiers V8 may say makeBuffers is in after the phase)
    let phases: [(&str, u64, &[&str]); 4] = [
        ("interpreted", 40_000, &["ignition"]),
        ("baseline", 41_000, &["sparkplug"]),
        ("optimized", 43_000, &["turbofan"]),
        ("deoptimized", 47_000, &["ignition", "sparkplug"]),
    ];
    for (phase, _, tiers) in phases {
        let tier = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("phase {phase} ")))
            .unwrap_or_else(|| {
                panic!(
                    "the fixture never printed `phase {phase} TIER`\n{}",
                    launch.finished.describe()
                )
            });
        assert!(
            tiers.contains(&tier),
            "the fixture did not get makeBuffers into the {phase} state (V8 says {tier}, expected \
             one of {tiers:?}): a fixture problem, not the tracer's"
        );
    }
    let unnamed_total = unnamed_js_frames(report);

    let mut problems = Vec::new();
    let mut listing = String::new();
    for (phase, size, _) in phases {
        let of_phase: Vec<&Value> = stacks(report)
            .iter()
            .filter(|s| num(s, "allocs") > 0 && num(s, "alloc_bytes") == num(s, "allocs") * size)
            .collect();
        if of_phase.is_empty() {
            // Stacks of 40000-47000 bytes per allocation on average: the phases' own, or a
            // mix of them if they were merged.
            let near: Vec<String> = stacks(report)
                .iter()
                .filter(|s| {
                    num(s, "allocs") > 0
                        && (40_000..=47_000).contains(&(num(s, "alloc_bytes") / num(s, "allocs")))
                })
                .map(|s| show_stack(s, None))
                .collect();
            problems.push(format!(
                "{phase}: no stack made only of {size}-byte allocations; stacks of 40000-47000 \
                 bytes per allocation:\n{}",
                near.join("")
            ));
            continue;
        }
        for stack in of_phase {
            let frame = all_frames(stack).iter().find(|f| {
                f["kind"].as_str() == Some("js")
                    && f["function"].as_str() == Some(MAKE_BUFFERS)
                    && in_fixture(f, TIERS)
                    && f["line"].as_u64() == Some(start)
            });
            let _ = writeln!(
                listing,
                "{phase} ({size} bytes, {} allocs): {}",
                stack["allocs"],
                match frame {
                    Some(f) => format!(
                        "{MAKE_BUFFERS} with its pc in {} ({}), current_line {}",
                        match f["module"].as_str() {
                            Some(m) if m.starts_with('/') => format!("{m} (interpreter/builtins)"),
                            other => format!("{other:?} (generated code)"),
                        },
                        f["address"],
                        f["current_line"]
                    ),
                    None => "no named makeBuffers frame".to_owned(),
                }
            );
            let Some(frame) = frame else {
                problems.push(format!(
                    "{phase}: a stack of {size}-byte allocations has no kind \"js\" frame \
                     {MAKE_BUFFERS} of {TIERS} at line {start}\n{}",
                    show_stack(stack, None)
                ));
                continue;
            };
            if phase == "interpreted" && frame["current_line"].as_u64() != Some(alloc_line) {
                problems.push(format!(
                    "interpreted: {MAKE_BUFFERS}'s current_line should be {alloc_line} (its \
                     Buffer.alloc call), got {}\n{}",
                    frame["current_line"],
                    show_stack(stack, None)
                ));
            }
        }
    }
    eprintln!("totals.unnamed_js_frames = {unnamed_total}\n{listing}");
    assert!(
        problems.is_empty(),
        "{MAKE_BUFFERS} (declared at {TIERS}:{start}) should be named in every state:\n{}\n\n{listing}",
        problems.join("\n\n")
    );
    require_unnamed_js_frames(report);
}
