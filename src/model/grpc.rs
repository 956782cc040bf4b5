//! gRPC's status codes as the proxy and its logs speak of them: their names (gRPC's
//! `codes.proto` in two spellings, as Envoy's `%GRPC_STATUS%` writes them), the code a plain
//! HTTP status stands for (gRPC's doc/http-grpc-status-mapping.md), and what makes a request
//! gRPC. Shared by the proxy's answers to gRPC callers and its access logs.

/// The codes this crate names in its own decisions.
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const PERMISSION_DENIED: u32 = 7;
pub const UNIMPLEMENTED: u32 = 12;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

/// Code, Envoy's CamelCase name, and the SCREAMING_SNAKE name of `codes.proto`.
const NAMES: [(&str, &str); 17] = [
    ("OK", "OK"),
    ("Canceled", "CANCELLED"),
    ("Unknown", "UNKNOWN"),
    ("InvalidArgument", "INVALID_ARGUMENT"),
    ("DeadlineExceeded", "DEADLINE_EXCEEDED"),
    ("NotFound", "NOT_FOUND"),
    ("AlreadyExists", "ALREADY_EXISTS"),
    ("PermissionDenied", "PERMISSION_DENIED"),
    ("ResourceExhausted", "RESOURCE_EXHAUSTED"),
    ("FailedPrecondition", "FAILED_PRECONDITION"),
    ("Aborted", "ABORTED"),
    ("OutOfRange", "OUT_OF_RANGE"),
    ("Unimplemented", "UNIMPLEMENTED"),
    ("Internal", "INTERNAL"),
    ("Unavailable", "UNAVAILABLE"),
    ("DataLoss", "DATA_LOSS"),
    ("Unauthenticated", "UNAUTHENTICATED"),
];

/// Envoy's CamelCase name of `code` (`%GRPC_STATUS%`); none for a code gRPC does not define.
pub fn camel_name(code: u32) -> Option<&'static str> {
    NAMES.get(code as usize).map(|n| n.0)
}

/// `codes.proto`'s name of `code` (`%GRPC_STATUS(SNAKE_STRING)%`).
pub fn snake_name(code: u32) -> Option<&'static str> {
    NAMES.get(code as usize).map(|n| n.1)
}

/// The code an HTTP status without a `grpc-status` stands for.
pub fn from_http_status(status: u16) -> u32 {
    match status {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The code a caller's gRPC library reports for a stream reset with HTTP/2 error `reason`
/// (gRPC's PROTOCOL-HTTP2.md, "Errors").
pub fn from_http2_reset(reason: u32) -> u32 {
    match reason {
        0x7 => UNAVAILABLE,        // REFUSED_STREAM
        0x8 => CANCELLED,          // CANCEL
        0xb => RESOURCE_EXHAUSTED, // ENHANCE_YOUR_CALM
        0xc => PERMISSION_DENIED,  // INADEQUATE_SECURITY
        _ => INTERNAL,
    }
}

/// Whether a `content-type` is gRPC's: `application/grpc`, or it with `+proto`, `+json`, `;…`.
#[inline]
pub fn is_grpc_content_type(v: &[u8]) -> bool {
    v.starts_with(b"application/grpc")
        && matches!(v.get(b"application/grpc".len()), None | Some(b'+' | b';'))
}

/// A `grpc-status` value: a decimal code (gRPC sends no other form).
pub fn parse_status(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_codes_proto_in_both_spellings() {
        assert_eq!(camel_name(0), Some("OK"));
        assert_eq!(camel_name(1), Some("Canceled"));
        assert_eq!(snake_name(1), Some("CANCELLED"));
        assert_eq!(camel_name(UNAVAILABLE), Some("Unavailable"));
        assert_eq!(snake_name(4), Some("DEADLINE_EXCEEDED"));
        assert_eq!(camel_name(UNAUTHENTICATED), Some("Unauthenticated"));
        assert_eq!(camel_name(17), None);
        assert_eq!(snake_name(99), None);
    }

    #[test]
    fn http_statuses_map_as_grpc_says() {
        for (http, code) in [
            (400, INTERNAL),
            (401, UNAUTHENTICATED),
            (403, PERMISSION_DENIED),
            (404, UNIMPLEMENTED),
            (429, UNAVAILABLE),
            (502, UNAVAILABLE),
            (503, UNAVAILABLE),
            (504, UNAVAILABLE),
            (500, UNKNOWN),
            (200, UNKNOWN),
        ] {
            assert_eq!(from_http_status(http), code, "HTTP {http}");
        }
    }

    #[test]
    fn http2_resets_map_as_grpc_says() {
        for (reason, code) in [
            (0x0, INTERNAL),
            (0x2, INTERNAL),
            (0x7, UNAVAILABLE),
            (0x8, CANCELLED),
            (0xb, RESOURCE_EXHAUSTED),
            (0xc, PERMISSION_DENIED),
            (0x99, INTERNAL),
        ] {
            assert_eq!(from_http2_reset(reason), code, "reset {reason:#x}");
        }
    }

    #[test]
    fn grpc_content_types_and_statuses_are_recognised() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;x=y",
        ] {
            assert!(is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
        for ct in [
            "application/grpcx",
            "application/json",
            "application/grpc-web",
            "",
        ] {
            assert!(!is_grpc_content_type(ct.as_bytes()), "{ct}");
        }
        assert_eq!(parse_status(b"14"), Some(14));
        assert_eq!(parse_status(b"0"), Some(0));
        for bad in [&b""[..], b"-1", b"1 4", b"x", b"99999999999"] {
            assert_eq!(parse_status(bad), None, "{bad:?}");
        }
    }
}
