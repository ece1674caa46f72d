//! Date arithmetic for Modified Dates and Patient's Age: DA and DT values shifted back by whole
//! days, ages computed and generalised to bands. Pure functions over strings.

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// A calendar date.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Date {
    pub year: i64,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// Parse `YYYYMMDD`, or the legacy ACR-NEMA `YYYY.MM.DD`.
    pub fn parse_da(s: &str) -> Option<Self> {
        let s = s.trim_end_matches([' ', '\0']);
        let digits: String = match s.len() {
            8 => s.to_owned(),
            10 if s.as_bytes()[4] == b'.' && s.as_bytes()[7] == b'.' => s.replace('.', ""),
            _ => return None,
        };
        if !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() != 8 {
            return None;
        }
        let year = digits[0..4].parse().ok()?;
        let month = digits[4..6].parse().ok()?;
        let day = digits[6..8].parse().ok()?;
        if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
            return None;
        }
        Some(Date { year, month, day })
    }

    /// Format as `YYYYMMDD`.
    pub fn to_da(self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }

    /// This date minus `days`.
    pub fn minus_days(self, days: u32) -> Self {
        let (year, month, day) =
            civil_from_days(days_from_civil(self.year, self.month, self.day) - i64::from(days));
        Date { year, month, day }
    }

    /// This date plus `days` (which may be negative).
    pub fn plus_days(self, days: i64) -> Self {
        let (year, month, day) =
            civil_from_days(days_from_civil(self.year, self.month, self.day) + days);
        Date { year, month, day }
    }

    /// Whole years from `self` (birth) to `other`.
    pub fn years_until(self, other: Date) -> i64 {
        let mut y = other.year - self.year;
        if (other.month, other.day) < (self.month, self.day) {
            y -= 1;
        }
        y
    }
}

/// Shift one DA value (single date, or a query-style range `A-B`) back by `days`.
/// Returns `None` if the value is not a valid date: the caller then removes it.
pub fn shift_da(value: &str, days: u32) -> Option<String> {
    let value = value.trim_end_matches([' ', '\0']);
    if value.is_empty() {
        return Some(String::new());
    }
    if let Some((a, b)) = value.split_once('-') {
        let shift = |s: &str| -> Option<String> {
            if s.is_empty() {
                Some(String::new())
            } else {
                Some(Date::parse_da(s)?.minus_days(days).to_da())
            }
        };
        return Some(format!("{}-{}", shift(a)?, shift(b)?));
    }
    Some(Date::parse_da(value)?.minus_days(days).to_da())
}

/// Shift one DT value back by `days`. The precision of the original is kept; partial dates
/// (`YYYY`, `YYYYMM`) are shifted from their first day. The time and UTC offset are unchanged.
pub fn shift_dt(value: &str, days: u32) -> Option<String> {
    let value = value.trim_end_matches([' ', '\0']);
    if value.is_empty() {
        return Some(String::new());
    }
    let split = value.find(['+', '-']).unwrap_or(value.len());
    let (main, offset) = value.split_at(split);
    let date_len = main.len().min(8);
    let (date, rest) = main.split_at(date_len);
    if !date.bytes().all(|b| b.is_ascii_digit()) || !matches!(date.len(), 4 | 6 | 8) {
        return None;
    }
    let offset_ok =
        offset.is_empty() || (offset.len() == 5 && offset[1..].bytes().all(|b| b.is_ascii_digit()));
    if !rest.bytes().all(|b| b.is_ascii_digit() || b == b'.') || !offset_ok {
        return None;
    }
    let full = match date.len() {
        4 => format!("{date}0101"),
        6 => format!("{date}01"),
        _ => date.to_owned(),
    };
    let shifted = Date::parse_da(&full)?.minus_days(days).to_da();
    Some(format!("{}{rest}{offset}", &shifted[..date.len()]))
}

/// Parse an Age String (`nnnD`, `nnnW`, `nnnM`, `nnnY`) into whole years.
pub fn parse_age_years(value: &str) -> Option<u32> {
    let v = value.trim_end_matches([' ', '\0']);
    if v.len() != 4 {
        return None;
    }
    let n: u32 = v[..3].parse().ok()?;
    Some(match &v[3..] {
        "D" => n / 365,
        "W" => n / 52,
        "M" => n / 12,
        "Y" => n,
        _ => return None,
    })
}

/// Generalise an age to its band: the largest lower bound not above it, written as `NNNY`;
/// every age over 89 is `090Y` (HIPAA Safe Harbor).
pub fn band_age(years: u32, lower_bounds: &[u32]) -> String {
    if years > 89 {
        return "090Y".to_owned();
    }
    let band = lower_bounds
        .iter()
        .copied()
        .filter(|b| *b <= years)
        .max()
        .unwrap_or(0);
    format!("{:03}Y", band.min(90))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_cross_months_years_and_leap_days() {
        let cases = [
            ("20240301", 1, Some("20240229")),
            ("20230301", 1, Some("20230228")),
            ("20200101", 1, Some("20191231")),
            ("20240229", 366, Some("20230228")),
            ("1956.03.12", 0, Some("19560312")),
            ("20190101-20190201", 31, Some("20181201-20190101")),
            ("-20190201", 1, Some("-20190131")),
            ("20191301", 1, None),
            ("2019", 1, None),
            ("", 5, Some("")),
        ];
        for (input, days, want) in cases {
            assert_eq!(shift_da(input, days).as_deref(), want, "{input} - {days}");
        }
    }

    #[test]
    fn datetime_shift_keeps_precision_time_and_offset() {
        let cases = [
            ("20190312143005.123456", 2, Some("20190310143005.123456")),
            ("2019031214&", 1, None),
            ("2019031214+0100", 12, Some("2019022814+0100")),
            ("201903", 1, Some("201902")),
            ("2019", 1, Some("2018")),
            ("20190312-0500", 1, Some("20190311-0500")),
            ("abc", 1, None),
        ];
        for (input, days, want) in cases {
            assert_eq!(shift_dt(input, days).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn roundtrip_of_day_numbers() {
        for z in (-800_000..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
    }

    #[test]
    fn ages_and_bands() {
        let bands: Vec<u32> = (0..=85).step_by(5).collect();
        assert_eq!(parse_age_years("045Y"), Some(45));
        assert_eq!(parse_age_years("018M"), Some(1));
        assert_eq!(parse_age_years("012D"), Some(0));
        assert_eq!(parse_age_years("45Y"), None);
        assert_eq!(band_age(44, &bands), "040Y");
        assert_eq!(band_age(89, &bands), "085Y");
        assert_eq!(band_age(90, &bands), "090Y");
        assert_eq!(band_age(104, &bands), "090Y");
        assert_eq!(band_age(0, &bands), "000Y");
        let b = Date::parse_da("19560312").expect("date");
        assert_eq!(b.years_until(Date::parse_da("20190311").expect("date")), 62);
        assert_eq!(b.years_until(Date::parse_da("20190312").expect("date")), 63);
    }
}
