//! Helpers shared by the commands: where the workspace and its outputs are, and running child
//! processes so that a failure names the command line that failed.

use std::{
    env,
    ffi::{OsStr, OsString},
    io::Write,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
};

use anyhow::{Context, Result, bail};

/// The workspace root: the xtask crate lives one level below it.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the xtask crate sits inside the workspace")
        .to_path_buf()
}

/// cargo's target directory; child commands run from the workspace root, so a relative
/// CARGO_TARGET_DIR is taken from there.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// A command that runs from the workspace root with cargo's bin directory first on PATH:
/// CI shells often lack it, and bpf-linker (which tracer's build script needs) lives there.
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("PATH", child_path()).current_dir(workspace_root());
    cmd
}

fn child_path() -> OsString {
    let cargo_bin = match env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home).join("bin"),
        None => {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo/bin")
        }
    };
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.contains(&cargo_bin) {
        dirs.insert(0, cargo_bin);
    }
    env::join_paths(dirs).expect("PATH entries contain no ':'")
}

/// The command line as a user would type it, for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs with inherited stdio and returns the exit status, whatever it is.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs with inherited stdio; fails unless the command succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs with stdout and stderr captured and no stdin; does not look at the exit status.
pub fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{}`", describe(cmd)))
}

/// Runs without showing its output unless it fails: then the output is printed, so the
/// reason is on screen, and the error names the command.
pub fn run_quiet(cmd: &mut Command) -> Result<()> {
    let out = output(cmd)?;
    if !out.status.success() {
        let mut stderr = std::io::stderr().lock();
        // Best effort: the error below is what matters.
        let _ = stderr.write_all(&out.stdout);
        let _ = stderr.write_all(&out.stderr);
        bail!("`{}` failed: {}", describe(cmd), out.status);
    }
    Ok(())
}

/// The exit code a shell would report: the code itself, or 128 + the signal number.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(1),
        (None, None) => 1,
    }
}
