//! Readable frames: inlined functions with file and line from DWARF, separate debug files found
//! by build id and by debuglink, and node's JavaScript functions named from its perf map.

mod support;

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, Proc, TempDir, build_fixture, build_fixture_as, describe_top,
    fixtures_dir, frame_function, num, parse_report, record_launch, run_tracer, setup, stacks,
    start_recording, stop_recording, usage_by_caller,
};

const RECORDS: u64 = 40;
const RECORD_SIZE: u64 = 1000;
const NODE: &str = "/usr/bin/node";
const JS_FUNCTION: &str = "retainBuffersForTracer";
const RETAINED: u64 = 16 * 1024 * 1024;
const ALLOCATOR: &str = "node::NodeArrayBufferAllocator::Allocate";

fn run(cmd: &mut Command, what: &str) {
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
}

/// fixtures/inlined.c built with -O2 -g (and frame pointers, which the stack walk needs).
fn build_inlined(dir: &TempDir, name: &str) -> PathBuf {
    let out = dir.join(name);
    run(
        Command::new("cc")
            .args([
                "-O2",
                "-g",
                "-fno-omit-frame-pointer",
                "-Wl,--build-id",
                "-o",
            ])
            .arg(&out)
            .arg(fixtures_dir().join("inlined.c")),
        "compile fixtures/inlined.c",
    );
    out
}

/// The 1-based line of fixtures/inlined.c that carries `// MARKER`.
fn marker_line(marker: &str) -> u64 {
    let path = fixtures_dir().join("inlined.c");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let found: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.trim_end().ends_with(&format!("// {marker}")))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{marker} should mark exactly one line of {}",
        path.display()
    );
    found[0] as u64
}

fn frames(stack: &Value) -> &[Value] {
    stack
        .get("frames")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn str_field<'a>(frame: &'a Value, key: &str) -> Option<&'a str> {
    frame.get(key).and_then(Value::as_str)
}

