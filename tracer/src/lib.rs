//! tracer: which native call stacks hold the memory a process allocated and did not free.
//!
//! The flow is one way: `probe` (backends that attach to a process and produce snapshots)
//! -> `aggregate` (normalize and rank stacks) -> `symbolize` (names for frames) -> `report`
//! (text, JSON). `recording` attaches and keeps the session, `record` reports on it, `top`
//! shows it live; `target` finds and launches processes. `unwind` holds the stack walker's
//! tables and its user-space twin. `v8` names JavaScript frames from a
//! live node process's own memory (not yet used by the stack walker).
pub mod aggregate;
pub mod diag;
pub mod diff;
pub mod fuzzing;
pub mod inject;
pub mod mallocstats;
pub mod memmap;
pub mod options;
pub mod output;
pub mod pagemap;
pub mod probe;
pub mod record;
pub mod recording;
pub mod regions;
pub mod report;
pub mod symbolize;
pub mod target;
pub mod top;
pub mod unwind;
pub mod v8;
