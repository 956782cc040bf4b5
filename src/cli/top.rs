//! `trellis top`: live traffic per virtual service and per edge, from `GET /v1/traffic` (the
//! summaries proxies send to the control node they are connected to), refreshed in place, or
//! printed once (`--once`) for scripts.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

use super::admin::Connection;

pub async fn top(conn: &Connection, once: bool, json: bool, every: Duration) -> anyhow::Result<()> {
    let endpoint = conn.endpoint()?;
    loop {
        let traffic = endpoint.get("/v1/traffic").await?;
        if json {
            println!("{}", serde_json::to_string_pretty(&traffic)?);
        } else {
            // Clear the screen and go home between refreshes; plain output when printing once.
            let clear = if once { "" } else { "\x1b[2J\x1b[H" };
            print!("{clear}{}", render(&traffic));
        }
        if once {
            return Ok(());
        }
        tokio::time::sleep(every).await;
    }
}

/// The tables `trellis top` prints.
pub fn render(t: &Value) -> String {
    let mut out = String::new();
    let num = |v: &Value, k: &str| v[k].as_f64();
    let ms = |v: &Value, k: &str| num(v, k).map_or("-".to_string(), |x| format!("{x:.2}"));
    let pct =
        |v: &Value| num(v, "successRate").map_or("-".to_string(), |x| format!("{:.1}%", x * 100.0));
    let _ = writeln!(
        out,
        "{} proxies reporting\n\n{:<44} {:>10} {:>9} {:>8} {:>8} {:>8} {:>8}",
        t["proxies"].as_u64().unwrap_or(0),
        "SERVICE",
        "REQUESTS",
        "RPS",
        "SUCCESS",
        "P50 ms",
        "P90 ms",
        "P99 ms"
    );
    for s in t["services"].as_array().into_iter().flatten() {
        let name = format!(
            "{}/{}",
            s["mesh"].as_str().unwrap_or(""),
            s["virtualService"].as_str().unwrap_or("")
        );
        let _ = writeln!(
            out,
            "{:<44} {:>10} {:>9.2} {:>8} {:>8} {:>8} {:>8}",
            name,
            s["requests"].as_u64().unwrap_or(0),
            num(s, "rps").unwrap_or(0.0),
            pct(s),
            ms(s, "p50Ms"),
            ms(s, "p90Ms"),
            ms(s, "p99Ms"),
        );
    }
    let _ = writeln!(
        out,
        "\n{:<28} {:<9} {:<36} {:<24} {:>10} {:>9} {:>8} {:>8} {:>8}",
        "FROM",
        "DIR",
        "TO (service:port route)",
        "TARGET / CALLER",
        "REQUESTS",
        "RPS",
        "SUCCESS",
        "P50 ms",
        "P99 ms"
    );
    for e in t["edges"].as_array().into_iter().flatten() {
        let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
        let inbound = s("direction") == "inbound";
        let to = if inbound {
            format!(":{}", e["port"].as_u64().unwrap_or(0))
        } else {
            format!("{}:{} {}", s("virtualService"), e["port"], s("route"))
        };
        let who = if inbound {
            let c = s("caller");
            if c.is_empty() {
                "(plaintext)".into()
            } else {
                c
            }
        } else {
            s("targetVirtualNode")
        };
        let _ = writeln!(
            out,
            "{:<28} {:<9} {:<36} {:<24} {:>10} {:>9.2} {:>8} {:>8} {:>8}",
            s("source"),
            s("direction"),
            to,
            who,
            e["requests"].as_u64().unwrap_or(0),
            num(e, "rps").unwrap_or(0.0),
            pct(e),
            ms(e, "p50Ms"),
            ms(e, "p99Ms"),
        );
    }
    out
}
