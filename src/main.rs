//! The `trellis` command: dispatches to the control-plane node, the dev mode and the client
//! commands. Exit codes (DESIGN §9): 0 success, 1 runtime failure, 2 usage or config error.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use trellis::config::ControlConfig;
use trellis::control::node::ControlNode;
use trellis::model::proxy_config::ProxyRole;
use trellis::proxy::discovery::{self, DiscoverySettings};
use trellis::proxy::health;
use trellis::proxy::identity as proxy_identity;

#[path = "cli/admin.rs"]
mod admin;
#[path = "cli/top.rs"]
mod top;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "A self-hosted service mesh that speaks the AWS App Mesh API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a single-node control plane for trying trellis out (data in a temp dir by default).
    ///
    /// Example: trellis dev, then
    ///   aws appmesh create-mesh --mesh-name demo --endpoint-url http://127.0.0.1:7070 --no-sign-request
    Dev {
        /// Keep the state here instead of a temporary directory removed on exit.
        #[arg(long, env = "TRELLIS_DATA_DIR")]
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
    },
    /// Run a control-plane node from a config file.
    ///
    /// Example: trellis control --config /etc/trellis/control.toml
    Control {
        /// The node's settings (see config/control.toml for every key).
        #[arg(
            long,
            env = "TRELLIS_CONFIG",
            default_value = "/etc/trellis/control.toml"
        )]
        config: PathBuf,
        /// Overrides `data_dir` from the file.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Overrides `api_addr` from the file.
        #[arg(long)]
        api_addr: Option<SocketAddr>,
        /// Join the cluster of the control node whose gRPC listener is ADDR (once; a member
        /// that restarts needs no flag).
        #[arg(long, value_name = "ADDR")]
        join: Option<String>,
    },
    /// Run the proxy for one virtual node (or virtual gateway) on this host.
    ///
    /// Example: trellis proxy --control 127.0.0.1:7071 --mesh demo --virtual-node colorteller-red
    ///            --data-dir /var/lib/trellis/proxy-red --advertise-addr 10.0.0.5
    Proxy {
        /// Control nodes' gRPC addresses, comma-separated; tried in turn.
        #[arg(long, env = "TRELLIS_CONTROL", value_delimiter = ',', required = true)]
        control: Vec<String>,
        #[arg(long)]
        mesh: String,
        /// The virtual node this proxy serves.
        #[arg(
            long,
            conflicts_with = "virtual_gateway",
            required_unless_present = "virtual_gateway"
        )]
        virtual_node: Option<String>,
        /// The virtual gateway this proxy serves.
        #[arg(long)]
        virtual_gateway: Option<String>,
        /// Where the last good config is cached (the proxy starts from it when no control node
        /// answers).
        #[arg(long, env = "TRELLIS_DATA_DIR")]
        data_dir: PathBuf,
        /// The address peers reach this proxy at.
        #[arg(long, default_value = "127.0.0.1")]
        advertise_addr: std::net::IpAddr,
        /// The inbound listener for peer proxies (its port is registered with the instance).
        #[arg(long, default_value = "0.0.0.0:15000")]
        inbound_addr: SocketAddr,
        /// The mesh CA bundle (`trellis ca show > ca.pem`): control nodes are reached over TLS
        /// and the config stream presents this proxy's certificate.
        #[arg(long, env = "TRELLIS_CA_FILE")]
        ca_file: Option<PathBuf>,
        /// A join token (`trellis token create`) to buy the first certificate; not needed
        /// while the data directory holds a valid one.
        #[arg(long, env = "TRELLIS_TOKEN_FILE")]
        token_file: Option<PathBuf>,
        /// The address the app listens on (its listener ports there); health checks and
        /// inbound requests go to it.
        #[arg(long, default_value = "127.0.0.1")]
        app_host: std::net::IpAddr,
        /// Do not bind the backends' VIP:ports (when several proxies share a host and the apps
        /// use another way in).
        #[arg(long)]
        no_vip_listeners: bool,
        /// The explicit outbound listener: apps send here with `HTTP_PROXY`, or with a Host
        /// naming a backend virtual service. `off` disables it.
        #[arg(long, default_value = "127.0.0.1:15001")]
        outbound_addr: String,
        /// The admin server (`/ready`, `/live`, `/metrics`, `/config`, `/clusters`); keep it
        /// on loopback. `off` disables it.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_addr: String,
        /// Count no requests (Envoy's stats reject_all): /metrics keeps only the proxy-wide
        /// series and `trellis top` shows nothing from this proxy; for measuring what metrics
        /// cost.
        #[arg(long)]
        no_request_metrics: bool,
        /// Export a span per proxied request over OTLP/gRPC to this collector
        /// (`http://127.0.0.1:4317`); the trace context requests carry (W3C traceparent, B3)
        /// continues through the proxy. Without it, trace headers pass untouched.
        #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
        otlp_endpoint: Option<String>,
        /// On SIGTERM, how long requests in flight may take to finish (the listeners close at
        /// once; the instance leaves the registry).
        #[arg(long, default_value = "10s", value_parser = admin::parse_duration)]
        drain_time: u64,
        /// Worker threads for the data plane (Envoy's --concurrency); default: 1 for a
        /// virtual node's sidecar, one per core for a virtual gateway.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
        concurrency: Option<u16>,
        /// Where a virtual gateway's listeners are bound (their ports come from its spec).
        #[arg(long, default_value = "0.0.0.0")]
        gateway_host: std::net::IpAddr,
        /// Retries may add at most this fraction of requests (the retry budget).
        #[arg(long, default_value_t = 0.2)]
        retry_budget_ratio: f64,
        /// Retries always allowed per second, beside the ratio.
        #[arg(long, default_value_t = 10)]
        retry_budget_min_per_second: u32,
        /// How an endpoint of a target is chosen: each in turn, or the less loaded of two
        /// drawn at random (peak-EWMA latency × requests in flight, Linkerd's balancer).
        #[arg(long, value_enum, default_value = "round-robin")]
        balancer: trellis::proxy::balance::Balancer,
    },
    /// Live traffic per virtual service and per edge (requests, rate, success rate, latency
    /// percentiles), from the proxies connected to a control node.
    ///
    /// Example: trellis top --endpoint http://127.0.0.1:7070
    Top {
        #[command(flatten)]
        conn: admin::Connection,
        /// Print once and exit instead of refreshing.
        #[arg(long)]
        once: bool,
        /// Print the JSON the API answers instead of tables.
        #[arg(long)]
        json: bool,
        /// Time between refreshes.
        #[arg(long, default_value = "2s", value_parser = admin::parse_duration)]
        interval: u64,
    },
    /// List the proxies connected to a control node.
    ///
    /// Example: trellis proxies --endpoint http://127.0.0.1:7070
    Proxies {
        #[command(flatten)]
        conn: admin::Connection,
        /// Print the JSON the API answers instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The control-plane cluster: list its members, remove one.
    ///
    /// Example: trellis members --endpoint http://10.0.0.1:7070
    Members {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: Option<admin::MembersCommand>,
    },
    /// Back up and restore the whole control-plane state (Consul's workflow).
    Snapshot {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::SnapshotCommand,
    },
    /// The mesh CA: print the trust bundle, rotate the root, make a cluster CA.
    Ca {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::CaCommand,
    },
    /// Join tokens: what a proxy trades (with a CSR) for its certificate.
    Token {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// Access keys for the API (SigV4, as the aws CLI signs).
    Keys {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Run the built-in test server: answers every request (HTTP/1.1 or h2c) with JSON saying
    /// what it received; `x-echo-status: 503` and `x-echo-delay-ms: 250` make it misbehave.
    ///
    /// Example: trellis echo --listen 127.0.0.1:9080 --name colorteller-red
    Echo {
        #[arg(long, default_value = "127.0.0.1:9080")]
        listen: SocketAddr,
        /// Reported in every answer (and the x-echo-name header).
        #[arg(long, default_value = "echo")]
        name: String,
        /// The status of answers that ask for none (a failing app for tests and demos).
        #[arg(long, default_value_t = 200)]
        status: u16,
        /// How long each answer waits unless the request asks otherwise (a slow app), e.g.
        /// `50ms`.
        #[arg(long, default_value = "0s", value_parser = admin::parse_duration_ms)]
        delay: u64,
    },
    /// Print the version.
    Version,
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a control.toml and report every problem with its key.
    ///
    /// Example: trellis config check /etc/trellis/control.toml
    Check { file: PathBuf },
}

fn init_logging(filter: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| filter.to_string());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    // TRELLIS_LOG_FORMAT=json: one JSON object per line, for log shippers.
    let _ = match std::env::var("TRELLIS_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().try_init(),
        _ => builder.try_init(),
    };
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run_dev(
    base: ControlConfig,
    data_dir: Option<PathBuf>,
    api_addr: SocketAddr,
    dns_addr: SocketAddr,
    grpc_addr: SocketAddr,
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
        api_addr,
        dns_addr,
        grpc_addr,
        ..base
    };
    init_logging(&cfg.log);
    let node = ControlNode::start(&cfg).await?;
    let api = node.api_addr;
    let dns = node.dns_addr;
    let grpc = node.grpc_addr;
    let scheme = if node.tls() { "https" } else { "http" };
    println!("trellis dev ready: api={scheme}://{api} dns={dns} grpc={grpc}");
    announce_admin_key(&node, &cfg);
    if node.tls() || node.admin_key.is_some() {
        println!("\nstate: {}\nCtrl-C stops.", data_dir.display());
        node.serve(shutdown_signal()).await?;
        return Ok(());
    }
    println!(
        "\nstate: {}\ntry:\n  export AWS_REGION=us-east-1 AWS_ACCESS_KEY_ID=dev AWS_SECRET_ACCESS_KEY=dev\n  \
         aws appmesh create-mesh --mesh-name demo --endpoint-url http://{api} --no-sign-request\n  \
         aws appmesh create-virtual-service --mesh-name demo --virtual-service-name hello.demo.local \\\n    \
         --spec '{{}}' --endpoint-url http://{api} --no-sign-request\n  \
         dig @{ip} -p {port} hello.demo.local +short\n\nCtrl-C stops.",
        data_dir.display(),
        ip = dns.ip(),
        port = dns.port(),
    );
    node.serve(shutdown_signal()).await?;
    Ok(())
}

async fn run_control(
    config: PathBuf,
    data_dir: Option<PathBuf>,
    api_addr: Option<SocketAddr>,
    join: Option<String>,
) -> Result<(), ExitCode> {
    let mut cfg = match ControlConfig::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("trellis: {e}");
            return Err(ExitCode::from(2));
        }
    };
    if let Some(d) = data_dir {
        cfg.data_dir = d;
    }
    if let Some(a) = api_addr {
        cfg.api_addr = a;
    }
    if join.is_some() {
        cfg.join = join;
        if let Err(problems) = cfg.check() {
            eprintln!("trellis: {}: {problems}", config.display());
            return Err(ExitCode::from(2));
        }
    }
    init_logging(&cfg.log);
    let node = match ControlNode::start(&cfg).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("trellis: {e}");
            return Err(ExitCode::from(1));
        }
    };
    tracing::info!(api = %node.api_addr, node_id = cfg.node_id, "control node ready");
    announce_admin_key(&node, &cfg);
    node.serve(shutdown_signal()).await.map_err(|e| {
        eprintln!("trellis: {e}");
        ExitCode::from(1)
    })
}

