//! The HTTP/1.1 client codec against raw sockets playing the app.

use super::*;
use crate::proxy::upstream::full;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Reads from `tcp` until what has come ends with `end`.
async fn read_until(tcp: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end) {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    got
}

/// An app that reads one request up to `end`, answers `response` (then closes), and
/// hands back the request's bytes.
async fn app(
    end: &'static [u8],
    response: &'static [u8],
) -> (H1Conn, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let got = read_until(&mut tcp, end).await;
        tcp.write_all(response).await.unwrap();
        got
    });
    (H1Conn::new(TcpStream::connect(addr).await.unwrap()), served)
}

fn request(method: Method, body: Body) -> (request::Parts, Body) {
    let (parts, ()) = http::Request::builder()
        .method(method)
        .uri("/p?q=1")
        .header("host", "app")
        .body(())
        .unwrap()
        .into_parts();
    (parts, body)
}

/// The response's status, body and trailers, and whether its connection could be kept.
async fn exchange(
    conn: H1Conn,
    method: Method,
    body: Body,
) -> Result<(response::Parts, Bytes, Option<HeaderMap>, bool), H1Error> {
    let (parts, body) = request(method, body);
    let (head, mut exchange) = send(conn, &parts, body).await.map_err(|f| f.error)?;
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = std::future::poll_fn(|cx| exchange.poll_frame(cx)).await {
        match frame?.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            // The relays read no further than the trailers.
            Err(f) => {
                trailers = f.into_trailers().ok();
                break;
            }
        }
    }
    let kept = matches!(exchange.after_response(), AfterResponse::Free(_));
    Ok((head, Bytes::from(data), trailers, kept))
}

