//! Phone numbers: the CRM's text read into international digits, and masks for logs.

use phonenumber::country::Id as Region;

use super::CrmText;

/// A phone read in an earlier cycle: its source (the cache's key), its international digits
/// (None when unreadable), and whether libphonenumber knows its range.
pub type PhoneReading = (CrmText, Option<CrmText>, bool);

/// What the mirror remembers of each user Wazzup acknowledged, by user id: the phone it was
/// read from, and the CRM row it came from. A phone whose source is unchanged is not parsed
/// again; a row that is unchanged is not normalized again.
pub type RememberedUsers = foldhash::HashMap<CrmText, Remembered>;

/// What the mirror remembers of one user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Remembered {
    pub phone: Option<PhoneReading>,
    pub row: Option<RememberedRow>,
}

/// The acknowledged user and the salted hash of the CRM row it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct RememberedRow {
    pub source_hash: i64,
    pub name: CrmText,
    pub hash: String,
    pub hide_phone: bool,
}

/// The `phonenumber` version the daemon reads phones with (from Cargo.lock, by build.rs): its
/// metadata decides how a phone reads, so it is part of every phone's cache key and of the salt
/// of the row hashes. After an upgrade every phone is read again once.
pub const PHONENUMBER_VERSION: &str = env!("PHONENUMBER_VERSION");

/// The version of the daemon's own rules around `phonenumber` (which reading wins, when the
/// digits as written are kept): raised when they change, so every phone is read again.
pub const PHONE_RULES: &str = "2";

/// Four hex digits of the hash of [`PHONENUMBER_VERSION`] and [`PHONE_RULES`], heading every
/// cache key: short, so that most keys stay inline (see [`CrmText`]).
fn rules_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let rules = format!("{PHONENUMBER_VERSION}|{PHONE_RULES}");
        super::content_hash(rules.as_bytes())[..4].to_string()
    })
}

/// The key under which a phone's reading is cached: the `phonenumber` version and the region
/// matter to the result.
pub fn phone_source(raw: &str, region: Option<Region>) -> CrmText {
    let region: &str = region.as_ref().map(AsRef::as_ref).unwrap_or_default();
    let tag = rules_tag();
    let mut key = CrmText::with_capacity(tag.len() + region.len() + 1 + raw.len());
    key.push_str(tag);
    key.push_str(region);
    key.push('|');
    key.push_str(raw);
    key
}

/// The result of reading one phone number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phone {
    Missing,
    /// International digits without `+`; `valid` says whether libphonenumber knows the range.
    Parsed {
        digits: CrmText,
        valid: bool,
    },
    Unreadable,
}

/// Reads a phone number into international digits (`37192612345`).
///
/// National numbers are read with the default region; digits without `+` that do not form a
/// valid national number are read as international. A number that parses but is outside
/// libphonenumber's known ranges is still sent (Wazzup only checks the format), as written:
/// the digits the CRM wrote, not the library's reading of them, which for such a number may
/// have dropped a digit (it takes a leading digit equal to the country's trunk prefix for that
/// prefix: `+7 812…` and `+7 800…` would lose their `8`).
pub fn normalize_phone(raw: &str, region: Option<Region>) -> Phone {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Phone::Missing;
    }
    if trimmed.chars().any(|c| c.is_control()) || trimmed.len() > 64 {
        return Phone::Unreadable;
    }
    let parse = |region: Option<Region>, s: &str| -> Option<(CrmText, bool)> {
        let n = phonenumber::parse(region, s).ok()?;
        // E.164 without its `+`, written directly: the formatter would also match the
        // country's display formats, which E.164 does not use.
        let digits = compact_str::format_compact!("{}{}", n.code().value(), n.national());
        if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((digits, n.is_valid()))
    };
    let international = trimmed.starts_with('+');
    let as_national = if international || region.is_none() {
        None
    } else {
        parse(region, trimmed)
    };
    if let Some(n) = as_national.as_ref().filter(|n| n.1) {
        // A valid national number is the reading; the international one is not needed.
        return Phone::Parsed {
            digits: n.0.clone(),
            valid: true,
        };
    }
    let written = if international {
        trimmed.to_string()
    } else if let Some(rest) = trimmed.strip_prefix("00") {
        format!("+{rest}")
    } else {
        format!("+{trimmed}")
    };
    let as_international = parse(None, &written).map(|n| {
        if n.1 {
            return n;
        }
        match written_digits(&written) {
            Some(as_written) if as_written != n.0 => (as_written, false),
            _ => n,
        }
    });
    match as_international.or(as_national) {
        Some((digits, valid)) => Phone::Parsed { digits, valid },
        None => Phone::Unreadable,
    }
}

