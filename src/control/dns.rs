//! Authoritative DNS for the mesh's names (DESIGN §6), on UDP and TCP at one address: a
//! virtual service's name answers with its VIP, straight from the applied state, so an answer
//! follows a change as soon as it is committed; a virtual node's `serviceDiscovery.dns.hostname`
//! answers with the addresses of its healthy registered instances (A / AAAA), and with SRV
//! records (one per instance and listener port, at the hostname or `_service._proto.hostname`)
//! whose targets `<hex address>.addr.<hostname>` resolve to that one instance and come along
//! as additional records, as Consul does. Names the mesh does not own are REFUSED (the host's
//! resolver forwards only the mesh's domains here).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, SRV};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use super::raft::Consensus;
use crate::telemetry::control::ControlMetrics;

/// How long a TCP client may sit idle before the server drops it.
const TCP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why DNS could not start.
#[derive(Debug, thiserror::Error)]
#[error("dns_addr {addr}: {source}")]
pub struct DnsError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Answers queries from the control node's applied state.
pub struct MeshDns {
    consensus: Consensus,
    metrics: Arc<ControlMetrics>,
    /// TTL of every answer, in seconds: short, so clients follow changes.
    ttl: u32,
}

/// A running DNS server; dropping it does not stop it, `shutdown` does.
pub struct DnsServer {
    pub addr: SocketAddr,
    server: Server<MeshDns>,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (with port 0, both on the same free port) and serves.
    pub async fn start(
        addr: SocketAddr,
        consensus: Consensus,
        ttl: u32,
        metrics: Arc<ControlMetrics>,
    ) -> Result<Self, DnsError> {
        let err = |source| DnsError { addr, source };
        let (udp, tcp) = bind_pair(addr).await.map_err(err)?;
        let bound = udp.local_addr().map_err(err)?;
        let mut server = Server::new(MeshDns {
            consensus,
            ttl,
            metrics,
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_TIMEOUT, 64);
        Ok(Self {
            addr: bound,
            server,
        })
    }

    pub async fn shutdown(mut self) {
        if let Err(e) = self.server.shutdown_gracefully().await {
            tracing::warn!(error = %e, "dns shutdown");
        }
    }
}

/// UDP and TCP on one port. With port 0 the UDP port is picked first; if TCP cannot have the
/// same one, try again with another.
async fn bind_pair(addr: SocketAddr) -> std::io::Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        let port = udp.local_addr()?.port();
        match TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if addr.port() == 0 => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both UDP and TCP")))
}

/// What the mesh answers for a name (possibly nothing: NODATA), or `None`: not a mesh name.
#[derive(Debug, Default, PartialEq)]
struct Answer {
    answers: Vec<Record>,
    additionals: Vec<Record>,
}

impl MeshDns {
    /// A virtual service's VIP; else the healthy instances of the virtual nodes with that
    /// hostname; else an SRV target of one of them. The service wins where both share a name:
    /// apps must reach the mesh.
    fn lookup(&self, qname: &Name, qtype: RecordType) -> Option<Answer> {
        let text = qname.to_ascii().to_ascii_lowercase();
        let name = text.trim_end_matches('.');
        self.consensus.read(|s| {
            if let Some(vip) = s.service_vip(name) {
                let records = self.addresses(qname, &[IpAddr::V4(vip)], qtype);
                return Some(Answer {
                    answers: records,
                    additionals: vec![],
                });
            }
            if let Some(instances) = s.hostname_instances(name) {
                return Some(match qtype {
                    RecordType::SRV | RecordType::ANY => self.srv(qname, name, &instances),
                    _ => {
                        let mut addrs: Vec<IpAddr> = instances.iter().map(|(a, _)| *a).collect();
                        addrs.dedup();
                        Answer {
                            answers: self.addresses(qname, &addrs, qtype),
                            additionals: vec![],
                        }
                    }
                });
            }
            if let Some(hostname) = srv_service_of(name)
                && let Some(instances) = s.hostname_instances(hostname)
            {
                let wanted = matches!(qtype, RecordType::SRV | RecordType::ANY);
                return Some(if wanted {
                    self.srv(qname, hostname, &instances)
                } else {
                    Answer::default()
                });
            }
            let (address, hostname) = srv_target_of(name)?;
            let instances = s.hostname_instances(hostname)?;
            let known = instances.iter().any(|(a, _)| *a == address);
            Some(Answer {
                answers: if known {
                    self.addresses(qname, &[address], qtype)
                } else {
                    vec![]
                },
                additionals: vec![],
            })
        })
    }

