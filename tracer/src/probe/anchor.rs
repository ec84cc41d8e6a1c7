//! Keeps uprobe-multi links working in a process whose main thread has exited.
//!
//! A uprobe-multi link for a pid holds the thread group leader, and when the kernel decides
//! whether to place a link's breakpoints in an address space it compares that space with
//! the leader's. A leader that called `pthread_exit` has no address space left, so a link
//! made after that places nothing, although the link's programs would run for the other
//! threads (the kernel checks the thread group when a breakpoint is hit). Measured here: a
//! link made after the leader exited saw no call; a link made before saw every call, also
//! after the leader exited.
//!
//! An anchor is a second consumer of the same breakpoints: a disabled uprobe perf event
//! opened on a live thread, with no program. The kernel places a breakpoint when any
//! consumer accepts the address space, and the perf event accepts the space of the thread it
//! was opened on, so the links' breakpoints go in. A hit runs every consumer: the links'
//! programs as usual, the anchor's nothing (a disabled event is not on the CPU's list).
//! Breakpoints stay until every consumer asks to remove them, and the links never ask, so
//! the anchor thread may exit later without the tracing stopping.
//!
//! Each anchor costs a grace period when closed (~100 ms, and perf events close one after
//! another), so they are opened only for a process whose main thread is gone.
use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    os::unix::ffi::OsStrExt as _,
    path::Path,
};

use aya_obj::generated::perf_event_attr;

/// `PERF_FLAG_FD_CLOEXEC` (include/uapi/linux/perf_event.h).
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;

/// The uprobe PMU's perf event type.
fn uprobe_pmu_type() -> io::Result<u32> {
    let text = std::fs::read_to_string("/sys/bus/event_source/devices/uprobe/type")?;
    text.trim()
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("uprobe PMU type {text:?}")))
}

/// Disabled uprobe perf events on `path` at each file offset, opened on thread `tid`.
pub struct Anchors {
    fds: Vec<OwnedFd>,
}

impl Anchors {
    pub fn open(path: &Path, offsets: &[u64], tid: u32) -> io::Result<Anchors> {
        let pmu = uprobe_pmu_type()?;
        let c_path = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut fds = Vec::with_capacity(offsets.len());
        let mut seen = Vec::with_capacity(offsets.len());
        for &offset in offsets {
            if seen.contains(&offset) {
                continue;
            }
            seen.push(offset);
            // SAFETY: perf_event_attr is plain integers and unions of integers; zero is the
            // kernel's default for every field.
            let mut attr: perf_event_attr = unsafe { std::mem::zeroed() };
            attr.type_ = pmu;
            attr.size = size_of::<perf_event_attr>() as u32;
            attr.__bindgen_anon_3.config1 = c_path.as_ptr() as u64;
            attr.__bindgen_anon_4.config2 = offset;
            attr.set_disabled(1);
            // SAFETY: attr is a valid perf_event_attr of the size it says, and the path it
            // points to outlives the call.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_perf_event_open,
                    &raw const attr,
                    tid as libc::pid_t,
                    -1 as libc::c_int,
                    -1 as libc::c_int,
                    PERF_FLAG_FD_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a new descriptor that nothing else owns.
            fds.push(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        Ok(Anchors { fds })
    }

    /// The descriptors, for closing together with the links.
    pub fn into_fds(self) -> Vec<OwnedFd> {
        self.fds
    }
}
