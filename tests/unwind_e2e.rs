//! Stacks compared with gdb's `bt` at the same malloc calls (issue 11): fixtures/unwind_paths.cpp
//! (-O1 -fno-omit-frame-pointer) allocates once per path, each path with a size of its own,
//! through operator new, std::string, strdup, qsort's comparator, a -O2 -fomit-frame-pointer
//! library that uses rbp as a general register, a signal handler, a dlopen'ed library and
//! inlined functions. The tracer records it and gdb stops at the same calls; each path is
//! checked in launch mode, attach mode, launch mode with the ptrace backend, and attach mode
//! sampling every allocation, with BPF and without
//! (`path::{launch,attach,ptrace,sampling,sampling_ptrace}`). The comparison rule is in
//! support/gdb.rs.
//!
//! The eBPF modes walk the stack in the kernel from the unwind rows (`--unwind auto`, the
//! default), the ptrace backend walks the same rows in user space. A failure prints both stacks
//! side by side with the first difference named. `node_stacks_match_gdb` measures the share of
//! a node workload's stacks that equal gdb's.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;
use support::gdb::{
    ExecMapping, GdbPlan, GdbRun, compare, exec_mappings, gdb_attach, gdb_entries, gdb_launch,
    invented_frames, matching_prefix, normalize_name, send_line, show_entry, tracer_entries,
};
use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, describe_top, fixtures_dir, num, record_launch_ok,
    setup, stacks, start_recording, stop_recording,
};

/// Each path of fixtures/unwind_paths.cpp and the size it mallocs (its table says the same).
/// Each path of fixtures/unwind_paths.cpp: the allocator it calls and the bytes it asks for
/// (the fixture's table says the same).
const PATHS: &[(&str, &str, u64)] = &[
    ("malloc", "malloc", 5110),
    ("new", "malloc", 5120),
    ("string", "malloc", 5130),
    ("strdup", "malloc", 5140),
    ("qsort", "malloc", 5150),
    ("deep", "malloc", 5160),
    ("signal", "malloc", 5170),
    ("dlopen", "malloc", 5180),
    ("inline", "malloc", 5190),
    ("calloc", "calloc", 5200),
    ("realloc", "realloc", 5220),
];

// ---------------------------------------------------------------------------------------------
// Building the fixture (once per test binary)

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run `{cmd:?}`: {e}"));
    assert!(
        out.status.success(),
        "{what}: `{cmd:?}` failed with {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The fixture and its two libraries, built into a directory of the test's target (kept, like
/// every build product: the stacks name these paths).
fn fixture() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("unwind_e2e");
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let src = fixtures_dir();
        for lib in ["unwind_deep", "unwind_plugin"] {
            run(
                Command::new("cc")
                    .args([
                        "-O2",
                        "-fomit-frame-pointer",
                        "-g",
                        "-shared",
                        "-fPIC",
                        "-o",
                    ])
                    .arg(dir.join(format!("lib{lib}.so")))
                    .arg(src.join(format!("{lib}.c"))),
                &format!("compile fixtures/{lib}.c"),
            );
        }
        let exe = dir.join("unwind_paths");
        run(
            Command::new("g++")
                .args(["-O1", "-g", "-fno-omit-frame-pointer", "-o"])
                .arg(&exe)
                .arg(src.join("unwind_paths.cpp"))
                .arg("-L")
                .arg(&dir)
                .args(["-lunwind_deep", "-Wl,-rpath,$ORIGIN", "-ldl", "-pthread"]),
            "compile fixtures/unwind_paths.cpp (g++ is Debian's g++ package)",
        );
        exe
    })
}

// ---------------------------------------------------------------------------------------------
// One recording and one gdb session per mode, shared by the tests of that mode

struct Observed {
    how: &'static str,
    report: Value,
    gdb: GdbRun,
    /// The fixture's executable mappings, as it printed them before exiting (tracer run).
    exec: Vec<ExecMapping>,
}

