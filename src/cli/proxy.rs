//! `trellis proxy`: its flags (each a `proxy.toml` key), merging them over the config file,
//! and running the proxy's tasks (identity, discovery, health checks, data plane, admin
//! server) until a stop signal, with readiness and reload told to systemd.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tokio::net::TcpListener;
use trellis::config::ProxyConfig;
use trellis::model::proxy_config::ProxyRole;
use trellis::proxy::discovery::{self, DiscoverySettings};
use trellis::proxy::identity as proxy_identity;
use trellis::proxy::{health, retry, shard};
use trellis::service::{self, Logging};

/// The flags of `trellis proxy`. Each overrides the `proxy.toml` key of the same name; the
/// defaults are the file's (see config/proxy.toml).
#[derive(Args)]
pub struct ProxyArgs {
    /// A proxy.toml (see config/proxy.toml for every key); flags given (or the environment
    /// variables they name) override it.
    #[arg(long, env = "TRELLIS_PROXY_CONFIG")]
    config: Option<PathBuf>,
    /// Control nodes' gRPC addresses, comma-separated; tried in turn.
    #[arg(long, env = "TRELLIS_CONTROL", value_delimiter = ',')]
    control: Option<Vec<String>>,
    /// The mesh of the virtual node or gateway.
    #[arg(long)]
    mesh: Option<String>,
    /// The virtual node this proxy serves.
    #[arg(long, conflicts_with = "virtual_gateway")]
    virtual_node: Option<String>,
    /// The virtual gateway this proxy serves.
    #[arg(long)]
    virtual_gateway: Option<String>,
    /// Where the key, certificate and last good config are kept (the proxy starts from that
    /// config when no control node answers). Required, one per proxy.
    #[arg(long, env = "TRELLIS_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The address peers reach this proxy at. [default: 127.0.0.1]
    #[arg(long)]
    advertise_addr: Option<IpAddr>,
    /// The inbound listener for peer proxies (its port is registered with the instance).
    /// [default: 0.0.0.0:15000]
    #[arg(long)]
    inbound_addr: Option<SocketAddr>,
    /// The mesh CA bundle (`trellis ca show > ca.pem`): control nodes are reached over TLS
    /// and the config stream presents this proxy's certificate.
    #[arg(long, env = "TRELLIS_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// A join token (`trellis token create`) to buy a certificate; read whenever one is
    /// bought; not needed while the data directory holds a valid certificate.
    #[arg(long, env = "TRELLIS_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The address the app listens on (its listener ports there); health checks and inbound
    /// requests go to it. [default: 127.0.0.1]
    #[arg(long)]
    app_host: Option<IpAddr>,
    /// Do not bind the backends' VIP:ports (when several proxies share a host and the apps
    /// use another way in).
    #[arg(long)]
    no_vip_listeners: bool,
    /// The explicit outbound listener: apps send here with `HTTP_PROXY`, or with a Host
    /// naming a backend virtual service. `off` disables it. [default: 127.0.0.1:15001]
    #[arg(long)]
    outbound_addr: Option<String>,
    /// The admin server (`/ready`, `/live`, `/metrics`, `/config`, `/clusters`); keep it on
    /// loopback. `off` disables it. [default: 127.0.0.1:9901]
    #[arg(long)]
    admin_addr: Option<String>,
    /// Count no requests (Envoy's stats reject_all): /metrics keeps only the proxy-wide series
    /// and `trellis top` shows nothing from this proxy; for measuring what metrics cost.
    #[arg(long)]
    no_request_metrics: bool,
    /// Export a span per proxied request over OTLP/gRPC to this collector
    /// (`http://127.0.0.1:4317`); the trace context requests carry (W3C traceparent, B3)
    /// continues through the proxy. Without it, trace headers pass untouched.
    #[arg(long, env = "TRELLIS_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// On SIGTERM, how long requests in flight may take to finish (the listeners close at
    /// once; the instance leaves the registry). [default: 10s]
    #[arg(long, value_parser = duration_flag)]
    drain_time: Option<String>,
    /// Threads that serve connections (Envoy's --concurrency), each with its own connection
    /// pools. [default: one per CPU]
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: Option<u16>,
    /// Where a virtual gateway's listeners are bound (their ports come from its spec).
    /// [default: 0.0.0.0]
    #[arg(long)]
    gateway_host: Option<IpAddr>,
    /// Retries may add at most this fraction of requests (the retry budget), 0 to 10.
    /// [default: 0.2]
    #[arg(long, value_parser = ratio_flag)]
    retry_budget_ratio: Option<f64>,
    /// Retries always allowed per second, beside the ratio. [default: 10]
    #[arg(long)]
    retry_budget_min_per_second: Option<u32>,
    /// How an endpoint of a target is chosen: each in turn, or the less loaded of two drawn
    /// at random (peak-EWMA latency × requests in flight, Linkerd's balancer).
    /// [default: round-robin]
    #[arg(long, value_enum)]
    balancer: Option<trellis::proxy::balance::Balancer>,
    /// Log filter, RUST_LOG syntax. [default: info]
    #[arg(long)]
    log: Option<String>,
}

