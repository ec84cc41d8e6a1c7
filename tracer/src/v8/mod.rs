//! Names for JavaScript frames read from a live node process's own memory, with the object
//! layout taken from the node binary's `v8dbg_*` post-mortem metadata.
//!
//! While recording, the BPF stack walker reads the frames ([`capture`]: what it records and
//! the layout it is given) and [`namer`] names each new stack's captures within a tick.
//!
//! Three steps, each usable alone: [`layout`] reads the constants from the binary once;
//! [`frame`] reads the few words of one V8 frame that identify its function (what a stack
//! capture would record); [`resolve`] turns a SharedFunctionInfo into function, script and
//! line. Objects move and die, so every step checks type words and bounds before trusting a
//! pointer and answers with an error rather than a guess; [`resolve_frame`] also re-checks a
//! capture's JSFunction -> SharedFunctionInfo link, so a capture outlived by a compacting GC is
//! refused instead of naming whatever now sits at its address.
//!
//! What the metadata does not give, and where it comes from instead (node 20 / V8 11.3 only;
//! other versions are refused by [`V8Layout::from_elf`] in one line):
//! - ScopeInfo's flag bits, which place a function's name and source positions: a table per
//!   V8 version ([`ScopeInfoLayout::for_version`]), read off this binary's
//!   `ScopeInfo::StartPosition()` code.
//! - The last JSFunction instance type (class constructors are 2081, plain functions 2066):
//!   decoded at load time from the binary's `IsJSFunction_NonInline`.
//! - An external string's characters (node's own module sources): the resource's `data()` is
//!   followed only when its code is a plain field getter.
//!
//! - Where a BytecodeArray keeps its source position table and how a position word packs the
//!   script offset: a table per V8 version ([`SourcePositionLayout::for_version`]), read off
//!   this binary's `AbstractCode::SourcePosition` and `SourcePositionTableIterator` code. With
//!   it, [`current_position`] gives an interpreted frame's line and column being executed,
//!   checked against V8's own `Error().stack` for the same frames.
//!
//! Not applied: a Script's `line_offset` (non-zero only for code compiled with an offset, not
//! node's files; no v8dbg constant gives it).

pub mod capture;
pub mod frame;
mod heap;
pub mod layout;
pub mod memory;
pub mod namer;
pub mod resolve;
#[cfg(test)]
mod tests;

pub use frame::{JsFrame, read_frame};
pub use layout::{MissingConstant, ScopeInfoLayout, SourcePositionLayout, V8Layout};
pub use memory::{CachedMemory, FakeMemory, Memory, ProcessMemory, ReadError};
pub use namer::{JsName, JsNamer};
pub use resolve::{JsFunction, JsIdentity, current_position, resolve_frame, resolve_function};

/// Why a frame or a function could not be read: the frame is not a JS frame, or an object did
/// not check out (moved, freed, or never what the slot was assumed to hold).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum V8Error {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("frame marker {0:#x} in the context slot: a typed V8 frame, not a JavaScript one")]
    TypedFrame(u64),
    #[error("{what} is {value:#x}, not a heap object pointer")]
    NotHeapObject { what: &'static str, value: u64 },
    #[error("{what} at {addr:#x} has a map whose own map is not a Map")]
    BadMap { what: &'static str, addr: u64 },
    #[error("{what} at {addr:#x} has instance type {found}, expected {expected}")]
    WrongType {
        what: &'static str,
        addr: u64,
        found: u16,
        expected: &'static str,
    },
    #[error("{what} is {value:#x}, not a Smi")]
    NotSmi { what: &'static str, value: u64 },
    #[error("{what}: {detail}")]
    Invalid { what: &'static str, detail: String },
    #[error("{0}")]
    Unsupported(String),
}
