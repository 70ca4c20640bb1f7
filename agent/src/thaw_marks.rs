//! What the guardian tells the agent after it thawed a set: a small file on the tmpfs state
//! directory, `<state-dir>/guardian-thawed/<set-id>` (next to the freeze records' directory, so
//! records stay records only), holding the wall-clock instant (Unix ms) of its last FITHAW. The agent reads it when it ends that set (it was hung past max-freeze)
//! or when a coordinator asks a restarted agent about it, so the set's stall figure and its end
//! are what really happened: the guardian's thaw, not the agent's later look at it.
//!
//! Written only by the guardian, read and removed only by the agent; never on a disk filesystem
//! (the state directory is checked to be tmpfs at start-up).

use std::path::{Path, PathBuf};

const DIR: &str = "guardian-thawed";

/// The marks' directory, a sibling of the freeze records' directory `records_dir`.
fn dir(records_dir: &Path) -> PathBuf {
    records_dir.parent().unwrap_or(records_dir).join(DIR)
}

fn path(records_dir: &Path, set_id: &str) -> PathBuf {
    dir(records_dir).join(set_id)
}

/// The guardian thawed `set_id` at `thawed_at_ms`.
pub fn write(records_dir: &Path, set_id: &str, thawed_at_ms: u64) -> std::io::Result<()> {
    let dir = dir(records_dir);
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{set_id}.tmp"));
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
        let state = tempfile::tempdir().unwrap();
        let records = state.path().join("freezes");
        std::fs::create_dir_all(&records).unwrap();
        assert_eq!(take(&records, "s1"), None);
        write(&records, "s1", 1234).unwrap();
        assert_eq!(
            std::fs::read_dir(&records).unwrap().count(),
            0,
            "the records' directory holds records only"
        );
        assert_eq!(take(&records, "s1"), Some(1234));
        assert_eq!(take(&records, "s1"), None, "removed once read");
    }
}
