//! International numbers in their most common written form (`+371 26 123 456`,
//! `+7 912 345-67-89`, `+37126123456`), read the way libphonenumber reads them, without its
//! general parser.
//!
//! libphonenumber's parse of such a number spends most of its work on what these forms never
//! need: a character-by-character grammar for every way a phone can be written, extension
//! markers, RFC 3966 parameters, and a regular-expression cache locked and hashed by pattern on
//! every lookup. Here the same steps are taken over the same metadata, in the same order: the
//! country code is the shortest known prefix of one to three digits; the region is chosen as
//! libphonenumber chooses it; validity is the same test of the same patterns (compiled once per
//! thread, anchored). Whatever these forms would take through a branch not repeated here (a
//! national prefix to strip, a carrier code, an all-zero number) is handed back to
//! libphonenumber: [`read`] answers `None`, and the caller parses as before. A test compares
//! both readers over every region's example numbers, written in every form this reads.

use std::cell::RefCell;

use phonenumber::metadata::{DATABASE, Descriptor, Metadata};
use regex::{Regex, RegexBuilder};

use super::CrmText;

/// The international digits and validity libphonenumber gives `text` (`+`, then digits, spaces
/// and hyphens), as `Some(None)` when it does not read as a phone, or `None` when this reader
/// does not take the form (libphonenumber must read it).
pub fn read(text: &str) -> Option<Option<(CrmText, bool)>> {
    let digits = digits_of(text)?;
    if !(8..=15).contains(&digits.len()) {
        return None;
    }
    if digits.starts_with('0') {
        // libphonenumber: no country code starts with 0.
        return Some(None);
    }
    let Some(cc_len) = (1..=3).find(|&n| DATABASE.by_code(&code_of(&digits[..n])).is_some()) else {
        return Some(None);
    };
    let code = code_of(&digits[..cc_len]);
    let national = &digits[cc_len..];
    if national.bytes().all(|b| b == b'0') {
        return None;
    }
    // The region the parser strips a national prefix for (found from the number without its
    // leading zeros); a prefix to strip is its branch.
    let unpadded = national.trim_start_matches('0');
    let parsing_meta = source_for(code, unpadded)?;
    if let Some(meta) = parsing_meta {
        if let Some(parsing) = meta.national_prefix_for_parsing()
            && matches_at_start(parsing.as_str(), national)?
        {
            return None;
        }
        if meta
            .national_prefix()
            .is_some_and(|prefix| national.starts_with(prefix))
        {
            return None;
        }
    }
    // Validity finds the region from the whole number: the same one, without leading zeros.
    let valid_meta = if unpadded.len() == national.len() {
        parsing_meta
    } else {
        source_for(code, national)?
    };
    let valid = match valid_meta {
        Some(meta) => known_type(meta, national)?,
        None => false,
    };
    Some(Some((digits, valid)))
}

/// The digits of `+` followed by digits, spaces and hyphens, starting and ending with a digit;
/// None for any other form. Hyphens only in a text that also has a space: without one,
/// libphonenumber reads the text as RFC 3966, where the first group is the country code.
fn digits_of(text: &str) -> Option<CrmText> {
    let rest = text.strip_prefix('+')?.as_bytes();
    if !rest.first()?.is_ascii_digit() || !rest.last()?.is_ascii_digit() {
        return None;
    }
    let spaced = rest.contains(&b' ');
    let mut digits = CrmText::with_capacity(rest.len());
    for &b in rest {
        match b {
            b'0'..=b'9' => digits.push(char::from(b)),
            b' ' => {}
            b'-' if spaced => {}
            _ => return None,
        }
    }
    Some(digits)
}

fn code_of(digits: &str) -> u16 {
    digits.parse().unwrap_or(0)
}

