//! The process being traced: checks on a pid given by the user, and launching a command
//! held at its start until the probes are in place.
use std::{
    ffi::OsString,
    fs::File,
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    sync::mpsc::{self, Receiver, Sender},
    thread,
    time::Duration,
};

use nix::{
    sys::{
        ptrace,
        signal::Signal,
        wait::{WaitPidFlag, WaitStatus, waitpid},
    },
    unistd::Pid,
};
use object::{Object as _, read::elf::ProgramHeader as _};

use crate::{probe::libc::find_libc, symbolize::maps::ProcMaps};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {0}")]
    NoSuchProcess(u32),
    #[error("pid {0} is a kernel thread: it has no user memory to trace")]
    KernelThread(u32),
    #[error("pid {0} is a zombie: it has exited and has no memory left to trace")]
    Zombie(u32),
    #[error("{what} is statically linked: there is no shared C library whose allocator could be probed")]
    StaticBinary { what: String },
    #[error("{what} maps no C library (libc.so): nothing to probe")]
    NoLibc { what: String },
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} exited before it loaded its C library (status {status})")]
    ExitedEarly { command: String, status: i32 },
    #[error("ptrace {what} on pid {pid}")]
    Ptrace {
        what: &'static str,
        pid: u32,
        #[source]
        source: nix::Error,
    },
    #[error("create {}", path.display())]
    Output {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} on disk is not the file pid {pid} maps (replaced since it was mapped), and the \
         mapped one cannot be opened through /proc/{pid}/map_files (that needs CAP_SYS_ADMIN)"
    )]
    Replaced { path: String, pid: u32 },
    #[error(transparent)]
    Maps(#[from] crate::symbolize::maps::MapsError),
}

/// What we know of a live process.
#[derive(Clone, Debug)]
pub struct ProcessInfo {
    pub pid: u32,
    pub command: String,
    /// A live thread of the process: the main thread, unless that has exited (pthread_exit)
    /// while others run on. Its /proc entry shows the process's memory (maps, smaps, root,
    /// map_files), which the exited main thread's no longer does, and the kernel keeps
    /// uprobes opened on a thread only while that thread lives.
    pub task: u32,
}

/// `PF_KTHREAD` in the flags field of /proc/PID/stat.
const PF_KTHREAD: u64 = 0x0020_0000;

/// Fields of /proc/PID/stat after the command name: state, then the numbers.
fn stat_fields(pid: u32) -> Option<(String, Vec<String>)> {
    stat_fields_at(&format!("/proc/{pid}/stat"))
}

fn stat_fields_at(path: &str) -> Option<(String, Vec<String>)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command is in parentheses and may itself contain ") ".
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_owned();
    let rest = stat[close + 1..].split_whitespace().map(str::to_owned).collect();
    Some((comm, rest))
}

/// Whether stat fields (after the command) say the task has exited.
fn exited(fields: &[String]) -> bool {
    matches!(fields.first().map(String::as_str), Some("Z" | "X"))
}

/// A live (not zombie) thread of process `pid`: `pid` itself when its main thread is live.
pub fn live_task(pid: u32) -> Option<u32> {
    if !exited(&stat_fields(pid)?.1) {
        return Some(pid);
    }
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|&tid| task_alive(pid, tid))
}

/// Whether thread `tid` of process `pid` is there and not a zombie.
pub fn task_alive(pid: u32, tid: u32) -> bool {
    stat_fields_at(&format!("/proc/{pid}/task/{tid}/stat")).is_some_and(|(_, f)| !exited(&f))
}

/// Checks that `pid` names a live user process and returns its command name.
pub fn inspect(pid: u32) -> Result<ProcessInfo, TargetError> {
    stat_fields(pid).ok_or(TargetError::NoSuchProcess(pid))?;
    // A zombie main thread with other threads running is a live process.
    let task = live_task(pid).ok_or(TargetError::Zombie(pid))?;
    let (comm, fields) = stat_fields(task).ok_or(TargetError::NoSuchProcess(pid))?;
    // After the state: ppid pgrp session tty_nr tpgid flags.
    let flags: u64 = fields.get(6).and_then(|f| f.parse().ok()).unwrap_or(0);
    if flags & PF_KTHREAD != 0 {
        return Err(TargetError::KernelThread(pid));
    }
    let command = std::fs::read(format!("/proc/{task}/cmdline"))
        .ok()
        .and_then(|c| {
            let first = c.split(|b| *b == 0).next()?.to_vec();
            let first = String::from_utf8_lossy(&first).into_owned();
            let base = Path::new(&first).file_name()?.to_string_lossy().into_owned();
            (!base.is_empty()).then_some(base)
        })
        .unwrap_or(comm);
    Ok(ProcessInfo { pid, command, task })
}

