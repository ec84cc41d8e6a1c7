//! The ptrace thread: seizes every thread of the target, puts int3 breakpoints on the
//! allocator entries, runs each displaced instruction out of line (see xol.rs), catches
//! returns by swapping the return address for a trap of its own, and takes it all back out on
//! detach. Every ptrace request comes from this one thread, as the kernel requires.
use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex, atomic::Ordering, mpsc::Sender},
};

use iced_x86::{Code, Decoder, DecoderOptions};
use nix::{errno::Errno, sys::ptrace::Options};
use tracer_common::AllocKind;

use super::{
    PtraceError, Shared,
    book::{Book, Pending},
    guard::Guard,
    sys::{self, Mem, Regs, SI_KERNEL, Stop},
    xol::{self, SLOT_SIZE},
};
use crate::{
    probe::{ProbeSite, libc as libc_file},
    symbolize::maps::ProcMaps,
    target::LaunchEvent,
};

/// What the ptrace engine needs of libc beyond the allocators: `syscall`, to make system
/// calls in the target.
const REQUIRED: &[&str] = &["malloc", "calloc", "realloc", "free", "syscall"];

const INT3: u8 = 0xcc;
const PAGE: u64 = 4096;
/// Offset of the return trap in the out-of-line page; the copies follow it.
const SLOTS_START: u64 = 64;
/// Stack bytes read at once at an allocator entry: enough for the frames of most callers, so
/// that a frame-pointer walk costs one read, not one per frame.
const STACK_CHUNK: usize = 2048;
/// Frames the kernel's user stack walk gives a BPF program (ip + 126), plus the caller.
const MAX_FRAMES: usize = 128;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
/// `jmp *-8(%rsp)`: what the return trap becomes when the page has to stay after detach. A
/// thread arriving there by a return from an allocator call finds the real return address
/// just below its stack pointer, in the slot the call's return address was taken from.
pub(super) const RETURN_JUMP: [u8; 4] = [0xff, 0x64, 0x24, 0xf8];
/// Stack bytes above a thread's stack pointer searched, on detach, for the frame of a signal
/// handler that interrupted the thread inside the page.
const SIGFRAME_SCAN: usize = 64 * 1024;
const KCMP_VM: i32 = 1;

/// Options every task is seized with: follow new threads and processes, see exec and exit.
fn seize_options() -> Options {
    Options::PTRACE_O_TRACECLONE
        | Options::PTRACE_O_TRACEFORK
        | Options::PTRACE_O_TRACEVFORK
        | Options::PTRACE_O_TRACEEXEC
        | Options::PTRACE_O_TRACEEXIT
}

fn is_group_stop(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// What a traced task is to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A thread of the target.
    Thread,
    /// Another process sharing the target's memory (a vfork child before its exec): it runs
    /// into the same breakpoints, and its allocations come from the same heap.
    SharedMm,
    /// A forked child with a copy of the target's memory, breakpoints included: they are
    /// taken out of its copy at its first stop, and it is let go.
    Child,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    /// In a ptrace-stop; `sig` is to be delivered on resume (signal-delivery-stop), `group`
    /// says the stop is a group-stop (resumed with PTRACE_LISTEN, to stay stopped).
    Stopped {
        sig: i32,
        group: bool,
    },
}

/// A return address we swapped for the return trap.
#[derive(Debug)]
struct Hijack {
    /// Where the return address sits (the stack pointer at the allocator's entry).
    slot: u64,
    orig: u64,
    /// The call's bookkeeping; None once it is known never to return normally.
    pending: Option<Pending>,
    /// Its entry in the guard's table.
    guarded: Option<u32>,
}

#[derive(Debug)]
struct Task {
    kind: Kind,
    state: State,
    calls: Vec<Hijack>,
}

impl Task {
    fn new(kind: Kind, state: State) -> Task {
        Task {
            kind,
            state,
            calls: Vec::new(),
        }
    }
}

struct Site {
    function: &'static str,
    /// None for free.
    kind: Option<AllocKind>,
    /// The original instruction.
    orig: Vec<u8>,
    slot: u64,
    back: u64,
}

pub(super) struct Engine {
    pid: i32,
    mem: Mem,
    shared: Arc<Shared>,
    book: Arc<Mutex<Book>>,
    tasks: HashMap<i32, Task>,
    sites: HashMap<u64, Site>,
    /// The out-of-line page; its first byte is the return trap.
    page: u64,
    syscall_insn: u64,
    launch: Option<Sender<LaunchEvent>>,
    /// Puts the target back should this process be killed without cleaning up.
    guard: Option<Guard>,
    /// Exit status of the target, once it is gone.
    pub exit_code: Option<i32>,
    /// Unwind rows of the target's modules, made at the first allocation.
    unwind: Option<crate::unwind::process::ProcessTables>,
}

fn ptrace_err(pid: i32, tid: i32) -> impl Fn(Errno) -> PtraceError {
    move |source| PtraceError::Seize { pid, tid, source }
}

/// The tasks of process `pid` as /proc lists them now.
fn list_tasks(pid: i32) -> Result<Vec<i32>, PtraceError> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|_| PtraceError::Gone(pid))?;
    Ok(dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// Page addresses for the out-of-line page, nearest to libc first (see
/// [`sys::region_candidates`]).
pub fn page_candidates(used: &[(u64, u64)], libc: (u64, u64)) -> Vec<u64> {
    sys::region_candidates(used, libc, PAGE)
}

/// Whether task `other` shares process `pid`'s memory.
fn shares_mm(pid: i32, other: i32) -> bool {
    // SAFETY: plain syscall; 0 means the two address spaces are the same.
    let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, other, KCMP_VM, 0, 0) };
    rc == 0
}

impl Engine {
    /// Seizes every thread of `pid`, places the breakpoints and lets the threads go.
    /// `held`: a launched process left in group-stop by the launcher, to be continued.
    pub(super) fn attach(
        pid: i32,
        libc_host: &Path,
        libc_target: &str,
        launch: Option<Sender<LaunchEvent>>,
        shared: Arc<Shared>,
    ) -> Result<(Engine, Vec<ProbeSite>), PtraceError> {
        let book = shared.book.clone();
        let mem = Mem::open(pid).map_err(|_| PtraceError::Gone(pid))?;
        let mut e = Engine {
            pid,
            mem,
            shared,
            book,
            tasks: HashMap::new(),
            sites: HashMap::new(),
            page: 0,
            syscall_insn: 0,
            launch,
            guard: None,
            exit_code: None,
            unwind: None,
        };
        let held = e.launch.is_some();
        if let Err(err) = e.seize_all(held) {
            e.release_all();
            return Err(err);
        }
        match e.place(libc_host, libc_target) {
            Ok(sites) => {
                let placed: Vec<(u64, Vec<u8>)> =
                    e.sites.iter().map(|(&a, s)| (a, s.orig.clone())).collect();
                e.guard = Guard::start(pid, &placed, e.page);
                e.resume_all();
                Ok((e, sites))
            }
            Err(err) => {
                e.restore();
                e.release_all();
                Err(err)
            }
        }
    }

