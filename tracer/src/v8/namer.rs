//! Names for the V8 frames of captured stacks. The walker records each function's lasting
//! identity (Script id, literal id) and the address of its SharedFunctionInfo; the names are
//! read from that address soon after the stack first appears, once per identity, before a
//! compacting GC moves the object and perhaps puts another one there. The address is trusted
//! only if it still holds a SharedFunctionInfo (type word) of that identity; a function whose
//! every capture failed so stays unnamed and is counted, never guessed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::V8Error;
use super::capture::{Captured, Identity, split};
use super::frame::JsFrame;
use super::heap::Heap;
use super::layout::V8Layout;
use super::memory::{CachedMemory, Memory, ProcessMemory};
use super::resolve::{current_position, resolve_function};
use tracer_common::js_frame;

/// A JavaScript function as a report shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JsName {
    /// V8's debug name, or `(anonymous)`.
    pub function: String,
    pub script: String,
    /// 1-based line and column where the function starts (what node's perf map gives).
    pub line: u32,
    pub column: u32,
    /// The line being executed, for an interpreted frame whose bytecode offset was captured.
    pub current_line: Option<u32>,
}

/// Reads and keeps the names of the functions the walker captures.
pub struct JsNamer {
    layout: V8Layout,
    pid: i32,
    /// Stacks already read.
    seen: HashSet<u64>,
    /// By identity: the function (no current line), once read.
    functions: HashMap<Identity, Arc<JsName>>,
    /// By identity and bytecode offset: with the line being executed.
    positions: HashMap<(Identity, u32), Arc<JsName>>,
    /// Identities not read yet, with why the last try failed.
    failed: HashMap<Identity, &'static str>,
}

impl JsNamer {
    pub fn new(layout: V8Layout, pid: i32) -> JsNamer {
        JsNamer {
            layout,
            pid,
            seen: HashSet::new(),
            functions: HashMap::new(),
            positions: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// The process is read through another of its threads (the one before exited).
    pub fn set_pid(&mut self, pid: i32) {
        self.pid = pid;
    }

    /// Reads the names of the functions in stacks not read yet that are not known yet.
    pub fn name_stacks<'a>(&mut self, stacks: impl IntoIterator<Item = (u64, &'a [u64])>) {
        let process = ProcessMemory::new(self.pid);
        let mem = CachedMemory::new(&process);
        for (id, words) in stacks {
            if !words.iter().any(|&w| js_frame::is_id(w)) || !self.seen.insert(id) {
                continue;
            }
            for (_, captured) in split(words) {
                if let Some(c) = captured {
                    self.read(&mem, &c);
                }
            }
        }
    }

    fn read<M: Memory + ?Sized>(&mut self, mem: &M, c: &Captured) {
        let key = c.bytecode_offset.map(|o| (c.identity, o));
        let known = self.functions.contains_key(&c.identity);
        if known && key.is_none_or(|k| self.positions.contains_key(&k)) {
            return;
        }
        let l = &self.layout;
        let result = verify(mem, l, c).and_then(|is_script| {
            if !is_script {
                return Ok(None);
            }
            let base = match self.functions.get(&c.identity) {
                Some(f) => f.clone(),
                None => Arc::new(name_of(mem, l, c.sfi)?),
            };
            let current = match c.bytecode_offset {
                Some(offset) => current_line(mem, l, c.sfi, offset).ok().flatten(),
                None => None,
            };
            Ok(Some((base, current)))
        });
        match result {
            Ok(Some((base, current))) => {
                self.failed.remove(&c.identity);
                self.functions.entry(c.identity).or_insert_with(|| base.clone());
                if let Some(k) = key {
                    self.positions.insert(k, Arc::new(JsName { current_line: current, ..(*base).clone() }));
                }
            }
            // A builtin's own function: its symbol names the frame.
            Ok(None) => {}
            Err(e) => {
                if !known {
                    self.failed.insert(c.identity, failure_kind(&e));
                }
            }
        }
    }

    /// The name of a captured frame's function, if it was read.
    pub fn lookup(&self, c: &Captured) -> Option<Arc<JsName>> {
        c.bytecode_offset
            .and_then(|o| self.positions.get(&(c.identity, o)))
            .or_else(|| self.functions.get(&c.identity))
            .cloned()
    }

