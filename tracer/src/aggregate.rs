//! From a backend's snapshot to a profile: stacks normalized to module + file offset while
//! the process's memory map is at hand, ranked, and totalled.
use crate::{
    probe::{Counters, Snapshot},
    symbolize::maps::ProcMaps,
};

/// One frame, normalized: enough to name it later, even after the process is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub address: u64,
    /// Path of the mapped file (or `[vdso]` and the like), as the process sees it.
    pub module: Option<String>,
    /// File offset within `module`, or the address itself when no mapping covers it.
    pub offset: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackProfile {
    pub id: u64,
    /// Leaf first; empty for allocations whose stack was lost.
    pub frames: Vec<Frame>,
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    pub counters: Counters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub totals: Totals,
    /// Every stack with any allocation, most live bytes first.
    pub stacks: Vec<StackProfile>,
}

/// A snapshot read while allocations are in flight can see a free before the allocation it
/// undoes (they update one stack's totals from different CPUs); never show less than zero.
fn clamp(v: i64) -> u64 {
    v.max(0) as u64
}

pub fn aggregate(snapshot: &Snapshot, maps: &ProcMaps) -> Profile {
    let mut stacks: Vec<StackProfile> = snapshot
        .stacks
        .iter()
        .filter(|s| s.allocs > 0 || s.live_allocs != 0)
        .map(|s| StackProfile {
            id: s.id,
            frames: s
                .frames
                .iter()
                .map(|&a| {
                    let n = maps.normalize(a);
                    Frame {
                        address: n.address,
                        module: n.module,
                        offset: n.offset,
                    }
                })
                .collect(),
            live_bytes: clamp(s.live_bytes),
            live_allocs: clamp(s.live_allocs),
            alloc_bytes: s.alloc_bytes,
            allocs: s.allocs,
        })
        .collect();
    stacks.sort_by(|a, b| {
        (b.live_bytes, b.alloc_bytes, b.allocs, a.id).cmp(&(a.live_bytes, a.alloc_bytes, a.allocs, b.id))
    });
    let mut totals = Totals {
        counters: snapshot.counters.clone(),
        ..Totals::default()
    };
    for s in &stacks {
        totals.live_bytes += s.live_bytes;
        totals.live_allocs += s.live_allocs;
        totals.alloc_bytes += s.alloc_bytes;
        totals.allocs += s.allocs;
    }
    Profile { totals, stacks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::StackSample;

    fn sample(id: u64, frames: &[u64], live: i64, count: i64, bytes: u64, allocs: u64) -> StackSample {
        StackSample {
            id,
            frames: frames.to_vec(),
            live_bytes: live,
            live_allocs: count,
            alloc_bytes: bytes,
            allocs,
        }
    }

    fn maps() -> ProcMaps {
        ProcMaps::parse(
            "00400000-00401000 r-xp 00001000 08:01 42 /usr/bin/app\n\
             7f0000000000-7f0000100000 r-xp 00026000 08:01 43 /usr/lib/libc.so.6\n",
        )
        .unwrap()
    }

    #[test]
    fn ranks_by_live_bytes_and_totals_everything() {
        let snap = Snapshot {
            stacks: vec![
                sample(1, &[0x7f0000000010, 0x400100], 100, 1, 300, 3),
                sample(2, &[0x7f0000000010, 0x400200], 5000, 2, 5000, 2),
                sample(3, &[0x7f0000000010, 0x400300], 0, 0, 64_000, 1000),
            ],
            counters: Counters::default(),
        };
        let p = aggregate(&snap, &maps());
        assert_eq!(p.stacks.iter().map(|s| s.id).collect::<Vec<_>>(), vec![2, 1, 3]);
        assert_eq!(p.totals.live_bytes, 5100);
        assert_eq!(p.totals.live_allocs, 3);
        assert_eq!(p.totals.alloc_bytes, 69_300);
        assert_eq!(p.totals.allocs, 1005);
    }

    #[test]
    fn frames_become_module_and_file_offset() {
        let snap = Snapshot {
            stacks: vec![sample(7, &[0x7f0000000010, 0x400123, 0x1234], 8, 1, 8, 1)],
            counters: Counters::default(),
        };
        let f = &aggregate(&snap, &maps()).stacks[0].frames;
        assert_eq!(f[0].module.as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!(f[0].offset, 0x26010);
        assert_eq!(f[1].module.as_deref(), Some("/usr/bin/app"));
        assert_eq!(f[1].offset, 0x1123);
        assert_eq!((f[2].module.clone(), f[2].offset), (None, 0x1234));
    }

    #[test]
    fn in_flight_negative_live_shows_as_zero_and_idle_stacks_are_left_out() {
        let snap = Snapshot {
            stacks: vec![sample(1, &[0x400100], -64, -1, 0, 0), sample(2, &[], 0, 0, 0, 0)],
            counters: Counters::default(),
        };
        let p = aggregate(&snap, &maps());
        assert_eq!(p.stacks.len(), 1);
        assert_eq!((p.stacks[0].live_bytes, p.stacks[0].live_allocs), (0, 0));
    }
}
