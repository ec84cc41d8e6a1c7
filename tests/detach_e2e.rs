//! Scope and detach: the tracer attached to one process must not touch another process running
//! the same binary and libc, and after it exits the target's code and the kernel hold nothing of it.
//!
//! This file holds a single test on purpose: it asserts that no `tr_` BPF program is loaded once
//! its tracer exited, which another test's tracer running in parallel would break.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{
    EXIT_TIMEOUT, LINE_TIMEOUT, LibcSymbol, Proc, TempDir, build_fixture, check_alloc_report,
    eventually, hex, libc_symbol, num, setup, start_recording, stop_recording, tracer_programs,
};

/// x86 int3, which a uprobe writes over the probed instruction.
const BREAKPOINT: u8 = 0xcc;
const COMPARED: usize = 16;

fn spawn_waiting(alloc: &std::path::Path, label: &str) -> Proc {
    let mut fixture = Proc::spawn(label, Command::new(alloc).arg("--wait"));
    fixture.expect_stdout_line("ready", LINE_TIMEOUT);
    fixture
}

fn process_matches_file(pid: i32, sym: &LibcSymbol) -> Result<(), String> {
    let (mem, file) = (sym.process_bytes(pid, COMPARED), sym.file_bytes(COMPARED));
    if mem == file {
        Ok(())
    } else {
        Err(format!(
            "process {pid}: the first {COMPARED} bytes of {} at {:#x} are\n  {}\nbut {} holds at \
             offset {:#x}\n  {}",
            sym.name,
            sym.address,
            hex(&mem),
            sym.path.display(),
            sym.file_offset,
            hex(&file)
        ))
    }
}

#[test]
fn attaching_to_one_process_leaves_others_alone_and_detaching_restores_everything() {
    setup();
    let dir = TempDir::new("detach");
    let alloc = build_fixture(&dir, "alloc");
    let mut a = spawn_waiting(&alloc, "alloc --wait (A, traced)");
    let mut b = spawn_waiting(&alloc, "alloc --wait (B, not traced)");
    let (a_malloc, a_free) = (libc_symbol(a.pid(), "malloc"), libc_symbol(a.pid(), "free"));
    let b_malloc = libc_symbol(b.pid(), "malloc");
    for (pid, sym) in [
        (a.pid(), &a_malloc),
        (a.pid(), &a_free),
        (b.pid(), &b_malloc),
    ] {
        if let Err(e) = process_matches_file(pid, sym) {
            panic!(
                "before attaching, libc in memory should equal the file (is another tracer running?): {e}"
            );
        }
    }
    let preexisting = tracer_programs();
    assert!(
        preexisting.is_empty(),
        "tr_ BPF programs are loaded before this test started its tracer (another tracer running?): \
         {preexisting:?}"
    );

    let mut tracer = start_recording(a.pid(), &["--format", "json", "--top", "0"]);

    let a_byte = a_malloc.process_bytes(a.pid(), 1)[0];
    assert_eq!(
        a_byte, BREAKPOINT,
        "while recording, the traced process's malloc at {:#x} should start with the uprobe \
         breakpoint {BREAKPOINT:#04x}, got {a_byte:#04x}",
        a_malloc.address
    );
    let (b_byte, file_byte) = (
        b_malloc.process_bytes(b.pid(), 1)[0],
        b_malloc.file_bytes(1)[0],
    );
    assert_eq!(
        b_byte, file_byte,
        "the untraced process's malloc at {:#x} should keep the file's byte {file_byte:#04x}, got \
         {b_byte:#04x}: the probes reach beyond the target",
        b_malloc.address
    );
    let loaded = tracer_programs();
    assert!(
        !loaded.is_empty(),
        "while recording, bpftool should list the tracer's tr_ programs"
    );

    a.signal(libc::SIGUSR1);
    b.signal(libc::SIGUSR1);
    a.expect_stdout_line("allocated", LINE_TIMEOUT);
    b.expect_stdout_line("allocated", LINE_TIMEOUT);
    let (_, report) = stop_recording(&mut tracer);

    assert_eq!(
        num(&report, "pid"),
        u64::try_from(a.pid()).expect("pid is positive"),
        "the report's pid should be the traced process A"
    );
    check_alloc_report(&report, "attached to A while B ran the same allocations");

    for sym in [&a_malloc, &a_free] {
        if let Err(e) = eventually(Duration::from_secs(5), || {
            process_matches_file(a.pid(), sym)
        }) {
            panic!("5 s after the tracer exited its breakpoints are still in the target: {e}");
        }
    }
    let leftover = eventually(Duration::from_secs(5), || {
        let left = tracer_programs();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    if let Err(left) = leftover {
        panic!(
            "5 s after the tracer exited, bpftool still lists tr_ programs: {left}\n\
             (while recording it listed {loaded:?})"
        );
    }

    for fixture in [&mut a, &mut b] {
        fixture.signal(libc::SIGUSR2);
        fixture.expect_stdout_line("ok", LINE_TIMEOUT);
        let status = fixture.wait_exit(EXIT_TIMEOUT);
        assert_eq!(
            status.code(),
            Some(0),
            "{} should exit 0 after the tracer detached, got {status}\nstderr:\n{}",
            fixture.label,
            fixture.stderr.text()
        );
    }
}
