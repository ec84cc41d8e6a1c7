//! pprof export: a gzipped `profile.proto` heap profile (`alloc_objects`, `alloc_space`,
//! `inuse_objects`, `inuse_space`) that `go tool pprof`, Pyroscope, Grafana and speedscope
//! load. The message types are written out with prost's derive (profile.proto is small and
//! stable), so no protoc is needed at build time.
use std::collections::HashMap;
use std::io::Write;

use flate2::{Compression, write::GzEncoder};
use prost::Message;

use super::{Frame, Report};
use crate::{aggregate::Source, symbolize::FrameKind};

// Field numbers are those of github.com/google/pprof/proto/profile.proto.

#[derive(Clone, PartialEq, Message)]
pub struct Profile {
    #[prost(message, repeated, tag = "1")]
    pub sample_type: Vec<ValueType>,
    #[prost(message, repeated, tag = "2")]
    pub sample: Vec<Sample>,
    #[prost(message, repeated, tag = "3")]
    pub mapping: Vec<Mapping>,
    #[prost(message, repeated, tag = "4")]
    pub location: Vec<Location>,
    #[prost(message, repeated, tag = "5")]
    pub function: Vec<Function>,
    #[prost(string, repeated, tag = "6")]
    pub string_table: Vec<String>,
    #[prost(int64, tag = "9")]
    pub time_nanos: i64,
    #[prost(int64, tag = "10")]
    pub duration_nanos: i64,
    #[prost(message, optional, tag = "11")]
    pub period_type: Option<ValueType>,
    #[prost(int64, tag = "12")]
    pub period: i64,
    #[prost(int64, repeated, tag = "13")]
    pub comment: Vec<i64>,
    #[prost(int64, tag = "14")]
    pub default_sample_type: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ValueType {
    #[prost(int64, tag = "1")]
    pub r#type: i64,
    #[prost(int64, tag = "2")]
    pub unit: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    /// Leaf first.
    #[prost(uint64, repeated, tag = "1")]
    pub location_id: Vec<u64>,
    #[prost(int64, repeated, tag = "2")]
    pub value: Vec<i64>,
    #[prost(message, repeated, tag = "3")]
    pub label: Vec<Label>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(int64, tag = "1")]
    pub key: i64,
    #[prost(int64, tag = "2")]
    pub str: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Mapping {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub memory_start: u64,
    #[prost(uint64, tag = "3")]
    pub memory_limit: u64,
    #[prost(uint64, tag = "4")]
    pub file_offset: u64,
    #[prost(int64, tag = "5")]
    pub filename: i64,
    #[prost(int64, tag = "6")]
    pub build_id: i64,
    #[prost(bool, tag = "7")]
    pub has_functions: bool,
    #[prost(bool, tag = "8")]
    pub has_filenames: bool,
    #[prost(bool, tag = "9")]
    pub has_line_numbers: bool,
    #[prost(bool, tag = "10")]
    pub has_inline_frames: bool,
}

#[derive(Clone, PartialEq, Message)]
pub struct Location {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(uint64, tag = "2")]
    pub mapping_id: u64,
    #[prost(uint64, tag = "3")]
    pub address: u64,
    /// Inlined functions first, the function they were inlined into last.
    #[prost(message, repeated, tag = "4")]
    pub line: Vec<Line>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Line {
    #[prost(uint64, tag = "1")]
    pub function_id: u64,
    #[prost(int64, tag = "2")]
    pub line: i64,
}

#[derive(Clone, PartialEq, Message)]
pub struct Function {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(int64, tag = "2")]
    pub name: i64,
    #[prost(int64, tag = "3")]
    pub system_name: i64,
    #[prost(int64, tag = "4")]
    pub filename: i64,
    #[prost(int64, tag = "5")]
    pub start_line: i64,
}

/// Strings by index, index 0 being "" as the format requires.
#[derive(Default)]
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        let mut s = Strings::default();
        s.get("");
        s
    }

    fn get(&mut self, text: &str) -> i64 {
        if let Some(&i) = self.index.get(text) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(text.to_owned());
        self.index.insert(text.to_owned(), i);
        i
    }
}