/// The app's `response` to a bodyless request.
async fn answer(
    method: Method,
    response: &'static [u8],
) -> Result<(response::Parts, Bytes, Option<HeaderMap>, bool), H1Error> {
    let (conn, _app) = app(b"\r\n\r\n", response).await;
    exchange(conn, method, full("")).await
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

#[tokio::test]
async fn a_request_body_is_framed_by_its_length_or_chunked() {
    // No body: no framing header on a GET, a zero length on a POST.
    let (conn, app_side) = app(b"\r\n\r\n", OK).await;
    exchange(conn, Method::GET, full("")).await.unwrap();
    let got = String::from_utf8(app_side.await.unwrap()).unwrap();
    assert_eq!(got, "GET /p?q=1 HTTP/1.1\r\nhost: app\r\n\r\n");
    let (conn, app_side) = app(b"\r\n\r\n", OK).await;
    exchange(conn, Method::POST, full("")).await.unwrap();
    let got = String::from_utf8(app_side.await.unwrap()).unwrap();
    assert!(
        got.ends_with("host: app\r\ncontent-length: 0\r\n\r\n"),
        "{got}"
    );

    // A known length.
    let (conn, app_side) = app(b"abc", OK).await;
    let (head, body, _, kept) = exchange(conn, Method::POST, full("abc")).await.unwrap();
    assert_eq!(
        (head.status, &body[..], kept),
        (StatusCode::OK, &b"ok"[..], true)
    );
    let got = String::from_utf8(app_side.await.unwrap()).unwrap();
    assert!(got.ends_with("content-length: 3\r\n\r\nabc"), "{got}");

    // A stream: chunked, its trailers after the last chunk.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let mut trailers = HeaderMap::new();
    trailers.insert("x-sum", HeaderValue::from_static("7"));
    tx.send(Ok(Frame::data(Bytes::from("abc")))).await.unwrap();
    tx.send(Ok(Frame::data(Bytes::from("defghijklmnopq"))))
        .await
        .unwrap();
    tx.send(Ok(Frame::trailers(trailers))).await.unwrap();
    drop(tx);
    // The trailers end the body but are not passed on (as hyper did not).
    let stream = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (conn, app_side) = app(b"0\r\n\r\n", OK).await;
    exchange(conn, Method::POST, stream.boxed()).await.unwrap();
    let got = String::from_utf8(app_side.await.unwrap()).unwrap();
    assert!(
        got.ends_with(
            "transfer-encoding: chunked\r\n\r\n3\r\nabc\r\ne\r\ndefghijklmnopq\r\n0\r\n\r\n"
        ),
        "{got}"
    );
}

#[tokio::test]
async fn responses_are_framed_as_rfc_9112_says() {
    // Informational responses are passed over.
    let (head, body, _, kept) = answer(Method::GET, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\nx-a: 1\r\nx-a: 2\r\n\r\nok").await.unwrap();
    assert_eq!(
        (head.status, &body[..], kept),
        (StatusCode::CREATED, &b"ok"[..], true)
    );
    let values: Vec<_> = head.headers.get_all("x-a").iter().collect();
    assert_eq!(values, ["1", "2"]);

    // Chunked, with extensions and trailers.
    let (_, body, trailers, kept) = answer(Method::GET, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;x=y\r\nok\r\n3\r\n!!!\r\n0\r\ngrpc-status: 0\r\n\r\n").await.unwrap();
    assert_eq!((&body[..], kept), (&b"ok!!!"[..], true));
    assert_eq!(trailers.unwrap()["grpc-status"], "0");

    // Transfer-Encoding wins over Content-Length, which goes; the connection is not kept.
    let (head, body, _, kept) = answer(Method::GET, b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n").await.unwrap();
    assert_eq!((&body[..], kept), (&b"ok"[..], false));
    assert!(!head.headers.contains_key(header::CONTENT_LENGTH));

    // No length: the body ends where the app closes, and so does the connection.
    let (_, body, _, kept) = answer(Method::GET, b"HTTP/1.1 200 OK\r\n\r\nall of it")
        .await
        .unwrap();
    assert_eq!((&body[..], kept), (&b"all of it"[..], false));

    // A length but no body (HEAD, 204, 304): the length stays; the connection is kept.
    let bodiless: [(Method, &[u8]); 3] = [
        (
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n",
        ),
        (
            Method::GET,
            b"HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n",
        ),
        (
            Method::GET,
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        ),
    ];
    for (method, response) in bodiless {
        let (head, body, _, kept) = answer(method, response).await.unwrap();
        assert_eq!((&body[..], kept), (&b""[..], true));
        assert_eq!(head.headers[header::CONTENT_LENGTH], "10");
    }

    // HTTP/1.0 kept when it says so.
    let (_, _, _, kept) = answer(
        Method::GET,
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
    )
    .await
    .unwrap();
    assert!(kept);
    // HTTP/1.0, or `Connection: close`: not kept.
    let closing: [&[u8]; 2] = [
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nConnection: Close\r\ncontent-length: 2\r\n\r\nok",
    ];
    for response in closing {
        let (_, body, _, kept) = answer(Method::GET, response).await.unwrap();
        assert_eq!((&body[..], kept), (&b"ok"[..], false));
    }
}

#[tokio::test]
async fn unclear_framing_and_cut_responses_fail_the_request() {
    let cases: [(&[u8], &str); 9] = [
        // A CRLF where a chunk size belongs: not a last chunk.
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n\r\n\r\n",
            "chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2;a\nb\r\nok\r\n0\r\n\r\n",
            "chunk size",
        ),
        (
            b"HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "HTTP/1.0",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nok",
            "two different",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2x\r\n\r\nok",
            "not a number",
        ),
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nok",
            "before the end of the response body",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "chunk size",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nokXX",
            "CRLF",
        ),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "its head"),
    ];
    for (response, want) in cases {
        let err = answer(Method::GET, response).await.unwrap_err();
        assert!(
            err.to_string().contains(want),
            "{err} for {:?}",
            String::from_utf8_lossy(response)
        );
    }
    // Nothing at all.
    let err = answer(Method::GET, b"").await.unwrap_err();
    assert!(matches!(err, H1Error::Closed("the response")), "{err}");
    // A head that never ends.
    static HUGE: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
        let mut r = b"HTTP/1.1 200 OK\r\n".to_vec();
        while r.len() <= MAX_HEAD_BYTES {
            r.extend_from_slice(format!("x-filler: {}\r\n", "a".repeat(2000)).as_bytes());
        }
        r
    });
    let err = answer(Method::GET, &HUGE).await.unwrap_err();
    assert!(err.to_string().contains("larger than"), "{err}");
}

/// An app may answer before the request body has all come (a 413, say): the answer
/// is the response, and the connection, its request unfinished, is not kept.
#[tokio::test]
async fn an_answer_before_the_request_body_ends_is_the_response() {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
    tx.send(Ok(Frame::data(Bytes::from("part")))).await.unwrap();
    let stalled = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    let (conn, _app) = app(
        b"4\r\npart\r\n",
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig",
    )
    .await;
    let (head, body, _, kept) = exchange(conn, Method::POST, stalled.boxed()).await.unwrap();
    assert_eq!(
        (head.status, &body[..], kept),
        (StatusCode::PAYLOAD_TOO_LARGE, &b"big"[..], false)
    );
    drop(tx);
}
