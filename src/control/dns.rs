//! Authoritative DNS for the mesh's names (DESIGN §6), on UDP and TCP at one address: a
//! virtual service's name answers with its VIP, straight from the applied state, so an answer
//! follows a change as soon as it is committed; a virtual node's `serviceDiscovery.dns.hostname`
//! answers with the addresses of its healthy registered instances (A / AAAA). Names the mesh
//! does not own are REFUSED (the host's resolver forwards only the mesh's domains here).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{
    Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};

use super::raft::Consensus;

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
    pub async fn start(addr: SocketAddr, consensus: Consensus, ttl: u32) -> Result<Self, DnsError> {
        let err = |source| DnsError { addr, source };
        let (udp, tcp) = bind_pair(addr).await.map_err(err)?;
        let bound = udp.local_addr().map_err(err)?;
        let mut server = Server::new(MeshDns { consensus, ttl });
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

/// What the mesh knows about a name: its addresses (possibly none: NODATA), or nothing.
enum Answer {
    Addresses(Vec<IpAddr>),
    /// Not a mesh name.
    Refused,
}

impl MeshDns {
    /// A virtual service's VIP; else the healthy instances of the virtual nodes with that
    /// hostname. The service wins where both share a name: apps must reach the mesh.
    fn lookup(&self, name: &str) -> Answer {
        let name = name.trim_end_matches('.');
        self.consensus.read(|s| match s.service_vip(name) {
            Some(vip) => Answer::Addresses(vec![IpAddr::V4(vip)]),
            None => s
                .hostname_addresses(name)
                .map_or(Answer::Refused, Answer::Addresses),
        })
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
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
        let qname = info.query.name().to_string();
        let qtype = info.query.query_type();
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;
        let records: Vec<Record> = match self.lookup(&qname) {
            Answer::Refused => {
                let msg = builder.error_msg(&request.metadata, ResponseCode::Refused);
                return response
                    .send_response(msg)
                    .await
                    .unwrap_or_else(|_| failed(ResponseCode::Refused));
            }
            Answer::Addresses(addrs) => {
                let name = Name::from(info.query.name().clone());
                addrs
                    .into_iter()
                    .filter_map(|a| match (a, qtype) {
                        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(v4))),
                        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => {
                            Some(RData::AAAA(AAAA(v6)))
                        }
                        _ => None,
                    })
                    .map(|rdata| Record::from_rdata(name.clone(), self.ttl, rdata))
                    .collect()
            }
        };
        let msg = builder.build(metadata, records.iter(), [], [], []);
        match response.send_response(msg).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "dns: could not send a response");
                failed(ResponseCode::ServFail)
            }
        }
    }
}
