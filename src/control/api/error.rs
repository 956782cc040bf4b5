//! Turns App Mesh errors into HTTP answers, in one place: the model's status code,
//! `x-amzn-ErrorType` (what botocore reads) and a `{"message": …}` body.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::control::raft::WriteError;
use crate::model::{ApiError, ErrorKind};

/// An error answer of the API.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds a client should wait before retrying, for 503s.
    pub retry_after: Option<u32>,
}

impl HttpError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        let status =
            StatusCode::from_u16(e.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = (e.kind == ErrorKind::ServiceUnavailable).then_some(1);
        Self {
            status,
            code: e.kind.code(),
            message: e.message,
            retry_after,
        }
    }
}

impl From<WriteError> for HttpError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::NoLeader | WriteError::NotLeader { .. } | WriteError::Unknown(_) => {
                let mut h: HttpError =
                    ApiError::new(ErrorKind::ServiceUnavailable, format!("{e}")).into();
                h.retry_after = Some(1);
                h
            }
            WriteError::Fatal(m) => ApiError::new(ErrorKind::InternalServerError, m).into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "message": self.message }).to_string();
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-amzn-errortype", HeaderValue::from_static(self.code));
        if let Some(s) = self.retry_after {
            h.insert("retry-after", HeaderValue::from(s));
        }
        resp
    }
}
