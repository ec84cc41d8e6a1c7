//! What `tracer top` shows, as plain lines computed from a report: the header (totals, memory
//! map), one row per stack with its telling frame, the expanded stack, the keys. No terminal
//! here; `view` draws these lines.
use std::collections::HashMap;
use std::path::Path;

use crate::{
    aggregate::{Profile, Source},
    memmap::ClassTotals,
    report::{Frame, Report, Stack, folded::Metric, telling::telling_frame, text::human_bytes},
    symbolize::FrameKind,
};

/// What the stacks are ordered by; one key each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SortKey {
    /// Live bytes for malloc stacks, resident bytes for mmap/brk stacks.
    Held,
    /// Live bytes now less when the view started.
    Growth,
    /// The most live bytes the stack held at once.
    Peak,
    /// Bytes allocated since the view started, freed or not.
    Allocated,
}

impl SortKey {
    pub const ALL: [SortKey; 4] = [SortKey::Held, SortKey::Growth, SortKey::Peak, SortKey::Allocated];

    pub fn name(self) -> &'static str {
        match self {
            SortKey::Held => "held",
            SortKey::Growth => "growth",
            SortKey::Peak => "peak",
            SortKey::Allocated => "allocated",
        }
    }

    /// The report metric that ranks the same way (for growth: the stacks that grew).
    pub fn metric(self) -> Metric {
        match self {
            SortKey::Held => Metric::Held,
            SortKey::Growth => Metric::Growth,
            SortKey::Peak => Metric::Peak,
            SortKey::Allocated => Metric::Allocated,
        }
    }

    /// The stack's figure under this key; growth keeps its sign, so shrinking stacks sort last.
    pub fn value(self, stack: &Stack) -> i128 {
        match self {
            SortKey::Growth => i128::from(stack.growth_bytes),
            other => i128::from(other.metric().of(stack)),
        }
    }
}

/// Orders `stacks` by `key`, most first; ties by what they hold, then by bytes allocated.
pub fn rank(stacks: &mut [Stack], key: SortKey) {
    stacks.sort_by_key(|s| {
        std::cmp::Reverse((key.value(s), Metric::Held.of(s), s.alloc_bytes))
    });
}

/// Live bytes per stack when the view started, the zero point of `growth`.
#[derive(Clone, Debug, Default)]
pub struct Baseline(HashMap<(Source, u64), u64>);

impl Baseline {
    pub fn of(profile: &Profile) -> Baseline {
        Baseline(profile.stacks.iter().map(|s| ((s.source, s.id), s.live_bytes)).collect())
    }

    /// Sets every stack's growth: live bytes now less at the start (a stack that did not exist
    /// then grew by all it holds).
    pub fn apply(&self, profile: &mut Profile) {
        for s in &mut profile.stacks {
            let before = self.0.get(&(s.source, s.id)).copied().unwrap_or(0);
            s.growth_bytes = s.live_bytes as i64 - before as i64;
        }
    }
}

/// Identifies a stack across refreshes (its rank changes): its source and raw frames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackId {
    source: Source,
    frames: Vec<(Option<String>, u64)>,
}

impl StackId {
    pub fn of(stack: &Stack) -> StackId {
        StackId {
            source: stack.source,
            frames: stack.frames.iter().map(|f| (f.module.clone(), f.address)).collect(),
        }
    }
}

/// A key press, as far as the view cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Up,
    Down,
    /// Expand the selected stack, or fold it back.
    Toggle,
    Sort(SortKey),
    /// Growth counts from now on.
    ResetGrowth,
    Quit,
}

impl Key {
    /// The key for a character typed.
    pub fn of_char(c: char) -> Option<Key> {
        Some(match c {
            'q' | 'Q' => Key::Quit,
            'h' => Key::Sort(SortKey::Held),
            'g' => Key::Sort(SortKey::Growth),
            'p' => Key::Sort(SortKey::Peak),
            'a' => Key::Sort(SortKey::Allocated),
            'r' => Key::ResetGrowth,
            'k' => Key::Up,
            'j' => Key::Down,
            ' ' | 'e' | 'x' => Key::Toggle,
            _ => return None,
        })
    }
}

