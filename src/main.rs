//! The `trellis` command: dispatches to the control-plane node, the dev mode and the client
//! commands. Exit codes (DESIGN §9): 0 success, 1 runtime failure, 2 usage or config error.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[path = "cli/admin.rs"]
mod admin;
#[path = "cli/control.rs"]
mod control;
#[path = "cli/dev.rs"]
mod dev;
#[path = "cli/proxy.rs"]
mod proxy;
#[path = "cli/top.rs"]
mod top;

#[derive(Parser)]
#[command(
    name = "trellis",
    version,
    about = "A self-hosted service mesh that speaks the AWS App Mesh API",
    after_help = "Examples:\n  trellis dev --demo                      # a control plane and the color app, on loopback\n  \
                  trellis control --config /etc/trellis/control.toml\n  \
                  trellis proxy --config /etc/trellis/proxy.toml\n  \
                  trellis members --endpoint https://10.0.0.5:7070\n\n\
                  Exit codes: 0 success, 1 runtime failure, 2 usage or config error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a single-node control plane for trying trellis out (data in a temp dir by default);
    /// with --demo, also App Mesh's color app behind a virtual gateway.
    ///
    /// Examples:
    ///   trellis dev
    ///   aws appmesh create-mesh --mesh-name demo --endpoint-url http://127.0.0.1:7070 --no-sign-request
    ///   trellis dev --demo
    ///   curl http://127.0.0.1:8080/color
    Dev(Box<dev::DevArgs>),
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
    /// Examples:
    ///   trellis proxy --config /etc/trellis/proxy.toml
    ///   trellis proxy --control 127.0.0.1:7071 --mesh demo --virtual-node colorteller-red \
    ///     --data-dir /var/lib/trellis/proxy-red --advertise-addr 10.0.0.5
    Proxy(Box<proxy::ProxyArgs>),
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
    /// Example: trellis members --endpoint https://10.0.0.1:7070
    Members {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: Option<admin::MembersCommand>,
    },
    /// Back up and restore the whole control-plane state (Consul's workflow).
    ///
    /// Examples:
    ///   trellis snapshot save backup.snap
    ///   trellis snapshot restore backup.snap --endpoint https://10.0.0.9:7070
    Snapshot {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::SnapshotCommand,
    },
    /// The mesh CA: print the trust bundle, rotate the root, make a cluster CA.
    ///
    /// Examples:
    ///   trellis ca show > ca.pem
    ///   trellis ca create --out /etc/trellis/ca
    Ca {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::CaCommand,
    },
    /// Join tokens: what a proxy trades (with a CSR) for its certificate.
    ///
    /// Examples:
    ///   trellis token create --mesh demo --virtual-node colorteller-red > /etc/trellis/token
    ///   trellis token list
    Token {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// Access keys for the API (SigV4, as the aws CLI signs).
    ///
    /// Examples:
    ///   trellis keys create --description ci
    ///   trellis keys list
    Keys {
        #[command(flatten)]
        conn: admin::Connection,
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Run the built-in test server: answers every request (HTTP/1.1 or h2c) with JSON saying
    /// what it received; `x-echo-status: 503` and `x-echo-delay-ms: 250` make it misbehave.
    /// It also speaks gRPC (grpc.health.v1.Health, and trellis.echo.v1.Echo's streams in both
    /// directions: proto/trellis/echo/v1/echo.proto) and WebSocket. `/__echo/health` is a health
    /// endpoint for a listener's healthCheck; `PUT` it `unhealthy` or `healthy` to flip it.
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
    ///
    /// Example: trellis version
    Version,
    /// Print a shell completion script.
    ///
    /// Examples:
    ///   trellis completions bash > /etc/bash_completion.d/trellis
    ///   trellis completions zsh > "${fpath[1]}/_trellis"
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    ///
    /// Example: trellis man | man -l -
    Man,
    /// Work with config files.
    ///
    /// Example: trellis config check /etc/trellis/proxy.toml
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a control.toml or proxy.toml (told apart by their keys) and report every
    /// problem with its key; exit code 2 when there is one.
    ///
    /// Examples:
    ///   trellis config check /etc/trellis/control.toml
    ///   trellis config check /etc/trellis/proxy.toml
    Check { file: PathBuf },
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

/// The man page: clap_mangen's page for `trellis`, then a section per command (its synopsis,
/// description and options as subsections), so `man trellis` documents every flag.
fn man_page(out: &mut impl std::io::Write) -> std::io::Result<()> {
    fn commands(
        cmd: &clap::Command,
        path: &str,
        out: &mut impl std::io::Write,
    ) -> std::io::Result<()> {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let name = format!("{path} {}", sub.get_name());
            let man = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
            writeln!(out, ".SH \"{}\"", name.to_uppercase())?;
            let mut buf = Vec::new();
            man.render_synopsis_section(&mut buf)?;
            man.render_description_section(&mut buf)?;
            man.render_options_section(&mut buf)?;
            out.write_all(
                String::from_utf8_lossy(&buf)
                    .replace(".SH ", ".SS ")
                    .as_bytes(),
            )?;
            commands(sub, &name, out)?;
        }
        Ok(())
    }
    let mut cmd = Cli::command();
    cmd.build();
    clap_mangen::Man::new(cmd.clone()).render(out)?;
    commands(&cmd, "trellis", out)
}

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
    // Each command that needs a runtime builds it: the proxy sizes its own from its settings,
    // and version, completions, man and config check need none.
    match Cli::parse().command {
        Command::Proxy(args) => proxy::main(*args),
        Command::Proxies { conn, json } => client_result(block_on(proxies(&conn, json))),
        Command::Top {
            conn,
            once,
            json,
            interval,
        } => client_result(block_on(top::top(
            &conn,
            once,
            json,
            std::time::Duration::from_secs(interval.max(1)),
        ))),
        Command::Ca { conn, command } => client_result(block_on(admin::ca(&conn, command))),
        Command::Snapshot { conn, command } => {
            client_result(block_on(admin::snapshot(&conn, command)))
        }
        Command::Members { conn, command } => {
            client_result(block_on(admin::members(&conn, command)))
        }
        Command::Token { conn, command } => client_result(block_on(admin::token(&conn, command))),
        Command::Keys { conn, command } => client_result(block_on(admin::keys(&conn, command))),
        Command::Echo {
            listen,
            name,
            status,
            delay,
        } => match block_on(async {
            let delay = std::time::Duration::from_millis(delay);
            let echo = trellis::echo::Echo::start(listen, &name, status, delay).await?;
            println!("trellis echo ready: {}", echo.addr);
            trellis::service::shutdown_signal().await;
            Ok::<(), std::io::Error>(())
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis: echo on {listen}: {e:#}");
                ExitCode::from(1)
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "trellis",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => match man_page(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("trellis: man: {e}");
                ExitCode::from(1)
            }
        },
        Command::Version => {
            println!("trellis {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => match trellis::config::check_file(&file) {
            Ok(role) => {
                let role = match role {
                    trellis::config::Role::Control => "control.toml",
                    trellis::config::Role::Proxy => "proxy.toml",
                };
                println!("{}: ok ({role})", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trellis: {e}");
                ExitCode::from(2)
            }
        },
        Command::Dev(args) => block_on(async { Ok::<_, anyhow::Error>(dev::run(*args).await) })
            .unwrap_or_else(|e| {
                eprintln!("trellis: {e:#}");
                ExitCode::from(1)
            }),
        Command::Control {
            config,
            data_dir,
            api_addr,
            join,
        } => match block_on(async {
            Ok::<_, anyhow::Error>(control::run(config, data_dir, api_addr, join).await)
        }) {
            Ok(Ok(())) => ExitCode::SUCCESS,
            Ok(Err(code)) => code,
            Err(e) => {
                eprintln!("trellis: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// Runs `f` to completion on a multi-threaded runtime built for it; a runtime that cannot be
/// built is an error like any other the command meets. Access logs of proxies it ran (`trellis
/// dev --demo`) are written out before it returns.
fn block_on<T, E: Into<anyhow::Error>>(
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("starting the runtime: {e}"))?;
    let result = rt.block_on(f).map_err(Into::into);
    drop(rt);
    trellis::telemetry::access_log::finish_writing();
    result
}
