//! `when:` time windows, evaluated on wall-clock time in a named time zone.
//!
//! The request's instant ([`Request::at`](super::Request::at)) is converted to the civil
//! date and time of the window's zone, and the wall-clock time is compared with the
//! window: `hours: "08:00-18:00"` means 08:00 ≤ local time < 18:00 (end exclusive). A
//! window whose end is before its start crosses midnight and belongs to the day it starts
//! on: `days: [fri]`, `hours: "22:00-06:00"` is Friday 22:00 to Saturday 06:00. `24:00`
//! may be written as an end.
//!
//! Because the comparison is on wall-clock time, daylight saving time needs no special
//! case: on the day the clock jumps forward the skipped times never occur (a window
//! 02:00-03:00 in Europe/Berlin is empty on that day), and on the day it falls back the
//! repeated hour is inside a window twice (02:30 CEST and 02:30 CET are both inside
//! 02:00-03:00).

use std::fmt;

use jiff::Timestamp;
use jiff::civil::Weekday;
use jiff::tz::TimeZone;

use super::error::{PolicyError, invalid};
use super::raw;

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// A compiled `when:`.
#[derive(Clone, Debug)]
pub struct TimeWindow {
    /// Bit i set: day i (0 = Monday) is in the window.
    days: u8,
    /// `(start, end)` in minutes of the day; `end` may be 1440; `end < start` crosses
    /// midnight. `None`: the whole day.
    hours: Option<(u16, u16)>,
    tz: TimeZone,
    tz_name: String,
}

impl TimeWindow {
    /// Whether the instant `at` is inside the window.
    pub fn contains(&self, at: Timestamp) -> bool {
        let dt = self.tz.to_datetime(at);
        let day = day_index(dt.weekday());
        let on = |d: u8| self.days & (1 << d) != 0;
        let Some((start, end)) = self.hours else {
            return on(day);
        };
        let secs =
            i32::from(dt.hour()) * 3600 + i32::from(dt.minute()) * 60 + i32::from(dt.second());
        let (start, end) = (i32::from(start) * 60, i32::from(end) * 60);
        if start < end {
            on(day) && start <= secs && secs < end
        } else {
            (on(day) && secs >= start) || (on((day + 6) % 7) && secs < end)
        }
    }

    /// The civil time of `at` in the window's zone, for messages: `Sun 2024-03-31 03:00:00
    /// Europe/Berlin`.
    pub fn local_time(&self, at: Timestamp) -> String {
        let dt = self.tz.to_datetime(at);
        let day = DAYS[usize::from(day_index(dt.weekday()))];
        format!(
            "{day} {} {:02}:{:02}:{:02} {}",
            dt.date(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            self.tz_name
        )
    }

    /// The zone name as written.
    pub fn timezone(&self) -> &str {
        &self.tz_name
    }
}

impl fmt::Display for TimeWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days == 0x7f {
            f.write_str("every day")?;
        } else {
            let days: Vec<&str> = (0..7u8)
                .filter(|d| self.days & (1 << d) != 0)
                .map(|d| DAYS[usize::from(d)])
                .collect();
            f.write_str(&days.join(","))?;
        }
        if let Some((start, end)) = self.hours {
            write!(
                f,
                " {:02}:{:02}-{:02}:{:02}",
                start / 60,
                start % 60,
                end / 60,
                end % 60
            )?;
        }
        write!(f, " ({})", self.tz_name)
    }
}

fn day_index(w: Weekday) -> u8 {
    u8::try_from(w.to_monday_zero_offset()).unwrap_or(0)
}

/// `HH:MM`, with `24:00` allowed when `end`.
fn parse_clock(s: &str, end: bool) -> Option<u16> {
    let b = s.as_bytes();
    if b.len() != 5
        || b[2] != b':'
        || !b
            .iter()
            .enumerate()
            .all(|(i, c)| i == 2 || c.is_ascii_digit())
    {
        return None;
    }
    let h = u16::from(b[0] - b'0') * 10 + u16::from(b[1] - b'0');
    let m = u16::from(b[3] - b'0') * 10 + u16::from(b[4] - b'0');
    match (h, m) {
        (0..=23, 0..=59) => Some(h * 60 + m),
        (24, 0) if end => Some(1440),
        _ => None,
    }
}

fn parse_hours(s: &str) -> Result<(u16, u16), &'static str> {
    const EXPECTED: &str =
        "is not a time window (expected \"HH:MM-HH:MM\", e.g. \"08:00-18:00\"; 24:00 only as end)";
    let (a, b) = s.split_once('-').ok_or(EXPECTED)?;
    let start = parse_clock(a, false).ok_or(EXPECTED)?;
    let end = parse_clock(b, true).ok_or(EXPECTED)?;
    if start == end || (start == 0 && end == 1440) {
        return Err(
            "is not a time window: start and end are equal or span the whole day \
                    (omit `hours` for the whole day)",
        );
    }
    Ok((start, end))
}

