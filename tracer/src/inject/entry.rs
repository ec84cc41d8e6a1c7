//! Planning to redirect a function's entry to a hook: which whole instructions a jump written
//! at the entry displaces, whether they can safely run elsewhere, and their relocated copy.
//!
//! Pure analysis of the function's bytes, so it runs and is tested without ptrace or root.
//! The checks, for a jump that displaces the first `displaced_len` bytes:
//! - every displaced instruction can run at another address: no call, return, system call,
//!   interrupt or transaction; a RIP-relative operand or a branch leaving the displaced bytes
//!   is re-encoded for its new address (as the ptrace backend's `xol` does for one instruction);
//!   a branch or an address that points back into the displaced bytes is refused;
//! - no branch and no RIP-relative address anywhere in the function (decoded linearly over its
//!   symbol's size; an undecodable byte refuses the whole function) points strictly inside the
//!   displaced bytes: such a place no longer holds the instruction it held. Pointing at the
//!   entry itself is fine: it now leads to the hook, as a call would;
//! - no other symbol (aliases at the entry are fine) starts strictly inside the displaced
//!   bytes: it would be an alternate entry point.
//!
//! Residual risk, not checked: a branch from *another* function into this one's first bytes.
//! Finding one would mean decoding all of the library's text. Compilers enter a function at
//! its symbol; code shared between functions (a tail-merged or cold part) is usually a
//! symbol of its own in `.symtab` (glibc's `_mid_memalign.constprop.0`), which the third check
//! sees when the debug file is there. Measured once with objdump over all of glibc 2.36's `.text` (Debian 12): the only
//! direct branches or RIP-relative references that land strictly inside an allocator's
//! displaced range are valloc's and pvalloc's own jumps back to their entry + 13, which the
//! second check refuses for the 14-byte jump.
use std::path::{Path, PathBuf};

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, Mnemonic,
};
use object::{Object as _, ObjectSection as _, ObjectSymbol, SymbolKind, SymbolSection};

/// Where separate debug files (Debian's `*-dbg` packages) are found by build id.
const DEBUG_ROOT: &str = "/usr/lib/debug/.build-id";

/// `int3`: what fills the displaced bytes after the jump. See [`Plan::patch`].
pub const INT3: u8 = 0xcc;
/// The first byte of `jmp rel32`, the patch an entry gets.
pub const JMP_REL32: u8 = 0xe9;

/// The jump written at the entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Jump {
    /// `jmp rel32`, 5 bytes: the hook must lie within ±2 GiB of the entry.
    Rel32,
    /// `jmp [rip+0]` followed by the hook's 64-bit address, 14 bytes: reaches anywhere.
    Absolute,
}

impl Jump {
    /// Bytes the jump occupies, the least the patch displaces.
    pub const fn size(self) -> usize {
        match self {
            Jump::Rel32 => 5,
            Jump::Absolute => 14,
        }
    }
}

/// A symbol's name and start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Symbol {
    pub name: String,
    pub address: u64,
}

/// Which symbol table the alias and inner-symbol checks saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SymbolSource {
    /// The library's own `.symtab` (with `.dynsym`).
    Symtab,
    /// The `.symtab` of its separate debug file, found by build id (with `.dynsym`).
    DebugFile(PathBuf),
    /// Only `.dynsym`: local symbols are unknown, so the inner-symbol check is weaker.
    Dynsym,
}

/// A function to patch: its bytes and the symbols around it, all at addresses of one address
/// space (the file's virtual addresses from [`function`]; [`Function::at`] moves it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    /// Address of the first byte.
    pub address: u64,
    /// The whole function, as long as its symbol's size says.
    pub bytes: Vec<u8>,
    /// Other names at the same address (`__libc_malloc` for `malloc`; `memalign` for
    /// `aligned_alloc`): one function, to be patched once.
    pub aliases: Vec<String>,
    /// Symbols that start strictly inside the function.
    pub inner_symbols: Vec<Symbol>,
    pub symbols_from: SymbolSource,
}

impl Function {
    /// The same function with its first byte at `address` (the library's load bias added), so
    /// a plan's relocated copies keep their targets in the process that runs them.
    pub fn at(&self, address: u64) -> Function {
        let shift = |a: u64| a.wrapping_sub(self.address).wrapping_add(address);
        Function {
            address,
            inner_symbols: self
                .inner_symbols
                .iter()
                .map(|s| Symbol {
                    name: s.name.clone(),
                    address: shift(s.address),
                })
                .collect(),
            ..self.clone()
        }
    }
}

