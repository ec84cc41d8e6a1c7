//! Normalize early, symbolize late: runtime addresses become (module, file offset) pairs while
//! the target is alive ([`maps`]), and function names are looked up from those afterwards
//! ([`elf`]), so a target that has exited still gets a readable report.

pub mod elf;
pub mod maps;

pub use elf::{FrameKind, SymFrame, Symbolizer, demangle};
pub use maps::{Mapping, MapsError, NormalizedAddr, ProcMaps};
