//! Where a report goes. A file named with `-o` is opened (created if need be) before any work
//! starts, so a path that cannot be written fails at once instead of after a whole recording;
//! an existing file keeps its contents until the report is ready, and is then truncated and
//! written in place (its owner, mode and links stay as they were).
use std::{
    fs::{File, OpenOptions},
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::Context as _;

/// An opened destination for one report.
pub struct Output {
    file: Option<Opened>,
}

struct Opened {
    file: File,
    path: PathBuf,
    /// We created it: a recording that fails before its report leaves no empty file behind.
    created: bool,
    written: bool,
}

impl Output {
    /// Opens `path` for writing without truncating it, or stdout when None.
    pub fn open(path: Option<&Path>) -> anyhow::Result<Output> {
        let Some(path) = path else { return Ok(Output { file: None }) };
        let create = |new: bool| {
            let mut options = OpenOptions::new();
            options.write(true);
            if new {
                options.create_new(true);
            }
            options.open(path)
        };
        let (file, created) = match create(true) {
            Ok(file) => (file, true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let file = create(false).with_context(|| format!("open {} for writing", path.display()))?;
                (file, false)
            }
            Err(e) => return Err(e).with_context(|| format!("create {}", path.display())),
        };
        Ok(Output {
            file: Some(Opened {
                file,
                path: path.to_owned(),
                created,
                written: false,
            }),
        })
    }

    /// Runs `write` on the destination and flushes. A regular file is truncated first; a
    /// closed pipe on the other end (`| head`) is not an error.
    pub fn write(mut self, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> anyhow::Result<()> {
        let (result, what) = match &mut self.file {
            None => {
                let mut out = BufWriter::new(std::io::stdout().lock());
                (write(&mut out).and_then(|()| out.flush()), "write report".to_owned())
            }
            Some(opened) => {
                opened.written = true;
                let file = &opened.file;
                let truncated = match file.metadata() {
                    Ok(meta) if meta.is_file() => file.set_len(0),
                    _ => Ok(()),
                };
                let mut out = BufWriter::new(file);
                let result = truncated.and_then(|()| write(&mut out)).and_then(|()| out.flush());
                (result, format!("write {}", opened.path.display()))
            }
        };
        match result {
            // Piped into `head`: not an error.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context(what),
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Some(opened) = &self.file
            && opened.created
            && !opened.written
        {
            let _ = std::fs::remove_file(&opened.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tracer-output-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_directory_that_does_not_exist_fails_at_open() {
        let err = Output::open(Some(Path::new("/nonexistent/r.json"))).err().expect("must fail");
        assert_eq!(format!("{err:#}"), "create /nonexistent/r.json: No such file or directory (os error 2)");
    }

    #[test]
    fn an_existing_report_is_kept_until_the_new_one_is_written() {
        let dir = temp("keep");
        let path = dir.join("r.json");
        std::fs::write(&path, "the old report, longer than the new one\n").unwrap();
        let out = Output::open(Some(&path)).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "the old report, longer than the new one\n");
        out.write(|w| w.write_all(b"new\n")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_created_for_a_report_never_written_is_removed() {
        let dir = temp("unwritten");
        let path = dir.join("r.json");
        drop(Output::open(Some(&path)).unwrap());
        assert!(!path.exists(), "{} was left behind", path.display());
        // One that existed before stays.
        std::fs::write(&path, "old").unwrap();
        drop(Output::open(Some(&path)).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
