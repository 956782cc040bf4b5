//! App Mesh's error classes. The state machine and the API answer with these; the HTTP layer maps
//! each to its status code and `x-amzn-ErrorType` in one place.

use serde::{Deserialize, Serialize};

/// The exception shapes of the App Mesh model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    BadRequest,
    Forbidden,
    NotFound,
    Conflict,
    ResourceInUse,
    LimitExceeded,
    TooManyTags,
    TooManyRequests,
    InternalServerError,
    ServiceUnavailable,
}

impl ErrorKind {
    /// The exception name botocore reads from `x-amzn-ErrorType`.
    pub fn code(self) -> &'static str {
        match self {
            Self::BadRequest => "BadRequestException",
            Self::Forbidden => "ForbiddenException",
            Self::NotFound => "NotFoundException",
            Self::Conflict => "ConflictException",
            Self::ResourceInUse => "ResourceInUseException",
            Self::LimitExceeded => "LimitExceededException",
            Self::TooManyTags => "TooManyTagsException",
            Self::TooManyRequests => "TooManyRequestsException",
            Self::InternalServerError => "InternalServerErrorException",
            Self::ServiceUnavailable => "ServiceUnavailableException",
        }
    }

    /// The HTTP status the model gives the exception.
    pub fn status(self) -> u16 {
        match self {
            Self::BadRequest | Self::LimitExceeded | Self::TooManyTags => 400,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict | Self::ResourceInUse => 409,
            Self::TooManyRequests => 429,
            Self::InternalServerError => 500,
            Self::ServiceUnavailable => 503,
        }
    }
}

/// An App Mesh error: its class and a message saying what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}: {message}", kind.code())]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }
    pub fn in_use(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::ResourceInUse, message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::LimitExceeded, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }
}

impl From<crate::model::validate::FieldErrors> for ApiError {
    fn from(e: crate::model::validate::FieldErrors) -> Self {
        Self::bad_request(e.to_string())
    }
}