/// The digits of an international number as written, for one the library does not know: every
/// digit after the `+` up to anything that is neither a digit nor a separator (an extension, a
/// note), when they are all ASCII and form a plausible number (8 to 15 digits).
fn written_digits(international: &str) -> Option<CrmText> {
    let mut digits = CrmText::default();
    for c in international.trim_start_matches('+').chars() {
        match c {
            '0'..='9' => digits.push(c),
            ' ' | '-' | '.' | '(' | ')' | '/' | '\u{a0}' => {}
            c if c.is_numeric() => return None,
            _ => break,
        }
    }
    (8..=15).contains(&digits.len()).then_some(digits)
}

/// Masks a phone for logs, showing only its first and last digits: `371 *** *34`.
pub fn mask_phone(digits: &str) -> String {
    let n = digits.chars().count();
    if n <= 5 {
        return "*".repeat(n);
    }
    let head: String = digits.chars().take(3).collect();
    let tail: String = digits.chars().skip(n - 2).collect();
    format!("{head} *** *{tail}")
}

/// Masks a phone as the CRM wrote it (it may not be a phone at all), for logs and `plan`:
/// separators stay, digits are hidden except the last two (and the first three of a long one).
pub fn mask_raw_phone(raw: &str) -> String {
    let raw: String = raw
        .trim()
        .chars()
        .take(40)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    // Any script's digits count (a CRM may hold full-width ones), not only ASCII.
    let digits = raw.chars().filter(|c| c.is_numeric()).count();
    if digits <= 4 {
        return raw;
    }
    let head = if digits >= 7 { 3 } else { 0 };
    let mut seen = 0;
    raw.chars()
        .map(|c| {
            if !c.is_numeric() {
                return c;
            }
            seen += 1;
            if seen <= head || seen > digits - 2 {
                c
            } else {
                '*'
            }
        })
        .collect()
}

