//! agentd's own resolver, on the host side: a hosts file first, then the configured
//! nameservers over UDP, never blocking (driven from the supervisor's poll loop).
//!
//! Configuration (the host's, never the manifest's): `AGENTD_NAMESERVERS` (comma-separated
//! `ADDR` or `ADDR:PORT`; default: the `nameserver` lines of `/etc/resolv.conf`) and
//! `AGENTD_HOSTS_FILE` (default `/etc/hosts`; an empty value turns it off).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use crate::relay::pollfd;
use crate::sys;

/// How long one try waits for a nameserver's answer.
const TRY: Duration = Duration::from_millis(1500);
/// How many times the list of nameservers is tried.
const ROUNDS: usize = 2;
/// Addresses kept per name.
pub const MAX_ADDRESSES: usize = 16;

/// Where names are looked up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResolverConfig {
    /// Nameservers, tried in order.
    pub nameservers: Vec<SocketAddr>,
    /// Names answered from the hosts file (lower case), before any nameserver.
    pub hosts: BTreeMap<String, Vec<IpAddr>>,
}

/// A bad resolver configuration.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// A nameserver in `AGENTD_NAMESERVERS` is not an address.
    #[error("AGENTD_NAMESERVERS: {0:?} is not ADDR or ADDR:PORT")]
    Nameserver(String),
    /// The hosts file could not be read.
    #[error("reading the hosts file {path}")]
    Hosts {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl ResolverConfig {
    /// The host's configuration, from the environment or the system's files.
    pub fn from_env() -> Result<Self, ResolveError> {
        let nameservers = match std::env::var("AGENTD_NAMESERVERS") {
            Ok(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| parse_server(s).ok_or_else(|| ResolveError::Nameserver(s.to_string())))
                .collect::<Result<_, _>>()?,
            Err(_) => std::fs::read_to_string("/etc/resolv.conf").map(|t| resolv_conf(&t)).unwrap_or_default(),
        };
        let hosts_path = std::env::var("AGENTD_HOSTS_FILE").unwrap_or_else(|_| "/etc/hosts".into());
        let hosts = if hosts_path.is_empty() {
            BTreeMap::new()
        } else {
            match std::fs::read_to_string(&hosts_path) {
                Ok(text) => hosts_file(&text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && hosts_path == "/etc/hosts" => BTreeMap::new(),
                Err(source) => return Err(ResolveError::Hosts { path: hosts_path, source }),
            }
        };
        Ok(Self { nameservers, hosts })
    }
}

fn parse_server(s: &str) -> Option<SocketAddr> {
    s.parse::<SocketAddr>().ok().or_else(|| s.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
}

/// The `nameserver` lines of a resolv.conf.
pub fn resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.split_whitespace().next())
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A hosts file: `ADDRESS NAME [ALIAS...]` per line, `#` comments.
pub fn hosts_file(text: &str) -> BTreeMap<String, Vec<IpAddr>> {
    let mut out: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or_default();
        let mut words = line.split_whitespace();
        let Some(ip) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) else { continue };
        for name in words.filter_map(agentd_policy::net::client_name) {
            let list = out.entry(name).or_default();
            if !list.contains(&ip) {
                list.push(ip);
            }
        }
    }
    out
}

/// What a lookup found: the name's addresses (none if it has none), or why it failed.
pub type Answer = Result<Vec<IpAddr>, String>;

#[derive(Debug)]
struct Lookup {
    name: String,
    /// Index into the nameservers, counting rounds (`try / len` is the round).
    attempt: usize,
    sock: Option<UdpSocket>,
    /// Query ids of the A and AAAA questions, and whether each was answered.
    ids: [u16; 2],
    got: [bool; 2],
    addrs: Vec<IpAddr>,
    deadline: Instant,
}

/// Lookups in flight.
#[derive(Debug)]
pub struct Resolver {
    cfg: Arc<ResolverConfig>,
    lookups: Vec<Lookup>,
}

const TYPES: [RecordType; 2] = [RecordType::A, RecordType::AAAA];

