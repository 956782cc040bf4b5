//! SPIFFE names of mesh identities: a proxy is
//! `spiffe://<trust-domain>/mesh/<mesh>/virtualNode/<name>` (or `/virtualGateway/<name>`), a
//! control node `spiffe://<trust-domain>/control/<id>`. App Mesh names may hold characters
//! outside SPIFFE's path alphabet; those are percent-encoded.

use crate::model::proxy_config::ProxyRole;

/// Who a SPIFFE id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Proxy {
        trust_domain: String,
        mesh: String,
        role: ProxyRole,
    },
    Control {
        trust_domain: String,
        node_id: u64,
    },
}

fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

pub fn proxy_id(trust_domain: &str, mesh: &str, role: &ProxyRole) -> String {
    let (kind, name) = match role {
        ProxyRole::VirtualNode(n) => ("virtualNode", n),
        ProxyRole::VirtualGateway(g) => ("virtualGateway", g),
    };
    format!(
        "spiffe://{trust_domain}/mesh/{}/{kind}/{}",
        encode(mesh),
        encode(name)
    )
}

pub fn control_id(trust_domain: &str, node_id: u64) -> String {
    format!("spiffe://{trust_domain}/control/{node_id}")
}

pub fn parse(uri: &str) -> Option<Identity> {
    let rest = uri.strip_prefix("spiffe://")?;
    let (trust_domain, path) = rest.split_once('/')?;
    let parts: Vec<&str> = path.split('/').collect();
    let trust_domain = trust_domain.to_string();
    match parts[..] {
        ["mesh", mesh, kind, name] => {
            let name = decode(name)?;
            let role = match kind {
                "virtualNode" => ProxyRole::VirtualNode(name),
                "virtualGateway" => ProxyRole::VirtualGateway(name),
                _ => return None,
            };
            Some(Identity::Proxy {
                trust_domain,
                mesh: decode(mesh)?,
                role,
            })
        }
        ["control", id] => Some(Identity::Control {
            trust_domain,
            node_id: id.parse().ok()?,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_even_odd_ones() {
        for (mesh, role) in [
            ("demo", ProxyRole::VirtualNode("colorteller-red".into())),
            ("my mesh", ProxyRole::VirtualGateway("gw/1:ü".into())),
        ] {
            let id = proxy_id("trellis.local", mesh, &role);
            assert!(
                !id[9..].contains(' ') && id.matches('/').count() == 6,
                "{id}"
            );
            assert_eq!(
                parse(&id),
                Some(Identity::Proxy {
                    trust_domain: "trellis.local".into(),
                    mesh: mesh.into(),
                    role
                })
            );
        }
        assert_eq!(
            proxy_id("td", "demo", &ProxyRole::VirtualNode("a".into())),
            "spiffe://td/mesh/demo/virtualNode/a"
        );
        assert_eq!(
            parse(&control_id("td", 3)),
            Some(Identity::Control {
                trust_domain: "td".into(),
                node_id: 3
            })
        );
        for bad in [
            "",
            "https://x/mesh/a/virtualNode/b",
            "spiffe://td/mesh/a/other/b",
            "spiffe://td/mesh/a/virtualNode/%zz",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
