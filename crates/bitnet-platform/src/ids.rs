//! Ids, secrets and their hashes.
//!
//! Ids carry their kind as OpenAI's Administration API spells them (`proj_`, `user-`,
//! `svc_acct_`, `key_`, `invite-`, `audit_log-`) followed by a UUIDv7 in hex, so sorting by id
//! sorts by creation time, which is what list pagination (`after`) walks.

use crate::error::{PlatformError, Result};
use sha2::{Digest, Sha256};

/// A new id: `prefix` and a time-ordered UUID.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `n` random base62 characters (rejection sampling keeps them uniform).
pub fn random_token(n: usize) -> Result<String> {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(n);
    while out.len() < n {
        let mut b = [0u8; 64];
        getrandom::fill(&mut b).map_err(|e| PlatformError::Random(e.to_string()))?;
        for &x in &b {
            if x < 248 && out.len() < n {
                out.push(ALPHABET[(x % 62) as usize] as char);
            }
        }
    }
    Ok(out)
}

/// The hex SHA-256 of a secret: what the database keeps of a key.
pub fn secret_hash(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// A key as listings show it: its kind prefix, a few characters, and its last four.
/// The bytes of a hex string (pairs that are not hex are skipped).
pub fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

pub fn redact(key: &str, prefix: &str) -> String {
    let body = &key[prefix.len()..];
    let tail = &body[body.len().saturating_sub(4)..];
    format!("{prefix}{}...{tail}", &body[..4.min(body.len())])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sort_by_creation_and_keys_are_uniform_base62() {
        let a = new_id("proj_");
        let b = new_id("proj_");
        assert!(a < b, "{a} {b}");
        assert_eq!(a.len(), 5 + 32);
        let t = random_token(48).unwrap();
        assert_eq!(t.len(), 48);
        assert!(t.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(t, random_token(48).unwrap());
        assert_eq!(
            redact("sk-proj-abcdefghijklmnop", "sk-proj-"),
            "sk-proj-abcd...mnop"
        );
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