/// Where the process's heap starts (start_brk in /proc/PID/stat): the program break, as
/// long as the heap has not grown.
pub fn start_brk(pid: u32) -> Option<u64> {
    // stat field 47; the fields after the command start at field 3 (the state).
    stat_fields(pid)?.1.get(44)?.parse().ok()
}

/// Whether the process is still there: one of its threads at least is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    live_task(pid).is_some()
}

/// A path this process can open that is the file `pid` maps at `path` (a path as the
/// process sees it): `/proc/PID/root/PATH` while that is still the mapped file, else the
/// process's own handle on the mapped one, for a file replaced on disk since it was mapped
/// (an upgrade of the C library under a running service). Probes placed on the file at the
/// path would then sit in a file the process does not run, and see nothing.
pub fn mapped_file_path(pid: u32, maps: &ProcMaps, path: &str) -> Result<std::path::PathBuf, TargetError> {
    let host = std::path::PathBuf::from(format!("/proc/{pid}/root{path}"));
    let Some(file) = maps.mappings().iter().find(|m| m.path.as_deref() == Some(path)).map(|m| m.file()) else {
        return Ok(host);
    };
    if std::fs::metadata(&host).is_ok_and(|meta| file.is(&meta)) {
        return Ok(host);
    }
    let own = file.map_files_path(pid);
    if std::fs::metadata(&own).is_ok_and(|meta| file.is(&meta)) {
        crate::diag::warn(format_args!(
            "{path} on disk is not the file pid {pid} maps (replaced since it was mapped); probing the mapped file"
        ));
        return Ok(own);
    }
    Err(TargetError::Replaced { path: path.to_owned(), pid })
}

/// Whether the ELF file at `path` asks for a dynamic loader (PT_INTERP).
fn is_dynamic(path: &Path) -> bool {
    let Ok(data) = std::fs::read(path) else { return true };
    match object::File::parse(&*data) {
        Ok(object::File::Elf64(elf)) => elf
            .elf_program_headers()
            .iter()
            .any(|ph| ph.p_type(elf.endian()) == object::elf::PT_INTERP),
        Ok(file) => file.kind() == object::ObjectKind::Dynamic,
        Err(_) => true,
    }
}

/// The C library `pid` maps, as the process sees its path.
pub fn libc_of(pid: u32, maps: &ProcMaps, command: &str) -> Result<String, TargetError> {
    if let Some(libc) = find_libc(maps) {
        return Ok(libc);
    }
    let what = format!("pid {pid} ({command})");
    if !is_dynamic(Path::new(&format!("/proc/{pid}/exe"))) {
        return Err(TargetError::StaticBinary { what });
    }
    Err(TargetError::NoLibc { what })
}

/// Exit status of a process as a shell reports it: the code, or 128 + the signal.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// What the launcher thread reports.
#[derive(Debug)]
pub enum LaunchEvent {
    /// The process is exiting: /proc/PID/maps and /proc/PID/smaps, read just before it goes,
    /// and which pages of its mappings were in RAM; `at` is when it stopped to exit (ages of
    /// blocks, for `--min-age`, are taken at that moment, not when the report is made).
    Exiting {
        at: std::time::Instant,
        maps: String,
        smaps: String,
        present: crate::pagemap::Present,
    },
    /// The process is gone, with this exit status.
    Exited(i32),
}

enum Control {
    /// Probes are attached: let the process run.
    Release,
    /// Recording is over: stop tracing the process, let it run on by itself.
    Detach,
    /// Another tracer thread (the ptrace backend) takes the process over: leave it stopped,
    /// untraced, and hand over the channel its exit is reported on.
    HandOver(Sender<Result<Sender<LaunchEvent>, TargetError>>),
}

