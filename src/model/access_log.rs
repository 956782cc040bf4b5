//! The grammar of App Mesh access-log formats (`logging.accessLog.file.format`): Envoy's
//! command operators in a text line (`%START_TIME%`, `%REQ(X?Y):N%` …) or in the values of a
//! JSON object. Parsed here, where the API validates a spec (an unknown operator is refused
//! with its position), and again by the proxy, which renders each request with it.

use std::fmt;

/// Envoy's default, the line App Mesh's proxies wrote when a spec gives no format.
pub const DEFAULT_TEXT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

/// One piece of a format: literal text or a command operator.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Op(Operator, Option<usize>),
}

/// The command operators trellis renders.
#[derive(Debug, Clone, PartialEq)]
pub enum Operator {
    /// `%START_TIME%` (RFC 3339, milliseconds, UTC) or `%START_TIME(FMT)%` with strftime's
    /// `%Y %m %d %H %M %S %s %z %%` and `%3f` `%6f` `%9f`.
    StartTime(Option<String>),
    /// `%REQ(X)%`, `%REQ(X?Y)%`: a request header (pseudo-headers `:method`, `:path`,
    /// `:authority`, `:scheme` included), else the fallback.
    Req(String, Option<String>),
    /// `%RESP(X)%`, `%RESP(X?Y)%`: a response header.
    Resp(String, Option<String>),
    Protocol,
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    ResponseDuration,
    UpstreamHost,
    UpstreamCluster,
    UpstreamRequestAttemptCount,
    RouteName,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RequestedServerName,
    Hostname,
    /// `%GRPC_STATUS%` (or with `(CAMEL_STRING)`, `(SNAKE_STRING)`, `(NUMBER)`) and
    /// `%GRPC_STATUS_NUMBER%`: a gRPC request's status, from the trailers, else the response
    /// head, else inferred from the HTTP status; nothing for a request that is not gRPC.
    GrpcStatus(GrpcStatusFormat),
}

/// How `%GRPC_STATUS%` writes a code, Envoy's three ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatusFormat {
    /// `Unavailable` (Envoy's default).
    Camel,
    /// `UNAVAILABLE`.
    Snake,
    /// `14`.
    Number,
}

impl Operator {
    /// Whether the value is a number (kept a number in JSON).
    pub fn numeric(&self) -> bool {
        matches!(
            self,
            Self::ResponseCode
                | Self::BytesReceived
                | Self::BytesSent
                | Self::Duration
                | Self::ResponseDuration
                | Self::UpstreamRequestAttemptCount
                | Self::GrpcStatus(GrpcStatusFormat::Number)
        )
    }
}

/// Why a format cannot be used, with where in it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct FormatError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at byte {})", self.message, self.offset)
    }
}