impl Resolver {
    /// A resolver with nothing in flight.
    pub fn new(cfg: Arc<ResolverConfig>) -> Self {
        Resolver { cfg, lookups: Vec::new() }
    }

    /// Starts looking `name` up (lower case, no trailing dot). A name of the hosts file is
    /// answered at once; otherwise the answer comes from [`Resolver::progress`].
    pub fn start(&mut self, name: &str) -> Option<Answer> {
        if let Some(addrs) = self.cfg.hosts.get(name) {
            return Some(Ok(addrs.clone()));
        }
        if self.cfg.nameservers.is_empty() {
            return Some(Err("no nameserver is configured (AGENTD_NAMESERVERS or /etc/resolv.conf)".into()));
        }
        if self.lookups.iter().any(|l| l.name == name) {
            return None;
        }
        let mut l = Lookup {
            name: name.to_string(),
            attempt: 0,
            sock: None,
            ids: [0; 2],
            got: [false; 2],
            addrs: Vec::new(),
            deadline: Instant::now(),
        };
        match send(&self.cfg, &mut l) {
            Ok(()) => {
                self.lookups.push(l);
                None
            }
            Err(e) => Some(Err(e)),
        }
    }

    /// What to poll for.
    pub fn pollfds(&self, out: &mut Vec<libc::pollfd>) {
        for l in &self.lookups {
            if let Some(s) = &l.sock {
                out.push(pollfd(s.as_raw_fd(), true, false));
            }
        }
    }

    /// When the next try times out.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.lookups.iter().map(|l| l.deadline).min()
    }

    /// Reads answers and retries what timed out; returns the lookups that are over.
    pub fn progress(&mut self) -> Vec<(String, Answer)> {
        let now = Instant::now();
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.lookups.len() {
            let l = &mut self.lookups[i];
            let mut failed = None;
            read_answers(l, &mut failed);
            if l.got != [true, true] && failed.is_none() && now >= l.deadline {
                l.attempt += 1;
                if l.attempt >= ROUNDS * self.cfg.nameservers.len() {
                    failed = Some("no nameserver answered".to_string());
                } else if let Err(e) = send(&self.cfg, l) {
                    failed = Some(e);
                }
            }
            if l.got == [true, true] || failed.is_some() {
                let l = self.lookups.swap_remove(i);
                let answer = match failed {
                    Some(e) if l.addrs.is_empty() => Err(e),
                    _ => Ok(l.addrs),
                };
                done.push((l.name, answer));
            } else {
                i += 1;
            }
        }
        done
    }
}

/// Sends both questions to the nameserver of `l.attempt`, from a fresh socket.
fn send(cfg: &ResolverConfig, l: &mut Lookup) -> Result<(), String> {
    let servers = &cfg.nameservers;
    let server = servers[l.attempt % servers.len()];
    let bind: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().map_err(|_| "bind")?;
    let sock = UdpSocket::bind(bind).and_then(|s| s.connect(server).map(|()| s)).map_err(|e| e.to_string())?;
    sock.set_nonblocking(true).map_err(|e| e.to_string())?;
    let name = Name::from_ascii(format!("{}.", l.name)).map_err(|e| e.to_string())?;
    for (i, ty) in TYPES.iter().enumerate() {
        if l.got[i] {
            continue;
        }
        l.ids[i] = sys::random_u16();
        let mut m = Message::new();
        m.set_id(l.ids[i]).set_message_type(MessageType::Query).set_op_code(OpCode::Query);
        m.set_recursion_desired(true).add_query(Query::query(name.clone(), *ty));
        let bytes = m.to_vec().map_err(|e| e.to_string())?;
        // A send that fails (no route to this server) is the same as no answer.
        let _ = sock.send(&bytes);
    }
    l.sock = Some(sock);
    l.deadline = Instant::now() + TRY;
    Ok(())
}