    fn seize_all(&mut self, held: bool) -> Result<(), PtraceError> {
        let pid = self.pid;
        loop {
            let new: Vec<i32> = list_tasks(pid)?
                .into_iter()
                .filter(|t| !self.tasks.contains_key(t))
                .collect();
            if new.is_empty() {
                return Ok(());
            }
            for tid in new {
                match sys::seize(tid, seize_options()) {
                    Ok(()) => {}
                    Err(Errno::ESRCH) => continue,
                    Err(source) => return Err(ptrace_err(pid, tid)(source)),
                }
                // A launched process sits in the group-stop the launcher left it in: seizing
                // makes it report that stop. Anything else is stopped here.
                if !(held && tid == pid) {
                    let _ = sys::interrupt(tid);
                }
                self.tasks
                    .insert(tid, Task::new(Kind::Thread, State::Running));
            }
            while self.tasks.values().any(|t| t.state == State::Running) {
                let (tid, stop) = match sys::wait(-1, false) {
                    Ok(Some(got)) => got,
                    Ok(None) | Err(Errno::EINTR) => continue,
                    Err(source) => return Err(ptrace_err(pid, pid)(source)),
                };
                self.on_attach_stop(tid, stop)?;
            }
            if held {
                // The launcher stopped it with SIGSTOP to hand it over; undo that group-stop
                // (nothing in the new process can see it: no code of its own has run).
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, libc::SIGCONT) };
                if let Some(t) = self.tasks.get_mut(&pid) {
                    t.state = State::Stopped {
                        sig: 0,
                        group: false,
                    };
                }
            }
        }
    }

    fn on_attach_stop(&mut self, tid: i32, stop: Stop) -> Result<(), PtraceError> {
        if !self.tasks.contains_key(&tid) {
            if matches!(stop, Stop::Exited(_) | Stop::Killed(_)) {
                return Ok(());
            }
            let kind = self.classify(tid);
            self.tasks.insert(tid, Task::new(kind, State::Running));
        }
        match stop {
            Stop::Exited(_) | Stop::Killed(_) => {
                self.tasks.remove(&tid);
                if tid == self.pid {
                    return Err(PtraceError::Gone(self.pid));
                }
            }
            Stop::Signal(sig) => self.set_stopped(tid, sig, false),
            Stop::Event(libc::PTRACE_EVENT_STOP, sig) => {
                self.set_stopped(tid, 0, is_group_stop(sig))
            }
            Stop::Event(libc::PTRACE_EVENT_EXEC, _) => return Err(PtraceError::Exec(self.pid)),
            Stop::Event(event, _) => {
                if matches!(
                    event,
                    libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK
                ) {
                    self.adopt(tid, event);
                }
                self.set_stopped(tid, 0, false);
            }
        }
        Ok(())
    }

    fn set_stopped(&mut self, tid: i32, sig: i32, group: bool) {
        if let Some(t) = self.tasks.get_mut(&tid) {
            t.state = State::Stopped { sig, group };
        }
    }

    /// What a task we did not seize ourselves (auto-attached at clone, fork or vfork) is.
    fn classify(&self, tid: i32) -> Kind {
        if sys::tid_tgid(tid) == self.pid {
            Kind::Thread
        } else if shares_mm(self.pid, tid) {
            Kind::SharedMm
        } else {
            Kind::Child
        }
    }

    /// Records the task a clone, fork or vfork event of `parent` announced.
    fn adopt(&mut self, parent: i32, event: i32) {
        let Ok(child) = sys::event_message(parent) else {
            return;
        };
        let child = child as i32;
        if self.tasks.contains_key(&child) {
            return;
        }
        let kind = match event {
            libc::PTRACE_EVENT_VFORK => Kind::SharedMm,
            libc::PTRACE_EVENT_FORK => Kind::Child,
            _ => self.classify(child),
        };
        self.tasks.insert(child, Task::new(kind, State::Running));
    }

    /// Finds the allocator, makes the out-of-line page, writes the copies, then the int3s.
    fn place(
        &mut self,
        libc_host: &Path,
        libc_target: &str,
    ) -> Result<Vec<ProbeSite>, PtraceError> {
        let pid = self.pid;
        let functions = libc_file::functions(libc_host, REQUIRED, libc_file::OPTIONAL)?;
        let maps = ProcMaps::read(pid as u32).map_err(|_| PtraceError::Gone(pid))?;
        let exec_maps: Vec<_> = maps
            .mappings()
            .iter()
            .filter(|m| m.path.as_deref() == Some(libc_target) && m.perms.contains('x'))
            .collect();
        let address_of = |file_offset: u64| {
            exec_maps.iter().find_map(|m| {
                let within = file_offset.checked_sub(m.offset)?;
                (within < m.end - m.start).then_some(m.start + within)
            })
        };
        let libc_span = maps
            .mappings()
            .iter()
            .filter(|m| m.path.as_deref() == Some(libc_target))
            .fold(None, |span: Option<(u64, u64)>, m| {
                Some(span.map_or((m.start, m.end), |(lo, hi)| (lo.min(m.start), hi.max(m.end))))
            })
            .ok_or_else(|| PtraceError::NotMapped {
                pid,
                libc: libc_target.to_owned(),
            })?;
        let used: Vec<(u64, u64)> = maps.mappings().iter().map(|m| (m.start, m.end)).collect();

        // A `syscall` instruction in libc, through which calls are made in the target.
        let sc = &functions["syscall"];
        let sc_addr = address_of(sc.file_offset).ok_or_else(|| PtraceError::NotMapped {
            pid,
            libc: libc_target.to_owned(),
        })?;
        let mut decoder = Decoder::with_ip(64, &sc.prologue, sc_addr, DecoderOptions::NONE);
        self.syscall_insn = decoder
            .iter()
            .find(|i| i.code() == Code::Syscall)
            .map(|i| i.ip())
            .ok_or(PtraceError::NoSyscall)?;

        // One site per address: aligned_alloc and memalign are one function in glibc.
        let mut wanted: Vec<(&'static str, Option<AllocKind>, u64)> = vec![];
        for &(name, kind) in libc_file::ALLOCATORS {
            if let Some(f) = functions.get(name)
                && !wanted.iter().any(|w| w.2 == f.file_offset)
            {
                wanted.push((name, Some(kind), f.file_offset));
            }
        }
        wanted.insert(0, ("free", None, functions["free"].file_offset));

        self.page = self.map_page(&page_candidates(&used, libc_span))?;
        let mut page_bytes = vec![0u8; (SLOTS_START + SLOT_SIZE * wanted.len() as u64) as usize];
        page_bytes[0] = INT3;
        let mut sites = Vec::new();
        for (i, &(function, kind, file_offset)) in wanted.iter().enumerate() {
            let addr = address_of(file_offset).ok_or_else(|| PtraceError::NotMapped {
                pid,
                libc: libc_target.to_owned(),
            })?;
            let mut code = [0u8; 16];
            self.mem
                .read_code(addr, &mut code)
                .map_err(|source| PtraceError::Mem {
                    what: "read",
                    addr,
                    source,
                })?;
            let file = &functions[function].prologue;
            let slot = self.page + SLOTS_START + SLOT_SIZE * i as u64;
            // A breakpoint of someone else's (a debugger, a uprobe on every process) shows as
            // a byte that differs from the file: taking it over would break their tool.
            if code[0] != file[0] {
                return Err(PtraceError::Busy { function, addr });
            }
            let r = xol::relocate(&code, addr, slot)
                .map_err(|reason| PtraceError::Site { function, reason })?;
            if code[..r.len as usize] != file[..r.len as usize] {
                return Err(PtraceError::Busy { function, addr });
            }
            let at = (slot - self.page) as usize;
            page_bytes[at..at + r.bytes.len()].copy_from_slice(&r.bytes);
            self.sites.insert(
                addr,
                Site {
                    function,
                    kind,
                    orig: code[..r.len as usize].to_vec(),
                    slot,
                    back: slot + r.back,
                },
            );
            sites.push(ProbeSite {
                function,
                offset: 0,
                emulated: true,
                returns: kind.is_some(),
            });
        }
        self.mem
            .write_code(self.page, &page_bytes)
            .map_err(|source| PtraceError::Mem {
                what: "write",
                addr: self.page,
                source,
            })?;
        for (&addr, site) in &self.sites {
            self.mem
                .write_code(addr, &[INT3])
                .map_err(|source| PtraceError::Mem {
                    what: "write",
                    addr,
                    source,
                })?;
            let _ = site.function;
        }
        Ok(sites)
    }

    /// Maps the out-of-line page in the target at the first of `candidates` still free (the
    /// target may map memory meanwhile: a taken place is skipped).
    fn map_page(&mut self, candidates: &[u64]) -> Result<u64, PtraceError> {
        let prot = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64 | MAP_FIXED_NOREPLACE;
        for &hint in candidates.iter().take(64) {
            let r = self.inject(libc::SYS_mmap, [hint, PAGE, prot, flags, u64::MAX, 0])?;
            if r == hint as i64 {
                return Ok(hint);
            }
            if r >= 0 {
                // A kernel without MAP_FIXED_NOREPLACE treats it as a hint: give it back.
                self.inject(libc::SYS_munmap, [r as u64, PAGE, 0, 0, 0, 0])?;
            } else if r != -(libc::EEXIST as i64) {
                return Err(PtraceError::Page(format!(
                    "mmap in the target failed: {}",
                    Errno::from_raw(-r as i32)
                )));
            }
        }
        Err(PtraceError::Page(format!(
            "no free page within {} MiB of libc",
            sys::REACH >> 20
        )))
    }

    /// Runs a system call in some stopped task of the target (one whose memory is the
    /// target's), keeping that task's stop exactly as it was.
    fn inject(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, PtraceError> {
        let tid = self
            .tasks
            .iter()
            .filter(|(_, t)| t.kind == Kind::Thread && matches!(t.state, State::Stopped { .. }))
            .map(|(&tid, t)| (tid, t.state))
            .min_by_key(|(_, s)| matches!(s, State::Stopped { sig: 0, .. }) as u8 ^ 1)
            .map(|(tid, _)| tid)
            .ok_or(PtraceError::NoStoppedThread)?;
        self.inject_in(tid, nr, args)
    }

    fn inject_in(&mut self, tid: i32, nr: i64, args: [u64; 6]) -> Result<i64, PtraceError> {
        let Some(State::Stopped { sig, group }) = self.tasks.get(&tid).map(|t| t.state) else {
            return Err(PtraceError::NoStoppedThread);
        };
        // A signal-delivery-stop's signal would be lost on the resume: keep its siginfo.
        let info = if sig != 0 {
            sys::siginfo(tid).ok()
        } else {
            None
        };
        let (ret, extra) = sys::inject_syscall(tid, self.syscall_insn, nr, args)?;
        let mut resume = extra;
        if let Some(info) = info {
            if extra != 0 {
                sys::tgkill(self.pid, tid, extra);
            }
            resume = if sys::set_siginfo(tid, &info).is_ok() {
                sig
            } else {
                0
            };
        }
        // The task now sits in a signal-delivery-stop (the step's SIGTRAP): a group-stop
        // comes back by itself on resume, since the process is still stopped.
        let _ = group;
        self.set_stopped(tid, resume, false);
        Ok(ret)
    }

    fn resume(&mut self, tid: i32) {
        let Some(t) = self.tasks.get_mut(&tid) else {
            return;
        };
        if let State::Stopped { sig, group } = t.state {
            let _ = if group {
                sys::listen(tid)
            } else {
                sys::cont(tid, sig)
            };
            t.state = State::Running;
        }
    }

    fn resume_all(&mut self) {
        let tids: Vec<i32> = self.tasks.keys().copied().collect();
        for tid in tids {
            self.resume(tid);
        }
    }

    /// Lets go of every task, delivering what signal each was stopped with.
    fn release_all(&mut self) {
        for (&tid, t) in &self.tasks {
            if let State::Stopped { sig, .. } = t.state {
                let _ = sys::detach(tid, sig);
            }
        }
        self.tasks.clear();
    }

    /// The event loop, until the target is gone or the recording ends.
    pub(super) fn run(&mut self) {
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                self.detach();
                return;
            }
            match sys::wait(-1, false) {
                Ok(Some((tid, stop))) => {
                    if self.on_stop(tid, stop) {
                        return;
                    }
                }
                Ok(None) | Err(Errno::EINTR) => {}
                Err(_) => return,
            }
        }
    }

    /// Handles one stop while recording; true when the target is gone (or no longer traced).
    fn on_stop(&mut self, tid: i32, stop: Stop) -> bool {
        if let Stop::Exited(_) | Stop::Killed(_) = stop {
            return self.on_gone(tid, stop);
        }
        if !self.tasks.contains_key(&tid) {
            let kind = self.classify(tid);
            self.tasks.insert(tid, Task::new(kind, State::Running));
        }
        let kind = self.tasks[&tid].kind;
        if kind == Kind::Child {
            let sig = if let Stop::Signal(sig) = stop { sig } else { 0 };
            self.release_child(tid, sig);
            return false;
        }
        match stop {
            Stop::Signal(libc::SIGTRAP) => self.on_sigtrap(tid, false),
            Stop::Signal(sig) => {
                let _ = sys::cont(tid, sig);
            }
            Stop::Event(libc::PTRACE_EVENT_STOP, sig) => {
                let _ = if is_group_stop(sig) {
                    sys::listen(tid)
                } else {
                    sys::cont(tid, 0)
                };
            }
            Stop::Event(libc::PTRACE_EVENT_EXEC, _) => return self.on_exec(tid),
            Stop::Event(libc::PTRACE_EVENT_EXIT, _) => {
                self.on_exiting(tid);
                let _ = sys::cont(tid, 0);
            }
            Stop::Event(event, _) => {
                self.adopt(tid, event);
                let _ = sys::cont(tid, 0);
            }
            Stop::Exited(_) | Stop::Killed(_) => {}
        }
        false
    }

    /// A task exited. True when it was the target's last (its thread group leader).
    fn on_gone(&mut self, tid: i32, stop: Stop) -> bool {
        if let Some(mut t) = self.tasks.remove(&tid) {
            self.abandon_calls(&mut t);
        }
        if tid != self.pid {
            return false;
        }
        let code = match stop {
            Stop::Exited(code) => code,
            Stop::Killed(sig) => 128 + sig,
            _ => -1,
        };
        self.exit_code = Some(code);
        if let Some(tx) = &self.launch {
            let _ = tx.send(LaunchEvent::Exited(code));
        }
        // Whatever else is still traced (a vfork child) goes its own way.
        self.release_all();
        self.dismiss_guard();
        true
    }

    fn on_exiting(&mut self, tid: i32) {
        if let Some(mut t) = self.tasks.remove(&tid) {
            self.abandon_calls(&mut t);
            self.tasks.insert(tid, t);
        }
        if tid == self.pid {
            // The leader's memory is still there at its exit stop: its map names the frames
            // of a program that is about to be gone.
            if let Some(tx) = &self.launch {
                let _ = tx.send(LaunchEvent::exiting(tid as u32));
            }
        }
    }

    fn abandon_calls(&mut self, task: &mut Task) {
        let mut book = self.book.lock().expect("book lock");
        for h in task.calls.drain(..) {
            if let (Some(g), Some(i)) = (self.guard.as_mut(), h.guarded) {
                g.untrack(i);
            }
            if let Some(p) = h.pending {
                book.abandon(p);
            }
        }
    }

    /// exec: a vfork child's just leaves our memory; the target's own replaces its program,
    /// and with it every breakpoint: what was recorded stands, and the new program runs
    /// untraced.
    fn on_exec(&mut self, tid: i32) -> bool {
        if self
            .tasks
            .get(&tid)
            .is_some_and(|t| t.kind == Kind::SharedMm)
        {
            self.tasks.remove(&tid);
            let _ = sys::detach(tid, 0);
            return false;
        }
        crate::diag::warn(format_args!(
            "pid {} called exec; the ptrace backend stops there (the report covers the program before exec)",
            self.pid
        ));
        let tids: Vec<i32> = self.tasks.keys().copied().collect();
        for t in tids {
            if let Some(mut task) = self.tasks.remove(&t) {
                self.abandon_calls(&mut task);
                if task.kind == Kind::Thread {
                    // After exec only the leader is left; the others' exits are reaped below.
                    continue;
                }
                self.tasks.insert(t, task);
            }
        }
        self.tasks.remove(&self.pid);
        let _ = sys::detach(self.pid, 0);
        self.release_all();
        self.dismiss_guard();
        self.shared.untraced.store(true, Ordering::Release);
        true
    }

    /// A SIGTRAP: ours if the thread stands right after one of our int3s and the kernel sent
    /// it (not kill(2)). `detaching`: the thread is to stay stopped, and an entry is rewound
    /// so that it runs the real instruction once the bytes are back.
    fn on_sigtrap(&mut self, tid: i32, detaching: bool) {
        let Ok(mut regs) = sys::getregs(tid) else {
            return;
        };
        let at = regs.rip.wrapping_sub(1);
        let ours = at == self.page || self.sites.contains_key(&at);
        let from_int3 = ours && sys::siginfo(tid).is_ok_and(|i| i.si_code == SI_KERNEL);
        if !from_int3 {
            if detaching {
                self.set_stopped(tid, libc::SIGTRAP, false);
            } else {
                let _ = sys::cont(tid, libc::SIGTRAP);
            }
            return;
        }
        if at == self.page {
            if !self.on_return(tid, &mut regs) {
                // No call of ours returns here: the SIGTRAP is the thread's own fate.
                if detaching {
                    self.set_stopped(tid, libc::SIGTRAP, false);
                } else {
                    let _ = sys::cont(tid, libc::SIGTRAP);
                }
                return;
            }
        } else if detaching {
            regs.rip = at;
        } else {
            self.on_entry(tid, at, &mut regs);
        }
        let _ = sys::setregs(tid, &regs);
        if detaching {
            self.set_stopped(tid, 0, false);
        } else {
            let _ = sys::cont(tid, 0);
        }
    }

    /// Whether thread `tid`, standing with stack pointer `sp`, is inside an allocator call we
    /// already follow. A call the stack has unwound past (left by longjmp) no longer counts,
    /// though its return address stays known in case it does return.
    fn in_call(&mut self, tid: i32, sp: u64) -> bool {
        let Some(task) = self.tasks.get_mut(&tid) else {
            return false;
        };
        let Some(last) = task.calls.iter_mut().rev().find(|h| h.pending.is_some()) else {
            return false;
        };
        // At the very slot: a tail call (reallocarray -> realloc, realloc(NULL, n) -> malloc)
        // reuses the frame, and with it our swapped return address.
        if sp <= last.slot {
            return true;
        }
        if let Some(p) = last.pending.take() {
            self.book.lock().expect("book lock").abandon(p);
        }
        false
    }

    fn on_entry(&mut self, tid: i32, at: u64, regs: &mut Regs) {
        let (kind, slot) = {
            let site = &self.sites[&at];
            (site.kind, site.slot)
        };
        regs.rip = slot;
        let sp = regs.rsp;
        if self.in_call(tid, sp) {
            // glibc calling itself (realloc -> malloc, reallocarray -> realloc, realloc(p, 0)
            // -> free): the outer call accounts for it.
            return;
        }
        let Some(kind) = kind else {
            self.book.lock().expect("book lock").free(regs.rdi);
            return;
        };
        let Some((ret, frames)) = self.capture(at, regs) else {
            // Not even the return address is readable: the call cannot be followed.
            self.book.lock().expect("book lock").stack_unavailable();
            return;
        };
        let mut book = self.book.lock().expect("book lock");
        let stack = book.intern_stack(&frames);
        let pending = book.enter(kind, [regs.rdi, regs.rsi, regs.rdx], stack);
        if self.mem.write_data(sp, &self.page.to_le_bytes()) {
            drop(book);
            let guarded = self.guard.as_mut().and_then(|g| g.track(sp, ret));
            if let Some(task) = self.tasks.get_mut(&tid) {
                task.calls.push(Hijack {
                    slot: sp,
                    orig: ret,
                    pending: Some(pending),
                    guarded,
                });
            }
        } else {
            book.stack_unavailable();
            book.abandon(pending);
        }
    }

    /// The return address and the stack: the allocator's entry, then the frames a walk of
    /// the unwind rows finds (frame pointers in code without rows; see `crate::unwind`).
    fn capture(&mut self, at: u64, regs: &Regs) -> Option<(u64, Vec<u64>)> {
        let sp = regs.rsp;
        let mut chunk = [0u8; STACK_CHUNK];
        let got = self.mem.read_some(sp, &mut chunk) as u64;
        if got < 8 {
            return None;
        }
        let ret = u64::from_le_bytes(chunk[..8].try_into().unwrap());
        let mem = &self.mem;
        let read = |addr: u64| {
            if addr >= sp && addr.saturating_add(8) <= sp + got {
                let off = (addr - sp) as usize;
                return Some(u64::from_le_bytes(chunk[off..off + 8].try_into().unwrap()));
            }
            let mut word = [0u8; 8];
            mem.read(addr, &mut word).then(|| u64::from_le_bytes(word))
        };
        if self.unwind.is_none() {
            let mode = self.book.lock().map(|b| b.unwind_mode()).unwrap_or_default();
            self.unwind = Some(crate::unwind::process::ProcessTables::new(self.pid as u32, mode));
        }
        let Some(tables) = self.unwind.as_mut() else { return None };
        let fp_only = tables.mode == crate::unwind::UnwindMode::Fp;
        let (mut frames, _) = tables.pcs(crate::unwind::Regs { ip: at, sp, bp: regs.rbp }, MAX_FRAMES, read);
        // The caller is on top of the stack at the entry, whatever the rows say; a
        // frame-pointer walk from the entry skips it (as the kernel's does with --unwind fp).
        if frames.len() < 2 {
            frames.push(ret);
        } else if fp_only && frames[1] != ret {
            frames.insert(1, ret);
            frames.truncate(MAX_FRAMES);
        }
        Some((ret, frames))
    }

    /// A thread hit the return trap: finds which of its calls returned (the one whose return
    /// address slot the stack pointer just passed), accounts for it and sends the thread to the
    /// real return address. False if no call of the thread returns here.
    fn on_return(&mut self, tid: i32, regs: &mut Regs) -> bool {
        let Some(task) = self.tasks.get_mut(&tid) else {
            return false;
        };
        let Some(i) = task.calls.iter().rposition(|h| h.slot + 8 == regs.rsp) else {
            self.book.lock().expect("book lock").orphan_return();
            return false;
        };
        // Calls made after this one and still listed never returned (a longjmp out of them).
        let dead: Vec<Hijack> = task.calls.drain(i + 1..).collect();
        let h = task.calls.pop().expect("index i exists");
        regs.rip = h.orig;
        let memptr = match &h.pending {
            Some(p) if p.kind == AllocKind::PosixMemalign && regs.rax as u32 == 0 => {
                self.mem.read_u64(p.ptr_arg)
            }
            _ => None,
        };
        if let Some(g) = self.guard.as_mut() {
            for i in dead.iter().chain([&h]).filter_map(|h| h.guarded) {
                g.untrack(i);
            }
        }
        let mut book = self.book.lock().expect("book lock");
        for d in dead {
            if let Some(p) = d.pending {
                book.abandon(p);
            }
        }
        if let Some(p) = h.pending {
            book.exit(p, regs.rax, memptr);
        }
        true
    }

    /// A forked child: its copy of our breakpoints, trap page and swapped return addresses is
    /// taken out, and it goes on untraced.
    fn release_child(&mut self, tid: i32, sig: i32) {
        self.tasks.remove(&tid);
        if let Ok(child) = Mem::open(tid) {
            for (&addr, site) in &self.sites {
                let _ = child.write_code(addr, &site.orig);
            }
            for task in self.tasks.values() {
                for h in &task.calls {
                    if child.read_u64(h.slot) == Some(self.page) {
                        child.write_data(h.slot, &h.orig.to_le_bytes());
                    }
                }
            }
            let (nr, page) = (libc::SYS_munmap, self.page);
            self.tasks.insert(
                tid,
                Task::new(Kind::Child, State::Stopped { sig, group: false }),
            );
            let keep = self.inject_child(tid, nr, page);
            let sig = match self.tasks.remove(&tid).map(|t| t.state) {
                Some(State::Stopped { sig, .. }) => sig,
                _ => sig,
            };
            let _ = keep;
            let _ = sys::detach(tid, sig);
        } else {
            let _ = sys::detach(tid, sig);
        }
    }

    fn inject_child(&mut self, tid: i32, nr: i64, page: u64) -> bool {
        let Ok(regs) = sys::getregs(tid) else {
            return false;
        };
        if regs.rip >= page && regs.rip < page + PAGE {
            // It stands in the page (cannot happen at a fork's return): leave the page.
            return false;
        }
        self.inject_in(tid, nr, [page, PAGE, 0, 0, 0, 0]).is_ok()
    }

    /// Stops every task, puts every byte back, moves threads out of the page, unmaps it and
    /// detaches, each task keeping the signal it was about to receive.
    pub(super) fn detach(&mut self) {
        let tids: Vec<i32> = self
            .tasks
            .iter()
            .filter(|(_, t)| t.state == State::Running)
            .map(|(&t, _)| t)
            .collect();
        for tid in tids {
            if sys::interrupt(tid) == Err(Errno::ESRCH) {
                self.tasks.remove(&tid);
            }
        }
        let mut untraced = false;
        while self.tasks.values().any(|t| t.state == State::Running) {
            let (tid, stop) = match sys::wait(-1, false) {
                Ok(Some(got)) => got,
                Ok(None) | Err(Errno::EINTR) => continue,
                Err(_) => break,
            };
            if let Stop::Exited(_) | Stop::Killed(_) = stop {
                if self.on_gone(tid, stop) {
                    return;
                }
                continue;
            }
            if !self.tasks.contains_key(&tid) {
                let kind = self.classify(tid);
                self.tasks.insert(tid, Task::new(kind, State::Running));
            }
            if self.tasks[&tid].kind == Kind::Child {
                let sig = if let Stop::Signal(sig) = stop { sig } else { 0 };
                self.release_child(tid, sig);
                continue;
            }
            match stop {
                Stop::Signal(libc::SIGTRAP) => self.on_sigtrap(tid, true),
                Stop::Signal(sig) => self.set_stopped(tid, sig, false),
                Stop::Event(libc::PTRACE_EVENT_STOP, sig) => {
                    self.set_stopped(tid, 0, is_group_stop(sig))
                }
                Stop::Event(libc::PTRACE_EVENT_EXEC, _) => {
                    if self.on_exec(tid) {
                        untraced = true;
                        break;
                    }
                }
                Stop::Event(event, _) => {
                    if event != libc::PTRACE_EVENT_EXIT {
                        self.adopt(tid, event);
                    }
                    self.set_stopped(tid, 0, false);
                }
                Stop::Exited(_) | Stop::Killed(_) => {}
            }
        }
        if !untraced {
            self.take_pending_traps();
            self.restore();
        }
        self.release_all();
        self.dismiss_guard();
        self.shared.untraced.store(true, Ordering::Release);
    }

    /// Nothing of ours is left in the target (or the target is gone): the guard goes.
    fn dismiss_guard(&mut self) {
        if let Some(g) = self.guard.take() {
            g.done();
        }
        self.sites.clear();
    }

    /// Settles every stopped thread that stands where, let go untraced, it would execute one
    /// of our int3s or would have its trap's SIGTRAP delivered:
    /// - at the start of the trap page, having returned from an allocator call into it but not
    ///   yet executed its int3: that is the return the trap would catch, taken here;
    /// - right after an int3 of ours with the trap's SIGTRAP pending (the kernel reports an
    ///   interrupt that lands just after the int3 first and keeps the SIGTRAP queued): run into
    ///   its signal-delivery-stop and handled like any other trap.
    /// (A thread on an int3 it has not executed yet runs the original instruction once the
    /// bytes are back; one in a copy or at its jump back is moved by `restore`.)
    fn take_pending_traps(&mut self) {
        let tids: Vec<i32> = self.tasks.keys().copied().collect();
        for tid in tids {
            if self.page != 0
                && matches!(
                    self.tasks.get(&tid).map(|t| t.state),
                    Some(State::Stopped { .. })
                )
                && let Ok(mut regs) = sys::getregs(tid)
                && regs.rip == self.page
                && self.on_return(tid, &mut regs)
            {
                let _ = sys::setregs(tid, &regs);
            }
            for _ in 0..4 {
                let Some(State::Stopped { sig: 0, .. }) = self.tasks.get(&tid).map(|t| t.state)
                else {
                    break;
                };
                let Ok(regs) = sys::getregs(tid) else { break };
                let at = regs.rip.wrapping_sub(1);
                if at != self.page && !self.sites.contains_key(&at) {
                    break;
                }
                // The position alone is not proof: after a one-byte displaced instruction a
                // thread back from its copy stands at site + 1 with nothing pending, and would
                // run on freely from here.
                if !sys::signal_pending(tid, libc::SIGTRAP) {
                    break;
                }
                if sys::cont(tid, 0).is_err() {
                    break;
                }
                match sys::wait(tid, false) {
                    Ok(Some((_, Stop::Signal(libc::SIGTRAP)))) => self.on_sigtrap(tid, true),
                    Ok(Some((_, Stop::Signal(sig)))) => self.set_stopped(tid, sig, false),
                    Ok(Some((_, stop @ (Stop::Exited(_) | Stop::Killed(_))))) => {
                        self.on_gone(tid, stop);
                        break;
                    }
                    Ok(Some((_, Stop::Event(event, sig)))) => {
                        if matches!(
                            event,
                            libc::PTRACE_EVENT_CLONE
                                | libc::PTRACE_EVENT_FORK
                                | libc::PTRACE_EVENT_VFORK
                        ) {
                            self.adopt(tid, event);
                        }
                        self.set_stopped(
                            tid,
                            0,
                            event == libc::PTRACE_EVENT_STOP && is_group_stop(sig),
                        );
                    }
                    _ => break,
                }
            }
        }
    }

    /// With every task stopped: original bytes back, swapped return addresses back, threads
    /// standing in the page moved to the matching place in libc, and the page unmapped, unless
    /// a thread will come back into it (a signal handler's frame says it interrupted the
    /// thread there): then the page stays, its return trap made a jump to the restored return
    /// address.
    fn restore(&mut self) {
        for (&addr, site) in &self.sites {
            let _ = self.mem.write_code(addr, &site.orig);
        }
        let page = self.page;
        let mut keep_page = false;
        // Stack pointers right after a return into the page, one per call still followed.
        let mut returned_sp: Vec<u64> = Vec::new();
        let tids: Vec<i32> = self.tasks.keys().copied().collect();
        for tid in tids {
            let Some(mut task) = self.tasks.remove(&tid) else {
                continue;
            };
            for h in &task.calls {
                if self.mem.read_u64(h.slot) == Some(page) {
                    self.mem.write_data(h.slot, &h.orig.to_le_bytes());
                }
                returned_sp.push(h.slot + 8);
            }
            self.abandon_calls(&mut task);
            self.tasks.insert(tid, task);
            if page == 0 {
                continue;
            }
            let Ok(mut regs) = sys::getregs(tid) else {
                continue;
            };
            if regs.rip < page || regs.rip >= page + PAGE {
                continue;
            }
            let back_to = self.sites.iter().find_map(|(&addr, s)| {
                if regs.rip == s.slot {
                    Some(addr)
                } else if regs.rip == s.back {
                    Some(addr + s.orig.len() as u64)
                } else {
                    None
                }
            });
            match back_to {
                Some(to) => {
                    regs.rip = to;
                    let _ = sys::setregs(tid, &regs);
                }
                None => keep_page = true,
            }
        }
        if page != 0 && !keep_page {
            keep_page = self
                .tasks
                .keys()
                .any(|&tid| self.handler_returns_into_page(tid, &returned_sp));
        }
        if page != 0 {
            if keep_page {
                let _ = self.mem.write_code(page, &RETURN_JUMP);
            } else {
                let _ = self.inject(libc::SYS_munmap, [page, PAGE, 0, 0, 0, 0]);
            }
        }
        self.sites.clear();
        self.page = 0;
    }

    /// Whether thread `tid` is in a signal handler that interrupted it inside the page, so
    /// that its sigreturn will bring it back there. The kernel saved the interrupted context on
    /// the stack the handler runs on, above the handler's stack pointer, with the saved rsp
    /// right before the saved rip. A saved rip at a copy or its jump back says so by itself; one
    /// at the return trap must come with the stack pointer of a return from a call we follow
    /// (a stale swapped return address left in a dead stack slot does not).
    fn handler_returns_into_page(&self, tid: i32, returned_sp: &[u64]) -> bool {
        let Ok(regs) = sys::getregs(tid) else {
            return false;
        };
        let mut stack = vec![0u8; SIGFRAME_SCAN];
        let got = self.mem.read_some(regs.rsp, &mut stack) / 8 * 8;
        let words: Vec<u64> = stack[..got]
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        words.windows(2).any(|w| {
            let (saved_sp, saved_ip) = (w[0], w[1]);
            self.sites
                .values()
                .any(|s| saved_ip == s.slot || saved_ip == s.back)
                || (saved_ip == self.page && returned_sp.contains(&saved_sp))
        })
    }
}

