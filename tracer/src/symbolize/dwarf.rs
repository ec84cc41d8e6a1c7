//! File, line and inlined functions from DWARF (`addr2line`), read from a mapped module or its
//! separate debug file. Units are parsed lazily, on the first lookup that lands in them.

use std::borrow::Cow;

use addr2line::{Context, LookupResult};
use gimli::{EndianSlice, RunTimeEndian};
use object::{Object, ObjectSection};

use super::elf::demangle;
use super::mmap::Mmap;

type Reader = EndianSlice<'static, RunTimeEndian>;

/// One function at an address, innermost first when several are inlined into each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DwarfFrame {
    /// Demangled; None when DWARF has no name for it.
    pub function: Option<String>,
    pub file: Option<String>,
    pub line: Option<u32>,
}

/// The DWARF of one file.
pub struct Dwarf {
    // Field order is drop order: the context borrows from `sections` and `map`.
    context: Context<Reader>,
    /// Sections that were compressed, decompressed.
    _sections: Vec<Box<[u8]>>,
    _map: Mmap,
}

impl std::fmt::Debug for Dwarf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Dwarf { .. }")
    }
}

impl Dwarf {
    /// Reads the DWARF sections of the mapped ELF file; None when it has none usable.
    pub(crate) fn load(map: Mmap) -> Option<Dwarf> {
        // SAFETY: the slices borrowed from `map` (and from `owned`, whose heap buffers do not
        // move when the boxes do) are only held by `context`, which is dropped before both.
        let data: &'static [u8] = unsafe { map.as_static_slice() };
        let file = object::File::parse(data).ok()?;
        let endian = if file.is_little_endian() {
            RunTimeEndian::Little
        } else {
            RunTimeEndian::Big
        };
        let mut owned: Vec<Box<[u8]>> = Vec::new();
        let mut section = |id: gimli::SectionId| -> Result<Reader, gimli::Error> {
            use gimli::SectionId::*;
            // Variable locations, macros and name indexes are not needed for lines and inlined
            // functions; skipping them saves decompressing megabytes of a compressed debug file.
            if matches!(
                id,
                DebugLoc
                    | DebugLocLists
                    | DebugMacinfo
                    | DebugMacro
                    | DebugPubNames
                    | DebugPubTypes
            ) {
                return Ok(EndianSlice::new(&[], endian));
            }
            let bytes: &'static [u8] = match file.section_by_name(id.name()) {
                Some(s) if s.kind() != object::SectionKind::UninitializedData => {
                    match believable(&s).then(|| s.uncompressed_data()) {
                        Some(Ok(Cow::Borrowed(b))) => b,
                        Some(Ok(Cow::Owned(v))) => {
                            let boxed = v.into_boxed_slice();
                            // SAFETY: see above; the box is kept in `owned` for as long as
                            // `context` lives.
                            let b: &'static [u8] =
                                unsafe { std::slice::from_raw_parts(boxed.as_ptr(), boxed.len()) };
                            owned.push(boxed);
                            b
                        }
                        // A section that cannot be decompressed (or claims a size no real
                        // compression gives) is as good as absent.
                        None | Some(Err(_)) => &[],
                    }
                }
                _ => &[],
            };
            Ok(EndianSlice::new(bytes, endian))
        };
        let dwarf = gimli::Dwarf::load(&mut section).ok()?;
        if gimli::Section::reader(&dwarf.debug_info).is_empty() {
            return None;
        }
        let context = Context::from_dwarf(dwarf).ok()?;
        Some(Dwarf {
            context,
            _sections: owned,
            _map: map,
        })
    }

    /// Functions at virtual address `probe`, innermost inlined function first and the function
    /// that holds the code last; each with the line executing in it (for outer functions, the
    /// line of the call into the inner one). Empty when DWARF does not cover the address.
    pub fn frames(&self, probe: u64) -> Vec<DwarfFrame> {
        let mut out = Vec::new();
        // Split DWARF (.dwo) is not followed: the skeleton unit still gives lines.
        let mut iter = match self.context.find_frames(probe) {
            LookupResult::Output(Ok(iter)) => iter,
            LookupResult::Output(Err(_)) => return out,
            LookupResult::Load { .. } => match self.context.find_frames(probe).skip_all_loads() {
                Ok(iter) => iter,
                Err(_) => return out,
            },
        };
        while let Ok(Some(frame)) = iter.next() {
            let function = frame
                .function
                .as_ref()
                .and_then(|f| f.raw_name().ok())
                .map(|name| demangle(&name));
            let (file, line) = match &frame.location {
                Some(loc) => (loc.file.map(str::to_owned), loc.line),
                None => (None, None),
            };
            out.push(DwarfFrame {
                function,
                file,
                line,
            });
        }
        // A lone frame with nothing in it tells nothing.
        if out.len() == 1 && out[0].function.is_none() && out[0].file.is_none() {
            out.clear();
        }
        out
    }
}

/// Most a compressed debug section may claim to grow by. A hostile or corrupt header can claim
/// any size, and the decompressor reserves it up front (the fuzzer asked for 37 PB); zlib
/// cannot expand more than about 1032:1, and real debug sections compress 3-10:1.
const MAX_EXPANSION: u64 = 1100;

/// Refuses a compressed section whose claimed size no real compression gives.
fn believable<'d, S: object::ObjectSection<'d>>(section: &S) -> bool {
    section.compressed_data().is_ok_and(|c| {
        c.format == object::CompressionFormat::None
            || c.uncompressed_size <= (c.data.len() as u64).saturating_mul(MAX_EXPANSION).max(1 << 20)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test binary itself is built with debug info (the workspace's test profile): a
    /// function of this file resolves to this file and the line of its body.
    #[inline(never)]
    fn marker_for_dwarf_test() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn own_function_resolves_to_this_file() {
        use super::super::maps::ProcMaps;
        use object::ObjectSegment;
        assert_eq!(marker_for_dwarf_test(), 7);
        let f: fn() -> u64 = marker_for_dwarf_test;
        let addr = f as usize as u64;
        let maps = ProcMaps::read(std::process::id()).unwrap();
        let n = maps.normalize(addr);
        let module = n.module.unwrap();
        let data = std::fs::read(&module).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let vaddr = file
            .segments()
            .find_map(|s| {
                let (off, size) = s.file_range();
                (off <= n.offset && n.offset < off + size).then(|| n.offset - off + s.address())
            })
            .unwrap();
        let dwarf = Dwarf::load(Mmap::open(std::path::Path::new(&module)).unwrap())
            .expect("the test binary has DWARF");
        let frames = dwarf.frames(vaddr);
        let last = frames.last().expect("a frame");
        assert!(
            last.file
                .as_deref()
                .is_some_and(|f| f.ends_with("symbolize/dwarf.rs")),
            "{frames:?}"
        );
        assert!(
            last.function
                .as_deref()
                .is_some_and(|f| f.ends_with("marker_for_dwarf_test")),
            "{frames:?}"
        );
    }
}

