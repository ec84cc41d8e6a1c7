//! Out-of-line copies of the instructions under the breakpoints.
//!
//! A thread stopped on a breakpoint must still execute the instruction the int3 replaced.
//! Instead of putting the byte back and single-stepping (which is only safe while every other
//! thread is stopped), each displaced instruction gets a copy in a page of its own in the
//! target, followed by a jump back to the instruction after it: the tracer points the thread
//! at the copy and lets it go. The breakpoint never leaves the code, so no thread can run past
//! it unseen or fetch a half-restored instruction, and no other thread has to stop. The copy
//! is re-encoded for its new address (iced-x86's block encoder fixes RIP-relative operands and
//! branch targets), which is why the page must lie within ±2 GiB of the code.
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock,
};

/// Bytes reserved for each copy: the longest instruction (15 bytes), grown by re-encoding,
/// plus the jump back.
pub const SLOT_SIZE: u64 = 48;

/// One relocated instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocated {
    /// The copy followed by the jump back, encoded for the slot's address.
    pub bytes: Vec<u8>,
    /// Length of the original instruction.
    pub len: u64,
    /// Offset in the slot of the jump back (where a thread stands once it executed the copy).
    pub back: u64,
}

/// Re-encodes the first instruction of `code` (found at `site`) to run at `slot`, followed by a
/// jump to `site` + its length. Refuses instructions whose meaning depends on where they run
/// in ways that cannot be re-encoded (calls push their own address; returns and system calls
/// are not expected at an allocator's entry).
pub fn relocate(code: &[u8], site: u64, slot: u64) -> Result<Relocated, String> {
    let mut decoder = Decoder::with_ip(64, code, site, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(format!("cannot decode the instruction at {site:#x}"));
    }
    match insn.flow_control() {
        FlowControl::Next | FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch => {}
        other => {
            return Err(format!(
                "the instruction at {site:#x} ({:?}, flow {other:?}) cannot run out of line",
                insn.code()
            ));
        }
    }
    let len = insn.len() as u64;
    let back = Instruction::with_branch(Code::Jmp_rel32_64, site + len)
        .map_err(|e| format!("encode the jump back to {:#x}: {e}", site + len))?;
    let instructions = [insn, back];
    let result = BlockEncoder::encode(
        64,
        InstructionBlock::new(&instructions, slot),
        BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
    )
    .map_err(|e| format!("re-encode the instruction at {site:#x} for {slot:#x}: {e}"))?;
    if result.code_buffer.len() as u64 > SLOT_SIZE {
        return Err(format!(
            "the instruction at {site:#x} needs {} bytes out of line",
            result.code_buffer.len()
        ));
    }
    let back = *result
        .new_instruction_offsets
        .get(1)
        .ok_or("the block encoder returned no offset for the jump back")?;
    // A copy that grew into several instructions (a far branch) would leave a thread stopped
    // between them with no place in the original code to map back to.
    let mut check = Decoder::with_ip(64, &result.code_buffer, slot, DecoderOptions::NONE);
    if check.decode().len() as u32 != back {
        return Err(format!(
            "the instruction at {site:#x} does not stay one instruction out of line"
        ));
    }
    Ok(Relocated {
        bytes: result.code_buffer,
        len,
        back: back as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(bytes: &[u8], ip: u64) -> Vec<Instruction> {
        Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE)
            .into_iter()
            .collect()
    }

    #[test]
    fn push_is_copied_and_jumps_back() {
        // malloc: push %r12
        let r = relocate(&[0x41, 0x54, 0x55], 0x7f00_0000_1000, 0x7eff_f000_0040).unwrap();
        assert_eq!(r.len, 2);
        assert_eq!(&r.bytes[..2], &[0x41, 0x54]);
        assert_eq!(r.back, 2);
        let insns = decode_all(&r.bytes, 0x7eff_f000_0040);
        assert_eq!(insns[1].near_branch_target(), 0x7f00_0000_1002);
    }

    #[test]
    fn rip_relative_operand_keeps_its_target() {
        // posix_memalign: cmpb $0x0,0x140201(%rip)
        let site = 0x7f00_0009_a280;
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00];
        let want = Decoder::with_ip(64, &code, site, DecoderOptions::NONE)
            .decode()
            .ip_rel_memory_address();
        let slot = site - 0x10_0000;
        let r = relocate(&code, site, slot).unwrap();
        let insns = decode_all(&r.bytes, slot);
        assert_eq!(insns[0].ip_rel_memory_address(), want);
        assert_eq!(insns[1].near_branch_target(), site + 7);
        assert_eq!(r.back, insns[0].len() as u64);
    }

    #[test]
    fn conditional_branch_keeps_both_ways() {
        // je +7 (memalign+7): taken goes to site+9, not taken falls to the jump back.
        let site = 0x7f00_0009_9617;
        let r = relocate(&[0x74, 0x07], site, site - 0x20_0000).unwrap();
        let insns = decode_all(&r.bytes, site - 0x20_0000);
        assert_eq!(insns[0].near_branch_target(), site + 9);
        assert_eq!(insns[1].near_branch_target(), site + 2);
    }

    #[test]
    fn calls_are_refused() {
        assert!(relocate(&[0xe8, 0, 0, 0, 0], 0x1000, 0x2000).is_err());
        assert!(relocate(&[0xc3], 0x1000, 0x2000).is_err());
    }

    #[test]
    fn out_of_range_rip_relative_is_refused() {
        let code = [0x80, 0x3d, 0x01, 0x02, 0x14, 0x00, 0x00];
        assert!(relocate(&code, 0x7f00_0000_0000, 0x1000).is_err());
    }
}
