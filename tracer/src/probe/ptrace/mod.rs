//! The ptrace backend, for hosts where BPF is not allowed but ptrace is: the same probes and
//! the same counting rules as the eBPF backend, with int3 breakpoints handled by a tracer
//! thread instead of uprobes handled by the kernel. Slower by an order of magnitude or more
//! per call (every allocator call stops the calling thread twice), but it answers the same
//! question with the same numbers. `book` holds the counting rules, `engine` the ptrace
//! thread, `xol` the out-of-line copies of displaced instructions, `sys` the raw calls.
pub mod book;
mod engine;
mod guard;
pub(crate) mod sys;
pub mod xol;

use std::{
    path::PathBuf,
    sync::{
        Arc, Mutex, Once,
        atomic::{AtomicBool, AtomicI32, Ordering},
        mpsc::{self, Sender},
    },
    time::Duration,
};

use nix::errno::Errno;

use super::{Backend, ProbeError, ProbeSite, Snapshot, ebpf::Limits};
use crate::target::{Handover, LaunchEvent};
use book::Book;

#[derive(Debug, thiserror::Error)]
pub enum PtraceError {
    #[error(
        "ptrace seize thread {tid} of pid {pid}{}",
        match source {
            Errno::EPERM => " (already traced by a debugger or tracer, or ptrace not permitted: \
                             needs CAP_SYS_PTRACE or the same user under kernel.yama.ptrace_scope)",
            _ => "",
        }
    )]
    Seize {
        pid: i32,
        tid: i32,
        #[source]
        source: Errno,
    },
    #[error("pid {0} exited while the tracer attached")]
    Gone(i32),
    #[error("pid {0} called exec while the tracer attached")]
    Exec(i32),
    #[error("{libc} is not mapped executable in pid {pid}")]
    NotMapped { pid: i32, libc: String },
    #[error("no `syscall` instruction found in libc's syscall()")]
    NoSyscall,
    #[error("cannot place a breakpoint on {function}: {reason}")]
    Site {
        function: &'static str,
        reason: String,
    },
    #[error(
        "{function} at {addr:#x} differs from the file: another debugger or tracer has a breakpoint there"
    )]
    Busy { function: &'static str, addr: u64 },
    #[error("out-of-line page: {0}")]
    Page(String),
    #[error("no stopped thread to run a system call in")]
    NoStoppedThread,
    #[error("{what} target memory at {addr:#x}")]
    Mem {
        what: &'static str,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Inject(#[from] sys::InjectError),
    #[error(transparent)]
    Libc(#[from] super::libc::LibcError),
    #[error("the ptrace thread could not start")]
    Thread(#[source] std::io::Error),
}

/// What the recording thread and the ptrace thread share.
pub(crate) struct Shared {
    book: Arc<Mutex<Book>>,
    /// Set to ask the ptrace thread to detach.
    stop: AtomicBool,
    /// Set once the target runs untraced (detached, exec'd or gone).
    untraced: AtomicBool,
    /// The ptrace thread's task id, to wake it from waitpid.
    tid: AtomicI32,
}

/// The signal that wakes the ptrace thread from a blocking waitpid (its handler does nothing;
/// the point is the EINTR). A real-time signal nobody else sends.
fn wake_signal() -> i32 {
    libc::SIGRTMIN() + 7
}

extern "C" fn on_wake(_: libc::c_int) {}

fn install_wake_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a handler that does nothing, installed without SA_RESTART so that waitpid
        // returns EINTR.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_wake as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(wake_signal(), &action, std::ptr::null_mut());
        }
    });
}

/// Where to attach.
pub struct PtraceOptions {
    pub pid: u32,
    /// The target's C library, at a path this process can open (through /proc/PID/root).
    pub libc_host: PathBuf,
    /// The same library's path as the target sees it (as in its /proc/PID/maps).
    pub libc: String,
    pub limits: Limits,
    /// A launched process the launcher handed over, stopped; its exit is reported here.
    pub handover: Option<Handover>,
}

pub struct PtraceProbes {
    shared: Arc<Shared>,
    sites: Vec<ProbeSite>,
    done: mpsc::Receiver<()>,
}