/// Parses a format string into pieces.
pub fn parse(format: &str) -> Result<Vec<Piece>, FormatError> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = format;
    let mut offset = 0;
    while let Some(i) = rest.find('%') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let start = offset + i;
        // `%%` is a literal percent sign.
        if let Some(r) = after.strip_prefix('%') {
            text.push('%');
            offset = start + 2;
            rest = r;
            continue;
        }
        let (op, len) = operator(after).map_err(|message| FormatError {
            offset: start,
            message,
        })?;
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(op);
        offset = start + 1 + len;
        rest = &after[len..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// One operator after its opening `%`: the piece and the bytes it took, closing `%` included.
fn operator(s: &str) -> Result<(Piece, usize), String> {
    let name_len = s
        .find(|c: char| !(c.is_ascii_uppercase() || c == '_'))
        .unwrap_or(s.len());
    let name = &s[..name_len];
    if name.is_empty() {
        return Err(
            "a '%' must start a command operator such as %START_TIME% (write %% for a literal '%')"
                .into(),
        );
    }
    let mut used = name_len;
    let mut arg = None;
    if s[used..].starts_with('(') {
        let close = s[used..]
            .find(')')
            .ok_or_else(|| format!("%{name}(: the argument has no closing ')'"))?;
        arg = Some(s[used + 1..used + close].to_string());
        used += close + 1;
    }
    let mut max_len = None;
    if let Some(r) = s[used..].strip_prefix(':') {
        let digits = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
        let n = r[..digits]
            .parse::<usize>()
            .map_err(|_| format!("%{name}: ':' must be followed by a length"))?;
        max_len = Some(n);
        used += 1 + digits;
    }
    if !s[used..].starts_with('%') {
        return Err(format!("%{name}: the operator has no closing '%'"));
    }
    used += 1;
    let header = |arg: Option<String>| -> Result<(String, Option<String>), String> {
        let a = arg.ok_or_else(|| format!("%{name}% needs a header: %{name}(X-HEADER)%"))?;
        let (main, alt) = match a.split_once('?') {
            Some((m, alt)) => (m.to_string(), Some(alt.to_ascii_lowercase())),
            None => (a.clone(), None),
        };
        if main.is_empty() || alt.as_deref() == Some("") {
            return Err(format!("%{name}({a})%: empty header name"));
        }
        Ok((main.to_ascii_lowercase(), alt))
    };
    let no_arg = |op: Operator| -> Result<Operator, String> {
        match &arg {
            Some(a) => Err(format!("%{name}% takes no argument, got ({a})")),
            None => Ok(op),
        }
    };
    let op = match name {
        "START_TIME" => {
            if let Some(f) = &arg {
                check_time_format(f).map_err(|e| format!("%START_TIME({f})%: {e}"))?;
            }
            Operator::StartTime(arg)
        }
        "REQ" => {
            let (h, alt) = header(arg)?;
            Operator::Req(h, alt)
        }
        "RESP" => {
            let (h, alt) = header(arg)?;
            Operator::Resp(h, alt)
        }
        "PROTOCOL" => no_arg(Operator::Protocol)?,
        "RESPONSE_CODE" => no_arg(Operator::ResponseCode)?,
        "RESPONSE_FLAGS" => no_arg(Operator::ResponseFlags)?,
        "RESPONSE_CODE_DETAILS" => no_arg(Operator::ResponseCodeDetails)?,
        "BYTES_RECEIVED" => no_arg(Operator::BytesReceived)?,
        "BYTES_SENT" => no_arg(Operator::BytesSent)?,
        "DURATION" => no_arg(Operator::Duration)?,
        "RESPONSE_DURATION" => no_arg(Operator::ResponseDuration)?,
        "UPSTREAM_HOST" => no_arg(Operator::UpstreamHost)?,
        "UPSTREAM_CLUSTER" => no_arg(Operator::UpstreamCluster)?,
        "UPSTREAM_REQUEST_ATTEMPT_COUNT" => no_arg(Operator::UpstreamRequestAttemptCount)?,
        "ROUTE_NAME" => no_arg(Operator::RouteName)?,
        "DOWNSTREAM_REMOTE_ADDRESS" => no_arg(Operator::DownstreamRemoteAddress)?,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => {
            no_arg(Operator::DownstreamRemoteAddressWithoutPort)?
        }
        "DOWNSTREAM_LOCAL_ADDRESS" => no_arg(Operator::DownstreamLocalAddress)?,
        "REQUESTED_SERVER_NAME" => no_arg(Operator::RequestedServerName)?,
        "HOSTNAME" => no_arg(Operator::Hostname)?,
        "GRPC_STATUS" => Operator::GrpcStatus(match arg.as_deref() {
            None | Some("CAMEL_STRING") => GrpcStatusFormat::Camel,
            Some("SNAKE_STRING") => GrpcStatusFormat::Snake,
            Some("NUMBER") => GrpcStatusFormat::Number,
            Some(a) => {
                return Err(format!(
                    "%GRPC_STATUS({a})%: the format must be CAMEL_STRING, SNAKE_STRING or NUMBER"
                ));
            }
        }),
        "GRPC_STATUS_NUMBER" => no_arg(Operator::GrpcStatus(GrpcStatusFormat::Number))?,
        other => {
            return Err(format!(
                "unknown command operator %{other}% (known: START_TIME, REQ(X), RESP(X), PROTOCOL, RESPONSE_CODE, RESPONSE_FLAGS, RESPONSE_CODE_DETAILS, BYTES_RECEIVED, BYTES_SENT, DURATION, RESPONSE_DURATION, UPSTREAM_HOST, UPSTREAM_CLUSTER, UPSTREAM_REQUEST_ATTEMPT_COUNT, ROUTE_NAME, DOWNSTREAM_REMOTE_ADDRESS, DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT, DOWNSTREAM_LOCAL_ADDRESS, REQUESTED_SERVER_NAME, HOSTNAME, GRPC_STATUS, GRPC_STATUS_NUMBER)"
            ));
        }
    };
    Ok((Piece::Op(op, max_len), used))
}

/// The strftime specifiers `%START_TIME(…)%` supports.
fn check_time_format(f: &str) -> Result<(), String> {
    let mut chars = f.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            continue;
        }
        match chars.next() {
            Some('Y' | 'm' | 'd' | 'H' | 'M' | 'S' | 's' | 'z' | '%') => {}
            Some(d @ ('3' | '6' | '9')) => {
                if chars.next() != Some('f') {
                    return Err(format!("%{d} must be followed by f (%{d}f)"));
                }
            }
            Some(x) => {
                return Err(format!(
                    "unsupported specifier %{x} (supported: %Y %m %d %H %M %S %s %z %3f %6f %9f %%)"
                ));
            }
            None => return Err("a trailing '%'".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_format_parses() {
        let p = parse(DEFAULT_TEXT).unwrap();
        assert!(p.contains(&Piece::Op(Operator::StartTime(None), None)));
        assert!(p.contains(&Piece::Op(
            Operator::Req("x-envoy-original-path".into(), Some(":path".into())),
            None
        )));
        assert_eq!(p.last(), Some(&Piece::Text("\"\n".into())));
    }

    #[test]
    fn operators_arguments_lengths_and_literal_percent() {
        let p = parse("100%% %REQ(User-Agent):10% %START_TIME(%s)%").unwrap();
        assert_eq!(
            p,
            vec![
                Piece::Text("100% ".into()),
                Piece::Op(Operator::Req("user-agent".into(), None), Some(10)),
                Piece::Text(" ".into()),
                Piece::Op(Operator::StartTime(Some("%s".into())), None),
            ]
        );
    }

    #[test]
    fn bad_formats_say_what_and_where() {
        let e = parse("ok %NOPE% x").unwrap_err();
        assert_eq!(e.offset, 3);
        assert!(e.message.contains("unknown command operator %NOPE%"), "{e}");
        let e = parse("%REQ%").unwrap_err();
        assert!(e.message.contains("needs a header"), "{e}");
        let e = parse("50% off").unwrap_err();
        assert!(e.message.contains("%%"), "{e}");
        let e = parse("%DURATION").unwrap_err();
        assert!(e.message.contains("no closing '%'"), "{e}");
        let e = parse("%START_TIME(%Q)%").unwrap_err();
        assert!(e.message.contains("unsupported specifier %Q"), "{e}");
        let e = parse("%DURATION(x)%").unwrap_err();
        assert!(e.message.contains("takes no argument"), "{e}");
        let e = parse("%GRPC_STATUS(LOUD)%").unwrap_err();
        assert!(
            e.message.contains("CAMEL_STRING, SNAKE_STRING or NUMBER"),
            "{e}"
        );
    }

    #[test]
    fn grpc_status_takes_envoys_three_formats() {
        let op = |f: &str| match parse(f).unwrap().as_slice() {
            [Piece::Op(Operator::GrpcStatus(g), None)] => *g,
            other => panic!("{f}: {other:?}"),
        };
        assert_eq!(op("%GRPC_STATUS%"), GrpcStatusFormat::Camel);
        assert_eq!(op("%GRPC_STATUS(CAMEL_STRING)%"), GrpcStatusFormat::Camel);
        assert_eq!(op("%GRPC_STATUS(SNAKE_STRING)%"), GrpcStatusFormat::Snake);
        assert_eq!(op("%GRPC_STATUS(NUMBER)%"), GrpcStatusFormat::Number);
        assert_eq!(op("%GRPC_STATUS_NUMBER%"), GrpcStatusFormat::Number);
        assert!(Operator::GrpcStatus(GrpcStatusFormat::Number).numeric());
        assert!(!Operator::GrpcStatus(GrpcStatusFormat::Camel).numeric());
    }
}
