//! Route matching on a request head, with Envoy's (so App Mesh's) semantics: prefix, exact and
//! regex paths (regexes match the whole path), headers (exact / prefix / suffix / regex /
//! range, invert; a missing header never matches, inverted or not; several values are joined
//! with ","), method, scheme, port and query parameters; for gRPC, service, method and
//! metadata. Regexes are compiled once per config (`RouteTable::new`), never per request, and
//! a bad one refuses the config. Routes arrive sorted by the compiler (priority, then
//! specificity); the first that matches wins.

use http::{HeaderMap, Method};
use regex::Regex;

use crate::model::proxy_config::{CompiledRoute, RouteMatch};
use crate::model::shapes::{
    GrpcRouteMetadata, HeaderMatchMethod, HttpPathMatch, HttpRouteHeader, HttpScheme, MatchRange,
};

/// What routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The listener port the request came in on.
    pub port: u16,
}

/// The scheme a request was sent with, kept as an extension where the proxy rewrote its URI
/// to origin-form (the explicit listener does, for absolute-form requests).
#[derive(Debug, Clone, Copy)]
pub struct SentScheme(pub &'static str);

impl SentScheme {
    /// `https` for `https`, else `http` (the only schemes App Mesh matches on).
    pub fn of(uri: &http::Uri) -> Option<Self> {
        uri.scheme().map(|s| {
            Self(if *s == http::uri::Scheme::HTTPS {
                "https"
            } else {
                "http"
            })
        })
    }
}

impl<'a> RequestHead<'a> {
    /// The head of a request that came in on listener `port`. The scheme is HTTP/2's
    /// `:scheme` (or an absolute-form URI's), else `http`: Envoy's rule for a plaintext
    /// listener.
    pub fn of<B>(req: &'a http::Request<B>, port: u16) -> Self {
        let scheme = SentScheme::of(req.uri())
            .or_else(|| req.extensions().get::<SentScheme>().copied())
            .map_or("http", |s| s.0);
        Self {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
            scheme,
            port,
        }
    }
}

/// A route's config could not be turned into a matcher.
#[derive(Debug, thiserror::Error)]
#[error("route {route}: {field}: invalid regex {regex:?}: {message}")]
pub struct MatcherError {
    pub route: String,
    pub field: String,
    pub regex: String,
    pub message: String,
}

/// One value test (header or gRPC metadata).
#[derive(Debug)]
enum ValueTest {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(Regex),
    /// `start <= v < end`, as Envoy's range match.
    Range(i64, i64),
}

#[derive(Debug)]
struct HeaderTest {
    name: String,
    invert: bool,
    test: ValueTest,
}

#[derive(Debug)]
enum PathTest {
    Any,
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

#[derive(Debug)]
enum Matcher {
    Http {
        path: PathTest,
        method: Option<Method>,
        scheme: Option<&'static str>,
        port: Option<u16>,
        headers: Vec<HeaderTest>,
        /// (name, exact value or None for "present").
        query: Vec<(String, Option<String>)>,
    },
    Grpc {
        service: Option<String>,
        method: Option<String>,
        port: Option<u16>,
        metadata: Vec<HeaderTest>,
    },
    Any,
}

/// The routes of one listener, ready to match.
#[derive(Debug)]
pub struct RouteTable {
    routes: Vec<(Matcher, CompiledRoute)>,
}

fn full_regex(route: &str, field: &str, re: &str) -> Result<Regex, MatcherError> {
    Regex::new(&format!("^(?:{re})$")).map_err(|e| MatcherError {
        route: route.to_string(),
        field: field.to_string(),
        regex: re.to_string(),
        message: e.to_string(),
    })
}

fn value_test(
    route: &str,
    field: &str,
    exact: &Option<String>,
    prefix: &Option<String>,
    suffix: &Option<String>,
    regex: &Option<String>,
    range: &Option<MatchRange>,
) -> Result<ValueTest, MatcherError> {
    Ok(if let Some(e) = exact {
        ValueTest::Exact(e.clone())
    } else if let Some(p) = prefix {
        ValueTest::Prefix(p.clone())
    } else if let Some(s) = suffix {
        ValueTest::Suffix(s.clone())
    } else if let Some(r) = regex {
        ValueTest::Regex(full_regex(route, &format!("{field}.regex"), r)?)
    } else if let Some(r) = range {
        ValueTest::Range(r.start, r.end)
    } else {
        ValueTest::Present
    })
}

fn header_test(route: &str, i: usize, h: &HttpRouteHeader) -> Result<HeaderTest, MatcherError> {
    let none = HeaderMatchMethod::default();
    let m = h.r#match.as_ref().unwrap_or(&none);
    Ok(HeaderTest {
        name: h.name.to_ascii_lowercase(),
        invert: h.invert.unwrap_or(false),
        test: value_test(
            route,
            &format!("match.headers[{i}].match"),
            &m.exact,
            &m.prefix,
            &m.suffix,
            &m.regex,
            &m.range,
        )?,
    })
}

fn metadata_test(route: &str, i: usize, h: &GrpcRouteMetadata) -> Result<HeaderTest, MatcherError> {
    let (exact, prefix, suffix, regex, range) = match &h.r#match {
        Some(m) => (&m.exact, &m.prefix, &m.suffix, &m.regex, &m.range),
        None => (&None, &None, &None, &None, &None),
    };
    Ok(HeaderTest {
        name: h.name.to_ascii_lowercase(),
        invert: h.invert.unwrap_or(false),
        test: value_test(
            route,
            &format!("match.metadata[{i}].match"),
            exact,
            prefix,
            suffix,
            regex,
            range,
        )?,
    })
}

fn path_test(
    route: &str,
    prefix: &Option<String>,
    path: &Option<HttpPathMatch>,
) -> Result<PathTest, MatcherError> {
    Ok(match (prefix, path) {
        (Some(p), _) => PathTest::Prefix(p.clone()),
        (None, Some(HttpPathMatch { exact: Some(e), .. })) => PathTest::Exact(e.clone()),
        (None, Some(HttpPathMatch { regex: Some(r), .. })) => {
            PathTest::Regex(full_regex(route, "match.path.regex", r)?)
        }
        _ => PathTest::Any,
    })
}

fn port(p: Option<i64>) -> Option<u16> {
    p.and_then(|p| u16::try_from(p).ok())
}

impl RouteTable {
    pub fn new(routes: &[CompiledRoute]) -> Result<Self, MatcherError> {
        let routes = routes
            .iter()
            .map(|r| {
                let matcher = match &r.matcher {
                    RouteMatch::Http(m) => Matcher::Http {
                        path: path_test(&r.name, &m.prefix, &m.path)?,
                        method: m
                            .method
                            .and_then(|x| Method::from_bytes(x.as_str().as_bytes()).ok()),
                        scheme: m.scheme.map(|s| match s {
                            HttpScheme::Http => "http",
                            HttpScheme::Https => "https",
                        }),
                        port: port(m.port),
                        headers: m
                            .headers
                            .iter()
                            .flatten()
                            .enumerate()
                            .map(|(i, h)| header_test(&r.name, i, h))
                            .collect::<Result<_, _>>()?,
                        query: m
                            .query_parameters
                            .iter()
                            .flatten()
                            .map(|q| {
                                (
                                    q.name.clone(),
                                    q.r#match.as_ref().and_then(|m| m.exact.clone()),
                                )
                            })
                            .collect(),
                    },
                    RouteMatch::Grpc(m) => Matcher::Grpc {
                        service: m.service_name.clone(),
                        method: m.method_name.clone(),
                        port: port(m.port),
                        metadata: m
                            .metadata
                            .iter()
                            .flatten()
                            .enumerate()
                            .map(|(i, h)| metadata_test(&r.name, i, h))
                            .collect::<Result<_, _>>()?,
                    },
                    RouteMatch::Any => Matcher::Any,
                };
                Ok((matcher, r.clone()))
            })
            .collect::<Result<_, MatcherError>>()?;
        Ok(Self { routes })
    }

    /// The first route that matches the request.
    pub fn select(&self, req: &RequestHead<'_>) -> Option<&CompiledRoute> {
        self.select_index(req).map(|i| &self.routes[i].1)
    }

    /// The position of the first route that matches (for state kept per route).
    pub fn select_index(&self, req: &RequestHead<'_>) -> Option<usize> {
        self.routes.iter().position(|(m, _)| matches(m, req))
    }

    /// Whether route `i` matches the request.
    pub fn matches_at(&self, i: usize, req: &RequestHead<'_>) -> bool {
        self.routes.get(i).is_some_and(|(m, _)| matches(m, req))
    }

    pub fn route(&self, i: usize) -> Option<&CompiledRoute> {
        self.routes.get(i).map(|(_, r)| r)
    }

    pub fn routes(&self) -> impl Iterator<Item = &CompiledRoute> {
        self.routes.iter().map(|(_, r)| r)
    }
}

fn matches(m: &Matcher, req: &RequestHead<'_>) -> bool {
    match m {
        Matcher::Any => true,
        Matcher::Http {
            path,
            method,
            scheme,
            port,
            headers,
            query,
        } => {
            let path_ok = match path {
                PathTest::Any => true,
                PathTest::Prefix(p) => req.path.starts_with(p.as_str()),
                PathTest::Exact(e) => req.path == e,
                PathTest::Regex(r) => r.is_match(req.path),
            };
            path_ok
                && method.as_ref().is_none_or(|m| m == req.method)
                && scheme.is_none_or(|s| s == req.scheme)
                && port.is_none_or(|p| p == req.port)
                && headers.iter().all(|h| header_matches(h, req.headers))
                && query
                    .iter()
                    .all(|(name, want)| query_matches(req.query, name, want.as_deref()))
        }
        Matcher::Grpc {
            service,
            method,
            port,
            metadata,
        } => {
            // gRPC paths are /<package.Service>/<Method>.
            let mut parts = req.path.trim_start_matches('/').splitn(2, '/');
            let (svc, meth) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            service.as_ref().is_none_or(|s| s == svc)
                && method.as_ref().is_none_or(|m| m == meth)
                && port.is_none_or(|p| p == req.port)
                && metadata.iter().all(|h| header_matches(h, req.headers))
        }
    }
}

fn header_matches(h: &HeaderTest, headers: &HeaderMap) -> bool {
    let values: Vec<&str> = headers
        .get_all(h.name.as_str())
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if values.is_empty() {
        // Envoy: a missing header fails every test but "present", inverted or not.
        return matches!(h.test, ValueTest::Present) && h.invert;
    }
    let value = values.join(",");
    let hit = match &h.test {
        ValueTest::Present => true,
        ValueTest::Exact(e) => value == *e,
        ValueTest::Prefix(p) => value.starts_with(p.as_str()),
        ValueTest::Suffix(s) => value.ends_with(s.as_str()),
        ValueTest::Regex(r) => r.is_match(&value),
        ValueTest::Range(start, end) => value
            .trim()
            .parse::<i64>()
            .is_ok_and(|v| *start <= v && v < *end),
    };
    hit != h.invert
}

fn query_matches(query: Option<&str>, name: &str, want: Option<&str>) -> bool {
    query.into_iter().flat_map(|q| q.split('&')).any(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        decode(k) == name && want.is_none_or(|w| decode(v) == w)
    })
}

/// Percent-decoding (and `+` as space) of one query component.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', None) => {
                out.push(b' ');
                i += 1;
            }
            (b, None) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests;
