//! Request bodies: read with a size cap, parsed into the generated App Mesh input shapes with
//! the JSON path of any problem (wrong type, unknown member, missing member), then validated.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::error::HttpError;
use crate::model::ApiError;

/// App Mesh request bodies are small; anything above this is refused before parsing.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// A backup restored through `PUT /v1/snapshot` may be this large.
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// The body limit of a request to `path`: 1 MiB (App Mesh's), except for a snapshot.
pub fn limit_for(path: &str) -> usize {
    if path == "/v1/snapshot" {
        MAX_SNAPSHOT_BYTES
    } else {
        MAX_BODY_BYTES
    }
}

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`].
pub async fn read(body: Body) -> Result<Bytes, HttpError> {
    read_up_to(body, MAX_BODY_BYTES).await
}

/// Reads the whole body, refusing more than `limit` bytes.
pub async fn read_up_to(body: Body, limit: usize) -> Result<Bytes, HttpError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BadRequestException",
                format!("request body exceeds the limit of {limit} bytes"),
            ))
        }
        Err(e) => {
            Err(ApiError::bad_request(format!("could not read the request body: {e}")).into())
        }
    }
}

/// Parses JSON into `T`, naming the member at fault. An empty body counts as `{}`.
pub fn parse<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let input: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    if !input.is_object() {
        return Err(ApiError::bad_request(format!(
            "request body: expected a JSON object, got {}",
            kind(&input)
        )));
    }
    let typed: T = serde_path_to_error::deserialize(&input).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        let path = if path == "." { String::new() } else { path };
        // serde says "missing field `port`" at the parent; name the member itself instead.
        if let Some(rest) = msg.strip_prefix("missing field `")
            && let Some(field) = rest.split('`').next()
        {
            let full = if path.is_empty() {
                field.to_string()
            } else {
                format!("{path}.{field}")
            };
            return ApiError::bad_request(format!("{full}: is required"));
        }
        if path.is_empty() {
            ApiError::bad_request(format!("request body: {msg}"))
        } else {
            ApiError::bad_request(format!("{path}: {msg}"))
        }
    })?;
    // serde also accepts a JSON array for a struct (as a tuple); App Mesh's shapes are objects.
    // Whatever the typed value does not say back the same way was not an App Mesh shape.
    let back = serde_json::to_value(&typed).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some((path, want, got)) = first_difference(&back, &input, String::new()) {
        return Err(ApiError::bad_request(format!(
            "{path}: expected {want}, got {got}"
        )));
    }
    Ok(typed)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The first place where `input` differs from the typed value's rendering `back` (members that
/// are null in the input are absent in `back`).
fn first_difference(
    back: &Value,
    input: &Value,
    path: String,
) -> Option<(String, &'static str, &'static str)> {
    let at = |p: &str, m: &str| {
        if p.is_empty() {
            m.to_string()
        } else {
            format!("{p}.{m}")
        }
    };
    match (back, input) {
        (Value::Object(b), Value::Object(i)) => {
            for (k, iv) in i {
                match b.get(k) {
                    Some(bv) => {
                        if let Some(d) = first_difference(bv, iv, at(&path, k)) {
                            return Some(d);
                        }
                    }
                    None if iv.is_null() => {}
                    None => return Some((at(&path, k), "no value here", kind(iv))),
                }
            }
            None
        }
        (Value::Array(b), Value::Array(i)) => b
            .iter()
            .zip(i)
            .enumerate()
            .find_map(|(n, (bv, iv))| first_difference(bv, iv, format!("{path}[{n}]"))),
        (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_))
        | (Value::Bool(_), Value::Bool(_)) => None,
        (b, i) => Some((
            if path.is_empty() {
                "request body".into()
            } else {
                path
            },
            kind(b),
            kind(i),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shapes::CreateVirtualNodeInput;

    #[test]
    fn errors_name_the_member() {
        let e = parse::<CreateVirtualNodeInput>(br#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"port":"x","protocol":"http"}}]}}"#)
            .unwrap_err();
        assert!(
            e.message
                .starts_with("spec.listeners[0].portMapping.port: invalid type: string \"x\""),
            "{}",
            e.message
        );
        let e = parse::<CreateVirtualNodeInput>(br#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"protocol":"http"}}]}}"#)
            .unwrap_err();
        assert_eq!(e.message, "spec.listeners[0].portMapping.port: is required");
        let e = parse::<CreateVirtualNodeInput>(br#"{"virtualNodeName":"a","spec":{},"color":1}"#)
            .unwrap_err();
        assert!(
            e.message.starts_with("color: unknown field `color`")
                || e.message.contains("unknown field `color`"),
            "{}",
            e.message
        );
        let e = parse::<CreateVirtualNodeInput>(br#"{"virtualNodeName":"a","spec":{"#).unwrap_err();
        assert!(
            e.message.starts_with("the request body is not valid JSON"),
            "{}",
            e.message
        );
        let e = parse::<CreateVirtualNodeInput>(br#"{"virtualNodeName":"a","spec":{"listeners":[{"portMapping":{"port":1,"protocol":"htp"}}]}}"#)
            .unwrap_err();
        assert!(
            e.message
                .starts_with("spec.listeners[0].portMapping.protocol: unknown variant `htp`"),
            "{}",
            e.message
        );
    }
}