    /// Captured frames of a stack's words whose function could not be named.
    pub fn unnamed_in(&self, words: &[u64]) -> u64 {
        split(words)
            .iter()
            .filter_map(|(_, c)| c.as_ref())
            .filter(|c| !self.functions.contains_key(&c.identity) && self.failed.contains_key(&c.identity))
            .count() as u64
    }

    /// Functions read so far.
    pub fn functions_named(&self) -> usize {
        self.functions.len()
    }

    /// Functions not named, by why, most frequent first.
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        let mut by: HashMap<&'static str, u64> = HashMap::new();
        for why in self.failed.values() {
            *by.entry(why).or_default() += 1;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

fn failure_kind(e: &V8Error) -> &'static str {
    match e {
        V8Error::Read(_) => "unreadable",
        V8Error::TypedFrame(_) => "not JavaScript frames",
        V8Error::NotHeapObject { .. } | V8Error::BadMap { .. } | V8Error::WrongType { .. } => {
            "moved or freed by V8 before they were read"
        }
        V8Error::Invalid { what: "captured SharedFunctionInfo", .. } => "another function at the address (moved by a GC)",
        V8Error::NotSmi { .. } | V8Error::Invalid { .. } => "inconsistent objects",
        V8Error::Unsupported(_) => "unsupported",
    }
}

/// Whether the capture's address still holds a SharedFunctionInfo of its identity: Ok(true)
/// for a function with a Script, Ok(false) for one without (V8's builtins).
pub fn verify<M: Memory + ?Sized>(mem: &M, l: &V8Layout, c: &Captured) -> Result<bool, V8Error> {
    let h = Heap::new(mem, l);
    let sfi = h.typed("SharedFunctionInfo", c.sfi + l.heap_object_tag, l.type_shared_function_info, "SHARED_FUNCTION_INFO_TYPE")?;
    let (script, script_type) = h.object("SharedFunctionInfo's script", h.field(sfi, l.sfi_script_or_debug_info)?)?;
    if script_type == l.type_oddball {
        return Ok(false);
    }
    if script_type != l.type_script {
        return Err(V8Error::WrongType { what: "SharedFunctionInfo's script", addr: script, found: script_type, expected: "SCRIPT_TYPE" });
    }
    let literal = mem.read_u32(sfi + l.sfi_flags + 4)?;
    let script_id = h.smi("Script id", h.field(script, l.script_id.unwrap_or(u64::MAX / 2))?)?;
    let captured = js_frame::fields(js_frame::id(false, script_id as u64, literal as u64, 0));
    if (captured.0, captured.1) != (c.identity.script, c.identity.literal) {
        return Err(V8Error::Invalid {
            what: "captured SharedFunctionInfo",
            detail: format!("{:#x} holds another function now (moved by a GC)", c.sfi),
        });
    }
    Ok(true)
}

/// The function at untagged address `sfi`, named.
fn name_of<M: Memory + ?Sized>(mem: &M, l: &V8Layout, sfi: u64) -> Result<JsName, V8Error> {
    let f = resolve_function(mem, l, sfi)?;
    Ok(JsName {
        function: if f.name.is_empty() { "(anonymous)".to_owned() } else { f.name },
        script: f.script,
        line: f.line,
        column: f.column,
        current_line: None,
    })
}

/// The line at `offset` of the function's bytecode (the walker checked that the frame ran
/// the SharedFunctionInfo's own BytecodeArray).
fn current_line<M: Memory + ?Sized>(mem: &M, l: &V8Layout, sfi: u64, offset: u32) -> Result<Option<u32>, V8Error> {
    let h = Heap::new(mem, l);
    let data = h.field(sfi, l.sfi_function_data)?;
    let array = h.typed("function data", data, l.type_bytecode_array, "BYTECODE_ARRAY_TYPE")?;
    let frame = JsFrame { function: 0, shared: sfi, bytecode_offset: Some(offset), bytecode_array: Some(array) };
    Ok(current_position(mem, l, &frame)?.map(|(line, _)| line))
}
