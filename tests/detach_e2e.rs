//! Scope and detach: the tracer attached to one process must not touch another process running
//! the same binary and libc, and after it exits the target's code and the kernel hold nothing of it.
//!
//! The tracer's programs and links are told from those of other tracers running at the same
//! time (other tests, other checkouts) by the descriptors the tracer process holds.

mod support;

use std::process::Command;
use std::time::Duration;

use support::{
    BpfLink, BpfProg, EXIT_TIMEOUT, LINE_TIMEOUT, LibcSymbol, Proc, TempDir, attachments_of, bpf_link_ids,
    build_fixture, check_alloc_report, eventually, hex, libc_symbol, num, setup, start_recording,
    stop_recording, tracer_programs,
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

/// Regression: every uprobe and tracepoint used to be a perf event of its own, and removing
/// each waited for a grace period, one after another (about 30 of them: 2.6 s at every exit).
/// Now the allocator entries, their returns and free are three uprobe-multi links and the
/// syscalls two raw tracepoints (sys_exit for every call, sys_enter for munmap and mremap).
fn check_probes_attach_in_bulk(links: &[BpfLink], perf_events: usize) {
    let mut kinds: Vec<&str> = links.iter().map(|l| l.kind.as_str()).collect();
    kinds.sort_unstable();
    assert_eq!(
        (kinds, perf_events),
        (vec!["raw_tracepoint", "raw_tracepoint", "uprobe_multi", "uprobe_multi", "uretprobe_multi"], 0),
        "while recording, the tracer should hold these links (types as the kernel names them) \
         and no perf event: {links:?}"
    );
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
    let held = attachments_of(tracer.pid());
    let loaded: Vec<BpfProg> = tracer_programs()
        .into_iter()
        .filter(|p| held.programs.contains(&p.id))
        .collect();
    assert!(
        !loaded.is_empty(),
        "while recording, bpftool should list tr_ programs among those the tracer holds \
         (ids {:?})",
        held.programs
    );
    check_probes_attach_in_bulk(&held.links, held.perf_events);

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

    // The tracer closes its links itself, and the kernel frees a link when its last
    // descriptor closes: nothing of them may outlive the process.
    let listed = bpf_link_ids();
    let left: Vec<&BpfLink> = held.links.iter().filter(|l| listed.contains(&l.id)).collect();
    assert!(
        left.is_empty(),
        "the tracer has exited, yet bpftool still lists its links {left:?}"
    );

    for sym in [&a_malloc, &a_free] {
        if let Err(e) = eventually(Duration::from_secs(5), || {
            process_matches_file(a.pid(), sym)
        }) {
            panic!("5 s after the tracer exited its breakpoints are still in the target: {e}");
        }
    }
    // The kernel frees a program after a grace period once nothing holds it.
    let leftover = eventually(Duration::from_secs(5), || {
        let left: Vec<BpfProg> = tracer_programs()
            .into_iter()
            .filter(|p| held.programs.contains(&p.id))
            .collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{left:?}"))
        }
    });
    if let Err(left) = leftover {
        panic!(
            "5 s after the tracer exited, bpftool still lists its tr_ programs: {left}\n\
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
