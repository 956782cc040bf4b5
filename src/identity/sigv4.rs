//! AWS Signature Version 4, as botocore (the aws CLI, boto3) computes it for a REST-JSON
//! service such as App Mesh: the server verifies it on every API request; trellis's own CLI
//! signs with it. The canonical request follows botocore byte for byte: the (already
//! percent-encoded) path encoded once more, query pairs sorted, header values trimmed with
//! inner spaces collapsed, the body's SHA-256. Secrets never appear in errors, and
//! signatures are compared in constant time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::hmac;

use super::secret::{constant_time_eq, hex, sha256_hex};

const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Why a request's signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SigV4Error {
    #[error(
        "missing Authentication Token: sign the request with SigV4 (an access key from `trellis keys create`)"
    )]
    Missing,
    #[error("Authorization header: {0}")]
    Malformed(String),
    #[error("the security token included in the request is invalid: unknown access key {0}")]
    UnknownKey(String),
    #[error("the credential scope names region {got}, this endpoint serves {want}")]
    Region { got: String, want: String },
    #[error("the credential scope names service {got}, this endpoint serves {want}")]
    Service { got: String, want: String },
    #[error("missing X-Amz-Date")]
    MissingDate,
    #[error("X-Amz-Date {0:?} is not a date like 20261123T101010Z")]
    BadDate(String),
    #[error("the credential scope date {scope} does not match X-Amz-Date {date}")]
    ScopeDate { scope: String, date: String },
    #[error(
        "signature expired or not yet current: X-Amz-Date {date} is outside the {skew} s skew window of the server clock {now}"
    )]
    Skew {
        date: String,
        now: String,
        skew: u64,
    },
    #[error("the host header must be signed")]
    HostNotSigned,
    #[error("signed header {0} is missing from the request")]
    MissingSignedHeader(String),
    #[error("x-amz-content-sha256 does not match the body (UNSIGNED-PAYLOAD is not accepted)")]
    PayloadHash,
    #[error(
        "the request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."
    )]
    Mismatch,
}

/// What the Authorization header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub access_key_id: String,
    /// `yyyymmdd`.
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
}

/// One request as the server received it (path and query exactly as on the wire).
pub struct Request<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a http::HeaderMap,
    pub body: &'a [u8],
}

/// What a signature must match on this server.
pub struct Expect<'a> {
    pub region: &'a str,
    pub service: &'a str,
    pub now: SystemTime,
    pub max_skew: Duration,
}

pub fn parse_authorization(headers: &http::HeaderMap) -> Result<Authorization, SigV4Error> {
    let value = headers
        .get(http::header::AUTHORIZATION)
        .ok_or(SigV4Error::Missing)?
        .to_str()
        .map_err(|_| SigV4Error::Malformed("not ASCII".into()))?;
    let rest = value
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| SigV4Error::Malformed(format!("the algorithm must be {ALGORITHM}")))?;
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        match part.split_once('=') {
            Some(("Credential", v)) => credential = Some(v),
            Some(("SignedHeaders", v)) => signed = Some(v),
            Some(("Signature", v)) => signature = Some(v),
            _ => return Err(SigV4Error::Malformed(format!("unexpected part {part:?}"))),
        }
    }
    let missing = |what: &str| SigV4Error::Malformed(format!("missing {what}"));
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [key, date, region, service, "aws4_request"] = scope[..] else {
        return Err(SigV4Error::Malformed(
            "malformed Credential: expected KEY/yyyymmdd/region/service/aws4_request".into(),
        ));
    };
    let signature = signature.ok_or_else(|| missing("Signature"))?;
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SigV4Error::Malformed(
            "Signature must be 64 hex digits".into(),
        ));
    }
    Ok(Authorization {
        access_key_id: key.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers: signed
            .ok_or_else(|| missing("SignedHeaders"))?
            .split(';')
            .filter(|h| !h.is_empty())
            .map(str::to_ascii_lowercase)
            .collect(),
        signature: signature.to_ascii_lowercase(),
    })
}

