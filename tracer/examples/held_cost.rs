//! Cost of one resident/class measurement (StackMemory::measure) on a live process, taking
//! every mapping it has as if a traced stack had made it (the worst case).
use std::time::Instant;

use tracer::{memmap::StackMemory, regions::Regions, symbolize::maps::ProcMaps};
use tracer_common::{SyscallEvent, phase, sys};

fn main() {
    let pid: u32 = std::env::args().nth(1).expect("pid").parse().expect("pid");
    let maps = ProcMaps::read(pid).expect("maps");
    let mut regions = Regions::default();
    let mut reserved = 0u64;
    for (i, m) in maps.mappings().iter().enumerate() {
        if m.path.as_deref() == Some("[vsyscall]") {
            continue;
        }
        let prot = if m.perms.starts_with("---") { 0 } else { 3 };
        reserved += m.end - m.start;
        regions.apply(&SyscallEvent {
            args: [m.start, m.end - m.start, prot, 0x22 | 0x10, 0, 0],
            ret: m.start as i64,
            stack: i as u64 % 50,
            timestamp_ns: 0,
            tid: 1,
            sys: sys::MMAP,
            in_allocator: 0,
            phase: phase::EXIT,
        });
    }
    let mut times = Vec::new();
    let mut held = None;
    for _ in 0..20 {
        let t = Instant::now();
        held = Some(StackMemory::measure(pid, &regions).expect("measure"));
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    let mut smaps = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        tracer::memmap::read_smaps(pid).expect("smaps");
        smaps.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    smaps.sort_by(f64::total_cmp);
    println!("smaps alone: median {:.2} ms", smaps[10]);
    let resident: u64 = held.unwrap().resident.values().sum();
    println!(
        "{} mappings, {:.1} GiB reserved, {:.1} MiB resident; measure: median {:.2} ms, min {:.2}, max {:.2}",
        maps.mappings().len(),
        reserved as f64 / (1u64 << 30) as f64,
        resident as f64 / (1u64 << 20) as f64,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1]
    );
}
