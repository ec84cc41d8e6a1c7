//! The measuring stick for stacks: gdb's `bt` at the same allocator calls the tracer records,
//! and a frame-by-frame comparison of the two.
//!
//! gdb 13 runs in batch mode with `gdb_stacks.py` (next to this file), launching a program or
//! attaching to a running one (`gdb -p`), with breakpoints on the *first instruction* of
//! allocator functions (`break *ADDR`, where the tracer's uprobes sit, not after the prologue
//! where `break malloc` would stop) and a condition that picks the test's calls (a size of
//! their own). For each stop it prints every frame gdb unwinds (from CFI, with libc6-dbg for
//! glibc's names and inlined functions): kind, pc, and pc as module + file offset.
//!
//! # The comparison rule ([`compare`])
//!
//! Frames are compared pairwise, leaf first, as lists of entries where an inlined function is
//! an entry of its own placed before the function it was inlined into (gdb's order and the
//! report's). Entry i of the tracer's stack equals entry i of gdb's when:
//! - **place**: same module path (as the target sees it) and same file offset. This is the
//!   address in the same process, stated so that two runs of a program with different
//!   layouts (ASLR) compare. Both sides give the same kind of number at every level: entry 0
//!   is the allocator's first instruction (gdb stopped there; the tracer's slot 0 is the
//!   probed ip); a caller's entry is its return address (gdb's `pc` of an outer frame; gdb
//!   looks up its name at pc-1, the tracer too, but neither prints pc-1); the frame a signal
//!   interrupted has the interrupted pc itself (no call there), and the signal trampoline
//!   (`__restore_rt`) the address the handler returns to. An inlined entry has its outer
//!   frame's place on both sides.
//! - **inlined**: both are inlined entries, or both are real frames. gdb's `<signal handler
//!   called>` is a real frame here.
//! - **name**: equal after [`normalize_name`], except for gdb's signal-trampoline frame, which
//!   gdb names with nothing to compare (the place must still match).
//! - A report stack merged from several kernel stacks (`variants` > 1: call sites the report
//!   cannot tell apart, e.g. two calls in one function without debug lines) shows one
//!   variant's addresses: its named frames compare by module and name only.
//!
//! How far: gdb's frames up to and including the first one named `main` (what `bt` shows by
//! default; beyond it are libc's start-up frames, which the report need not show); all of
//! gdb's frames when none is `main` (a thread). The tracer's frames beyond that range are not
//! compared here: that they are real code is [`invented_frames`]'s check.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::{ChildStdin, Command};
use std::time::Duration;

use serde_json::Value;

use super::{Proc, describe_status, show_args};

/// How long gdb may take to attach (or start the program) and set its breakpoints.
pub const GDB_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gdb session may take in all.
pub const GDB_TIMEOUT: Duration = Duration::from_secs(300);

/// Where gdb stops and what it prints.
#[derive(Clone, Debug)]
pub struct GdbPlan {
    /// (function, condition): a breakpoint on the first instruction of the function (a libc
    /// symbol: `malloc`, `calloc`, `realloc`), taken when the condition (a gdb expression over
    /// the argument registers, e.g. `$rdi == 5110`) holds; an empty condition always holds.
    pub breaks: Vec<(String, String)>,
    /// Print the stack at every k-th hit whose condition holds.
    pub every: u64,
    /// Stop after this many stacks, then detach (attach mode) or kill the program (0: run to
    /// its end).
    pub max_hits: u64,
    /// Frames per stack (0: all).
    pub depth: u64,
}

impl GdbPlan {
    /// Calls of `(function, size)`: malloc, calloc (size = nmemb * size) or realloc asked
    /// for exactly that many bytes; every one, all frames.
    pub fn sizes(calls: &[(&str, u64)]) -> Self {
        let mut breaks: Vec<(String, String)> = Vec::new();
        for &(function, size) in calls {
            let bytes = match function {
                "malloc" => "$rdi",
                "calloc" => "$rdi * $rsi",
                "realloc" => "$rsi",
                other => panic!("no size argument known for {other}"),
            };
            let test = format!("{bytes} == {size}");
            match breaks.iter_mut().find(|(f, _)| f == function) {
                Some((_, condition)) => *condition = format!("{condition} || {test}"),
                None => breaks.push((function.to_owned(), test)),
            }
        }
        GdbPlan {
            breaks,
            every: 1,
            max_hits: 0,
            depth: 0,
        }
    }

