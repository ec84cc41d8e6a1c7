//! Where to put an entry probe so that it is cheap and still sees the arguments.
//!
//! On x86-64 the kernel emulates a few instructions under a uprobe (push of a register,
//! call, jmp, jcc) and single-steps all others out of line, which costs about ten times
//! more (FACTS.md: free+0, `test %rdi,%rdi`, ~10 us; free+3, `je`, ~0.9 us). An entry-only
//! probe may sit on any instruction before which nothing has touched the argument
//! registers or the stack pointer, so we decode the prologue and take the first emulated
//! instruction in that stretch. Return probes must stay at +0, where the return address is
//! at the top of the stack.
use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

/// Instructions looked at before giving up and probing the first one.
const MAX_LOOKAHEAD: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start.
    pub offset: u64,
    /// From the stack pointer at `offset` to the return address, bytes.
    pub ret_sp_offset: u16,
    /// Whether the kernel emulates the instruction at `offset` (cheap) or single-steps it.
    pub emulated: bool,
}

/// Whether the kernel's x86 uprobe code emulates this instruction instead of single-stepping
/// it: `push %reg`, `call rel32`, `jmp rel8/rel32`, `jcc rel8/rel32`, without prefixes.
pub fn is_emulated(bytes: &[u8]) -> bool {
    match bytes {
        [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..] => true,
        [0xe8 | 0xe9 | 0xeb, ..] | [0x70..=0x7f, ..] => true,
        [0x0f, 0x80..=0x8f, ..] => true,
        _ => false,
    }
}

/// Argument registers of the SysV x86-64 ABI, and the stack pointer.
fn is_guarded(reg: Register) -> bool {
    let full = reg.full_register();
    matches!(
        full,
        Register::RDI
            | Register::RSI
            | Register::RDX
            | Register::RCX
            | Register::R8
            | Register::R9
            | Register::RSP
    )
}

/// Best placement for an entry-only probe on the function whose first bytes are `code`.
pub fn entry_placement(code: &[u8]) -> Placement {
    let at_start = Placement {
        offset: 0,
        ret_sp_offset: 0,
        emulated: is_emulated(code),
    };
    if at_start.emulated {
        return at_start;
    }
    let mut decoder = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..MAX_LOOKAHEAD {
        if !decoder.can_decode() {
            break;
        }
        let insn = decoder.decode();
        if insn.is_invalid() {
            break;
        }
        let offset = insn.ip();
        let bytes = &code[offset as usize..];
        if offset > 0 && is_emulated(bytes) {
            return Placement {
                offset,
                ret_sp_offset: 0,
                emulated: true,
            };
        }
        // Skipping this instruction is safe only if it falls through and leaves the
        // arguments, the stack pointer and memory as they were.
        if insn.flow_control() != FlowControl::Next {
            break;
        }
        let used = info.info(&insn);
        let writes_guarded = used.used_registers().iter().any(|r| {
            is_guarded(r.register())
                && matches!(
                    r.access(),
                    OpAccess::Write | OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite
                )
        });
        let writes_memory = used.used_memory().iter().any(|m| {
            !matches!(m.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess)
        });
        if writes_guarded || writes_memory {
            break;
        }
    }
    at_start
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibc_free_moves_past_the_test_to_the_je() {
        // free in glibc 2.36: test %rdi,%rdi; je ...; push %rbp
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0xbf, 0x00, 0x00, 0x00, 0x55];
        assert_eq!(
            entry_placement(&code),
            Placement { offset: 3, ret_sp_offset: 0, emulated: true }
        );
    }

    #[test]
    fn glibc_malloc_stays_on_its_push() {
        // malloc: push %r12; push %rbp
        let code = [0x41, 0x54, 0x55, 0x53];
        assert_eq!(
            entry_placement(&code),
            Placement { offset: 0, ret_sp_offset: 0, emulated: true }
        );
    }

    #[test]
    fn never_skips_a_write_to_an_argument_register() {
        // mov %rsi,%rax is fine to skip, but mul %rdx writes rdx: stop there. (reallocarray)
        let code = [0x48, 0x89, 0xf0, 0x48, 0xf7, 0xe2, 0x48, 0x89, 0xc6, 0x70, 0x05];
        let p = entry_placement(&code);
        assert_eq!(p.offset, 0);
        assert!(!p.emulated);
    }

    #[test]
    fn never_skips_a_stack_pointer_change() {
        // sub $0x18,%rsp; jmp ...
        let code = [0x48, 0x83, 0xec, 0x18, 0xeb, 0x00];
        assert_eq!(entry_placement(&code).offset, 0);
    }

    #[test]
    fn rip_relative_compare_then_branch() {
        // posix_memalign: cmpb $0,0x140201(%rip); push %r12 -> the push, at +7.
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00, 0x41, 0x54];
        assert_eq!(entry_placement(&code).offset, 7);
    }
}
