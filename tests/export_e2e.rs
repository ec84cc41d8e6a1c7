//! Export formats: folded stacks and SVG flamegraphs from a saved JSON report against golden
//! files (no root needed; `TRACER_BLESS=1` rewrites them), `tracer diff` on two saved reports
//! with known differences, and pprof profiles read back by the real `go tool pprof`.

mod support;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::{
    EXIT_TIMEOUT, TempDir, describe_top, fixtures_dir, num, run_tracer, setup, show_args, stacks,
    tracer_bin,
};

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name)
}

/// Runs the tracer (no root needed for `report` and `diff`) and returns its stdout.
fn tracer_stdout(args: &[&str]) -> String {
    let out = Command::new(tracer_bin())
        .args(args)
        .current_dir(golden(""))
        .output()
        .unwrap_or_else(|e| panic!("run tracer {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "`tracer {}` failed with {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// Compares `got` with golden file `name`, or rewrites it when TRACER_BLESS=1.
fn check_golden(name: &str, got: &str) {
    let path = golden(name);
    if std::env::var_os("TRACER_BLESS").is_some_and(|v| v == "1") {
        fs::write(&path, got).unwrap_or_else(|e| panic!("bless {}: {e}", path.display()));
        return;
    }
    let want = fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "read golden file {} ({e}); run with TRACER_BLESS=1 to create it",
            path.display()
        )
    });
    if got != want {
        let first = got
            .lines()
            .zip(want.lines())
            .position(|(g, w)| g != w)
            .unwrap_or_else(|| got.lines().count().min(want.lines().count()));
        panic!(
            "output differs from {} at line {}:\n  got:  {:?}\n  want: {:?}\n\
             (TRACER_BLESS=1 rewrites the golden file if the change is intended)",
            path.display(),
            first + 1,
            got.lines().nth(first).unwrap_or("<end>"),
            want.lines().nth(first).unwrap_or("<end>")
        );
    }
}

#[test]
fn folded_output_of_a_saved_report_matches_the_golden_files() {
    for metric in ["live", "allocated", "growth"] {
        let got = tracer_stdout(&[
            "report",
            "report.json",
            "--format",
            "folded",
            "--metric",
            metric,
        ]);
        check_golden(&format!("report.{metric}.folded"), &got);
    }
}

#[test]
fn svg_flamegraph_of_a_saved_report_matches_the_golden_file() {
    let got = tracer_stdout(&["report", "report.json", "--format", "svg"]);
    assert!(
        got.contains("app (pid 4242): live bytes"),
        "title with command, pid, metric"
    );
    check_golden("report.live.svg", &got);
}

#[test]
fn diff_of_two_saved_reports_matches_the_golden_files() {
    // before.json and after.json: cache_put grew 1000 -> 3000 B, session_new's 500 B went,
    // new_path's 200 B came, steady stayed at 64 B; the addresses differ (another run).
    let text = tracer_stdout(&["diff", "before.json", "after.json"]);
    for want in [
        "change: +1.7 KiB (+1700 B)",
        "+2.0 KiB (+2000 B): 1000 B -> 3000 B",
        "-500 B (-500 B): 500 B -> 0 B",
        "+200 B (+200 B): 0 B -> 200 B",
        "unchanged: 1 stack",
    ] {
        assert!(text.contains(want), "diff text lacks {want:?}:\n{text}");
    }
    check_golden("diff.txt", &text);
    let folded = tracer_stdout(&["diff", "before.json", "after.json", "--format", "folded"]);
    assert_eq!(
        folded,
        "__libc_start_call_main;main;cache_put;malloc 1000 3000\n\
         __libc_start_call_main;main;new_path;malloc 0 200\n\
         __libc_start_call_main;main;session_new;malloc 500 0\n\
         __libc_start_call_main;main;steady;malloc 64 64\n"
    );
    let svg = tracer_stdout(&["diff", "before.json", "after.json", "--format", "svg"]);
    check_golden("diff.svg", &svg);
}

#[test]
fn report_and_diff_refuse_bad_input_with_one_line() {
    let dir = TempDir::new("export-bad-input");
    let garbage = dir.join("garbage.json");
    fs::write(&garbage, "{\"stacks\": 3}").unwrap();
    let missing = dir.join("missing.json");
    let cases: Vec<Vec<OsString>> = vec![
        vec!["report".into(), missing.clone().into_os_string()],
        vec![
            "report".into(),
            garbage.clone().into_os_string(),
            "--format".into(),
            "svg".into(),
        ],
        vec![
            "diff".into(),
            garbage.into_os_string(),
            golden("after.json").into_os_string(),
        ],
        vec![
            "diff".into(),
            golden("before.json").into_os_string(),
            missing.into_os_string(),
        ],
        vec![
            "report".into(),
            golden("report.json").into_os_string(),
            "--metric".into(),
            // (peak became a metric with issue 9)
            "heaviest".into(),
        ],
    ];
    for args in cases {
        let finished = run_tracer(&args, EXIT_TIMEOUT);
        let lines: Vec<&str> = finished.stderr.lines().collect();
        assert!(
            finished.status.code() == Some(2)
                && lines.len() == 1
                && lines[0].starts_with("tracer: ")
                && finished.stdout.is_empty(),
            "`tracer {}` should fail with exit 2 and one stderr line\n{}",
            show_args(&args),
            finished.describe()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// pprof, read back by `go tool pprof` (Debian's golang-go, installed by `cargo xtask prereqs`)

fn go_pprof(args: &[&str], profile: &Path) -> String {
    let out = Command::new("go")
        .args(["tool", "pprof", "-symbolize=none"])
        .args(args)
        .arg(profile)
        // Nothing to look up: the profile names its own functions.
        .env("PPROF_BINARY_PATH", "/nonexistent")
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `go tool pprof` ({e}); install golang-go (`cargo xtask prereqs`)")
        });
    assert!(
        out.status.success(),
        "`go tool pprof {}` failed with {}: {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `go tool pprof -top` rows by function name: (flat, cum) in bytes or counts.
fn pprof_top(profile: &Path, sample_index: &str) -> BTreeMap<String, (u64, u64)> {
    let text = go_pprof(
        &[
            "-top",
            &format!("-sample_index={sample_index}"),
            "-nodecount=100000",
            "-nodefraction=0",
            "-edgefraction=0",
            "-unit=byte",
        ],
        profile,
    );
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in text.lines() {
        if line.trim_start().starts_with("flat") {
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        // flat flat% sum% cum cum% name...
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 {
            continue;
        }
        let value = |s: &str| -> u64 {
            // -unit=byte prints bytes as `1234B` and counts as `42byte`, never scaled.
            s.trim_end_matches(|c: char| c.is_ascii_alphabetic())
                .parse()
                .unwrap_or_else(|_| panic!("pprof value {s:?} in line {line:?}"))
        };
        rows.insert(fields[5..].join(" "), (value(fields[0]), value(fields[3])));
    }
    assert!(
        !rows.is_empty(),
        "no rows in `go tool pprof -top` output:\n{text}"
    );
    rows
}

/// What `go tool pprof -top` must show, computed from the JSON report: a function's flat value
/// is what stacks hold whose innermost frame is it; its cum value what every stack through it
/// holds, each stack counted once.
fn expected_top(report: &Value, key: &str) -> BTreeMap<String, (u64, u64)> {
    let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for stack in stacks(report) {
        let value = num(stack, key);
        if value == 0 {
            continue;
        }
        let names: Vec<String> = stack
            .get("frames")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .map(|f| match f.get("function").and_then(Value::as_str) {
                // pprof marks functions inlined at a location.
                Some(name) if f.get("inlined") == Some(&Value::Bool(true)) => {
                    format!("{name} (inline)")
                }
                Some(name) => name.to_owned(),
                None => {
                    let module = f.get("module").and_then(Value::as_str);
                    match (module, f.get("kind").and_then(Value::as_str)) {
                        (_, Some("jit")) => format!("[jit] {:#x}", num(f, "address")),
                        (Some(m), _) => {
                            format!("{}+{:#x}", m.rsplit('/').next().unwrap(), num(f, "offset"))
                        }
                        (None, _) => format!("[unknown] {:#x}", num(f, "address")),
                    }
                }
            })
            .collect();
        if names.is_empty() {
            rows.entry("[stack lost]".to_owned()).or_default().0 += value;
            rows.entry("[stack lost]".to_owned()).or_default().1 += value;
            continue;
        }
        rows.entry(names[0].clone()).or_default().0 += value;
        let mut seen: Vec<&String> = Vec::new();
        for name in &names {
            if !seen.contains(&name) {
                seen.push(name);
                rows.entry(name.clone()).or_default().1 += value;
            }
        }
    }
    rows
}

fn check_pprof_against_json(profile: &Path, report: &Value, how: &str) {
    for (index, key) in [
        ("inuse_space", "live_bytes"),
        ("alloc_space", "alloc_bytes"),
        ("inuse_objects", "live_allocs"),
        ("alloc_objects", "allocs"),
    ] {
        let got = pprof_top(profile, index);
        let want = expected_top(report, key);
        if got != want {
            let diffs: Vec<String> = want
                .keys()
                .chain(got.keys())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .filter(|k| got.get(*k) != want.get(*k))
                .take(20)
                .map(|k| format!("  {k}: pprof {:?}, JSON {:?}", got.get(k), want.get(k)))
                .collect();
            panic!(
                "{how}: `go tool pprof -top -sample_index={index}` disagrees with the JSON report's \
                 {key} (flat, cum):\n{}\n{}",
                diffs.join("\n"),
                describe_top(report, 5)
            );
        }
    }
}

#[test]
fn pprof_of_a_saved_report_loads_in_go_tool_pprof_with_the_same_numbers() {
    let profile_dir = TempDir::new("pprof-golden");
    let profile = profile_dir.join("report.pb.gz");
    tracer_stdout(&[
        "report",
        "report.json",
        "--format",
        "pprof",
        "-o",
        profile.to_str().unwrap(),
    ]);
    let report: Value =
        serde_json::from_str(&fs::read_to_string(golden("report.json")).unwrap()).unwrap();
    check_pprof_against_json(&profile, &report, "golden/report.json");

    // Inlined frames are lines of one location: pprof lists make_record and fill_table at one
    // address, with their own lines.
    let raw = go_pprof(&["-raw"], &profile);
    assert!(
        raw.contains("make_record /src/app/table.c:15")
            && raw.contains("fill_table /src/app/table.c:23"),
        "-raw should show the inlined frame and its caller with file:line:\n{raw}"
    );
}

fn build_id_hex(path: &Path) -> String {
    use object::Object;
    let data = fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let id = file
        .build_id()
        .ok()
        .flatten()
        .expect("the fixture has a build id");
    id.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn recorded_pprof_matches_a_recorded_json_report_and_names_build_ids() {
    setup();
    let dir = TempDir::new("pprof-record");
    let bin = dir.join("inlined");
    let out = Command::new("cc")
        .args([
            "-O2",
            "-g",
            "-fno-omit-frame-pointer",
            "-Wl,--build-id",
            "-o",
        ])
        .arg(&bin)
        .arg(fixtures_dir().join("inlined.c"))
        .output()
        .expect("run cc");
    assert!(
        out.status.success(),
        "cc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The fixture does the same every run: two recordings give the same numbers.
    let record = |format: &str, file: &str| -> PathBuf {
        let path = dir.join(file);
        let args: Vec<OsString> = vec![
            "record".into(),
            "--top".into(),
            "0".into(),
            "--format".into(),
            format.into(),
            "-o".into(),
            path.clone().into_os_string(),
            "--".into(),
            bin.clone().into_os_string(),
        ];
        let finished = run_tracer(&args, EXIT_TIMEOUT);
        assert_eq!(finished.status.code(), Some(0), "{}", finished.describe());
        path
    };
    let json_path = record("json", "report.json");
    let profile = record("pprof", "report.pb.gz");
    let finished_text = fs::read_to_string(&json_path).unwrap();
    let report: Value = serde_json::from_str(&finished_text).unwrap();

    // Only the fixture's own stacks are the same in both runs (the loader's and libc's
    // start-up allocations are too, but checking the fixture's is what matters).
    let got = pprof_top(&profile, "inuse_space");
    let want = expected_top(&report, "live_bytes");
    for name in ["make_record", "fill_table", "main"] {
        assert_eq!(
            got.get(name),
            want.get(name),
            "{name}: pprof (flat, cum) inuse_space vs the JSON report\n{}",
            describe_top(&report, 5)
        );
    }
    assert_eq!(
        want.get("fill_table"),
        Some(&(0, 40_000)),
        "{}",
        describe_top(&report, 5)
    );

    let raw = go_pprof(&["-raw"], &profile);
    let id = build_id_hex(&bin);
    assert!(
        raw.lines()
            .any(|l| l.contains(bin.to_str().unwrap()) && l.contains(&id)),
        "the fixture's mapping should carry its build id {id}:\n{raw}"
    );

    // And the recorded JSON converts to a profile that agrees with it in full.
    let converted = dir.join("converted.pb.gz");
    tracer_stdout(&[
        "report",
        json_path.to_str().unwrap(),
        "--format",
        "pprof",
        "-o",
        converted.to_str().unwrap(),
    ]);
    check_pprof_against_json(&converted, &report, "recorded report");
}
