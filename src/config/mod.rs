//! Node-local startup settings, one TOML file per role: `control.toml` for a control-plane
//! node, `proxy.toml` for a proxy. Every key is documented on its struct field and in the
//! shipped examples under config/; files are parsed and checked once at start (and again on
//! SIGHUP for what can change live), and each problem names its key.

pub mod control;
pub mod proxy;

use std::path::{Path, PathBuf};

pub use control::{AuthMode, ControlConfig};
pub use proxy::ProxyConfig;

/// A config file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {problems}")]
    Invalid { path: PathBuf, problems: String },
}

/// Which role a config file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Control,
    Proxy,
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })
}

/// Reads `path` as a TOML table.
pub fn read_table(path: &Path) -> Result<toml::Table, ConfigError> {
    toml::from_str(&read_text(path)?).map_err(|e| parse_error(path, e))
}

fn parse_error(path: &Path, e: toml::de::Error) -> ConfigError {
    ConfigError::Parse {
        path: path.into(),
        message: e.to_string().trim().to_string(),
    }
}

/// The role a file is written for: a proxy's names its mesh and control nodes.
pub fn role_of(table: &toml::Table) -> Role {
    let proxy_keys = ["mesh", "control", "virtual_node", "virtual_gateway"];
    if proxy_keys.iter().any(|k| table.contains_key(*k)) {
        Role::Proxy
    } else {
        Role::Control
    }
}

/// `trellis config check FILE`: reads the file as the role it is written for and reports
/// every problem with its key.
pub fn check_file(path: &Path) -> Result<Role, ConfigError> {
    let role = role_of(&read_table(path)?);
    match role {
        Role::Control => ControlConfig::load(path).map(|_| role),
        Role::Proxy => ProxyConfig::load(path).map(|_| role),
    }
}

/// A duration written as `90s`, `30m`, `24h` or `7d` (a bare number is seconds), in seconds.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let (n, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = n
        .parse()
        .map_err(|_| format!("not a duration: {s:?} (e.g. 90s, 30m, 24h, 7d)"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("unknown unit in {s:?}: use s, m, h or d")),
    };
    n.checked_mul(unit)
        .ok_or_else(|| format!("duration too long: {s:?}"))
}

/// Like [`parse_duration`], in milliseconds, also taking `ms` (e.g. 250ms, 2s).
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    match s.strip_suffix("ms") {
        Some(n) => n
            .parse()
            .map_err(|_| format!("not a duration: {s:?} (e.g. 250ms, 2s)")),
        None => parse_duration(s).map(|secs| secs.saturating_mul(1000)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("2m"), Ok(120));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration("5w").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("99999999999999999d").is_err());
    }

    #[test]
    fn shipped_examples_are_told_apart() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        assert_eq!(
            check_file(&dir.join("control.toml")).unwrap(),
            Role::Control
        );
        assert_eq!(check_file(&dir.join("proxy.toml")).unwrap(), Role::Proxy);
    }
}
