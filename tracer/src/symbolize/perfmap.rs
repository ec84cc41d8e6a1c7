//! Names for JIT code from perf maps (`/tmp/perf-PID.map`): lines of `hexaddr hexsize name`
//! that V8 (`--perf-basic-prof`) and other JITs append as they generate code. Code addresses get
//! reused, so for an address the last entry covering it wins; the file is read again as it grows.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Longest line taken from a perf map: V8's names are at most a few hundred bytes.
const MAX_LINE: usize = 64 << 10;
/// Most bytes read from a perf map at one refresh; the rest is read at the next ones.
const MAX_READ: u64 = 64 << 20;

/// The entries of one perf map, folded into disjoint ranges as they are read.
#[derive(Debug, Default)]
pub struct PerfMap {
    /// start -> (end exclusive, index into `names`); ranges never overlap.
    ranges: BTreeMap<u64, (u64, u32)>,
    names: Vec<String>,
    /// Bytes of the file consumed so far, including `partial`.
    consumed: u64,
    /// The end of the file when it was last read did not end a line: those bytes, to be
    /// completed by the next read.
    partial: Vec<u8>,
    /// The line being read is longer than [`MAX_LINE`]: its bytes are dropped up to its
    /// newline (it was counted as bad once).
    skipping: bool,
    /// Lines that were not `hexaddr hexsize name`.
    pub bad_lines: u64,
    /// Entries taken in.
    pub entries: u64,
}

impl PerfMap {
    /// Takes in more of the file. Only whole lines count: a line still being written stays
    /// pending until a later call brings its newline.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.consumed += bytes.len() as u64;
        let mut rest = bytes;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let (line, tail) = rest.split_at(nl);
            rest = &tail[1..];
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if self.partial.is_empty() {
                self.take_line(line);
            } else {
                let mut whole = std::mem::take(&mut self.partial);
                whole.extend_from_slice(line);
                self.take_line(&whole);
            }
        }
        if !self.skipping {
            self.partial.extend_from_slice(rest);
        }
        // A file without newlines (garbage, or a sparse file of zeros) must not be held
        // whole in memory, waiting for a line end.
        if self.partial.len() > MAX_LINE {
            self.partial = Vec::new();
            self.skipping = true;
            self.bad_lines += 1;
        }
    }

    fn take_line(&mut self, line: &[u8]) {
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            return;
        }
        match parse_line(line) {
            Some((start, size, name)) => {
                self.entries += 1;
                // An entry of size 0 covers nothing; one that wraps is garbage.
                match start.checked_add(size) {
                    Some(end) if size > 0 => self.insert(start, end, name),
                    Some(_) => {}
                    None => self.bad_lines += 1,
                }
            }
            None => self.bad_lines += 1,
        }
    }

    /// Paints `[start, end)` over whatever was there: the newest entry wins.
    fn insert(&mut self, start: u64, end: u64, name: &str) {
        // Only the range starting before `start` can reach into it from the left.
        if let Some((&s, &(e, n))) = self.ranges.range(..start).next_back()
            && e > start
        {
            self.ranges.insert(s, (start, n));
            if e > end {
                self.ranges.insert(end, (e, n));
            }
        }
        let inside: Vec<u64> = self.ranges.range(start..end).map(|(&s, _)| s).collect();
        for s in inside {
            if let Some((e, n)) = self.ranges.remove(&s)
                && e > end
            {
                self.ranges.insert(end, (e, n));
            }
        }
        let index = u32::try_from(self.names.len()).unwrap_or(u32::MAX);
        self.names.push(name.to_owned());
        self.ranges.insert(start, (end, index));
    }

    /// The name of the newest entry covering `addr`.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let (_, &(end, index)) = self.ranges.range(..=addr).next_back()?;
        (addr < end).then(|| self.names.get(index as usize).map(String::as_str))?
    }

    /// Whether the map has no entries covering anything.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }
}

