//! Shell lines the coordinator prints for an operator to run: every operand quoted, so a path
//! with spaces, `;`, `$` or quotes is one word and never code.

/// `word` as one POSIX shell word: unchanged when it holds only characters no shell treats
/// specially, else in single quotes (a `'` inside written as `'\''`).
pub fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '/' | '.' | '_' | '-' | ':' | '@' | '%' | '+' | ',' | '=')
        });
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The line that attaches a restored image on its host: a loop device, then a mount at a
/// directory the operator picks (`<…>`, to be replaced). XFS copies carry their source's UUID,
/// which XFS refuses to mount twice on one host, hence `-o nouuid` for them.
pub fn attach_image_hint(image: &str, fs_type: &str, mount_point: &str) -> String {
    let options = if fs_type == "xfs" { "-o nouuid " } else { "" };
    format!(
        "mount {options}\"$(losetup --find --show {})\" <directory where {} should appear>",
        quote(image),
        quote(mount_point)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn every_word_comes_back_whole_through_a_real_shell() {
        for word in [
            "/pool/restore/vol-a.img",
            "/tmp/a dir; touch /tmp/pwned",
            "it's $(id) `id` \"q\" \\ \n end",
            "",
            "-n",
        ] {
            let out = Command::new("sh")
                .arg("-c")
                .arg(format!("printf '%s' {}", quote(word)))
                .output()
                .expect("run sh");
            assert_eq!(String::from_utf8_lossy(&out.stdout), word, "{word:?}");
        }
        assert_eq!(quote("/plain/path.img"), "/plain/path.img");
    }

    #[test]
    fn xfs_images_are_mounted_with_nouuid() {
        let hint = attach_image_hint("/r/a.img", "xfs", "/vol/a");
        assert!(hint.starts_with("mount -o nouuid \"$(losetup"), "{hint}");
        let hint = attach_image_hint("/r;x/a.img", "ext4", "/vol/a");
        assert_eq!(
            hint,
            "mount \"$(losetup --find --show '/r;x/a.img')\" <directory where /vol/a should appear>"
        );
    }
}