fn plan() -> GdbPlan {
    let calls: Vec<(&str, u64)> = PATHS.iter().map(|&(_, f, size)| (f, size)).collect();
    GdbPlan::sizes(&calls)
}

fn exec_from_output(lines: &[String]) -> Vec<ExecMapping> {
    let begin = lines.iter().position(|l| l == "maps-begin");
    let end = lines.iter().position(|l| l == "maps-end");
    let (Some(begin), Some(end)) = (begin, end) else {
        panic!(
            "the fixture printed no maps-begin/maps-end block:\n{}",
            lines.join("\n")
        );
    };
    let maps: Vec<&str> = lines[begin + 1..end].iter().map(String::as_str).collect();
    exec_mappings(&maps)
}

/// gdb's stacks of a launched fixture (one session for both backends).
fn gdb_launched() -> &'static GdbRun {
    static GDB: OnceLock<GdbRun> = OnceLock::new();
    GDB.get_or_init(|| gdb_launch(&plan(), fixture(), &[] as &[&str]))
}

fn record_launched(how: &'static str, extra: &[&str]) -> Observed {
    setup();
    let exe = fixture();
    let dir = TempDir::new("unwind-launch");
    let launch = record_launch_ok(&dir, extra, &[exe]);
    let lines: Vec<String> = launch.finished.stdout.lines().map(str::to_owned).collect();
    let exec = exec_from_output(&lines);
    Observed {
        how,
        report: launch.report,
        gdb: gdb_launched().clone(),
        exec,
    }
}

fn launched() -> &'static Observed {
    static LAUNCH: OnceLock<Observed> = OnceLock::new();
    LAUNCH.get_or_init(|| record_launched("launch mode", &[]))
}

/// Launch mode with the ptrace backend, which walks the stack in user space.
fn launched_ptrace() -> &'static Observed {
    static LAUNCH: OnceLock<Observed> = OnceLock::new();
    LAUNCH.get_or_init(|| record_launched("launch mode, ptrace backend", &["--backend", "ptrace"]))
}

/// Starts the fixture with --wait and returns it once it said "ready", with its stdin.
fn waiting_fixture() -> (Proc, std::process::ChildStdin) {
    let mut cmd = Command::new(fixture());
    cmd.arg("--wait");
    let (mut proc, stdin) = Proc::spawn_with_stdin("unwind_paths --wait", &mut cmd);
    proc.expect_stdout_line("ready", LINE_TIMEOUT);
    (proc, stdin)
}

/// gdb's stacks of a fixture it attached to (one session for every attach-mode recording).
fn gdb_attached() -> &'static GdbRun {
    static GDB: OnceLock<GdbRun> = OnceLock::new();
    GDB.get_or_init(|| {
        let (mut target, mut stdin) = waiting_fixture();
        let session = gdb_attach(&plan(), target.pid());
        send_line(&mut stdin, "go");
        target.expect_stdout_line("maps-end", LINE_TIMEOUT);
        drop(stdin);
        let gdb = session.finish();
        let status = target.wait_exit(EXIT_TIMEOUT);
        assert!(
            status.success(),
            "the fixture under gdb should exit 0: {status}"
        );
        gdb
    })
}

/// The tracer attaches (with `extra` options) to a waiting fixture, which then allocates.
fn record_attached(how: &'static str, extra: &[&str]) -> Observed {
    setup();
    let (mut target, mut stdin) = waiting_fixture();
    let mut args = vec!["--format", "json", "--top", "0"];
    args.extend_from_slice(extra);
    let mut tracer = start_recording(target.pid(), &args);
    send_line(&mut stdin, "go");
    target.expect_stdout_line("maps-end", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);
    let exec = exec_from_output(target.stdout.seen());
    drop(stdin);
    let status = target.wait_exit(EXIT_TIMEOUT);
    assert!(
        status.success(),
        "the fixture should exit 0 after the tracer detached: {status}"
    );
    Observed {
        how,
        report,
        gdb: gdb_attached().clone(),
        exec,
    }
}

