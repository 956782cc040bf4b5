use super::*;

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

fn at(amz: &str) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(parse_amz_date(amz).unwrap())
}

fn expect<'a>(service: &'a str, now: SystemTime) -> Expect<'a> {
    Expect {
        region: "us-east-1",
        service,
        now,
        max_skew: Duration::from_secs(300),
    }
}

fn check(
    method: &str,
    path: &str,
    query: Option<&str>,
    h: &http::HeaderMap,
    body: &[u8],
    service: &str,
    secret: &str,
) -> Result<(), SigV4Error> {
    let auth = parse_authorization(h)?;
    let now = at(h["x-amz-date"].to_str().unwrap());
    let req = Request {
        method,
        path,
        query,
        headers: h,
        body,
    };
    verify(&req, &auth, secret, &expect(service, now))
}

/// AWS's SigV4 test suite: get-vanilla and get-vanilla-query-order-key-case.
#[test]
fn aws_test_suite_vectors() {
    let sign_and_compare = |query: Option<&str>, want: &str| {
        let mut h = headers(&[("host", "example.amazonaws.com")]);
        sign(
            "GET",
            "/",
            query,
            &mut h,
            b"",
            AKID,
            SECRET,
            "us-east-1",
            "service",
            at("20150830T123600Z"),
        );
        let auth = parse_authorization(&h).unwrap();
        assert_eq!(auth.signature, want);
        assert_eq!(auth.signed_headers, ["host", "x-amz-date"]);
        check("GET", "/", query, &h, b"", "service", SECRET).unwrap();
    };
    sign_and_compare(
        None,
        "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
    );
    sign_and_compare(
        Some("Param2=value2&Param1=value1"),
        "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
    );
}

/// Signed by botocore (the aws CLI's SigV4Auth, service appmesh) — see
/// `.venv/bin/python` with `botocore.auth.SigV4Auth(...).add_auth(AWSRequest(...))`.
/// (method, path, query, body, signed headers, signature)
type Vector = (
    &'static str,
    &'static str,
    Option<&'static str>,
    &'static str,
    &'static str,
    &'static str,
);

const BOTOCORE: &[Vector] = &[
    (
        "PUT",
        "/v20190125/meshes/demo/virtualNodes",
        None,
        r#"{"virtualNodeName": "a", "spec": {}}"#,
        "content-type;host;x-amz-date",
        "7f8cdb69e523ac012630c3a4202d2215f74d054385c37fff8268c0f7356a62e3",
    ),
    (
        "GET",
        "/v20190125/meshes/demo/virtualNodes",
        Some("limit=7&nextToken=a%2Fb"),
        "",
        "host;x-amz-date",
        "4505f9dcb6b3d639d8dbbb5c65fbac59382e4160419eec9da652347028c0a6e6",
    ),
    (
        "DELETE",
        "/v20190125/meshes/my%20mesh%3A1/virtualNodes/n%2B1",
        None,
        "",
        "host;x-amz-date",
        "6dc37a29f4ff0a26971090bca4a990c3b749e443564e606b817be848bcccfe2c",
    ),
];

fn botocore_headers(signed: &str, sig: &str, body: &str) -> http::HeaderMap {
    let mut pairs = vec![
        ("host", "127.0.0.1:7070"),
        ("x-amz-date", "20261123T120514Z"),
    ];
    if !body.is_empty() {
        pairs.push(("content-type", "application/x-amz-json-1.1"));
    }
    let auth = format!(
        "AWS4-HMAC-SHA256 Credential={AKID}/20261123/us-east-1/appmesh/aws4_request, SignedHeaders={signed}, Signature={sig}"
    );
    let mut h = headers(&pairs);
    h.insert("authorization", auth.parse().unwrap());
    // Not signed: must not matter.
    h.insert("user-agent", "aws-cli/1.46.3".parse().unwrap());
    h
}

#[test]
fn botocore_signatures_verify_and_sign_reproduces_them() {
    for (method, path, query, body, signed, sig) in BOTOCORE {
        let h = botocore_headers(signed, sig, body);
        check(method, path, *query, &h, body.as_bytes(), "appmesh", SECRET)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let mut mine = h.clone();
        mine.remove("authorization");
        mine.remove("user-agent");
        sign(
            method,
            path,
            *query,
            &mut mine,
            body.as_bytes(),
            AKID,
            SECRET,
            "us-east-1",
            "appmesh",
            at("20261123T120514Z"),
        );
        assert_eq!(
            parse_authorization(&mine).unwrap().signature,
            *sig,
            "{method} {path}"
        );
    }
}

