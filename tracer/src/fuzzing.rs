//! Entry points for fuzzing the parsers that read files a user (or an attacker) controls: one
//! function per target, each taking arbitrary bytes and driving the real code the way the
//! tool does. `cargo xtask fuzz` runs them under libFuzzer (fuzz/), and the corpus replay test
//! (tracer/tests/fuzz_corpus.rs) calls the same functions on the saved inputs, so a fixed
//! finding stays fixed. None of them may panic, hang or allocate without bound on any input.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::diff;
use crate::memmap;
use crate::options::Format;
use crate::regions::Regions;
use crate::report::folded::Metric;
use crate::symbolize::{ProcMaps, Symbolizer, perfmap};

/// A fuzz target: its name (the directory of its corpus) and its entry point.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    /// Largest input worth trying; longer ones only slow the fuzzer down.
    pub max_len: usize,
}

/// Every target, in the order `cargo xtask fuzz` runs them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "symbolizer",
        run: symbolizer,
        max_len: 256 << 10,
    },
    Target {
        name: "perfmap",
        run: perfmap,
        max_len: 64 << 10,
    },
    Target {
        name: "maps",
        run: maps,
        max_len: 64 << 10,
    },
    Target {
        name: "smaps",
        run: smaps,
        max_len: 64 << 10,
    },
    Target {
        name: "report",
        run: report,
        max_len: 64 << 10,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// A fresh directory for one input's files, removed when dropped. Under /dev/shm when there
/// is one, so that the fuzzer's many writes stay in memory.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Option<Scratch> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!(
            "tracer-fuzz-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).ok()?;
        Some(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The symbolizer on an arbitrary module file: ELF program headers, symbol tables, build id,
/// debuglink, DWARF (addr2line) and compressed sections. The input is the module `/m` under a
/// scratch root, and also its own separate debug file by build id when it names one, so the
/// debug-file path is taken too. A few offsets are named: fixed ones, and those of the first
/// function symbols the file declares (so that lookups land where DWARF has something to say).
pub fn symbolizer(data: &[u8]) {
    let Some(scratch) = Scratch::new() else { return };
    let root = &scratch.0;
    if std::fs::write(root.join("m"), data).is_err() {
        return;
    }
    let mut offsets: Vec<u64> = vec![0, 0x40, 0x1000, 0x1130, data.len() as u64 / 2, u64::MAX];
    if let Ok(file) = object::File::parse(data) {
        use object::{Object, ObjectSegment, ObjectSymbol};
        if let Ok(Some(id)) = file.build_id()
            && id.len() >= 2
        {
            let hex = crate::symbolize::debuglink::hex;
            let dir = root.join(format!("usr/lib/debug/.build-id/{}", hex(&id[..1])));
            if std::fs::create_dir_all(&dir).is_ok() {
                let _ = std::fs::hard_link(root.join("m"), dir.join(format!("{}.debug", hex(&id[1..]))));
            }
        }
        let segments: Vec<(u64, u64, u64)> = file
            .segments()
            .take(16)
            .map(|s| (s.address(), s.file_range().0, s.file_range().1))
            .collect();
        for sym in file.symbols().chain(file.dynamic_symbols()).take(4096) {
            if offsets.len() >= 24 {
                break;
            }
            if sym.kind() != object::SymbolKind::Text {
                continue;
            }
            let addr = sym.address();
            if let Some(&(vaddr, off, _)) = segments
                .iter()
                .find(|&&(vaddr, _, size)| addr >= vaddr && addr - vaddr < size)
            {
                offsets.push(off.wrapping_add(addr - vaddr).wrapping_add(sym.size() / 2));
            }
        }
    }
    let mut s = Symbolizer::new(root);
    for (i, &off) in offsets.iter().enumerate() {
        let _ = s.symbolize_frame(Some("/m"), off, off.wrapping_add(0x7f00_0000_0000), i % 2 == 1);
        let _ = s.function("/m", off);
    }
    let _ = s.build_id("/m");
}

/// A perf map as node writes it, fed in two pieces split at an input-chosen point (a line
/// still being written when the map is read), then looked up and its JIT names split.
pub fn perfmap(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b) * data.len() / 256);
    let mut map = perfmap::PerfMap::default();
    map.feed(&data[..split]);
    map.feed(&data[split..]);
    let _ = map.is_empty();
    // The input's own entry addresses, and the byte before and after each.
    let text = String::from_utf8_lossy(data);
    let starts = text.lines().take(64).filter_map(|l| {
        let word = l.split_whitespace().next()?;
        u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
    });
    let mut addrs = probe_addresses(data);
    for start in starts {
        addrs.extend([start.wrapping_sub(1), start, start.wrapping_add(1)]);
    }
    for addr in addrs {
        if let Some(name) = map.lookup(addr) {
            let _ = perfmap::split_jit_name(name);
        }
    }
}

