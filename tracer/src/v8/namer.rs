//! Names for the V8 frames of captured stacks, resolved from the target's memory soon after
//! each stack first appears: a compacting GC moves the SharedFunctionInfo a capture points at,
//! and may put another one at its address. Each capture's fingerprint is checked against what
//! the address holds now, and the type word by [`resolve_function`]; a capture that fails
//! either stays unnamed and is counted, never guessed.

use std::collections::HashMap;
use std::sync::Arc;

use tracer_common::js_frame;

use super::capture::{Captured, split};
use super::frame::JsFrame;
use super::heap::Heap;
use super::layout::V8Layout;
use super::memory::{CachedMemory, Memory, ProcessMemory};
use super::resolve::{current_position, resolve_function};
use super::V8Error;

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

/// Per stack, the names of its captured V8 frames in order.
pub struct JsNamer {
    layout: V8Layout,
    pid: i32,
    stacks: HashMap<u64, Vec<Option<Arc<JsName>>>>,
    unnamed: u64,
    /// Why captures went unnamed, by kind of error (for `--verbose`-style diagnostics).
    failures: HashMap<&'static str, u64>,
}

impl JsNamer {
    pub fn new(layout: V8Layout, pid: i32) -> JsNamer {
        JsNamer { layout, pid, stacks: HashMap::new(), unnamed: 0, failures: HashMap::new() }
    }

    /// The process is read through another of its threads (the one before exited).
    pub fn set_pid(&mut self, pid: i32) {
        self.pid = pid;
    }

    /// Names the V8 frames of stacks not named yet. Within one call a SharedFunctionInfo is
    /// resolved once; across calls it is resolved again (it may have moved in between).
    pub fn name_stacks<'a>(&mut self, stacks: impl IntoIterator<Item = (u64, &'a [u64])>) {
        let process = ProcessMemory::new(self.pid);
        let mem = CachedMemory::new(&process);
        let mut batch: HashMap<Captured, Result<Option<Arc<JsName>>, ()>> = HashMap::new();
        for (id, words) in stacks {
            if self.stacks.contains_key(&id) || !words.iter().any(|&w| js_frame::is_tagged(w)) {
                continue;
            }
            let mut names = Vec::new();
            for (_, captured) in split(words) {
                let Some(c) = captured else { continue };
                let resolved = batch
                    .entry(c)
                    .or_insert_with(|| match resolve(&mem, &self.layout, &c) {
                        Ok(name) => Ok(name.map(Arc::new)),
                        Err(e) => {
                            *self.failures.entry(failure_kind(&e)).or_default() += 1;
                            Err(())
                        }
                    })
                    .clone();
                // A builtin's own function (no script) keeps the builtin's name.
                if resolved.is_err() {
                    self.unnamed += 1;
                }
                names.push(resolved.ok().flatten());
            }
            self.stacks.insert(id, names);
        }
    }

    /// The names of stack `id`'s captured frames, in order (None: not named yet).
    pub fn names_of(&self, id: u64) -> Option<&[Option<Arc<JsName>>]> {
        self.stacks.get(&id).map(Vec::as_slice)
    }

    /// Stacks whose V8 frames were named (or tried).
    pub fn stacks_named(&self) -> usize {
        self.stacks.len()
    }

    /// Captured frames (one per stack they appear in) that could not be named.
    pub fn unnamed(&self) -> u64 {
        self.unnamed
    }

    /// Why, by kind, most frequent first.
    pub fn failures(&self) -> Vec<(&'static str, u64)> {
        let mut v: Vec<_> = self.failures.iter().map(|(k, v)| (*k, *v)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        v
    }
}

fn failure_kind(e: &V8Error) -> &'static str {
    match e {
        V8Error::Read(_) => "unreadable",
        V8Error::TypedFrame(_) => "not JavaScript frames",
        V8Error::NotHeapObject { .. } | V8Error::BadMap { .. } | V8Error::WrongType { .. } => {
            "no longer a function (moved or freed by V8)"
        }
        V8Error::Invalid { what: "captured SharedFunctionInfo", .. } => "another function at the address (moved by a GC)",
        V8Error::NotSmi { .. } | V8Error::Invalid { .. } => "inconsistent objects",
        V8Error::Unsupported(_) => "unsupported",
    }
}

/// Names one capture: the address must still hold a SharedFunctionInfo with the captured
/// fingerprint. `Ok(None)`: a function of V8's own builtins (no script: `apply`, `forEach`),
/// whose frame the builtin's symbol already names.
pub fn resolve<M: Memory + ?Sized>(mem: &M, l: &V8Layout, c: &Captured) -> Result<Option<JsName>, V8Error> {
    let a = mem.read_u64(c.sfi + l.sfi_length)?;
    let b = mem.read_u64(c.sfi + l.sfi_length + 8)?;
    if js_frame::fingerprint(a, b) != c.fingerprint {
        return Err(V8Error::Invalid {
            what: "captured SharedFunctionInfo",
            detail: format!("{:#x} holds another object now (moved by a GC)", c.sfi),
        });
    }
    let h = Heap::new(mem, l);
    let sfi = h.typed(
        "SharedFunctionInfo",
        c.sfi + l.heap_object_tag,
        l.type_shared_function_info,
        "SHARED_FUNCTION_INFO_TYPE",
    )?;
    let (_, script_type) = h.object("SharedFunctionInfo's script", h.field(sfi, l.sfi_script_or_debug_info)?)?;
    if script_type == l.type_oddball {
        return Ok(None);
    }
    let f = resolve_function(mem, l, c.sfi)?;
    let current_line = match c.bytecode_offset {
        Some(offset) => current_line(mem, l, c.sfi, offset).ok().flatten(),
        None => None,
    };
    Ok(Some(JsName {
        function: if f.name.is_empty() { "(anonymous)".to_owned() } else { f.name },
        script: f.script,
        line: f.line,
        column: f.column,
        current_line,
    }))
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
