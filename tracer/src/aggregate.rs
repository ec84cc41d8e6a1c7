//! From a backend's snapshot to a profile: stacks normalized to module + file offset while
//! the process's memory map is at hand, ranked, and totalled.
use std::{collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};

use crate::{
    memmap::StackMemory,
    probe::{Counters, Snapshot},
    regions::{Origin, StackRanges},
    symbolize::maps::ProcMaps,
    v8::{JsName, JsNamer, capture},
};

/// What kind of call made a stack's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The malloc family.
    Malloc,
    /// mmap and mremap.
    Mmap,
    /// Growth of the program break.
    Brk,
}

/// One frame, normalized: enough to name it later, even after the process is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub address: u64,
    /// Path of the mapped file (or `[vdso]` and the like), as the process sees it.
    pub module: Option<String>,
    /// File offset within `module`, or the address itself when no mapping covers it.
    pub offset: u64,
    /// The JavaScript function running in the frame, when the walker captured it and it was
    /// named (see `v8::namer`).
    pub js: Option<Arc<JsName>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackProfile {
    pub id: u64,
    pub source: Source,
    /// Leaf first; empty for allocations whose stack was lost.
    pub frames: Vec<Frame>,
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    /// mmap/brk: bytes mapped and still mapped, committed or not (live_bytes is committed).
    pub reserved_bytes: Option<u64>,
    /// mmap/brk: bytes of the stack's committed ranges that are in RAM now.
    pub resident_bytes: Option<u64>,
    /// mmap/brk: the memory-map class of the stack's ranges (`thread-stacks`, `v8-heap`, ...).
    pub class: Option<String>,
    /// The most live bytes the stack held at any moment of the recording.
    pub peak_bytes: u64,
    /// Live bytes at each snapshot of the recording (with --interval), the last at its end.
    pub series: Vec<u64>,
    /// Live bytes at the last point of `series` less at the first.
    pub growth_bytes: i64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub live_bytes: u64,
    pub live_allocs: u64,
    pub alloc_bytes: u64,
    pub allocs: u64,
    /// The most live malloc-family bytes seen in all, sampled while recording.
    pub peak_live_bytes: u64,
    pub counters: Counters,
    /// V8 frames the walker captured that could not be named (see `v8::namer`).
    pub unnamed_js_frames: u64,
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

/// `js` names the V8 frames the walker captured (None: none are named).
pub fn aggregate(snapshot: &Snapshot, maps: &ProcMaps, js: Option<&JsNamer>) -> Profile {
    let mut stacks: Vec<StackProfile> = snapshot
        .stacks
        .iter()
        .filter(|s| s.allocs > 0 || s.live_allocs != 0)
        .map(|s| StackProfile {
            id: s.id,
            source: Source::Malloc,
            frames: normalize(&s.frames, maps, js),
            live_bytes: clamp(s.live_bytes),
            live_allocs: clamp(s.live_allocs),
            alloc_bytes: s.alloc_bytes,
            allocs: s.allocs,
            reserved_bytes: None,
            resident_bytes: None,
            class: None,
            peak_bytes: clamp(s.peak_bytes),
            series: Vec::new(),
            growth_bytes: 0,
        })
        .collect();
    sort_by_live(&mut stacks);
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

/// A captured stack's frames, normalized, with the names of its V8 frames' functions.
fn normalize(words: &[u64], maps: &ProcMaps, js: Option<&JsNamer>) -> Vec<Frame> {
    capture::split(words)
        .into_iter()
        .map(|(a, captured)| {
            let n = maps.normalize(a);
            Frame {
                address: n.address,
                module: n.module,
                offset: n.offset,
                js: captured.and_then(|c| js?.lookup(&c)),
            }
        })
        .collect()
}

fn sort_by_live(stacks: &mut [StackProfile]) {
    stacks.sort_by(|a, b| {
        (b.live_bytes, b.alloc_bytes, b.allocs, a.id).cmp(&(a.live_bytes, a.alloc_bytes, a.allocs, b.id))
    });
}

/// Adds the stacks that mapped memory themselves (mmap, mremap, brk) and still hold it or
/// held it while recording, with what they hold in RAM and its class when `held` was
/// measured. Totals stay the malloc family's: glibc's own mappings are already counted
/// there, and the memory map shows the rest.
pub fn add_mapped(
    profile: &mut Profile,
    by_stack: &HashMap<(u64, Origin), StackRanges>,
    held: Option<&StackMemory>,
    mut frames: impl FnMut(u64) -> Vec<u64>,
    maps: &ProcMaps,
    js: Option<&JsNamer>,
) {
    for (&(id, origin), r) in by_stack {
        let source = match origin {
            Origin::Mmap => Source::Mmap,
            Origin::Brk => Source::Brk,
            Origin::BeforeAttach => continue,
        };
        let frames = normalize(&frames(id), maps, js);
        if frames
            .first()
            .and_then(|f| f.module.as_deref())
            .is_some_and(is_dynamic_loader)
        {
            // The loader mapping shared objects (at start-up, or for dlopen): program images,
            // which the memory map shows as code and files, not memory the program asked for.
            continue;
        }
        profile.stacks.push(StackProfile {
            id,
            source,
            frames,
            live_bytes: r.committed_bytes,
            live_allocs: r.regions,
            alloc_bytes: r.mapped_bytes,
            allocs: r.maps,
            reserved_bytes: Some(r.reserved_bytes),
            // A stack with nothing mapped any more holds nothing in RAM either.
            resident_bytes: held.map(|h| h.resident.get(&(id, origin)).copied().unwrap_or(0)),
            class: held.and_then(|h| h.class.get(&(id, origin))).map(|c| c.name().to_owned()),
            peak_bytes: 0,
            series: Vec::new(),
            growth_bytes: 0,
        });
    }
    sort_by_live(&mut profile.stacks);
}

/// glibc's and musl's dynamic loaders, by file name.
fn is_dynamic_loader(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.starts_with("ld-linux") || name.starts_with("ld-musl") || name == "ld.so"
}

/// Live bytes per stack at each snapshot taken while recording.
#[derive(Clone, Debug, Default)]
pub struct History {
    points: Vec<HashMap<(Source, u64), u64>>,
}

impl History {
    pub fn push(&mut self, profile: &Profile) {
        self.points.push(
            profile
                .stacks
                .iter()
                .map(|s| ((s.source, s.id), s.live_bytes))
                .collect(),
        );
    }

    pub fn len(&self) -> usize {
        self.points.len()
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Gives every stack its series and growth, and ranks the stacks by growth (then live
    /// bytes): with two points or more, what grows is what a leak hunt wants first.
    pub fn apply(&self, profile: &mut Profile) {
        if self.points.len() < 2 {
            return;
        }
        for s in &mut profile.stacks {
            s.series = self
                .points
                .iter()
                .map(|p| p.get(&(s.source, s.id)).copied().unwrap_or(0))
                .collect();
            let first = s.series[0] as i64;
            let last = *s.series.last().expect("two points or more") as i64;
            s.growth_bytes = last - first;
        }
        profile.stacks.sort_by(|a, b| {
            (b.growth_bytes, b.live_bytes, a.id).cmp(&(a.growth_bytes, a.live_bytes, b.id))
        });
    }
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
            peak_bytes: live.max(0),
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
        let p = aggregate(&snap, &maps(), None);
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
        let f = &aggregate(&snap, &maps(), None).stacks[0].frames;
        assert_eq!(f[0].module.as_deref(), Some("/usr/lib/libc.so.6"));
        assert_eq!(f[0].offset, 0x26010);
        assert_eq!(f[1].module.as_deref(), Some("/usr/bin/app"));
        assert_eq!(f[1].offset, 0x1123);
        assert_eq!((f[2].module.clone(), f[2].offset), (None, 0x1234));
    }

    #[test]
    fn growth_ranks_first_and_series_fill_missing_points_with_zero() {
        let at = |live_a: i64, live_b: i64| Snapshot {
            stacks: vec![
                sample(1, &[0x400100], live_a, 1, 100, 1),
                sample(2, &[0x400200], live_b, 1, 100, 1),
            ],
            counters: Counters::default(),
        };
        let mut history = History::default();
        history.push(&aggregate(&at(5000, 0), &maps(), None));
        history.push(&aggregate(&at(5000, 100), &maps(), None));
        let mut last = aggregate(&at(5000, 300), &maps(), None);
        history.push(&last);
        history.apply(&mut last);
        // Stack 2 holds less but grows; stack 1 is flat.
        assert_eq!(last.stacks[0].id, 2);
        assert_eq!(last.stacks[0].series, vec![0, 100, 300]);
        assert_eq!(last.stacks[0].growth_bytes, 300);
        assert_eq!((last.stacks[1].series.clone(), last.stacks[1].growth_bytes), (vec![5000, 5000, 5000], 0));
    }

    #[test]
    fn mapped_stacks_join_without_changing_malloc_totals() {
        let mut p = aggregate(
            &Snapshot {
                stacks: vec![sample(1, &[0x400100], 64, 1, 64, 1)],
                counters: Counters::default(),
            },
            &maps(),
            None,
        );
        let mut by_stack = HashMap::new();
        by_stack.insert(
            (9, Origin::Mmap),
            StackRanges { committed_bytes: 8192, reserved_bytes: 16384, regions: 2, mapped_bytes: 20480, maps: 3 },
        );
        add_mapped(&mut p, &by_stack, None, |_| vec![0x400300], &maps(), None);
        // The loader's own mappings are images, not allocations.
        let mut loader = maps();
        loader.update(
            ProcMaps::parse("7f1000000000-7f1000030000 r-xp 00001000 08:01 44 /usr/lib64/ld-linux-x86-64.so.2\n")
                .unwrap(),
        );
        let mut by_loader = HashMap::new();
        by_loader.insert((10, Origin::Mmap), StackRanges { committed_bytes: 4096, ..StackRanges::default() });
        let before = p.stacks.len();
        add_mapped(&mut p, &by_loader, None, |_| vec![0x7f1000000100], &loader, None);
        assert_eq!(p.stacks.len(), before);
        assert_eq!(p.stacks[0].source, Source::Mmap);
        assert_eq!((p.stacks[0].live_bytes, p.stacks[0].reserved_bytes), (8192, Some(16384)));
        assert_eq!(p.totals.live_bytes, 64);
    }

    #[test]
    fn in_flight_negative_live_shows_as_zero_and_idle_stacks_are_left_out() {
        let snap = Snapshot {
            stacks: vec![sample(1, &[0x400100], -64, -1, 0, 0), sample(2, &[], 0, 0, 0, 0)],
            counters: Counters::default(),
        };
        let p = aggregate(&snap, &maps(), None);
        assert_eq!(p.stacks.len(), 1);
        assert_eq!((p.stacks[0].live_bytes, p.stacks[0].live_allocs), (0, 0));
    }
}
