//! Units that come from outside (durations in config files, job lines and
//! API requests) and the one way each is parsed.

use std::time::Duration;

/// Parses a duration such as `90m`, `12h`, `2d`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 90m, 12h or 2d ({e})"))
}

/// [`parse_duration`], refusing anything longer than `max`.
pub fn parse_duration_within(s: &str, max: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d > max {
        return Err(format!(
            "'{}' is longer than the limit of {}",
            s.trim(),
            crate::domain::bounds::show(max)
        ));
    }
    Ok(d)
}

/// Unix milliseconds as RFC 3339 with milliseconds and `Z`: the one
/// timestamp format of result lines, the API and the log. `None` out of range.
pub fn rfc3339_ms(ms: i64) -> Option<String> {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
}

/// USD as shown everywhere: exact in the database, rounded to a picodollar
/// on output so that 9.15e-6 does not print as 9.149999999999999e-6.
pub fn round_usd(x: f64) -> f64 {
    (x * 1e12).round() / 1e12
}

/// Text from outside (file names, job custom ids, provider messages) as it
/// goes into the log: control characters and other non-printable ones
/// escaped as Rust writes them (`\n`, `\u{1b}`), backslashes doubled, and
/// bytes that are not UTF-8 as `\xNN`, so that such text cannot forge a log
/// line or send a terminal escape. Use as `%escaped(name)`.
pub fn escaped<T: AsRef<[u8]> + ?Sized>(text: &T) -> Escaped<'_> {
    Escaped(text.as_ref())
}

/// [`escaped`] for an OS string (a file name, which need not be UTF-8).
pub fn escaped_os(text: &std::ffi::OsStr) -> Escaped<'_> {
    Escaped(std::os::unix::ffi::OsStrExt::as_bytes(text))
}

/// See [`escaped`].
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(&'a [u8]);

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    // Quotes are harmless in a log line; keep them readable.
                    '"' | '\'' => f.write_char(c)?,
                    c => write!(f, "{}", c.escape_debug())?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Checks a cron expression as the maintenance scheduler reads it (croner,
/// seconds required, UTC), and that it fires at least once from `now`.
pub fn check_cron(expr: &str, now: chrono::DateTime<chrono::Utc>) -> Result<(), String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .map_err(|_| {
            format!(
                "'{expr}' is not a cron expression with seconds, like \"0 17 3 * * *\" \
                 (second minute hour day-of-month month day-of-week)"
            )
        })?;
    match cron.find_next_occurrence(&now, false) {
        Ok(_) => Ok(()),
        Err(_) => Err(format!("'{expr}' never fires")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_text_cannot_forge_a_line_or_an_escape() {
        assert_eq!(escaped("plain name.jsonl").to_string(), "plain name.jsonl");
        assert_eq!(
            escaped("a\nERROR forged\r\t\u{1b}[31m").to_string(),
            "a\\nERROR forged\\r\\t\\u{1b}[31m"
        );
        assert_eq!(
            escaped("back\\slash \"q\" 'q' é").to_string(),
            "back\\\\slash \"q\" 'q' é"
        );
        assert_eq!(
            escaped(b"x\xff\xfey.jsonl").to_string(),
            "x\\xff\\xfey.jsonl"
        );
        assert_eq!(escaped("\u{2028}\u{9b}").to_string(), "\\u{2028}\\u{9b}");
        let os = <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(b"n\n\x80");
        assert_eq!(escaped_os(os).to_string(), "n\\n\\x80");
        assert!(!escaped("a\nb").to_string().contains('\n'));
    }
}
