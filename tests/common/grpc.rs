//! gRPC checks against `trellis echo`'s streaming service through a mesh.

use std::time::Duration;

use tonic::transport::Channel;
use trellis::wire::echo::EchoMessage;
use trellis::wire::echo::echo_client::EchoClient;

/// Chat in lockstep: each message must come back before the next is sent, so a proxy that held
/// a request stream's messages until it ended (or a response's) would stall it. Then a client
/// stream of 1.6 MB, many times HTTP/2's initial flow-control window on each hop, counted whole.
pub async fn bidirectional_and_client_streams(channel: Channel, app: &str) {
    let mut echo = EchoClient::new(channel);
    let message = |text: String| EchoMessage {
        text,
        from: String::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut answers = tokio::time::timeout(
        Duration::from_secs(10),
        echo.chat(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("Chat's response headers held back until the request stream ends")
    .unwrap()
    .into_inner();
    for i in 0..20 {
        tx.send(message(format!("message {i}"))).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), answers.message())
            .await
            .unwrap_or_else(|_| panic!("the answer to message {i} was held back"))
            .unwrap()
            .expect("Chat ended early");
        assert_eq!(answer.text, format!("message {i}"));
        assert_eq!(answer.from, app);
    }
    drop(tx);
    assert!(answers.message().await.unwrap().is_none());

    let chunk = "x".repeat(8 * 1024);
    let stream = futures_util::stream::iter((0..200).map(move |_| message(chunk.clone())));
    let count = echo.count(stream).await.unwrap().into_inner();
    assert_eq!((count.messages, count.bytes), (200, 200 * 8 * 1024));
    assert_eq!(count.from, app);
}