/// Shows the admin key created at bootstrap, once (it is also in the data directory, 0600).
/// The secret goes to a terminal only: under systemd stdout is the journal, and secrets stay
/// out of logs.
fn announce_admin_key(node: &ControlNode, cfg: &ControlConfig) {
    use std::io::IsTerminal;
    if let Some((id, secret)) = &node.admin_key {
        let path = cfg.data_dir.join(trellis::control::ca::ADMIN_CREDENTIALS);
        if std::io::stdout().is_terminal() {
            println!(
                "admin access key created (shown once; also in {}):\n  aws_access_key_id = {id}\n  aws_secret_access_key = {secret}",
                path.display()
            );
        } else {
            println!(
                "admin access key {id} created; its secret is in {} (0600)",
                path.display()
            );
        }
    }
}

async fn run_proxy(
    mut settings: DiscoverySettings,
    identity: Option<proxy_identity::IdentitySettings>,
    (inbound_addr, outbound_addr, admin_addr): (SocketAddr, Option<SocketAddr>, Option<SocketAddr>),
    dataplane: trellis::proxy::dataplane::DataplaneSettings,
    (otlp_endpoint, count_requests): (Option<String>, bool),
) -> ExitCode {
    init_logging("info");
    // Bound first: with port 0 the registered port is the one the kernel picked.
    async fn bind(flag: &str, addr: SocketAddr) -> Result<tokio::net::TcpListener, ExitCode> {
        tokio::net::TcpListener::bind(addr).await.map_err(|e| {
            eprintln!("trellis: {flag} {addr}: {e}");
            ExitCode::from(1)
        })
    }
    async fn bind_if(
        flag: &str,
        addr: Option<SocketAddr>,
    ) -> Result<Option<tokio::net::TcpListener>, ExitCode> {
        match addr {
            Some(a) => bind(flag, a).await.map(Some),
            None => Ok(None),
        }
    }
    let listeners = async {
        Ok::<_, ExitCode>((
            bind("--inbound-addr", inbound_addr).await?,
            bind_if("--outbound-addr", outbound_addr).await?,
            bind_if("--admin-addr", admin_addr).await?,
        ))
    };
    let (inbound, outbound, admin) = match listeners.await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let local =
        |l: &tokio::net::TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if let Some(l) = &admin {
        println!("trellis proxy admin: http://{}", local(l));
    }
    // Scripts and tests read the bound addresses here (port 0 picks one).
    println!(
        "trellis proxy listening: inbound={} outbound={}",
        local(&inbound),
        outbound.as_ref().map_or_else(|| "off".to_string(), local)
    );
    settings.inbound_port = inbound
        .local_addr()
        .map_or(inbound_addr.port(), |a| a.port());
    let app_host = dataplane.app_host;
    let (current, mut applied) = tokio::sync::watch::channel(None);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (cert_tx, cert_rx) = tokio::sync::watch::channel(None);
    let cert_rx_for_data = cert_rx.clone();
    let mut certs = None;
    if let Some(id) = identity {
        settings.cert = Some(cert_rx);
        certs = Some(tokio::spawn(proxy_identity::run(
            id,
            cert_tx,
            stopped.clone(),
        )));
    }
    // Healthy until a config asks for checks and they say otherwise.
    let (healthy, health) = tokio::sync::watch::channel(true);
    let checks = tokio::spawn(health::run(
        applied.clone(),
        healthy,
        app_host,
        stopped.clone(),
    ));
    let metrics = trellis::telemetry::proxy::ProxyMetrics::with_requests_counted(
        &settings.mesh,
        match &settings.role {
            ProxyRole::VirtualNode(n) => ("virtual_node", n.as_str()),
            ProxyRole::VirtualGateway(g) => ("virtual_gateway", g.as_str()),
        },
        count_requests,
    );
    let tracer = match otlp_endpoint {
        Some(endpoint) => {
            let (kind, name) = match &settings.role {
                ProxyRole::VirtualNode(n) => ("appmesh.virtual_node", n.clone()),
                ProxyRole::VirtualGateway(g) => ("appmesh.virtual_gateway", g.clone()),
            };
            let resource = vec![
                ("service.name", format!("{}.{}", name, settings.mesh)),
                ("appmesh.mesh", settings.mesh.clone()),
                (kind, name),
            ];
            match trellis::telemetry::trace::Tracer::start(
                &endpoint,
                resource,
                metrics.spans_dropped(),
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("trellis: --otlp-endpoint {endpoint:?}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    settings.traffic = Some(metrics.clone());
    let (routing, routing_rx) = tokio::sync::watch::channel(std::sync::Arc::default());
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let readiness = tokio::spawn(trellis::proxy::admin::track_readiness(
        applied.clone(),
        settings.cert.clone(),
        ready_tx,
    ));
    let admin_server = admin.map(|l| {
        let router =
            trellis::proxy::admin::router(metrics.clone(), applied.clone(), routing_rx, ready);
        tokio::spawn(trellis::admin::serve(l, router, stopped.clone()))
    });
    let peer_identity =
        std::sync::Arc::new(trellis::proxy::tls::PeerIdentity::new(cert_rx_for_data));
    let data = tokio::spawn(trellis::proxy::dataplane::run(
        dataplane,
        trellis::proxy::dataplane::Listeners { inbound, outbound },
        peer_identity,
        applied.clone(),
        stopped.clone(),
        trellis::proxy::dataplane::Reporting {
            metrics,
            routing,
            tracer,
        },
    ));
    let discovery = tokio::spawn(discovery::run(settings, current, health, stopped));
    let announce = tokio::spawn(async move {
        // Scripts wait for this line: the proxy has a config (from a control node or its cache).
        while applied.changed().await.is_ok() {
            let version = applied.borrow().as_ref().map(|c| c.version);
            if let Some(v) = version {
                println!("trellis proxy ready: version={v}");
                break;
            }
        }
    });
    let certs_failed = async {
        match &mut certs {
            Some(task) => match task.await {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(())) => std::future::pending().await,
                Err(e) => e.to_string(),
            },
            None => std::future::pending().await,
        }
    };
    let code = tokio::select! {
        _ = shutdown_signal() => ExitCode::SUCCESS,
        reason = certs_failed => {
            eprintln!("trellis: certificate: {reason}");
            ExitCode::from(1)
        }
    };
    let _ = stop.send(true);
    let _ = discovery.await;
    let _ = checks.await;
    let _ = data.await;
    if let Some(a) = admin_server {
        let _ = a.await;
    }
    readiness.abort();
    announce.abort();
    code
}

/// `trellis proxies`: the connected proxies of one control node.
async fn proxies(conn: &admin::Connection, json: bool) -> anyhow::Result<()> {
    let body = conn.endpoint()?.get("/v1/proxies").await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    println!(
        "{:<38} {:<12} {:<32} {:<22} {:>7} {:>8} {:>8}  LAST NACK",
        "PROXY", "MESH", "RESOURCE", "ADDRESS", "HEALTHY", "SENT", "ACKED"
    );
    for p in body["proxies"].as_array().into_iter().flatten() {
        let s = |k: &str| p[k].as_str().unwrap_or("").to_string();
        println!(
            "{:<38} {:<12} {:<32} {:<22} {:>7} {:>8} {:>8}  {}",
            s("proxyId"),
            s("mesh"),
            s("resource"),
            s("address"),
            p["healthy"].as_bool().unwrap_or(false),
            p["versionSent"].as_u64().unwrap_or(0),
            p["versionAcked"].as_u64().unwrap_or(0),
            p["lastNack"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

// glibc's malloc took a tenth of a proxy's CPU per request (arena locks, consolidation);
// mimalloc's thread-local free lists cost a fraction of that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn client_result(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        // A sidecar shares its host with the app: one worker, as Linkerd's proxy (it measured
        // the same req/s as one per core on the two-proxy benchmark, for 30 % less CPU). A
        // gateway carries everyone's traffic: one per core.
        Command::Proxy {
            concurrency,
            virtual_gateway,
            ..
        } => concurrency.or(virtual_gateway.is_none().then_some(1)),
        _ => None,
    };
    let mut builder = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    if let Some(n) = threads.filter(|n| *n > 1) {
        builder.worker_threads(usize::from(n));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Command::Proxy {
            control,
            mesh,
            virtual_node,
            virtual_gateway,
            data_dir,
            advertise_addr,
            inbound_addr,
            ca_file,
            token_file,
            app_host,
            no_vip_listeners,
            outbound_addr,
            admin_addr,
            otlp_endpoint,
            no_request_metrics,
            retry_budget_ratio,
            retry_budget_min_per_second,
            gateway_host,
            drain_time,
            balancer,
            concurrency: _,
        } => {
            let optional_addr = |flag: &str, a: &str| match a {
                "off" => Ok(None),
                a => a.parse::<SocketAddr>().map(Some).map_err(|e| {
                    eprintln!("trellis: {flag} {a:?}: {e} (an ip:port, or off)");
                    ExitCode::from(2)
                }),
            };
            let outbound_addr = match optional_addr("--outbound-addr", &outbound_addr) {
                Ok(a) => a,
                Err(code) => return code,
            };
            let admin_addr = match optional_addr("--admin-addr", &admin_addr) {
                Ok(a) => a,
                Err(code) => return code,
            };
            if !(0.0..=10.0).contains(&retry_budget_ratio) {
                eprintln!(
                    "trellis: --retry-budget-ratio {retry_budget_ratio}: must be between 0 and 10"
                );
                return ExitCode::from(2);
            }
            let ca_bundle = match ca_file.map(std::fs::read_to_string).transpose() {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("trellis: --ca-file: {e}");
                    return ExitCode::from(2);
                }
            };
            let role = match (virtual_node, virtual_gateway) {
                (Some(n), None) => ProxyRole::VirtualNode(n),
                (None, Some(g)) => ProxyRole::VirtualGateway(g),
                _ => {
                    eprintln!("trellis: name exactly one of --virtual-node and --virtual-gateway");
                    return ExitCode::from(2);
                }
            };
            let settings = DiscoverySettings {
                controls: control,
                mesh,
                role,
                proxy_id: uuid::Uuid::new_v4().to_string(),
                advertise: advertise_addr,
                inbound_port: inbound_addr.port(),
                data_dir: data_dir.clone(),
                ca_bundle: ca_bundle.clone(),
                cert: None,
                traffic: None,
            };
            let identity = (ca_bundle.is_some() || token_file.is_some()).then(|| {
                proxy_identity::IdentitySettings {
                    controls: settings.controls.clone(),
                    mesh: settings.mesh.clone(),
                    role: settings.role.clone(),
                    data_dir: data_dir.join("identity"),
                    ca_bundle,
                    token_file,
                }
            });
            let dataplane = trellis::proxy::dataplane::DataplaneSettings {
                app_host,
                vip_listeners: !no_vip_listeners,
                budget: trellis::proxy::retry::BudgetSettings {
                    ratio: retry_budget_ratio,
                    min_per_second: retry_budget_min_per_second,
                    ..Default::default()
                },
                balancer,
                gateway_host,
                drain: std::time::Duration::from_secs(drain_time),
            };
            rt.block_on(run_proxy(
                settings,
                identity,
                (inbound_addr, outbound_addr, admin_addr),
                dataplane,
                (otlp_endpoint, !no_request_metrics),
            ))
        }
        Command::Proxies { conn, json } => client_result(rt.block_on(proxies(&conn, json))),
        Command::Top {
            conn,
            once,
            json,
            interval,
        } => client_result(rt.block_on(top::top(
            &conn,
            once,
            json,
            std::time::Duration::from_secs(interval.max(1)),
        ))),
        Command::Ca { conn, command } => client_result(rt.block_on(admin::ca(&conn, command))),
        Command::Snapshot { conn, command } => {
            client_result(rt.block_on(admin::snapshot(&conn, command)))
        }
        Command::Members { conn, command } => {
            client_result(rt.block_on(admin::members(&conn, command)))
        }
        Command::Token { conn, command } => {
            client_result(rt.block_on(admin::token(&conn, command)))
        }
        Command::Keys { conn, command } => client_result(rt.block_on(admin::keys(&conn, command))),
        Command::Echo {
            listen,
            name,
            status,
            delay,
        } => match rt.block_on(async {
            let delay = std::time::Duration::from_millis(delay);
            let echo = trellis::echo::Echo::start(listen, &name, status, delay).await?;
            println!("trellis echo ready: {}", echo.addr);
            shutdown_signal().await;
            Ok::<(), std::io::Error>(())
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis: echo on {listen}: {e}");
                ExitCode::from(1)
            }
        },
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match ControlConfig::load(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dev {
            data_dir,
            api_addr,
            grpc_addr,
            dns_addr,
            config,
        } => {
            let base = match config.map(|c| ControlConfig::load_dev(&c)).transpose() {
                Ok(c) => c.unwrap_or_else(ControlConfig::dev),
                Err(e) => {
                    eprintln!("trellis: {e}");
                    return ExitCode::from(2);
                }
            };
            let probe = ControlConfig {
                api_addr,
                ..base.clone()
            };
            if let Err(problems) = probe.check() {
                eprintln!("trellis: {problems}");
                return ExitCode::from(2);
            }
            match rt.block_on(run_dev(base, data_dir, api_addr, dns_addr, grpc_addr)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("trellis: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Control {
            config,
            data_dir,
            api_addr,
            join,
        } => match rt.block_on(run_control(config, data_dir, api_addr, join)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
    }
}