/// Builds the profile. `build_id` gives a module's hex build id when it is known (while
/// recording; a saved JSON report does not carry them).
pub fn profile(report: &Report, build_id: &mut dyn FnMut(&str) -> Option<String>) -> Profile {
    let mut strings = Strings::new();
    let value_type = |strings: &mut Strings, t: &str, unit: &str| ValueType {
        r#type: strings.get(t),
        unit: strings.get(unit),
    };
    let sample_type = vec![
        value_type(&mut strings, "alloc_objects", "count"),
        value_type(&mut strings, "alloc_space", "bytes"),
        value_type(&mut strings, "inuse_objects", "count"),
        value_type(&mut strings, "inuse_space", "bytes"),
    ];
    let period_type = Some(value_type(&mut strings, "space", "bytes"));
    let default_sample_type = strings.get("inuse_space");
    let how = match &report.sampling {
        Some(sampling) => format!(
            "sampled every {} bytes on average: the values are estimates (unsampled as pprof does)",
            sampling.sample_bytes
        ),
        None => "every allocation counted, none sampled".to_owned(),
    };
    let comment = vec![strings.get(&format!(
        "tracer: pid {} ({}), recorded {} ms; {how}",
        report.pid, report.command, report.duration_ms
    ))];
    let source_key = strings.get("source");

    // A mapping per (module, load bias): V8's second mapping of node's builtins gets its own.
    let mut mappings: Vec<Mapping> = Vec::new();
    let mut mapping_ids: HashMap<(String, u64), usize> = HashMap::new();
    for frame in report.stacks.iter().flat_map(|s| &s.frames) {
        let Some(module) = &frame.module else {
            continue;
        };
        if frame.kind != FrameKind::Native || !module.starts_with('/') {
            continue;
        }
        let bias = frame.address.wrapping_sub(frame.offset);
        let idx = *mapping_ids
            .entry((module.clone(), bias))
            .or_insert_with(|| {
                mappings.push(Mapping {
                    id: mappings.len() as u64 + 1,
                    memory_start: frame.address,
                    memory_limit: frame.address + 1,
                    file_offset: frame.offset,
                    filename: 0,
                    build_id: 0,
                    has_functions: true,
                    has_filenames: true,
                    has_line_numbers: true,
                    has_inline_frames: true,
                });
                mappings.len() - 1
            });
        let m = &mut mappings[idx];
        if frame.address < m.memory_start {
            m.memory_start = frame.address;
            m.file_offset = frame.offset;
        }
        m.memory_limit = m.memory_limit.max(frame.address + 1);
    }
    // pprof takes the first mapping for the main program: the one named like the command.
    let is_main = |module: &str| module.rsplit('/').next() == Some(report.command.as_str());
    let mut order: Vec<(&(String, u64), usize)> =
        mapping_ids.iter().map(|(k, &i)| (k, i)).collect();
    order.sort_by_key(|((module, _), idx)| (!is_main(module), *idx));
    let mut renumbered: HashMap<(String, u64), usize> = HashMap::new();
    let mut sorted: Vec<Mapping> = Vec::with_capacity(mappings.len());
    for ((module, bias), idx) in order {
        let mut m = mappings[idx].clone();
        m.id = sorted.len() as u64 + 1;
        m.filename = strings.get(module);
        if let Some(id) = build_id(module) {
            m.build_id = strings.get(&id);
        }
        renumbered.insert((module.clone(), *bias), sorted.len());
        sorted.push(m);
    }
    let mappings = sorted;
    let mapping_ids = renumbered;

    // Functions by (name, file); locations by (address, the names at it).
    let mut functions: Vec<Function> = Vec::new();
    let mut function_ids: HashMap<(String, String), u64> = HashMap::new();
    let mut locations: Vec<Location> = Vec::new();
    let mut location_ids: HashMap<(u64, Vec<(u64, i64)>), u64> = HashMap::new();
    let mut samples = Vec::new();
    // A stack the kernel could not capture still holds its bytes: it gets one location, so
    // that pprof's totals are the report's.
    let lost = Frame {
        address: 0,
        module: None,
        offset: 0,
        function: Some("[stack lost]".to_owned()),
        file: None,
        line: None,
        inlined: false,
        kind: FrameKind::Unknown,
        column: None,
        current_line: None,
    };
    for stack in &report.stacks {
        let mut location_id = Vec::new();
        // Frames sharing an address are one location: inlined functions, then their caller.
        let mut group: Vec<&Frame> = Vec::new();
        let frames: Vec<&Frame> = if stack.frames.is_empty() {
            vec![&lost]
        } else {
            stack.frames.iter().collect()
        };
        for (i, frame) in frames.iter().enumerate() {
            group.push(frame);
            let ends =
                !frame.inlined || frames.get(i + 1).is_none_or(|n| n.address != frame.address);
            if !ends {
                continue;
            }
            let mut lines = Vec::new();
            for f in group.drain(..) {
                let name = function_name(f);
                let file = f.file.clone().unwrap_or_default();
                let key = (name.clone(), file.clone());
                let id = match function_ids.get(&key) {
                    Some(&id) => id,
                    None => {
                        let id = functions.len() as u64 + 1;
                        let name_idx = strings.get(&name);
                        let file_idx = strings.get(&file);
                        // V8 gives where a JS function starts, not the line executing in it.
                        let start_line = match f.kind {
                            FrameKind::Jit | FrameKind::Js => f.line.map_or(0, i64::from),
                            _ => 0,
                        };
                        functions.push(Function {
                            id,
                            name: name_idx,
                            system_name: name_idx,
                            filename: file_idx,
                            start_line,
                        });
                        function_ids.insert(key, id);
                        id
                    }
                };
                let line = match f.kind {
                    FrameKind::Jit | FrameKind::Js => 0,
                    _ => f.line.map_or(0, i64::from),
                };
                lines.push((id, line));
            }
            let address = frame.address;
            let key = (address, lines.clone());
            let id = match location_ids.get(&key) {
                Some(&id) => id,
                None => {
                    let id = locations.len() as u64 + 1;
                    let mapping_id = frame
                        .module
                        .as_ref()
                        .and_then(|m| {
                            mapping_ids.get(&(m.clone(), address.wrapping_sub(frame.offset)))
                        })
                        .map_or(0, |&idx| mappings[idx].id);
                    locations.push(Location {
                        id,
                        mapping_id,
                        address,
                        line: lines
                            .iter()
                            .map(|&(function_id, line)| Line { function_id, line })
                            .collect(),
                    });
                    location_ids.insert(key, id);
                    id
                }
            };
            location_id.push(id);
        }
        let source = match stack.source {
            Source::Malloc => "malloc",
            Source::Mmap => "mmap",
            Source::Brk => "brk",
        };
        let label = vec![Label {
            key: source_key,
            str: strings.get(source),
        }];
        let v = |x: u64| i64::try_from(x).unwrap_or(i64::MAX);
        samples.push(Sample {
            location_id,
            value: vec![
                v(stack.allocs),
                v(stack.alloc_bytes),
                v(stack.live_allocs),
                v(stack.live_bytes),
            ],
            label,
        });
    }

    Profile {
        sample_type,
        sample: samples,
        mapping: mappings,
        location: locations,
        function: functions,
        string_table: strings.table,
        time_nanos: 0,
        duration_nanos: i64::try_from(report.duration_ms)
            .unwrap_or(i64::MAX)
            .saturating_mul(1_000_000),
        period_type,
        // The sampling interval in bytes, as Go's heap profiles give it; 1 when not sampled.
        period: report.sampling.as_ref().map_or(1, |s| s.sample_bytes as i64),
        comment,
        default_sample_type,
    }
}

