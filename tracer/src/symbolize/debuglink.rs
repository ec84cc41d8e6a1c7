//! Finding a module's separate debug file, the way gdb does: by build id
//! (`DEBUGDIR/.build-id/xx/yyyy.debug`), then by the `.gnu_debuglink` name next to the module,
//! in its `.debug/` directory, and under `DEBUGDIR/<module's directory>/`.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use super::mmap::Mmap;

/// What a module says about its debug file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DebugRefs {
    pub build_id: Option<Vec<u8>>,
    /// File name and CRC-32 of the file's contents, from `.gnu_debuglink`.
    pub debuglink: Option<(String, u32)>,
    /// Whether the module carries DWARF line or function information itself.
    pub has_dwarf: bool,
}

impl DebugRefs {
    pub fn of(file: &object::File<'_>) -> DebugRefs {
        let build_id = file.build_id().ok().flatten().map(<[u8]>::to_vec);
        let debuglink = file
            .gnu_debuglink()
            .ok()
            .flatten()
            .map(|(name, crc)| (String::from_utf8_lossy(name).into_owned(), crc));
        // A stripped file keeps NOBITS placeholders in debug files only; what counts is data.
        let has_dwarf = file
            .section_by_name(".debug_info")
            .is_some_and(|s| s.kind() != object::SectionKind::UninitializedData && s.size() > 0);
        DebugRefs {
            build_id,
            debuglink,
            has_dwarf,
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Where to look. `dirs` are absolute paths as given (the user's `--debug-dir`s, searched
/// first); `root_dirs` are as the target sees them and are read under its root.
#[derive(Debug, Clone)]
pub struct DebugSearch {
    pub dirs: Vec<PathBuf>,
    pub root_dirs: Vec<PathBuf>,
}

impl Default for DebugSearch {
    fn default() -> DebugSearch {
        DebugSearch {
            dirs: Vec::new(),
            root_dirs: vec![PathBuf::from("/usr/lib/debug")],
        }
    }
}

/// A separate debug file, mapped, that belongs to the module.
pub(crate) struct DebugFile {
    pub map: Mmap,
}

impl DebugSearch {
    /// The debug directories with the target's root applied.
    fn all_dirs(&self, root: &Path) -> Vec<PathBuf> {
        let mut dirs = self.dirs.clone();
        dirs.extend(self.root_dirs.iter().map(|d| under(root, d)));
        dirs
    }

    /// Finds the debug file of `module` (a path as the target sees it). A candidate counts
    /// only when its build id matches the module's (build-id lookups) or its CRC matches the
    /// debuglink's, so a stale file for another build is never used.
    pub(crate) fn find(&self, root: &Path, module: &str, refs: &DebugRefs) -> Option<DebugFile> {
        let dirs = self.all_dirs(root);
        if let Some(id) = refs.build_id.as_deref().filter(|id| id.len() >= 2) {
            let (first, rest) = id.split_at(1);
            let rel = format!(".build-id/{}/{}.debug", hex(first), hex(rest));
            for dir in &dirs {
                let path = dir.join(&rel);
                if let Some(map) = Mmap::open(&path)
                    && build_id_of(map.as_slice()).as_deref() == Some(id)
                {
                    return Some(DebugFile { map });
                }
            }
        }
        let (name, crc) = refs.debuglink.as_ref()?;
        if name.contains('/') || name.is_empty() {
            return None;
        }
        let module_dir = Path::new(module).parent().unwrap_or(Path::new("/"));
        let module_dir_host = under(root, module_dir);
        let mut candidates = vec![
            module_dir_host.join(name),
            module_dir_host.join(".debug").join(name),
        ];
        for dir in &dirs {
            candidates.push(under(dir, module_dir).join(name));
        }
        let module_host = under(root, Path::new(module));
        for path in candidates {
            if path == module_host {
                // A debuglink naming the module itself would match nothing useful.
                continue;
            }
            if let Some(map) = Mmap::open(&path)
                && crc32fast::hash(map.as_slice()) == *crc
            {
                return Some(DebugFile { map });
            }
        }
        None
    }
}

fn build_id_of(data: &[u8]) -> Option<Vec<u8>> {
    let file = object::File::parse(data).ok()?;
    file.build_id().ok().flatten().map(<[u8]>::to_vec)
}

/// `root` joined with an absolute `path` (whose leading '/' is dropped).
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_joined_under_the_root() {
        assert_eq!(
            under(Path::new("/proc/7/root"), Path::new("/usr/lib/debug")),
            PathBuf::from("/proc/7/root/usr/lib/debug")
        );
        assert_eq!(under(Path::new("/"), Path::new("/x")), PathBuf::from("/x"));
        assert_eq!(hex(&[0x0a, 0xff, 0x00]), "0aff00");
    }

    #[test]
    fn libc_has_a_build_id_and_no_dwarf() {
        let data = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let file = object::File::parse(&*data).unwrap();
        let refs = DebugRefs::of(&file);
        assert_eq!(refs.build_id.as_ref().map(Vec::len), Some(20));
        assert!(!refs.has_dwarf);
    }

    #[test]
    fn a_stale_debug_file_is_not_used() {
        // The build-id path holds a file with another build id (libc itself has one that does
        // not match a made-up id): it must be refused.
        let dir = std::env::temp_dir().join(format!("debuglink-test-{}", std::process::id()));
        let id = [0xab, 0xcd, 0xef, 0x01];
        let place = dir.join(".build-id/ab/cdef01.debug");
        std::fs::create_dir_all(place.parent().unwrap()).unwrap();
        std::fs::copy("/lib/x86_64-linux-gnu/libc.so.6", &place).unwrap();
        let search = DebugSearch {
            dirs: vec![dir.clone()],
            root_dirs: Vec::new(),
        };
        let refs = DebugRefs {
            build_id: Some(id.to_vec()),
            debuglink: Some(("nonexistent.debug".into(), 0)),
            has_dwarf: false,
        };
        assert!(search.find(Path::new("/"), "/usr/bin/x", &refs).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
