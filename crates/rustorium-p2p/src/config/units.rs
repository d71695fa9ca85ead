//! Durations (`"30s"`, `"250ms"`, `"1.5s"`, `"2m"`) and sizes (`"16MiB"`, `"1.25MB"`,
//! plain integers of bytes) as written in configuration files.

use std::time::Duration;

use serde::{de, Deserializer, Serializer};

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit: write it like \"30s\" or \"250ms\""))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown time unit {other:?} in {text:?} (use ms, s, m or h)"
            ))
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

/// Writes a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}s", d.as_secs_f64())
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Parses a size: an integer of bytes, or a number and a unit (`B`, `KB`, `KiB`, `MB`,
/// `MiB`, `GB`, `GiB`).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KB, KiB, MB, MiB, GB or GiB)"
            ))
        }
    };
    let too_large = || format!("{text:?} is too large");
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(scale).ok_or_else(too_large);
    }
    // A decimal number ("1.25MB"): exact enough at these sizes, and must come out whole.
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let bytes = value * scale as f64;
    if bytes.fract() != 0.0 || !(0.0..9.0e15).contains(&bytes) {
        return Err(format!(
            "{text:?} is not a whole number of bytes (or is too large)"
        ));
    }
    Ok(bytes as u64)
}

/// Writes a size the way [`parse_size`] reads it.
pub fn format_size(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{}MiB", bytes / MIB)
    } else if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{}KiB", bytes / 1024)
    } else {
        bytes.to_string()
    }
}

/// Reads a string, saying what kind of string is expected when it is something else.
struct Text(&'static str);

impl de::Visitor<'_> for Text {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_string())
    }
}

const DURATION: &str = "a duration in quotes, like \"30s\" or \"250ms\"";

/// serde for `Duration` fields.
pub(crate) mod duration {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = d.deserialize_str(Text(DURATION))?;
        parse_duration(&text).map_err(de::Error::custom)
    }
}

/// serde for `Option<Duration>` fields, where `"off"` is `None`.
pub(crate) mod duration_or_off {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&format_duration(*d)),
            None => s.serialize_str("off"),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = d.deserialize_str(Text("\"off\" or a duration in quotes, like \"5s\""))?;
        if text.trim() == "off" {
            return Ok(None);
        }
        parse_duration(&text).map(Some).map_err(de::Error::custom)
    }
}

/// serde for size fields: a string with a unit, or an integer of bytes.
pub(crate) mod size {
    use super::*;

    pub fn serialize<S: Serializer, T: Copy + Into<u64>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_size((*v).into()))
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let bytes = d.deserialize_any(Bytes)?;
        T::try_from(bytes).map_err(|_| de::Error::custom(format!("{bytes} bytes is too large")))
    }

    const SIZE: &str = "a size such as \"16MiB\" or a whole number of bytes";

    /// Reads a size from an integer or a string, with messages in our words.
    struct Bytes;

    impl de::Visitor<'_> for Bytes {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str(SIZE)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| E::custom(format!("a size cannot be negative (got {v}); {SIZE}")))
        }

        fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
            // Formats without integers (JSON read as floats, for one) send whole numbers so.
            if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                return Ok(v as u64);
            }
            Err(E::custom(format!(
                "{v} is not a whole number of bytes; write fractions with a unit, in quotes (\"1.5MiB\")"
            )))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).map_err(E::custom)
        }
    }
}

/// serde for UDP payload sizes (`u16` fields): out-of-range integers are refused with the
/// range QUIC allows, not the integer type's.
pub(crate) mod payload {
    use super::*;

    pub fn serialize<S: Serializer>(v: &u16, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        d.deserialize_any(Payload)
    }

    struct Payload;

    impl de::Visitor<'_> for Payload {
        type Value = u16;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a UDP payload size in bytes, 1200 to 65527")
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u16, E> {
            u16::try_from(v).map_err(|_| {
                E::custom(format!(
                    "{v} is out of range: a UDP payload size is 1200 to 65527 bytes"
                ))
            })
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u16, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{v} is out of range: a UDP payload size is 1200 to 65527 bytes"
                ))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("30 parsecs")
            .unwrap_err()
            .contains("unknown time unit"));
        assert!(parse_duration("s").is_err());
        for d in [
            Duration::from_secs(30),
            Duration::from_millis(250),
            Duration::from_micros(1500),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1.25MB"), Ok(1_250_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 KiB"), Ok(2048));
        assert!(parse_size("1.5B").is_err());
        assert!(parse_size("3 furlongs")
            .unwrap_err()
            .contains("unknown size unit"));
        for n in [0, 1, 1000, 1024, 16 << 20, 1_250_000] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