/// What the patch displaces, ready to be relocated by [`trampoline`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The function's name, for messages.
    pub function: String,
    /// Address of the entry.
    pub start: u64,
    pub jump: Jump,
    /// Bytes of whole instructions the jump covers: at least `jump.size()`.
    pub displaced_len: usize,
    /// The displaced instructions, decoded at their original addresses.
    pub instructions: Vec<Instruction>,
    /// The displaced bytes as planned from: what restoring writes back. Planned from the
    /// file, they must equal the live bytes before anything is written.
    pub original: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parse ELF {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path} defines no function {name}")]
    NoSymbol { path: PathBuf, name: String },
    #[error(
        "{name} in {path} is a GNU indirect function: its symbol is the resolver, not the code that runs"
    )]
    Ifunc { path: PathBuf, name: String },
    #[error("{name} in {path} has no size in its symbol: cannot tell where the function ends")]
    NoSize { path: PathBuf, name: String },
    #[error("{name} in {path} has no bytes in the file at {address:#x}")]
    NoBytes {
        path: PathBuf,
        name: String,
        address: u64,
    },
    #[error("{name} is {size} bytes long, shorter than the {need}-byte jump")]
    TooShort {
        name: String,
        size: usize,
        need: usize,
    },
    #[error("{name} already starts with a jump{}: patched by another tool or left by an earlier session", target_text(*.target))]
    AlreadyPatched { name: String, target: Option<u64> },
    #[error("{name} has a breakpoint at {at:#x}: a debugger or a uprobe is attached there")]
    Breakpoint { name: String, at: u64 },
    #[error("{name} has bytes at {at:#x} that do not decode as an instruction")]
    Invalid { name: String, at: u64 },
    #[error("{name}: the displaced instruction at {at:#x} ({what}) cannot run at another address")]
    Unrelocatable { name: String, at: u64, what: String },
    #[error(
        "{name}: the instruction at {from:#x} points to {target:#x}, inside the {len} bytes the jump displaces"
    )]
    IntoDisplaced {
        name: String,
        from: u64,
        target: u64,
        len: usize,
    },
    #[error(
        "{name}: symbol {symbol} starts at {at:#x}, inside the {len} bytes the jump displaces: an alternate entry point"
    )]
    SymbolInDisplaced {
        name: String,
        symbol: String,
        at: u64,
        len: usize,
    },
    #[error("{name}: the hook at {hook:#x} is out of reach of a 5-byte jump from {start:#x}")]
    HookOutOfReach { name: String, start: u64, hook: u64 },
    #[error("{name}: re-encode the displaced instructions to run at {at:#x}: {message}")]
    Encode {
        name: String,
        at: u64,
        message: String,
    },
}

fn target_text(target: Option<u64>) -> String {
    target.map(|t| format!(" to {t:#x}")).unwrap_or_default()
}

/// A library read once for planning: its bytes, and the symbols that mark places in it (from
/// its `.symtab`, else its debug file under `/usr/lib/debug/.build-id`, else `.dynsym` only),
/// so that planning several of its functions reads the files once, not once per function.
pub struct Library {
    path: PathBuf,
    data: Vec<u8>,
    symbols: Vec<Symbol>,
    symbols_from: SymbolSource,
}

impl Library {
    pub fn open(library: &Path) -> Result<Library, EntryError> {
        let data = std::fs::read(library).map_err(|source| EntryError::Read {
            path: library.to_owned(),
            source,
        })?;
        let file = object::File::parse(&*data).map_err(|e| EntryError::Parse {
            path: library.to_owned(),
            message: e.to_string(),
        })?;
        let mut symbols = Vec::new();
        collect_symbols(file.dynamic_symbols(), &mut symbols);
        let symbols_from = if file.symbols().next().is_some() {
            collect_symbols(file.symbols(), &mut symbols);
            SymbolSource::Symtab
        } else if let Some(path) = debug_file(&file)
            && let Ok(debug_data) = std::fs::read(&path)
            && let Ok(debug) = object::File::parse(&*debug_data)
        {
            collect_symbols(debug.symbols(), &mut symbols);
            SymbolSource::DebugFile(path)
        } else {
            SymbolSource::Dynsym
        };
        Ok(Library {
            path: library.to_owned(),
            data,
            symbols,
            symbols_from,
        })
    }

    /// Reads function `name`: its address (the file's virtual address), its bytes over its
    /// symbol's size, its aliases and the symbols starting inside it
    /// ([`Function::symbols_from`] says where local symbols came from).
    pub fn function(&self, name: &str) -> Result<Function, EntryError> {
        let library = &self.path;
        let file = object::File::parse(&*self.data).map_err(|e| EntryError::Parse {
            path: library.to_owned(),
            message: e.to_string(),
        })?;
        let symbol = file
            .dynamic_symbols()
            .chain(file.symbols())
            .find(|s| s.name() == Ok(name) && s.kind() == SymbolKind::Text && !s.is_undefined())
            .ok_or_else(|| EntryError::NoSymbol {
                path: library.to_owned(),
                name: name.to_owned(),
            })?;
        if let object::SymbolFlags::Elf { st_info, .. } = symbol.flags()
            && st_info & 0xf == object::elf::STT_GNU_IFUNC
        {
            return Err(EntryError::Ifunc {
                path: library.to_owned(),
                name: name.to_owned(),
            });
        }
        let (address, size) = (symbol.address(), symbol.size());
        if size == 0 {
            return Err(EntryError::NoSize {
                path: library.to_owned(),
                name: name.to_owned(),
            });
        }
        let bytes = symbol
            .section_index()
            .and_then(|i| file.section_by_index(i).ok())
            .and_then(|s| s.data_range(address, size).ok().flatten())
            .ok_or_else(|| EntryError::NoBytes {
                path: library.to_owned(),
                name: name.to_owned(),
                address,
            })?
            .to_vec();

        let mut aliases: Vec<String> = Vec::new();
        let mut inner_symbols: Vec<Symbol> = Vec::new();
        for s in &self.symbols {
            if s.address == address {
                if s.name != name && !aliases.contains(&s.name) {
                    aliases.push(s.name.clone());
                }
            } else if s.address > address && s.address < address + size && !inner_symbols.contains(s) {
                inner_symbols.push(s.clone());
            }
        }
        Ok(Function {
            name: name.to_owned(),
            address,
            bytes,
            aliases,
            inner_symbols,
            symbols_from: self.symbols_from.clone(),
        })
    }
}

