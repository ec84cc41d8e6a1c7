//! `tracer top`: a live terminal view of a recording, refreshed every second. [`model`] makes
//! the lines from the recording's profile; [`view`] draws them; this file runs the loop.
use std::{
    io::IsTerminal as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ratatui::{
    DefaultTerminal,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
};

use crate::{
    aggregate::Profile,
    diag,
    options::{BackendChoice, Format, RecordOptions, TargetSpec},
    probe::ebpf::Limits,
    recording::{Recording, Status, TICK, stop_requested},
    report::{Ranking, Report},
};

pub mod model;
pub mod view;

use model::{Action, Baseline, Input, Key, State, TargetState};

/// How often the figures are read again.
const REFRESH: Duration = Duration::from_secs(1);

/// What `tracer top` is asked to do.
#[derive(Clone, Debug)]
pub struct TopOptions {
    pub target: TargetSpec,
    /// Where a launched command's stdout and stderr go; a file under /tmp named after the
    /// tracer's pid when None.
    pub command_output: Option<PathBuf>,
    pub backend: BackendChoice,
    pub limits: Limits,
    /// When launching node, add the flags that name its JavaScript frames.
    pub jit_symbols: bool,
    pub debug_dirs: Vec<PathBuf>,
}

impl TopOptions {
    fn record_options(&self) -> RecordOptions {
        let command_output = match self.target {
            TargetSpec::Launch(_) => Some(
                self.command_output
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(format!("/tmp/tracer-top-{}.out", std::process::id()))),
            ),
            TargetSpec::Pid(_) => None,
        };
        RecordOptions {
            target: self.target.clone(),
            duration: None,
            interval: None,
            top: 0,
            format: Format::Text,
            output: None,
            metric: None,
            jit_symbols: self.jit_symbols,
            debug_dirs: self.debug_dirs.clone(),
            min_age: None,
            limits: self.limits.clone(),
            backend: self.backend,
            malloc_stats: false,
            command_output,
        }
    }
}

/// Runs the view until `q`, Ctrl-C or SIGTERM; the target runs on, untraced.
pub fn top(opts: &TopOptions) -> anyhow::Result<()> {
    if !std::io::stdout().is_terminal() {
        bail!("top draws on a terminal and stdout is not one (for a report, use `tracer record`)");
    }
    let record_opts = opts.record_options();
    let mut recording = Recording::start(&record_opts)?;
    let output = record_opts.command_output.clone();
    let shown = ratatui::try_init()
        .context("set up the terminal")
        .and_then(|mut terminal| {
            let shown = show(&mut terminal, &mut recording, output.as_deref());
            ratatui::restore();
            shown
        });
    let pid = recording.pid();
    let command = recording.command().to_owned();
    let exited = recording.end(false).is_some();
    shown?;
    match output {
        Some(path) if exited => diag::warn(format_args!("pid {pid} ({command}) exited; its output is in {}", path.display())),
        Some(path) => diag::warn(format_args!(
            "detached from pid {pid} ({command}), which runs on; its output goes to {}",
            path.display()
        )),
        None => diag::warn(format_args!("detached from pid {pid} ({command})")),
    }
    Ok(())
}

/// The report on screen: `profile`'s stacks named, merged and ranked by the state's key, the
/// first `rows` kept.
fn build(recording: &mut Recording, profile: &mut Profile, state: &mut State, rows: usize) -> Report {
    let ranking = Ranking { metric: state.key.metric(), top: rows, peak_fallback: false };
    let mut report = recording.report(profile, ranking);
    // Growth keeps its sign on screen: shrinking stacks after the flat ones.
    model::rank(&mut report.stacks, state.key);
    state.follow(&report.stacks);
    report
}

fn key_of(code: KeyCode, modifiers: KeyModifiers, expanded: bool) -> Option<Key> {
    match code {
        KeyCode::Char('c') if modifiers.contains(KeyModifiers::CONTROL) => Some(Key::Quit),
        KeyCode::Char(c) => Key::of_char(c),
        KeyCode::Up => Some(Key::Up),
        KeyCode::Down => Some(Key::Down),
        KeyCode::Enter | KeyCode::Right | KeyCode::Left => Some(Key::Toggle),
        KeyCode::Esc if expanded => Some(Key::Toggle),
        _ => None,
    }
}

fn show(
    terminal: &mut DefaultTerminal,
    recording: &mut Recording,
    command_output: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let mut state = State::default();
    let mut profile = recording.profile()?;
    let mut baseline = Baseline::of(&profile);
    let mut growth_from_s = 0;
    let mut target = TargetState::Running;
    let mut rows = model::rows_for(terminal.size()?.height.into());
    let mut report = build(recording, &mut profile, &mut state, rows);
    let mut last_refresh = Instant::now();
    let mut dirty = true;
    loop {
        if dirty {
            let input = Input {
                report: &report,
                memory_map: recording.memory_map(),
                target,
                command_output,
                growth_from_s,
            };
            terminal.draw(|frame| {
                let area = frame.area();
                let lines = model::screen(&input, &state, area.width.into(), area.height.into());
                view::draw(frame, &lines);
            })?;
            dirty = false;
        }
        if event::poll(TICK)? {
            match event::read()? {
                Event::Key(k) if k.kind == KeyEventKind::Press => {
                    let Some(key) = key_of(k.code, k.modifiers, state.expanded) else { continue };
                    match state.handle(key, &report.stacks) {
                        Action::Quit => return Ok(()),
                        Action::Rerank => report = build(recording, &mut profile, &mut state, rows),
                        Action::ResetGrowth => {
                            baseline = Baseline::of(&profile);
                            growth_from_s = recording.elapsed().as_secs();
                            baseline.apply(&mut profile);
                            report = build(recording, &mut profile, &mut state, rows);
                        }
                        Action::Redraw => {}
                    }
                    dirty = true;
                }
                Event::Resize(_, height) => {
                    rows = model::rows_for(height.into());
                    report = build(recording, &mut profile, &mut state, rows);
                    dirty = true;
                }
                _ => {}
            }
        }
        if stop_requested() {
            return Ok(());
        }
        if target != TargetState::Running {
            continue;
        }
        if recording.tick() == Status::Ended {
            // The kernel's tables are ours and outlive the process: its last figures.
            if let Ok(last) = recording.profile() {
                profile = last;
            }
            recording.detach();
            target = TargetState::Exited(recording.exit_code());
        } else if last_refresh.elapsed() >= REFRESH {
            profile = recording.profile()?;
            last_refresh = Instant::now();
        } else {
            continue;
        }
        baseline.apply(&mut profile);
        report = build(recording, &mut profile, &mut state, rows);
        dirty = true;
    }
}
