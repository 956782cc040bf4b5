//! Request bodies: read with a size cap, parsed into the generated App Mesh input shapes with
//! the JSON path of any problem (wrong type, unknown member, missing member), then validated.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::error::HttpError;
use crate::model::ApiError;

/// App Mesh request bodies are small; anything above this is refused before parsing.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Reads the whole body, refusing more than [`MAX_BODY_BYTES`].
pub async fn read(body: Body) -> Result<Bytes, HttpError> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(HttpError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "BadRequestException",
                format!("request body exceeds the limit of {MAX_BODY_BYTES} bytes (1 MiB)"),
            ))
        }
        Err(e) => {
            Err(ApiError::bad_request(format!("could not read the request body: {e}")).into())
        }
    }
}

/// Parses JSON into `T`, naming the member at fault. An empty body counts as `{}`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
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
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::bad_request(format!("the request body is not valid JSON: {msg}"));
        }
        let msg = strip_position(&msg);
        if path.is_empty() {
            ApiError::bad_request(format!("request body: {msg}"))
        } else {
            ApiError::bad_request(format!("{path}: {msg}"))
        }
    })
}

/// serde_json appends " at line 1 column 42"; the field path says more.
fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => msg,
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
