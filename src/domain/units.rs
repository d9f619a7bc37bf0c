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