/// What the user chose: the order, the selected stack, whether it is expanded.
#[derive(Clone, Debug)]
pub struct State {
    pub key: SortKey,
    pub selected: usize,
    pub selected_id: Option<StackId>,
    pub expanded: bool,
}

impl Default for State {
    fn default() -> Self {
        State {
            key: SortKey::Held,
            selected: 0,
            selected_id: None,
            expanded: false,
        }
    }
}

/// What a key asks of the program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Redraw from the stacks at hand.
    Redraw,
    /// Rank again (the order changed) and redraw.
    Rerank,
    /// Take the figures now as growth's zero point, rank again and redraw.
    ResetGrowth,
    Quit,
}

impl State {
    /// Applies `key` with `stacks` on screen.
    pub fn handle(&mut self, key: Key, stacks: &[Stack]) -> Action {
        match key {
            Key::Quit => return Action::Quit,
            Key::ResetGrowth => return Action::ResetGrowth,
            Key::Up => self.selected = self.selected.saturating_sub(1),
            Key::Down => self.selected = (self.selected + 1).min(stacks.len().saturating_sub(1)),
            Key::Toggle => self.expanded = !self.expanded,
            Key::Sort(k) => {
                self.key = k;
                // A new order starts at its top.
                self.selected = 0;
                self.selected_id = None;
                return Action::Rerank;
            }
        }
        self.selected_id = stacks.get(self.selected).map(StackId::of);
        Action::Redraw
    }

    /// Once the user has picked a stack, keeps the selection on it when new figures reorder
    /// the rows (on the same row when it left the screen); until then it stays on the row.
    pub fn follow(&mut self, stacks: &[Stack]) {
        if let Some(i) = self
            .selected_id
            .as_ref()
            .and_then(|id| stacks.iter().position(|s| StackId::of(s) == *id))
        {
            self.selected = i;
        }
        self.selected = self.selected.min(stacks.len().saturating_sub(1));
        if self.selected_id.is_some() {
            self.selected_id = stacks.get(self.selected).map(StackId::of);
        }
    }
}

/// Whether the target still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetState {
    Running,
    /// Gone; a launched command's exit status when known.
    Exited(Option<i32>),
}

/// Everything a screen is made from.
pub struct Input<'a> {
    /// Stacks ranked by the state's key, the first ones named.
    pub report: &'a Report,
    pub memory_map: Option<&'a [ClassTotals]>,
    pub target: TargetState,
    /// Where a launched command's output goes.
    pub command_output: Option<&'a Path>,
    /// Seconds into the recording when growth started counting (0, or the last `r`).
    pub growth_from_s: u64,
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Title,
    Plain,
    /// Something the user must notice (the target exited).
    Notice,
    TableHeader,
    Selected,
    /// A frame of the expanded stack; the telling one is `Telling`.
    Frame,
    Telling,
    Keys,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub text: String,
    pub style: Style,
    /// Characters to emphasize (the sorted column of the table header).
    pub emphasis: Option<std::ops::Range<usize>>,
}

impl Line {
    fn new(text: String, style: Style, width: usize) -> Line {
        Line {
            text: fit(&text, width),
            style,
            emphasis: None,
        }
    }
}

/// Lines above the table: title, totals, memory map (up to two lines), the target's state.
const HEADER_MAX: usize = 6;
/// The table header, the blank line above it and the keys line at the bottom.
const CHROME: usize = 3;

/// How many stacks a screen of `height` lines lists (the ones whose frames need names).
pub fn rows_for(height: usize) -> usize {
    height.saturating_sub(HEADER_MAX + CHROME).max(1)
}