impl Drop for Engine {
    /// The ptrace thread unwinding (a bug) with breakpoints in: the kernel would detach the
    /// threads as it ends and leave the int3s behind, so take them out first.
    fn drop(&mut self) {
        if !self.sites.is_empty() {
            self.detach();
        }
    }
}

#[cfg(test)]
mod tests {
    //! Detach with a thread parked, by single steps, at each place in and around our code where
    //! a thread can be stopped, then checks that the thread runs on untraced. The engine waits
    //! with waitpid(-1), which would reap other tests' children, so each case runs in a process
    //! of its own (forked from the test) whose only children are the target and the guard.
    use super::*;
    use std::{io::Read as _, os::fd::FromRawFd as _, time::Duration};

    use crate::probe::{ebpf::Limits, libc::find_libc};

    /// Runs `case` in a forked process and returns what it returned. The child only reports
    /// through a pipe and leaves with _exit: it must not touch the test harness's locks.
    fn in_own_process(case: fn() -> Result<(), String>) -> Result<(), String> {
        let mut fds = [0; 2];
        // SAFETY: plain syscall with a valid array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child runs `case` (ptrace, /proc and malloc, which glibc keeps usable
        // after fork) and ends with _exit.
        match unsafe { libc::fork() } {
            0 => {
                std::panic::set_hook(Box::new(|_| {}));
                let outcome = std::panic::catch_unwind(case)
                    .unwrap_or_else(|_| Err("the case panicked".into()));
                let message = outcome.err().unwrap_or_default();
                // SAFETY: our end of the pipe; then leave without running the harness.
                unsafe {
                    libc::write(fds[1], message.as_ptr().cast(), message.len());
                    libc::_exit(0);
                }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => {
                // SAFETY: closing our copy of the write end; the read end is ours.
                unsafe { libc::close(fds[1]) };
                let mut message = String::new();
                let mut read = unsafe { std::fs::File::from_raw_fd(fds[0]) };
                read.read_to_string(&mut message)
                    .expect("read the case's report");
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
                assert!(
                    libc::WIFEXITED(status),
                    "the process running the case died: status {status:#x}"
                );
                if message.is_empty() {
                    Ok(())
                } else {
                    Err(message)
                }
            }
        }
    }

    /// How long the child's SIGUSR1 handler takes.
    const HANDLER_SLEEP: Duration = Duration::from_millis(300);

    extern "C" fn sleep_a_while(_: libc::c_int) {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: HANDLER_SLEEP.as_nanos() as libc::c_long,
        };
        // SAFETY: nanosleep is async-signal-safe; a remainder after EINTR is not resumed.
        unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    }