    fn args(&self) -> Vec<String> {
        let breaks = self
            .breaks
            .iter()
            .map(|(f, c)| format!("{f}:{c}"))
            .collect::<Vec<_>>()
            .join(";");
        assert!(
            !breaks.contains('"'),
            "gdb plan must not contain double quotes: {breaks}"
        );
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/gdb_stacks.py");
        vec![
            "-batch".into(),
            "-nx".into(),
            "-ex".into(),
            format!("set $tracer_breaks = \"{breaks}\""),
            "-ex".into(),
            format!("set $tracer_every = {}", self.every),
            "-ex".into(),
            format!("set $tracer_max_hits = {}", self.max_hits),
            "-ex".into(),
            format!("set $tracer_depth = {}", self.depth),
            "-x".into(),
            script.display().to_string(),
        ]
    }
}

/// What a frame is to gdb.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdbKind {
    Normal,
    Inline,
    /// `<signal handler called>`: the signal trampoline the handler returns to.
    Sigtramp,
    Other,
}

#[derive(Clone, Debug)]
pub struct GdbFrame {
    pub level: u32,
    pub kind: GdbKind,
    pub pc: u64,
    /// The mapped file holding pc, None when no file mapping does.
    pub module: Option<String>,
    /// pc's file offset in `module` (pc itself when there is none).
    pub offset: u64,
    pub name: Option<String>,
}

/// One stop: the breakpoint's function, the bytes it was asked for, and the frames.
#[derive(Clone, Debug)]
pub struct GdbStack {
    pub function: String,
    pub size: u64,
    pub frames: Vec<GdbFrame>,
}

/// A finished gdb session: its stacks, and everything it printed (for failure messages).
#[derive(Clone)]
pub struct GdbRun {
    pub stacks: Vec<GdbStack>,
    pub output: String,
}

impl GdbRun {
    /// The only stack of a `function` call asked for `size` bytes; panics, showing gdb's
    /// output, if there is none or more than one.
    pub fn stack_of(&self, function: &str, size: u64) -> &GdbStack {
        let found: Vec<&GdbStack> = self
            .stacks
            .iter()
            .filter(|s| s.function == function && s.size == size)
            .collect();
        assert!(
            found.len() == 1,
            "gdb stopped {} times at {function}({size} bytes), expected once\n--- gdb output (first 6000 bytes) ---\n{}",
            found.len(),
            super::truncate(&self.output, 6000)
        );
        found[0]
    }
}

fn command() -> Command {
    let mut cmd = Command::new("gdb");
    // gdb's own messages in English and no terminal games, whatever the caller's environment.
    cmd.env("LC_ALL", "C").env_remove("DEBUGINFOD_URLS");
    cmd
}

/// Runs `program args...` under gdb to its end (or `plan.max_hits`) and returns the stacks.
pub fn gdb_launch<S: AsRef<OsStr>>(plan: &GdbPlan, program: &Path, args: &[S]) -> GdbRun {
    let mut cmd = command();
    cmd.args(plan.args()).arg("--args").arg(program).args(args);
    let label = format!("gdb --args {} {}", program.display(), show_args(args));
    let mut proc = Proc::spawn(&label, &mut cmd);
    finish(&mut proc, &label)
}

/// A gdb attached to a running process, its breakpoints set and the process running again.
pub struct GdbAttached {
    proc: Proc,
    label: String,
}

/// Attaches gdb to `pid` and returns once its breakpoints are set and the process runs on.
pub fn gdb_attach(plan: &GdbPlan, pid: i32) -> GdbAttached {
    let mut cmd = command();
    cmd.args(plan.args()).args(["-p", &pid.to_string()]);
    let label = format!("gdb -p {pid}");
    let mut proc = Proc::spawn(&label, &mut cmd);
    if let Err(why) = proc
        .stdout
        .wait_for(GDB_READY_TIMEOUT, |l| l == "GDB-READY")
    {
        let state = if proc.running() {
            "still running"
        } else {
            "exited"
        };
        panic!(
            "{label} never said GDB-READY: {why} ({state})\n--- stdout ---\n{}--- stderr ---\n{}",
            proc.stdout.text(),
            proc.stderr
                .read_to_end(Duration::from_millis(200))
                .join("\n")
        );
    }
    GdbAttached { proc, label }
}