/// A launched process handed over to another tracer thread: it sits in a group-stop (SIGSTOP)
/// before any of its own code has run, traced by nobody, and is still this process's child.
/// The new tracer seizes it, continues it, and reports its exit on `events`.
pub struct Handover {
    pub pid: u32,
    pub events: Sender<LaunchEvent>,
}

impl LaunchEvent {
    /// What is worth reading of a process at its exit stop, while its memory is still there.
    pub fn exiting(pid: u32) -> LaunchEvent {
        let at = std::time::Instant::now();
        let read = |what: &str| std::fs::read_to_string(format!("/proc/{pid}/{what}")).unwrap_or_default();
        let smaps = read("smaps");
        LaunchEvent::Exiting {
            at,
            maps: read("maps"),
            present: crate::memmap::present_at_exit(pid, &smaps),
            smaps,
        }
    }
}

/// A command started by the tracer. Its one thread of ptrace control lives in a helper
/// thread, since ptrace requests must come from the thread that attached.
pub struct Launched {
    pub info: ProcessInfo,
    /// The C library it maps, as the process sees the path.
    pub libc: String,
    /// Its memory map when the C library appeared.
    pub maps: ProcMaps,
    control: Sender<Control>,
    pub events: Receiver<LaunchEvent>,
}

/// Syscalls we let a new process make while waiting for its C library to be mapped.
const MAX_LOADER_SYSCALLS: usize = 20_000;

impl Launched {
    /// Starts `argv` stopped at its first instruction, follows the dynamic loader until the
    /// C library is mapped, and returns with the process stopped there. With `output`, the
    /// command's stdout and stderr go to that file (created or truncated) and its stdin is
    /// /dev/null, so that it leaves the terminal to the tracer.
    pub fn start(argv: &[OsString], output: Option<&Path>) -> Result<Launched, TargetError> {
        let command = argv
            .first()
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (setup_tx, setup_rx) = mpsc::channel();
        let (control_tx, control_rx) = mpsc::channel();
        let (event_tx, event_rx) = mpsc::channel();
        let argv = argv.to_vec();
        let stdio = output
            .map(|path| {
                let file = File::create(path).map_err(|source| TargetError::Output {
                    path: path.to_owned(),
                    source,
                })?;
                let err = file.try_clone().map_err(|source| TargetError::Output {
                    path: path.to_owned(),
                    source,
                })?;
                Ok::<_, TargetError>((file, err))
            })
            .transpose()?;
        thread::Builder::new()
            .name("launcher".into())
            .spawn(move || launcher(argv, stdio, setup_tx, control_rx, event_tx))
            .map_err(|source| TargetError::Spawn {
                command: command.clone(),
                source,
            })?;
        let (info, libc, maps) = setup_rx.recv().unwrap_or_else(|_| {
            Err(TargetError::ExitedEarly {
                command: command.clone(),
                status: -1,
            })
        })?;
        Ok(Launched {
            info,
            libc,
            maps,
            control: control_tx,
            events: event_rx,
        })
    }

    /// Lets the process run; from here on it is traced only to catch its exit.
    pub fn release(&self) {
        let _ = self.control.send(Control::Release);
    }

    /// Hands the process over to a tracer that must own all its threads (ptrace requests come
    /// only from the thread that attached): the launcher thread lets go of it, leaving it
    /// stopped, and ends. `release` and `detach` do nothing afterwards.
    pub fn hand_over(&self) -> Result<Handover, TargetError> {
        let (tx, rx) = mpsc::channel();
        let gone = || TargetError::ExitedEarly {
            command: self.info.command.clone(),
            status: -1,
        };
        self.control.send(Control::HandOver(tx)).map_err(|_| gone())?;
        let events = rx.recv().map_err(|_| gone())??;
        Ok(Handover {
            pid: self.info.pid,
            events,
        })
    }

    /// Stops tracing; the process runs on untouched.
    pub fn detach(&self) {
        let _ = self.control.send(Control::Detach);
    }
}

type Setup = Result<(ProcessInfo, String, ProcMaps), TargetError>;