#[test]
fn every_refusal_says_what_was_wrong() {
    let (method, path, query, body, signed, sig) = BOTOCORE[0];
    let h = botocore_headers(signed, sig, body);
    let run = |h: &http::HeaderMap, path: &str, q: Option<&str>, body: &str, service, secret| {
        check(method, path, q, h, body.as_bytes(), service, secret)
            .unwrap_err()
            .to_string()
    };
    let e = run(&h, path, query, body, "appmesh", "wrong");
    assert!(e.contains("does not match") && !e.contains(SECRET), "{e}");
    assert!(
        run(&h, path, query, "{\"tampered\": 1}", "appmesh", SECRET).contains("does not match")
    );
    assert!(
        run(
            &h,
            "/v20190125/meshes/other/virtualNodes",
            query,
            body,
            "appmesh",
            SECRET
        )
        .contains("does not match")
    );
    assert!(run(&h, path, Some("limit=1"), body, "appmesh", SECRET).contains("does not match"));
    assert!(
        run(&h, path, query, body, "s3", SECRET)
            .contains("service appmesh, this endpoint serves s3")
    );

    let mut unsigned = h.clone();
    unsigned.remove("authorization");
    assert!(
        run(&unsigned, path, query, body, "appmesh", SECRET)
            .contains("missing Authentication Token")
    );
    let mut bad = h.clone();
    bad.insert(
        "authorization",
        "AWS4-HMAC-SHA256 Credential=x".parse().unwrap(),
    );
    assert!(run(&bad, path, query, body, "appmesh", SECRET).contains("malformed Credential"));
    bad.insert("authorization", "Basic abc".parse().unwrap());
    assert!(run(&bad, path, query, body, "appmesh", SECRET).contains("algorithm"));

    let mut region = h.clone();
    let a = h["authorization"]
        .to_str()
        .unwrap()
        .replace("us-east-1", "eu-west-1");
    region.insert("authorization", a.parse().unwrap());
    assert!(run(&region, path, query, body, "appmesh", SECRET).contains("region eu-west-1"));
    let mut scope = h.clone();
    let a = h["authorization"]
        .to_str()
        .unwrap()
        .replace("/20261123/", "/20261122/");
    scope.insert("authorization", a.parse().unwrap());
    assert!(run(&scope, path, query, body, "appmesh", SECRET).contains("scope date"));
    let mut no_host = h.clone();
    let a = h["authorization"]
        .to_str()
        .unwrap()
        .replace("content-type;host;x-amz-date", "content-type;x-amz-date");
    no_host.insert("authorization", a.parse().unwrap());
    assert!(
        run(&no_host, path, query, body, "appmesh", SECRET).contains("host header must be signed")
    );
    let mut unsigned_payload = h.clone();
    unsigned_payload.insert("x-amz-content-sha256", "UNSIGNED-PAYLOAD".parse().unwrap());
    assert!(
        run(&unsigned_payload, path, query, body, "appmesh", SECRET).contains("UNSIGNED-PAYLOAD")
    );
    let mut no_date = h.clone();
    no_date.remove("x-amz-date");
    let auth = parse_authorization(&no_date).unwrap();
    let req = Request {
        method,
        path,
        query,
        headers: &no_date,
        body: body.as_bytes(),
    };
    let e = verify(
        &req,
        &auth,
        SECRET,
        &expect("appmesh", at("20261123T120514Z")),
    )
    .unwrap_err();
    assert!(e.to_string().contains("missing X-Amz-Date"), "{e}");

    // Skew: ten minutes either way is out of a 300 s window.
    let auth = parse_authorization(&h).unwrap();
    let req = Request {
        method,
        path,
        query,
        headers: &h,
        body: body.as_bytes(),
    };
    for delta in [-600i64, 600] {
        let now = UNIX_EPOCH
            + Duration::from_secs(
                (parse_amz_date("20261123T120514Z").unwrap() as i64 + delta) as u64,
            );
        let e = verify(&req, &auth, SECRET, &expect("appmesh", now)).unwrap_err();
        assert!(
            e.to_string().contains("outside the 300 s skew window"),
            "{e}"
        );
    }
}

#[test]
fn dates_round_trip() {
    for s in [
        "19700101T000000Z",
        "20150830T123600Z",
        "20000229T235959Z",
        "20261123T120514Z",
    ] {
        assert_eq!(format_amz_date(parse_amz_date(s).unwrap()), s);
    }
    assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
    for bad in [
        "",
        "2015-08-30T12:36:00Z",
        "20151330T123600Z",
        "2015083OT123600Z",
    ] {
        assert_eq!(parse_amz_date(bad), None, "{bad}");
    }
}