impl GdbAttached {
    /// Waits until the process exits (or gdb detaches after `max_hits`) and returns the stacks.
    pub fn finish(mut self) -> GdbRun {
        finish(&mut self.proc, &self.label)
    }
}

fn finish(proc: &mut Proc, label: &str) -> GdbRun {
    let finished = proc.finish(GDB_TIMEOUT);
    let output = format!("{}--- stderr ---\n{}", finished.stdout, finished.stderr);
    assert!(
        finished.status.success() && finished.stdout.lines().any(|l| l.starts_with("GDB-DONE")),
        "{label} failed ({}) or did not finish its script\n{}",
        describe_status(finished.status),
        super::truncate(&output, 8000)
    );
    let stacks = parse_output(&finished.stdout)
        .unwrap_or_else(|e| panic!("{label}: {e}\n{}", super::truncate(&output, 8000)));
    GdbRun { stacks, output }
}

/// Parses gdb_stacks.py's lines (other lines, the program's own output, are skipped).
pub fn parse_output(text: &str) -> Result<Vec<GdbStack>, String> {
    let mut stacks = Vec::new();
    let mut current: Option<GdbStack> = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields[0] {
            "GDB-HIT" if fields.len() == 4 => {
                if let Some(open) = current.take() {
                    return Err(format!("stack {} has no GDB-END", open.function));
                }
                current = Some(GdbStack {
                    function: fields[2].to_owned(),
                    size: fields[3]
                        .parse()
                        .map_err(|e| format!("bad size in {line:?}: {e}"))?,
                    frames: Vec::new(),
                });
            }
            "GDB-FRAME" if fields.len() == 7 => {
                let stack = current
                    .as_mut()
                    .ok_or_else(|| format!("frame outside a stack: {line:?}"))?;
                let hex = |s: &str| {
                    u64::from_str_radix(s.trim_start_matches("0x"), 16)
                        .map_err(|e| format!("bad hex {s:?} in {line:?}: {e}"))
                };
                let opt = |s: &str| (s != "-").then(|| s.to_owned());
                stack.frames.push(GdbFrame {
                    level: fields[1]
                        .parse()
                        .map_err(|e| format!("bad level in {line:?}: {e}"))?,
                    kind: match fields[2] {
                        "normal" => GdbKind::Normal,
                        "inline" => GdbKind::Inline,
                        "sigtramp" => GdbKind::Sigtramp,
                        _ => GdbKind::Other,
                    },
                    pc: hex(fields[3])?,
                    module: opt(fields[4]),
                    offset: hex(fields[5])?,
                    name: opt(fields[6]),
                });
            }
            "GDB-END" => {
                stacks.push(
                    current
                        .take()
                        .ok_or_else(|| format!("GDB-END without GDB-HIT: {line:?}"))?,
                );
            }
            "GDB-HIT" | "GDB-FRAME" => return Err(format!("malformed line {line:?}")),
            _ => {}
        }
    }
    if current.is_some() {
        return Err("the last stack has no GDB-END".to_owned());
    }
    Ok(stacks)
}

// ---------------------------------------------------------------------------------------------
// Comparing

/// One entry of a stack, from either side.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub module: Option<String>,
    pub offset: u64,
    pub name: Option<String>,
    pub inlined: bool,
    /// gdb's `<signal handler called>` frame (its name is not compared).
    pub sigtramp: bool,
    /// False for a named frame of a report stack merged from several kernel stacks: the
    /// report keeps one variant's address for it, so only its module and name compare.
    pub exact: bool,
}

impl Entry {
    fn place(&self) -> String {
        match &self.module {
            Some(m) => format!("{}+{:#x}", m.rsplit('/').next().unwrap_or(m), self.offset),
            None => format!("{:#x}", self.offset),
        }
    }

    fn show(&self) -> String {
        let name = if self.sigtramp {
            "<signal handler called>"
        } else {
            self.name.as_deref().unwrap_or("??")
        };
        // Long C++ names keep their end, where the function's own name is.
        let name = match name.char_indices().rev().nth(44) {
            Some((cut, _)) => format!("...{}", &name[cut..]),
            None => name.to_owned(),
        };
        format!(
            "{}{name} {}",
            if self.inlined { "[inl] " } else { "" },
            self.place()
        )
    }
}