    /// The A / AAAA records among `addrs` that `qtype` asks for.
    fn addresses(&self, name: &Name, addrs: &[IpAddr], qtype: RecordType) -> Vec<Record> {
        addrs
            .iter()
            .filter_map(|a| match (a, qtype) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                    Some(RData::AAAA(AAAA(*v6)))
                }
                _ => None,
            })
            .map(|rdata| Record::from_rdata(name.clone(), self.ttl, rdata))
            .collect()
    }

    /// One SRV record per instance and listener port of `hostname`, each target with its
    /// address as an additional record.
    fn srv(&self, qname: &Name, hostname: &str, instances: &[(IpAddr, Vec<u16>)]) -> Answer {
        let mut answer = Answer::default();
        for (address, ports) in instances {
            let Ok(target) = Name::from_ascii(format!("{}.{hostname}.", target_label(*address)))
            else {
                continue;
            };
            for port in ports {
                let rdata = RData::SRV(SRV::new(1, 1, *port, target.clone()));
                answer
                    .answers
                    .push(Record::from_rdata(qname.clone(), self.ttl, rdata));
            }
            answer
                .additionals
                .extend(self.addresses(&target, &[*address], RecordType::ANY));
        }
        answer
    }
}

/// `<hex address>.addr`: the first labels of an SRV target (Consul's form).
fn target_label(address: IpAddr) -> String {
    match address {
        IpAddr::V4(v4) => format!("{:08x}.addr", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}.addr", u128::from(v6)),
    }
}

/// The address and hostname of an SRV target name, if `name` has that form.
fn srv_target_of(name: &str) -> Option<(IpAddr, &str)> {
    let (hex, rest) = name.split_once('.')?;
    let hostname = rest.strip_prefix("addr.")?;
    let address = match hex.len() {
        8 => IpAddr::V4(u32::from_str_radix(hex, 16).ok()?.into()),
        32 => IpAddr::V6(u128::from_str_radix(hex, 16).ok()?.into()),
        _ => return None,
    };
    Some((address, hostname))
}

/// The hostname in an RFC 2782 service name `_service._proto.hostname`.
fn srv_service_of(name: &str) -> Option<&str> {
    let (service, rest) = name.split_once('.')?;
    let (proto, hostname) = rest.split_once('.')?;
    (service.starts_with('_') && proto.starts_with('_')).then_some(hostname)
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response: R,
    ) -> ResponseInfo {
        let info = self.answer(request, response).await;
        self.metrics.dns_query(&format!("{:?}", info.response_code));
        info
    }
}

impl MeshDns {
    async fn answer<R: ResponseHandler>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let failed = |code| {
            let mut metadata = Metadata::new(
                request.metadata.id,
                MessageType::Response,
                request.metadata.op_code,
            );
            metadata.response_code = code;
            ResponseInfo::from(Header {
                metadata,
                counts: HeaderCounts::default(),
            })
        };
        let builder = MessageResponseBuilder::from_message_request(request);
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
        {
            let msg = builder.error_msg(&request.metadata, ResponseCode::NotImp);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(ResponseCode::NotImp));
        }
        let Ok(info) = request.request_info() else {
            let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(ResponseCode::FormErr));
        };
        let qname = Name::from(info.query.name().clone());
        let qtype = info.query.query_type();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let Some(answer) = self.lookup(&qname, qtype) else {
            let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
            return response
                .send_response(msg)
                .await
                .unwrap_or_else(|_| failed(ResponseCode::Refused));
        };
        let msg = builder.build(
            metadata,
            answer.answers.iter(),
            [],
            [],
            answer.additionals.iter(),
        );
        match response.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns: could not send a response");
                failed(ResponseCode::ServFail)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_targets_carry_their_address() {
        let v4: IpAddr = "127.0.0.21".parse().unwrap();
        let v6: IpAddr = "fd00::15".parse().unwrap();
        for a in [v4, v6] {
            let name = format!("{}.red.demo.local", target_label(a));
            assert_eq!(srv_target_of(&name), Some((a, "red.demo.local")));
        }
        assert_eq!(target_label(v4), "7f000015.addr");
        assert_eq!(srv_target_of("7f000015.red.demo.local"), None);
        assert_eq!(srv_target_of("7f00001.addr.red.demo.local"), None);
        assert_eq!(srv_target_of("zzzzzzzz.addr.red.demo.local"), None);
    }

    #[test]
    fn rfc2782_service_names_name_their_hostname() {
        assert_eq!(
            srv_service_of("_http._tcp.red.demo.local"),
            Some("red.demo.local")
        );
        assert_eq!(srv_service_of("http._tcp.red.demo.local"), None);
        assert_eq!(srv_service_of("red.demo.local"), None);
    }
}
