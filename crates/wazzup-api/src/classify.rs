//! Turning a complete HTTP answer into success or the kind of failure. Pure, so every branch
//! is tested without I/O.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// Longest error description kept from a response body.
const MAX_DESCRIPTION: usize = 500;

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    description: Option<Value>,
    #[serde(default)]
    data: Option<Value>,
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n).collect::<String>() + "…"
    }
}

/// Reads the positions of rejected records from an error body's `data`, when present.
fn rejected_indexes(data: &Value) -> Vec<usize> {
    let items: Vec<&Value> = match data {
        Value::Array(a) => a.iter().collect(),
        Value::Object(o) => match o.get("errors").or_else(|| o.get("items")) {
            Some(Value::Array(a)) => a.iter().collect(),
            _ => vec![data],
        },
        _ => vec![],
    };
    let mut out: Vec<usize> = items
        .iter()
        .filter_map(|v| v.get("index").and_then(Value::as_u64))
        .map(|i| i as usize)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Parses a `Retry-After` header: seconds or an HTTP date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Success bodies up to this size are parsed in full to check they are JSON. A longer one (an
/// echo of a whole settings document) is checked by its first and last characters: what a
/// proxy's error page or plain text fails, while a body cut short fails when it is read.
const FULLY_CHECKED: usize = 4096;

/// Classifies a complete HTTP answer. Pure, so every branch is tested without I/O.
/// A success is Ok(()) when its body is empty or JSON (checked without building it: the caller
/// reads only what it needs); a success whose body is not JSON is transient.
pub fn classify(status: u16, retry_after: Option<&str>, body: &[u8]) -> Result<(), ApiError> {
    match status {
        200..=299 => {
            let body = body.trim_ascii();
            let json = match body {
                [] => true,
                [..] if body.len() <= FULLY_CHECKED => {
                    serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok()
                }
                [b'{', .., b'}'] | [b'[', .., b']'] => true,
                _ => false,
            };
            json.then_some(()).ok_or_else(|| ApiError::Transient {
                reason: format!("HTTP {status} with a body that is not JSON"),
                retry_after: None,
            })
        }
        401 | 403 => Err(ApiError::Unauthorized { status }),
        408 | 425 | 429 | 500..=599 => Err(ApiError::Transient {
            reason: format!("HTTP {status}"),
            retry_after: retry_after.and_then(parse_retry_after),
        }),
        _ => {
            let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
            let (code, description, indexes) = match parsed {
                Some(b) => (
                    b.error
                        .map(|e| match e {
                            Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .unwrap_or_else(|| format!("HTTP_{status}")),
                    b.description
                        .map(|d| match d {
                            Value::String(s) => s,
                            other => other.to_string(),
                        })
                        .unwrap_or_default(),
                    b.data.as_ref().map(rejected_indexes).unwrap_or_default(),
                ),
                None => (
                    format!("HTTP_{status}"),
                    String::from_utf8_lossy(body).trim().to_string(),
                    vec![],
                ),
            };
            Err(ApiError::Rejected {
                status,
                code: clip(&code, 100),
                description: clip(&description, MAX_DESCRIPTION),
                indexes,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_bodies_are_json_or_empty() {
        assert!(classify(200, None, b"").is_ok());
        assert!(classify(200, None, br#"{"data":{"processed":2}}"#).is_ok());
        assert!(classify(200, None, b"<html>").unwrap_err().is_transient());
        let echo = format!("[{}]", vec![r#"{"user_id":"1"}"#; 1000].join(","));
        assert!(classify(200, None, echo.as_bytes()).is_ok());
        let page = format!("<html>{}</html>", "x".repeat(10_000));
        assert!(
            classify(200, None, page.as_bytes())
                .unwrap_err()
                .is_transient()
        );
        assert!(
            classify(200, None, &echo.as_bytes()[..5000])
                .unwrap_err()
                .is_transient()
        );
    }

    #[test]
    fn throttling_and_server_errors_are_transient() {
        let e = classify(429, Some("7"), b"").unwrap_err();
        assert!(
            matches!(e, ApiError::Transient { retry_after: Some(d), .. } if d == Duration::from_secs(7))
        );
        assert!(
            classify(502, None, b"<html>Bad gateway</html>")
                .unwrap_err()
                .is_transient()
        );
        assert!(classify(503, None, b"").unwrap_err().is_transient());
    }

    #[test]
    fn auth_failures_are_told_apart() {
        assert!(matches!(
            classify(401, None, b"").unwrap_err(),
            ApiError::Unauthorized { status: 401 }
        ));
        assert!(matches!(
            classify(403, None, b"{}").unwrap_err(),
            ApiError::Unauthorized { status: 403 }
        ));
    }

    #[test]
    fn rejections_carry_code_description_and_indexes() {
        let e = classify(
            400,
            None,
            br#"{"error":"INVALID_USER_DATA","description":"bad","data":[{"index":3,"fields":["name"]},{"index":1}]}"#,
        )
        .unwrap_err();
        match &e {
            ApiError::Rejected {
                code,
                description,
                indexes,
                status,
            } => {
                assert_eq!(code, "INVALID_USER_DATA");
                assert_eq!(description, "bad");
                assert_eq!(indexes, &[1, 3]);
                assert_eq!(*status, 400);
            }
            other => panic!("{other:?}"),
        }
        assert!(e.code_is("invalidUserData"));
        let e = classify(400, None, b"not json at all").unwrap_err();
        assert!(e.code_is("HTTP_400"));
        let e = classify(422, None, b"").unwrap_err();
        assert!(matches!(e, ApiError::Rejected { ref indexes, .. } if indexes.is_empty()));
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(Duration::from_secs(3)));
        let future =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let d = parse_retry_after(&future).unwrap();
        assert!(d <= Duration::from_secs(120) && d >= Duration::from_secs(100));
        assert_eq!(parse_retry_after("soon"), None);
    }
}