/// The screen for `input` and `state`, `width` columns by `height` lines at most.
pub fn screen(input: &Input, state: &State, width: usize, height: usize) -> Vec<Line> {
    let mut lines = header(input, state.key, width);
    let stacks = &input.report.stacks;
    lines.push(Line::new(String::new(), Style::Plain, width));
    lines.push(table_header(state.key, width));
    let room = height.saturating_sub(lines.len() + 1);
    let selected = state.selected.min(stacks.len().saturating_sub(1));
    let (first, shown, details) = if state.expanded && !stacks.is_empty() {
        // A few rows around the selection, the rest for its frames.
        let shown = (room / 3).clamp(1, 5).min(stacks.len());
        let first = selected.saturating_sub(shown / 2).min(stacks.len() - shown);
        let details = expanded(stacks, selected, input.report.stacks_total, width, room.saturating_sub(shown));
        (first, shown, details)
    } else {
        (0, room.min(stacks.len()), Vec::new())
    };
    if stacks.is_empty() {
        lines.push(Line::new("  no allocations seen yet".into(), Style::Plain, width));
    }
    for (i, s) in stacks.iter().enumerate().skip(first).take(shown) {
        let style = if i == selected { Style::Selected } else { Style::Plain };
        lines.push(Line::new(row(s, width), style, width));
    }
    lines.extend(details);
    // The keys go on the last line, whatever the table left empty.
    while lines.len() + 1 < height {
        lines.push(Line::new(String::new(), Style::Plain, width));
    }
    lines.truncate(height.saturating_sub(1));
    lines.push(Line::new(keys_line(state), Style::Keys, width));
    lines
}

fn header(input: &Input, key: SortKey, width: usize) -> Vec<Line> {
    let r = input.report;
    let t = &r.totals;
    let mut lines = vec![Line::new(
        format!(
            "tracer top  pid {} ({})  {:.0} s  sorted by {}{}",
            r.pid,
            r.command,
            r.duration_ms as f64 / 1000.0,
            key.name(),
            match (key, input.growth_from_s) {
                (SortKey::Growth, 0) => " since start".to_owned(),
                (SortKey::Growth, s) => format!(" since {s} s"),
                _ => String::new(),
            },
        ),
        Style::Title,
        width,
    )];
    let estimated = if r.sampling.is_some() { " (estimated)" } else { "" };
    let dropped: u64 = t.dropped.values().sum();
    // Losses lead the line when there are any, so that no width can cut them off.
    let losses = if dropped == 0 { String::new() } else { format!("DROPPED {dropped}  ") };
    lines.push(Line::new(
        format!(
            "{losses}live {} in {} allocs{estimated}{}  allocated {} in {}{}",
            human_bytes(t.live_bytes),
            t.live_allocs,
            // The peak is sampled; a sample older than the live figure can be below it.
            match t.peak_live_bytes {
                0 => String::new(),
                peak => format!(", peak {}", human_bytes(peak.max(t.live_bytes))),
            },
            human_bytes(t.alloc_bytes),
            t.allocs,
            if dropped == 0 { "  dropped none" } else { "" },
        ),
        Style::Plain,
        width,
    ));
    if let Some(classes) = input.memory_map {
        lines.extend(memory_lines(classes, width).into_iter().map(|l| Line::new(l, Style::Plain, width)));
    }
    if let TargetState::Exited(code) = input.target {
        let status = code.map(|c| format!(" with status {c}")).unwrap_or_default();
        lines.push(Line::new(
            format!("pid {} exited{status}; the figures are as it left them", r.pid),
            Style::Notice,
            width,
        ));
    }
    if let Some(path) = input.command_output {
        lines.push(Line::new(format!("output: {}", path.display()), Style::Plain, width));
    }
    lines.truncate(HEADER_MAX);
    lines
}