/// [`Library::function`] of the library at `library`, read for this one function.
pub fn function(library: &Path, name: &str) -> Result<Function, EntryError> {
    Library::open(library)?.function(name)
}

/// Symbols that mark a place in the address space: not sections, files, thread-local offsets
/// or absolute values.
fn collect_symbols<'d, S: ObjectSymbol<'d>>(from: impl Iterator<Item = S>, out: &mut Vec<Symbol>) {
    for s in from {
        if matches!(
            s.kind(),
            SymbolKind::Section | SymbolKind::File | SymbolKind::Tls
        ) || !matches!(s.section(), SymbolSection::Section(_))
        {
            continue;
        }
        match s.name() {
            Ok(name) if !name.is_empty() => out.push(Symbol {
                name: name.to_owned(),
                address: s.address(),
            }),
            _ => {}
        }
    }
}

pub(crate) fn debug_file(file: &object::File) -> Option<PathBuf> {
    let id = file.build_id().ok()??;
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    let (dir, rest) = hex.split_at_checked(2)?;
    let path = Path::new(DEBUG_ROOT)
        .join(dir)
        .join(format!("{rest}.debug"));
    path.is_file().then_some(path)
}

/// Plans a `jump` at `function`'s entry: decodes the whole instructions it displaces and checks
/// (see the module's comment) that they can run elsewhere and that nothing else enters them.
pub fn plan(function: &Function, jump: Jump) -> Result<Plan, EntryError> {
    let name = &function.name;
    let start = function.address;
    let need = jump.size();

    let mut decoder = Decoder::with_ip(64, &function.bytes, start, DecoderOptions::NONE);
    if decoder.can_decode() {
        let first = decoder.decode();
        if first.mnemonic() == Mnemonic::Jmp {
            return Err(EntryError::AlreadyPatched {
                name: name.clone(),
                target: jump_target(&first, &function.bytes, start),
            });
        }
    }
    if function.bytes.len() < need {
        return Err(EntryError::TooShort {
            name: name.clone(),
            size: function.bytes.len(),
            need,
        });
    }

    let mut all = Vec::new();
    let mut decoder = Decoder::with_ip(64, &function.bytes, start, DecoderOptions::NONE);
    while decoder.can_decode() {
        let insn = decoder.decode();
        if insn.is_invalid() {
            return Err(EntryError::Invalid {
                name: name.clone(),
                at: insn.ip(),
            });
        }
        all.push(insn);
    }
    // The decoded instructions cover every byte (a cut-off last one decodes as invalid), and
    // there are at least `need` bytes: the loop ends inside `all`.
    let (mut count, mut displaced_len) = (0, 0);
    while displaced_len < need {
        displaced_len += all[count].len();
        count += 1;
    }
    let end = start + displaced_len as u64;

    for insn in &all[..count] {
        if insn.code() == Code::Int3 {
            return Err(EntryError::Breakpoint {
                name: name.clone(),
                at: insn.ip(),
            });
        }
        match insn.flow_control() {
            FlowControl::Next
            | FlowControl::ConditionalBranch
            | FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch => {}
            _ => {
                return Err(EntryError::Unrelocatable {
                    name: name.clone(),
                    at: insn.ip(),
                    what: format!("{:?}", insn.mnemonic()).to_lowercase(),
                });
            }
        }
        // Relocated, it would still point at the original place, which now holds the jump.
        if let Some(target) = pointed_at(insn).filter(|t| (start..end).contains(t)) {
            return Err(EntryError::IntoDisplaced {
                name: name.clone(),
                from: insn.ip(),
                target,
                len: displaced_len,
            });
        }
    }
    if let Some(s) = function
        .inner_symbols
        .iter()
        .find(|s| s.address > start && s.address < end)
    {
        return Err(EntryError::SymbolInDisplaced {
            name: name.clone(),
            symbol: s.name.clone(),
            at: s.address,
            len: displaced_len,
        });
    }
    for insn in &all[count..] {
        if let Some(target) = pointed_at(insn).filter(|t| *t > start && *t < end) {
            return Err(EntryError::IntoDisplaced {
                name: name.clone(),
                from: insn.ip(),
                target,
                len: displaced_len,
            });
        }
    }

    Ok(Plan {
        function: name.clone(),
        start,
        jump,
        displaced_len,
        instructions: all[..count].to_vec(),
        original: function.bytes[..displaced_len].to_vec(),
    })
}

