//! Unwind rows from a module's CFI: `.eh_frame` (or `.debug_frame` where that is all there
//! is) evaluated once with gimli, reduced to the compact rows the kernel walks
//! ([`tracer_common::UnwindRow`]). A pure function of the ELF bytes.
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Reader as _,
    RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::{Object as _, ObjectSection as _};
use tracer_common::{UnwindRow, row_kind};

#[derive(Debug, thiserror::Error)]
pub enum RowsError {
    #[error("parse ELF")]
    Elf(#[source] object::Error),
    #[error("read CFI ({section})")]
    Cfi {
        section: &'static str,
        #[source]
        source: gimli::Error,
    },
    #[error("addresses above 4 GiB ({0:#x}) do not fit a row")]
    TooHigh(u64),
}

/// One evaluated rule over `start..end` (ELF addresses), before rows are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
    kind: u8,
    cfa_off: i16,
    rbp: i8,
}

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// The rows of a module, sorted by pc, from its ELF bytes; empty when it has no CFI.
pub fn rows_from_elf(data: &[u8]) -> Result<Vec<UnwindRow>, RowsError> {
    let file = object::File::parse(data).map_err(RowsError::Elf)?;
    let addr_of = |name: &str| file.section_by_name(name).map(|s| s.address());
    let mut bases = BaseAddresses::default();
    if let Some(text) = addr_of(".text") {
        bases = bases.set_text(text);
    }
    if let Some(got) = addr_of(".got") {
        bases = bases.set_got(got);
    }
    let mut spans = Vec::new();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let bytes = section.data().map_err(RowsError::Elf)?;
        if !bytes.is_empty() {
            let bases = bases.clone().set_eh_frame(section.address());
            let mut eh = EhFrame::new(bytes, LittleEndian);
            eh.set_address_size(8);
            collect(&eh, &bases, &mut spans).map_err(|source| RowsError::Cfi { section: ".eh_frame", source })?;
        }
    }
    if spans.is_empty()
        && let Some(section) = file.section_by_name(".debug_frame")
    {
        let bytes = section.uncompressed_data().map_err(RowsError::Elf)?;
        let mut df = DebugFrame::new(&bytes, LittleEndian);
        df.set_address_size(8);
        collect(&df, &bases, &mut spans).map_err(|source| RowsError::Cfi { section: ".debug_frame", source })?;
    }
    pack(spans)
}

fn collect<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    bases: &BaseAddresses,
    spans: &mut Vec<Span>,
) -> gimli::Result<()>
where
    <S as UnwindSection<Slice<'a>>>::Offset: gimli::UnwindOffset<usize>,
{
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next()? {
        let CieOrFde::Fde(partial) = entry else { continue };
        // A bad FDE loses its function only.
        let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o)) else { continue };
        let Ok(mut table) = fde.rows(section, bases, &mut ctx) else { continue };
        while let Ok(Some(row)) = table.next_row() {
            if row.start_address() >= row.end_address() {
                continue;
            }
            let (kind, cfa_off, rbp) = reduce(section, row.cfa(), &row.register(X86_64::RA), &row.register(X86_64::RBP));
            spans.push(Span { start: row.start_address(), end: row.end_address(), kind, cfa_off, rbp });
        }
    }
    Ok(())
}

/// A gimli row as (kind, cfa_off, rbp) of [`UnwindRow`].
fn reduce<'a, S: UnwindSection<Slice<'a>>>(
    section: &S,
    cfa: &CfaRule<usize>,
    ra: &RegisterRule<usize>,
    rbp: &RegisterRule<usize>,
) -> (u8, i16, i8) {
    const UNSUPPORTED: (u8, i16, i8) = (row_kind::UNSUPPORTED, 0, 0);
    if matches!(ra, RegisterRule::Undefined) {
        return (row_kind::END, 0, 0);
    }
    let expr_bytes = |e: &gimli::UnwindExpression<usize>| -> Option<Vec<u8>> {
        let expr = e.get(section).ok()?;
        Some(expr.0.to_slice().ok()?.into_owned())
    };
    match cfa {
        CfaRule::RegisterAndOffset { register, offset } => {
            let kind = match *register {
                X86_64::RSP => row_kind::CFA_RSP,
                X86_64::RBP => row_kind::CFA_RBP,
                _ => return UNSUPPORTED,
            };
            let Ok(off) = i16::try_from(*offset) else { return UNSUPPORTED };
            if !matches!(ra, RegisterRule::Offset(-8)) {
                return UNSUPPORTED;
            }
            (kind, off, rbp_slot(rbp))
        }
        CfaRule::Expression(e) => {
            let Some(bytes) = expr_bytes(e) else { return UNSUPPORTED };
            if let Some(threshold) = plt_threshold(&bytes) {
                if !matches!(ra, RegisterRule::Offset(-8)) {
                    return UNSUPPORTED;
                }
                return (row_kind::PLT, 8, threshold as i8);
            }
            // __restore_rt: CFA = *(rsp + 160), every register in the ucontext at rsp.
            let at = |rule: &RegisterRule<usize>| match rule {
                RegisterRule::Expression(e) => expr_bytes(e).and_then(|b| breg7(&b)),
                _ => None,
            };
            let deref = bytes.last() == Some(&gimli::constants::DW_OP_deref.0)
                && breg7(&bytes[..bytes.len() - 1]) == Some(tracer_common::sigframe::RSP as i64);
            let rip = at(ra) == Some(tracer_common::sigframe::RIP as i64);
            let rbp_ok = at(rbp) == Some(tracer_common::sigframe::RBP as i64);
            if deref && rip && rbp_ok {
                (row_kind::SIGNAL, 0, 0)
            } else {
                UNSUPPORTED
            }
        }
    }
}