/// `hexaddr hexsize name`; the name may contain spaces. Addresses may carry `0x`.
fn parse_line(line: &str) -> Option<(u64, u64, &str)> {
    let line = line.trim_start();
    let (addr, rest) = line.split_once(' ')?;
    let (size, name) = rest.trim_start().split_once(' ')?;
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    let name = name.trim();
    if name.is_empty() {
        return None;
    }
    Some((hex(addr)?, hex(size)?, name))
}

/// A perf map file read incrementally: each [`PerfMapFile::refresh`] takes in what was appended
/// since the last one.
///
/// The file sits in a world-writable directory and is read as root, so it is taken only when
/// it is a regular file (not a symbolic link, a FIFO or a device) owned by the process that
/// writes it (or by root): anyone could have put a file there under the pid's name.
#[derive(Debug)]
pub struct PerfMapFile {
    path: PathBuf,
    /// Owners a genuine map can have: the process's user ids and root.
    owners: Vec<u32>,
    pub map: PerfMap,
    /// Whether the file has been seen at all.
    pub found: bool,
    /// Why a file at the path was not read, when it was not.
    pub refused: Option<String>,
}

impl PerfMapFile {
    /// The map at `path`, written by a process running as one of `owners` (root is always
    /// accepted).
    pub fn new(path: PathBuf, owners: Vec<u32>) -> PerfMapFile {
        PerfMapFile {
            path,
            owners,
            map: PerfMap::default(),
            found: false,
            refused: None,
        }
    }

    /// Opens the file without following a symbolic link and checks what it is; None (with
    /// the reason kept) when it is not a map to trust.
    fn open(&mut self) -> Option<(File, std::fs::Metadata)> {
        use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
        let file = std::fs::OpenOptions::new()
            .read(true)
            // O_NONBLOCK: a FIFO put there must not hang the tracer in open.
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&self.path);
        let refuse = |why: String| Some(why);
        let refused = match file {
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => refuse("it is a symbolic link".into()),
            Err(_) => return None,
            Ok(file) => match file.metadata() {
                Err(_) => return None,
                Ok(meta) if !meta.is_file() => refuse("it is not a regular file".into()),
                Ok(meta) if meta.uid() != 0 && !self.owners.contains(&meta.uid()) => refuse(format!(
                    "it belongs to uid {}, not to the process (uid {})",
                    meta.uid(),
                    self.owners.first().copied().unwrap_or(0)
                )),
                Ok(meta) => return Some((file, meta)),
            },
        };
        self.refused = refused;
        None
    }

    /// Deletes the file, if it is the map [`PerfMapFile::refresh`] would read.
    pub fn remove(&mut self) {
        if self.open().is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last call. A file that shrank was replaced (a new
    /// process with the same pid): it is read again from the start. A file that vanished keeps
    /// what was read (the process may have exited, its map is still right for its stacks).
    pub fn refresh(&mut self) {
        let Some((mut file, meta)) = self.open() else {
            return;
        };
        self.found = true;
        self.refused = None;
        if meta.len() < self.map.consumed {
            self.map = PerfMap::default();
        }
        if file.seek(SeekFrom::Start(self.map.consumed)).is_err() {
            return;
        }
        let mut bytes = Vec::new();
        // Bounded by what the file holds now; a writer appending meanwhile is read next time.
        let want = meta.len().saturating_sub(self.map.consumed).min(MAX_READ);
        if file.take(want).read_to_end(&mut bytes).is_ok() {
            self.map.feed(&bytes);
        }
    }
}

/// node's flags that make V8 write a perf map of its JIT code, each interpreted function with a
/// code copy of its own so it gets a name too. They cannot be turned on in a running process.
pub const NODE_JIT_FLAGS: [&str; 2] = [
    "--perf-basic-prof-only-functions",
    "--interpreted-frames-native-stack",
];

/// `argv` with [`NODE_JIT_FLAGS`] inserted after argv[0] when argv[0]'s file name is `node`;
/// None for any other command.
pub fn with_node_jit_flags(argv: &[std::ffi::OsString]) -> Option<Vec<std::ffi::OsString>> {
    let program = argv.first()?;
    if Path::new(program).file_name()? != "node" {
        return None;
    }
    let mut out = Vec::with_capacity(argv.len() + NODE_JIT_FLAGS.len());
    out.push(program.clone());
    out.extend(NODE_JIT_FLAGS.iter().map(std::ffi::OsString::from));
    out.extend(argv[1..].iter().cloned());
    Some(out)
}

/// A perf-map name split into what a report shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JitName {
    pub function: String,
    /// Script the function comes from, for V8 names.
    pub file: Option<String>,
    /// Line where the function is defined (V8 writes nothing finer).
    pub line: Option<u32>,
}