/// Where an instruction sends control or takes an address of: a direct branch's target
/// (calls and `xbegin` included) or a RIP-relative operand's address (`lea` of a label may
/// feed an indirect jump).
fn pointed_at(insn: &Instruction) -> Option<u64> {
    match insn.near_branch_target() {
        0 if insn.is_ip_rel_memory_operand() => Some(insn.ip_rel_memory_address()),
        0 => None,
        target => Some(target),
    }
}

/// The destination of a jump found at an entry, when it can be told from the bytes: a direct
/// jump's target, or the address stored after a `jmp [rip+0]`.
fn jump_target(jmp: &Instruction, bytes: &[u8], start: u64) -> Option<u64> {
    match jmp.near_branch_target() {
        0 if jmp.is_ip_rel_memory_operand() => {
            let at = usize::try_from(jmp.ip_rel_memory_address().checked_sub(start)?).ok()?;
            let slot = bytes.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(slot.try_into().ok()?))
        }
        0 => None,
        target => Some(target),
    }
}

/// The displaced instructions re-encoded to run at `at`, followed by a jump back to the first
/// instruction after them. RIP-relative operands and branches keep their absolute targets;
/// a far `at` is fine for branches (the encoder lengthens them) but not for a RIP-relative
/// memory operand more than 2 GiB away, which is an error.
pub fn trampoline(plan: &Plan, at: u64) -> Result<Vec<u8>, EntryError> {
    let encode_error = |message: String| EntryError::Encode {
        name: plan.function.clone(),
        at,
        message,
    };
    let back = Instruction::with_branch(Code::Jmp_rel32_64, plan.start + plan.displaced_len as u64)
        .map_err(|e| encode_error(e.to_string()))?;
    let mut instructions = plan.instructions.clone();
    instructions.push(back);
    BlockEncoder::encode(
        64,
        InstructionBlock::new(&instructions, at),
        BlockEncoderOptions::NONE,
    )
    .map(|r| r.code_buffer)
    .map_err(|e| encode_error(e.to_string()))
}

/// `jmp rel32` from `start` to `hook`, or `None` if the hook is beyond ±2 GiB.
pub fn patch_bytes(start: u64, hook: u64) -> Option<[u8; 5]> {
    let rel = i32::try_from(hook.wrapping_sub(start.wrapping_add(5)) as i64).ok()?;
    let mut bytes = [0xe9, 0, 0, 0, 0];
    bytes[1..].copy_from_slice(&rel.to_le_bytes());
    Some(bytes)
}