/// `rss 13.2 MiB: malloc 12.1 MiB  code 1.0 MiB ...`, on two lines at most: the classes
/// holding RAM, biggest first.
pub fn memory_lines(classes: &[ClassTotals], width: usize) -> Vec<String> {
    let total: u64 = classes.iter().map(|c| c.rss_bytes).sum();
    let mut held: Vec<&ClassTotals> = classes.iter().filter(|c| c.rss_bytes > 0).collect();
    held.sort_by_key(|c| std::cmp::Reverse(c.rss_bytes));
    let mut lines = vec![format!("rss {}:", human_bytes(total))];
    for c in held {
        let change = match c.rss_delta_bytes {
            0 => String::new(),
            d => format!(" ({}{})", if d < 0 { "-" } else { "+" }, human_bytes(d.unsigned_abs())),
        };
        let item = format!("{} {}{change}", c.class, human_bytes(c.rss_bytes));
        let last = lines.last_mut().expect("one line");
        if last.chars().count() + 2 + item.chars().count() <= width {
            last.push_str("  ");
            last.push_str(&item);
        } else if lines.len() < 2 {
            lines.push(format!("    {item}"));
        } else {
            break;
        }
    }
    lines
}

/// Column widths of the table: held, growth, peak, allocated.
const COLUMNS: [(SortKey, usize); 4] =
    [(SortKey::Held, 10), (SortKey::Growth, 11), (SortKey::Peak, 10), (SortKey::Allocated, 10)];

fn table_header(key: SortKey, width: usize) -> Line {
    let mut text = String::new();
    let mut emphasis = None;
    for (k, w) in COLUMNS {
        text.push(' ');
        let start = text.len();
        text.push_str(&format!("{:>w$}", k.name()));
        if k == key {
            emphasis = Some(start..text.len());
        }
    }
    text.push_str("  caller");
    let mut line = Line::new(text, Style::TableHeader, width);
    line.emphasis = emphasis.filter(|r| r.end <= line.text.len());
    line
}

fn signed(bytes: i64) -> String {
    match bytes {
        0 => "0 B".to_owned(),
        b if b < 0 => format!("-{}", human_bytes(b.unsigned_abs())),
        b => format!("+{}", human_bytes(b as u64)),
    }
}

/// One stack on one line: its figures, then its telling frame.
pub fn row(stack: &Stack, width: usize) -> String {
    let [held, growth, peak, allocated] = COLUMNS.map(|(_, w)| w);
    let source = match stack.source {
        Source::Malloc => "",
        Source::Mmap => "[mmap] ",
        Source::Brk => "[brk] ",
    };
    let text = format!(
        " {:>held$} {:>growth$} {:>peak$} {:>allocated$}  {source}{}",
        human_bytes(Metric::Held.of(stack)),
        signed(stack.growth_bytes),
        human_bytes(stack.peak_bytes),
        human_bytes(stack.alloc_bytes),
        caller(stack),
    );
    fit(&text, width)
}

/// The telling frame, short: function without its parameter list, then file:line.
pub fn caller(stack: &Stack) -> String {
    let Some(i) = telling_frame(&stack.frames) else {
        return if stack.frames.is_empty() {
            "[stack lost]".to_owned()
        } else {
            "[inside the allocator]".to_owned()
        };
    };
    let f = &stack.frames[i];
    let name = match (&f.function, f.kind) {
        (Some(function), _) => without_parameters(function).to_owned(),
        (None, FrameKind::Jit) => format!("[jit] {:#x}", f.address),
        (None, _) => format!("{}+{:#x}", module_name(f), f.offset),
    };
    match place(f) {
        Some(place) => format!("{name}  {place}"),
        None => name,
    }
}

fn module_name(f: &Frame) -> &str {
    f.module
        .as_deref()
        .map(|m| m.rsplit('/').next().unwrap_or(m))
        .unwrap_or("[unknown]")
}

/// `file.c:12`, the file without its directories.
fn place(f: &Frame) -> Option<String> {
    let file = f.file.as_deref()?;
    let base = file.rsplit('/').next().unwrap_or(file);
    Some(match f.line {
        Some(line) => format!("{base}:{line}"),
        None => base.to_owned(),
    })
}