/// gdb's frames as entries.
pub fn gdb_entries(stack: &GdbStack) -> Vec<Entry> {
    stack
        .frames
        .iter()
        .map(|f| Entry {
            module: f.module.clone(),
            offset: f.offset,
            name: f.name.clone(),
            inlined: f.kind == GdbKind::Inline,
            sigtramp: f.kind == GdbKind::Sigtramp,
            exact: true,
        })
        .collect()
}

/// A report stack's frames as entries.
pub fn tracer_entries(stack: &Value) -> Vec<Entry> {
    let merged = stack.get("variants").and_then(Value::as_u64).unwrap_or(1) > 1;
    stack
        .get("frames")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|f| {
            let module = f.get("module").and_then(Value::as_str).map(str::to_owned);
            let address = f.get("address").and_then(Value::as_u64).unwrap_or(0);
            let mut name = f.get("function").and_then(Value::as_str).map(str::to_owned);
            if f.get("kind").and_then(Value::as_str) == Some("js") {
                // Named from V8's objects: the JavaScript function the code runs. gdb names
                // the code itself: nothing for JIT code, the builtin for the interpreter.
                name = module.as_deref().and_then(|m| {
                    symbol_at_file_offset(m, f.get("offset").and_then(Value::as_u64).unwrap_or(0))
                });
            }
            Entry {
                exact: !(merged && name.is_some()),
                offset: if module.is_some() {
                    f.get("offset").and_then(Value::as_u64).unwrap_or(0)
                } else {
                    address
                },
                module,
                name,
                inlined: f.get("inlined").and_then(Value::as_bool) == Some(true),
                sigtramp: false,
            }
        })
        .collect()
}

/// gdb's entries up to and including the first real frame named `main`, or all of them.
pub fn through_main(entries: &[Entry]) -> &[Entry] {
    match entries.iter().position(|e| {
        !e.inlined && e.name.as_deref().map(normalize_name).as_deref() == Some("main")
    }) {
        Some(i) => &entries[..=i],
        None => entries,
    }
}

/// A function name reduced to what both sides agree on: gdb names a function from DWARF
/// (`leaf_new`, `__GI___libc_malloc`, `msort_with_tmp`), the tracer from the symbol table
/// when it is there (`leaf_new(unsigned long)`, `malloc`, `msort_with_tmp.part.0`). Removed:
/// whitespace (demanglers space `> >` differently); a trailing parameter list and the
/// qualifiers after it; `[abi:...]` tags; GCC's clone suffixes (`.part.N`, `.isra.N`,
/// `.constprop.N`, `.cold`); and glibc's internal alias prefixes (`__GI_`, `__libc_`,
/// `_IO_new_` for `_IO_`, then leading underscores), since glibc gives one address several
/// names and each side may pick another.
pub fn normalize_name(name: &str) -> String {
    let mut s: String = name.chars().filter(|c| !c.is_whitespace()).collect();
    // Trailing qualifiers, then the parameter list: the last balanced (...) at the end.
    for qualifier in ["const", "volatile", "&&", "&"] {
        if s.ends_with(&format!("){qualifier}")) {
            s.truncate(s.len() - qualifier.len());
        }
    }
    if s.ends_with(')') {
        let mut depth = 0i32;
        let mut cut = None;
        for (i, c) in s.char_indices().rev() {
            match c {
                ')' => depth += 1,
                '(' => {
                    depth -= 1;
                    if depth == 0 {
                        cut = Some(i);
                        break;
                    }
                }
                _ => {}
            }
        }
        // `(anonymous namespace)::f` or `operator()` must keep their parentheses.
        if let Some(i) = cut
            && i > 0
            && !s[..i].ends_with("operator")
        {
            s.truncate(i);
        }
    }
    while let Some(start) = s.find("[abi:") {
        match s[start..].find(']') {
            Some(end) => s.replace_range(start..start + end + 1, ""),
            None => break,
        }
    }
    for suffix in [".part", ".isra", ".constprop", ".cold"] {
        if let Some(i) = s.find(suffix) {
            s.truncate(i);
        }
    }
    loop {
        let before = s.len();
        for prefix in ["__GI_", "__libc_"] {
            if let Some(rest) = s.strip_prefix(prefix) {
                s = rest.to_owned();
            }
        }
        if let Some(rest) = s.strip_prefix("_IO_new_") {
            s = format!("_IO_{rest}");
        }
        if s.len() == before {
            break;
        }
    }
    s.trim_start_matches('_').to_owned()
}