/// libphonenumber's `source_for`: the region of a country code shared by several, by the
/// first whose leading digits (or, without them, whose number types) take the number.
/// `None` when a pattern could not be compiled; `Some(None)` when no region takes it.
fn source_for(code: u16, national: &str) -> Option<Option<&'static Metadata>> {
    let Some(regions) = DATABASE.region(&code) else {
        return Some(None);
    };
    if let [only] = regions.as_slice() {
        return Some(if *only == "001" {
            DATABASE.by_code(&code).and_then(|m| m.into_iter().next())
        } else {
            // As libphonenumber: a region its country list does not name has no metadata.
            only.parse::<phonenumber::country::Id>()
                .ok()
                .and_then(|id| DATABASE.by_id(id.as_ref()))
        });
    }
    for region in regions {
        let meta = DATABASE.by_id(region)?;
        let taken = match meta.leading_digits() {
            Some(pattern) => matches_at_start(pattern.as_str(), national)?,
            None => known_type(meta, national)?,
        };
        if taken {
            return Some(Some(meta));
        }
    }
    Some(None)
}

/// libphonenumber's `number_type(..) != Unknown`: the general pattern and one type's.
fn known_type(meta: &'static Metadata, national: &str) -> Option<bool> {
    let d = meta.descriptors();
    if !is_match(d.general(), national)? {
        return Some(false);
    }
    for desc in [
        d.premium_rate(),
        d.toll_free(),
        d.shared_cost(),
        d.voip(),
        d.personal_number(),
        d.pager(),
        d.uan(),
        d.voicemail(),
        d.fixed_line(),
        d.mobile(),
    ]
    .into_iter()
    .flatten()
    {
        if is_match(desc, national)? {
            return Some(true);
        }
    }
    Some(false)
}

/// `Descriptor::is_match`: a possible length, and the pattern matching from the start.
fn is_match(desc: &'static Descriptor, national: &str) -> Option<bool> {
    let lengths = desc.possible_length();
    if !lengths.is_empty() && !lengths.contains(&(national.len() as u16)) {
        return Some(false);
    }
    matches_at_start(desc.national_number().as_str(), national)
}

thread_local! {
    /// The metadata's patterns, anchored, compiled once per thread (None: would not compile),
    /// keyed by where the pattern's text lives in the static database, and its length.
    static ANCHORED: RefCell<foldhash::HashMap<(usize, usize), Option<Regex>>> =
        RefCell::default();
}

