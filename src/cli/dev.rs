//! `trellis dev`: a single-node control plane for trying trellis out and, with `--demo`, App
//! Mesh's color app beside it in the same process: three colorteller apps (`trellis echo`)
//! behind their own proxies, a router splitting traffic between them by weight, and a
//! virtual gateway in front, all proxies speaking mTLS with certificates from the mesh CA.
//! Ctrl-C (or SIGTERM) drains the proxies, then stops the control plane; nothing is left
//! running, because nothing ran outside this process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use tokio::sync::watch;
use trellis::client::Endpoint;
use trellis::config::{ControlConfig, ProxyConfig};
use trellis::control::node::ControlNode;
use trellis::echo::Echo;
use trellis::service::{self, Logging};

/// The flags of `trellis dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Keep the state here instead of a temporary directory removed on exit (not with
    /// --demo, which creates its mesh afresh).
    #[arg(long, env = "TRELLIS_DATA_DIR", conflicts_with = "demo")]
    data_dir: Option<PathBuf>,
    /// The App Mesh API listener (unsigned requests accepted: loopback dev mode).
    #[arg(long, default_value = "127.0.0.1:7070")]
    api_addr: SocketAddr,
    /// The gRPC listener: proxies' config streams (`trellis proxy --control ADDR`).
    #[arg(long, default_value = "127.0.0.1:7071")]
    grpc_addr: SocketAddr,
    /// The DNS listener (UDP and TCP): virtual service names answer with their VIPs.
    #[arg(long, default_value = "127.0.0.1:8600")]
    dns_addr: SocketAddr,
    /// Other settings (region, account_id, quotas, log) from a control.toml; the data
    /// directory and the API address still come from the flags above.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Also run App Mesh's color app: a virtual gateway, colorteller red/blue/white behind
    /// their own proxies, and a router splitting traffic between them by weight (mTLS
    /// between all of them).
    #[arg(long)]
    demo: bool,
    /// Where the demo's virtual gateway listens.
    #[arg(long, default_value = "127.0.0.1:8080", requires = "demo")]
    demo_gateway_addr: SocketAddr,
}

/// The demo mesh's names.
const MESH: &str = "colorapp";
const ROUTER: &str = "colorteller";
const SERVICE: &str = "colorteller.colorapp.local";
const GATEWAY: &str = "colorgateway";
/// The colors and the weights the route starts with (red 50 %, blue 25 %, white 25 %).
const COLORS: [(&str, u32); 3] = [("red", 2), ("blue", 1), ("white", 1)];