fn attached() -> &'static Observed {
    static ATTACH: OnceLock<Observed> = OnceLock::new();
    ATTACH.get_or_init(|| record_attached("attach mode", &[]))
}

/// Attach mode, sampling every allocation (`--sample-bytes 1`: an allocation of s bytes is
/// sampled with probability 1 - e^-s): sampling mode runs without the mmap tracepoints, so
/// the dlopen'ed library must be found another way.
fn attached_sampling() -> &'static Observed {
    static ATTACH: OnceLock<Observed> = OnceLock::new();
    ATTACH.get_or_init(|| {
        record_attached(
            "attach mode, sampling (--sample-bytes 1)",
            &["--sample-bytes", "1"],
        )
    })
}

/// The same without BPF (`--backend ptrace`): the sampler's events come through a ring shared
/// with the tracer, each with a copy of the stack, walked in user space.
fn attached_sampling_ptrace() -> &'static Observed {
    static ATTACH: OnceLock<Observed> = OnceLock::new();
    ATTACH.get_or_init(|| {
        record_attached(
            "attach mode, sampling without BPF (--backend ptrace --sample-bytes 1)",
            &["--backend", "ptrace", "--sample-bytes", "1"],
        )
    })
}

// ---------------------------------------------------------------------------------------------
// The check

/// The report's stack of the path's single allocation of `size` bytes.
fn tracer_stack<'a>(seen: &'a Observed, path: &str, size: u64) -> &'a Value {
    let found: Vec<&Value> = stacks(&seen.report)
        .iter()
        .filter(|s| num(s, "alloc_bytes") == size && num(s, "allocs") == 1)
        .collect();
    assert!(
        found.len() == 1,
        "{}, path {path}: expected exactly one stack holding one {size}-byte allocation, found {}\n{}",
        seen.how,
        found.len(),
        describe_top(&seen.report, 30)
    );
    found[0]
}

fn check_path(seen: &Observed, path: &str) {
    let &(_, function, size) = PATHS
        .iter()
        .find(|(p, _, _)| *p == path)
        .unwrap_or_else(|| panic!("no path {path} in PATHS"));
    let tracer = tracer_entries(tracer_stack(seen, path, size));
    let gdb = gdb_entries(seen.gdb.stack_of(function, size));
    if let Err(diff) = compare(&gdb, &tracer) {
        panic!(
            "{}, path {path} ({function}, {size} bytes): the tracer's stack differs from gdb's bt\n{diff}",
            seen.how
        );
    }
}

#[test]
fn names_from_gdb_and_from_symbol_tables_compare_equal() {
    for (a, b) in [
        ("__GI___libc_malloc", "malloc"),
        ("__GI___strdup", "strdup"),
        ("leaf_new", "leaf_new(unsigned long)"),
        ("msort_with_tmp", "msort_with_tmp.part.0"),
        ("_IO_new_file_xsputn", "_IO_file_xsputn"),
        (
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char> >::_M_construct(unsigned long, char)",
            "std::__cxx11::basic_string<char, std::char_traits<char>, std::allocator<char>>::_M_construct(unsigned long, char)",
        ),
        ("leaf_string[abi:cxx11](unsigned long)", "leaf_string"),
        ("operator new(unsigned long)", "operator new"),
    ] {
        assert_eq!(normalize_name(a), normalize_name(b), "{a} vs {b}");
    }
    assert_ne!(normalize_name("leaf_new"), normalize_name("p2_new"));
    assert_eq!(normalize_name("operator()(int)"), "operator()");
    assert_eq!(normalize_name("operator()"), "operator()");
}

