//! The right to write one output folder: checked against the run's inputs (an output that
//! is, contains or lies inside an input is refused, with symlinks and `..` resolved) and
//! held by an exclusive lock beside it, so two runs never write the same output and
//! `--force` never deletes what a run reads.
//!
//! Layout beside a target `DIR/NAME`: `.NAME.partial` (the folder being built, renamed to
//! `NAME` when complete) and `.NAME.lock` (the lock file, holding the holder's pid and
//! command line; removed when the claim ends).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::path::{Component, Path, PathBuf};

/// Why an output folder may not be written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}: output folder exists (use --force to replace it)")]
    Exists(String),
    #[error("{out}: the output {how} the input {input}; choose an --out outside every input")]
    OverlapsInput { out: String, input: String, how: Overlap },
    #[error("{0}: exists and is not a folder (a file or a symbolic link); --force replaces only folders, so remove it or choose another --out")]
    NotAFolder(String),
    #[error("{out}: another run is writing this output ({holder}; lock {lock}); wait for it to finish or choose another --out")]
    Busy { out: String, holder: String, lock: String },
    #[error("{path}: {what}")]
    Io { path: String, what: &'static str, source: std::io::Error },
}

/// How an output path collides with an input path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    Is,
    LiesInside,
    Contains,
}

impl std::fmt::Display for Overlap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Overlap::Is => "is",
            Overlap::LiesInside => "lies inside",
            Overlap::Contains => "contains",
        })
    }
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> OutputError + 'a {
    move |source| OutputError::Io { path: path.display().to_string(), what, source }
}