fn launcher(
    argv: Vec<OsString>,
    stdio: Option<(File, File)>,
    setup: Sender<Setup>,
    control: Receiver<Control>,
    events: Sender<LaunchEvent>,
) {
    let command = argv[0].to_string_lossy().into_owned();
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    if let Some((out, err)) = stdio {
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    }
    // SAFETY: traceme is a single async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| ptrace::traceme().map_err(std::io::Error::from));
    }
    let child = match cmd.spawn() {
        Ok(child) => child,
        Err(source) => {
            let _ = setup.send(Err(TargetError::Spawn { command, source }));
            return;
        }
    };
    let pid_u32 = child.id();
    let pid = Pid::from_raw(pid_u32 as i32);
    let ptrace_err = |what| move |source| TargetError::Ptrace { what, pid: pid_u32, source };
    // Before any error is reported: the tracer may exit as soon as it reads one, and a
    // command it leaves traced and stopped would run on untraced once it is gone.
    let kill = || {
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
    };

    // Stopped at exec: only the program and the dynamic loader are mapped.
    match waitpid(pid, None) {
        Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {}
        Ok(status) => {
            let _ = setup.send(Err(TargetError::ExitedEarly {
                command,
                status: exit_code(status).unwrap_or(-1),
            }));
            return;
        }
        Err(e) => {
            kill();
            let _ = setup.send(Err(ptrace_err("wait for exec")(e)));
            return;
        }
    }
    if !is_dynamic(Path::new(&format!("/proc/{pid_u32}/exe"))) {
        kill();
        let _ = setup.send(Err(TargetError::StaticBinary { what: command }));
        return;
    }
    // EXITKILL: should the tracer die during set-up, the half-started command goes too.
    if let Err(e) = ptrace::setoptions(
        pid,
        ptrace::Options::PTRACE_O_TRACESYSGOOD | ptrace::Options::PTRACE_O_EXITKILL,
    ) {
        kill();
        let _ = setup.send(Err(ptrace_err("set options")(e)));
        return;
    }

    // Follow the loader's system calls until the C library is mapped. Uprobes placed on
    // its file then reach every later mapping of it in this process, before any of its
    // code runs.
    let mut found = None;
    for _ in 0..MAX_LOADER_SYSCALLS {
        if let Err(e) = ptrace::syscall(pid, None) {
            kill();
            let _ = setup.send(Err(ptrace_err("syscall")(e)));
            return;
        }
        match waitpid(pid, None) {
            Ok(WaitStatus::PtraceSyscall(_)) => {
                let Ok(regs) = ptrace::getregs(pid) else { continue };
                let is_exit = regs.rax as i64 != -(libc::ENOSYS as i64);
                if regs.orig_rax == libc::SYS_mmap as u64 && is_exit {
                    let Ok(maps) = ProcMaps::read(pid_u32) else { continue };
                    if let Some(libc) = find_libc(&maps) {
                        found = Some((libc, maps));
                        break;
                    }
                }
            }
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal before main: deliver it on the next resume.
                let _ = ptrace::syscall(pid, sig);
                let _ = waitpid(pid, None);
            }
            Ok(status) => {
                let _ = setup.send(Err(TargetError::ExitedEarly {
                    command,
                    status: exit_code(status).unwrap_or(-1),
                }));
                return;
            }
            Err(e) => {
                kill();
                let _ = setup.send(Err(ptrace_err("wait")(e)));
                return;
            }
        }
    }
    let Some((libc, mut maps)) = found else {
        kill();
        let _ = setup.send(Err(TargetError::NoLibc { what: command }));
        return;
    };
    // Follow the loader until it has mapped every library the program needs (its first
    // system call that is not about mapping files), so that the stack walker's tables hold
    // them before any of their code runs. No library code has run yet at that point.
    match follow_until_loaded(pid) {
        Ok(()) => {
            if let Ok(m) = ProcMaps::read(pid_u32) {
                maps = m;
            }
        }
        Err(e) => {
            kill();
            let _ = setup.send(Err(e));
            return;
        }
    }
    let info = inspect(pid_u32).unwrap_or(ProcessInfo {
        pid: pid_u32,
        task: pid_u32,
        command: command.clone(),
    });
    if setup.send(Ok((info, libc.clone(), maps))).is_err() {
        kill();
        return;
    }

    // Wait for the probes. If the tracer gives up instead, the command goes.
    match control.recv() {
        Ok(Control::Release) => {}
        Ok(Control::HandOver(reply)) => {
            // Breakpoints need libc's code mapped, not just the file: follow the loader a
            // little further, until the executable segment is there (still before any of
            // libc's code has run).
            if let Err(e) = follow_until_libc_code(pid, &libc) {
                let _ = reply.send(Err(e));
                kill();
                return;
            }
            // SIGSTOP is queued while we still hold it, so it takes effect the moment the
            // detach lets it go, before it runs an instruction; the new tracer must find it
            // stopped, so wait for the stop to show.
            let stopped = nix::sys::signal::kill(pid, Signal::SIGSTOP)
                .and_then(|()| ptrace::detach(pid, None))
                .and_then(|()| waitpid(pid, Some(WaitPidFlag::WUNTRACED | WaitPidFlag::__WALL)));
            match stopped {
                Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {
                    let _ = reply.send(Ok(events));
                }
                Ok(status) => {
                    let _ = reply.send(Err(TargetError::ExitedEarly {
                        command,
                        status: exit_code(status).unwrap_or(-1),
                    }));
                    kill();
                }
                Err(e) => {
                    let _ = reply.send(Err(ptrace_err("hand over")(e)));
                    kill();
                }
            }
            return;
        }
        _ => {
            kill();
            return;
        }
    }
    if ptrace::detach(pid, None).is_err() {
        follow_untraced(pid, &events);
        return;
    }
    // Seize again, only to be told when it exits, while its memory map can still be read.
    // Seizing does not stop it; signals pass through `follow_traced` unchanged.
    if ptrace::seize(pid, ptrace::Options::PTRACE_O_TRACEEXIT).is_err() {
        follow_untraced(pid, &events);
        return;
    }
    follow_traced(pid, &control, &events);
}