/// Where rbp is saved, in 8-byte slots from the CFA, or 0 when it is not (still the caller's).
fn rbp_slot(rule: &RegisterRule<usize>) -> i8 {
    match *rule {
        RegisterRule::Offset(off) if off % 8 == 0 && off != 0 => i8::try_from(off / 8).unwrap_or(0),
        _ => 0,
    }
}

/// `DW_OP_breg7 N` alone: N.
fn breg7(bytes: &[u8]) -> Option<i64> {
    let (&op, rest) = bytes.split_first()?;
    if op != gimli::constants::DW_OP_breg7.0 {
        return None;
    }
    let mut r = EndianSlice::new(rest, LittleEndian);
    let n = r.read_sleb128().ok()?;
    r.is_empty().then_some(n)
}

/// The PLT shape `breg7 8; breg16 0; lit15; and; litN; ge; lit3; shl; plus`: N.
fn plt_threshold(bytes: &[u8]) -> Option<u8> {
    use gimli::constants::*;
    let lit = |n: u8| DW_OP_lit0.0 + n;
    match bytes {
        [b7, 8, b16, 0, l15, and, litn, ge, l3, shl, plus]
            if *b7 == DW_OP_breg7.0
                && *b16 == DW_OP_breg16.0
                && *l15 == lit(15)
                && *and == DW_OP_and.0
                && (lit(0)..=lit(15)).contains(litn)
                && *ge == DW_OP_ge.0
                && *l3 == lit(3)
                && *shl == DW_OP_shl.0
                && *plus == DW_OP_plus.0 =>
        {
            Some(litn - lit(0))
        }
        _ => None,
    }
}

/// Sorted, merged rows: a [`row_kind::NONE`] row where no FDE covers the addresses, and one
/// row for each run of equal rules.
fn pack(mut spans: Vec<Span>) -> Result<Vec<UnwindRow>, RowsError> {
    spans.sort_by_key(|s| (s.start, s.end));
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(spans.len() + spans.len() / 4);
    let mut covered_to = 0u64;
    for s in spans {
        if s.start < covered_to {
            // Overlapping FDEs (rare; a linker's leftovers): the first one wins.
            continue;
        }
        if !rows.is_empty() && s.start > covered_to {
            push(&mut rows, covered_to, row_kind::NONE, 0, 0)?;
        }
        push(&mut rows, s.start, s.kind, s.cfa_off, s.rbp)?;
        covered_to = s.end;
    }
    if !rows.is_empty() {
        push(&mut rows, covered_to, row_kind::NONE, 0, 0)?;
    }
    Ok(rows)
}

fn push(rows: &mut Vec<UnwindRow>, pc: u64, kind: u8, cfa_off: i16, rbp: i8) -> Result<(), RowsError> {
    let pc = u32::try_from(pc).map_err(|_| RowsError::TooHigh(pc))?;
    if let Some(last) = rows.last_mut() {
        if (last.kind, last.cfa_off, last.rbp) == (kind, cfa_off, rbp) {
            return Ok(());
        }
        if last.pc == pc {
            *last = UnwindRow { pc, cfa_off, kind, rbp };
            return Ok(());
        }
    }
    rows.push(UnwindRow { pc, cfa_off, kind, rbp });
    Ok(())
}

/// The row that covers ELF address `addr`, if any row does (a NONE row says none does).
pub fn lookup(rows: &[UnwindRow], addr: u64) -> Option<UnwindRow> {
    let addr = u32::try_from(addr).ok()?;
    let i = rows.partition_point(|r| r.pc <= addr);
    let row = *rows.get(i.checked_sub(1)?)?;
    (row.kind != row_kind::NONE).then_some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plt_expression_is_recognized() {
        // breg7 8; breg16 0; lit15; and; lit11; ge; lit3; shl; plus
        let bytes = [0x77, 8, 0x80, 0, 0x3f, 0x1a, 0x3b, 0x2a, 0x33, 0x24, 0x22];
        assert_eq!(plt_threshold(&bytes), Some(11));
        assert_eq!(plt_threshold(&bytes[..10]), None);
    }

    #[test]
    fn gaps_between_functions_get_none_rows_and_equal_rules_merge() {
        let span = |start, end, cfa_off| Span { start, end, kind: row_kind::CFA_RSP, cfa_off, rbp: 0 };
        let rows = pack(vec![span(0x10, 0x11, 8), span(0x11, 0x20, 16), span(0x20, 0x28, 16), span(0x30, 0x31, 8)]).unwrap();
        let got: Vec<(u32, u8, i16)> = rows.iter().map(|r| (r.pc, r.kind, r.cfa_off)).collect();
        assert_eq!(
            got,
            vec![
                (0x10, row_kind::CFA_RSP, 8),
                (0x11, row_kind::CFA_RSP, 16),
                (0x28, row_kind::NONE, 0),
                (0x30, row_kind::CFA_RSP, 8),
                (0x31, row_kind::NONE, 0),
            ]
        );
        assert_eq!(lookup(&rows, 0x1f).map(|r| r.cfa_off), Some(16));
        assert_eq!(lookup(&rows, 0x29), None);
        assert_eq!(lookup(&rows, 0x0f), None);
        assert_eq!(lookup(&rows, 0x31), None);
    }
}
