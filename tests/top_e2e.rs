//! `tracer top` in a real terminal: tmux runs it in an 80x24 pane, keys go in with
//! send-keys and the screen comes back with capture-pane. Also: the refusal when stdout is not
//! a terminal, and a launched command whose output goes to a file.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use support::{
    LINE_TIMEOUT, Proc, TempDir, bpf_programs, build_fixture, eventually, libc_symbol, run_tracer, setup,
    tracer_pids,
};

/// What the pane's shell prints before the command's exit status.
const EXITED: &str = "command exited with status";

/// How long the screen may take to show something (attaching, a refresh each second, a
/// busy machine).
const SCREEN_TIMEOUT: Duration = Duration::from_secs(40);

/// A tmux server of our own (its own socket, so the user's sessions are never touched)
/// running one command in one pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// Starts `command` (a shell command line) in a `width` x `height` pane; when it exits, the
    /// shell around it prints its exit status, and the pane stays.
    fn start(label: &str, command: &str, width: u16, height: u16) -> Tmux {
        let command = format!("{command}; echo \"{EXITED} $?\"; sleep 600");
        let tmux = Tmux {
            socket: format!("tracer-test-{label}-{}", std::process::id()),
        };
        let (w, h) = (width.to_string(), height.to_string());
        tmux.run(&[
            "-f", "/dev/null", "new-session", "-d", "-s", "t", "-x", &w, "-y", &h, &command,
        ]);
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        let output = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run tmux (install it with `cargo xtask prereqs`): {e}"));
        assert!(
            output.status.success(),
            "tmux {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// The screen as a person sees it, one string per line, trailing blanks cut.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "t"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        self.run(&["send-keys", "-t", "t", keys]);
    }

    fn query(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "t", format]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The pid of the command the pane's shell runs (the tracer).
    fn command_pid(&self) -> i32 {
        let shell = self.query("#{pane_pid}");
        let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the pane's shell (pid {shell}) runs no command: {children:?}"))
    }

    /// The exit status the pane's shell printed, once the command has exited.
    fn exit_status(&self) -> Option<i32> {
        self.screen()
            .lines()
            .find_map(|l| l.strip_prefix(EXITED))
            .and_then(|s| s.trim().parse().ok())
    }

    /// Waits until the screen satisfies `check` (which says what is missing otherwise);
    /// panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, check: impl Fn(&str) -> Result<(), String>) -> String {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            let screen = self.screen();
            match check(&screen) {
                Ok(()) => return screen,
                Err(why) if Instant::now() >= deadline => {
                    panic!("waiting for {what}: {why}\n--- the screen after {SCREEN_TIMEOUT:?} ---\n{screen}---")
                }
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn wait_exit(&self) -> i32 {
        let deadline = Instant::now() + SCREEN_TIMEOUT;
        loop {
            if let Some(status) = self.exit_status() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!("the pane's command did not exit within {SCREEN_TIMEOUT:?}\n--- screen ---\n{}", self.screen());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux").arg("-L").arg(&self.socket).arg("kill-server").output();
    }
}

fn contains(screen: &str, want: &str) -> Result<(), String> {
    if screen.contains(want) { Ok(()) } else { Err(format!("no {want:?} on the screen")) }
}

/// One table row: the figures under each column and the caller.
#[derive(Debug)]
struct Row {
    held: String,
    growth: String,
    peak: String,
    allocated: String,
    /// `[mmap]`/`[brk]` for stacks that mapped memory themselves, else empty.
    source: String,
    caller: String,
}

/// The rows of the stack table (between its header line and the first blank line).
fn rows(screen: &str) -> Vec<Row> {
    let lines: Vec<&str> = screen.lines().collect();
    let Some(header) = lines.iter().position(|l| l.contains("held") && l.contains("allocated") && l.contains("caller")) else {
        return Vec::new();
    };
    lines[header + 1..]
        .iter()
        .take_while(|l| l.len() > 47 && !l.starts_with('#'))
        .map(|l| {
            // Columns: " {held:>10} {growth:>11} {peak:>10} {allocated:>10}  caller".
            let col = |a: usize, b: usize| l.get(a..b).unwrap_or("").trim().to_owned();
            let rest = l.get(47..).unwrap_or("");
            let (source, caller) = match rest.strip_prefix('[') {
                Some(r) => {
                    let (s, c) = r.split_once("] ").unwrap_or((r, ""));
                    (format!("[{s}]"), c)
                }
                None => (String::new(), rest),
            };
            Row {
                held: col(0, 11),
                growth: col(11, 23),
                peak: col(23, 34),
                allocated: col(34, 45),
                source,
                caller: caller.split_whitespace().next().unwrap_or("").to_owned(),
            }
        })
        .collect()
}

/// The callers of the malloc stacks, in screen order.
fn malloc_callers(screen: &str) -> Vec<String> {
    rows(screen).into_iter().filter(|r| r.source.is_empty()).map(|r| r.caller).collect()
}

fn order_is(screen: &str, want: &[&str]) -> Result<(), String> {
    let got = malloc_callers(screen);
    if got.len() >= want.len() && got[..want.len()] == *want {
        Ok(())
    } else {
        Err(format!("malloc stacks in order {got:?}, expected {want:?} first"))
    }
}

fn row_of<'a>(rows: &'a [Row], caller: &str) -> &'a Row {
    rows.iter()
        .find(|r| r.source.is_empty() && r.caller == caller)
        .unwrap_or_else(|| panic!("no row for {caller} in {rows:#?}"))
}