/// Steps a traced process, stopped at a system call's exit, up to the entry of the first
/// system call that the dynamic loader does not make while it maps libraries (TLS set-up:
/// arch_prctl(ARCH_SET_FS), set_tid_address and the like).
fn follow_until_loaded(pid: Pid) -> Result<(), TargetError> {
    const ARCH_SET_FS: u64 = 0x1002;
    let mapping_files = |nr: u64, arg0: u64| match nr as libc::c_long {
        libc::SYS_read | libc::SYS_open | libc::SYS_close | libc::SYS_stat | libc::SYS_fstat
        | libc::SYS_lseek | libc::SYS_mmap | libc::SYS_mprotect | libc::SYS_munmap | libc::SYS_brk
        | libc::SYS_pread64 | libc::SYS_access | libc::SYS_openat | libc::SYS_newfstatat
        | libc::SYS_statx => true,
        libc::SYS_arch_prctl => arg0 != ARCH_SET_FS,
        _ => false,
    };
    for _ in 0..MAX_LOADER_SYSCALLS {
        if !next_syscall_stop(pid)? {
            continue;
        }
        let Ok(regs) = ptrace::getregs(pid) else { continue };
        let at_entry = regs.rax as i64 == -(libc::ENOSYS as i64);
        if at_entry && !mapping_files(regs.orig_rax, regs.rdi) {
            return Ok(());
        }
    }
    // A loader that never stops mapping: go on with what is mapped now.
    Ok(())
}

/// Resumes a traced process to its next system call stop: true once there, false when a
/// signal stopped it first (passed on, as the process would have had it).
fn next_syscall_stop(pid: Pid) -> Result<bool, TargetError> {
    let pid_u32 = pid.as_raw() as u32;
    ptrace::syscall(pid, None).map_err(|source| TargetError::Ptrace { what: "syscall", pid: pid_u32, source })?;
    match waitpid(pid, None) {
        Ok(WaitStatus::PtraceSyscall(_)) => Ok(true),
        Ok(WaitStatus::Stopped(_, sig)) => {
            let _ = ptrace::syscall(pid, sig);
            let _ = waitpid(pid, None);
            Ok(false)
        }
        Ok(status) => Err(TargetError::ExitedEarly {
            command: format!("pid {pid}"),
            status: exit_code(status).unwrap_or(-1),
        }),
        Err(source) => Err(TargetError::Ptrace { what: "wait", pid: pid_u32, source }),
    }
}

