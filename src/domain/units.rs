//! Units that come from outside (durations in config files, job lines and
//! API requests) and the one way each is parsed.

use std::time::Duration;

/// Parses a duration such as `90m`, `12h`, `2d`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration like 90m, 12h or 2d ({e})"))
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