impl PtraceProbes {
    /// Seizes every thread of the target and places the breakpoints; returns once they are in
    /// and the target runs again.
    pub fn attach(opts: PtraceOptions) -> Result<PtraceProbes, PtraceError> {
        install_wake_handler();
        let shared = Arc::new(Shared {
            book: Arc::new(Mutex::new(Book::new(opts.limits.clone()))),
            stop: AtomicBool::new(false),
            untraced: AtomicBool::new(false),
            tid: AtomicI32::new(0),
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let worker_shared = shared.clone();
        std::thread::Builder::new()
            .name("ptrace".into())
            .spawn(move || worker(opts, worker_shared, ready_tx, done_tx))
            .map_err(PtraceError::Thread)?;
        let sites = ready_rx.recv().unwrap_or_else(|_| {
            Err(PtraceError::Thread(std::io::Error::other(
                "ptrace thread ended",
            )))
        })?;
        Ok(PtraceProbes {
            shared,
            sites,
            done: done_rx,
        })
    }
}

fn worker(
    opts: PtraceOptions,
    shared: Arc<Shared>,
    ready: Sender<Result<Vec<ProbeSite>, PtraceError>>,
    done: Sender<()>,
) {
    shared.tid.store(sys::gettid(), Ordering::Release);
    let pid = opts.pid as i32;
    let events = opts.handover.as_ref().map(|h| h.events.clone());
    let attached = engine::Engine::attach(
        pid,
        &opts.libc_host,
        &opts.libc,
        events.clone(),
        shared.clone(),
    );
    let mut engine = match attached {
        Ok((engine, sites)) => {
            let _ = ready.send(Ok(sites));
            engine
        }
        Err(e) => {
            shared.untraced.store(true, Ordering::Release);
            let _ = ready.send(Err(e));
            if let Some(h) = opts.handover {
                // As when the launcher gives up: a command the tracer could not attach to goes.
                // SAFETY: plain syscall on our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                follow_child(pid, &h.events);
            }
            return;
        }
    };
    engine.run();
    let exit_code = engine.exit_code;
    drop(engine);
    shared.untraced.store(true, Ordering::Release);
    let _ = done.send(());
    if let (Some(events), None) = (events, exit_code) {
        follow_child(pid, &events);
    }
}

/// Waits for a launched command that runs untraced, and reports its exit status.
fn follow_child(pid: i32, events: &Sender<LaunchEvent>) {
    loop {
        match sys::wait(pid, false) {
            Ok(Some((_, sys::Stop::Exited(code)))) => {
                let _ = events.send(LaunchEvent::Exited(code));
                return;
            }
            Ok(Some((_, sys::Stop::Killed(sig)))) => {
                let _ = events.send(LaunchEvent::Exited(128 + sig));
                return;
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => {
                let _ = events.send(LaunchEvent::Exited(-1));
                return;
            }
        }
    }
}

impl Backend for PtraceProbes {
    fn name(&self) -> &'static str {
        "ptrace"
    }

    fn sites(&self) -> &[ProbeSite] {
        &self.sites
    }

    fn snapshot(&mut self) -> Result<Snapshot, ProbeError> {
        Ok(self.shared.book.lock().expect("book lock").snapshot())
    }

    fn stack_frames(&mut self, id: u64) -> Option<Vec<u64>> {
        self.shared.book.lock().expect("book lock").stack_frames(id)
    }

    fn live_total_peak(&mut self) -> Option<i64> {
        Some(self.shared.book.lock().expect("book lock").take_total_peak())
    }

    fn live_older_than(
        &mut self,
        min_age: Duration,
        at: std::time::Instant,
    ) -> Result<std::collections::HashMap<u64, (u64, u64)>, ProbeError> {
        Ok(self
            .shared
            .book
            .lock()
            .expect("book lock")
            .live_older_than(min_age, at))
    }
}

impl Drop for PtraceProbes {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // The ptrace thread may sit in waitpid with nothing to report (an idle target): wake
        // it until it says it has let go. A wake-up that lands just before it blocks is lost,
        // hence the repeats.
        loop {
            if self.shared.untraced.load(Ordering::Acquire) {
                let _ = self.done.recv_timeout(Duration::from_secs(1));
                return;
            }
            let tid = self.shared.tid.load(Ordering::Acquire);
            if tid != 0 {
                sys::tgkill(std::process::id() as i32, tid, wake_signal());
            }
            match self.done.recv_timeout(Duration::from_millis(10)) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
        }
    }
}