/// For each path: a test in launch mode, one in attach mode (eBPF), one in launch mode with
/// the ptrace backend, one in attach mode sampling every allocation, with BPF and without.
macro_rules! path_tests {
    ($( $name:ident, $path:literal );* $(;)?) => {$(
        mod $name {
            use super::*;

            #[test]
            fn launch() {
                check_path(launched(), $path);
            }

            #[test]
            fn attach() {
                check_path(attached(), $path);
            }

            // The ptrace backend walks the same rows in user space (unwind::process).
            #[test]
            fn ptrace() {
                check_path(launched_ptrace(), $path);
            }

            #[test]
            fn sampling() {
                check_path(attached_sampling(), $path);
            }

            #[test]
            fn sampling_ptrace() {
                check_path(attached_sampling_ptrace(), $path);
            }
        }
    )*};
}

path_tests! {
    malloc_from_frame_pointer_code, "malloc";
    new_char_array, "new";
    new_std_string, "string";
    strdup, "strdup";
    qsort_comparator, "qsort";
    omit_frame_pointer_library, "deep";
    signal_handler, "signal";
    dlopened_library, "dlopen";
    inlined_functions, "inline";
    calloc_from_frame_pointer_code, "calloc";
    realloc_from_frame_pointer_code, "realloc";
}

/// `--unwind fp` is the kernel's frame-pointer walk: the path through frame-pointer code
/// still equals gdb's, and the one through glibc's frameless `strdup` does not (so the default
/// walker is really another one).
#[test]
fn frame_pointer_mode_walks_frame_pointers_only() {
    let fp = record_launched("launch mode, --unwind fp", &["--unwind", "fp"]);
    check_path(&fp, "malloc");
    let &(_, function, size) = PATHS.iter().find(|(p, _, _)| *p == "strdup").expect("strdup path");
    let tracer = tracer_entries(tracer_stack(&fp, "strdup", size));
    let gdb = gdb_entries(fp.gdb.stack_of(function, size));
    assert!(
        compare(&gdb, &tracer).is_err(),
        "with --unwind fp the strdup path should lose frames inside glibc, yet it equals gdb's"
    );
}

/// `--unwind dwarf` ends a stack at the first frame without rows (JIT code), counted; `auto`
/// walks those by frame pointer, so the same node script has no such cut there.
#[test]
fn dwarf_mode_counts_frames_without_rows() {
    setup();
    let script = "const k = []; function keep(n) { for (let i = 0; i < n; i++) k.push(Buffer.alloc(4096 + i)); }                   for (let r = 0; r < 50; r++) keep(100);";
    let cut = |mode: &str| {
        let dir = TempDir::new("unwind-dwarf");
        let launch = record_launch_ok(&dir, &["--unwind", mode, "--no-jit-symbols"], &[NODE, "-e", script]);
        num(&launch.report["totals"]["dropped"], "stack_cut_no_unwind_rows")
    };
    let dwarf = cut("dwarf");
    let auto = cut("auto");
    assert!(dwarf > 0, "--unwind dwarf: no stack was cut at a frame without unwind rows (JIT code)");
    assert_eq!(auto, 0, "--unwind auto walks code without rows by frame pointer, yet {auto} stacks were cut there");
}

/// The deep library must really use rbp as a general register (else its path would test
/// nothing a frame-pointer walk cannot do): every deep_* function writes rbp from something
/// other than rsp.
#[test]
fn deep_library_uses_rbp_as_a_general_register() {
    let lib = fixture().with_file_name("libunwind_deep.so");
    let asm = run(
        Command::new("objdump")
            .args(["-d", "--no-show-raw-insn"])
            .arg(&lib),
        "disassemble libunwind_deep.so (objdump is Debian's binutils)",
    );
    for function in ["deep_a", "deep_b", "deep_c"] {
        let body: Vec<&str> = asm
            .split("\n\n")
            .find(|block| block.contains(&format!("<{function}>:")))
            .unwrap_or_else(|| panic!("objdump shows no {function} in {}", lib.display()))
            .lines()
            .collect();
        let writes_rbp = body
            .iter()
            .any(|l| l.contains(",%rbp") && !l.contains("%rsp,%rbp") && !l.contains("(%rbp"));
        let frame_setup = body.iter().any(|l| l.contains("mov    %rsp,%rbp"));
        assert!(
            writes_rbp && !frame_setup,
            "{function} should use rbp as a general register and set up no frame pointer:\n{}",
            body.join("\n")
        );
    }
}