/// A duration flag, checked where it is given (clap then names the flag).
fn duration_flag(s: &str) -> Result<String, String> {
    trellis::config::parse_duration(s).map(|_| s.to_string())
}

fn ratio_flag(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=10.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: a fraction between 0 and 10 (0.2 = 20 %)")),
    }
}

impl ProxyArgs {
    /// The settings: the file's (or the defaults), then every flag given, checked; and the
    /// file SIGHUP rereads the log filter from (none when `--log` set it). A problem is a
    /// usage error (exit code 2), printed with its key.
    pub fn resolve(self) -> Result<(ProxyConfig, Option<PathBuf>), ExitCode> {
        let log_flag = self.log.is_some();
        let mut cfg = match &self.config {
            Some(path) => ProxyConfig::read(path).map_err(|e| {
                eprintln!("trellis: {e}");
                ExitCode::from(2)
            })?,
            None => ProxyConfig::default(),
        };
        macro_rules! given {
            ($($field:ident),*) => {$( if let Some(v) = self.$field { cfg.$field = v; } )*};
        }
        given!(
            control,
            mesh,
            data_dir,
            advertise_addr,
            inbound_addr,
            app_host,
            outbound_addr,
            admin_addr,
            drain_time,
            gateway_host,
            retry_budget_ratio,
            retry_budget_min_per_second,
            balancer,
            log
        );
        // A role flag replaces the file's role, whichever kind it names.
        if self.virtual_node.is_some() || self.virtual_gateway.is_some() {
            cfg.virtual_node = self.virtual_node;
            cfg.virtual_gateway = self.virtual_gateway;
        }
        macro_rules! given_optional {
            ($($field:ident),*) => {$( if self.$field.is_some() { cfg.$field = self.$field; } )*};
        }
        given_optional!(ca_file, token_file, otlp_endpoint, concurrency);
        if self.no_vip_listeners {
            cfg.vip_listeners = false;
        }
        if self.no_request_metrics {
            cfg.request_metrics = false;
        }
        if let Err(problems) = cfg.check() {
            // Keys are named as the file spells them; the flag is the same name with dashes.
            let source = self
                .config
                .as_ref()
                .map_or_else(|| "flags".to_string(), |p| p.display().to_string());
            eprintln!("trellis: {source}: {problems}");
            return Err(ExitCode::from(2));
        }
        Ok((cfg, self.config.filter(|_| !log_flag)))
    }
}

/// `trellis proxy`: settings, a runtime sized for the role, then [`run`] until SIGTERM.
pub fn main(args: ProxyArgs) -> ExitCode {
    let (cfg, reload_from) = match args.resolve() {
        Ok(r) => r,
        Err(code) => return code,
    };
    // This thread is shard 0 and runs the rest of the proxy; `run` starts the other shards.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let code = rt.block_on(async {
        let standalone = Standalone {
            logging: Logging::init(&cfg.log),
            reloads: service::Reloads::catch(),
            config: reload_from,
        };
        run(cfg, Some(standalone), service::shutdown_signal()).await
    });
    // The runtime's tasks hold the access-log writers: gone with it, they write their last
    // lines, which the process waits for.
    drop(rt);
    trellis::telemetry::access_log::finish_writing();
    code
}

/// What a proxy running as its own process has beside its data plane: the lines scripts wait
/// for, systemd's notifications, and SIGHUP reloads of the log filter from `config`.
pub struct Standalone {
    pub logging: Option<Logging>,
    pub reloads: service::Reloads,
    pub config: Option<PathBuf>,
}

