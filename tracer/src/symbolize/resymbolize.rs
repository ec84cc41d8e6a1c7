//! Naming a saved report's frames again from their (module, file offset): after debug files
//! were installed, and to measure symbolization on its own (`cargo xtask symbench`). This is
//! the one place the symbolizer sees a report, because a saved report is all there is.

use std::collections::HashMap;

use super::{FrameKind, SymFrame, Symbolizer};
use crate::report::{Frame, Report};

/// Frames counted while naming a report again.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Real (not inlined) frames looked up.
    pub frames: usize,
    /// Of those, how many got a function name.
    pub named: usize,
}

/// Replaces every native frame's names, files and lines (inlined frames are derived anew),
/// looking each distinct (module, offset) up once. JIT and JS frames are kept as they are: their
/// perf map or heap belonged to a process that is gone.
pub fn resymbolize(report: &mut Report, symbolizer: &mut Symbolizer) -> Resolved {
    let mut counts = Resolved::default();
    let mut named: HashMap<(Option<String>, u64, bool), Vec<SymFrame>> = HashMap::new();
    for stack in &mut report.stacks {
        let old = std::mem::take(&mut stack.frames);
        for (real, f) in old.into_iter().filter(|f| !f.inlined).enumerate() {
            counts.frames += 1;
            if matches!(f.kind, FrameKind::Jit | FrameKind::Js) {
                counts.named += usize::from(f.function.is_some());
                stack.frames.push(f);
            } else {
                let syms = named
                    .entry((f.module.clone(), f.offset, real > 0))
                    .or_insert_with(|| {
                        symbolizer.symbolize_frame(f.module.as_deref(), f.offset, f.address, real > 0)
                    })
                    .clone();
                counts.named += usize::from(syms.last().is_some_and(|s| s.function.is_some()));
                stack.frames.extend(syms.into_iter().map(|sym| Frame {
                    address: f.address,
                    module: f.module.clone(),
                    offset: f.offset,
                    function: sym.function,
                    file: sym.file,
                    line: sym.line,
                    inlined: sym.inlined,
                    kind: sym.kind,
                    column: None,
                    current_line: None,
                }));
            }
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::folded::tests::{frame, report, stack};

    #[test]
    fn names_come_back_from_the_modules_and_jit_frames_stay() {
        // libc's malloc by file offset, with a wrong name the saved report carried.
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        let data = std::fs::read(libc).unwrap();
        let offset = {
            use object::{Object, ObjectSegment, ObjectSymbol};
            let file = object::File::parse(&*data).unwrap();
            let addr = file
                .dynamic_symbols()
                .find(|s| s.name() == Ok("malloc"))
                .unwrap()
                .address();
            file.segments()
                .find_map(|s| {
                    let (off, size) = s.file_range();
                    (s.address() <= addr && addr < s.address() + size)
                        .then(|| addr - s.address() + off)
                })
                .unwrap()
        };
        let mut jit = frame(Some("retain"), None, 0x10);
        jit.kind = FrameKind::Jit;
        let mut stale_inlined = frame(Some("gone"), Some(libc), offset);
        stale_inlined.inlined = true;
        let mut r = report(vec![stack(
            8,
            8,
            vec![
                frame(Some("wrong"), Some(libc), offset),
                stale_inlined,
                jit.clone(),
            ],
        )]);
        let counts = resymbolize(&mut r, &mut Symbolizer::new("/"));
        assert_eq!(
            counts,
            Resolved {
                frames: 2,
                named: 2
            }
        );
        let names: Vec<_> = r.stacks[0]
            .frames
            .iter()
            .filter(|f| !f.inlined)
            .map(|f| f.function.clone())
            .collect();
        assert_eq!(names.first().cloned().flatten().as_deref(), Some("malloc"));
        assert_eq!(
            r.stacks[0].frames.last().unwrap().function.as_deref(),
            Some("retain")
        );
        assert!(
            r.stacks[0]
                .frames
                .iter()
                .all(|f| f.function.as_deref() != Some("gone"))
        );
    }
}
