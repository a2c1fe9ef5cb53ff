//! Numbers a record keeps exactly, or refuses.
//!
//! Records are kept as serde_json values, whose numbers are 64-bit integers or doubles. An
//! integer beyond 64 bits, or a decimal with more digits than a double holds, would come back
//! as another number (`12345678901234567890123` as `1.2345678901234568e22`): a value silently
//! changed. [`check_numbers`] finds such numbers in the body before it is stored, so the client
//! gets a 422 naming the number instead.

/// Refuses a JSON text (already known to be valid) with a number that would not come back as
/// the same value: the reason names the number.
pub fn check_numbers(json: &[u8]) -> Result<(), String> {
    let mut index = 0;
    let mut in_string = false;
    while index < json.len() {
        let byte = json[index];
        if in_string {
            match byte {
                b'\\' => index += 1,
                b'"' => in_string = false,
                _ => {}
            }
            index += 1;
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'-' | b'0'..=b'9' => {
                let start = index;
                while index < json.len()
                    && matches!(json[index], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    index += 1;
                }
                let number = std::str::from_utf8(&json[start..index])
                    .map_err(|_| "a number is not ASCII".to_owned())?;
                check_number(number)?;
                continue;
            }
            _ => {}
        }
        index += 1;
    }
    Ok(())
}

fn check_number(text: &str) -> Result<(), String> {
    let shown = || {
        if text.len() > 40 {
            format!("{}…", &text[..40])
        } else {
            text.to_owned()
        }
    };
    if !text.contains(['.', 'e', 'E']) {
        if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
            return Ok(());
        }
        return Err(format!(
            "the integer {} does not fit in 64 bits (-9223372036854775808 to 18446744073709551615); send it as a string",
            shown()
        ));
    }
    // What serde_json keeps of it, written back as serde_json writes it.
    let kept: f64 =
        serde_json::from_str(text).map_err(|_| format!("{} is out of range", shown()))?;
    let written =
        serde_json::to_string(&kept).map_err(|_| format!("{} is out of range", shown()))?;
    if decimal(text) == decimal(&written) {
        Ok(())
    } else {
        Err(format!(
            "the number {} has more precision than a double keeps (it would become {written}); send it as a string",
            shown()
        ))
    }
}

/// A decimal number as (negative, significant digits, exponent of the last digit): equal for
/// equal values however written (`1.10`, `1.1`, `11e-1`).
fn decimal(text: &str) -> (bool, String, i64) {
    let (negative, text) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(at) => (
            &text[..at],
            text[at + 1..]
                .parse::<i64>()
                .unwrap_or(if text[at + 1..].starts_with('-') {
                    i64::MIN / 2
                } else {
                    i64::MAX / 2
                }),
        ),
        None => (text, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = whole.chars().chain(fraction.chars()).collect();
    let mut exponent = exponent.saturating_sub(fraction.len() as i64);
    let trailing = digits.len() - digits.trim_end_matches('0').len();
    digits.truncate(digits.len() - trailing);
    exponent = exponent.saturating_add(trailing as i64);
    let digits = digits.trim_start_matches('0').to_owned();
    if digits.is_empty() {
        // Zero, whatever its sign or exponent.
        return (false, String::new(), 0);
    }
    (negative, digits, exponent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_that_come_back_the_same_pass() {
        for json in [
            r#"{"a": 1, "b": -9223372036854775808, "c": 18446744073709551615}"#,
            r#"{"a": 0.1, "b": 1.10, "c": 1e2, "d": -0.0, "e": 0.30000000000000004, "f": 2.5e-3}"#,
            r#"{"s": "12345678901234567890123 in a string is text", "t": "\"9e999\""}"#,
            r#"[1.7976931348623157e308, 5e-324]"#,
        ] {
            assert_eq!(check_numbers(json.as_bytes()), Ok(()), "{json}");
        }
    }

    #[test]
    fn numbers_that_would_change_are_refused_by_name() {
        let big = check_numbers(br#"{"n": 12345678901234567890123}"#).expect_err("too big");
        assert!(big.contains("12345678901234567890123"), "{big}");
        assert!(check_numbers(b"[18446744073709551616]").is_err());
        assert!(check_numbers(b"[-9223372036854775809]").is_err());
        let precise = check_numbers(b"[3.14159265358979323846]").expect_err("too precise");
        assert!(precise.contains("3.141592653589793"), "{precise}");
        assert!(check_numbers(b"[1e-400]").is_err(), "underflows to zero");
    }

    #[test]
    fn decimals_compare_by_value() {
        assert_eq!(decimal("1.10"), decimal("11e-1"));
        assert_eq!(decimal("100.0"), decimal("1e2"));
        assert_eq!(decimal("-0.0"), decimal("0"));
        assert_ne!(decimal("1.5"), decimal("-1.5"));
    }
}
