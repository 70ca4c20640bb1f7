//! What an error may echo of its input, so that no reply grows with what a client sent.
//!
//! Every error that names an operand (a set id, a path, a group) shows at most
//! [`ECHO_CHARS`] characters of it, then `…`. A gRPC status travels in HTTP/2 trailers, whose
//! size is bounded by the peer (16 KiB by default): a status message longer than that turns a
//! clean error into "h2 protocol error", so [`status_message`] also caps the whole message.

use std::borrow::Cow;
use std::fmt;
use std::path::Path;

/// Characters of one operand an error shows.
pub const ECHO_CHARS: usize = 200;

/// Longest status message either daemon sends (bytes), well under HTTP/2's trailer limit.
pub const STATUS_MESSAGE_BYTES: usize = 4096;

/// `value`, or its first [`ECHO_CHARS`] characters and `…`.
pub fn capped(value: &str) -> Cow<'_, str> {
    match value.char_indices().nth(ECHO_CHARS) {
        None => Cow::Borrowed(value),
        Some((end, _)) => Cow::Owned(format!("{}…", &value[..end])),
    }
}

/// A path as [`capped`] shows it.
pub fn capped_path(path: &Path) -> String {
    capped(&path.to_string_lossy()).into_owned()
}

/// Displays an operand capped: `format!("{}", Capped(&id))`.
pub struct Capped<'a>(pub &'a str);

impl fmt::Display for Capped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&capped(self.0))
    }
}

/// Displays a path capped.
pub struct CappedPath<'a>(pub &'a Path);

impl fmt::Display for CappedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&capped_path(self.0))
    }
}

/// A status message cut to [`STATUS_MESSAGE_BYTES`] (on a character boundary) with `…`.
pub fn status_message(message: String) -> String {
    if message.len() <= STATUS_MESSAGE_BYTES {
        return message;
    }
    let mut end = STATUS_MESSAGE_BYTES - '…'.len_utf8();
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_operands_are_shown_whole_and_long_ones_cut_with_an_ellipsis() {
        assert_eq!(capped("set-1"), "set-1");
        let long = "é".repeat(100_000);
        let shown = capped(&long);
        assert_eq!(shown.chars().count(), ECHO_CHARS + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(capped(&"x".repeat(ECHO_CHARS)), "x".repeat(ECHO_CHARS));
    }

    #[test]
    fn status_messages_stay_under_the_trailer_limit() {
        let cut = status_message("ü".repeat(50_000));
        assert!(cut.len() <= STATUS_MESSAGE_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert_eq!(status_message("short".into()), "short");
    }
}
