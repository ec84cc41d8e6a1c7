//! Finding the C library a process maps and the allocator functions in it.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use tracer_common::AllocKind;

use crate::symbolize::maps::ProcMaps;

/// Allocating functions, by the symbol every backend looks for, and what a probe must read
/// for each. aligned_alloc and memalign are one function in glibc: probe each address once.
pub const ALLOCATORS: &[(&str, AllocKind)] = &[
    ("malloc", AllocKind::Malloc),
    ("calloc", AllocKind::Calloc),
    ("realloc", AllocKind::Realloc),
    ("reallocarray", AllocKind::Reallocarray),
    ("posix_memalign", AllocKind::PosixMemalign),
    ("aligned_alloc", AllocKind::Memalign),
    ("memalign", AllocKind::Memalign),
    ("valloc", AllocKind::Valloc),
    ("pvalloc", AllocKind::Pvalloc),
];
/// A C library without these is not one the tracer knows.
pub const REQUIRED: &[&str] = &["malloc", "calloc", "realloc", "free"];
/// Probed when present.
pub const OPTIONAL: &[&str] = &[
    "reallocarray",
    "posix_memalign",
    "aligned_alloc",
    "memalign",
    "valloc",
    "pvalloc",
];

/// Bytes of each function kept for decoding its start.
/// Enough for the probe placement, the `syscall` in the mmap-family wrappers and the calls in sbrk.
const PROLOGUE_BYTES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LibcError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse ELF {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} has no symbol {symbol}: not a C library this tracer knows")]
    MissingSymbol { path: PathBuf, symbol: &'static str },
}

/// A function of the C library: where it starts in the file, and its first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub file_offset: u64,
    pub prologue: Vec<u8>,
}

/// The C library's path as the target sees it, if it maps one: glibc's `libc.so.6`, or
/// the `libc-2.x.so` of older glibc, or musl's `libc.musl-*.so.1`.
pub fn find_libc(maps: &ProcMaps) -> Option<String> {
    maps.mappings().iter().find_map(|m| {
        let path = m.path.as_deref()?;
        let name = Path::new(path).file_name()?.to_str()?;
        let is_libc = name.starts_with("libc.so")
            || (name.starts_with("libc-") && name.ends_with(".so"))
            || name.starts_with("libc.musl-");
        is_libc.then(|| path.to_owned())
    })
}

/// Looks up `required` and `optional` function names in the ELF file at `path`.
/// Missing optional names are left out of the result; a missing required one is an error.
pub fn functions(
    path: &Path,
    required: &[&'static str],
    optional: &[&'static str],
) -> Result<HashMap<&'static str, Function>, LibcError> {
    let data = std::fs::read(path).map_err(|source| LibcError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = object::File::parse(&*data).map_err(|e| LibcError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let wanted: Vec<&'static str> = required.iter().chain(optional).copied().collect();
    let mut found = HashMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        let Ok(name) = symbol.name() else { continue };
        let Some(&name) = wanted.iter().find(|w| **w == name) else {
            continue;
        };
        if found.contains_key(name) || symbol.address() == 0 {
            continue;
        }
        let Some(section) = symbol.section_index().and_then(|i| file.section_by_index(i).ok())
        else {
            continue;
        };
        let Some((section_offset, section_size)) = section.file_range() else {
            continue;
        };
        let Some(within) = symbol.address().checked_sub(section.address()) else {
            continue;
        };
        if within >= section_size {
            continue;
        }
        let file_offset = section_offset + within;
        let start = file_offset as usize;
        let end = (start + PROLOGUE_BYTES).min(data.len());
        found.insert(
            name,
            Function {
                file_offset,
                prologue: data[start..end].to_vec(),
            },
        );
    }
    if let Some(symbol) = required.iter().find(|r| !found.contains_key(*r)) {
        return Err(LibcError::MissingSymbol {
            path: path.to_owned(),
            symbol,
        });
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

    #[test]
    fn finds_glibc_allocator_at_nm_offsets() {
        let found = functions(Path::new(LIBC), &["malloc", "free"], &["no_such_fn"]).unwrap();
        assert!(!found.contains_key("no_such_fn"));
        // Compare with nm, independent of our ELF reading. glibc's text is mapped at file
        // offset == vaddr, so nm's address is the file offset.
        let nm = std::process::Command::new("nm")
            .args(["-D", "--defined-only", LIBC])
            .output()
            .expect("run nm");
        let nm = String::from_utf8_lossy(&nm.stdout);
        for name in ["malloc", "free"] {
            let want = nm
                .lines()
                .find_map(|l| {
                    let mut it = l.split_whitespace();
                    let (addr, _, sym) = (it.next()?, it.next()?, it.next()?);
                    (sym == name || sym.starts_with(&format!("{name}@@")))
                        .then(|| u64::from_str_radix(addr, 16).unwrap())
                })
                .unwrap();
            assert_eq!(found[name].file_offset, want, "{name}");
            assert_eq!(found[name].prologue.len(), PROLOGUE_BYTES);
        }
    }

    #[test]
    fn missing_required_symbol_is_named() {
        let err = functions(Path::new(LIBC), &["malloc", "no_such_fn"], &[]).unwrap_err();
        assert!(err.to_string().contains("no_such_fn"), "{err}");
    }
}
