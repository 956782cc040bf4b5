//! The command line's contract (DESIGN §9): version, config checking with the key at fault, and
//! exit codes 0 / 1 / 2.

use std::process::Command;

mod common;
use common::CleanEnv;

fn trellis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .env_clear_trellis()
        .args(args)
        .output()
        .expect("run trellis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_prints_the_package_version() {
    let (code, out, _) = trellis(&["version"]);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("trellis {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn config_check_accepts_the_shipped_examples() {
    for (file, role) in [
        ("control.toml", "control.toml"),
        ("proxy.toml", "proxy.toml"),
    ] {
        let path = format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"));
        let (code, out, err) = trellis(&["config", "check", &path]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains(&format!("ok ({role})")), "{out}");
    }
}

#[test]
fn a_bad_proxy_config_names_every_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "control = [\"nowhere\"]\nmesh = \"demo\"\nadmin_addr = \"9901\"\ndrain_time = \"soon\"\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = trellis(&["config", "check", p]);
    assert_eq!(code, 2);
    for key in [
        "control[0]:",
        "virtual_node, virtual_gateway: name the one",
        "admin_addr:",
        "drain_time:",
    ] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    // The proxy refuses the same file, and a flag that fixes one problem leaves the others.
    let (code, _, err) = trellis(&["proxy", "--config", p, "--virtual-node", "red"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("admin_addr:") && !err.contains("virtual_gateway"),
        "{err}"
    );
    // Without a file, the flags alone must name the control nodes and the mesh.
    let (code, _, err) = trellis(&["proxy", "--virtual-node", "red"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("control: name at least one") && err.contains("mesh: required"),
        "{err}"
    );
}

#[test]
fn bad_config_names_every_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.toml");
    std::fs::write(
        &path,
        "account_id = \"12\"\nnode_id = 0\n[quotas]\nmeshes = 0\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = trellis(&["config", "check", p]);
    assert_eq!(code, 2);
    for key in ["account_id:", "node_id:", "quotas.meshes:"] {
        assert!(err.contains(key), "{key} missing from: {err}");
    }
    std::fs::write(&path, "api_adr = \"127.0.0.1:1\"\n").unwrap();
    let (code, _, err) = trellis(&["config", "check", p]);
    assert_eq!(code, 2);
    assert!(err.contains("api_adr"), "{err}");
    let (code, _, err) = trellis(&["control", "--config", p]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = trellis(&["dev", "--config", p]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn the_unauthenticated_api_stays_on_loopback() {
    let (code, _, err) = trellis(&["dev", "--api-addr", "0.0.0.0:0"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("api_addr: must be a loopback address"),
        "{err}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, _, _) = trellis(&["no-such-command"]);
    assert_eq!(code, 2);
    let (code, _, _) = trellis(&["dev", "--api-addr", "not-an-address"]);
    assert_eq!(code, 2);
}

#[test]
fn an_unusable_data_dir_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let (code, _, err) = trellis(&[
        "dev",
        "--api-addr",
        "127.0.0.1:0",
        "--data-dir",
        file.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("data_dir"), "{err}");
}

/// The subcommands `trellis ARGS… --help` lists (help itself aside).
fn subcommands(args: &[String]) -> Vec<String> {
    let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
    all.push("--help");
    let (_, out, _) = trellis(&all);
    out.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_command_has_examples_in_its_help() {
    let mut todo = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let (code, out, err) = trellis(&args);
        assert_eq!(code, 0, "{path:?}: {err}");
        assert!(
            out.contains("Example"),
            "trellis {} --help shows no example:\n{out}",
            path.join(" ")
        );
        seen += 1;
        for sub in subcommands(&path) {
            let mut next = path.clone();
            next.push(sub);
            todo.push(next);
        }
    }
    assert!(seen > 25, "only {seen} commands found");
}

#[test]
fn completions_and_the_man_page_come_from_the_cli() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = trellis(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains("proxy") && out.contains("virtual-node"),
            "{shell}"
        );
    }
    let (code, out, _) = trellis(&["man"]);
    assert_eq!(code, 0);
    assert!(
        out.starts_with(".ie") || out.contains(".TH trellis"),
        "{}",
        &out[..200.min(out.len())]
    );
    // Every command's flags are in it, not only the top level's.
    for flag in [
        "TRELLIS PROXY",
        "virtual\\-node",
        "demo\\-gateway\\-addr",
        "TRELLIS TOKEN CREATE",
    ] {
        assert!(out.contains(flag), "{flag} missing from the man page");
    }
}

#[test]
fn every_proxy_toml_key_is_a_proxy_flag() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/proxy.toml")).unwrap();
    let (_, help, _) = trellis(&["proxy", "--help"]);
    let keys: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim_start_matches("# ").split_once(" = "))
        .map(|(k, _)| k)
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    assert!(keys.len() > 20, "{keys:?}");
    for key in keys {
        let flag = key.replace('_', "-");
        // The two switches on by default are turned off by a flag.
        let flag = match key {
            "vip_listeners" | "request_metrics" => format!("--no-{flag}"),
            _ => format!("--{flag}"),
        };
        assert!(
            help.contains(&flag),
            "{key}: no {flag} in trellis proxy --help"
        );
    }
}