/// No stack of the report has a frame outside every executable mapping of the process: a walk
/// that cannot go on must stop, not read data as return addresses. The deep library leaves
/// rbp pointing at words that are no code addresses when malloc is entered.
fn check_no_invented_frames(seen: &Observed) {
    let invented = invented_frames(&seen.report, &seen.exec);
    assert!(
        invented.is_empty(),
        "{}: {} frames lie in no executable mapping of the process (invented by the walk):\n  {}\n\
         executable mappings:\n  {}",
        seen.how,
        invented.len(),
        invented.join("\n  "),
        seen.exec
            .iter()
            .map(|m| format!("{:#x}-{:#x} {}", m.start, m.end, m.path))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

#[test]
fn no_invented_frames_launch() {
    check_no_invented_frames(launched());
}

#[test]
fn no_invented_frames_attach() {
    check_no_invented_frames(attached());
}

#[test]
fn no_invented_frames_ptrace() {
    check_no_invented_frames(launched_ptrace());
}

#[test]
fn no_invented_frames_sampling() {
    check_no_invented_frames(attached_sampling());
}

// ---------------------------------------------------------------------------------------------
// Node: the share of sampled allocation stacks that equal gdb's

const NODE: &str = "/usr/bin/node";
/// Rounds of fixtures/unwind_node.js's workload: about 25,000 malloc-family calls.
const NODE_ROUNDS: &str = "200";
/// gdb prints every k-th allocator call's stack, at most SAMPLES of them...
const NODE_EVERY: u64 = 50;
const NODE_SAMPLES: u64 = 400;
/// ...with frames 0-7 (the allocator and seven callers), compared as in the issue.
const NODE_DEPTH: usize = 8;
/// How long the workload may take under gdb (it runs about 8 times slower there).
const NODE_WORKLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn waiting_node() -> (Proc, std::process::ChildStdin) {
    let script = fixtures_dir().join("unwind_node.js");
    let mut cmd = Command::new(NODE);
    cmd.arg(&script).arg(NODE_ROUNDS);
    let (mut proc, stdin) = Proc::spawn_with_stdin("node unwind_node.js", &mut cmd);
    proc.expect_stdout_line("ready", LINE_TIMEOUT);
    (proc, stdin)
}

/// The node workload recorded by the tracer (attached), then sampled by gdb (attached to a
/// second run): for each of gdb's stacks, whether some stack of the report has the same
/// frames 0-7 (the rule of support/gdb.rs; JIT frames compare as "JIT" and end the
/// comparison, since their addresses differ between two runs). Prints the share, and the most
/// common places where the tracer's closest stack leaves gdb's.
///
/// The bar, 95%, is below the 98.8% the issue expects once the callers of frameless code
/// (operator new) are recovered, for what two runs of a JIT do differently.
#[test]
fn node_stacks_match_gdb() {
    setup();
    assert!(
        Path::new(NODE).exists(),
        "{NODE} is missing; these tests expect node 20 there"
    );

    let (mut node, mut stdin) = waiting_node();
    let mut tracer = start_recording(node.pid(), &["--format", "json", "--top", "0"]);
    send_line(&mut stdin, "go");
    node.expect_stdout_line("done", NODE_WORKLOAD_TIMEOUT);
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", node.pid()))
        .unwrap_or_else(|e| panic!("read node's maps: {e}"));
    let exec = exec_mappings(&maps.lines().collect::<Vec<_>>());
    let (_, report) = stop_recording(&mut tracer);
    drop(stdin);
    node.wait_exit(EXIT_TIMEOUT);

    let plan = GdbPlan {
        breaks: ["malloc", "calloc", "realloc"]
            .iter()
            .map(|f| ((*f).to_owned(), String::new()))
            .collect(),
        every: NODE_EVERY,
        max_hits: NODE_SAMPLES,
        depth: NODE_DEPTH as u64,
    };
    let (mut node, mut stdin) = waiting_node();
    let session = gdb_attach(&plan, node.pid());
    send_line(&mut stdin, "go");
    node.expect_stdout_line("done", NODE_WORKLOAD_TIMEOUT);
    drop(stdin);
    let gdb = session.finish();
    node.wait_exit(EXIT_TIMEOUT);

    let sampled = gdb.stacks.len();
    assert!(
        sampled >= 200,
        "gdb printed only {sampled} stacks (every {NODE_EVERY}th call, at most {NODE_SAMPLES}): \
         too few for a share\n{}",
        support::truncate(&gdb.output, 4000)
    );
    let recorded: Vec<Vec<support::gdb::Entry>> =
        stacks(&report).iter().map(tracer_entries).collect();
    let mut equal = 0;
    let mut departures: std::collections::BTreeMap<String, usize> = Default::default();
    let nothing = Vec::new();
    // (samples, equal) by the file of gdb's entry 1, the allocator's caller.
    let mut by_caller_file: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for stack in &gdb.stacks {
        let want = gdb_entries(stack);
        let caller_file = want
            .get(1)
            .and_then(|e| e.module.as_deref())
            .map_or("(no file: JIT)", |m| m.rsplit('/').next().unwrap_or(m))
            .to_owned();
        by_caller_file.entry(caller_file.clone()).or_default().0 += 1;
        // The closest recorded stack: the longest equal prefix, then the most of gdb's
        // places anywhere in it (so a stack that lost one frame beats an unrelated one).
        let score = |t: &Vec<support::gdb::Entry>| {
            let shared = want
                .iter()
                .take(NODE_DEPTH)
                .filter(|g| {
                    t.iter()
                        .any(|e| e.module == g.module && (e.offset == g.offset || !e.exact))
                })
                .count();
            (matching_prefix(&want, t, NODE_DEPTH), shared)
        };
        let closest = recorded.iter().max_by_key(|t| score(t)).unwrap_or(&nothing);
        let best = score(closest).0;
        if best >= NODE_DEPTH {
            equal += 1;
            by_caller_file.entry(caller_file).or_default().1 += 1;
            continue;
        }
        let same_place = |a: Option<&support::gdb::Entry>, b: Option<&support::gdb::Entry>| {
            matches!((a, b), (Some(a), Some(b))
                if a.module == b.module && (a.offset == b.offset || !a.exact))
        };
        let key = if closest.len() == best {
            format!(
                "entry {best}: the tracer's stack ends; gdb goes on with {}",
                show_entry(want.get(best))
            )
        } else if same_place(closest.get(best), want.get(best + 1)) {
            format!("entry {best}: lost {}", show_entry(want.get(best)))
        } else {
            format!(
                "entry {best}: gdb {} | tracer {}",
                show_entry(want.get(best)),
                show_entry(closest.get(best))
            )
        };
        *departures.entry(key).or_default() += 1;
    }
    let share = 100.0 * equal as f64 / sampled as f64;
    let mut common: Vec<(String, usize)> = departures.into_iter().collect();
    common.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let summary = format!(
        "node: {equal} of {sampled} sampled allocation stacks ({share:.1}%) equal gdb's frames 0-{}\n\
         by the file of the allocator's caller (gdb's entry 1): {}\n\
         frames of the report outside node's executable mappings at the end: {} \
         (JIT code freed before the end counts here too)\n\
         where the closest recorded stack leaves gdb's (count, first differing entry):\n{}",
        NODE_DEPTH - 1,
        by_caller_file
            .iter()
            .map(|(file, (n, ok))| format!("{file} {ok} of {n} equal"))
            .collect::<Vec<_>>()
            .join(", "),
        {
            let invented = invented_frames(&report, &exec);
            let first: Vec<&str> = invented.iter().take(3).map(String::as_str).collect();
            format!("{}\n    {}", invented.len(), first.join("\n    "))
        },
        common
            .iter()
            .take(15)
            .map(|(k, n)| format!("  {n:>4}  {k}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("{summary}");
    assert!(share >= 95.0, "{summary}");
}

// ---------------------------------------------------------------------------------------------
// The comparison itself, on fixed input (no process): it must accept equal stacks and name
// the first difference of unequal ones.

const GDB_SAMPLE: &str = "\
program output in between is skipped
GDB-HIT\t1\tmalloc\t5120
GDB-FRAME\t0\tnormal\t0x7ffff7ab6930\t/usr/lib/x86_64-linux-gnu/libc.so.6\t0x98930\t__GI___libc_malloc
GDB-FRAME\t1\tnormal\t0x7ffff7ca958c\t/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30\t0xa958c\toperator new(unsigned long)
GDB-FRAME\t2\tinline\t0x555555555474\t/x/unwind_paths\t0x1474\tinner
GDB-FRAME\t3\tnormal\t0x555555555474\t/x/unwind_paths\t0x1474\tleaf_new
GDB-FRAME\t4\tnormal\t0x555555555484\t/x/unwind_paths\t0x1484\tp2_new
GDB-FRAME\t5\tnormal\t0x555555555824\t/x/unwind_paths\t0x1824\tmain
GDB-FRAME\t6\tnormal\t0x7ffff7a4524a\t/usr/lib/x86_64-linux-gnu/libc.so.6\t0x2724a\t__libc_start_call_main
GDB-END\t1
GDB-DONE\t1
";

fn report_frame(module: &str, offset: u64, function: &str, inlined: bool) -> Value {
    serde_json::json!({
        "address": 0x1000_0000 + offset, "module": module, "offset": offset,
        "function": function, "file": null, "line": null, "inlined": inlined, "kind": "native",
    })
}

fn sample_report_stack(skip_leaf_new: bool, variants: u64) -> Value {
    let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    let mut frames = vec![
        report_frame(libc, 0x98930, "malloc", false),
        report_frame(
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.30",
            0xa958c,
            "operator new(unsigned long)",
            false,
        ),
    ];
    if !skip_leaf_new {
        frames.push(report_frame("/x/unwind_paths", 0x1474, "inner", true));
        frames.push(report_frame(
            "/x/unwind_paths",
            0x1474,
            "leaf_new(unsigned long)",
            false,
        ));
    }
    frames.push(report_frame("/x/unwind_paths", 0x1484, "p2_new()", false));
    frames.push(report_frame("/x/unwind_paths", 0x1824, "main", false));
    // Past gdb's main: not compared.
    frames.push(report_frame(libc, 0x99999, "anything", false));
    serde_json::json!({ "frames": frames, "variants": variants })
}

/// The name the comparison gives a frame gdb leaves unnamed (node's second mapping of its
/// builtins) agrees with binutils: `nm` for the symbol's address, `readelf -l` for the segment
/// that loads it, and a file offset inside the symbol names it; one just outside does not.
#[test]
fn unnamed_gdb_frames_are_named_from_the_symbol_table() {
    let symbol = "Builtins_JSBuiltinsConstructStub";
    let nm = run(Command::new("nm").args(["-S", NODE]), "nm node");
    let (addr, size) = nm
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 4 && f[3] == symbol).then(|| {
                (u64::from_str_radix(f[0], 16).unwrap(), u64::from_str_radix(f[1], 16).unwrap())
            })
        })
        .unwrap_or_else(|| panic!("nm shows no {symbol} in {NODE}"));
    let segments = run(Command::new("readelf").args(["-lW", NODE]), "readelf -l node");
    let offset = segments
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
            let (off, vaddr, filesz) = (hex(f[1]), hex(f[2]), hex(f[4]));
            (addr >= vaddr && addr < vaddr + filesz).then(|| off + (addr - vaddr))
        })
        .unwrap_or_else(|| panic!("no PT_LOAD of {NODE} holds {addr:#x}"));
    assert_eq!(support::gdb::symbol_at_file_offset(NODE, offset + 5).as_deref(), Some(symbol));
    assert_ne!(support::gdb::symbol_at_file_offset(NODE, offset + size).as_deref(), Some(symbol));
}