fn describe_frames(stack: &Value) -> String {
    frames(stack)
        .iter()
        .map(|f| {
            format!(
                "    {} {}:{} inlined={} kind={} ({}+{:#x})",
                str_field(f, "function").unwrap_or("?"),
                str_field(f, "file").unwrap_or("?"),
                f.get("line").map_or("?".to_owned(), Value::to_string),
                f.get("inlined").map_or("?".to_owned(), Value::to_string),
                str_field(f, "kind").unwrap_or("?"),
                str_field(f, "module").unwrap_or("?"),
                f.get("offset").and_then(Value::as_u64).unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The stacks whose frames include a function named `name`.
fn stacks_through<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    stacks(report)
        .iter()
        .filter(|s| {
            frames(s)
                .iter()
                .any(|f| str_field(f, "function") == Some(name))
        })
        .collect()
}

/// The report of fixtures/inlined.c must show: malloc, then make_record (inlined, at the
/// malloc line), then fill_table (the real frame, at the line calling make_record), then main;
/// holding exactly the fixture's 40 records.
fn check_inlined_report(report: &Value, how: &str) {
    let through = stacks_through(report, "make_record");
    assert_eq!(
        through.len(),
        1,
        "{how}: exactly one stack should pass through the inlined make_record\n{}",
        describe_top(report, 8)
    );
    let stack = through[0];
    let detail = || {
        format!(
            "{how}: the stack through make_record:\n{}",
            describe_frames(stack)
        )
    };
    assert_eq!(
        (num(stack, "live_bytes"), num(stack, "live_allocs")),
        (RECORDS * RECORD_SIZE, RECORDS),
        "{}",
        detail()
    );
    let f = frames(stack);
    assert!(f.len() >= 4, "{}", detail());
    assert_eq!(str_field(&f[0], "function"), Some("malloc"), "{}", detail());

    let inlined = &f[1];
    let caller = &f[2];
    assert_eq!(
        str_field(inlined, "function"),
        Some("make_record"),
        "{}",
        detail()
    );
    assert_eq!(
        inlined.get("inlined"),
        Some(&Value::Bool(true)),
        "{}",
        detail()
    );
    assert_eq!(str_field(inlined, "kind"), Some("native"), "{}", detail());
    assert!(
        str_field(inlined, "file").is_some_and(|p| p.ends_with("fixtures/inlined.c")),
        "{}",
        detail()
    );
    assert_eq!(
        num(inlined, "line"),
        marker_line("LINE_MALLOC"),
        "{}",
        detail()
    );

    assert_eq!(
        str_field(caller, "function"),
        Some("fill_table"),
        "{}",
        detail()
    );
    assert_eq!(
        caller.get("inlined"),
        Some(&Value::Bool(false)),
        "{}",
        detail()
    );
    assert!(
        str_field(caller, "file").is_some_and(|p| p.ends_with("fixtures/inlined.c")),
        "{}",
        detail()
    );
    assert_eq!(
        num(caller, "line"),
        marker_line("LINE_CALL"),
        "{}",
        detail()
    );
    assert_eq!(
        num(inlined, "address"),
        num(caller, "address"),
        "an inlined frame shares its address with the frame it was inlined into\n{}",
        detail()
    );
    assert_eq!(str_field(&f[3], "function"), Some("main"), "{}", detail());
}

fn record_json(dir: &TempDir, extra: &[&str], cmd: &[OsString]) -> Value {
    support::record_launch_ok(dir, extra, cmd).report
}

#[test]
fn inlined_helper_is_shown_with_its_file_line_and_caller() {
    setup();
    let dir = TempDir::new("inlined");
    let bin = build_inlined(&dir, "inlined");
    let launch = record_launch(&dir, &[&bin]);
    assert_eq!(
        launch.finished.status.code(),
        Some(0),
        "{}",
        launch.finished.describe()
    );
    check_inlined_report(&launch.report, "-O2 -g build");
}

/// Splits the fixture's debug information into `bin.debug` and strips `bin` completely.
fn split_debug(dir: &TempDir, name: &str) -> (PathBuf, PathBuf) {
    let bin = build_inlined(dir, name);
    let debug = dir.join(&format!("{name}.debug"));
    run(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(&bin)
            .arg(&debug),
        "objcopy --only-keep-debug",
    );
    run(
        Command::new("strip").arg("--strip-all").arg(&bin),
        "strip --strip-all",
    );
    (bin, debug)
}

fn build_id_hex(path: &Path) -> String {
    use object::Object;
    let data = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let file =
        object::File::parse(&*data).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    let id = file.build_id().ok().flatten().unwrap_or_else(|| {
        panic!(
            "{} has no build id (linked with --build-id)",
            path.display()
        )
    });
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn split_debug_info_is_found_by_build_id() {
    setup();
    let dir = TempDir::new("split-build-id");
    let (bin, debug) = split_debug(&dir, "stripped");

    // Control: stripped and no debug file in reach, nothing names the fixture's frames.
    let bare = record_json(&dir, &[], &[bin.clone().into_os_string()]);
    assert!(
        stacks_through(&bare, "make_record").is_empty()
            && stacks_through(&bare, "fill_table").is_empty(),
        "a stripped binary without its debug file should have no names\n{}",
        describe_top(&bare, 5)
    );

    // The debug directory is the test's own, passed with --debug-dir, so nothing is written
    // under /usr/lib/debug.
    let id = build_id_hex(&bin);
    let debug_root = dir.join("debug-root");
    let place = debug_root.join(format!(".build-id/{}/{}.debug", &id[..2], &id[2..]));
    fs::create_dir_all(place.parent().unwrap()).unwrap();
    fs::rename(&debug, &place).unwrap();
    let report = record_json(
        &dir,
        &["--debug-dir", debug_root.to_str().unwrap()],
        &[bin.into_os_string()],
    );
    check_inlined_report(&report, "stripped, debug file by build id");
}

#[test]
fn split_debug_info_is_found_by_debuglink() {
    setup();
    let dir = TempDir::new("split-debuglink");
    let (bin, debug) = split_debug(&dir, "linked");
    // The debuglink holds the debug file's name and CRC; it is found next to the binary.
    run(
        Command::new("objcopy")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(&bin),
        "objcopy --add-gnu-debuglink",
    );
    let report = record_json(&dir, &[], &[bin.into_os_string()]);
    check_inlined_report(&report, "stripped, debug file by debuglink");
}

fn remove_perf_map(report: &Value) {
    let _ = fs::remove_file(format!("/tmp/perf-{}.map", num(report, "pid")));
}

/// The line of fixtures/buffers_named.js where the retaining function starts.
fn js_function_line() -> u64 {
    let path = fixtures_dir().join("buffers_named.js");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let line = text
        .lines()
        .position(|l| l.starts_with(&format!("function {JS_FUNCTION}(")))
        .unwrap_or_else(|| panic!("{} defines no function {JS_FUNCTION}", path.display()));
    line as u64 + 1
}

/// The top stack names the script's function (with the script and its line), and
/// the stacks through it and node's ArrayBuffer allocator hold exactly its 16 MiB.
fn check_js_function_named(report: &Value, script: &Path) {
    let top = stacks(report)
        .iter()
        .max_by_key(|s| num(s, "live_bytes"))
        .expect("the report has stacks");
    let named = frames(top)
        .iter()
        .find(|f| str_field(f, "function") == Some(JS_FUNCTION))
        .unwrap_or_else(|| {
            panic!(
                "the top stack should name the script's function {JS_FUNCTION}:\n{}\n{}",
                describe_frames(top),
                describe_top(report, 3)
            )
        });
    // Named from V8's memory (`js`, the default walker) or from the perf map (`jit`): the
    // same function, script and line either way.
    assert!(matches!(str_field(named, "kind"), Some("js" | "jit")), "{named}");
    assert_eq!(str_field(named, "file"), script.to_str(), "{named}");
    // V8's perf map gives where the function starts: `function retainBuffersForTracer(`.
    assert_eq!(num(named, "line"), js_function_line(), "{named}");
    assert_eq!(named.get("module"), Some(&Value::Null), "{named}");

    // Its Buffers' backing stores come from node's ArrayBuffer allocator (the small metadata
    // V8 allocates per Buffer comes through other callers).
    let buffers: Vec<&Value> = stacks_through(report, JS_FUNCTION)
        .into_iter()
        .filter(|s| {
            frames(s)
                .get(1)
                .and_then(|f| str_field(f, "function"))
                .is_some_and(|f| f.starts_with(ALLOCATOR))
        })
        .collect();
    let held: (u64, u64) = buffers.iter().fold((0, 0), |(b, n), s| {
        (b + num(s, "live_bytes"), n + num(s, "live_allocs"))
    });
    assert_eq!(
        held,
        (RETAINED, 16),
        "the stacks through {JS_FUNCTION} and {ALLOCATOR} should hold exactly its 16 Buffers \
         of 1 MiB\n{}",
        describe_top(report, 5)
    );
}

#[test]
fn node_jit_frames_name_the_scripts_own_function() {
    setup();
    assert!(
        Path::new(NODE).is_file(),
        "{NODE} is missing; these tests expect node 20 there"
    );
    let dir = TempDir::new("node-jit");
    let script = fixtures_dir().join("buffers_named.js");
    let report = record_json(&dir, &[], &[NODE.into(), script.clone().into_os_string()]);
    let map = format!("/tmp/perf-{}.map", num(&report, "pid"));
    let left_behind = Path::new(&map).exists();
    remove_perf_map(&report);
    assert!(
        !left_behind,
        "node wrote {map} because the tracer asked it to: once node has exited, the tracer \
         should remove it"
    );

    check_js_function_named(&report, &script);
}

/// Attached to a node that was started with the perf-map flags by hand: the map is read
/// through /proc/PID/root while node runs, and grows while the tracer watches (the function is
/// compiled only when the signal comes, after the tracer attached).
#[test]
fn attached_node_with_a_perf_map_gets_its_functions_named() {
    setup();
    let script = fixtures_dir().join("buffers_named.js");
    let mut cmd = Command::new(NODE);
    cmd.args([
        "--perf-basic-prof-only-functions",
        "--interpreted-frames-native-stack",
    ])
    .arg(&script)
    .arg("on-signal");
    let mut node = Proc::spawn("node buffers_named.js on-signal", &mut cmd);
    node.expect_stdout_line("ready", LINE_TIMEOUT);
    let map = format!("/tmp/perf-{}.map", node.pid());

    // Frame pointers: JIT frames are then named by the perf map alone (the default walker
    // names them from V8's memory: tests/js_names_e2e.rs).
    let mut tracer = start_recording(node.pid(), &["--unwind", "fp", "--top", "0", "--format", "json"]);
    node.signal(libc::SIGUSR2);
    node.expect_stdout_line("retained", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);
    drop(node);
    let _ = fs::remove_file(&map);
    check_js_function_named(&report, &script);
}

/// Without a perf map, code that V8 generated shows as `[jit] 0x...` and the tracer says once
/// how to get names. node is given --interpreted-frames-native-stack by hand, so that its
/// interpreted functions run from JIT code copies (without it they all show as node's own
/// Builtins_InterpreterEntryTrampoline), but not the perf-map flag.
#[test]
fn node_without_jit_symbols_shows_jit_addresses_and_says_how_to_name_them() {
    setup();
    let dir = TempDir::new("node-no-jit");
    let script = fixtures_dir().join("buffers_named.js");
    let report_path = dir.join("report.json");
    let args: Vec<OsString> = vec![
        "record".into(),
        "--format".into(),
        "json".into(),
        "-o".into(),
        report_path.clone().into_os_string(),
        "--no-jit-symbols".into(),
        // Frame pointers: without the perf map, nothing names the JIT frames (the default
        // walker would, from V8's memory: tests/js_names_e2e.rs).
        "--unwind".into(),
        "fp".into(),
        "--".into(),
        NODE.into(),
        "--interpreted-frames-native-stack".into(),
        script.into_os_string(),
    ];
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(0), "{}", finished.describe());
    let text = fs::read_to_string(&report_path).expect("report written");
    let report = parse_report(&text, &finished);
    let pid = num(&report, "pid");
    let map = format!("/tmp/perf-{pid}.map");
    let map_existed = Path::new(&map).exists();
    remove_perf_map(&report);
    assert!(
        !map_existed,
        "--no-jit-symbols: node should not have written {map}"
    );

    assert!(
        stacks_through(&report, JS_FUNCTION).is_empty(),
        "without a perf map nothing can name {JS_FUNCTION}"
    );
    let top = stacks(&report)
        .iter()
        .max_by_key(|s| num(s, "live_bytes"))
        .expect("the report has stacks");
    let jit: Vec<&Value> = frames(top)
        .iter()
        .filter(|f| str_field(f, "kind") == Some("jit"))
        .collect();
    assert!(
        !jit.is_empty() && jit.iter().all(|f| f.get("function") == Some(&Value::Null)),
        "the top stack should have unnamed JIT frames:\n{}",
        describe_frames(top)
    );
    let hints: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("JIT frames are unnamed"))
        .collect();
    assert_eq!(
        hints.len(),
        1,
        "the hint should be given once:\n{}",
        finished.stderr
    );
    assert!(
        hints[0].starts_with("tracer: ") && hints[0].contains("--perf-basic-prof-only-functions"),
        "{}",
        hints[0]
    );
}

/// A deploy replaces a service's binary on disk while the old one runs. Read by its path, the
/// new file would name the running code's frames after whatever sits at those offsets now
/// (fixtures/replaced.c's new build puts a 64 KiB function first): the tracer must read the
/// file the process actually maps, and say that the path names another one.
#[test]
fn frames_of_a_binary_replaced_on_disk_are_named_from_the_running_build() {
    setup();
    let dir = TempDir::new("replaced");
    let running = build_fixture(&dir, "replaced");
    let new_build = build_fixture_as(&dir, "replaced", "replaced.new", &["-DNEW_BUILD"]);
    let mut service = Proc::spawn("replaced", &mut Command::new(&running));
    service.expect_stdout_line("ready", LINE_TIMEOUT);
    // The deploy: the new file takes the old one's name; the process runs on with the old.
    fs::rename(&new_build, &running).unwrap_or_else(|e| panic!("rename over {}: {e}", running.display()));

    let mut tracer = start_recording(service.pid(), &["--format", "json", "--top", "0"]);
    service.signal(libc::SIGUSR1);
    service.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (finished, report) = stop_recording(&mut tracer);
    service.signal(libc::SIGUSR2);
    service.expect_stdout_line("ok", LINE_TIMEOUT);

    let kept = usage_by_caller(&report, "keep_in_running_build");
    assert_eq!(
        (kept.live_bytes, kept.live_allocs),
        (5 * 7000, 5),
        "the running build's keep_in_running_build kept 5 blocks of 7000 bytes\n{}",
        describe_top(&report, 5)
    );
    let wrong: Vec<String> = stacks(&report)
        .iter()
        .flat_map(|s| (0..frames(s).len()).filter_map(move |i| frame_function(s, i)))
        .filter(|f| f.contains("new_build"))
        .map(str::to_owned)
        .collect();
    assert!(
        wrong.is_empty(),
        "frames named from the new file on disk, which the process does not run: {wrong:?}\n{}",
        describe_top(&report, 5)
    );
    let said: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|l| l.contains("is not the file the process maps"))
        .collect();
    assert_eq!(
        said,
        [format!(
            "tracer: {} on disk is not the file the process maps (replaced since it was mapped); \
             its frames are named from the mapped file",
            running.display()
        )],
        "the tracer should say once that the binary was replaced\n{}",
        finished.describe()
    );
}

/// /tmp/perf-PID.map is read as root from a directory anyone can write to: a file planted
/// there under the pid's name (here a symbolic link to someone's own map) must not name the
/// process's JIT frames.
#[test]
fn a_perf_map_planted_as_a_symlink_is_not_read() {
    setup();
    let dir = TempDir::new("perfmap-planted");
    let script = fixtures_dir().join("buffers_named.js");
    // JIT code for interpreted functions, but no perf map of node's own.
    let mut cmd = Command::new(NODE);
    cmd.arg("--interpreted-frames-native-stack").arg(&script).arg("on-signal");
    let mut node = Proc::spawn("node buffers_named.js on-signal", &mut cmd);
    node.expect_stdout_line("ready", LINE_TIMEOUT);
    let planted = dir.join("planted.map");
    fs::write(&planted, "1000 7ffffffff000 planted_name\n").expect("write the planted map");
    let map = PathBuf::from(format!("/tmp/perf-{}.map", node.pid()));
    std::os::unix::fs::symlink(&planted, &map).unwrap_or_else(|e| panic!("symlink {}: {e}", map.display()));
    /// Removes the planted link however the test ends.
    struct Planted(PathBuf);
    impl Drop for Planted {
        fn drop(&mut self) {
            let _ = fs::remove_file(&self.0);
        }
    }
    let _planted = Planted(map.clone());

    // Frame pointers: JIT frames are then named by the perf map alone (the default walker
    // names them from V8's memory: tests/js_names_e2e.rs).
    let mut tracer = start_recording(node.pid(), &["--unwind", "fp", "--top", "0", "--format", "json"]);
    node.signal(libc::SIGUSR2);
    node.expect_stdout_line("retained", LINE_TIMEOUT);
    let (finished, report) = stop_recording(&mut tracer);

    let named: Vec<&Value> = stacks(&report)
        .iter()
        .flat_map(|s| frames(s).iter())
        .filter(|f| str_field(f, "function") == Some("planted_name"))
        .collect();
    assert!(
        named.is_empty(),
        "{} frames were named from the planted symlink {}\n{}",
        named.len(),
        map.display(),
        describe_top(&report, 3)
    );
    let jit = stacks(&report)
        .iter()
        .flat_map(|s| frames(s).iter())
        .filter(|f| str_field(f, "kind") == Some("jit"))
        .count();
    assert!(jit > 0, "the report should have JIT frames\n{}", describe_top(&report, 3));
    let hint = format!("{} was not read: it is a symbolic link", map.display());
    assert!(
        finished.stderr.lines().any(|l| l.starts_with("tracer: ") && l.ends_with(&hint)),
        "the tracer should say why the map was not read ({hint:?})\n{}",
        finished.describe()
    );
}