    /// A child that calls malloc and free forever, and sleeps a while in its SIGUSR1 handler.
    fn allocating_child() -> i32 {
        // SAFETY: the child installs a handler, then only calls malloc and free, and never
        // returns.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: a handler that only sleeps.
                unsafe {
                    let mut action: libc::sigaction = std::mem::zeroed();
                    action.sa_sigaction = sleep_a_while as *const () as usize;
                    libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
                }
                loop {
                    // SAFETY: a plain allocation and its release.
                    unsafe { libc::free(std::hint::black_box(libc::malloc(64))) };
                }
            }
            pid => pid,
        }
    }

    /// Sends the parked child into its SIGUSR1 handler, which saves where it stood on its
    /// stack and returns there later, and stops it again while the handler sleeps.
    fn into_handler(e: &mut Engine, pid: i32) -> Result<(), String> {
        sys::cont(pid, libc::SIGUSR1).map_err(|e| format!("cont: {e}"))?;
        std::thread::sleep(HANDLER_SLEEP / 6);
        sys::interrupt(pid).map_err(|e| format!("interrupt: {e}"))?;
        match sys::wait(pid, false) {
            Ok(Some((_, Stop::Event(libc::PTRACE_EVENT_STOP, _)))) => {}
            other => return Err(format!("expected the interrupt's stop, got {other:?}")),
        }
        e.set_stopped(pid, 0, false);
        Ok(())
    }

    fn attach(pid: i32) -> Result<Engine, String> {
        let maps = ProcMaps::read(pid as u32).map_err(|e| format!("maps: {e}"))?;
        let libc = find_libc(&maps).ok_or("the child maps no libc")?;
        let host = format!("/proc/{pid}/root{libc}");
        let shared = Arc::new(Shared {
            book: Arc::new(Mutex::new(Book::new(Limits::default()))),
            stop: false.into(),
            untraced: false.into(),
            tid: 0.into(),
        });
        Engine::attach(pid, Path::new(&host), &libc, None, shared)
            .map(|(engine, _)| engine)
            .map_err(|e| format!("attach: {e}"))
    }

    /// Lets the child run, one instruction at a time once it is stopped, handling our traps as
    /// the engine does, until `here` says it stands where the case wants it; leaves it stopped.
    fn park(e: &mut Engine, pid: i32, here: impl Fn(&Engine, &Regs) -> bool) -> Result<(), String> {
        for _ in 0..200_000 {
            let stop = match sys::wait(pid, false) {
                Ok(Some((_, stop))) => stop,
                other => return Err(format!("waitpid: {other:?}")),
            };
            match stop {
                Stop::Signal(libc::SIGTRAP) => {
                    let info = sys::siginfo(pid).map_err(|e| format!("siginfo: {e}"))?;
                    if info.si_code == SI_KERNEL {
                        let mut regs = sys::getregs(pid).map_err(|e| format!("getregs: {e}"))?;
                        let at = regs.rip - 1;
                        if e.sites.contains_key(&at) {
                            e.on_entry(pid, at, &mut regs);
                        } else if at == e.page && !e.on_return(pid, &mut regs) {
                            return Err("a return trap no call of ours explains".into());
                        }
                        sys::setregs(pid, &regs).map_err(|e| format!("setregs: {e}"))?;
                    }
                }
                Stop::Event(..) => {}
                other => return Err(format!("unexpected stop {other:?}")),
            }
            let regs = sys::getregs(pid).map_err(|e| format!("getregs: {e}"))?;
            if here(e, &regs) {
                e.set_stopped(pid, 0, false);
                return Ok(());
            }
            sys::step(pid, 0).map_err(|e| format!("step: {e}"))?;
        }
        Err("the child never got there".into())
    }

    /// Parks the child where `here` says, detaches, and checks that the child runs on
    /// untraced with libc as it was and the page gone.
    fn detach_parked(here: fn(&Engine, &Regs) -> bool) -> Result<(), String> {
        detach_parked_then(here, false)
    }

    /// As `detach_parked`, with the child sent into a signal handler from where it was parked
    /// before the detach when `handler` is set: the page then has to stay.
    fn detach_parked_then(here: fn(&Engine, &Regs) -> bool, handler: bool) -> Result<(), String> {
        let pid = allocating_child();
        let result = (|| {
            let mut e = attach(pid)?;
            let page = e.page;
            let sites: Vec<(u64, Vec<u8>)> =
                e.sites.iter().map(|(&a, s)| (a, s.orig.clone())).collect();
            park(&mut e, pid, here)?;
            if handler {
                into_handler(&mut e, pid)?;
            }
            e.detach();
            std::thread::sleep(HANDLER_SLEEP * 2);
            let mut status = 0;
            // SAFETY: our own child.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                return Err(format!(
                    "the child died after detach: {}",
                    if libc::WIFSIGNALED(status) {
                        format!("signal {}", libc::WTERMSIG(status))
                    } else {
                        format!("status {status:#x}")
                    }
                ));
            }
            let mem = Mem::open(pid).map_err(|e| format!("open mem: {e}"))?;
            for (addr, orig) in sites {
                let mut now = vec![0u8; orig.len()];
                mem.read_code(addr, &mut now)
                    .map_err(|e| format!("read: {e}"))?;
                if now != orig {
                    return Err(format!("{addr:#x} holds {now:02x?}, not {orig:02x?}"));
                }
            }
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            let mapped = maps.lines().any(|l| l.starts_with(&format!("{page:x}-")));
            if mapped != handler {
                return Err(format!(
                    "the page at {page:#x} is {}mapped",
                    if mapped { "still " } else { "not " }
                ));
            }
            Ok(())
        })();
        // SAFETY: our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        result
    }

    fn check(case: fn() -> Result<(), String>, place: &str) {
        if let Err(e) = in_own_process(case) {
            panic!("a thread stopped {place} when the tracer detached: {e}");
        }
    }

    #[test]
    fn detach_with_a_thread_at_the_return_trap_before_it_executes() {
        check(
            || detach_parked(|e, r| r.rip == e.page),
            "at the start of the trap page (returned, int3 not yet executed)",
        );
    }

    #[test]
    fn detach_with_a_thread_at_the_copy_of_a_displaced_instruction() {
        check(
            || detach_parked(|e, r| e.sites.values().any(|s| r.rip == s.slot)),
            "at the out-of-line copy of an instruction",
        );
    }

    #[test]
    fn detach_with_a_thread_at_the_jump_back() {
        check(
            || detach_parked(|e, r| e.sites.values().any(|s| r.rip == s.back)),
            "at the jump back from an out-of-line copy",
        );
    }

    #[test]
    fn detach_with_a_thread_in_a_signal_handler_that_interrupted_a_copy() {
        check(
            || detach_parked_then(|e, r| e.sites.values().any(|s| r.rip == s.slot), true),
            "in a signal handler that interrupted it at the out-of-line copy of an instruction",
        );
    }

    #[test]
    fn detach_with_a_thread_in_a_signal_handler_that_interrupted_it_at_the_return_trap() {
        check(
            || detach_parked_then(|e, r| r.rip == e.page, true),
            "in a signal handler that interrupted it at the start of the trap page",
        );
    }

    #[test]
    fn detach_with_a_thread_at_a_breakpoint_not_yet_executed() {
        check(
            || detach_parked(|e, r| e.sites.contains_key(&r.rip)),
            "on an int3 it has not executed yet",
        );
    }
}