fn entries_equal(gdb: &Entry, tracer: &Entry) -> bool {
    gdb.module == tracer.module
        && (gdb.offset == tracer.offset || !tracer.exact)
        && gdb.inlined == tracer.inlined
        && (gdb.sigtramp
            || match (&gdb.name, &tracer.name) {
                (Some(a), Some(b)) => normalize_name(a) == normalize_name(b),
                (None, None) => true,
                // gdb places the frame in a file but names no function: node's embedded
                // builtins, which node maps a second time at another address, where gdb
                // looks for no symbol. The same place, named as the file's symbol table
                // names that offset, is the same frame.
                (None, Some(b)) => {
                    gdb.offset == tracer.offset
                        && gdb
                            .module
                            .as_deref()
                            .and_then(|m| symbol_at_file_offset(m, gdb.offset))
                            .is_some_and(|s| normalize_name(&s) == normalize_name(b))
                }
                _ => false,
            })
}

/// The symbol of ELF file `path` (its .symtab, else .dynsym) whose range holds the address
/// that file offset `offset` is loaded at, found through the file's PT_LOAD headers.
pub fn symbol_at_file_offset(path: &str, offset: u64) -> Option<String> {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    type Table = Arc<(Vec<(u64, u64, u64)>, Vec<(u64, u64, String)>)>;
    static TABLES: OnceLock<Mutex<HashMap<String, Option<Table>>>> = OnceLock::new();
    let table = TABLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(path.to_owned())
        .or_insert_with(|| {
            let data = std::fs::read(path).ok()?;
            let file = object::File::parse(&*data).ok()?;
            let loads = file
                .segments()
                .map(|s| {
                    let (off, size) = s.file_range();
                    (off, size, s.address())
                })
                .collect();
            let symbols = if file.symbols().next().is_some() {
                file.symbols()
            } else {
                file.dynamic_symbols()
            };
            let mut syms: Vec<(u64, u64, String)> = symbols
                .filter(|s| s.is_definition() && s.size() > 0)
                .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_owned())))
                .collect();
            syms.sort();
            Some(Arc::new((loads, syms)))
        })
        .clone()?;
    let (loads, syms) = &*table;
    let &(seg_off, _, seg_addr) = loads
        .iter()
        .find(|&&(o, size, _)| offset >= o && offset < o + size)?;
    let addr = seg_addr + (offset - seg_off);
    let i = syms.partition_point(|s| s.0 <= addr);
    let (start, size, name) = syms.get(i.checked_sub(1)?)?;
    (addr < start + size).then(|| name.clone())
}

/// Compares the tracer's stack with gdb's under the rule in the module doc. `Err` holds a
/// table of both stacks side by side, each row marked `ok` or `DIFFERS`, with the first
/// difference named.
pub fn compare(gdb: &[Entry], tracer: &[Entry]) -> Result<(), String> {
    let want = through_main(gdb);
    let mut first = None;
    let rows = want.len().max(tracer.len().min(want.len() + 3));
    let mut table = String::new();
    let _ = writeln!(table, "  #   {:<58} {:<58}", "gdb bt", "tracer");
    for i in 0..rows {
        let g = want.get(i);
        let t = tracer.get(i);
        let verdict = match (g, t) {
            (Some(g), Some(t)) if entries_equal(g, t) => "ok",
            (Some(_), _) => {
                if first.is_none() {
                    first = Some(i);
                }
                "DIFFERS"
            }
            (None, _) => "(past gdb's main: not compared)",
        };
        let _ = writeln!(
            table,
            "  {i:<3} {:<58} {:<58} {verdict}",
            g.map_or_else(|| "-".to_owned(), Entry::show),
            t.map_or_else(|| "(missing)".to_owned(), Entry::show),
        );
    }
    match first {
        None => Ok(()),
        Some(i) => {
            let what = match (want.get(i), tracer.get(i)) {
                (Some(g), None) => format!(
                    "the tracer's stack ends after {i} entries; gdb goes on with {}",
                    g.show()
                ),
                (Some(g), Some(t)) if g.module != t.module || (g.offset != t.offset && t.exact) => {
                    format!(
                        "entry {i}: gdb has {} at {}, the tracer {} at {}",
                        g.name.as_deref().unwrap_or("??"),
                        g.place(),
                        t.name.as_deref().unwrap_or("??"),
                        t.place()
                    )
                }
                (Some(g), Some(t)) if g.inlined != t.inlined => format!(
                    "entry {i}: inlined on one side only (gdb {}, tracer {})",
                    g.inlined, t.inlined
                ),
                (Some(g), Some(t)) => format!(
                    "entry {i}: same place, different names: gdb {:?} ({:?}), tracer {:?} ({:?})",
                    g.name,
                    g.name.as_deref().map(normalize_name),
                    t.name,
                    t.name.as_deref().map(normalize_name)
                ),
                _ => unreachable!("a difference has a gdb entry"),
            };
            Err(format!("{what}\n{table}"))
        }
    }
}