/// `jmp [rip+0]` followed by `hook`: reaches any address.
pub fn patch_bytes_absolute(hook: u64) -> [u8; 14] {
    let mut bytes = [0xff, 0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    bytes[6..].copy_from_slice(&hook.to_le_bytes());
    bytes
}

impl Plan {
    /// The bytes to write over the displaced range: the jump to `hook`, then `int3` up to
    /// `displaced_len`.
    ///
    /// The caller must write them while no thread's pc lies strictly inside the range (every
    /// thread stopped, none stopped there; the jump itself needs no single atomic store
    /// then). The filler decides what happens if that promise is broken: a thread resumed
    /// inside the jump's own bytes runs garbage whatever the filler, but one resumed at a
    /// later displaced instruction would, with `nop`s, slide to the end of the range having
    /// silently skipped instructions (a `push` whose `pop` still runs), and fail far away.
    /// `int3` stops it there with SIGTRAP: loud at once, and a tracer still attached sees the
    /// trap and can move the thread to the same instruction in the trampoline.
    pub fn patch(&self, hook: u64) -> Result<Vec<u8>, EntryError> {
        let mut bytes = match self.jump {
            Jump::Rel32 => patch_bytes(self.start, hook)
                .ok_or_else(|| EntryError::HookOutOfReach {
                    name: self.function.clone(),
                    start: self.start,
                    hook,
                })?
                .to_vec(),
            Jump::Absolute => patch_bytes_absolute(hook).to_vec(),
        };
        bytes.resize(self.displaced_len, INT3);
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::OpKind;

    use super::*;

    const LIBC: &str = "/usr/lib/x86_64-linux-gnu/libc.so.6";
    /// The allocator family and malloc_usable_size; aligned_alloc and memalign are one function.
    const ALLOCATORS: &[&str] = &[
        "malloc",
        "calloc",
        "realloc",
        "free",
        "reallocarray",
        "posix_memalign",
        "aligned_alloc",
        "memalign",
        "valloc",
        "pvalloc",
        "malloc_usable_size",
    ];
    const START: u64 = 0x7f00_1234_5000;

    fn synthetic(bytes: &[u8]) -> Function {
        Function {
            name: "synthetic".into(),
            address: START,
            bytes: bytes.to_vec(),
            aliases: Vec::new(),
            inner_symbols: Vec::new(),
            symbols_from: SymbolSource::Symtab,
        }
    }

    fn decode_all(bytes: &[u8], ip: u64) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    /// What an instruction does, whatever its address and encoding: a relocated copy must
    /// mean the same, RIP-relative and branch targets as absolute addresses.
    fn meaning(insn: &Instruction) -> String {
        let mut text = format!(
            "{:?} lock={} rep={} repne={}",
            insn.mnemonic(),
            insn.has_lock_prefix(),
            insn.has_rep_prefix(),
            insn.has_repne_prefix()
        );
        for i in 0..insn.op_count() {
            let operand = match insn.op_kind(i) {
                OpKind::Register => format!("{:?}", insn.op_register(i)),
                OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                    format!("to {:#x}", insn.near_branch_target())
                }
                OpKind::Memory if insn.is_ip_rel_memory_operand() => format!(
                    "{:?} {:?}:[{:#x}]",
                    insn.memory_size(),
                    insn.memory_segment(),
                    insn.memory_displacement64()
                ),
                OpKind::Memory => format!(
                    "{:?} {:?}:[{:?}+{:?}*{}+{:#x}]",
                    insn.memory_size(),
                    insn.memory_segment(),
                    insn.memory_base(),
                    insn.memory_index(),
                    insn.memory_index_scale(),
                    insn.memory_displacement64()
                ),
                kind @ (OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate64
                | OpKind::Immediate8to16
                | OpKind::Immediate8to32
                | OpKind::Immediate8to64
                | OpKind::Immediate32to64) => {
                    format!("{kind:?} {:#x}", insn.immediate(i))
                }
                other => format!("{other:?}"),
            };
            text.push_str(", ");
            text.push_str(&operand);
        }
        text
    }

    /// Checks that `code`, decoded at `at`, is the plan's instructions with the same meaning,
    /// then a jump back to the end of the displaced range.
    fn assert_relocated(plan: &Plan, code: &[u8], at: u64) {
        let got = decode_all(code, at);
        assert_eq!(
            got.len(),
            plan.instructions.len() + 1,
            "{}: the trampoline at {at:#x} has {} instructions, the plan {} and a jump back",
            plan.function,
            got.len(),
            plan.instructions.len()
        );
        for (want, got) in plan.instructions.iter().zip(&got) {
            assert_eq!(
                meaning(got),
                meaning(want),
                "{}: the copy at {:#x} of the instruction at {:#x} means something else",
                plan.function,
                got.ip(),
                want.ip()
            );
        }
        let back = got.last().unwrap();
        assert_eq!(
            (back.mnemonic(), back.near_branch_target()),
            (Mnemonic::Jmp, plan.start + plan.displaced_len as u64),
            "{}: the trampoline does not end in a jump back to the first kept instruction",
            plan.function
        );
    }

    fn libc_function(name: &str) -> Function {
        function(Path::new(LIBC), name).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn libc_allocators_are_read_whole_with_their_aliases() {
        let wanted = crate::probe::libc::functions(Path::new(LIBC), &["malloc", "free"], &[])
            .expect("read libc with the probe's reader");
        for name in ["malloc", "free"] {
            let f = libc_function(name);
            // glibc's text is mapped at file offset == vaddr.
            assert_eq!(
                f.address, wanted[name].file_offset,
                "{name}: address differs from the probe's"
            );
            assert_eq!(
                &f.bytes[..32],
                &wanted[name].prologue[..32],
                "{name}: bytes differ from the probe's"
            );
        }
        assert!(
            libc_function("malloc").bytes.len() > 100,
            "malloc's symbol size is too small"
        );
        let aligned = libc_function("aligned_alloc");
        assert_eq!(aligned.address, libc_function("memalign").address);
        assert!(
            aligned.aliases.iter().any(|a| a == "memalign"),
            "aligned_alloc's aliases {:?} lack memalign",
            aligned.aliases
        );
        let debug = Path::new(DEBUG_ROOT).join("93/ac61ec5a8eb1396f9fbd350e3169a558528a40.debug");
        let malloc = libc_function("malloc");
        if debug.is_file() {
            // libc6-dbg for this very libc is installed: its .symtab must be the one used.
            assert_eq!(malloc.symbols_from, SymbolSource::DebugFile(debug));
            assert!(
                malloc.aliases.iter().any(|a| a == "__libc_malloc"),
                "malloc's aliases {:?} lack __libc_malloc",
                malloc.aliases
            );
        }
    }

    #[test]
    fn libc_allocators_plan_and_relocate() {
        for &name in ALLOCATORS {
            // Where libc might be loaded: the copies must keep runtime targets.
            let f = libc_function(name);
            let f = f.at(0x7f3a_c000_0000 + f.address);
            for jump in [Jump::Rel32, Jump::Absolute] {
                let plan = match (name, jump, plan(&f, jump)) {
                    (_, _, Ok(plan)) => plan,
                    // glibc 2.36: after calling ptmalloc_init, valloc and pvalloc jump back to
                    // their entry + 13, which a 14-byte jump displaces.
                    (
                        "valloc" | "pvalloc",
                        Jump::Absolute,
                        Err(EntryError::IntoDisplaced { target, from, .. }),
                    ) => {
                        assert_eq!(target, f.address + 13, "{name}");
                        assert!(from > f.address + 14, "{name}");
                        continue;
                    }
                    (_, _, Err(e)) => panic!("{jump:?}: {e}"),
                };
                assert!(plan.displaced_len >= jump.size());
                assert_eq!(plan.original, f.bytes[..plan.displaced_len]);
                // Just below, as the sampler's region may be, and far above, still in reach.
                for at in [f.address - 0x10_0000, f.address + 0x7000_0000] {
                    let code = trampoline(&plan, at).unwrap_or_else(|e| panic!("{e}"));
                    assert_relocated(&plan, &code, at);
                }
                let patch = plan.patch(f.address + 0x1000).unwrap();
                assert_eq!(patch.len(), plan.displaced_len);
                assert!(patch[jump.size()..].iter().all(|&b| b == INT3));
            }
        }
    }

    #[test]
    fn call_in_the_displaced_bytes_is_refused() {
        // call +0; ret; nop...
        let f = synthetic(&[0xe8, 0, 0, 0, 0, 0xc3]);
        match plan(&f, Jump::Rel32) {
            Err(EntryError::Unrelocatable { at, what, .. }) => {
                assert_eq!((at, what.as_str()), (START, "call"));
            }
            other => panic!("expected a refused call, got {other:?}"),
        }
    }

    #[test]
    fn syscall_and_ret_in_the_displaced_bytes_are_refused() {
        // xor eax,eax; syscall | ret; nop x3; ret
        for (second, what) in [(&[0x0f, 0x05][..], "syscall"), (&[0xc3][..], "ret")] {
            let mut bytes = vec![0x31, 0xc0];
            bytes.extend_from_slice(second);
            bytes.extend_from_slice(&[0x90, 0x90, 0x90, 0xc3]);
            match plan(&synthetic(&bytes), Jump::Rel32) {
                Err(EntryError::Unrelocatable { at, what: got, .. }) => {
                    assert_eq!((at, got.as_str()), (START + 2, what));
                }
                other => panic!("expected a refused {what}, got {other:?}"),
            }
        }
    }

    #[test]
    fn instructions_after_the_displaced_bytes_are_not_judged() {
        // mov eax,60 (5 bytes); syscall; ret: a 5-byte jump displaces only the mov.
        let f = synthetic(&[0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05, 0xc3]);
        let p = plan(&f, Jump::Rel32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((p.displaced_len, p.instructions.len()), (5, 1));
    }

    /// malloc's first four instructions: push r12; push rbp; push rbx; mov rbx,rdi (7 bytes).
    const MALLOC_LIKE: [u8; 7] = [0x41, 0x54, 0x55, 0x53, 0x48, 0x89, 0xfb];

    fn with_tail(tail: &[u8]) -> Function {
        let mut bytes = MALLOC_LIKE.to_vec();
        bytes.extend_from_slice(tail);
        synthetic(&bytes)
    }

    #[test]
    fn branch_into_the_displaced_bytes_from_later_is_refused() {
        // At +7: jmp +2 (rel8 -7 from +9): lands on push rbp.
        match plan(&with_tail(&[0xeb, 0xf9, 0xc3]), Jump::Rel32) {
            Err(EntryError::IntoDisplaced {
                from, target, len, ..
            }) => assert_eq!((from, target, len), (START + 7, START + 2, 7)),
            other => panic!("expected a refused branch into the prefix, got {other:?}"),
        }
        // The same as a conditional branch, rel32: jne +3 from +7 (next ip +13).
        let rel = (3i32 - 13).to_le_bytes();
        let tail = [0x0f, 0x85, rel[0], rel[1], rel[2], rel[3], 0xc3];
        assert!(matches!(
            plan(&with_tail(&tail), Jump::Rel32),
            Err(EntryError::IntoDisplaced { target, .. }) if target == START + 3
        ));
    }

    #[test]
    fn branch_to_the_entry_itself_is_fine() {
        // At +7: jmp +0 (rel8 -9): re-enters through the hook, as a fresh call would.
        let p =
            plan(&with_tail(&[0xeb, 0xf7, 0xc3]), Jump::Rel32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.displaced_len, 7);
    }

    #[test]
    fn address_taken_inside_the_displaced_bytes_is_refused() {
        // At +7: lea rax,[rip-10] (next ip +14): +4, the mov, an address an indirect jump may use.
        let d = (4i32 - 14).to_le_bytes();
        let tail = [0x48, 0x8d, 0x05, d[0], d[1], d[2], d[3], 0xff, 0xe0];
        assert!(matches!(
            plan(&with_tail(&tail), Jump::Rel32),
            Err(EntryError::IntoDisplaced { from, target, .. }) if (from, target) == (START + 7, START + 4)
        ));
    }

    #[test]
    fn branch_within_the_displaced_bytes_is_refused() {
        // test rdi,rdi; je +0 (the entry: relocated, it would re-enter the hook); ret...
        let f = synthetic(&[0x48, 0x85, 0xff, 0x74, 0xfb, 0x90, 0xc3]);
        assert!(matches!(
            plan(&f, Jump::Rel32),
            Err(EntryError::IntoDisplaced { from, target, len, .. }) if (from, target, len) == (START + 3, START, 5)
        ));
    }

    #[test]
    fn branch_leaving_the_displaced_bytes_is_relocated() {
        // test rdi,rdi; je +9; push rbx; ...; ret at +9.
        let f = synthetic(&[0x48, 0x85, 0xff, 0x74, 0x04, 0x53, 0x5b, 0x90, 0x90, 0xc3]);
        let p = plan(&f, Jump::Rel32).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(p.displaced_len, 5);
        let at = START + 0x4000_0000;
        assert_relocated(&p, &trampoline(&p, at).unwrap(), at);
        assert_eq!(p.instructions[1].near_branch_target(), START + 9);
    }

    #[test]
    fn jump_at_the_entry_is_already_patched() {
        let rel = 0x1000i32.to_le_bytes();
        let near = [0xe9, rel[0], rel[1], rel[2], rel[3], 0xcc, 0xcc];
        let mut absolute = patch_bytes_absolute(0x7eff_0000_0040).to_vec();
        absolute.push(0xc3);
        let cases: [(&[u8], Option<u64>); 4] = [
            (&near, Some(START + 5 + 0x1000)),
            (&absolute, Some(0x7eff_0000_0040)),
            (&[0xeb, 0x10, 0x90, 0x90, 0x90, 0xc3], Some(START + 0x12)),
            // jmp rax: the target is not in the bytes.
            (&[0xff, 0xe0, 0x90, 0x90, 0x90, 0xc3], None),
        ];
        for (bytes, want) in cases {
            for jump in [Jump::Rel32, Jump::Absolute] {
                match plan(&synthetic(bytes), jump) {
                    Err(EntryError::AlreadyPatched { target, .. }) => {
                        assert_eq!(target, want, "{bytes:02x?}")
                    }
                    other => panic!("{bytes:02x?}: expected AlreadyPatched, got {other:?}"),
                }
            }
        }
        // Our own patch reads back as a jump to our hook.
        let hook = START - 0x20_0000;
        let f = libc_function("malloc").at(START);
        let p = plan(&f, Jump::Rel32).unwrap();
        let mut patched = f.clone();
        patched.bytes[..p.displaced_len].copy_from_slice(&p.patch(hook).unwrap());
        assert!(matches!(
            plan(&patched, Jump::Rel32),
            Err(EntryError::AlreadyPatched { target: Some(t), .. }) if t == hook
        ));
    }

    #[test]
    fn breakpoint_in_the_displaced_bytes_is_named() {
        // A uprobe on push rbp of a malloc-like entry.
        let mut bytes = MALLOC_LIKE.to_vec();
        bytes[2] = INT3;
        bytes.push(0xc3);
        assert!(matches!(
            plan(&synthetic(&bytes), Jump::Rel32),
            Err(EntryError::Breakpoint { at, .. }) if at == START + 2
        ));
    }

    #[test]
    fn symbol_inside_the_displaced_bytes_is_refused() {
        let mut f = with_tail(&[0xc3]);
        f.inner_symbols.push(Symbol {
            name: "second_entry".into(),
            address: START + 3,
        });
        match plan(&f, Jump::Rel32) {
            Err(EntryError::SymbolInDisplaced { symbol, at, .. }) => {
                assert_eq!((symbol.as_str(), at), ("second_entry", START + 3));
            }
            other => panic!("expected a refused inner symbol, got {other:?}"),
        }
        // One right after the displaced bytes is another matter.
        f.inner_symbols[0].address = START + 7;
        plan(&f, Jump::Rel32).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn undecodable_bytes_anywhere_are_refused() {
        // 0x06 (push es) does not exist in 64-bit mode; a cut-off last instruction neither.
        for (tail, at) in [
            (&[0x06, 0xc3][..], START + 7),
            (&[0xc3, 0x48, 0x89][..], START + 8),
        ] {
            match plan(&with_tail(tail), Jump::Rel32) {
                Err(EntryError::Invalid { at: got, .. }) => assert_eq!(got, at, "{tail:02x?}"),
                other => panic!("{tail:02x?}: expected Invalid, got {other:?}"),
            }
        }
    }

    #[test]
    fn function_shorter_than_the_jump_is_refused() {
        assert!(matches!(
            plan(&synthetic(&[0x31, 0xc0, 0xc3]), Jump::Rel32),
            Err(EntryError::TooShort {
                size: 3,
                need: 5,
                ..
            })
        ));
        assert!(matches!(
            plan(&with_tail(&[0xc3]), Jump::Absolute),
            Err(EntryError::TooShort {
                size: 8,
                need: 14,
                ..
            })
        ));
    }

    #[test]
    fn rip_relative_operand_out_of_reach_is_an_encode_error() {
        let f = libc_function("posix_memalign").at(START);
        let p = plan(&f, Jump::Rel32).unwrap();
        assert!(p.instructions[0].is_ip_rel_memory_operand());
        assert!(matches!(
            trampoline(&p, 0x1000),
            Err(EntryError::Encode { at: 0x1000, .. })
        ));
    }

    #[test]
    fn patch_bytes_reach_and_refuse() {
        assert_eq!(patch_bytes(0x1000, 0x1005), Some([0xe9, 0, 0, 0, 0]));
        assert_eq!(
            patch_bytes(0x1000, 0x1000),
            Some([0xe9, 0xfb, 0xff, 0xff, 0xff])
        );
        assert_eq!(patch_bytes(START, START + 0x1_0000_0000), None);
        let jmp = decode_all(&patch_bytes_absolute(0xdead_beef_0000), START);
        assert_eq!(jmp[0].code(), Code::Jmp_rm64);
        assert_eq!(
            jump_target(&jmp[0], &patch_bytes_absolute(0xdead_beef_0000), START),
            Some(0xdead_beef_0000)
        );
        let p = plan(&with_tail(&[0xc3]), Jump::Rel32).unwrap();
        assert!(matches!(
            p.patch(START + 0x1_0000_0000),
            Err(EntryError::HookOutOfReach { .. })
        ));
        assert_eq!(p.patch(START + 7).unwrap(), [0xe9, 2, 0, 0, 0, INT3, INT3]);
    }

    #[test]
    fn function_moved_keeps_its_inner_symbols_relative() {
        let mut f = with_tail(&[0xc3]);
        f.inner_symbols.push(Symbol {
            name: "inner".into(),
            address: START + 3,
        });
        let moved = f.at(0x1000);
        assert_eq!(
            (moved.address, moved.inner_symbols[0].address),
            (0x1000, 0x1003)
        );
        assert_eq!(moved.bytes, f.bytes);
    }

    /// A page the test process may write and run.
    struct Rwx(*mut u8);

    impl Rwx {
        fn new() -> Rwx {
            // SAFETY: a fresh anonymous private mapping, owned by the returned value.
            let page = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(page, libc::MAP_FAILED, "mmap an RWX page");
            Rwx(page.cast())
        }

        fn address(&self) -> u64 {
            self.0 as u64
        }

        fn write(&mut self, offset: usize, bytes: &[u8]) {
            assert!(offset + bytes.len() <= 4096);
            // SAFETY: within the page this value owns; no code runs from it meanwhile.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.0.add(offset), bytes.len())
            }
        }

        /// Calls the code at `offset` as `extern "C" fn(u64) -> u64`.
        fn call(&self, offset: usize, arg: u64) -> u64 {
            // SAFETY: the tests write complete functions of that signature at `offset`.
            let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(self.0.add(offset)) };
            f(arg)
        }
    }

    impl Drop for Rwx {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, no longer used.
            unsafe { libc::munmap(self.0.cast(), 4096) };
        }
    }

    #[test]
    fn relocated_entry_computes_what_the_original_did() {
        // f(x) = x == 0 ? 0 : *DATA + x, with DATA at +0x100 found RIP-relative.
        #[rustfmt::skip]
        const F: [u8; 22] = [
            0x48, 0x85, 0xff,                         // +0x00 test rdi,rdi
            0x74, 0x0e,                               // +0x03 je +0x13
            0x48, 0x8d, 0x05, 0xf4, 0x00, 0x00, 0x00, // +0x05 lea rax,[rip+0xf4] (+0x100)
            0x48, 0x8b, 0x00,                         // +0x0c mov rax,[rax]
            0x48, 0x01, 0xf8,                         // +0x0f add rax,rdi
            0xc3,                                     // +0x12 ret
            0x31, 0xc0,                               // +0x13 xor eax,eax
            0xc3,                                     // +0x15 ret
        ];
        const DATA: u64 = 0x1234_5678_9000;
        let mut page = Rwx::new();
        page.write(0x100, &DATA.to_le_bytes());
        for (jump, tramp, displaced) in [(Jump::Rel32, 0x800, 5), (Jump::Absolute, 0xc00, 15)] {
            page.write(0, &F);
            let want = [page.call(0, 0), page.call(0, 5)];
            assert_eq!(want, [0, DATA + 5]);

            let mut f = synthetic(&F);
            f.address = page.address();
            let p = plan(&f, jump).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(p.displaced_len, displaced, "{jump:?}");
            let code = trampoline(&p, page.address() + tramp as u64).unwrap();
            page.write(tramp, &code);
            // The hook is the trampoline itself: the patched entry runs the displaced code
            // there and comes back.
            page.write(0, &p.patch(page.address() + tramp as u64).unwrap());
            let got = [page.call(0, 0), page.call(0, 5)];
            assert_eq!(
                got, want,
                "{jump:?}: the patched function computes otherwise"
            );
            // And the trampoline alone is the function's entry, relocated.
            assert_eq!(page.call(tramp, 7), DATA + 7, "{jump:?}");
        }
    }
}
