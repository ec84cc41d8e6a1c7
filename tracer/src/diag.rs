//! What the tracer tells the user on stderr: one line per message, always. A message that
//! spans lines (a BPF verifier log inside a load error) keeps its first line there and goes
//! whole to a file named in that line, or whole to stderr with `--verbose`. Writing never
//! panics: a closed or full stderr loses the message, not the recording.
use std::{
    io::Write as _,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
};

static VERBOSE: AtomicBool = AtomicBool::new(false);

/// `--verbose`: long messages go to stderr whole instead of to a file.
pub fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
}

/// Prints `tracer: MESSAGE` as one line (see [`one_line`]); a failed write is ignored.
pub fn warn(message: impl std::fmt::Display) {
    let line = one_line(&message.to_string());
    let _ = writeln!(std::io::stderr().lock(), "tracer: {line}");
}

/// `message` as one line: itself when it is one; with `--verbose`, itself whole; otherwise
/// its first line, followed by where the rest went.
pub fn one_line(message: &str) -> String {
    let message = message.trim_end();
    let Some((first, _)) = message.split_once('\n') else {
        return message.to_owned();
    };
    if VERBOSE.load(Ordering::Relaxed) {
        return message.to_owned();
    }
    let more = message.lines().count() - 1;
    match save(message) {
        Some(path) => format!(
            "{} [{more} more lines in {}; or run with --verbose]",
            first.trim_end(),
            path.display()
        ),
        None => format!("{} [{more} more lines; run with --verbose to see them]", first.trim_end()),
    }
}

/// Writes `text` to a new file of its own in the temporary directory, readable by its
/// owner only; never follows or reuses an existing name.
fn save(text: &str) -> Option<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = std::env::temp_dir();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    for attempt in 0..100u32 {
        let path = dir.join(format!("tracer-{}-{stamp}-{attempt}.log", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path);
        match file {
            Ok(mut file) => {
                return file.write_all(text.as_bytes()).and_then(|()| file.write_all(b"\n")).ok().map(|()| path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
    }
    None
}

/// Points file descriptors 0, 1 and 2 at /dev/null when they are closed (`tracer ... 2>&-`),
/// so that no file the tracer opens later takes one of those numbers and receives its
/// messages or its report.
pub fn ensure_standard_fds() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        let flags = if fd == 0 { libc::O_RDONLY } else { libc::O_WRONLY };
        // SAFETY: a plain open of a constant path; the lowest free descriptor is `fd` itself,
        // since every lower one is open by now.
        let opened = unsafe { libc::open(c"/dev/null".as_ptr(), flags) };
        if opened >= 0 && opened != fd {
            // SAFETY: moving our own new descriptor onto the closed number.
            unsafe {
                libc::dup2(opened, fd);
                libc::close(opened);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_stays_as_it_is() {
        assert_eq!(one_line("attach to pid 5: no such process\n"), "attach to pid 5: no such process");
    }

    #[test]
    fn a_verifier_log_goes_to_a_file_named_in_the_one_line() {
        let message = "load program tr_free: the BPF_PROG_LOAD syscall failed. Verifier output: 0: (bf) r6 = r1\n\
                       1: (85) call bpf_get_current_pid_tgid#14\n\
                       R0 invalid mem access 'scalar'\n";
        let line = one_line(message);
        assert!(!line.contains('\n'), "not one line: {line:?}");
        let (head, tail) = line.split_once(" [2 more lines in ").unwrap_or_else(|| panic!("no file named in {line:?}"));
        assert_eq!(head, "load program tr_free: the BPF_PROG_LOAD syscall failed. Verifier output: 0: (bf) r6 = r1");
        let path = tail.strip_suffix("; or run with --verbose]").unwrap_or_else(|| panic!("{line:?}"));
        let saved = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        assert_eq!(saved, message);
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600, "{path} should be private to its owner");
        std::fs::remove_file(path).unwrap();
    }
}