/// Steps a traced process from one system call to the next until `libc` has an executable
/// mapping.
fn follow_until_libc_code(pid: Pid, libc: &str) -> Result<(), TargetError> {
    let pid_u32 = pid.as_raw() as u32;
    let has_code = || {
        ProcMaps::read(pid_u32).is_ok_and(|m| {
            m.mappings()
                .iter()
                .any(|m| m.path.as_deref() == Some(libc) && m.perms.contains('x'))
        })
    };
    for _ in 0..MAX_LOADER_SYSCALLS {
        if has_code() {
            return Ok(());
        }
        next_syscall_stop(pid)?;
    }
    Err(TargetError::NoLibc { what: format!("pid {pid}") })
}

/// Waits for a child we no longer trace.
fn follow_untraced(pid: Pid, events: &Sender<LaunchEvent>) {
    loop {
        match waitpid(pid, None) {
            Ok(status) => {
                if let Some(code) = exit_code(status) {
                    let _ = events.send(LaunchEvent::Exited(code));
                    return;
                }
            }
            Err(nix::Error::EINTR) => {}
            Err(_) => {
                let _ = events.send(LaunchEvent::Exited(-1));
                return;
            }
        }
    }
}

const PTRACE_LISTEN: libc::c_uint = 0x4208;

/// Relays the seized process's stops until it exits or we are told to detach.
fn follow_traced(pid: Pid, control: &Receiver<Control>, events: &Sender<LaunchEvent>) {
    let flags = WaitPidFlag::__WALL | WaitPidFlag::WNOHANG;
    loop {
        if let Ok(Control::Detach) = control.try_recv() {
            match detach_running(pid) {
                Some(code) => {
                    let _ = events.send(LaunchEvent::Exited(code));
                }
                None => follow_untraced(pid, events),
            }
            return;
        }
        let status = match waitpid(pid, Some(flags)) {
            Ok(WaitStatus::StillAlive) | Err(nix::Error::EINTR) => {
                thread::sleep(Duration::from_millis(5));
                continue;
            }
            Ok(status) => status,
            Err(_) => {
                let _ = events.send(LaunchEvent::Exited(-1));
                return;
            }
        };
        if let Some(code) = exit_code(status) {
            let _ = events.send(LaunchEvent::Exited(code));
            return;
        }
        match status {
            WaitStatus::PtraceEvent(_, _, event) if event == libc::PTRACE_EVENT_EXIT => {
                let _ = events.send(LaunchEvent::exiting(pid.as_raw() as u32));
                let _ = ptrace::cont(pid, None);
            }
            WaitStatus::PtraceEvent(_, _, event) if event == libc::PTRACE_EVENT_STOP => {
                // Group stop (SIGSTOP and friends): stay stopped, as untraced, until SIGCONT.
                unsafe { libc::ptrace(PTRACE_LISTEN, pid.as_raw(), 0, 0) };
            }
            WaitStatus::Stopped(_, sig) => {
                // A signal on its way to the process: pass it on unchanged.
                let _ = ptrace::cont(pid, sig);
            }
            _ => {
                let _ = ptrace::cont(pid, None);
            }
        }
    }
}

/// Detaches from a seized process that may be running: interrupt, then detach at the stop,
/// handing back any signal that was being delivered. Returns the exit status instead if the
/// process exited meanwhile.
fn detach_running(pid: Pid) -> Option<i32> {
    if ptrace::interrupt(pid).is_err() {
        return None;
    }
    for _ in 0..100 {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, sig)) => {
                // A signal-delivery stop came first; detach with the signal.
                let _ = ptrace::detach(pid, sig);
                return None;
            }
            Ok(WaitStatus::PtraceEvent(..)) => {
                let _ = ptrace::detach(pid, None);
                return None;
            }
            Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                return exit_code(status);
            }
            Err(_) => return None,
            Ok(_) => {}
        }
    }
    None
}
