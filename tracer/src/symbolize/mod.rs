//! Normalize early, symbolize late: runtime addresses become (module, file offset) pairs while
//! the target is alive ([`maps`]), and names, files and lines are looked up from those
//! afterwards ([`elf`], with [`dwarf`] and [`debuglink`] for debug information and [`perfmap`]
//! for JIT code), so a target that has exited still gets a readable report.

pub mod debuglink;
pub mod dwarf;
pub mod elf;
pub mod maps;
pub(crate) mod mmap;
pub mod perfmap;
pub mod resymbolize;

pub use elf::{FrameKind, SymFrame, Symbolizer, demangle};
pub use maps::{Mapping, MapsError, NormalizedAddr, ProcMaps};
