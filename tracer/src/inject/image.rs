//! What a loader needs from the sampler's shared object, and the proof that it needs nothing
//! else: a pure function from ELF bytes to segments and symbol offsets, which refuses an object
//! with imports, TLS, initialisers or symbolic relocations. tracer's build script runs it on
//! every build of the sampler (so a build that breaks a rule fails), and the loaders run it
//! again on the embedded bytes.

use object::{
    Endianness, Object, ObjectSymbol, SymbolKind,
    elf::{self, FileHeader64, ProgramHeader64},
    read::elf::{Dyn, ElfFile64, FileHeader, ProgramHeader, Rela},
};
use tracer_common::sampler::{
    ALLOC_SITE_SYMBOL, CONTROL_SYMBOL, Control, FREE_SITE_SYMBOL, HOOKS, Hook, MAGIC,
    RING_MEMFD_NAME, RING_NAME_SYMBOL, VERSION,
};

/// Why the sampler's object cannot be loaded as it is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("sampler object: not a 64-bit x86 ELF shared object")]
    NotSharedObject(#[source] Option<object::Error>),
    #[error("sampler object: {0}")]
    Malformed(&'static str),
    #[error("sampler object: {0}")]
    Forbidden(String),
    #[error("sampler object: symbol {0} is missing, or not a sized {1}")]
    MissingSymbol(String, &'static str),
}

/// A PT_LOAD segment: `file_size` bytes from `offset` in the file at `vaddr` from the load base,
/// zero up to `mem_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub vaddr: u64,
    pub mem_size: u64,
    pub offset: u64,
    pub file_size: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

/// The loadable view of the sampler: every address is an offset from the load base.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SamplerImage {
    pub segments: Vec<Segment>,
    /// Bytes to reserve from the base: the end of the last segment, rounded up to a page.
    pub span: u64,
    /// The control block ([`CONTROL_SYMBOL`]).
    pub control: u64,
    /// The hooks, by [`Hook`].
    pub hooks: [u64; HOOKS],
    pub alloc_site: u64,
    pub free_site: u64,
    /// The ring's memfd name, NUL-terminated ([`RING_NAME_SYMBOL`]).
    pub ring_name: u64,
    /// `R_X86_64_RELATIVE` relocations, (offset, addend): the word at `offset` becomes base +
    /// addend. The only kind allowed; today's build has none.
    pub relative: Vec<(u64, u64)>,
}

pub const PAGE: u64 = 4096;

/// `push %rbp`.
const PUSH_RBP: u8 = 0x55;

impl SamplerImage {
    pub fn parse(data: &[u8]) -> Result<SamplerImage, ImageError> {
        let file = ElfFile64::<Endianness>::parse(data)
            .map_err(|e| ImageError::NotSharedObject(Some(e)))?;
        let endian = file.endian();
        let header: &FileHeader64<Endianness> = file.elf_header();
        if header.e_type(endian) != elf::ET_DYN || header.e_machine(endian) != elf::EM_X86_64 {
            return Err(ImageError::NotSharedObject(None));
        }
        let phdrs: &[ProgramHeader64<Endianness>] = file.elf_program_headers();
        let mut segments = Vec::new();
        let mut dynamic = None;
        for ph in phdrs {
            match ph.p_type(endian) {
                elf::PT_LOAD => {
                    let flags = ph.p_flags(endian);
                    let seg = Segment {
                        vaddr: ph.p_vaddr(endian),
                        mem_size: ph.p_memsz(endian),
                        offset: ph.p_offset(endian),
                        file_size: ph.p_filesz(endian),
                        read: flags & elf::PF_R != 0,
                        write: flags & elf::PF_W != 0,
                        exec: flags & elf::PF_X != 0,
                    };
                    if seg.write && seg.exec {
                        return Err(ImageError::Forbidden(format!(
                            "segment at {:#x} is writable and executable",
                            seg.vaddr
                        )));
                    }
                    if seg.file_size > seg.mem_size
                        || seg
                            .offset
                            .checked_add(seg.file_size)
                            .is_none_or(|end| end > data.len() as u64)
                        || seg.vaddr % PAGE != seg.offset % PAGE
                    {
                        return Err(ImageError::Malformed(
                            "a PT_LOAD segment lies outside the file",
                        ));
                    }
                    segments.push(seg);
                }
                elf::PT_TLS => {
                    return Err(ImageError::Forbidden("it has thread-local storage".into()));
                }
                elf::PT_INTERP => {
                    return Err(ImageError::Forbidden(
                        "it names a program interpreter".into(),
                    ));
                }
                elf::PT_DYNAMIC => {
                    dynamic = ph
                        .dynamic(endian, data)
                        .map_err(|_| ImageError::Malformed("bad PT_DYNAMIC"))?;
                }
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(ImageError::Malformed("no PT_LOAD segment"));
        }
        let end = segments
            .iter()
            .map(|s| s.vaddr + s.mem_size)
            .max()
            .unwrap_or(0);
        let span = end.div_ceil(PAGE) * PAGE;

        let relative = relocations(data, endian, &segments, dynamic.unwrap_or(&[]))?;

        // Every dynamic symbol is a definition: nothing to look up in another object.
        for sym in file.dynamic_symbols() {
            if sym.is_undefined() {
                return Err(ImageError::Forbidden(format!(
                    "it imports {}",
                    sym.name().unwrap_or("a symbol")
                )));
            }
        }
        let find = |name: &str, kind: SymbolKind, what: &'static str| {
            file.dynamic_symbols()
                .find(|s| s.name() == Ok(name) && s.kind() == kind && s.size() > 0)
                .map(|s| (s.address(), s.size()))
                .ok_or_else(|| ImageError::MissingSymbol(name.into(), what))
        };
        let (control, control_size) = find(CONTROL_SYMBOL, SymbolKind::Data, "data object")?;
        if control_size != core::mem::size_of::<Control>() as u64 || control % 64 != 0 {
            return Err(ImageError::Forbidden(format!(
                "{CONTROL_SYMBOL} has {control_size} bytes at {control:#x}, want {} aligned to 64 \
                 (built from another tracer-common?)",
                core::mem::size_of::<Control>()
            )));
        }
        // The block must come from the file (not .bss) and say what it is, so that an attach
        // can recognise a sampler left behind by reading it.
        let initial = segments
            .iter()
            .find(|s| {
                s.write && control >= s.vaddr && control + control_size <= s.vaddr + s.file_size
            })
            .map(|s| &data[(s.offset + control - s.vaddr) as usize..][..16])
            .ok_or(ImageError::Malformed(
                "the control block is not in a writable file-backed segment",
            ))?;
        let magic = u64::from_le_bytes(initial[..8].try_into().expect("8 bytes"));
        let version = u32::from_le_bytes(initial[8..12].try_into().expect("4 bytes"));
        if magic != MAGIC || version != VERSION {
            return Err(ImageError::Forbidden(format!(
                "{CONTROL_SYMBOL} starts with magic {magic:#x} version {version}"
            )));
        }

        let mut functions = Vec::new();
        let mut hooks = [0u64; HOOKS];
        for h in Hook::ALL {
            let f = find(h.symbol(), SymbolKind::Text, "function")?;
            hooks[h as usize] = f.0;
            functions.push((h.symbol(), f));
        }
        let (ring_name, ring_name_size) = find(RING_NAME_SYMBOL, SymbolKind::Data, "data object")?;
        if ring_name_size != RING_MEMFD_NAME.len() as u64 + 1 {
            return Err(ImageError::Forbidden(format!(
                "{RING_NAME_SYMBOL} has {ring_name_size} bytes, want {}",
                RING_MEMFD_NAME.len() + 1
            )));
        }
        let alloc = find(ALLOC_SITE_SYMBOL, SymbolKind::Text, "function")?;
        let free = find(FREE_SITE_SYMBOL, SymbolKind::Text, "function")?;
        // The probe sites are where uprobes go: each must be its own code, shared with nothing.
        for (name, (addr, size)) in [(ALLOC_SITE_SYMBOL, alloc), (FREE_SITE_SYMBOL, free)] {
            let overlap = functions
                .iter()
                .find(|(_, (a, s))| *a < addr + size && addr < a + s);
            if let Some((other, _)) = overlap {
                return Err(ImageError::Forbidden(format!(
                    "probe site {name} overlaps {other}"
                )));
            }
            functions.push((name, (addr, size)));
        }
        // A uprobe on `push %rbp` is emulated (a trap, no single step) and is the one place
        // where the kernel adds the caller to a stack captured at an entry.
        for (name, (addr, _)) in [(ALLOC_SITE_SYMBOL, alloc), (FREE_SITE_SYMBOL, free)] {
            let first = segments
                .iter()
                .find(|s| s.exec && addr >= s.vaddr && addr < s.vaddr + s.file_size)
                .map(|s| data[(s.offset + addr - s.vaddr) as usize]);
            if first != Some(PUSH_RBP) {
                return Err(ImageError::Forbidden(format!(
                    "probe site {name} does not start with push %rbp (first byte {first:x?})"
                )));
            }
        }
        let in_exec = |addr: u64| {
            segments
                .iter()
                .any(|s| s.exec && addr >= s.vaddr && addr < s.vaddr + s.file_size)
        };
        if let Some((name, _)) = functions.iter().find(|(_, (a, _))| !in_exec(*a)) {
            return Err(ImageError::Forbidden(format!(
                "{name} is not in executable code"
            )));
        }
        // Code that can panic would end in the panic handler, which stops the process: the
        // sampler must have no such path (when the object keeps its symbol table, which says).
        if let Some(sym) = file.symbols().find(|s| {
            s.name()
                .is_ok_and(|n| n.contains("panic") || n == "rust_begin_unwind")
        }) {
            return Err(ImageError::Forbidden(format!(
                "it can panic: it contains {}",
                sym.name().unwrap_or("a panic function")
            )));
        }
        Ok(SamplerImage {
            segments,
            span,
            control,
            hooks,
            alloc_site: alloc.0,
            free_site: free.0,
            ring_name,
            relative,
        })
    }
}

/// Packed relative relocations (object 0.37 does not name the tag).
const DT_RELR: u32 = 36;

/// The dynamic relocations, which must all be relative; and no initialisers of any kind.
fn relocations(
    data: &[u8],
    endian: Endianness,
    segments: &[Segment],
    dynamic: &[<FileHeader64<Endianness> as FileHeader>::Dyn],
) -> Result<Vec<(u64, u64)>, ImageError> {
    let (mut rela, mut rela_size) = (None, 0u64);
    for d in dynamic {
        let tag = d.d_tag(endian) as u32;
        let val = d.d_val(endian);
        match tag {
            elf::DT_NULL => break,
            elf::DT_RELA => rela = Some(val),
            elf::DT_RELASZ => rela_size = val,
            elf::DT_NEEDED => return Err(ImageError::Forbidden("it needs another library".into())),
            elf::DT_INIT
            | elf::DT_FINI
            | elf::DT_INIT_ARRAY
            | elf::DT_FINI_ARRAY
            | elf::DT_PREINIT_ARRAY => {
                return Err(ImageError::Forbidden(
                    "it has initialisers or finalisers".into(),
                ));
            }
            elf::DT_TEXTREL => {
                return Err(ImageError::Forbidden("it relocates its code".into()));
            }
            elf::DT_REL | elf::DT_JMPREL | DT_RELR => {
                return Err(ImageError::Forbidden(
                    "it has REL, RELR or PLT relocations (only RELA relative ones are applied)"
                        .into(),
                ));
            }
            _ => {}
        }
    }
    let Some(rela) = rela else {
        return Ok(Vec::new());
    };
    let seg = segments
        .iter()
        .find(|s| rela >= s.vaddr && rela + rela_size <= s.vaddr + s.file_size)
        .ok_or(ImageError::Malformed("DT_RELA outside the file"))?;
    let start = (seg.offset + rela - seg.vaddr) as usize;
    let entries: &[elf::Rela64<Endianness>] =
        object::pod::slice_from_all_bytes(&data[start..start + rela_size as usize])
            .map_err(|_| ImageError::Malformed("DT_RELASZ is not a whole number of entries"))?;
    let mut relative = Vec::new();
    for r in entries {
        let (ty, sym) = (r.r_type(endian, false), r.r_sym(endian, false));
        if sym != 0 || ty != elf::R_X86_64_RELATIVE {
            return Err(ImageError::Forbidden(format!(
                "it has a relocation of type {ty} against symbol {sym} at {:#x}",
                r.r_offset(endian)
            )));
        }
        let offset = r.r_offset(endian);
        if !segments
            .iter()
            .any(|s| s.write && offset >= s.vaddr && offset + 8 <= s.vaddr + s.mem_size)
        {
            return Err(ImageError::Malformed(
                "a relocation outside the writable segments",
            ));
        }
        relative.push((offset, r.r_addend(endian) as u64));
    }
    Ok(relative)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inject::sampler::sampler_so;

    /// The embedded object, copied into an 8-aligned buffer that a test may change.
    fn copy() -> (Vec<u64>, usize) {
        let bytes = sampler_so();
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: the buffer holds at least bytes.len() bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                words.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            )
        };
        (words, bytes.len())
    }

    fn bytes_mut(words: &mut [u64], len: usize) -> &mut [u8] {
        // SAFETY: the words' bytes, of which the first `len` are the object.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
    }

    #[test]
    fn an_ordinary_library_is_refused() {
        let libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").expect("read libc");
        let err = SamplerImage::parse(&libc).expect_err("libc is not a sampler");
        assert!(
            matches!(
                err,
                ImageError::Forbidden(_) | ImageError::MissingSymbol(..)
            ),
            "{err}"
        );
    }

    #[test]
    fn a_sampler_with_another_layout_or_a_moved_probe_site_is_refused() {
        let good = SamplerImage::parse(sampler_so()).expect("the embedded sampler parses");
        let control_offset = good
            .segments
            .iter()
            .find(|s| s.write && good.control >= s.vaddr && good.control < s.vaddr + s.file_size)
            .map(|s| (s.offset + good.control - s.vaddr) as usize)
            .expect("the block is in the file");
        let (mut words, len) = copy();
        bytes_mut(&mut words, len)[control_offset + 8] ^= 0xff;
        let err = SamplerImage::parse(bytes_mut(&mut words, len)).expect_err("version changed");
        assert!(err.to_string().contains("magic"), "{err}");

        let site_offset = good
            .segments
            .iter()
            .find(|s| {
                s.exec && good.alloc_site >= s.vaddr && good.alloc_site < s.vaddr + s.file_size
            })
            .map(|s| (s.offset + good.alloc_site - s.vaddr) as usize)
            .expect("the site is in the file");
        let (mut words, len) = copy();
        bytes_mut(&mut words, len)[site_offset] = 0x90;
        let err = SamplerImage::parse(bytes_mut(&mut words, len)).expect_err("site changed");
        assert!(err.to_string().contains("push %rbp"), "{err}");
    }
}
