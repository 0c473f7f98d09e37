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

/// A short, non-reversible fingerprint of a token, to notice rotation without storing it.
pub fn token_fingerprint(token: &SecretString) -> String {
    content_hash(token.expose_secret().as_bytes())[..16].to_string()
}