/// `ns::Cache::grow(unsigned long) const` -> `ns::Cache::grow`; C names stay as they are.
pub fn without_parameters(name: &str) -> &str {
    let trimmed = name.trim_end_matches(" const");
    if !trimmed.ends_with(')') {
        return name;
    }
    let mut depth = 0usize;
    for (i, c) in trimmed.char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' => {
                depth -= 1;
                if depth == 0 {
                    return if i == 0 { name } else { &trimmed[..i] };
                }
            }
            _ => {}
        }
    }
    name
}

/// The selected stack: its figures, then every frame, the telling one marked.
fn expanded(stacks: &[Stack], selected: usize, total: usize, width: usize, room: usize) -> Vec<Line> {
    let s = &stacks[selected];
    let mut lines = vec![Line::new(
        format!(
            "#{} of {total}: live {} in {} allocs, allocated {} in {}{}{} (leaf first)",
            selected + 1,
            human_bytes(s.live_bytes),
            s.live_allocs,
            human_bytes(s.alloc_bytes),
            s.allocs,
            s.resident_bytes.map(|r| format!(", resident {}", human_bytes(r))).unwrap_or_default(),
            s.class.as_deref().map(|c| format!(", {c}")).unwrap_or_default(),
        ),
        Style::Title,
        width,
    )];
    let telling = telling_frame(&s.frames);
    let room = room.saturating_sub(lines.len());
    let fits = if s.frames.len() <= room { s.frames.len() } else { room.saturating_sub(1) };
    for (i, f) in s.frames.iter().enumerate().take(fits) {
        let mark = if Some(i) == telling { ">" } else { " " };
        let style = if Some(i) == telling { Style::Telling } else { Style::Frame };
        lines.push(Line::new(format!("{mark} {}", frame_line(f)), style, width));
    }
    if fits < s.frames.len() && room > 0 {
        lines.push(Line::new(
            format!("  ... {} more frames", s.frames.len() - fits),
            Style::Frame,
            width,
        ));
    }
    lines.truncate(room + 1);
    lines
}

/// One frame: function, then where it is.
pub fn frame_line(f: &Frame) -> String {
    let inlined = if f.inlined { "[inlined] " } else { "" };
    let at = match place(f) {
        Some(place) => format!("  {place}"),
        None => String::new(),
    };
    match (&f.function, f.kind) {
        (Some(function), FrameKind::Jit) => format!("{function}  [jit]{at}"),
        (Some(function), FrameKind::Js) => format!("{function}  [js]{at}"),
        (Some(function), _) => format!("{inlined}{function}  {}+{:#x}{at}", module_name(f), f.offset),
        (None, FrameKind::Jit) => format!("[jit] {:#x}", f.address),
        (None, _) => format!("{}+{:#x}", module_name(f), f.offset),
    }
}

fn keys_line(state: &State) -> String {
    let expand = if state.expanded { "enter fold" } else { "enter expand" };
    // The sort keys are the initials of the column names.
    format!("keys: up/down select, {expand}, h g p a sort, r reset growth, q quit")
}