#[cfg(test)]
mod page_tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    #[test]
    fn the_page_goes_right_below_libc_when_that_is_free() {
        let libc = (0x7f00_0000_0000, 0x7f00_0020_0000);
        let used = [(0x5555_0000_0000, 0x5555_0001_0000), libc, (0x7ffd_0000_0000, 0x7ffd_0002_1000)];
        let c = page_candidates(&used, libc);
        assert_eq!(c[0], libc.0 - PAGE);
        assert_eq!(c[1], libc.1, "next: right above libc");
    }

    /// node's shape: V8's reservations fill gigabytes just below libc.
    #[test]
    fn a_crowded_space_below_libc_moves_the_page_past_it_or_above() {
        let libc = (0x7f00_0000_0000, 0x7f00_0020_0000);
        let v8 = (libc.0 - GIB, libc.0);
        let above = (libc.1, libc.1 + 100 * MIB);
        let used = [v8, libc, above];
        let c = page_candidates(&used, libc);
        assert_eq!(c[0], above.1, "nearest: right above what follows libc, 100 MiB away");
        assert_eq!(c[1], v8.0 - PAGE, "then right below the reservation, 1 GiB away");
        for &page in &c {
            assert!(page + PAGE <= v8.0 || page >= above.1, "{page:#x} overlaps a mapping");
            let far = if page < libc.0 { libc.1 - page } else { page + PAGE - libc.0 };
            assert!(far <= sys::REACH, "{page:#x} is out of reach");
        }
    }

    #[test]
    fn nothing_within_reach_gives_no_candidate() {
        let libc = (0x7f00_0000_0000, 0x7f00_0020_0000);
        let used = [(libc.0 - 3 * GIB, libc.0), libc, (libc.1, libc.1 + 3 * GIB)];
        assert!(page_candidates(&used, libc).is_empty());
    }
}
