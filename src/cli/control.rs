//! `trellis control`: a control-plane node from its control.toml, with readiness, reload
//! (SIGHUP: the log filter) and stopping (SIGTERM: leadership handed over) told to systemd.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use trellis::config::ControlConfig;
use trellis::control::node::ControlNode;
use trellis::service::{self, Logging};

pub async fn run(
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
    let logging = Logging::init(&cfg.log);
    // Caught before the node starts: forming a cluster can take minutes, and an uncaught
    // SIGHUP would end the process.
    let reloads = service::Reloads::catch();
    service::notify("STATUS=starting: opening the state, forming or joining the cluster");
    let node = match ControlNode::start(&cfg).await {
        Ok(n) => n,
        Err(e) => {
            eprintln!("trellis: {e}");
            return Err(ExitCode::from(1));
        }
    };
    tracing::info!(api = %node.api_addr, node_id = cfg.node_id, "control node ready");
    // Scripts read the bound addresses here (port 0 picks one).
    let scheme = if node.tls() { "https" } else { "http" };
    println!(
        "trellis control ready: api={scheme}://{} grpc={} dns={}",
        node.api_addr, node.grpc_addr, node.dns_addr
    );
    announce_admin_key(&node, &cfg);
    // Started means a member of a cluster with a leader (start returns once the node has
    // formed or joined one) and every listener bound.
    service::notify("READY=1\nSTATUS=serving");
    let reload = tokio::spawn(reloads.run(|| true, move || reload(&config, logging.as_ref())));
    let served = node.serve(service::shutdown_signal()).await;
    reload.abort();
    served.map_err(|e| {
        eprintln!("trellis: {e}");
        ExitCode::from(1)
    })
}

/// SIGHUP: the log filter from the file again. Everything else in control.toml shapes the
/// cluster and needs a restart; a file that no longer parses changes nothing.
fn reload(config: &Path, logging: Option<&Logging>) {
    let Some(logging) = logging else { return };
    match ControlConfig::load(config) {
        Ok(cfg) => match logging.set_filter(&cfg.log) {
            Ok(()) => tracing::info!(log = %cfg.log, "reload: log filter set"),
            Err(e) => tracing::warn!(error = %e, "reload: log filter kept"),
        },
        Err(e) => tracing::warn!(error = %e, "reload: config not reread; nothing changed"),
    }
}

/// Shows the admin key created at bootstrap, once (it is also in the data directory, 0600).
/// The secret goes to a terminal only: under systemd stdout is the journal, and secrets stay
/// out of logs.
pub fn announce_admin_key(node: &ControlNode, cfg: &ControlConfig) {
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
