//! Rows checked against binutils' own reading of the same CFI (`readelf
//! --debug-dump=frames-interp`), and the walk on a hand-made stack.
use super::*;

/// (address, CFA column, rbp column, ra column) of every row readelf prints for `path`.
fn readelf_rows(path: &str) -> Vec<(u64, String, String, String)> {
    let out = std::process::Command::new("readelf")
        .args(["-wF", path])
        .output()
        .expect("run readelf (Debian's binutils)");
    // readelf exits 1 on libc (a note it cannot read) with its tables printed in full.
    assert!(!out.stdout.is_empty(), "readelf -wF {path} printed nothing");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rows = Vec::new();
    let mut columns: Vec<String> = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"LOC") {
            columns = words.iter().map(|w| (*w).to_owned()).collect();
            continue;
        }
        if words.is_empty() || words.len() != columns.len() || u64::from_str_radix(words[0], 16).is_err() || words[0].len() < 8 {
            continue;
        }
        let col = |name: &str| columns.iter().position(|c| c == name).map_or("u".to_owned(), |i| words[i].to_owned());
        rows.push((u64::from_str_radix(words[0], 16).unwrap(), col("CFA"), col("rbp"), col("ra")));
    }
    rows
}

fn check_against_readelf(path: &str) {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let rows = rows::rows_from_elf(&data).unwrap_or_else(|e| panic!("rows of {path}: {e:#}"));
    let want = readelf_rows(path);
    assert!(want.len() > 1000, "readelf printed only {} rows for {path}", want.len());
    let mut checked = 0;
    let mut problems = Vec::new();
    for (addr, cfa, rbp, ra) in &want {
        if *addr == 0 {
            // FDEs of functions the linker discarded keep address 0: no code is there.
            continue;
        }
        let got = rows::lookup(&rows, *addr);
        let expect: Option<(u8, i16, i8)> = if ra == "u" {
            Some((row_kind::END, 0, 0))
        } else if let Some(off) = cfa.strip_prefix("rsp+") {
            // A frame over 32 KiB does not fit a row: the walker stops there.
            Some(i16::try_from(off.parse::<i64>().unwrap()).map_or((row_kind::UNSUPPORTED, 0, 0), |o| (row_kind::CFA_RSP, o, 0)))
        } else if let Some(off) = cfa.strip_prefix("rbp+") {
            Some(i16::try_from(off.parse::<i64>().unwrap()).map_or((row_kind::UNSUPPORTED, 0, 0), |o| (row_kind::CFA_RBP, o, 0)))
        } else {
            None
        };
        let Some((kind, off, _)) = expect else {
            // Expressions: the walker knows the PLT and signal-frame shapes only.
            if let Some(g) = got {
                if ![row_kind::PLT, row_kind::SIGNAL, row_kind::UNSUPPORTED, row_kind::END].contains(&g.kind) {
                    problems.push(format!("{addr:#x}: readelf CFA {cfa}, rows {g:?}"));
                }
            }
            continue;
        };
        let rbp_slot = rbp.strip_prefix("c").and_then(|v| v.parse::<i64>().ok()).map_or(0, |v| (v / 8) as i8);
        let Some(g) = got else {
            problems.push(format!("{addr:#x}: readelf CFA {cfa} ra {ra}, no row"));
            continue;
        };
        let ok = if kind == row_kind::END || kind == row_kind::UNSUPPORTED {
            g.kind == kind
        } else {
            (g.kind, g.cfa_off, g.rbp) == (kind, off, rbp_slot) && ra == "c-8"
        };
        if !ok {
            problems.push(format!("{addr:#x}: readelf CFA {cfa} rbp {rbp} ra {ra}, rows {g:?}"));
        }
        checked += 1;
    }
    assert!(
        problems.is_empty(),
        "{path}: {} of {checked} rows differ from readelf's, first ones:\n{}",
        problems.len(),
        problems.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[test]
fn libc_rows_equal_readelf() {
    check_against_readelf("/usr/lib/x86_64-linux-gnu/libc.so.6");
}

#[test]
fn libstdcxx_rows_equal_readelf() {
    check_against_readelf("/usr/lib/x86_64-linux-gnu/libstdc++.so.6");
}

#[test]
fn libc_has_plt_and_signal_rows() {
    let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let rows = rows::rows_from_elf(&data).unwrap();
    assert!(rows.iter().any(|r| r.kind == row_kind::PLT), "no PLT row in libc");
    assert!(rows.iter().any(|r| r.kind == row_kind::SIGNAL), "no signal-frame row (__restore_rt) in libc");
}

/// A stack made by hand: f (rows: CFA rsp+16, rbp saved at CFA-16) called from g (no rows:
/// frame pointers), called from h, whose return address lies in no mapping.
#[test]
fn walk_follows_rows_then_frame_pointers_and_stops_outside_mappings() {
    let rows = vec![
        UnwindRow { pc: 0x1000, cfa_off: 16, kind: row_kind::CFA_RSP, rbp: -2 },
        UnwindRow { pc: 0x1100, cfa_off: 0, kind: row_kind::NONE, rbp: 0 },
    ];
    let mappings = vec![
        UnwindMapping { start: 0x40_0000, end: 0x40_2000, bias: 0x40_0000, rows_first: 0, rows_len: 2, ..Default::default() },
        UnwindMapping { start: 0x50_0000, end: 0x50_1000, bias: 0, rows_first: 0, rows_len: 0, ..Default::default() },
    ];
    // f at 0x40_1010 (ELF 0x1010); sp 0x7000: [0x7000] = g's rbp, [0x7008] = ra into g.
    let mem: HashMap<u64, u64> = [
        (0x7000, 0x7100),
        (0x7008, 0x50_0010),
        // g's frame at rbp 0x7100: saved rbp, then ra into nothing mapped.
        (0x7100, 0x7200),
        (0x7108, 0x66_0000),
    ]
    .into();
    let table = Table { mappings: &mappings, rows: &rows };
    let (frames, stop) = walk(Regs { ip: 0x40_1010, sp: 0x7000, bp: 0x1234 }, &table, UnwindMode::Auto, 16, |a| mem.get(&a).copied());
    let pcs: Vec<u64> = frames.iter().map(|f| f.pc).collect();
    assert_eq!(pcs, vec![0x40_1010, 0x50_0010], "{frames:?}");
    assert_eq!(stop, Stop::OutsideMappings);
    assert_eq!((frames[1].sp, frames[1].bp), (0x7010, 0x7100));

    let (frames, stop) = walk(Regs { ip: 0x40_1010, sp: 0x7000, bp: 0 }, &table, UnwindMode::Dwarf, 16, |a| mem.get(&a).copied());
    assert_eq!((frames.len(), stop), (2, Stop::NoRows));
}

/// The rest of a walk the kernel handed over starts at a return address: one in no mapping
/// adds no frame (it is data, or code not known yet), one in a mapping is looked up at pc - 1.
/// And with `--unwind fp` the rows are not looked at.
#[test]
fn handed_over_walks_and_frame_pointer_mode() {
    let rows = vec![
        UnwindRow { pc: 0x1000, cfa_off: 8, kind: row_kind::CFA_RSP, rbp: 0 },
        UnwindRow { pc: 0x1010, cfa_off: 16, kind: row_kind::CFA_RSP, rbp: 0 },
        UnwindRow { pc: 0x1100, cfa_off: 0, kind: row_kind::NONE, rbp: 0 },
    ];
    let mappings = vec![UnwindMapping { start: 0x40_0000, end: 0x40_2000, bias: 0x40_0000, rows_first: 0, rows_len: 3, ..Default::default() }];
    let table = Table { mappings: &mappings, rows: &rows };
    let mem: HashMap<u64, u64> = [(0x7008, 0x66_0000), (0x7000, 0x40_1050)].into();
    let read = |a: u64| mem.get(&a).copied();

    let (frames, stop) = walk_from(Regs { ip: 0x66_0000, sp: 0x7000, bp: 0 }, false, &table, UnwindMode::Auto, 16, read);
    assert_eq!((frames.len(), stop), (0, Stop::OutsideMappings));

    // A return address right after a call that ends its function's first row: pc - 1 finds
    // the first row (CFA rsp+8: the caller at 0x7000), not the second (rsp+16: 0x7008, which
    // holds no code address).
    let (frames, _) = walk_from(Regs { ip: 0x40_1010, sp: 0x7000, bp: 0 }, false, &table, UnwindMode::Auto, 16, read);
    assert_eq!(frames.iter().map(|f| f.pc).collect::<Vec<_>>(), vec![0x40_1010, 0x40_1050], "{frames:?}");

    // Frame pointers only: bp 0 ends the walk at once, whatever the rows would say.
    let (frames, stop) = walk(Regs { ip: 0x40_1010, sp: 0x7000, bp: 0 }, &table, UnwindMode::Fp, 16, read);
    assert_eq!((frames.len(), stop), (1, Stop::End));
}

/// Each page's entry is the last row starting at or below the page's start, so the row of any
/// address lies between its page's entry and the next page's: checked on libc's rows against
/// a search of all of them.
#[test]
fn page_index_brackets_every_rows_search() {
    let data = std::fs::read("/usr/lib/x86_64-linux-gnu/libc.so.6").unwrap();
    let rows = rows::rows_from_elf(&data).unwrap();
    let (base, pages) = page_index(&rows);
    let shift = tracer_common::UNWIND_PAGE_SHIFT;
    assert_eq!(pages.len() as u64, ((rows.last().unwrap().pc as u64 - base) >> shift) + 1);
    for addr in (rows[0].pc as u64..rows.last().unwrap().pc as u64).step_by(97) {
        let want = rows.partition_point(|r| r.pc as u64 <= addr) - 1;
        let p = ((addr - base) >> shift) as usize;
        let lo = pages[p] as usize;
        let hi = pages.get(p + 1).map_or(rows.len(), |&n| n as usize + 1);
        assert!(lo <= want && want < hi, "{addr:#x}: row {want} outside {lo}..{hi}");
    }
}

/// lld's layout (a Rust binary here): the code segment starts in the file on the page where
/// the read-only data ends, so its mapping's offset is that page's, inside the data's range.
/// Taking the data segment for it put every address of the code a page off its rows.
#[test]
fn a_code_mapping_that_starts_on_a_page_shared_with_data_takes_the_code_segment() {
    let module = ModuleUnwind {
        loads: vec![(0, 0, 0x8525c), (0x85260, 0x86260, 0x468c0), (0xcbb20, 0xcdb20, 0x3030)],
        ..ModuleUnwind::default()
    };
    let start = 0x5555_5555_a000;
    // r-xp from file offset 0x85000: ELF address 0x86000 at `start`.
    assert_eq!(module.bias(start, 0x85000), Some(start - 0x86000));
    // r--p from 0: the data.
    assert_eq!(module.bias(0x5555_5555_4000, 0), Some(0x5555_5555_4000));
    // A mapping split in the middle of the code segment (mprotect): still the code's.
    assert_eq!(module.bias(start + 0x10000, 0x95000), Some(start - 0x86000));
    assert_eq!(module.bias(start, 0x200000), None);
}
