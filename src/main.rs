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
        /// Reserved for the gRPC listener (config push; not served yet).
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
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
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
        ..base
    };
    init_logging(&cfg.log);
    let node = ControlNode::start(&cfg).await?;
    let api = node.api_addr;
    let dns = node.dns_addr;
    println!("trellis dev ready: api=http://{api} dns={dns}");
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
    init_logging(&cfg.log);
    let node = match ControlNode::start(&cfg).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("trellis: {e}");
            return Err(ExitCode::from(1));
        }
    };
    tracing::info!(api = %node.api_addr, node_id = cfg.node_id, "control node ready");
    node.serve(shutdown_signal()).await.map_err(|e| {
        eprintln!("trellis: {e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
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
            grpc_addr: _,
            dns_addr,
            config,
        } => {
            let base = match config.map(|c| ControlConfig::load(&c)).transpose() {
                Ok(c) => c.unwrap_or_default(),
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
            match rt.block_on(run_dev(base, data_dir, api_addr, dns_addr)) {
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
        } => match rt.block_on(run_control(config, data_dir, api_addr)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
    }
}
