//! The client commands of the identity admin API: `trellis ca`, `trellis token`,
//! `trellis keys` (and the connection flags they share with `trellis proxies`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use trellis::client::{Credentials, Endpoint};

/// How to reach a control node's API.
#[derive(Args, Clone)]
pub struct Connection {
    /// The control node's API (`https://…` when it serves TLS).
    #[arg(
        long,
        env = "TRELLIS_ENDPOINT",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    pub endpoint: String,
    /// The mesh CA bundle to trust for https (`trellis ca show > ca.pem`).
    #[arg(long, env = "TRELLIS_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// A credentials file (`aws_access_key_id = …` / `aws_secret_access_key = …` lines, as
    /// the admin key written at bootstrap); else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
    #[arg(long, env = "TRELLIS_CREDENTIALS", global = true)]
    pub credentials: Option<PathBuf>,
    /// The control plane's region (SigV4 signs for it).
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1", global = true)]
    pub region: String,
}

impl Connection {
    pub fn endpoint(&self) -> anyhow::Result<Endpoint> {
        let credentials = match &self.credentials {
            Some(path) => Some(read_credentials(path)?),
            None => match (
                std::env::var("AWS_ACCESS_KEY_ID"),
                std::env::var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Ok(id), Ok(secret)) if !id.is_empty() => Some(Credentials {
                    access_key_id: id,
                    secret_access_key: secret,
                }),
                _ => None,
            },
        };
        Ok(Endpoint {
            url: self.endpoint.clone(),
            ca_file: self.ca_file.clone(),
            credentials,
            region: self.region.clone(),
            unverified: false,
        })
    }
}

/// Reads `aws_access_key_id` and `aws_secret_access_key` from an INI-style file.
fn read_credentials(path: &PathBuf) -> anyhow::Result<Credentials> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--credentials {}", path.display()))?;
    let value = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| k.trim() == key)
            .map(|(_, v)| v.trim().to_string())
    };
    match (value("aws_access_key_id"), value("aws_secret_access_key")) {
        (Some(id), Some(secret)) => Ok(Credentials {
            access_key_id: id,
            secret_access_key: secret,
        }),
        _ => bail!(
            "--credentials {}: needs aws_access_key_id and aws_secret_access_key lines",
            path.display()
        ),
    }
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Print the trust bundle (PEM): every root still valid and the cross-signed certificates.
    ///
    /// Example: trellis ca show > ca.pem; AWS_CA_BUNDLE=ca.pem aws appmesh list-meshes --endpoint-url https://…
    Show,
    /// Introduce a new root, cross-signed by the current one; both stay in the bundle until the
    /// old one expires, and proxies pick the new bundle up from their config stream.
    ///
    /// Example: trellis ca rotate
    Rotate,
    /// Make a cluster CA (offline): `ca.pem` and `ca.key` in DIR, for `ca_cert_file` and
    /// `ca_key_file` on every control node of a cluster with TLS.
    ///
    /// Example: trellis ca create --out /etc/trellis/ca --trust-domain trellis.local
    Create {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Must equal the control nodes' `trust_domain`.
        #[arg(long, default_value = "trellis.local")]
        trust_domain: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Create a join token for one virtual node or gateway (printed once; only its hash is kept).
    ///
    /// Example: trellis token create --mesh demo --virtual-node colorteller-red --ttl 24h --uses 3
    Create {
        #[arg(long)]
        mesh: String,
        #[arg(
            long,
            conflicts_with = "virtual_gateway",
            required_unless_present = "virtual_gateway"
        )]
        virtual_node: Option<String>,
        #[arg(long)]
        virtual_gateway: Option<String>,
        /// How long the token may be used: 90s, 30m, 24h, 7d (at most 30d).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: u64,
        /// How many certificates it may buy (default: any number until it expires).
        #[arg(long)]
        uses: Option<u32>,
    },
    /// List tokens (ids, nodes, expiry, uses left; never secrets).
    ///
    /// Example: trellis token list --json
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token: it buys nothing more, and certificates bought with it stop renewing.
    ///
    /// Example: trellis token revoke 4fq2mz7k1a
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum MembersCommand {
    /// Every control node: id, address, role, term, last log index, lag behind the leader
    /// and health (each is asked; a dead one shows as unreachable).
    ///
    /// Example: trellis members list
    List {
        #[arg(long)]
        json: bool,
    },
    /// Take a node out of the cluster (a dead one, or one being retired).
    ///
    /// Example: trellis members remove 3
    Remove { id: u64 },
}

