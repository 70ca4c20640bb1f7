//! What the guardian tells the agent after it thawed a set: a small file on the tmpfs state
//! directory, `<records dir>/<set-id>.guardian-thawed`, holding the wall-clock instant (Unix ms)
//! of its last FITHAW. The agent reads it when it ends that set (it was hung past max-freeze)
//! or when a coordinator asks a restarted agent about it, so the set's stall figure and its end
//! are what really happened: the guardian's thaw, not the agent's later look at it.
//!
//! Written only by the guardian, read and removed only by the agent; never on a disk filesystem
//! (the state directory is checked to be tmpfs at start-up).

use std::path::{Path, PathBuf};

const SUFFIX: &str = ".guardian-thawed";

fn path(records_dir: &Path, set_id: &str) -> PathBuf {
    records_dir.join(format!("{set_id}{SUFFIX}"))
}

/// The guardian thawed `set_id` at `thawed_at_ms`.
pub fn write(records_dir: &Path, set_id: &str, thawed_at_ms: u64) -> std::io::Result<()> {
    let tmp = records_dir.join(format!(".{set_id}{SUFFIX}.tmp"));
    std::fs::write(&tmp, format!("{thawed_at_ms}\n"))?;
    std::fs::rename(&tmp, path(records_dir, set_id))
}

/// When the guardian thawed `set_id`, if it did; the mark is removed.
pub fn take(records_dir: &Path, set_id: &str) -> Option<u64> {
    let path = path(records_dir, set_id);
    let text = std::fs::read_to_string(&path).ok()?;
    let _ = std::fs::remove_file(&path);
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_read_once() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(take(dir.path(), "s1"), None);
        write(dir.path(), "s1", 1234).unwrap();
        assert_eq!(take(dir.path(), "s1"), Some(1234));
        assert_eq!(take(dir.path(), "s1"), None, "removed once read");
    }
}