/// Takes every datagram waiting on the lookup's socket.
fn read_answers(l: &mut Lookup, failed: &mut Option<String>) {
    let Some(sock) = &l.sock else { return };
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        let Ok(m) = Message::from_vec(&buf[..n]) else { continue };
        let Some(i) = l.ids.iter().position(|id| *id == m.id()) else { continue };
        let asked = m.queries().first().is_some_and(|q| {
            q.query_type() == TYPES[i] && q.name().to_ascii().trim_end_matches('.').eq_ignore_ascii_case(&l.name)
        });
        if m.message_type() != MessageType::Response || !asked || l.got[i] {
            continue;
        }
        l.got[i] = true;
        match m.response_code() {
            ResponseCode::NoError | ResponseCode::NXDomain => {}
            code => *failed = Some(format!("the nameserver answered {code}")),
        }
        for r in m.answers() {
            if let Some(ip) = r.data().ip_addr() {
                if !l.addrs.contains(&ip) && l.addrs.len() < MAX_ADDRESSES {
                    l.addrs.push(ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{RData, Record};

    /// A nameserver on loopback that answers every A question for `name` with a CNAME and
    /// an address, AAAA with nothing, and other names with NXDOMAIN.
    fn nameserver(name: &'static str, ip: std::net::Ipv4Addr) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let at = sock.local_addr().expect("addr");
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let Ok(q) = Message::from_vec(&buf[..n]) else { continue };
                let mut m = Message::new();
                m.set_id(q.id()).set_message_type(MessageType::Response).set_op_code(OpCode::Query);
                let query = q.queries()[0].clone();
                let asked = query.name().to_ascii();
                m.add_query(query.clone());
                if asked.trim_end_matches('.') != name {
                    m.set_response_code(ResponseCode::NXDomain);
                } else if query.query_type() == RecordType::A {
                    let target = Name::from_ascii("edge.cdn.example.").expect("name");
                    m.add_answer(Record::from_rdata(query.name().clone(), 60, RData::CNAME(CNAME(target.clone()))));
                    m.add_answer(Record::from_rdata(target, 60, RData::A(A(ip))));
                }
                let _ = sock.send_to(&m.to_vec().expect("encode"), peer);
            }
        });
        at
    }

    fn wait(r: &mut Resolver) -> Vec<(String, Answer)> {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let done = r.progress();
            if !done.is_empty() {
                return done;
            }
            assert!(Instant::now() < end, "no answer");
            let mut fds = Vec::new();
            r.pollfds(&mut fds);
            let _ = sys::poll(&mut fds, 20);
        }
    }

    /// Over UDP: a silent nameserver is skipped for the next, CNAME chains are followed to
    /// their addresses, and a name that does not exist has none.
    #[test]
    fn nameservers_are_asked_in_turn() {
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let live = nameserver("api.example.test", "192.0.2.5".parse().expect("ip"));
        let cfg =
            ResolverConfig { nameservers: vec![silent.local_addr().expect("addr"), live], hosts: BTreeMap::new() };
        let mut r = Resolver::new(Arc::new(cfg));
        assert!(r.start("api.example.test").is_none(), "answered without asking");
        let started = Instant::now();
        let done = wait(&mut r);
        assert!(started.elapsed() >= TRY, "the silent server was not waited for");
        assert_eq!(done, [("api.example.test".to_string(), Ok(vec!["192.0.2.5".parse::<IpAddr>().expect("ip")]))]);
        let cfg = ResolverConfig { nameservers: vec![live], hosts: BTreeMap::new() };
        let mut r = Resolver::new(Arc::new(cfg));
        assert!(r.start("nx.example.test").is_none());
        assert_eq!(wait(&mut r), [("nx.example.test".to_string(), Ok(vec![]))]);
    }

    #[test]
    fn system_files_parse() {
        let r = resolv_conf("# x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\nsearch x\nnameserver bogus\n");
        assert_eq!(r, ["127.0.0.53:53".parse().expect("a"), "[fe80::1]:53".parse().expect("a")]);
        let h = hosts_file("127.0.0.1 localhost Local.Example # c\n::1 localhost\n# 10.0.0.1 x\nbad line\n");
        assert_eq!(h["localhost"].len(), 2);
        assert_eq!(h["local.example"], ["127.0.0.1".parse::<IpAddr>().expect("ip")]);
        assert!(!h.contains_key("x"));
    }
}