/// Splits V8's names, `JS:~retain /srv/app.js:12:3` (`~` interpreted, `^` baseline, `+` maglev,
/// `*` optimized), into function `retain`, file `/srv/app.js`, line 12. Other names (builtins,
/// stubs, other JITs' names) are kept whole as the function.
pub fn split_jit_name(name: &str) -> JitName {
    let whole = || JitName {
        function: name.to_owned(),
        file: None,
        line: None,
    };
    let Some((tag, rest)) = name.split_once(':') else {
        return whole();
    };
    let anonymous = match tag {
        "JS" | "LazyCompile" | "Function" => "(anonymous)",
        "Script" => "(script)",
        "Eval" => "(eval)",
        _ => return whole(),
    };
    let rest = rest.trim_start_matches(['~', '^', '+', '*']);
    // The location follows the last space; a name itself has none (V8 prints "" for an
    // anonymous function, so the location then follows the marker's space directly).
    let (function, location) = match rest.rsplit_once(' ') {
        Some((f, l)) => (f.trim(), l),
        None => return whole(),
    };
    // `file:line:column`; the file (`node:internal/...`) may contain ':' itself.
    let Some((file_line, _column)) = location.rsplit_once(':') else {
        return whole();
    };
    let Some((file, line)) = file_line.rsplit_once(':') else {
        return whole();
    };
    let Ok(line) = line.parse::<u32>() else {
        return whole();
    };
    JitName {
        function: if function.is_empty() {
            anonymous.to_owned()
        } else {
            function.to_owned()
        },
        file: (!file.is_empty()).then(|| file.to_owned()),
        line: Some(line),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(text: &str) -> PerfMap {
        let mut m = PerfMap::default();
        m.feed(text.as_bytes());
        m
    }

    #[test]
    fn parses_entries_and_counts_garbage_lines() {
        let m = map("\
1000 10 JS:~first /a.js:1:1
garbage
2000 zz bad-size
0x3000 0x20 Builtin:Hex prefixed
4000 8
4100 8 \n\
\n\
5000 0 empty
ffffffffffffff00 1000 wraps
6000 4 name with  several spaces
");
        assert_eq!(m.lookup(0x1000), Some("JS:~first /a.js:1:1"));
        assert_eq!(m.lookup(0x100f), Some("JS:~first /a.js:1:1"));
        assert_eq!(m.lookup(0x1010), None, "end is exclusive");
        assert_eq!(m.lookup(0xfff), None);
        assert_eq!(m.lookup(0x3010), Some("Builtin:Hex prefixed"));
        assert_eq!(m.lookup(0x5000), None, "size 0 covers nothing");
        assert_eq!(m.lookup(0x6002), Some("name with  several spaces"));
        // garbage, bad size, no name (twice), wrapping range
        assert_eq!(m.bad_lines, 5);
        assert_eq!(m.entries, 5);
    }

    #[test]
    fn last_entry_covering_an_address_wins() {
        let m = map("\
1000 100 old-big
1040 10 new-inside
1080 100 new-overlapping-right
0f00 180 newest-over-left
2000 10 reused
2000 10 reused-again
");
        // 0f00..1080 newest-over-left; 1080..1180 new-overlapping-right; the old entry survives
        // nowhere; new-inside was painted over completely.
        assert_eq!(m.lookup(0x0f00), Some("newest-over-left"));
        assert_eq!(m.lookup(0x1000), Some("newest-over-left"));
        assert_eq!(m.lookup(0x1045), Some("newest-over-left"));
        assert_eq!(m.lookup(0x107f), Some("newest-over-left"));
        assert_eq!(m.lookup(0x1080), Some("new-overlapping-right"));
        assert_eq!(m.lookup(0x117f), Some("new-overlapping-right"));
        assert_eq!(m.lookup(0x1180), None);
        assert_eq!(m.lookup(0x2005), Some("reused-again"));

        // A newer small entry splits an older big one in three.
        let m = map("1000 100 outer\n1040 10 inner\n");
        assert_eq!(m.lookup(0x103f), Some("outer"));
        assert_eq!(m.lookup(0x1040), Some("inner"));
        assert_eq!(m.lookup(0x104f), Some("inner"));
        assert_eq!(m.lookup(0x1050), Some("outer"));
        assert_eq!(m.lookup(0x10ff), Some("outer"));
        assert_eq!(m.lookup(0x1100), None);
    }

    /// Regression: bytes without a newline were all kept, waiting for the line's end, so a
    /// perf map of zeros (a sparse file) or garbage grew the tracer without bound.
    #[test]
    fn an_endless_line_is_dropped_not_kept() {
        let mut m = PerfMap::default();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..8 {
            m.feed(&chunk);
            assert!(m.partial.len() <= MAX_LINE, "{} bytes kept", m.partial.len());
        }
        m.feed(b" tail of the long line\n7f0000001000 10 after\n");
        assert_eq!((m.bad_lines, m.entries), (1, 1));
        assert_eq!(m.lookup(0x7f0000001008), Some("after"));
    }

    /// Regression: a FIFO as the perf map blocked the tracer in open(2) forever.
    #[test]
    fn a_fifo_as_the_perf_map_does_not_block() {
        let dir = std::env::temp_dir().join(format!("perfmap-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("perf-1.map");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let mut f = PerfMapFile::new(path, vec![0]);
            f.refresh();
            let _ = tx.send(f.map.is_empty());
        });
        let done = rx.recv_timeout(std::time::Duration::from_secs(10));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(done, Ok(true), "refresh on a FIFO should return at once, reading nothing");
    }

    #[test]
    fn a_line_split_across_reads_is_taken_once_whole() {
        let mut m = PerfMap::default();
        m.feed(b"1000 10 complete\n2000 1");
        assert_eq!(m.lookup(0x2000), None, "half a line is not an entry yet");
        assert_eq!(m.entries, 1);
        m.feed(b"0 second");
        assert_eq!(m.lookup(0x2000), None);
        m.feed(b" half\n3000 8 third\n");
        assert_eq!(m.lookup(0x200f), Some("second half"));
        assert_eq!(m.lookup(0x3000), Some("third"));
        assert_eq!((m.entries, m.bad_lines), (3, 0));
    }

    #[test]
    fn a_file_growing_while_read_is_read_incrementally() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("perfmap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("perf-1.map");
        // SAFETY: getuid has no preconditions.
        let mut f = PerfMapFile::new(path.clone(), vec![unsafe { libc::getuid() }]);
        f.refresh();
        assert!(!f.found, "no file yet");

        let mut w = std::fs::File::create(&path).unwrap();
        w.write_all(b"1000 10 a\n2000 10 b-being-wri").unwrap();
        w.flush().unwrap();
        f.refresh();
        assert!(f.found);
        assert_eq!(f.map.lookup(0x1000), Some("a"));
        assert_eq!(f.map.lookup(0x2000), None);

        w.write_all(b"tten\n1000 10 a-reused\n").unwrap();
        w.flush().unwrap();
        f.refresh();
        assert_eq!(f.map.lookup(0x2000), Some("b-being-written"));
        assert_eq!(f.map.lookup(0x1000), Some("a-reused"));
        assert_eq!(f.map.entries, 3, "nothing read twice");

        // Replaced by a shorter file (a new process with the same pid): read from the start.
        std::fs::write(&path, "5000 10 c\n").unwrap();
        f.refresh();
        assert_eq!(f.map.lookup(0x5000), Some("c"));
        assert_eq!(f.map.lookup(0x1000), None);

        // Gone: what was read stays.
        std::fs::remove_file(&path).unwrap();
        f.refresh();
        assert_eq!(f.map.lookup(0x5000), Some("c"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_a_fifo_or_a_stranger_s_file_is_not_read() {
        let dir = std::env::temp_dir().join(format!("perfmap-trust-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let genuine = dir.join("genuine.map");
        std::fs::write(&genuine, "1000 10 planted\n").unwrap();

        let link = dir.join("perf-1.map");
        std::os::unix::fs::symlink(&genuine, &link).unwrap();
        let mut f = PerfMapFile::new(link.clone(), vec![me]);
        f.refresh();
        assert_eq!((f.found, f.map.lookup(0x1000)), (false, None), "followed a symlink");
        assert_eq!(f.refused.as_deref(), Some("it is a symbolic link"));
        f.remove();
        assert!(link.symlink_metadata().is_ok(), "remove() deleted what it would not read");

        let fifo = dir.join("perf-2.map");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: plain syscall on a path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut f = PerfMapFile::new(fifo, vec![me]);
        f.refresh();
        assert_eq!(f.refused.as_deref(), Some("it is not a regular file"));

        // A file owned by a user the process does not run as: someone else put it there.
        let stranger = dir.join("perf-3.map");
        std::fs::write(&stranger, "1000 10 planted\n").unwrap();
        let (owner, process_uid) = if me == 0 {
            std::os::unix::fs::chown(&stranger, Some(65534), Some(65534)).unwrap();
            (65534, 12345)
        } else {
            (me, me + 1)
        };
        let mut f = PerfMapFile::new(stranger, vec![process_uid]);
        f.refresh();
        assert_eq!(f.map.lookup(0x1000), None, "read uid {owner}'s file for a process of uid {process_uid}");
        assert_eq!(
            f.refused.as_deref(),
            Some(format!("it belongs to uid {owner}, not to the process (uid {process_uid})").as_str())
        );
        let mut f = PerfMapFile::new(genuine, vec![me]);
        f.refresh();
        assert_eq!(f.map.lookup(0x1000), Some("planted"), "the owner's own map");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn node_gets_the_jit_flags_right_after_its_name() {
        let argv = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        assert_eq!(
            with_node_jit_flags(&argv(&["/usr/bin/node", "app.js", "--port", "1"])),
            Some(argv(&[
                "/usr/bin/node",
                "--perf-basic-prof-only-functions",
                "--interpreted-frames-native-stack",
                "app.js",
                "--port",
                "1"
            ]))
        );
        assert_eq!(
            with_node_jit_flags(&argv(&["node"])),
            Some(argv(&[
                "node",
                "--perf-basic-prof-only-functions",
                "--interpreted-frames-native-stack"
            ]))
        );
        for other in [
            &["nodejs", "x.js"][..],
            &["/usr/bin/python3", "node"],
            &["./node-app"],
            &[],
        ] {
            assert_eq!(with_node_jit_flags(&argv(other)), None, "{other:?}");
        }
    }

    #[test]
    fn v8_names_split_into_function_file_and_line() {
        assert_eq!(
            split_jit_name("JS:~retainBuffers /tmp/jt.js:1:23"),
            JitName {
                function: "retainBuffers".into(),
                file: Some("/tmp/jt.js".into()),
                line: Some(1)
            }
        );
        assert_eq!(
            split_jit_name("JS:*Module._load node:internal/modules/cjs/loader:1003:24"),
            JitName {
                function: "Module._load".into(),
                file: Some("node:internal/modules/cjs/loader".into()),
                line: Some(1003)
            }
        );
        assert_eq!(
            split_jit_name("JS:~ node:internal/main/run_main_module:1:1").function,
            "(anonymous)"
        );
        assert_eq!(split_jit_name("Eval:~ /x.js:1:1").function, "(eval)");
        for whole in [
            "Builtin:ArrayPush",
            "RegExp:[a-z]+",
            "plain",
            "JS:~noloc",
            "JS:~f /x.js:NaN:1",
        ] {
            assert_eq!(
                split_jit_name(whole),
                JitName {
                    function: whole.into(),
                    file: None,
                    line: None
                },
                "{whole}"
            );
        }
    }
}