impl TryFrom<raw::When> for TimeWindow {
    type Error = Vec<PolicyError>;

    fn try_from(raw: raw::When) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        let tz = TimeZone::get(&raw.timezone)
            .map_err(|e| {
                errors.push(invalid!(UnknownTimeZone {
                    path: "timezone".to_owned(),
                    value: raw.timezone.clone(),
                    reason: e.to_string(),
                }));
            })
            .ok();
        let mut days = 0u8;
        match &raw.days {
            None => days = 0x7f,
            Some(list) if list.is_empty() => errors.push(invalid!(InvalidMatcher {
                path: "days".to_owned(),
                reason: "an empty list of days never matches; omit `days` for every day".to_owned(),
            })),
            Some(list) => {
                for (i, d) in list.iter().enumerate() {
                    let reason = match DAYS.iter().position(|n| n == d) {
                        None => "is not a day (expected mon, tue, wed, thu, fri, sat or sun)",
                        Some(at) if days & (1 << at) != 0 => "is listed twice",
                        Some(at) => {
                            days |= 1 << at;
                            continue;
                        }
                    };
                    errors.push(invalid!(InvalidTimeWindow {
                        path: format!("days[{i}]"),
                        value: d.clone(),
                        reason,
                    }));
                }
            }
        }
        let hours = match &raw.hours {
            None => None,
            Some(h) => parse_hours(h)
                .map_err(|reason| {
                    errors.push(invalid!(InvalidTimeWindow {
                        path: "hours".to_owned(),
                        value: h.clone(),
                        reason,
                    }));
                })
                .ok(),
        };
        if raw.days.is_none() && raw.hours.is_none() {
            errors.push(invalid!(InvalidMatcher {
                path: String::new(),
                reason: "a `when` needs `days` or `hours` (or both)".to_owned(),
            }));
        }
        match tz {
            Some(tz) if errors.is_empty() => Ok(TimeWindow {
                days,
                hours,
                tz,
                tz_name: raw.timezone,
            }),
            _ => Err(errors),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;

    fn window(days: Option<&[&str]>, hours: Option<&str>, tz: &str) -> TimeWindow {
        TimeWindow::try_from(raw::When {
            days: days.map(|d| d.iter().map(|s| (*s).to_owned()).collect()),
            hours: hours.map(str::to_owned),
            timezone: tz.to_owned(),
        })
        .unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn weekday_office_hours() {
        let w = window(
            Some(&["mon", "tue", "wed", "thu", "fri"]),
            Some("08:00-18:00"),
            "Europe/Berlin",
        );
        assert_eq!(
            w.to_string(),
            "mon,tue,wed,thu,fri 08:00-18:00 (Europe/Berlin)"
        );
        // 2024-06-03 is a Monday; Berlin is UTC+2 in June.
        let cases = [
            ("2024-06-03T05:59:59Z", false), // 07:59:59
            ("2024-06-03T06:00:00Z", true),  // 08:00
            ("2024-06-03T15:59:59.999Z", true),
            ("2024-06-03T16:00:00Z", false), // 18:00, end exclusive
            ("2024-06-07T12:00:00Z", true),  // Friday
            ("2024-06-08T12:00:00Z", false), // Saturday
            ("2024-06-09T23:00:00Z", false), // Monday 01:00 local, Sunday in UTC
            ("2024-06-02T22:30:00Z", false), // Monday 00:30 local
        ];
        for (t, inside) in cases {
            assert_eq!(w.contains(at(t)), inside, "{t} = {}", w.local_time(at(t)));
        }
    }

    #[test]
    fn midnight_crossing_belongs_to_the_start_day() {
        let w = window(Some(&["fri"]), Some("22:00-06:00"), "UTC");
        let cases = [
            ("2024-06-07T21:59:59Z", false), // Fri 21:59
            ("2024-06-07T22:00:00Z", true),  // Fri 22:00
            ("2024-06-07T23:59:59Z", true),
            ("2024-06-08T00:00:00Z", true), // Sat 00:00, still Friday's window
            ("2024-06-08T05:59:59Z", true),
            ("2024-06-08T06:00:00Z", false),
            ("2024-06-08T22:30:00Z", false), // Sat night: not a Friday window
            ("2024-06-07T01:00:00Z", false), // Fri early morning: Thursday's window
            ("2024-06-14T03:00:00Z", false), // next Fri 03:00: Thursday's window
        ];
        for (t, inside) in cases {
            assert_eq!(w.contains(at(t)), inside, "{t}");
        }
        let all = window(None, Some("23:00-01:00"), "UTC");
        assert!(all.contains(at("2024-06-08T00:30:00Z")));
        assert!(all.contains(at("2024-06-08T23:30:00Z")));
        assert!(!all.contains(at("2024-06-08T01:00:00Z")));
        let late = window(None, Some("18:00-24:00"), "UTC");
        assert!(late.contains(at("2024-06-08T23:59:59Z")));
        assert!(!late.contains(at("2024-06-09T00:00:00Z")));
    }

    #[test]
    fn dst_spring_forward_skips_the_window() {
        // 2024-03-31: Europe/Berlin jumps from 02:00 CET to 03:00 CEST.
        let w = window(Some(&["sun"]), Some("02:00-03:00"), "Europe/Berlin");
        let cases = [
            (
                "2024-03-31T00:59:59Z",
                false,
                "sun 2024-03-31 01:59:59 Europe/Berlin",
            ),
            (
                "2024-03-31T01:00:00Z",
                false,
                "sun 2024-03-31 03:00:00 Europe/Berlin",
            ),
            (
                "2024-03-31T01:30:00Z",
                false,
                "sun 2024-03-31 03:30:00 Europe/Berlin",
            ),
            // A week later the window exists again.
            (
                "2024-04-07T00:30:00Z",
                true,
                "sun 2024-04-07 02:30:00 Europe/Berlin",
            ),
        ];
        for (t, inside, local) in cases {
            assert_eq!(w.local_time(at(t)), local);
            assert_eq!(w.contains(at(t)), inside, "{t}");
        }
        // A window around the gap still opens at the first valid wall-clock time.
        let around = window(Some(&["sun"]), Some("01:30-03:30"), "Europe/Berlin");
        assert!(around.contains(at("2024-03-31T00:59:59Z"))); // 01:59:59 CET
        assert!(around.contains(at("2024-03-31T01:00:00Z"))); // 03:00 CEST
        assert!(!around.contains(at("2024-03-31T01:30:00Z"))); // 03:30 CEST
    }

    #[test]
    fn dst_fall_back_repeats_the_hour() {
        // 2024-10-27: Europe/Berlin falls back from 03:00 CEST to 02:00 CET.
        let w = window(Some(&["sun"]), Some("02:00-03:00"), "Europe/Berlin");
        let cases = [
            (
                "2024-10-26T23:59:59Z",
                false,
                "sun 2024-10-27 01:59:59 Europe/Berlin",
            ),
            (
                "2024-10-27T00:00:00Z",
                true,
                "sun 2024-10-27 02:00:00 Europe/Berlin",
            ), // CEST
            (
                "2024-10-27T00:30:00Z",
                true,
                "sun 2024-10-27 02:30:00 Europe/Berlin",
            ), // CEST
            (
                "2024-10-27T01:00:00Z",
                true,
                "sun 2024-10-27 02:00:00 Europe/Berlin",
            ), // CET
            (
                "2024-10-27T01:30:00Z",
                true,
                "sun 2024-10-27 02:30:00 Europe/Berlin",
            ), // CET
            (
                "2024-10-27T02:00:00Z",
                false,
                "sun 2024-10-27 03:00:00 Europe/Berlin",
            ),
        ];
        for (t, inside, local) in cases {
            assert_eq!(w.local_time(at(t)), local);
            assert_eq!(w.contains(at(t)), inside, "{t}");
        }
    }

    #[test]
    fn days_only() {
        let w = window(Some(&["sat", "sun"]), None, "America/New_York");
        assert_eq!(w.to_string(), "sat,sun (America/New_York)");
        assert!(w.contains(at("2024-06-08T12:00:00Z")));
        // Monday 02:00 UTC is still Sunday 22:00 in New York.
        assert!(w.contains(at("2024-06-10T02:00:00Z")));
        assert!(!w.contains(at("2024-06-10T04:00:00Z")));
    }

    #[test]
    fn invalid_windows() {
        fn errs(days: Option<&[&str]>, hours: Option<&str>, tz: &str) -> Vec<String> {
            TimeWindow::try_from(raw::When {
                days: days.map(|d| d.iter().map(|s| (*s).to_owned()).collect()),
                hours: hours.map(str::to_owned),
                timezone: tz.to_owned(),
            })
            .unwrap_err()
            .iter()
            .map(|e| format!("{}: {e}", e.path().unwrap_or_default()))
            .collect()
        }
        for h in [
            "8:00-18:00",
            "08:00-18",
            "08:00 - 18:00",
            "24:00-01:00",
            "08:60-09:00",
            "25:00-01:00",
            "08:00-08:00",
            "00:00-24:00",
            "08:00-24:01",
            "",
        ] {
            let e = errs(None, Some(h), "UTC");
            assert_eq!(e.len(), 1, "{h:?}: {e:?}");
            assert!(e[0].starts_with("hours: "), "{e:?}");
        }
        assert_eq!(errs(Some(&["mon", "Mon"]), None, "UTC").len(), 1);
        assert_eq!(errs(Some(&["mon", "mon"]), None, "UTC").len(), 1);
        assert_eq!(errs(Some(&[]), None, "UTC").len(), 1);
        assert_eq!(errs(None, None, "UTC").len(), 1);
        let e = errs(None, Some("08:00-09:00"), "Mars/Olympus_Mons");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("timezone: "), "{e:?}");
    }
}