/// How many of the first `n` entries of gdb's stack the tracer's stack has equal, under the
/// rule of [`compare`], reading both from entry 0. An entry gdb can place in no file (JIT
/// code) equals one the tracer places in none either, whatever the address (two runs of a
/// JIT compiler put code at different addresses), and ends the comparison there: what lies
/// beyond it is not comparable across runs. Returns `n` (or gdb's length if shorter, when the
/// tracer's stack has that length too) for a full match.
pub fn matching_prefix(gdb: &[Entry], tracer: &[Entry], n: usize) -> usize {
    let want = &gdb[..gdb.len().min(n)];
    for (i, g) in want.iter().enumerate() {
        let Some(t) = tracer.get(i) else {
            return i;
        };
        if g.module.is_none() {
            return if t.module.is_none() { n } else { i };
        }
        if !entries_equal(g, t) {
            return i;
        }
    }
    if want.len() < n && tracer.len() != want.len() {
        // gdb's stack ended early: the tracer's must end there too.
        return want.len();
    }
    n
}

/// A short "name module+offset" of an entry, for summaries.
pub fn show_entry(entry: Option<&Entry>) -> String {
    entry.map_or_else(|| "(stack ends)".to_owned(), Entry::show)
}

// ---------------------------------------------------------------------------------------------
// Invented frames

/// An executable file mapping of a process, as /proc/PID/maps lists it.
#[derive(Clone, Debug)]
pub struct ExecMapping {
    pub start: u64,
    pub end: u64,
    pub path: String,
}

/// Parses /proc/PID/maps lines, keeping the executable ones.
pub fn exec_mappings(lines: &[&str]) -> Vec<ExecMapping> {
    lines
        .iter()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            if perms.as_bytes().get(2) != Some(&b'x') {
                return None;
            }
            let path = fields.nth(3).unwrap_or("").to_owned();
            Some(ExecMapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                path,
            })
        })
        .collect()
}

/// Every frame of every stack of `report` whose address lies in no executable mapping (file
/// or anonymous: JIT code is real code), one line each.
pub fn invented_frames(report: &Value, exec: &[ExecMapping]) -> Vec<String> {
    let mut found = Vec::new();
    for stack in super::stacks(report) {
        let frames = stack
            .get("frames")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for (i, f) in frames.iter().enumerate() {
            let address = f.get("address").and_then(Value::as_u64).unwrap_or(0);
            let module = f.get("module").and_then(Value::as_str);
            let mapped = exec.iter().any(|m| m.start <= address && address < m.end);
            if !mapped {
                // The stack up to the frame after the invented one.
                let names: Vec<String> = frames
                    .iter()
                    .take(i + 2)
                    .map(|f| match f.get("function").and_then(Value::as_str) {
                        Some(n) => super::truncate(n, 40).to_owned(),
                        None => format!(
                            "{:#x}",
                            f.get("address").and_then(Value::as_u64).unwrap_or(0)
                        ),
                    })
                    .collect();
                found.push(format!(
                    "frame {i} at {address:#x} (module {module:?}) lies in no executable mapping; stack: {}",
                    names.join(" <- ")
                ));
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Driving a waiting fixture

/// Writes one line to a fixture's stdin (the "go" of fixtures that wait for it).
pub fn send_line(stdin: &mut ChildStdin, line: &str) {
    writeln!(stdin, "{line}")
        .and_then(|()| stdin.flush())
        .unwrap_or_else(|e| panic!("write {line:?} to the fixture's stdin: {e}"));
}