/// `.NAME.SUFFIX` beside `target`.
fn sibling(target: &Path, suffix: &str) -> Result<PathBuf, OutputError> {
    let name = target.file_name().ok_or_else(|| OutputError::Io {
        path: target.display().to_string(),
        what: "not a folder name",
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{suffix}", name.to_string_lossy())))
}

/// `.NAME.partial` beside `target`: where an output is built before it is moved into place.
pub fn partial_path(target: &Path) -> Result<PathBuf, OutputError> {
    sibling(target, "partial")
}

/// Where `path` is or would be once created: the deepest existing ancestor resolved by the
/// OS (symlinks, `..`), the missing rest appended lexically (missing folders cannot be
/// symlinks, so `..` there just drops the previous component).
pub fn resolve(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut tail = Vec::new();
    let mut base = abs.as_path();
    let mut resolved = loop {
        if let Ok(c) = base.canonicalize() {
            break c;
        }
        match base.parent() {
            Some(parent) => {
                tail.push(base.components().next_back());
                base = parent;
            }
            None => break base.to_path_buf(),
        }
    };
    for c in tail.into_iter().rev().flatten() {
        match c {
            Component::ParentDir => {
                resolved.pop();
            }
            Component::Normal(n) => resolved.push(n),
            _ => {}
        }
    }
    resolved
}

/// Refuses an output path (or its partial/lock siblings) that is, lies inside or contains
/// one of `inputs`.
pub fn check_no_overlap(target: &Path, inputs: &[&Path]) -> Result<(), OutputError> {
    let outs = [resolve(target), resolve(&sibling(target, "partial")?), resolve(&sibling(target, "lock")?)];
    for input in inputs {
        let inp = resolve(input);
        for out in &outs {
            let how = if *out == inp {
                Overlap::Is
            } else if out.starts_with(&inp) {
                Overlap::LiesInside
            } else if inp.starts_with(out) {
                Overlap::Contains
            } else {
                continue;
            };
            return Err(OutputError::OverlapsInput { out: target.display().to_string(), input: input.display().to_string(), how });
        }
    }
    Ok(())
}

/// Everything about `target` that can be checked without touching the disk: it overlaps no
/// input, and it is absent, or (with `force`) a real folder that may be replaced.
pub fn check_target(target: &Path, inputs: &[&Path], force: bool) -> Result<(), OutputError> {
    check_no_overlap(target, inputs)?;
    // the nearest existing ancestor must be a folder, or creating the output fails only
    // after the run
    let parent = target.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Some(a) = parent.ancestors().find(|a| !a.as_os_str().is_empty() && a.symlink_metadata().is_ok()) {
        if !a.is_dir() {
            return Err(io_err(a, "cannot create the output under it")(std::io::Error::from(std::io::ErrorKind::NotADirectory)));
        }
    }
    if let Ok(meta) = target.symlink_metadata() {
        if !force {
            return Err(OutputError::Exists(target.display().to_string()));
        }
        if !meta.is_dir() {
            return Err(OutputError::NotAFolder(target.display().to_string()));
        }
    }
    Ok(())
}

/// The exclusive right to build `target`: held from `take` until drop.
#[derive(Debug)]
pub struct OutputClaim {
    target: PathBuf,
    partial: PathBuf,
    lock_path: PathBuf,
    lock: File,
}

impl OutputClaim {
    /// Checks `target` (see `check_target`), creates its parent folder and takes the lock;
    /// a second run on the same target fails here, at once, naming the holder.
    pub fn take(target: &Path, inputs: &[&Path], force: bool) -> Result<Self, OutputError> {
        check_target(target, inputs, force)?;
        let partial = partial_path(target)?;
        let lock_path = sibling(target, "lock")?;
        let parent = lock_path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(io_err(parent, "cannot create"))?;
        let lock = take_lock(target, &lock_path)?;
        // re-checked under the lock: another run may have finished in between
        check_target(target, inputs, force)?;
        Ok(OutputClaim { target: target.to_path_buf(), partial, lock_path, lock })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The hidden folder the output is built in.
    pub fn partial(&self) -> &Path {
        &self.partial
    }

    /// An empty partial folder (an earlier run's leftovers removed).
    pub fn fresh_partial(&self) -> Result<(), OutputError> {
        if self.partial.symlink_metadata().is_ok() {
            remove_entry(&self.partial).map_err(io_err(&self.partial, "cannot clear an earlier partial output"))?;
        }
        std::fs::create_dir_all(&self.partial).map_err(io_err(&self.partial, "cannot create"))
    }

    /// Replaces the target (a folder, if any) with the finished partial folder.
    pub fn move_into_place(&self) -> Result<PathBuf, OutputError> {
        if let Ok(meta) = self.target.symlink_metadata() {
            if !meta.is_dir() {
                return Err(OutputError::NotAFolder(self.target.display().to_string()));
            }
            std::fs::remove_dir_all(&self.target).map_err(io_err(&self.target, "cannot replace"))?;
        }
        std::fs::rename(&self.partial, &self.target).map_err(io_err(&self.target, "cannot move into place"))?;
        Ok(self.target.clone())
    }
}

fn remove_entry(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

impl Drop for OutputClaim {
    /// The lock file goes while still locked, so a waiting run that opened it sees it was
    /// replaced (see `take_lock`) rather than two runs holding two files.
    fn drop(&mut self) {
        if same_file(&self.lock, &self.lock_path) {
            let _ = std::fs::remove_file(&self.lock_path);
        }
    }
}

/// Opens and locks `lock_path`; retries when the previous holder removed the file between
/// our open and our lock.
fn take_lock(target: &Path, lock_path: &Path) -> Result<File, OutputError> {
    for _ in 0..100 {
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(lock_path).map_err(io_err(lock_path, "cannot open the lock file"))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(lock_path).unwrap_or_default();
                let holder = holder.trim().replace('\n', " ");
                let holder = if holder.is_empty() { "holder unknown".to_string() } else { holder };
                return Err(OutputError::Busy { out: target.display().to_string(), holder, lock: lock_path.display().to_string() });
            }
            Err(TryLockError::Error(e)) => return Err(io_err(lock_path, "cannot lock")(e)),
        }
        if !same_file(&file, lock_path) {
            continue;
        }
        let args: Vec<String> = std::env::args().collect();
        let note = format!("pid {}: {}", std::process::id(), args.join(" "));
        file.set_len(0).and_then(|_| file.write_all(note.as_bytes())).map_err(io_err(lock_path, "cannot write the lock file"))?;
        return Ok(file);
    }
    Err(io_err(lock_path, "cannot lock")(std::io::Error::other("the lock file keeps being replaced")))
}

/// The open `file` is the one at `path` now (not removed or replaced since it was opened).
#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), path.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Elsewhere an open file cannot be removed, so the one at `path` is the one opened.
#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_follows_symlinks_and_missing_tails() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir(root.join("model")).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("model"), root.join("link")).unwrap();
        assert_eq!(resolve(&root.join("model/missing/x")), root.join("model/missing/x"));
        assert_eq!(resolve(&root.join("model/missing/../y")), root.join("model/y"));
        assert_eq!(resolve(&root.join("model/..")), root.clone());
        #[cfg(unix)]
        assert_eq!(resolve(&root.join("link/sub/out")), root.join("model/sub/out"));
    }

    #[test]
    fn overlaps_in_every_direction_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let model = root.join("p/model");
        std::fs::create_dir_all(&model).unwrap();
        let text = root.join("calib.txt");
        std::fs::write(&text, "x").unwrap();
        let inputs = [model.as_path(), text.as_path()];
        let how = |t: &Path| match check_target(t, &inputs, true) {
            Err(OutputError::OverlapsInput { how, .. }) => Some(how),
            Ok(()) => None,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(how(&model), Some(Overlap::Is));
        assert_eq!(how(&root.join("p")), Some(Overlap::Contains));
        assert_eq!(how(&model.join("sub/out")), Some(Overlap::LiesInside));
        assert_eq!(how(&text), Some(Overlap::Is));
        assert_eq!(how(root), Some(Overlap::Contains));
        assert_eq!(how(&root.join("p/other")), None);
        assert_eq!(how(&root.join("out")), None);
    }

    #[test]
    fn a_second_claim_fails_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = OutputClaim::take(&out, &[], false).unwrap();
        first.fresh_partial().unwrap();
        std::fs::write(first.partial().join("shard"), "first").unwrap();
        match OutputClaim::take(&out, &[], true) {
            Err(OutputError::Busy { holder, .. }) => assert!(holder.contains(&format!("pid {}", std::process::id())), "{holder}"),
            other => panic!("expected Busy, got {other:?}"),
        }
        assert_eq!(std::fs::read_to_string(first.partial().join("shard")).unwrap(), "first");
        first.move_into_place().unwrap();
        drop(first);
        assert!(!dir.path().join(".out.lock").exists());
        // the finished output now exists: refused without --force, claimable with it
        assert!(matches!(OutputClaim::take(&out, &[], false), Err(OutputError::Exists(_))));
        let second = OutputClaim::take(&out, &[], true).unwrap();
        assert_eq!(second.target(), out.as_path());
    }

    #[test]
    fn files_and_symlinks_at_the_target_are_refused_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "mine").unwrap();
        assert!(matches!(check_target(&file, &[], true), Err(OutputError::NotAFolder(_))));
        #[cfg(unix)]
        {
            let dangling = dir.path().join("dangling");
            std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
            assert!(matches!(check_target(&dangling, &[], true), Err(OutputError::NotAFolder(_))));
            assert!(matches!(check_target(&dangling, &[], false), Err(OutputError::Exists(_))));
        }
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "mine");
    }
}
