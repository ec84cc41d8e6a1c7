//! Node processes that hold about 35 MiB of native memory (a native addon's malloc wrapped as
//! external Buffers, unfinished zlib streams, an addon's plain malloc), recorded while they
//! hold it: the holder must come first in text, in JSON and as the SVG's widest tower, ahead
//! of reserved thread stacks and V8's reservations, and no two of the top 20 stacks may print
//! the same frames.

mod support;

use std::{
    collections::HashMap,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, Proc, TempDir, describe_top, fixtures_dir, frame_function, num, run_tracer, setup, stacks,
    tracer_bin,
};

const NODE: &str = "/usr/bin/node";
/// Node under the tracer, with the JIT-naming flags, on a loaded machine: start-up is slow.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds tests/fixtures/holder_addon.c as an N-API addon into `dir`.
fn build_addon(dir: &TempDir) -> PathBuf {
    let out = dir.join("holder.node");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-g", "-fno-omit-frame-pointer", "-I/usr/include/node", "-o"])
        .arg(&out)
        .arg(fixtures_dir().join("holder_addon.c"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run cc ({e}); install gcc (`cargo xtask prereqs`)"));
    assert!(
        output.status.success(),
        "building the addon failed (node headers in /usr/include/node?)\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Records `node holders.js ARGS` in launch mode until it says it holds its memory, then
/// stops recording (SIGINT) and lets node go. Returns the saved JSON report's path.
fn record_holding(dir: &TempDir, args: &[&Path]) -> (PathBuf, Value) {
    assert!(Path::new(NODE).is_file(), "{NODE} is missing; these tests expect node 20 there");
    let report_path = dir.join("report.json");
    let done = dir.join("done");
    let mut cmd = Command::new(tracer_bin());
    cmd.args(["record", "--top", "0", "--format", "json", "-o"])
        .arg(&report_path)
        .args(["--", NODE])
        .arg(fixtures_dir().join("holders.js"))
        .args(args)
        .env("HOLDERS_DONE", &done);
    let mut tracer = Proc::spawn("tracer record -- node holders.js", &mut cmd);
    tracer.expect_stdout_line("ready", READY_TIMEOUT);
    // A tick for the tracer to drain the last mmap-family events.
    std::thread::sleep(Duration::from_millis(300));
    tracer.signal(libc::SIGINT);
    // The report is written before the tracer waits for node, which holds on until told.
    let deadline = Instant::now() + EXIT_TIMEOUT;
    let report = loop {
        let parsed = std::fs::read_to_string(&report_path)
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok());
        if let Some(report) = parsed {
            break report;
        }
        if Instant::now() > deadline || !tracer.running() {
            let finished = tracer.finish(Duration::from_secs(5));
            panic!("no complete report at {}\n{}", report_path.display(), finished.describe());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::fs::write(&done, b"").expect("write the done file");
    let finished = tracer.finish(EXIT_TIMEOUT);
    assert_eq!(finished.status.code(), Some(0), "tracer and node should exit 0\n{}", finished.describe());
    (report_path, report)
}

/// `tracer report FILE --format FORMAT`.
fn render(report: &Path, format: &str) -> String {
    let args: Vec<OsString> = vec!["report".into(), report.into(), "--format".into(), format.into()];
    let finished = run_tracer(&args, EXIT_TIMEOUT);
    assert!(finished.status.success(), "tracer report --format {format}\n{}", finished.describe());
    finished.stdout
}

/// How a frame prints: its name (or module and offset), and where in the source.
fn frame_key(f: &Value) -> String {
    let name = match f["function"].as_str() {
        Some(function) => function.to_owned(),
        None => format!("{}+{}", f["module"].as_str().unwrap_or("[unknown]"), f["offset"]),
    };
    format!("{name} {}:{} {}", f["file"], f["line"], f["inlined"])
}

/// One frame of an inferno SVG: `<g><title>NAME (...)</title><rect ... y=".." fg:x=".." fg:w=".."/>`.
#[derive(Debug)]
struct Rect {
    name: String,
    y: f64,
    x: u64,
    w: u64,
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let at = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&tag[at..at + tag[at..].find('"')?])
}

fn svg_rects(svg: &str) -> Vec<Rect> {
    svg.split("<g><title>")
        .skip(1)
        .filter_map(|g| {
            let (title, rest) = g.split_once("</title>")?;
            let rect = &rest[..rest.find("/>")?];
            let name = title.rsplit_once(" (").map_or(title, |(n, _)| n);
            Some(Rect {
                name: name.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").replace("&quot;", "\""),
                y: attr(rect, "y")?.parse().ok()?,
                x: attr(rect, "fg:x")?.parse().ok()?,
                w: attr(rect, "fg:w")?.parse().ok()?,
            })
        })
        .collect()
}

/// Whether `a` lies on the same tower as `b`: one is drawn on top of the other.
fn same_tower(a: &Rect, b: &Rect) -> bool {
    let inside = |i: &Rect, o: &Rect| o.x <= i.x && i.x + i.w <= o.x + o.w;
    (a.y <= b.y && inside(a, b)) || (b.y <= a.y && inside(b, a))
}

/// The checks of the acceptance, every failure listed.
fn check_holder(report_path: &Path, report: &Value, holder: &str, is_holder: impl Fn(&Value) -> bool) {
    let mut wrong = Vec::new();
    let all = stacks(report);

    // JSON: the first stack.
    match all.first() {
        Some(first) if is_holder(first) => {}
        _ => wrong.push(format!("JSON: stack #1 is not the holder ({holder})")),
    }

    // Text: the block of #1 names the holder.
    let text = render(report_path, "text");
    let first_block: String = text
        .split("\n#")
        .find(|b| b.starts_with("1 "))
        .unwrap_or("")
        .to_owned();
    if !first_block.contains(holder) {
        wrong.push(format!("text: #1 does not go through {holder}:\n#{first_block}"));
    }

    // SVG: the holder's frame is wider than every frame that is not on its tower.
    let svg = render(report_path, "svg");
    let rects = svg_rects(&svg);
    match rects.iter().filter(|r| r.name.contains(holder)).max_by_key(|r| r.w) {
        None => wrong.push(format!("SVG: no frame named {holder} among {} frames", rects.len())),
        Some(h) => {
            let wider: Vec<String> = rects
                .iter()
                .filter(|r| r.w >= h.w && !same_tower(r, h))
                .map(|r| format!("{} ({} bytes)", r.name, r.w))
                .collect();
            if !wider.is_empty() {
                wrong.push(format!(
                    "SVG: {holder} ({} bytes) is not the widest tower; as wide or wider: {}",
                    h.w,
                    wider.join(", ")
                ));
            }
        }
    }

    // No two of the top 20 print the same frames.
    let mut seen: HashMap<Vec<String>, usize> = HashMap::new();
    for (i, s) in all.iter().take(20).enumerate() {
        let frames: Vec<String> = s["frames"].as_array().map(|f| f.iter().map(frame_key).collect()).unwrap_or_default();
        let key = [vec![s["source"].to_string()], frames].concat();
        if let Some(j) = seen.insert(key, i) {
            wrong.push(format!("stacks #{} and #{} print the same frames", j + 1, i + 1));
        }
    }

    assert!(wrong.is_empty(), "{}\n--- top stacks ---\n{}", wrong.join("\n"), describe_top(report, 8));
}

#[test]
fn addon_malloc_wrapped_as_external_buffers_ranks_first() {
    setup();
    let dir = TempDir::new("holders_external");
    let addon = build_addon(&dir);
    let (path, report) = record_holding(&dir, &[Path::new("external"), &addon]);
    let held: u64 = stacks(&report)
        .iter()
        .filter(|s| frame_function(s, 1) == Some("hold_external"))
        .map(|s| num(s, "live_bytes"))
        .sum();
    assert_eq!(held, 35 << 20, "hold_external's 35 x 1 MiB\n{}", describe_top(&report, 5));
    check_holder(&path, &report, "hold_external", |s| frame_function(s, 1) == Some("hold_external"));
}

#[test]
fn unfinished_zlib_streams_rank_first() {
    setup();
    let dir = TempDir::new("holders_zlib");
    let (path, report) = record_holding(&dir, &[Path::new("zlib")]);
    let through_init = |s: &Value| {
        s["frames"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f["function"].as_str().is_some_and(|n| n.ends_with("deflateInit2_"))))
    };
    // zlib's deflate state is about 256 KiB a stream (window, prev, head, pending buffer).
    let held: u64 = stacks(&report).iter().filter(|s| through_init(s)).map(|s| num(s, "live_bytes")).sum();
    assert!(
        held >= 140 * (256 << 10),
        "140 streams should hold at least 35 MiB through deflateInit2_, got {held}\n{}",
        describe_top(&report, 5)
    );
    check_holder(&path, &report, "deflateInit2_", through_init);
}

#[test]
fn addon_plain_malloc_ranks_first() {
    setup();
    let dir = TempDir::new("holders_plain");
    let addon = build_addon(&dir);
    let (path, report) = record_holding(&dir, &[Path::new("plain"), &addon]);
    let held: u64 = stacks(&report)
        .iter()
        .filter(|s| frame_function(s, 1) == Some("hold_plain"))
        .map(|s| num(s, "live_bytes"))
        .sum();
    assert_eq!(held, 35 << 20, "hold_plain's 35 x 1 MiB\n{}", describe_top(&report, 5));
    check_holder(&path, &report, "hold_plain", |s| frame_function(s, 1) == Some("hold_plain"));
}
