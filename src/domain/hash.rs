//! Content hashes: what the mirror compares, and fingerprints that identify without revealing.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// 128 bits of BLAKE3 in hex: plenty to tell payloads apart, small in the mirror.
pub fn content_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_string()
}

/// [`content_hash`] of a value's JSON (its canonical form). The JSON is written to a buffer
/// and hashed at once: fed to the hasher piece by piece, a user's payload cost four times more.
pub fn json_hash(value: &impl Serialize) -> String {
    let mut json = Vec::with_capacity(128);
    serde_json::to_writer(&mut json, value).expect("serializes");
    content_hash(&json)
}

/// A 64-bit key from a salt, mixed into the hashes PostgreSQL computes of CRM rows: a row
/// hash remembered under another salt (another code version, region or role map) never
/// matches again.
pub fn salt_key(salt: &str) -> i64 {
    let hash = blake3::hash(salt.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&hash.as_bytes()[..8]);
    i64::from_le_bytes(bytes)
}

/// A short, non-reversible fingerprint of a token, to notice rotation without storing it.
pub fn token_fingerprint(token: &SecretString) -> String {
    content_hash(token.expose_secret().as_bytes())[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UserPayload;

    #[test]
    fn a_user_is_hashed_as_the_json_wazzup_receives() {
        let payload = UserPayload {
            id: "42".into(),
            name: "Jānis \"JB\" Bērziņš".into(),
            phone: Some("37126123456".into()),
        };
        let wire = r#"{"id":"42","name":"Jānis \"JB\" Bērziņš","phone":"37126123456"}"#;
        assert_eq!(json_hash(&payload), content_hash(wire.as_bytes()));
        // Without a phone, the key is left out, as in the request.
        let no_phone = UserPayload {
            phone: None,
            ..payload
        };
        let wire = r#"{"id":"42","name":"Jānis \"JB\" Bērziņš"}"#;
        assert_eq!(json_hash(&no_phone), content_hash(wire.as_bytes()));
        assert_eq!(json_hash(&no_phone).len(), 32);
    }

    #[test]
    fn another_salt_gives_another_key_and_a_token_is_never_its_fingerprint() {
        assert_ne!(salt_key("0.1.0|RU"), salt_key("0.1.0|LV"));
        assert_eq!(salt_key("0.1.0|RU"), salt_key("0.1.0|RU"));
        let token = SecretString::from("a-token-of-some-length".to_string());
        let print = token_fingerprint(&token);
        assert_eq!(print.len(), 16);
        assert!(!"a-token-of-some-length".contains(&print));
    }
}