pub async fn members(conn: &Connection, cmd: Option<MembersCommand>) -> anyhow::Result<()> {
    let ep = conn.endpoint()?;
    match cmd.unwrap_or(MembersCommand::List { json: false }) {
        MembersCommand::List { json } => {
            let v = ep.get("/v1/members").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<6} {:<24} {:<8} {:>6} {:>12} {:>8}  HEALTH",
                "ID", "ADDRESS", "ROLE", "TERM", "LAST INDEX", "LAG"
            );
            let n = |m: &Value, k: &str| m[k].as_u64().map_or("-".to_string(), |x| x.to_string());
            for m in v["members"].as_array().into_iter().flatten() {
                println!(
                    "{:<6} {:<24} {:<8} {:>6} {:>12} {:>8}  {}",
                    n(m, "id"),
                    m["addr"].as_str().unwrap_or(""),
                    m["role"].as_str().unwrap_or(""),
                    n(m, "term"),
                    n(m, "last_log_index"),
                    n(m, "lag"),
                    m["health"].as_str().unwrap_or("")
                );
            }
        }
        MembersCommand::Remove { id } => {
            ep.call("DELETE", &format!("/v1/members/{id}"), None)
                .await?;
            println!("removed node {id}");
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Write a consistent point-in-time copy of the whole state to FILE (0600: it holds the
    /// CA key and every secret).
    ///
    /// Example: trellis snapshot save backup.json
    Save { file: PathBuf },
    /// Replace the whole state of the cluster with the copy in FILE (a new cluster, or this
    /// one rolled back). Proxies keep working: their certificates chain to the restored CA.
    ///
    /// Example: trellis snapshot restore backup.json
    Restore { file: PathBuf },
}

pub async fn snapshot(conn: &Connection, cmd: SnapshotCommand) -> anyhow::Result<()> {
    let ep = conn.endpoint()?;
    match cmd {
        SnapshotCommand::Save { file } => {
            let v = ep.get("/v1/snapshot").await?;
            let bytes = serde_json::to_vec(&v)?;
            trellis::identity::secret::write_file(&file, &bytes, 0o600)
                .with_context(|| file.display().to_string())?;
            println!(
                "saved {} resources at raft index {} to {}",
                v["resources"].as_u64().unwrap_or(0),
                v["appliedIndex"].as_u64().unwrap_or(0),
                file.display()
            );
        }
        SnapshotCommand::Restore { file } => {
            let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
            let v: Value = serde_json::from_slice(&bytes)
                .with_context(|| format!("{}: not JSON", file.display()))?;
            let out = ep.call("PUT", "/v1/snapshot", Some(&v)).await?;
            println!(
                "restored {} resources from {}",
                out["resources"].as_u64().unwrap_or(0),
                file.display()
            );
        }
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an access key for the API (the secret is printed once).
    ///
    /// Example: trellis keys create --read-only --description grafana
    Create {
        /// The key may only Describe and List.
        #[arg(long)]
        read_only: bool,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List access keys (never secrets).
    ///
    /// Example: trellis keys list
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete an access key: requests signed with it are refused from then on.
    ///
    /// Example: trellis keys delete TKAEXAMPLE
    Delete { id: String },
}

pub use trellis::config::{parse_duration, parse_duration_ms};

pub async fn ca(conn: &Connection, cmd: CaCommand) -> anyhow::Result<()> {
    if let CaCommand::Create { out, trust_domain } = &cmd {
        return create_ca(out, trust_domain);
    }
    let ep = conn.endpoint()?;
    match cmd {
        CaCommand::Create { .. } => {}
        CaCommand::Show => {
            let first_contact = ep.url.starts_with("https://") && ep.ca_file.is_none();
            let ep = Endpoint {
                unverified: first_contact,
                ..ep
            };
            let v = ep.get("/v1/ca").await?;
            let bundle = v["bundle"].as_str().unwrap_or("");
            if first_contact {
                // Nothing vouched for this answer: show what to compare out of band.
                eprintln!(
                    "trellis: fetched without verification (no --ca-file); compare its SHA-256 with `sha256sum <data_dir>/ca.pem` on a control node: {}",
                    trellis::identity::secret::sha256_hex(bundle.as_bytes())
                );
            }
            print!("{bundle}");
        }
        CaCommand::Rotate => {
            let v = ep.call("POST", "/v1/ca/rotate", Some(&json!({}))).await?;
            println!(
                "new root in place; the bundle now holds {} roots",
                v["roots"].as_u64().unwrap_or(0)
            );
        }
    }
    Ok(())
}

fn create_ca(out: &std::path::Path, trust_domain: &str) -> anyhow::Result<()> {
    let cert = out.join("ca.pem");
    let key = out.join("ca.key");
    for p in [&cert, &key] {
        if p.exists() {
            bail!("--out: {} exists; a cluster CA is made once", p.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("--out {}", out.display()))?;
    let root = trellis::control::ca::create_root(trust_domain)?;
    trellis::identity::secret::write_file(&key, root.key_pem.as_bytes(), 0o600)
        .with_context(|| key.display().to_string())?;
    trellis::identity::secret::write_file(&cert, root.cert_pem.as_bytes(), 0o644)
        .with_context(|| cert.display().to_string())?;
    println!(
        "cluster CA for {trust_domain}: {} and {} (copy both to every control node; keep the key 0600)",
        cert.display(),
        key.display()
    );
    Ok(())
}

pub async fn token(conn: &Connection, cmd: TokenCommand) -> anyhow::Result<()> {
    let ep = conn.endpoint()?;
    match cmd {
        TokenCommand::Create {
            mesh,
            virtual_node,
            virtual_gateway,
            ttl,
            uses,
        } => {
            let body = json!({
                "meshName": mesh,
                "virtualNodeName": virtual_node,
                "virtualGatewayName": virtual_gateway,
                "ttlSeconds": ttl,
                "uses": uses,
            });
            let v = ep
                .call("POST", "/v1/tokens", Some(&strip_nulls(body)))
                .await?;
            println!("{}", v["token"].as_str().unwrap_or(""));
        }
        TokenCommand::List { json } => {
            let v = ep.get("/v1/tokens").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!(
                "{:<12} {:<16} {:<36} {:>12} {:>9} {:>8}",
                "ID", "MESH", "RESOURCE", "EXPIRES IN", "USES LEFT", "REVOKED"
            );
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0);
            for t in v["tokens"].as_array().into_iter().flatten() {
                let left = t["expiresAt"].as_f64().unwrap_or(0.0) - now;
                println!(
                    "{:<12} {:<16} {:<36} {:>12} {:>9} {:>8}",
                    t["id"].as_str().unwrap_or(""),
                    t["meshName"].as_str().unwrap_or(""),
                    t["resource"].as_str().unwrap_or(""),
                    if left > 0.0 {
                        format!("{:.0}s", left)
                    } else {
                        "expired".into()
                    },
                    t["usesLeft"]
                        .as_u64()
                        .map_or("-".to_string(), |n| n.to_string()),
                    t["revoked"].as_bool().unwrap_or(false),
                );
            }
        }
        TokenCommand::Revoke { id } => {
            ep.call("DELETE", &format!("/v1/tokens/{id}"), None).await?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

pub async fn keys(conn: &Connection, cmd: KeysCommand) -> anyhow::Result<()> {
    let ep = conn.endpoint()?;
    match cmd {
        KeysCommand::Create {
            read_only,
            description,
        } => {
            let body = json!({"readOnly": read_only, "description": description});
            let v = ep.call("POST", "/v1/keys", Some(&body)).await?;
            println!(
                "aws_access_key_id = {}\naws_secret_access_key = {}",
                v["accessKeyId"].as_str().unwrap_or(""),
                v["secretAccessKey"].as_str().unwrap_or("")
            );
        }
        KeysCommand::List { json } => {
            let v = ep.get("/v1/keys").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(());
            }
            println!("{:<22} {:<10} DESCRIPTION", "ACCESS KEY ID", "READ-ONLY");
            for k in v["keys"].as_array().into_iter().flatten() {
                println!(
                    "{:<22} {:<10} {}",
                    k["accessKeyId"].as_str().unwrap_or(""),
                    k["readOnly"].as_bool().unwrap_or(false),
                    k["description"].as_str().unwrap_or("")
                );
            }
        }
        KeysCommand::Delete { id } => {
            ep.call("DELETE", &format!("/v1/keys/{id}"), None).await?;
            println!("access key {id} deleted");
        }
    }
    Ok(())
}

fn strip_nulls(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, x| !x.is_null());
    }
    v
}
