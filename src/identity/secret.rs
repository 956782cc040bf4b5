//! Secrets the control plane hands out: join tokens (`trellis-<id>.<secret>`; only the
//! secret's SHA-256 is stored) and API access keys (an AWS-shaped id and a 40-character
//! secret). Random bytes come from the OS through ring; comparisons of secrets take constant
//! time.

use ring::rand::{SecureRandom, SystemRandom};

const TOKEN_PREFIX: &str = "trellis-";
/// Letters for ids: upper case and digits, as AWS access key ids.
const ID_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the system random generator failed")]
    Random,
    #[error("not a join token (expected trellis-<id>.<secret>)")]
    MalformedToken,
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Random)?;
    Ok(b)
}

fn random_id(len: usize) -> Result<String, SecretError> {
    let bytes = random_bytes::<32>()?;
    Ok(bytes
        .iter()
        .take(len)
        .map(|b| ID_ALPHABET[usize::from(*b) % ID_ALPHABET.len()] as char)
        .collect())
}

/// A new join token: its public id, the full token to give the operator, and the hash to store.
pub struct NewToken {
    pub id: String,
    pub token: String,
    pub hash: String,
}

pub fn new_token() -> Result<NewToken, SecretError> {
    let id = random_id(10)?.to_ascii_lowercase();
    let secret = hex(&random_bytes::<24>()?);
    Ok(NewToken {
        hash: sha256_hex(secret.as_bytes()),
        token: format!("{TOKEN_PREFIX}{id}.{secret}"),
        id,
    })
}

/// The id and the stored hash of a token the operator presents.
pub fn token_hash(token: &str) -> Result<(String, String), SecretError> {
    let rest = token
        .trim()
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(SecretError::MalformedToken)?;
    let (id, secret) = rest.split_once('.').ok_or(SecretError::MalformedToken)?;
    if id.is_empty() || secret.len() < 16 {
        return Err(SecretError::MalformedToken);
    }
    Ok((id.to_string(), sha256_hex(secret.as_bytes())))
}

/// A new access key id (`TRK` + 17) and secret (40 characters), shaped like AWS's.
pub fn new_access_key() -> Result<(String, String), SecretError> {
    use base64::Engine;
    let id = format!("TRK{}", random_id(17)?);
    let secret = base64::engine::general_purpose::STANDARD.encode(random_bytes::<30>()?);
    Ok((id, secret))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a file atomically (a temp file, synced, renamed) with `mode` from its creation, so
/// a key is never readable by others, not even for a moment.
pub fn write_file(path: &std::path::Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Equality that takes the same time wherever the inputs differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_hash_back_to_what_is_stored() {
        let t = new_token().unwrap();
        assert!(t.token.starts_with("trellis-"));
        let (id, hash) = token_hash(&t.token).unwrap();
        assert_eq!(
            (id.as_str(), hash.as_str()),
            (t.id.as_str(), t.hash.as_str())
        );
        assert!(!t.hash.contains(t.token.split('.').nth(1).unwrap()));
        for bad in [
            "",
            "trellis-",
            "trellis-abc",
            "other-abc.0123456789abcdef0",
            "trellis-.0123456789abcdef",
        ] {
            assert!(token_hash(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn access_keys_look_like_aws_keys() {
        let (id, secret) = new_access_key().unwrap();
        assert_eq!(id.len(), 20);
        assert!(id.starts_with("TRK"));
        assert_eq!(secret.len(), 40);
        assert_ne!(new_access_key().unwrap().0, id);
    }

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