/// Checks the signature of `req`, made with `secret` (the caller looked it up by key id).
pub fn verify(
    req: &Request,
    auth: &Authorization,
    secret: &str,
    expect: &Expect,
) -> Result<(), SigV4Error> {
    if auth.region != expect.region {
        return Err(SigV4Error::Region {
            got: auth.region.clone(),
            want: expect.region.to_string(),
        });
    }
    if auth.service != expect.service {
        return Err(SigV4Error::Service {
            got: auth.service.clone(),
            want: expect.service.to_string(),
        });
    }
    let amz_date = req
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or(SigV4Error::MissingDate)?;
    let when = parse_amz_date(amz_date).ok_or_else(|| SigV4Error::BadDate(amz_date.into()))?;
    if !amz_date.starts_with(&auth.date) || auth.date.len() != 8 {
        return Err(SigV4Error::ScopeDate {
            scope: auth.date.clone(),
            date: amz_date.into(),
        });
    }
    let now = epoch(expect.now);
    if now.abs_diff(when) > expect.max_skew.as_secs() {
        return Err(SigV4Error::Skew {
            date: amz_date.into(),
            now: format_amz_date(now),
            skew: expect.max_skew.as_secs(),
        });
    }
    if !auth.signed_headers.iter().any(|h| h == "host") {
        return Err(SigV4Error::HostNotSigned);
    }
    let body_hash = sha256_hex(req.body);
    let payload = match req.headers.get("x-amz-content-sha256") {
        Some(v) if v.as_bytes() != body_hash.as_bytes() => return Err(SigV4Error::PayloadHash),
        _ => body_hash,
    };
    let canonical = canonical_request(
        req.method,
        req.path,
        req.query,
        req.headers,
        &auth.signed_headers,
        &payload,
    )?;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let expected = signature(
        secret,
        &auth.date,
        &auth.region,
        &auth.service,
        amz_date,
        &scope,
        &canonical,
    );
    if constant_time_eq(expected.as_bytes(), auth.signature.as_bytes()) {
        Ok(())
    } else {
        Err(SigV4Error::Mismatch)
    }
}

/// Signs a request for trellis's own client: sets `x-amz-date` and `authorization` (every
/// header present is signed; `host` must be among them).
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &mut http::HeaderMap,
    body: &[u8],
    access_key_id: &str,
    secret: &str,
    region: &str,
    service: &str,
    now: SystemTime,
) {
    let amz_date = format_amz_date(epoch(now));
    let date = &amz_date[..8];
    if let Ok(v) = http::HeaderValue::from_str(&amz_date) {
        headers.insert("x-amz-date", v);
    }
    let mut names: Vec<String> = headers
        .keys()
        .map(|k| k.as_str().to_ascii_lowercase())
        .filter(|k| k != "authorization" && k != "user-agent" && k != "expect")
        .collect();
    names.sort();
    names.dedup();
    let payload = sha256_hex(body);
    // Every name comes from `headers`: the canonical request cannot miss one.
    let Ok(canonical) = canonical_request(method, path, query, headers, &names, &payload) else {
        return;
    };
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let sig = signature(secret, date, region, service, &amz_date, &scope, &canonical);
    let value = format!(
        "{ALGORITHM} Credential={access_key_id}/{scope}, SignedHeaders={}, Signature={sig}",
        names.join(";")
    );
    if let Ok(v) = http::HeaderValue::from_str(&value) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
}

fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    amz_date: &str,
    scope: &str,
    canonical: &str,
) -> String {
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
            .as_ref()
            .to_vec()
    };
    let k_date = mac(format!("AWS4{secret}").as_bytes(), date);
    let k_region = mac(&k_date, region);
    let k_service = mac(&k_region, service);
    let k_signing = mac(&k_service, "aws4_request");
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical.as_bytes())
    );
    hex(&mac(&k_signing, &to_sign))
}

/// The canonical request of SigV4 (botocore's, for services other than S3).
pub fn canonical_request(
    method: &str,
    path: &str,
    query: Option<&str>,
    headers: &http::HeaderMap,
    signed_headers: &[String],
    payload_hash: &str,
) -> Result<String, SigV4Error> {
    let mut lines = Vec::with_capacity(signed_headers.len());
    for name in signed_headers {
        let values: Vec<String> = headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(SigV4Error::MissingSignedHeader(name.clone()));
        }
        lines.push(format!("{name}:{}", values.join(",")));
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n\n{}\n{}",
        method.to_ascii_uppercase(),
        canonical_path(path),
        canonical_query(query.unwrap_or("")),
        lines.join("\n"),
        signed_headers.join(";"),
        payload_hash
    ))
}

/// botocore: dot segments and empty segments removed, then quoted (safe `/~`) once more.
fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut normalized = String::new();
    if path.starts_with('/') {
        normalized.push('/');
    }
    normalized.push_str(&out.join("/"));
    if path.ends_with('/') && !out.is_empty() {
        normalized.push('/');
    }
    quote(&normalized, b"/~")
}

/// Pairs decoded and re-quoted (safe `-_.~`), then sorted: what botocore signs for a query it
/// encoded itself, and the same for clients that encode differently.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (quote(&unquote(k), b"-_.~"), quote(&unquote(v), b"-_.~"))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Python's `urllib.parse.quote(s, safe)`: letters, digits, `_.-~` and `safe` stay.
fn quote(s: &str, safe: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || safe.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unquote(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex_at = |j: usize| bytes.get(j).and_then(|c| (*c as char).to_digit(16));
        match (bytes[i], hex_at(i + 1), hex_at(i + 2)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `yyyymmddThhmmssZ` → epoch seconds.
fn parse_amz_date(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, se) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    u64::try_from(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se).ok()
}

fn format_amz_date(t: u64) -> String {
    let secs = t as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