/// `/proc/PID/maps` text: parsed, folded into a second reading of itself (as a refresh does),
/// used to normalize addresses and as the start of the mmap-family bookkeeping.
pub fn maps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    // A torn reading is mended rather than refused; the result must keep the invariant.
    if let Ok(mended) = ProcMaps::parse_torn(&text) {
        assert!(mended.mappings().windows(2).all(|w| w[0].end <= w[1].start));
    }
    let Ok(maps) = ProcMaps::parse(&text) else {
        return;
    };
    for addr in probe_addresses(data) {
        let _ = maps.normalize(addr);
    }
    let mut older = maps.clone();
    // A later reading in which half of the mappings are gone.
    let half: String = text.lines().step_by(2).flat_map(|l| [l, "\n"]).collect();
    if let Ok(newer) = ProcMaps::parse(&half) {
        older.update(newer);
    }
    let _ = Regions::from_maps(&maps);
}

/// `/proc/PID/smaps` text, classified and summed into the memory map, with stack pointers
/// taken from the input so that the thread-stack rule is exercised too.
pub fn smaps(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(before) = memmap::memory_map_of(&text, &Regions::default(), Vec::new(), None) else {
        return;
    };
    let _ = memmap::memory_map_of(
        &text,
        &Regions::default(),
        probe_addresses(data),
        Some(&before),
    );
}

/// A saved JSON report as `tracer report` and `tracer diff` read it: rendered in every format
/// and metric, diffed against itself and against an empty report in every diff format, and
/// named again (`--resymbolize`) under an empty root, so that no file of this host is read.
pub fn report(data: &[u8]) {
    let Ok(mut rep) = diff::parse_report(data) else {
        return;
    };
    let metrics = [Metric::Live, Metric::Allocated, Metric::Growth];
    for format in [Format::Text, Format::Json, Format::Folded, Format::Svg, Format::Pprof] {
        for metric in metrics {
            let _ = crate::record::write_as(&rep, format, metric, &mut |_| None, &mut Sink);
            if !matches!(format, Format::Folded | Format::Svg) {
                break;
            }
        }
    }
    let mut empty = rep.clone();
    empty.stacks.clear();
    for metric in metrics {
        for (a, b) in [(&rep, &rep), (&empty, &rep), (&rep, &empty)] {
            let d = diff::diff(a, b, metric);
            for format in [diff::DiffFormat::Text, diff::DiffFormat::Folded, diff::DiffFormat::Svg] {
                let _ = diff::write(&d, format, &mut Sink);
            }
        }
    }
    if let Some(scratch) = Scratch::new() {
        let mut s = Symbolizer::new(&scratch.0);
        let _ = crate::symbolize::resymbolize::resymbolize(&mut rep, &mut s);
        let _ = crate::report::text::write(&rep, &mut Sink);
    }
}

/// Addresses to look up: a few fixed ones and eight taken from the input's own bytes.
fn probe_addresses(data: &[u8]) -> Vec<u64> {
    let mut out = vec![0, 1, 0x1000, 0x7fff_ffff_f000, u64::MAX];
    out.extend(data.chunks_exact(8).take(8).map(|c| {
        u64::from_le_bytes(c.try_into().expect("8 bytes"))
    }));
    out
}

/// Output that goes nowhere: rendering is what is being tested.
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
