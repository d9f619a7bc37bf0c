//! The one JSONL splitter, for the watched folder, `POST /v1/jobs` bodies
//! and uploaded batch files: lines end at `\n` (a trailing `\r` is dropped),
//! numbering starts at 1 and counts every line, and blank lines are skipped.
//! A UTF-8 byte order mark at the start of a line is dropped: editors on
//! Windows write one at the start of a file (and `cat a.jsonl b.jsonl` puts
//! the second file's at the start of a line); it is never part of a job.

/// The job text of one raw line (with or without its line ending), or
/// `None` if it is blank.
pub fn content(raw: &str) -> Option<&str> {
    let line = raw.strip_prefix(BOM).unwrap_or(raw);
    let line = line.trim_end_matches(['\n', '\r']);
    (!line.trim().is_empty()).then_some(line)
}

/// The byte order mark, U+FEFF (bytes EF BB BF in UTF-8).
pub const BOM: char = '\u{feff}';

/// The non-blank lines of `text`, with their 1-based line numbers.
pub fn lines(text: &str) -> impl Iterator<Item = (u64, &str)> {
    text.split('\n')
        .enumerate()
        .filter_map(|(i, raw)| content(raw).map(|l| (i as u64 + 1, l)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_from_one_and_blank_ones_skipped() {
        let text = "{\"a\":1}\r\n\n  \n{\"b\":2}\n{\"c\":3}";
        assert_eq!(
            lines(text).collect::<Vec<_>>(),
            vec![(1, "{\"a\":1}"), (4, "{\"b\":2}"), (5, "{\"c\":3}")]
        );
        assert_eq!(content("x\r\n"), Some("x"));
        assert_eq!(content(" \t\r\n"), None);
    }

    #[test]
    fn a_leading_byte_order_mark_is_dropped() {
        let text = "\u{feff}{\"a\":1}\r\n{\"b\":2}\n\u{feff}{\"c\":3}\n\u{feff}\n";
        assert_eq!(
            lines(text).collect::<Vec<_>>(),
            vec![(1, "{\"a\":1}"), (2, "{\"b\":2}"), (3, "{\"c\":3}")]
        );
        assert_eq!(content("\u{feff}x\n"), Some("x"));
        // Only at the start: one inside a line is the line's business.
        assert_eq!(content("x\u{feff}"), Some("x\u{feff}"));
    }
}