/// `trellis dev [--demo]`.
pub async fn run(args: DevArgs) -> ExitCode {
    let base = match args
        .config
        .as_deref()
        .map(ControlConfig::load_dev)
        .transpose()
    {
        Ok(c) => c.unwrap_or_else(ControlConfig::dev),
        Err(e) => {
            eprintln!("trellis: {e}");
            return ExitCode::from(2);
        }
    };
    let cfg = ControlConfig {
        api_addr: args.api_addr,
        dns_addr: args.dns_addr,
        grpc_addr: args.grpc_addr,
        ..base
    };
    if let Err(problems) = cfg.check() {
        eprintln!("trellis: {problems}");
        return ExitCode::from(2);
    }
    if args.demo && args.demo_gateway_addr.port() == 0 {
        eprintln!("trellis: --demo-gateway-addr: the gateway needs a port (it goes in its spec)");
        return ExitCode::from(2);
    }
    if args.demo && (cfg.tls || cfg.auth != trellis::config::AuthMode::None) {
        eprintln!(
            "trellis: --demo runs on the dev settings: its --config must leave tls = false and auth = \"none\""
        );
        return ExitCode::from(2);
    }
    let demo = args.demo.then_some(args.demo_gateway_addr);
    match serve(cfg, args.data_dir, demo).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn serve(
    cfg: ControlConfig,
    data_dir: Option<PathBuf>,
    demo: Option<SocketAddr>,
) -> anyhow::Result<()> {
    let (_temp, data_dir) = match data_dir {
        Some(d) => (None, d),
        None => {
            let t = tempfile::Builder::new()
                .prefix("trellis-dev-")
                .tempdir()
                .context("creating a temp dir")?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let cfg = ControlConfig {
        data_dir: data_dir.clone(),
        ..cfg
    };
    let _logging = Logging::init(&cfg.log);
    let node = ControlNode::start(&cfg).await?;
    let api = node.api_addr;
    let dns = node.dns_addr;
    let grpc = node.grpc_addr;
    let scheme = if node.tls() { "https" } else { "http" };
    println!("trellis dev ready: api={scheme}://{api} dns={dns} grpc={grpc}");
    super::control::announce_admin_key(&node, &cfg);
    let plain = !node.tls() && node.admin_key.is_none();
    let (node_stop, node_stopped) = watch::channel(false);
    let mut served = tokio::spawn(node.serve(wait(node_stopped)));
    // Caught from here on: Ctrl-C while the demo comes up still cleans up.
    let shutdown = service::shutdown_signal();
    tokio::pin!(shutdown);
    let demo = match demo {
        Some(gateway) if plain => {
            let api_url = format!("http://{api}");
            let starting = Demo::start(&api_url, grpc, gateway, &data_dir);
            let started = tokio::select! {
                d = starting => d,
                () = &mut shutdown => Err(anyhow::anyhow!("stopped while the demo came up")),
            };
            match started {
                Ok(d) => Some(d),
                Err(e) => {
                    let _ = node_stop.send(true);
                    let _ = served.await;
                    return Err(e.context("the demo did not come up"));
                }
            }
        }
        _ => None,
    };
    match &demo {
        Some(d) => println!("{}", d.instructions(api)),
        None if plain => println!(
            "\nstate: {}\ntry:\n  export AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev\n  \
             aws appmesh create-mesh --mesh-name demo --endpoint-url http://{api} --no-sign-request\n  \
             aws appmesh create-virtual-service --mesh-name demo --virtual-service-name hello.demo.local \\\n    \
             --spec '{{}}' --endpoint-url http://{api} --no-sign-request\n  \
             dig @{ip} -p {port} hello.demo.local +short\n\nCtrl-C stops.",
            data_dir.display(),
            ip = dns.ip(),
            port = dns.port(),
        ),
        None => println!("\nstate: {}\nCtrl-C stops.", data_dir.display()),
    }
    service::notify("READY=1");
    // Until Ctrl-C, or until the control plane fails on its own.
    let failed = tokio::select! {
        () = &mut shutdown => None,
        r = &mut served => Some(r),
    };
    if let Some(d) = demo {
        d.stop().await;
    }
    let _ = node_stop.send(true);
    let result = match failed {
        Some(r) => r,
        None => served.await,
    };
    result.context("the control plane")??;
    Ok(())
}

/// Resolves once `stopped` turns true (or its sender is gone).
async fn wait(mut stopped: watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

/// The color app, running.
struct Demo {
    gateway: SocketAddr,
    stop: watch::Sender<bool>,
    proxies: Vec<tokio::task::JoinHandle<ExitCode>>,
    _apps: Vec<Echo>,
}

impl Demo {
    /// Creates the mesh through the API, starts the apps and the proxies, and waits until the
    /// gateway has answered from every color.
    async fn start(
        api: &str,
        grpc: SocketAddr,
        gateway: SocketAddr,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let ep = Endpoint::plain(api);
        let mut apps = Vec::new();
        for (color, _) in COLORS {
            let app = Echo::start(([127, 0, 0, 1], 0).into(), color, 200, Duration::ZERO)
                .await
                .with_context(|| format!("starting the {color} app"))?;
            apps.push(app);
        }
        create_mesh(&ep, gateway.port(), &apps).await?;
        let (stop, stopped) = watch::channel(false);
        let mut proxies = Vec::new();
        let roles = COLORS
            .iter()
            .map(|(c, _)| (Some(format!("colorteller-{c}")), None))
            .chain([(None, Some(GATEWAY.to_string()))]);
        for (virtual_node, virtual_gateway) in roles {
            let name = virtual_node
                .clone()
                .or(virtual_gateway.clone())
                .unwrap_or_default();
            let home = dir.join("demo").join(&name);
            let token = token(&ep, virtual_node.as_deref(), virtual_gateway.as_deref()).await?;
            let token_file = write_private(&home, "token", &token)?;
            let cfg = ProxyConfig {
                control: vec![grpc.to_string()],
                mesh: MESH.into(),
                virtual_node,
                virtual_gateway,
                data_dir: home,
                inbound_addr: ([127, 0, 0, 1], 0).into(),
                outbound_addr: "off".into(),
                admin_addr: "off".into(),
                token_file: Some(token_file),
                vip_listeners: false,
                gateway_host: gateway.ip(),
                drain_time: "1s".into(),
                // Demo traffic is light; the demo's proxies share this process's runtime.
                concurrency: Some(1),
                ..ProxyConfig::default()
            };
            proxies.push(tokio::spawn(super::proxy::run(
                cfg,
                None,
                wait(stopped.clone()),
            )));
        }
        let demo = Demo {
            gateway,
            stop,
            proxies,
            _apps: apps,
        };
        if let Err(e) = demo.wait_for_colors().await {
            demo.stop().await;
            return Err(e);
        }
        Ok(demo)
    }

    /// Asks the gateway until every color has answered (each proxy has its certificate and
    /// config, and the gateway knows every endpoint).
    async fn wait_for_colors(&self) -> anyhow::Result<()> {
        let ep = Endpoint::plain(format!("http://{}", self.gateway));
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = std::collections::BTreeSet::new();
        let mut last = String::from("no answer yet");
        while seen.len() < COLORS.len() {
            if self.proxies.iter().any(|p| p.is_finished()) {
                bail!("a demo proxy stopped while starting (see the log above)");
            }
            if Instant::now() > deadline {
                bail!(
                    "the gateway {} answered only {seen:?} within 60 s; last: {last}",
                    self.gateway
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ep.get("/color"))
                .await
                .unwrap_or_else(|_| {
                    Err(trellis::client::ClientError::Request {
                        url: format!("http://{}/color", self.gateway),
                        message: "no answer before the deadline".into(),
                    })
                }) {
                Ok(v) => {
                    if let Some(name) = v["name"].as_str() {
                        seen.insert(name.to_string());
                    }
                }
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        Ok(())
    }

    /// Drains and stops the proxies; the apps stop when dropped.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for p in self.proxies {
            let _ = p.await;
        }
    }

    fn instructions(&self, api: SocketAddr) -> String {
        let weights = COLORS
            .iter()
            .map(|(c, w)| format!("{c} {w}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "trellis dev demo ready: gateway=http://{gw}\n\n\
             The color app: virtual gateway {GATEWAY} on http://{gw} -> virtual service {SERVICE}\n\
             -> virtual router {ROUTER} (weights {weights}) -> colorteller-red/blue/white,\n\
             each a `trellis echo` behind its own proxy, mTLS between all of them (mesh {MESH}).\n\n\
             See the split:\n  \
             for i in $(seq 100); do curl -s -o /dev/null -w '%header{{x-echo-name}}\\n' http://{gw}/color; done | sort | uniq -c\n\n\
             Change the weights (all blue) and run the loop again:\n  \
             export AWS_DEFAULT_REGION=us-east-1 AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev\n  \
             aws appmesh update-route --endpoint-url http://{api} --no-sign-request \\\n    \
             --mesh-name {MESH} --virtual-router-name {ROUTER} --route-name color --spec \\\n    \
             '{spec}'\n\n\
             Look around:\n  \
             aws appmesh list-virtual-nodes --mesh-name {MESH} --endpoint-url http://{api} --no-sign-request\n  \
             trellis top --endpoint http://{api}\n\n\
             Ctrl-C stops everything.",
            gw = self.gateway,
            spec = route_spec(&[("red", 0), ("blue", 1), ("white", 0)]),
        )
    }
}

/// The route spec: weighted targets.
fn route_spec(weights: &[(&str, u32)]) -> Value {
    let targets: Vec<Value> = weights
        .iter()
        .map(|(c, w)| json!({"virtualNode": format!("colorteller-{c}"), "weight": w}))
        .collect();
    json!({"httpRoute": {"match": {"prefix": "/"}, "action": {"weightedTargets": targets}}})
}

/// The color app's resources (App Mesh's colorapp example, minus the ECS parts).
async fn create_mesh(ep: &Endpoint, gateway_port: u16, apps: &[Echo]) -> anyhow::Result<()> {
    let mesh = format!("/v20190125/meshes/{MESH}");
    let put = |path: String, body: Value| async move {
        ep.call("PUT", &path, Some(&body))
            .await
            .with_context(|| format!("creating {path}"))
    };
    put("/v20190125/meshes".into(), json!({"meshName": MESH})).await?;
    for ((color, _), app) in COLORS.iter().zip(apps) {
        put(
            format!("{mesh}/virtualNodes"),
            json!({"virtualNodeName": format!("colorteller-{color}"), "spec": {
                "listeners": [{"portMapping": {"port": app.addr.port(), "protocol": "http"}}],
                "serviceDiscovery": {"dns": {"hostname": format!("colorteller-{color}.{MESH}.local")}}}}),
        )
        .await?;
    }
    put(
        format!("{mesh}/virtualRouters"),
        json!({"virtualRouterName": ROUTER,
               "spec": {"listeners": [{"portMapping": {"port": 9080, "protocol": "http"}}]}}),
    )
    .await?;
    put(
        format!("{mesh}/virtualRouter/{ROUTER}/routes"),
        json!({"routeName": "color", "spec": route_spec(&COLORS)}),
    )
    .await?;
    put(
        format!("{mesh}/virtualServices"),
        json!({"virtualServiceName": SERVICE,
               "spec": {"provider": {"virtualRouter": {"virtualRouterName": ROUTER}}}}),
    )
    .await?;
    put(
        format!("{mesh}/virtualGateways"),
        json!({"virtualGatewayName": GATEWAY, "spec": {"listeners": [
            {"portMapping": {"port": gateway_port, "protocol": "http"}}]}}),
    )
    .await?;
    put(
        format!("{mesh}/virtualGateway/{GATEWAY}/gatewayRoutes"),
        json!({"gatewayRouteName": "color", "spec": {"httpRoute": {
            "match": {"prefix": "/color"},
            "action": {"target": {"virtualService": {"virtualServiceName": SERVICE}}}}}}),
    )
    .await?;
    Ok(())
}

/// A join token for one proxy of the demo.
async fn token(
    ep: &Endpoint,
    virtual_node: Option<&str>,
    virtual_gateway: Option<&str>,
) -> anyhow::Result<String> {
    let mut body = json!({"meshName": MESH, "ttlSeconds": 600, "uses": 1});
    if let Some(n) = virtual_node {
        body["virtualNodeName"] = json!(n);
    }
    if let Some(g) = virtual_gateway {
        body["virtualGatewayName"] = json!(g);
    }
    let v = ep
        .call("POST", "/v1/tokens", Some(&body))
        .await
        .context("creating a join token")?;
    match v["token"].as_str() {
        Some(t) => Ok(t.to_string()),
        None => bail!("the token API answered without a token: {v}"),
    }
}

/// Writes `contents` to `dir/name`, readable by this user only.
fn write_private(dir: &Path, name: &str, contents: &str) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