/// Names as the report shows them, so `go tool pprof` and the text report agree.
fn function_name(f: &Frame) -> String {
    match (&f.function, f.kind) {
        (Some(name), _) => name.clone(),
        (None, FrameKind::Jit) => format!("[jit] {:#x}", f.address),
        (None, _) => match &f.module {
            Some(module) => {
                let base = module.rsplit('/').next().unwrap_or(module);
                format!("{base}+{:#x}", f.offset)
            }
            None => format!("[unknown] {:#x}", f.address),
        },
    }
}

/// Writes the gzipped profile.
pub fn write(
    report: &Report,
    build_id: &mut dyn FnMut(&str) -> Option<String>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let bytes = profile(report, build_id).encode_to_vec();
    let mut gz = GzEncoder::new(out, Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::report::folded::tests::{frame, report, stack};

    #[test]
    fn round_trips_with_inlined_frames_in_one_location() {
        let mut inlined = frame(Some("helper"), Some("/bin/app"), 0x1100);
        inlined.inlined = true;
        inlined.file = Some("/src/app.c".into());
        inlined.line = Some(7);
        let mut caller = frame(Some("main"), Some("/bin/app"), 0x1100);
        caller.file = Some("/src/app.c".into());
        caller.line = Some(20);
        let r = report(vec![stack(
            64,
            128,
            vec![
                frame(Some("malloc"), Some("/lib/libc.so.6"), 0x98000),
                inlined,
                caller,
            ],
        )]);
        let mut gz = Vec::new();
        write(
            &r,
            &mut |m: &str| (m == "/bin/app").then(|| "abcd".to_owned()),
            &mut gz,
        )
        .unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut raw)
            .unwrap();
        let p = Profile::decode(&raw[..]).unwrap();
        let s = |i: i64| p.string_table[i as usize].as_str();

        assert_eq!(s(0), "");
        let types: Vec<_> = p
            .sample_type
            .iter()
            .map(|t| (s(t.r#type), s(t.unit)))
            .collect();
        assert_eq!(
            types,
            [
                ("alloc_objects", "count"),
                ("alloc_space", "bytes"),
                ("inuse_objects", "count"),
                ("inuse_space", "bytes")
            ]
        );
        assert_eq!(p.sample.len(), 1);
        assert_eq!(p.sample[0].value, [2, 128, 1, 64]);
        assert_eq!(
            p.sample[0].location_id.len(),
            2,
            "helper and main share a location"
        );
        let loc = &p.location[p.sample[0].location_id[1] as usize - 1];
        let names: Vec<_> = loc
            .line
            .iter()
            .map(|l| (s(p.function[l.function_id as usize - 1].name), l.line))
            .collect();
        assert_eq!(names, [("helper", 7), ("main", 20)]);
        let app = p
            .mapping
            .iter()
            .find(|m| s(m.filename) == "/bin/app")
            .unwrap();
        assert_eq!(s(app.build_id), "abcd");
        assert!(app.memory_start <= loc.address && loc.address < app.memory_limit);
        let libc = p
            .mapping
            .iter()
            .find(|m| s(m.filename) == "/lib/libc.so.6")
            .unwrap();
        assert_eq!(libc.build_id, 0);
    }
}