/// Whether the leftmost match of `pattern` (a pattern of the static database) in `text`
/// starts at its first character, as libphonenumber tests it, with the pattern compiled as
/// libphonenumber compiles it.
fn matches_at_start(pattern: &'static str, text: &str) -> Option<bool> {
    let key = (pattern.as_ptr() as usize, pattern.len());
    ANCHORED.with(|cell| {
        let mut compiled = cell.borrow_mut();
        let re = compiled.entry(key).or_insert_with(|| {
            // The newline ends a comment the pattern may close with (`ignore_whitespace`).
            // Without Unicode classes: the text is ASCII digits, which `\d` matches either
            // way, and the compiled form is a fifth of the size (every region's patterns, about
            // 1,400, take 28 MB instead of 150).
            RegexBuilder::new(&format!("^(?:{pattern}\n)"))
                .ignore_whitespace(true)
                .unicode(false)
                .build()
                .ok()
        });
        re.as_ref().map(|re| re.is_match(text))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// libphonenumber's reading, as `normalize_phone` takes it.
    fn library(text: &str) -> Option<(CrmText, bool)> {
        let n = phonenumber::parse(None, text).ok()?;
        let digits = compact_str::format_compact!("{}{}", n.code().value(), n.national());
        if !(8..=15).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some((digits, n.is_valid()))
    }

    /// Every form this reader takes, of one national number.
    fn forms(code: u16, national: &str) -> Vec<String> {
        let (head, tail) = national.split_at(national.len().min(3));
        let (mid, end) = tail.split_at(tail.len() / 2);
        let mut out = vec![
            format!("+{code}{national}"),
            format!("+{code} {national}"),
            format!("+{code} {head} {tail}"),
            format!("+{code} {head} {mid}-{end}"),
            format!("+{code} {head}-{mid}-{end}"),
            format!("+{code}  {head}  {tail}"),
        ];
        out.retain(|f| !f.ends_with(' ') && !f.ends_with('-') && !f.contains(" -"));
        out.retain(|f| !f.contains("- ") && !f.contains("--"));
        out
    }

    /// Numbers around each example: as given, with a national prefix, a digit more or less,
    /// a digit changed, and zeros in front.
    fn variants(meta: &Metadata, example: &str) -> Vec<String> {
        let mut out = vec![example.to_string()];
        if let Some(prefix) = meta.national_prefix() {
            out.push(format!("{prefix}{example}"));
        }
        out.push(format!("{example}7"));
        out.push(format!("0{example}"));
        out.push(format!("00{example}"));
        if example.len() > 1 {
            out.push(example[..example.len() - 1].to_string());
            out.push(format!("9{}", &example[1..]));
            out.push(format!("1{}", &example[1..]));
        }
        out
    }

    #[test]
    fn reads_every_region_as_libphonenumber_does() {
        let mut taken = 0;
        let mut compared = 0;
        for meta in DATABASE.iter() {
            let d = meta.descriptors();
            let examples = [
                Some(d.general()),
                d.fixed_line(),
                d.mobile(),
                d.toll_free(),
                d.premium_rate(),
                d.shared_cost(),
                d.personal_number(),
                d.voip(),
                d.pager(),
                d.uan(),
                d.voicemail(),
            ]
            .into_iter()
            .flatten()
            .filter_map(Descriptor::example);
            for example in examples {
                for national in variants(meta, example) {
                    for text in forms(meta.country_code(), &national) {
                        compared += 1;
                        if let Some(fast) = read(&text) {
                            taken += 1;
                            assert_eq!(fast, library(&text), "{text} ({})", meta.id());
                        }
                    }
                }
            }
        }
        // The reader must take most of these forms, or it saves nothing.
        assert!(compared > 10_000, "{compared} forms compared");
        assert!(taken * 2 > compared, "{taken} of {compared} forms taken");
    }

    #[test]
    fn unusual_spacing_reads_as_libphonenumber_reads_it() {
        let texts = [
            "+7 912--345 67 89",
            "+7 - 912 345 67 89",
            "+7  912   345-67-89",
            "+371 2-6-1-2-3-4-5-6",
            "+1 650-253-0000",
            "+44 7911 123456",
            "+49 30 123456",
            "+49 030 123456",
            "+86 138 0013 8000",
            "+55 11 91234-5678",
            "+54 9 11 1234-5678",
            "+52 1 55 1234 5678",
            "+7 701 123 45 67",
            "+590 690 00 12 34",
            "+800 1234 5678",
            "+882 3456 7890",
        ];
        let mut taken = 0;
        for text in texts {
            if let Some(fast) = read(text) {
                taken += 1;
                assert_eq!(fast, library(text), "{text}");
            }
        }
        // Those with a national prefix after the country code go to libphonenumber.
        assert!(taken >= 12, "{taken} of {} taken", texts.len());
    }

    #[test]
    fn leaves_other_forms_to_libphonenumber() {
        for text in [
            "37126123456",
            "+371-26123456",
            "+(371) 26123456",
            "+371.26.123.456",
            "+371 26123456 ext. 5",
            "++37126123456",
            "+ 37126123456",
            "+371 2612345-",
            "+3712612",
            "+1234567890123456",
            "+44 0 7911 123456",
            "+7 8 912 345 67 89",
        ] {
            assert_eq!(read(text), None, "{text}");
        }
    }

    #[test]
    fn reads_common_numbers() {
        for (text, digits, valid) in [
            ("+371 26 123 456", "37126123456", true),
            ("+7 912 345-67-89", "79123456789", true),
            ("+1 650 253 0000", "16502530000", true),
            ("+39 06 1234 5678", "390612345678", true),
            // A known country code, a number outside its ranges: read, and not valid.
            ("+371 96 123 456", "37196123456", false),
        ] {
            assert_eq!(read(text), Some(Some((digits.into(), valid))), "{text}");
        }
        // No country code starts with 0, and 999 is none.
        assert_eq!(read("+0371 26123456"), Some(None));
        assert_eq!(read("+999 12345678"), Some(None));
        assert_eq!(library("+999 12345678"), None);
    }
}
