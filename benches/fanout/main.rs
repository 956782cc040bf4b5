//! Config fan-out: how long one change takes to reach every connected proxy.
//!
//! Starts `trellis dev` (the release binary), creates a mesh where `NODES` virtual nodes all
//! call one virtual service (a router splitting between two nodes), opens `PROXIES` simulated
//! proxies (each its own TCP connection and config stream, Hello → configs → Ack, heartbeats),
//! waits until they are registered and quiet, then makes `ROUNDS` UpdateRoute calls that change
//! the weights. For each round and proxy it records the time from sending the API request to
//! the proxy receiving the new config, and prints p50 / p99 / max over all of them, plus the
//! time until the last proxy of a round had it.
//!
//!   benches/bench-fanout        # PROXIES=1000 NODES=100 ROUNDS=20

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis::wire::discovery::discovery_client::DiscoveryClient;
use trellis::wire::discovery::{
    Ack, Heartbeat, Hello, ProxyMessage, control_message, hello, proxy_message,
};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn put(http: &Http, api: &str, path: &str, body: Value) -> anyhow::Result<()> {
    let req = http::Request::put(format!("{api}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))?;
    let resp = http.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!("PUT {path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

fn route(red: u32, blue: u32) -> Value {
    json!({"httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": [
        {"virtualNode": "red", "weight": red}, {"virtualNode": "blue", "weight": blue}]}}})
}

/// One config a simulated proxy received: which proxy, when.
struct Received {
    proxy: usize,
    at: Instant,
}

/// A simulated proxy: says Hello for `node`, acks every config, heartbeats.
async fn simulated_proxy(
    index: usize,
    grpc: SocketAddr,
    node: String,
    seen: mpsc::UnboundedSender<Received>,
) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .connect()
        .await?;
    let (out, rx) = mpsc::channel(8);
    let msg = |kind| ProxyMessage { kind: Some(kind) };
    out.send(msg(proxy_message::Kind::Hello(Hello {
        proxy_id: format!("sim-{index}"),
        mesh: "fan".into(),
        role: Some(hello::Role::VirtualNode(node)),
        advertise_address: format!(
            "10.{}.{}.{}",
            index >> 16 & 255,
            index >> 8 & 255,
            index & 255
        ),
        inbound_port: 15000,
        have_version: 0,
        healthy: true,
    })))
    .await?;
    let mut inbound = DiscoveryClient::new(channel)
        .stream(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut beat = tokio::time::interval(Duration::from_secs(4));
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(m) = m? else { return Ok(()) };
                if let Some(control_message::Kind::Config(c)) = m.kind {
                    let _ = seen.send(Received { proxy: index, at: Instant::now() });
                    out.send(msg(proxy_message::Kind::Ack(Ack { version: c.version }))).await?;
                }
            }
            _ = beat.tick() => {
                out.send(msg(proxy_message::Kind::Heartbeat(Heartbeat { healthy: true }))).await?;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let proxies = setting("PROXIES", 1000);
    let nodes = setting("NODES", 100).max(1);
    let rounds = setting("ROUNDS", 20);
    let bin = std::env::var("TRELLIS_BIN").unwrap_or_else(|_| "target/release/trellis".into());

    let dir = tempfile::tempdir()?;
    // Room for NODES callers beyond App Mesh's default quota of 200 virtual nodes per mesh.
    let config = format!(
        "log = \"warn\"\n[quotas]\nvirtual_nodes_per_mesh = {}\n",
        nodes + 10
    );
    std::fs::write(dir.path().join("dev.toml"), config)?;
    let mut control = tokio::process::Command::from({
        let mut c = Command::new(&bin);
        c.arg("dev")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(dir.path().join("dev.toml"))
            .args(["--api-addr", "127.0.0.1:0", "--grpc-addr", "127.0.0.1:0"])
            .args(["--dns-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        c
    })
    .kill_on_drop(true)
    .spawn()
    .with_context(|| format!("starting {bin}"))?;
    let mut lines = BufReader::new(control.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(l) = lines.next_line().await? {
            if l.starts_with("trellis dev ready:") {
                return Ok(l);
            }
        }
        bail!("trellis dev exited before it was ready")
    })
    .await
    .context("trellis dev not ready within 30 s")??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let field = |k: &str| {
        ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .map(str::to_string)
            .with_context(|| format!("no {k} in {ready:?}"))
    };
    let api = field("api=")?;
    let grpc: SocketAddr = field("grpc=")?.parse()?;

    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    put(&http, &api, "/v20190125/meshes", json!({"meshName": "fan"})).await?;
    let listener = json!([{"portMapping": {"port": 9080, "protocol": "http"}}]);
    for c in ["red", "blue"] {
        let spec = json!({"listeners": listener, "serviceDiscovery": {"dns": {"hostname": format!("{c}.fan.local")}}});
        let body = json!({"virtualNodeName": c, "spec": spec});
        put(&http, &api, "/v20190125/meshes/fan/virtualNodes", body).await?;
    }
    let body = json!({"virtualRouterName": "color", "spec": {"listeners": listener}});
    put(&http, &api, "/v20190125/meshes/fan/virtualRouters", body).await?;
    let routes = "/v20190125/meshes/fan/virtualRouter/color/routes";
    put(
        &http,
        &api,
        routes,
        json!({"routeName": "color", "spec": route(1, 1)}),
    )
    .await?;
    let provider = json!({"provider": {"virtualRouter": {"virtualRouterName": "color"}}});
    let body = json!({"virtualServiceName": "color.fan.local", "spec": provider});
    put(&http, &api, "/v20190125/meshes/fan/virtualServices", body).await?;
    let backends = json!([{"virtualService": {"virtualServiceName": "color.fan.local"}}]);
    for n in 0..nodes {
        let body =
            json!({"virtualNodeName": format!("caller-{n}"), "spec": {"backends": backends}});
        put(&http, &api, "/v20190125/meshes/fan/virtualNodes", body).await?;
    }

    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let connecting = Instant::now();
    let failures = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    for i in 0..proxies {
        let (tx, f, stopping) = (seen_tx.clone(), failures.clone(), stopping.clone());
        tokio::spawn(async move {
            let result = simulated_proxy(i, grpc, format!("caller-{}", i % nodes), tx).await;
            if let Err(e) = result
                && !stopping.load(Ordering::SeqCst)
                && f.fetch_add(1, Ordering::Relaxed) == 0
            {
                eprintln!("simulated proxy {i}: {e:#}");
            }
        });
    }
    // Connected: every proxy has a config; settled: registrations stopped moving configs.
    let mut have = vec![false; proxies];
    let mut count = 0;
    while count < proxies {
        let r = tokio::time::timeout(Duration::from_secs(60), seen.recv())
            .await
            .context("proxies did not all get a config within 60 s")?
            .context("all proxies ended")?;
        if !std::mem::replace(&mut have[r.proxy], true) {
            count += 1;
        }
    }
    let connected = connecting.elapsed();
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(1), seen.recv()).await {}
    println!(
        "{proxies} simulated proxies on {nodes} virtual nodes connected and configured in {}",
        ms(connected)
    );

    let mut all = Vec::with_capacity(proxies * rounds);
    let mut last_per_round = Vec::with_capacity(rounds);
    let mut api_times = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let weights = (round as u32 % 9) + 2;
        let start = Instant::now();
        put(
            &http,
            &api,
            &format!("{routes}/color"),
            json!({"spec": route(weights, 1)}),
        )
        .await?;
        api_times.push(start.elapsed());
        let mut got = vec![None; proxies];
        let mut count = 0;
        while count < proxies {
            let r = tokio::time::timeout(Duration::from_secs(30), seen.recv())
                .await
                .with_context(|| format!("round {round}: only {count} of {proxies} proxies got the change within 30 s"))?
                .context("all proxies ended")?;
            if got[r.proxy].is_none() {
                got[r.proxy] = Some(r.at - start);
                count += 1;
            }
        }
        let round_times: Vec<Duration> = got.into_iter().flatten().collect();
        last_per_round.push(*round_times.iter().max().unwrap_or(&Duration::ZERO));
        all.extend(round_times);
        // Let acks land before the next change.
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), seen.recv()).await
        {
        }
    }
    all.sort();
    last_per_round.sort();
    api_times.sort();
    println!(
        "change → proxy (UpdateRoute sent → config received), {} samples over {rounds} rounds:",
        all.len()
    );
    println!(
        "  p50 {}  p99 {}  max {}",
        ms(percentile(&all, 0.5)),
        ms(percentile(&all, 0.99)),
        ms(*all.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "  last proxy of a round: p50 {}  max {};  API answer: p50 {}",
        ms(percentile(&last_per_round, 0.5)),
        ms(*last_per_round.last().unwrap_or(&Duration::ZERO)),
        ms(percentile(&api_times, 0.5)),
    );
    stopping.store(true, Ordering::SeqCst);
    let failed = failures.load(Ordering::Relaxed);
    control.kill().await?;
    if failed > 0 {
        bail!("{failed} simulated proxies failed");
    }
    Ok(())
}