/// Runs a proxy until `stop_signal` resolves (or its certificate cannot be had); a proxy
/// inside another command (`trellis dev --demo`) has no [`Standalone`] part.
pub async fn run(
    cfg: ProxyConfig,
    standalone: Option<Standalone>,
    stop_signal: impl Future<Output = ()>,
) -> ExitCode {
    let announce = standalone.is_some();
    let Some(role) = cfg.role() else {
        eprintln!("trellis: name exactly one of --virtual-node and --virtual-gateway");
        return ExitCode::from(2);
    };
    let ca_bundle = match cfg
        .ca_file
        .as_ref()
        .map(std::fs::read_to_string)
        .transpose()
    {
        Ok(b) => b,
        Err(e) => {
            let path = cfg.ca_file.as_ref().map(|p| p.display().to_string());
            eprintln!("trellis: ca_file {}: {e}", path.unwrap_or_default());
            return ExitCode::from(2);
        }
    };
    let shards = cfg
        .concurrency
        .map_or_else(shard::default_concurrency, usize::from);
    let workers = match shard::Workers::start(shards.saturating_sub(1)) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("trellis: starting {shards} data-plane threads: {e}");
            return ExitCode::from(1);
        }
    };
    // Bound first: with port 0 the registered port is the one the kernel picked.
    async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, ExitCode> {
        TcpListener::bind(addr).await.map_err(|e| {
            eprintln!("trellis: {key} {addr}: {e}");
            ExitCode::from(1)
        })
    }
    async fn bind_if(key: &str, addr: Option<SocketAddr>) -> Result<Option<TcpListener>, ExitCode> {
        match addr {
            Some(a) => bind(key, a).await.map(Some),
            None => Ok(None),
        }
    }
    let listeners = async {
        Ok::<_, ExitCode>((
            bind("inbound_addr", cfg.inbound_addr).await?,
            bind_if("outbound_addr", cfg.outbound()).await?,
            bind_if("admin_addr", cfg.admin()).await?,
        ))
    };
    let (inbound, outbound, admin) = match listeners.await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let local = |l: &TcpListener| l.local_addr().map(|a| a.to_string()).unwrap_or_default();
    if announce {
        if let Some(l) = &admin {
            println!("trellis proxy admin: http://{}", local(l));
        }
        // Scripts and tests read the bound addresses here (port 0 picks one).
        println!(
            "trellis proxy listening: inbound={} outbound={}",
            local(&inbound),
            outbound.as_ref().map_or_else(|| "off".to_string(), local)
        );
    }
    let mut settings = DiscoverySettings {
        controls: cfg.control.clone(),
        mesh: cfg.mesh.clone(),
        role: role.clone(),
        proxy_id: uuid::Uuid::new_v4().to_string(),
        advertise: cfg.advertise_addr,
        inbound_port: inbound
            .local_addr()
            .map_or(cfg.inbound_addr.port(), |a| a.port()),
        data_dir: cfg.data_dir.clone(),
        ca_bundle: ca_bundle.clone(),
        cert: None,
        traffic: None,
    };
    let identity = (ca_bundle.is_some() || cfg.token_file.is_some()).then(|| {
        proxy_identity::IdentitySettings {
            controls: cfg.control.clone(),
            mesh: cfg.mesh.clone(),
            role: role.clone(),
            data_dir: cfg.data_dir.join("identity"),
            ca_bundle,
            token_file: cfg.token_file.clone(),
        }
    });
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
        cfg.app_host,
        stopped.clone(),
    ));
    let metrics = trellis::telemetry::proxy::ProxyMetrics::with_requests_counted(
        &cfg.mesh,
        match &role {
            ProxyRole::VirtualNode(n) => ("virtual_node", n.as_str()),
            ProxyRole::VirtualGateway(g) => ("virtual_gateway", g.as_str()),
        },
        cfg.request_metrics,
    );
    let tracer = match &cfg.otlp_endpoint {
        Some(endpoint) => {
            let (kind, name) = match &role {
                ProxyRole::VirtualNode(n) => ("appmesh.virtual_node", n.clone()),
                ProxyRole::VirtualGateway(g) => ("appmesh.virtual_gateway", g.clone()),
            };
            let resource = vec![
                ("service.name", format!("{}.{}", name, cfg.mesh)),
                ("appmesh.mesh", cfg.mesh.clone()),
                (kind, name),
            ];
            match trellis::telemetry::trace::Tracer::start(
                endpoint,
                resource,
                metrics.spans_dropped(),
            ) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("trellis: otlp_endpoint {endpoint:?}: {e}");
                    return ExitCode::from(2);
                }
            }
        }
        None => None,
    };
    settings.traffic = Some(metrics.clone());
    let (routing, routing_rx) = tokio::sync::watch::channel(Arc::default());
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let readiness = tokio::spawn(trellis::proxy::admin::track_readiness(
        applied.clone(),
        settings.cert.clone(),
        ready_tx,
    ));
    // systemd's readiness is the admin server's: a config applied and, with an identity, a
    // certificate held. A proxy inside another command leaves systemd to that command.
    let mut service_tasks = Vec::new();
    if let Some(Standalone {
        logging,
        reloads,
        config,
    }) = standalone
    {
        let mut ready_for_systemd = ready.clone();
        service_tasks.push(tokio::spawn(async move {
            if ready_for_systemd.wait_for(|r| *r).await.is_ok() {
                service::notify("READY=1");
                // Started: what only startup ran (flags, certificate issuance, the first
                // config) need not stay resident in a process of its own.
                release_code_pages("startup");
                // And again whenever traffic stops for a while: an idle sidecar need not keep
                // the request path's pages mapped (the next request maps what it runs).
                trellis::proxy::trim::run(IDLE_RELEASE, || release_code_pages("idle")).await;
            }
        }));
        let ready_now = ready.clone();
        service_tasks.push(tokio::spawn(reloads.run(
            move || *ready_now.borrow(),
            move || reload(config.as_ref(), logging.as_ref()),
        )));
    }
    let admin_server = admin.map(|l| {
        let router =
            trellis::proxy::admin::router(metrics.clone(), applied.clone(), routing_rx, ready);
        tokio::spawn(trellis::admin::serve(l, router, stopped.clone()))
    });
    let peer_identity = Arc::new(trellis::proxy::tls::PeerIdentity::new(cert_rx_for_data));
    let dataplane = trellis::proxy::dataplane::DataplaneSettings {
        app_host: cfg.app_host,
        vip_listeners: cfg.vip_listeners,
        budget: retry::BudgetSettings {
            ratio: cfg.retry_budget_ratio,
            min_per_second: cfg.retry_budget_min_per_second,
            ..Default::default()
        },
        balancer: cfg.balancer,
        gateway_host: cfg.gateway_host,
        drain: cfg.drain(),
    };
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
        workers.handles().to_vec(),
    ));
    let discovery = tokio::spawn(discovery::run(settings, current, health, stopped));
    let announce_ready = tokio::spawn(async move {
        // Scripts wait for this line: the proxy has a config (from a control node or its cache).
        while applied.changed().await.is_ok() {
            let version = applied.borrow().as_ref().map(|c| c.version);
            if let Some(v) = version {
                if announce {
                    println!("trellis proxy ready: version={v}");
                }
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
        _ = stop_signal => ExitCode::SUCCESS,
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
    for task in service_tasks.into_iter().chain([readiness, announce_ready]) {
        task.abort();
    }
    code
}

/// How long a standalone proxy serves no request before it gives its code pages back.
const IDLE_RELEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// Unmaps the binary's pages this process no longer runs (see `service::release_code_pages`).
fn release_code_pages(when: &str) {
    match service::release_code_pages() {
        Ok(n) => tracing::debug!(bytes = n, when, "code pages unmapped"),
        Err(e) => tracing::debug!(error = %e, when, "code pages not unmapped"),
    }
}

/// SIGHUP: the log filter from the file again, and access-log files reopened (after
/// logrotate moved them). Only `log` is read: the rest may have come from flags, and a file
/// that does not parse, or a filter that does not, changes nothing.
fn reload(config: Option<&PathBuf>, logging: Option<&Logging>) {
    trellis::telemetry::access_log::reopen_files();
    let (Some(path), Some(logging)) = (config, logging) else {
        tracing::info!("reload: access logs reopened");
        return;
    };
    match ProxyConfig::read(path) {
        Ok(cfg) => match logging.set_filter(&cfg.log) {
            Ok(()) => {
                tracing::info!(log = %cfg.log, "reload: log filter set, access logs reopened")
            }
            Err(e) => tracing::warn!(error = %e, "reload: log filter kept"),
        },
        Err(e) => tracing::warn!(error = %e, "reload: config not reread; nothing changed"),
    }
}