#[test]
fn comparison_accepts_equal_stacks_and_names_the_first_difference() {
    let parsed = support::gdb::parse_output(GDB_SAMPLE).expect("the sample parses");
    assert_eq!(parsed.len(), 1);
    assert_eq!((parsed[0].size, parsed[0].frames.len()), (5120, 7));
    let gdb = gdb_entries(&parsed[0]);

    let same = tracer_entries(&sample_report_stack(false, 1));
    compare(&gdb, &same).unwrap_or_else(|diff| panic!("equal stacks compared unequal:\n{diff}"));
    assert_eq!(matching_prefix(&gdb, &same, 6), 6);

    let lost = tracer_entries(&sample_report_stack(true, 1));
    let diff = compare(&gdb, &lost).expect_err("a stack without leaf_new must differ");
    assert!(
        diff.starts_with("entry 2: gdb has inner at unwind_paths+0x1474, the tracer p2_new() at unwind_paths+0x1484"),
        "the first difference should be named first:\n{diff}"
    );
    assert_eq!(matching_prefix(&gdb, &lost, 6), 2);

    // One frame moved within its function: unequal, unless the report merged variants.
    let mut moved = sample_report_stack(false, 1);
    moved["frames"][4]["offset"] = 0x1490.into();
    let diff = compare(&gdb, &tracer_entries(&moved)).expect_err("another call site must differ");
    assert!(
        diff.starts_with("entry 4: gdb has p2_new at unwind_paths+0x1484"),
        "{diff}"
    );
    moved["variants"] = 2.into();
    compare(&gdb, &tracer_entries(&moved))
        .unwrap_or_else(|diff| panic!("a merged stack compares by name:\n{diff}"));

    // An inlined entry must be inlined on both sides.
    let mut flat = sample_report_stack(false, 1);
    flat["frames"][2]["inlined"] = false.into();
    let diff = compare(&gdb, &tracer_entries(&flat)).expect_err("inlined flag differs");
    assert!(
        diff.starts_with("entry 2: inlined on one side only"),
        "{diff}"
    );
}

#[test]
fn invented_frames_are_those_outside_every_executable_mapping() {
    let exec = exec_mappings(&[
        "555555554000-555555555000 r--p 00000000 fe:00 1 /x/unwind_paths",
        "555555555000-555555556000 r-xp 00001000 fe:00 1 /x/unwind_paths",
        "7f0000000000-7f0000001000 r-xp 00000000 00:00 0 ",
    ]);
    assert_eq!(exec.len(), 2, "{exec:?}");
    let frame = |address: u64| serde_json::json!({ "address": address, "module": null });
    let report = serde_json::json!({ "stacks": [
        { "frames": [frame(0x5555_5555_5100), frame(0x7f00_0000_0010)] },
        { "frames": [frame(0x5555_5555_5100), frame(0x20), frame(0x5555_5555_4100)] },
    ]});
    let invented = invented_frames(&report, &exec);
    assert_eq!(invented.len(), 2, "{invented:#?}");
    assert!(invented[0].starts_with("frame 1 at 0x20 "), "{invented:#?}");
    assert!(
        invented[1].starts_with("frame 2 at 0x555555554100 "),
        "{invented:#?}"
    );
}