/// Masks every run of seven or more digits (a phone, most likely) in a text meant for logs.
pub fn mask_digits(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 7 {
            out.push_str(&mask_phone(run));
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_numeric() {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Reads a user's phone: from the cache when its source is unchanged, else parsed.
pub fn read_phone(
    user_id: &str,
    raw: Option<&str>,
    source: Option<&str>,
    region: Option<Region>,
    cache: &RememberedUsers,
) -> Phone {
    let (Some(raw), Some(key)) = (raw, source) else {
        return Phone::Missing;
    };
    match cache.get(user_id).and_then(|r| r.phone.as_ref()) {
        Some((cached_key, Some(digits), valid)) if cached_key == key => Phone::Parsed {
            digits: digits.clone(),
            valid: *valid,
        },
        Some((cached_key, None, _)) if cached_key == key => Phone::Unreadable,
        _ => normalize_phone(raw, region),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phonenumber::country::Id as Region;

    #[test]
    fn the_phonenumber_version_is_the_one_cargo_lock_holds() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
        let entry = format!("name = \"phonenumber\"\nversion = \"{PHONENUMBER_VERSION}\"\n");
        assert!(!PHONENUMBER_VERSION.is_empty());
        assert!(lock.contains(&entry), "{PHONENUMBER_VERSION}");
    }

    #[test]
    fn a_phone_read_under_another_phonenumber_version_is_read_again() {
        let raw = "+371 26 123 456";
        let remembered = |key: &str| {
            let mut cache = RememberedUsers::default();
            let reading = (CrmText::from(key), Some(CrmText::from("999")), true);
            cache.insert(
                "u1".into(),
                Remembered {
                    phone: Some(reading),
                    row: None,
                },
            );
            cache
        };
        let key = phone_source(raw, None);
        assert!(key.starts_with(rules_tag()) && key.ends_with(raw));
        // The reading remembered under this version's key is used as it is...
        let cached = read_phone("u1", Some(raw), Some(&key), None, &remembered(&key));
        assert_eq!(
            cached,
            Phone::Parsed {
                digits: "999".into(),
                valid: true
            }
        );
        // ...and one remembered before the key held the version is not.
        let older = format!("|{raw}");
        let read = read_phone("u1", Some(raw), Some(&key), None, &remembered(&older));
        assert_eq!(
            read,
            Phone::Parsed {
                digits: "37126123456".into(),
                valid: true
            }
        );
    }

    #[test]
    fn phones_become_international_digits() {
        assert_eq!(
            normalize_phone("+371 26 123 456", None),
            Phone::Parsed {
                digits: "37126123456".into(),
                valid: true
            }
        );
        assert_eq!(
            normalize_phone("8 (912) 345-67-89", Some(Region::RU)),
            Phone::Parsed {
                digits: "79123456789".into(),
                valid: true
            }
        );
        // The seed's own example is outside libphonenumber's ranges but is sent as written.
        assert!(matches!(
            normalize_phone("37192612345", Some(Region::RU)),
            Phone::Parsed { ref digits, valid: false } if digits == "37192612345"
        ));
        // Italian numbers keep their leading zero after the country code.
        assert!(matches!(
            normalize_phone("+39 06 6982 1234", None),
            Phone::Parsed { ref digits, .. } if digits == "390669821234"
        ));
        assert_eq!(
            normalize_phone("0039 06 6982 1234", Some(Region::LV)),
            normalize_phone("+39 06 6982 1234", None)
        );
        assert_eq!(
            normalize_phone("26 123 456", Some(Region::LV)),
            Phone::Parsed {
                digits: "37126123456".into(),
                valid: true
            }
        );
        assert_eq!(normalize_phone("  ", None), Phone::Missing);
        assert_eq!(normalize_phone("call me maybe", None), Phone::Unreadable);
        assert_eq!(normalize_phone("12\u{0}34", None), Phone::Unreadable);
    }

    #[test]
    fn a_number_the_library_does_not_know_is_sent_with_every_digit_written() {
        let parsed = |raw: &str, region: Option<Region>| match normalize_phone(raw, region) {
            Phone::Parsed { digits, .. } => digits.to_string(),
            other => format!("{other:?}"),
        };
        // Russian numbers whose area code starts with the trunk prefix `8`: the library's
        // reading drops that `8`; the CRM's digits are sent.
        assert_eq!(parsed("+7 800 555 35 36", None), "78005553536");
        assert_eq!(parsed("+7 800 555 35 36", Some(Region::RU)), "78005553536");
        assert_eq!(parsed("+7 (812) 123-45-67", None), "78121234567");
        assert_eq!(parsed("78005553538", None), "78005553538");
        assert_eq!(parsed("0078005553538", Some(Region::LV)), "78005553538");
        assert_eq!(parsed("+7 800 555 35 36 ext 5", None), "78005553536");
        // Known numbers are still the library's reading.
        assert_eq!(parsed("+7 912 345 67 89 ext. 5", None), "79123456789");
        assert_eq!(parsed("8 912 345 67 89", Some(Region::RU)), "79123456789");
        for raw in ["8 800 555 35 35", "8 (812) 123-45-67"] {
            let got = parsed(raw, Some(Region::RU));
            let written: String = raw.chars().filter(char::is_ascii_digit).collect();
            assert!(
                got == written || got == format!("7{}", &written[1..]),
                "{raw}: {got}"
            );
        }
    }

    #[test]
    fn a_masked_phone_shows_only_the_ends() {
        assert_eq!(mask_phone("37155123434"), "371 *** *34");
        assert_eq!(
            mask_digits("User with phone number 37155123434 already exists, code 400"),
            "User with phone number 371 *** *34 already exists, code 400"
        );
        assert_eq!(
            mask_digits("phone ７９１２１１１２２３５"),
            "phone ７９１ *** *３５"
        );
    }

    #[test]
    fn a_raw_phone_is_masked_but_keeps_its_shape() {
        assert_eq!(mask_raw_phone("12"), "12");
        assert_eq!(mask_raw_phone("+7 912 345-67-89"), "+7 91* ***-**-89");
        assert_eq!(mask_raw_phone("12345"), "***45");
        assert_eq!(mask_raw_phone("call me"), "call me");
        // Digits of other scripts are hidden too.
        assert_eq!(
            mask_raw_phone("＋７９１２１１１２２３５"),
            "＋７９１******３５"
        );
        assert_eq!(mask_raw_phone("+7912111223６"), "+791******3６");
    }
}
