//! Durations on the command line: `10`, `2.5s`, `500ms`, `250us`, `1m`.

use std::time::Duration;

/// Parses `NUMBER[UNIT]` (unit `us`, `ms`, `s` or `m`); `bare_unit` is the unit of a bare
/// number, or `None` when a unit is required.
pub fn parse_duration_with(text: &str, bare_unit: Option<&str>) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!("`{text}` is not a number with a unit"));
    }
    let unit = match (unit.trim(), bare_unit) {
        ("", Some(bare)) => bare,
        ("", None) => return Err(format!("`{text}` needs a unit (us, ms or s)")),
        (unit, _) => unit,
    };
    let scale_s = match unit {
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" | "min" => 60.0,
        other => return Err(format!("unknown unit `{other}` in `{text}` (use us, ms, s or m)")),
    };
    let value: f64 = number.parse().map_err(|_| format!("`{text}` is not a number with a unit"))?;
    Duration::try_from_secs_f64(value * scale_s).map_err(|_| format!("`{text}` is out of range"))
}

/// A command-line duration; a bare number is seconds (`--duration 10`, as scripts pass it).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    parse_duration_with(text, Some("s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2_500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("1h").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration_with("5", None).unwrap_err().contains("needs a unit"));
    }
}