/// The fixture's pid from the title line, `tracer top  pid N (grow) ...`.
fn title_pid(screen: &str) -> Option<i32> {
    screen.lines().next()?.split("pid ").nth(1)?.split_whitespace().next()?.parse().ok()
}

fn start_grow(dir: &TempDir) -> (PathBuf, Proc) {
    let grow = build_fixture(dir, "grow");
    let mut fixture = Proc::spawn("grow", &mut Command::new(&grow));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    (grow, fixture)
}

/// Ids of the BPF programs process `pid` holds through its file descriptors (a program's
/// own fd or a link to it: fdinfo says `prog_id`).
fn programs_held_by(pid: i32) -> Vec<u64> {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u64> = fds
        .filter_map(|fd| std::fs::read_to_string(fd.ok()?.path()).ok())
        .filter_map(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|id| id.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[test]
fn top_shows_live_stacks_sorts_by_each_key_expands_and_detaches_leaving_the_target_untouched() {
    let tracer = setup();
    let dir = TempDir::new("top");
    let (_, mut fixture) = start_grow(&dir);
    let pid = fixture.pid();
    let malloc = libc_symbol(pid, "malloc");
    let tmux = Tmux::start("top", &format!("{} top --pid {pid}", tracer.display()), 80, 24);
    let first = tmux.wait_for("the first screen", |s| {
        contains(s, &format!("tracer top  pid {pid} (grow)"))?;
        contains(s, "sorted by held")
    });
    println!("--- first screen ---\n{first}");
    let tracer_pid = tmux.command_pid();
    let programs = programs_held_by(tracer_pid);
    assert!(!programs.is_empty(), "the tracer (pid {tracer_pid}) holds no BPF program while it shows the view");

    // 8 MiB held by hold_block, then 50 MiB allocated and freed by churn.
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("held", LINE_TIMEOUT);
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("churned", LINE_TIMEOUT);
    let screen = tmux.wait_for("hold_block and churn", |s| {
        order_is(s, &["hold_block", "churn"])?;
        contains(s, "allocated 58.0 MiB in 801")
    });
    let r = rows(&screen);
    assert_eq!(
        (row_of(&r, "hold_block").held.as_str(), row_of(&r, "churn").allocated.as_str()),
        ("8.0 MiB", "50.0 MiB"),
        "{screen}"
    );

    // Growth counts from here: then grow_cache keeps 1 MiB.
    tmux.keys("r");
    thread::sleep(Duration::from_millis(300));
    fixture.signal(libc::SIGUSR1);
    fixture.expect_stdout_line("grown", LINE_TIMEOUT);
    let held = tmux.wait_for("grow_cache under held", |s| order_is(s, &["hold_block", "grow_cache", "churn"]));
    println!("--- sorted by held ---\n{held}");

    tmux.keys("g");
    let growth = tmux.wait_for("the growth order", |s| {
        contains(s, "sorted by growth since")?;
        order_is(s, &["grow_cache"])
    });
    let r = rows(&growth);
    assert_eq!(
        (row_of(&r, "grow_cache").growth.as_str(), row_of(&r, "hold_block").growth.as_str()),
        ("+1.0 MiB", "0 B"),
        "growth since `r`: grow_cache kept 1 MiB after it, hold_block nothing\n{growth}"
    );

    tmux.keys("a");
    let allocated = tmux.wait_for("the allocated order", |s| {
        contains(s, "sorted by allocated")?;
        order_is(s, &["churn", "hold_block", "grow_cache"])
    });
    println!("--- sorted by allocated ---\n{allocated}");

    tmux.keys("p");
    let peak = tmux.wait_for("the peak order", |s| {
        contains(s, "sorted by peak")?;
        order_is(s, &["hold_block", "grow_cache", "churn"])
    });
    let r = rows(&peak);
    assert_eq!(
        [&row_of(&r, "hold_block").peak, &row_of(&r, "grow_cache").peak, &row_of(&r, "churn").peak],
        ["8.0 MiB", "1.0 MiB", "64.0 KiB"],
        "peaks: one 8 MiB block, 1 MiB kept, 64 KiB at a time\n{peak}"
    );

    // Back to allocated; the second row (hold_block) expanded shows its frames.
    tmux.keys("a");
    tmux.wait_for("the allocated order again", |s| contains(s, "sorted by allocated"));
    tmux.keys("Down");
    tmux.keys("Enter");
    let expanded = tmux.wait_for("the expanded stack", |s| {
        contains(s, "#2 of ")?;
        contains(s, "> hold_block  grow+0x")?;
        contains(s, "  malloc  libc.so.6+0x")?;
        contains(s, "  main  grow+0x")
    });
    println!("--- hold_block expanded ---\n{expanded}");
    for line in expanded.lines() {
        assert!(line.chars().count() <= 80, "a line wider than the 80-column pane: {line:?}");
    }

    tmux.keys("q");
    let status = tmux.wait_exit();
    let after = tmux.screen();
    assert_eq!(status, 0, "tracer top exited with {status} after q\n{after}");
    assert!(after.contains(&format!("tracer: detached from pid {pid} (grow)")), "no detach line after q:\n{after}");

    // The target runs on, untraced, with its code as the file has it.
    assert!(fixture.running(), "the fixture died while or after being watched");
    for (tid, tracer) in tracer_pids(pid) {
        assert_eq!(tracer, "0", "thread {tid} of the fixture still has TracerPid {tracer}");
    }
    assert_eq!(
        malloc.process_bytes(pid, 16),
        malloc.file_bytes(16),
        "malloc's first bytes in the fixture differ from libc's file after detach"
    );
    // The kernel frees a program after a grace period once nothing holds it.
    let left = eventually(Duration::from_secs(5), || {
        let left: Vec<u64> = bpf_programs().iter().map(|p| p.id).filter(|id| programs.contains(id)).collect();
        if left.is_empty() { Ok(()) } else { Err(format!("{left:?}")) }
    });
    if let Err(left) = left {
        panic!("5 s after the tracer quit, BPF programs {left} of it are still loaded");
    }
}

#[test]
fn top_refuses_a_stdout_that_is_not_a_terminal_before_attaching() {
    setup();
    let dir = TempDir::new("top-notty");
    let (_, mut fixture) = start_grow(&dir);
    let pid = fixture.pid().to_string();
    // stdout is a pipe here.
    let finished = run_tracer(&["top", "--pid", &pid], Duration::from_secs(30));
    assert_eq!(finished.status.code(), Some(2), "{}", finished.describe());
    let lines: Vec<&str> = finished.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line on stderr:\n{}", finished.describe());
    assert!(
        lines[0].starts_with("tracer: ") && lines[0].contains("terminal"),
        "the line does not say a terminal is needed: {}",
        lines[0]
    );
    assert!(finished.stdout.is_empty(), "{}", finished.describe());
    assert!(fixture.running(), "the fixture died");
}

#[test]
fn top_of_a_launched_command_names_its_output_file_and_says_when_it_exits() {
    let tracer = setup();
    let dir = TempDir::new("top-launch");
    let grow = build_fixture(&dir, "grow");
    let output = dir.join("grow.out");
    let tmux = Tmux::start(
        "launch",
        &format!("{} top -o {} -- {}", tracer.display(), output.display(), grow.display()),
        80,
        24,
    );
    let running = tmux.wait_for("the first screen", |s| {
        contains(s, "(grow)")?;
        contains(s, &format!("output: {}", output.display()))
    });
    let pid = title_pid(&running).unwrap_or_else(|| panic!("no pid in the title:\n{running}"));
    wait_file_line(&output, "ready");
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGUSR1) }, 0, "signal pid {pid}");
    wait_file_line(&output, "held");
    tmux.wait_for("hold_block", |s| order_is(s, &["hold_block"]));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "terminate pid {pid}");
    let exited = tmux.wait_for("the exit notice", |s| {
        contains(s, &format!("pid {pid} exited with status 143; the figures are as it left them"))?;
        contains(s, &format!("output: {}", output.display()))?;
        // The figures stay as the command left them.
        order_is(s, &["hold_block"])
    });
    println!("--- after the command exited ---\n{exited}");
    tmux.keys("q");
    let status = tmux.wait_exit();
    assert_eq!(status, 0, "tracer top exited with {status} after q\n{}", tmux.screen());
}

/// Waits for `line` in the file the launched command writes to.
fn wait_file_line(path: &Path, line: &str) {
    let deadline = Instant::now() + LINE_TIMEOUT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{} has no line {line:?} after {LINE_TIMEOUT:?}; it holds:\n{text}", path.display());
        }
        thread::sleep(Duration::from_millis(50));
    }
}
