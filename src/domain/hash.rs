//! Content hashes: what the mirror compares, and fingerprints that identify without revealing.

use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// 128 bits of BLAKE3 in hex: plenty to tell payloads apart, small in the mirror.
pub fn content_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex()[..32].to_string()
}

/// [`content_hash`] of a value's JSON (its canonical form), written straight into the hasher.
pub fn json_hash(value: &impl Serialize) -> String {
    let mut hasher = blake3::Hasher::new();
    serde_json::to_writer(&mut hasher, value).expect("serializes");
    hasher.finalize().to_hex()[..32].to_string()
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