/// `text` cut to `width` characters, `…` marking a cut.
pub fn fit(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    if width == 0 {
        return String::new();
    }
    let mut cut: String = text.chars().take(width - 1).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::StackProfile;
    use crate::report::Totals;

    fn frame(function: &str, file: Option<&str>, line: Option<u32>) -> Frame {
        Frame {
            address: 0x401000 + function.len() as u64,
            module: Some("/usr/bin/app".into()),
            offset: 0x1000 + function.len() as u64,
            function: Some(function.into()),
            file: file.map(str::to_owned),
            line,
            inlined: false,
            kind: FrameKind::Native,
            column: None,
            current_line: None,
        }
    }

    fn stack(caller: &str, live: u64, growth: i64, peak: u64, allocated: u64) -> Stack {
        Stack {
            source: Source::Malloc,
            live_bytes: live,
            live_allocs: 1,
            alloc_bytes: allocated,
            allocs: 1,
            reserved_bytes: None,
            resident_bytes: None,
            class: None,
            peak_bytes: peak,
            variants: 1,
            growth_bytes: growth,
            series: Vec::new(),
            frames: vec![
                frame("malloc", Some("./malloc/malloc.c"), Some(3281)),
                frame(caller, Some("/src/app.c"), Some(42)),
                frame("main", Some("/src/app.c"), Some(90)),
            ],
        }
    }

    fn report(stacks: Vec<Stack>) -> Report {
        Report {
            pid: 4242,
            command: "app".into(),
            duration_ms: 12_000,
            totals: Totals {
                live_bytes: stacks.iter().map(|s| s.live_bytes).sum(),
                live_allocs: stacks.len() as u64,
                alloc_bytes: stacks.iter().map(|s| s.alloc_bytes).sum(),
                allocs: stacks.len() as u64,
                frees: 0,
                unmatched_frees: 0,
                failed_allocs: 0,
                peak_live_bytes: 0,
                unnamed_js_frames: 0,
                dropped: Default::default(),
            },
            stacks_total: stacks.len(),
            stacks,
            memory_map: None,
            allocator: None,
            interval_ms: None,
            min_age_ms: None,
            sampling: None,
            metric: Metric::Held,
            peak_fallback: false,
        }
    }

    fn callers(stacks: &[Stack]) -> Vec<String> {
        stacks.iter().map(caller).collect()
    }

    fn four() -> Vec<Stack> {
        vec![
            stack("holds_most", 9000, 0, 9000, 9000),
            stack("grows", 3000, 3000, 3000, 3000),
            stack("peaked", 100, -5000, 20_000, 20_000),
            stack("churns", 0, 0, 64, 1_000_000),
        ]
    }

    #[test]
    fn each_key_orders_the_stacks_its_own_way() {
        let mut s = four();
        let expect = |s: &[Stack], want: [&str; 4]| {
            let got = callers(s);
            let got: Vec<&str> = got.iter().map(|c| c.split("  ").next().unwrap()).collect();
            assert_eq!(got, want);
        };
        rank(&mut s, SortKey::Held);
        expect(&s, ["holds_most", "grows", "peaked", "churns"]);
        rank(&mut s, SortKey::Growth);
        // Shrinking stacks go last, below the flat ones.
        expect(&s, ["grows", "holds_most", "churns", "peaked"]);
        rank(&mut s, SortKey::Peak);
        expect(&s, ["peaked", "holds_most", "grows", "churns"]);
        rank(&mut s, SortKey::Allocated);
        expect(&s, ["churns", "peaked", "holds_most", "grows"]);
    }

    #[test]
    fn held_means_resident_bytes_for_mapped_stacks() {
        let mut mapped = stack("maps_a_lot", 1 << 30, 0, 0, 1 << 30);
        mapped.source = Source::Mmap;
        mapped.resident_bytes = Some(4096);
        let mut s = vec![mapped, stack("mallocs", 8192, 0, 8192, 8192)];
        rank(&mut s, SortKey::Held);
        assert_eq!(caller(&s[0]), "mallocs  app.c:42");
        assert!(row(&s[1], 80).contains("[mmap] maps_a_lot"), "{}", row(&s[1], 80));
    }

    #[test]
    fn growth_is_against_the_first_view() {
        let sp = |id, live| StackProfile {
            id,
            source: Source::Malloc,
            frames: Vec::new(),
            live_bytes: live,
            live_allocs: 1,
            alloc_bytes: live,
            allocs: 1,
            reserved_bytes: None,
            resident_bytes: None,
            class: None,
            peak_bytes: live,
            series: Vec::new(),
            growth_bytes: 0,
        };
        let first = Profile { totals: Default::default(), stacks: vec![sp(1, 100), sp(2, 500)] };
        let baseline = Baseline::of(&first);
        let mut now = Profile { totals: Default::default(), stacks: vec![sp(1, 400), sp(2, 200), sp(3, 50)] };
        baseline.apply(&mut now);
        let growth: Vec<i64> = now.stacks.iter().map(|s| s.growth_bytes).collect();
        assert_eq!(growth, vec![300, -300, 50]);
    }

    #[test]
    fn the_row_names_the_caller_of_the_allocator_not_malloc() {
        let s = stack("cache_insert", 76_800, 76_800, 76_800, 76_800);
        let r = row(&s, 80);
        assert_eq!(r, "   75.0 KiB   +75.0 KiB   75.0 KiB   75.0 KiB  cache_insert  app.c:42");
        // C++: the parameter list goes, the class stays.
        let mut cpp = s.clone();
        cpp.frames[1].function = Some("ns::Cache::grow(std::vector<int, std::allocator<int> > const&) const".into());
        cpp.frames.insert(1, frame("operator new(unsigned long)", None, None));
        assert_eq!(caller(&cpp), "ns::Cache::grow  app.c:42");
    }

    #[test]
    fn parameter_lists_come_off_only_at_the_end() {
        assert_eq!(without_parameters("f"), "f");
        assert_eq!(without_parameters("(anonymous namespace)::g(int)"), "(anonymous namespace)::g");
        assert_eq!(without_parameters("h(void (*)(int))"), "h");
        assert_eq!(without_parameters("std::function<void ()>::operator()() const"), "std::function<void ()>::operator()");
    }

    #[test]
    fn every_line_fits_80_columns_and_24_lines() {
        let mut long = stack(&"very_long_function_name_".repeat(10), 1 << 40, 1 << 40, 1 << 40, 1 << 40);
        long.frames[1].file = Some(format!("/{}/x.c", "deep/".repeat(30)));
        let mut stacks = vec![long];
        for i in 0..40 {
            stacks.push(stack(&format!("f{i}"), 1000 - i, 0, 1000, 1000));
        }
        let mut rep = report(stacks);
        rep.totals.alloc_bytes = 7 << 30;
        rep.totals.allocs = 1_914_881;
        rep.totals.dropped.insert("stack_map_full".into(), 1234);
        let classes: Vec<ClassTotals> = ["v8-heap", "malloc", "thread-stacks", "code", "jit", "file", "anon-other"]
            .iter()
            .map(|c| ClassTotals {
                class: (*c).into(),
                mappings: 3,
                reserved_bytes: 1 << 33,
                rss_bytes: 1023 << 30,
                rss_delta_bytes: -(1023 << 30),
            })
            .collect();
        let input = Input {
            report: &rep,
            memory_map: Some(&classes),
            target: TargetState::Exited(Some(137)),
            command_output: Some(Path::new("/tmp/tracer-top-123456.log")),
            growth_from_s: 0,
        };
        for expanded in [false, true] {
            let state = State { expanded, ..State::default() };
            let lines = screen(&input, &state, 80, 24);
            assert_eq!(lines.len(), 24, "expanded={expanded}: {lines:#?}");
            for l in &lines {
                assert!(l.text.chars().count() <= 80, "longer than 80: {:?}", l.text);
            }
            assert!(lines[0].text.starts_with("tracer top  pid 4242 (app)  12 s  sorted by held"));
            assert!(lines.last().unwrap().text.contains("q quit"));
            assert!(lines.iter().any(|l| l.text.contains("exited with status 137")));
            assert!(lines[1].text.starts_with("DROPPED 1234  live "), "{:?}", lines[1].text);
            assert!(lines.iter().any(|l| l.style == Style::Selected && l.text.contains("very_long_function_name_")));
        }
        assert!(fit("abcdef", 4) == "abc…");
    }

    #[test]
    fn expanding_shows_the_frames_with_the_telling_one_marked() {
        let rep = report(four());
        let input = Input { report: &rep, memory_map: None, target: TargetState::Running, command_output: None, growth_from_s: 0 };
        let mut state = State::default();
        assert_eq!(state.handle(Key::Down, &rep.stacks), Action::Redraw);
        state.handle(Key::Toggle, &rep.stacks);
        let lines = screen(&input, &state, 80, 24);
        let frames: Vec<&Line> = lines.iter().filter(|l| matches!(l.style, Style::Frame | Style::Telling)).collect();
        let text: Vec<&str> = frames.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(
            text,
            [
                "  malloc  app+0x1006  malloc.c:3281",
                "> grows  app+0x1005  app.c:42",
                "  main  app+0x1004  app.c:90",
            ]
        );
        assert_eq!(frames[1].style, Style::Telling);
        assert!(lines.iter().any(|l| l.text.starts_with("#2 of 4: live 2.9 KiB")), "{lines:#?}");
        // Folding hides them again.
        state.handle(Key::Toggle, &rep.stacks);
        assert!(!screen(&input, &state, 80, 24).iter().any(|l| l.style == Style::Telling));
    }

    #[test]
    fn a_long_stack_is_cut_with_a_count_of_what_is_left() {
        let mut s = stack("deep", 10, 0, 10, 10);
        for i in 0..40 {
            s.frames.push(frame(&format!("level{i}"), None, None));
        }
        let rep = report(vec![s]);
        let input = Input { report: &rep, memory_map: None, target: TargetState::Running, command_output: None, growth_from_s: 0 };
        let state = State { expanded: true, ..State::default() };
        let lines = screen(&input, &state, 80, 24);
        assert_eq!(lines.len(), 24);
        assert!(lines.iter().any(|l| l.text.contains("more frames")), "{lines:#?}");
    }

    #[test]
    fn selection_follows_its_stack_when_the_order_changes_and_sorting_resets_it() {
        let mut stacks = four();
        let mut state = State::default();
        // Untouched, the selection stays on the top row whatever is there.
        state.follow(&stacks);
        stacks.swap(0, 1);
        state.follow(&stacks);
        assert_eq!(state.selected, 0);
        stacks.swap(0, 1);
        state.handle(Key::Down, &stacks);
        assert_eq!(caller(&stacks[state.selected]), "grows  app.c:42");
        stacks.swap(0, 1);
        state.follow(&stacks);
        assert_eq!(state.selected, 0);
        assert_eq!(state.handle(Key::Sort(SortKey::Peak), &stacks), Action::Rerank);
        assert_eq!((state.key, state.selected), (SortKey::Peak, 0));
        // The selection stops at both ends.
        state.handle(Key::Up, &stacks);
        assert_eq!(state.selected, 0);
        for _ in 0..10 {
            state.handle(Key::Down, &stacks);
        }
        assert_eq!(state.selected, 3);
        assert_eq!(Key::of_char('q'), Some(Key::Quit));
        assert_eq!(Key::of_char('g'), Some(Key::Sort(SortKey::Growth)));
        assert_eq!(state.handle(Key::ResetGrowth, &stacks), Action::ResetGrowth);
    }

    #[test]
    fn memory_classes_with_ram_biggest_first_on_two_lines_at_most() {
        let c = |class: &str, rss: u64, delta: i64| ClassTotals {
            class: class.into(),
            mappings: 1,
            reserved_bytes: rss,
            rss_bytes: rss,
            rss_delta_bytes: delta,
        };
        let lines = memory_lines(&[c("v8-heap", 0, 0), c("malloc", 3 << 20, 1 << 20), c("code", 1 << 20, 0)], 80);
        assert_eq!(lines, vec!["rss 4.0 MiB:  malloc 3.0 MiB (+1.0 MiB)  code 1.0 MiB".to_owned()]);
    }
}
