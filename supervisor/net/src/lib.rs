//! A call's network, as agentd serves it.
//!
//! Every call with network grants has a namespace of its own in which every address is
//! routed to loopback and only agentd listens:
//! - on each granted port, on every address: a connection's destination (the listener's
//!   local address) is checked against the grants, and if allowed agentd opens the real
//!   connection from its own namespace and relays both ways (see the relay module);
//! - a DNS stub on port 53 (UDP), which answers only granted names, with what agentd's own
//!   resolver found for them on the host, minus special addresses the grants do not name;
//! - an HTTP proxy (`CONNECT`, and absolute-form plain HTTP) applying the same rules, for
//!   clients that prefer one.
//!
//! Bind grants go the other way: agentd listens at the granted address on the host and
//! connects each client to the tool's listener inside the namespace.
//!
//! Everything runs in the supervisor's one thread, from its poll loop ([`Network::pollfds`],
//! [`Network::progress`], [`Network::next_deadline`]), and every connection, question and
//! refusal becomes an [`Event`] for the audit log.

pub mod dns;
mod event;
mod inside;
pub mod proxy;
mod relay;
pub mod resolve;
mod sys;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_policy::net::{canonical, client_name};
use agentd_policy::{HostAddr, NetworkPlan};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use nix::sys::socket::{self as so, sockopt, AddressFamily, SockFlag, SockType};

pub use event::{Event, EventKind};
use inside::listen_at;
pub use inside::Inside;
pub use relay::pollfd;
pub use resolve::{ResolveError, ResolverConfig};

/// Connections one call may have open through agentd at once (forwarded, proxied and
/// inbound together). Each holds six of agentd's descriptors; past it, new ones are closed at
/// once and counted, so that a tool cannot exhaust the supervisor's descriptors.
pub const MAX_CONNECTIONS: usize = 256;
/// Distinct names one call may have resolved.
const MAX_NAMES: usize = 512;
/// Questions waiting for a lookup at once.
const MAX_WAITING_QUESTIONS: usize = 256;
/// Distinct refusals recorded one by one per call; past it, they are counted by kind.
const MAX_REFUSALS: usize = 1024;
/// How long the proxy waits for a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// The relays' shared buffer, per call with forwarded connections. Its pages are touched only
/// as far as one peek reaches, so a call moving little costs little. Measured with `agentd
/// bench net`, forwarded MB/s: 4 MiB 2450-2755, 1 MiB 2288-2496, 256 KiB lower still; 16 MiB
/// no better.
const SCRATCH: usize = 4 << 20;

/// Why a call's network could not be set up (the call is refused).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Routing or namespace handling failed.
    #[error("setting up the call's network namespace")]
    Namespace(#[source] std::io::Error),
    /// A listener inside the namespace.
    #[error("listening on {at} in the call's namespace")]
    Listen {
        /// Where.
        at: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A bind grant's listener on the host.
    #[error("exposing the bind grant {grant} on the host")]
    Expose {
        /// The grant.
        grant: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A bind grant exposed on the host.
#[derive(Debug)]
struct Exposed {
    listener: TcpListener,
    /// Where the tool listens, inside its namespace.
    inside: SocketAddr,
}

/// Where a name's lookup stands.
#[derive(Debug, Clone)]
enum Resolution {
    /// Asked first by the stub (`dns`) or the proxy.
    Pending(&'static str),
    /// The addresses the name may reach, why it has none (if so), and what the stub answers.
    Done { allowed: Vec<IpAddr>, error: Option<String>, rcode: ResponseCode },
}

#[derive(Debug)]
enum Stage {
    Dialing {
        accepted: TcpStream,
        dialed: TcpStream,
    },
    Relaying(relay::Relay),
    /// Only while moving from dialing to relaying.
    Between,
}

#[derive(Debug)]
struct Conn {
    stage: Stage,
    /// Whether the dialed side is the tool's (inbound connections).
    tool_dialed: bool,
    /// Sent to the dialed side once connected (a proxied request head).
    to_dialed: Vec<u8>,
    /// Sent to the accepted side once connected (the proxy's `200`).
    to_accepted: &'static [u8],
    /// Bytes of `to_dialed` sent (counted as the tool's).
    head_sent: u64,
    /// The real connection was made (set before anything is written to either side).
    connected: bool,
    event: Event,
    started: Instant,
}

#[derive(Debug)]
struct ProxyClient {
    sock: TcpStream,
    buf: Vec<u8>,
    since: Instant,
    /// Parsed, waiting for its name's lookup.
    request: Option<(proxy::Request, String)>,
}

/// What makes two refusals the same: kind, via, name, destination, reason.
type RepeatKey = (EventKind, &'static str, Option<String>, Option<SocketAddr>, String);

/// A call's network while it runs.
#[derive(Debug)]
pub struct Network {
    plan: NetworkPlan,
    inside: Inside,
    home: OwnedFd,
    exposed: Vec<Exposed>,
    resolver: resolve::Resolver,
    names: BTreeMap<String, Resolution>,
    /// Each address a granted name resolved to, and the names.
    by_addr: BTreeMap<IpAddr, Vec<String>>,
    questions: Vec<(dns::Question, SocketAddr)>,
    proxies: Vec<ProxyClient>,
    conns: Vec<Conn>,
    events: Vec<Event>,
    /// Refusals recorded once, with how many more times each happened.
    repeats: BTreeMap<RepeatKey, u64>,
    /// Refusals past [`MAX_REFUSALS`], by kind and path.
    unrecorded: BTreeMap<(EventKind, &'static str), u64>,
    /// This host's own addresses (in agentd's namespace): reached only through a grant that
    /// names them, as loopback is.
    local: Vec<IpAddr>,
    /// Where the relays copy bytes through, shared by all of the call's connections (the loop
    /// runs one at a time); allocated with the first relay.
    scratch: Vec<u8>,
}

impl Network {
    /// Completes the setup from agentd's own namespace (where it is called): bind grants are
    /// exposed on the host.
    pub fn new(plan: &NetworkPlan, inside: Inside, resolver: Arc<ResolverConfig>) -> Result<Self, NetError> {
        let home = sys::current_netns().map_err(NetError::Namespace)?;
        let mut exposed = Vec::new();
        for grant in &plan.bind {
            let port = grant.port.get();
            let (outside, inside): (Vec<SocketAddr>, SocketAddr) = match grant.addr {
                HostAddr::Ip(ip) => (vec![SocketAddr::new(ip, port)], SocketAddr::new(ip, port)),
                _ => (vec![SocketAddr::new([0, 0, 0, 0].into(), port)], SocketAddr::new([127, 0, 0, 1].into(), port)),
            };
            for at in outside {
                let listener = listen_at(at).map_err(|source| NetError::Expose { grant: grant.to_string(), source })?;
                exposed.push(Exposed { listener, inside });
            }
        }
        Ok(Network {
            plan: plan.clone(),
            inside,
            home,
            exposed,
            resolver: resolve::Resolver::new(resolver),
            names: BTreeMap::new(),
            by_addr: BTreeMap::new(),
            questions: Vec::new(),
            proxies: Vec::new(),
            conns: Vec::new(),
            events: Vec::new(),
            repeats: BTreeMap::new(),
            unrecorded: BTreeMap::new(),
            local: local_addresses(),
            scratch: Vec::new(),
        })
    }

    /// What to poll: each entry's fd and events.
    pub fn pollfds(&self) -> Vec<libc::pollfd> {
        let mut out = Vec::new();
        let listen = |fd: i32| pollfd(fd, true, false);
        out.extend(self.inside.listeners.iter().map(|l| listen(l.as_raw_fd())));
        out.extend(self.inside.dns.iter().map(|s| listen(s.as_raw_fd())));
        out.extend(self.inside.proxy.iter().map(|l| listen(l.as_raw_fd())));
        out.extend(self.exposed.iter().map(|e| listen(e.listener.as_raw_fd())));
        self.resolver.pollfds(&mut out);
        out.extend(self.proxies.iter().filter(|p| p.request.is_none()).map(|p| listen(p.sock.as_raw_fd())));
        for c in &self.conns {
            match &c.stage {
                Stage::Dialing { dialed, .. } => out.push(pollfd(dialed.as_raw_fd(), false, true)),
                Stage::Relaying(r) => r.pollfds(&mut out),
                Stage::Between => {}
            }
        }
        out
    }

    /// Waits until something of the network's is ready, or `timeout` (for a loop of its own,
    /// outside the supervisor's).
    pub fn wait(&self, timeout: Duration) -> std::io::Result<()> {
        let mut fds = self.pollfds();
        let ms = self.next_deadline().map_or(timeout, |d| d.saturating_duration_since(Instant::now()).min(timeout));
        sys::poll(&mut fds, i32::try_from(ms.as_millis()).unwrap_or(i32::MAX)).map(drop)
    }

    /// When [`Network::progress`] must run again even if nothing polls ready.
    pub fn next_deadline(&self) -> Option<Instant> {
        let heads = self.proxies.iter().filter(|p| p.request.is_none()).map(|p| p.since + HEAD_TIMEOUT);
        heads.chain(self.resolver.next_deadline()).min()
    }

    /// Accepts, answers, dials and relays whatever can move. Never blocks.
    pub fn progress(&mut self) {
        self.accept_forwarded();
        self.answer_questions();
        self.accept_proxied();
        self.read_heads();
        self.accept_inbound();
        for (name, answer) in self.resolver.progress() {
            self.resolved(name, answer);
        }
        self.dial_waiting_proxies();
        self.step_conns();
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    /// Ends everything (the call is over): what was open is recorded as ended here, and
    /// repeated refusals with their counts.
    pub fn close(mut self) -> Vec<Event> {
        self.progress();
        let conns = std::mem::take(&mut self.conns);
        for c in conns {
            self.finish(c, None);
        }
        for p in std::mem::take(&mut self.proxies) {
            let name = p.request.as_ref().map(|(_, n)| n.clone());
            let why = "the call ended before the proxy could connect".to_string();
            self.events.push(Event::refused(EventKind::Connect, "proxy", name, None, why));
        }
        let repeats = std::mem::take(&mut self.repeats);
        for ((kind, via, name, to, why), n) in repeats.into_iter().filter(|(_, n)| *n > 0) {
            self.events.push(Event { repeated: n, ..Event::refused(kind, via, name, to, why) });
        }
        for ((kind, via), n) in std::mem::take(&mut self.unrecorded) {
            let why = format!("refusals of further names or destinations, past the {MAX_REFUSALS} recorded one by one");
            self.events.push(Event { repeated: n, ..Event::refused(kind, via, None, None, why) });
        }
        self.events
    }

    fn open(&self) -> usize {
        self.conns.len() + self.proxies.len()
    }

    /// Records a refusal once; later identical ones are counted, and so are distinct ones past
    /// [`MAX_REFUSALS`] (a tool asking for name after name must not fill the log, nor
    /// agentd's memory).
    fn refuse(&mut self, e: Event) {
        let key = (e.kind, e.via, e.name.clone(), e.to, e.error.clone().unwrap_or_default());
        let full = self.repeats.len() >= MAX_REFUSALS;
        match self.repeats.get_mut(&key) {
            Some(n) => *n += 1,
            None if full => *self.unrecorded.entry((e.kind, e.via)).or_default() += 1,
            None => {
                self.repeats.insert(key, 0);
                self.events.push(e);
            }
        }
    }

    fn over_capacity(&mut self, via: &'static str, kind: EventKind, to: Option<SocketAddr>) -> bool {
        if self.open() < MAX_CONNECTIONS {
            return false;
        }
        let why = format!("refused: the call had {MAX_CONNECTIONS} connections open already");
        self.refuse(Event::refused(kind, via, None, to, why));
        true
    }

    /// Whether the tool may reach `to`, and the name it resolved for it, if any.
    /// Whether the tool may reach `to`, and the name it resolved for it that grants the port,
    /// if any.
    fn decide(&self, to: SocketAddr) -> (Result<(), String>, Option<String>) {
        let to = SocketAddr::new(canonical(to.ip()), to.port());
        let name = self
            .by_addr
            .get(&to.ip())
            .and_then(|names| names.iter().find(|n| self.plan.name_ports(n).contains(&to.port())).cloned());
        let by_name = name.is_some() && self.plan.allows_resolved(to.ip(), to.port()).is_ok();
        let verdict = match self.plan.allows_address(to) {
            Ok(()) => Ok(()),
            Err(_) if by_name => Ok(()),
            Err(r) => Err(r.0),
        };
        let verdict = verdict.and_then(|()| match self.own_address(to) {
            Some(why) => Err(why),
            None => Ok(()),
        });
        (verdict, name)
    }

    /// Why `to` is refused as one of this host's own addresses, unless a grant names it.
    fn own_address(&self, to: SocketAddr) -> Option<String> {
        let own = self.local.contains(&to.ip()) && !self.plan.names_address(to);
        own.then(|| format!("{to} is one of this host's own addresses: only a grant naming it reaches it"))
    }

    fn accept_forwarded(&mut self) {
        for i in 0..self.inside.listeners.len() {
            while let Ok((sock, _)) = self.inside.listeners[i].accept() {
                let Ok(local) = sock.local_addr() else { continue };
                let to = SocketAddr::new(canonical(local.ip()), local.port());
                if self.over_capacity("forwarder", EventKind::Connect, Some(to)) {
                    reset(sock);
                    continue;
                }
                match self.decide(to) {
                    (Ok(()), name) => self.dial(sock, to, name, "forwarder", Vec::new(), b""),
                    (Err(why), name) => {
                        reset(sock);
                        self.refuse(Event::refused(EventKind::Connect, "forwarder", name, Some(to), why));
                    }
                }
            }
        }
    }

    /// Opens the real connection to `to` from agentd's namespace, for `accepted`.
    fn dial(
        &mut self,
        accepted: TcpStream,
        to: SocketAddr,
        name: Option<String>,
        via: &'static str,
        to_dialed: Vec<u8>,
        to_accepted: &'static [u8],
    ) {
        let event = Event { name, to: Some(to), ..Event::new(EventKind::Connect, true, via) };
        match accepted.set_nonblocking(true).and_then(|()| connect(to)) {
            Ok(dialed) => self.conns.push(Conn {
                stage: Stage::Dialing { accepted, dialed },
                tool_dialed: false,
                to_dialed,
                to_accepted,
                head_sent: 0,
                connected: false,
                event,
                started: Instant::now(),
            }),
            Err(e) => {
                if via == "proxy" {
                    write_some(&accepted, b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n");
                }
                self.events.push(Event { connected: Some(false), error: Some(e.to_string()), ..event });
            }
        }
    }

    fn answer_questions(&mut self) {
        // Taken out while questions are answered (they need `self`), and put back.
        let Some(sock) = self.inside.dns.take() else { return };
        self.answer_from(&sock);
        self.inside.dns = Some(sock);
    }

    fn answer_from(&mut self, sock: &UdpSocket) {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let Some(q) = dns::question(&buf[..n]) else { continue };
            let name = client_name(&q.name);
            let ports = name.as_deref().map(|n| self.plan.name_ports(n)).unwrap_or_default();
            let Some(name) = name.filter(|_| !ports.is_empty()) else {
                let _ = sock.send_to(&dns::answer(&q, ResponseCode::NXDomain, &[]), peer);
                let why = "not granted".to_string();
                self.refuse(Event::refused(EventKind::Resolve, "dns", Some(q.name.to_ascii_lowercase()), None, why));
                continue;
            };
            if !matches!(q.qtype, RecordType::A | RecordType::AAAA) {
                let _ = sock.send_to(&dns::answer(&q, ResponseCode::NoError, &[]), peer);
                continue;
            }
            match self.lookup(&name, "dns") {
                Some(Resolution::Done { allowed, rcode, .. }) => {
                    let _ = sock.send_to(&dns::answer(&q, rcode, &allowed), peer);
                }
                Some(Resolution::Pending(_)) if self.questions.len() < MAX_WAITING_QUESTIONS => {
                    self.questions.push((q, peer));
                }
                _ => {
                    let _ = sock.send_to(&dns::answer(&q, ResponseCode::ServFail, &[]), peer);
                }
            }
        }
    }

    /// Where `name`'s lookup stands, starting it if it is new; `None` past the call's limit.
    fn lookup(&mut self, name: &str, via: &'static str) -> Option<Resolution> {
        if let Some(r) = self.names.get(name) {
            return Some(r.clone());
        }
        if self.names.len() >= MAX_NAMES {
            let why = format!("refused: the call resolved {MAX_NAMES} names already");
            self.refuse(Event::refused(EventKind::Resolve, via, Some(name.to_string()), None, why));
            return None;
        }
        self.names.insert(name.to_string(), Resolution::Pending(via));
        if let Some(answer) = self.resolver.start(name) {
            self.resolved(name.to_string(), answer);
        }
        self.names.get(name).cloned()
    }

    /// A lookup is over: keeps the addresses the grants let the name reach, records it, and
    /// answers whoever waited.
    fn resolved(&mut self, name: String, answer: resolve::Answer) {
        let ports = self.plan.name_ports(&name);
        let via = match self.names.get(&name) {
            Some(Resolution::Pending(via)) => via,
            _ => "dns",
        };
        let mut event = Event { name: Some(name.clone()), ..Event::new(EventKind::Resolve, true, via) };
        let (mut allowed, mut error) = (Vec::new(), None);
        let lookup_failed = answer.is_err();
        match answer {
            Ok(addrs) => {
                for ip in addrs {
                    let ip = canonical(ip);
                    // Allowed on some port of the name, by the special-range rule and as not
                    // this host's own; else withheld, with the first port's reason.
                    let verdict = |p: &u16| {
                        self.plan
                            .allows_resolved(ip, *p)
                            .map_err(|r| r.0)
                            .and_then(|()| self.own_address(SocketAddr::new(ip, *p)).map_or(Ok(()), Err))
                    };
                    let verdicts: Vec<Result<(), String>> = ports.iter().map(verdict).collect();
                    match verdicts.iter().find_map(|v| v.as_ref().err()) {
                        _ if verdicts.iter().any(Result::is_ok) => allowed.push(ip),
                        Some(why) => event.withheld.push(why.clone()),
                        None => event.withheld.push(format!("{ip}: the name is not granted")),
                    }
                }
                if allowed.is_empty() {
                    error = Some(if event.withheld.is_empty() {
                        "the name has no address".to_string()
                    } else {
                        "every address of the name was withheld".to_string()
                    });
                }
            }
            Err(e) => error = Some(e),
        }
        // The name exists for the tool only with an address it may reach; a lookup that
        // failed is a server failure, as the resolver's own would be.
        let rcode = match (allowed.is_empty(), lookup_failed) {
            (false, _) => ResponseCode::NoError,
            (true, true) => ResponseCode::ServFail,
            (true, false) => ResponseCode::NXDomain,
        };
        for ip in &allowed {
            let names = self.by_addr.entry(*ip).or_default();
            if !names.contains(&name) {
                names.push(name.clone());
            }
        }
        event.allowed = !allowed.is_empty();
        event.addresses.clone_from(&allowed);
        event.error.clone_from(&error);
        self.events.push(event);
        self.names.insert(name.clone(), Resolution::Done { allowed: allowed.clone(), error, rcode });
        // Questions that waited for it are answered now (while the stub's socket is out, in
        // `answer_questions`, none can be waiting: a pending name is not looked up again).
        if let Some(sock) = &self.inside.dns {
            let waiting = std::mem::take(&mut self.questions);
            let (mine, rest): (Vec<_>, Vec<_>) =
                waiting.into_iter().partition(|(q, _)| client_name(&q.name).as_deref() == Some(name.as_str()));
            self.questions = rest;
            for (q, peer) in mine {
                let _ = sock.send_to(&dns::answer(&q, rcode, &allowed), peer);
            }
        }
    }

    fn accept_proxied(&mut self) {
        let Some(l) = self.inside.proxy.take() else { return };
        while let Ok((sock, _)) = l.accept() {
            if self.over_capacity("proxy", EventKind::Connect, None) || sock.set_nonblocking(true).is_err() {
                reset(sock);
                continue;
            }
            self.proxies.push(ProxyClient { sock, buf: Vec::new(), since: Instant::now(), request: None });
        }
        self.inside.proxy = Some(l);
    }

    fn read_heads(&mut self) {
        let mut i = 0;
        while i < self.proxies.len() {
            let p = &mut self.proxies[i];
            if p.request.is_some() {
                i += 1;
                continue;
            }
            let mut chunk = [0u8; 4096];
            let mut closed = false;
            loop {
                match p.sock.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => p.buf.extend_from_slice(&chunk[..n]),
                    Err(_) => break,
                }
                if p.buf.len() > proxy::MAX_HEAD || proxy::head_end(&p.buf).is_some() {
                    break;
                }
            }
            let end = proxy::head_end(&p.buf);
            let outcome = match end {
                Some(end) => Some(proxy::parse(&p.buf, end)),
                None if closed => Some(Err("the client closed before its request head ended")),
                None if p.buf.len() > proxy::MAX_HEAD => Some(Err("request head too long")),
                None if p.since.elapsed() >= HEAD_TIMEOUT => Some(Err("no complete request head in time")),
                None => None,
            };
            match outcome {
                None => i += 1,
                Some(Err(why)) => {
                    let p = self.proxies.swap_remove(i);
                    answer_proxy(&p.sock, 400, why);
                    self.refuse(Event::refused(EventKind::Connect, "proxy", None, None, why.to_string()));
                }
                Some(Ok(req)) => {
                    let p = self.proxies.swap_remove(i);
                    self.route_proxied(p, req);
                }
            }
        }
    }

    /// Decides a proxied request: an address is checked at once; a name must be granted on
    /// the port, then waits for its lookup.
    fn route_proxied(&mut self, mut p: ProxyClient, req: proxy::Request) {
        if let Ok(ip) = req.host.parse::<IpAddr>() {
            let to = SocketAddr::new(canonical(ip), req.port);
            match self.decide(to) {
                (Ok(()), name) => self.dial_proxied(p.sock, req, to, name),
                (Err(why), name) => {
                    answer_proxy(&p.sock, 403, &why);
                    self.refuse(Event::refused(EventKind::Connect, "proxy", name, Some(to), why));
                }
            }
            return;
        }
        let granted = client_name(&req.host).filter(|n| self.plan.name_ports(n).contains(&req.port));
        let Some(name) = granted else {
            let why = format!("{}:{} is not granted", req.host, req.port);
            answer_proxy(&p.sock, 403, &why);
            self.refuse(Event::refused(EventKind::Connect, "proxy", Some(req.host.to_ascii_lowercase()), None, why));
            return;
        };
        if self.lookup(&name, "proxy").is_none() {
            answer_proxy(&p.sock, 503, "too many names");
            return;
        }
        p.request = Some((req, name));
        self.proxies.push(p);
    }

    fn dial_proxied(&mut self, sock: TcpStream, req: proxy::Request, to: SocketAddr, name: Option<String>) {
        const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
        let reply: &'static [u8] = if req.tunnel { ESTABLISHED } else { b"" };
        self.dial(sock, to, name, "proxy", req.forward, reply);
    }

    fn dial_waiting_proxies(&mut self) {
        let mut i = 0;
        while i < self.proxies.len() {
            let ready = match &self.proxies[i].request {
                Some((_, name)) => match self.names.get(name) {
                    Some(Resolution::Done { allowed, error, .. }) => Some((allowed.clone(), error.clone())),
                    _ => None,
                },
                None => None,
            };
            let Some((allowed, error)) = ready else {
                i += 1;
                continue;
            };
            let p = self.proxies.swap_remove(i);
            let Some((req, name)) = p.request else { continue };
            let usable = allowed.iter().find(|ip| self.plan.allows_resolved(**ip, req.port).is_ok());
            match usable {
                Some(ip) => {
                    let to = SocketAddr::new(*ip, req.port);
                    self.dial_proxied(p.sock, req, to, Some(name));
                }
                None => {
                    let why = error.unwrap_or_else(|| format!("{name} has no address this grant may reach"));
                    answer_proxy(&p.sock, 403, &why);
                    self.refuse(Event::refused(EventKind::Connect, "proxy", Some(name), None, why));
                }
            }
        }
    }

    fn accept_inbound(&mut self) {
        for i in 0..self.exposed.len() {
            while let Ok((outside, from)) = self.exposed[i].listener.accept() {
                let inside = self.exposed[i].inside;
                if self.over_capacity("exposed", EventKind::Inbound, Some(inside)) {
                    reset(outside);
                    continue;
                }
                let mut event =
                    Event { to: Some(inside), from: Some(from), ..Event::new(EventKind::Inbound, true, "exposed") };
                match outside.set_nonblocking(true).and_then(|()| self.in_call_ns(|| connect(inside))) {
                    Ok(dialed) => self.conns.push(Conn {
                        stage: Stage::Dialing { accepted: outside, dialed },
                        tool_dialed: true,
                        to_dialed: Vec::new(),
                        to_accepted: b"",
                        head_sent: 0,
                        connected: false,
                        event,
                        started: Instant::now(),
                    }),
                    Err(e) => {
                        event.connected = Some(false);
                        event.error = Some(e.to_string());
                        self.events.push(event);
                    }
                }
            }
        }
    }

    /// Runs `f` in the call's network namespace (for a socket made there), and comes back.
    /// If agentd cannot come back it cannot know where its next connection would go, so it
    /// stops.
    fn in_call_ns<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        sys::enter_netns(self.inside.ns.as_fd())?;
        let r = f();
        if let Err(e) = sys::enter_netns(self.home.as_fd()) {
            eprintln!("agentd: fatal: cannot return to its own network namespace: {e}");
            std::process::abort();
        }
        r
    }

    fn step_conns(&mut self) {
        let mut i = 0;
        while i < self.conns.len() {
            match step(&mut self.conns[i], &mut self.scratch) {
                Ok(false) => i += 1,
                Ok(true) => {
                    let c = self.conns.swap_remove(i);
                    self.finish(c, None);
                }
                Err(e) => {
                    let c = self.conns.swap_remove(i);
                    self.finish(c, Some(e.to_string()));
                }
            }
        }
    }

    fn finish(&mut self, c: Conn, error: Option<String>) {
        let mut e = c.event;
        let (connected, (sent, received)) = match &c.stage {
            Stage::Dialing { accepted, .. } => {
                if e.via == "proxy" {
                    write_some(accepted, b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n");
                }
                (false, (0, 0))
            }
            Stage::Relaying(r) => {
                let (sent, received) = r.moved();
                (true, (sent + c.head_sent, received))
            }
            // Failed while writing what the proxy owed each side: what reached the
            // destination still counts.
            Stage::Between => (c.connected, (c.head_sent, 0)),
        };
        e.connected = Some(connected);
        e.sent_bytes = Some(sent);
        e.received_bytes = Some(received);
        e.duration_ms = Some(u64::try_from(c.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        e.error = error;
        self.events.push(e);
    }
}

/// This host's addresses, from its interfaces (agentd's own namespace, where it is called).
fn local_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    let mut out: Vec<IpAddr> = addrs
        .filter_map(|a| {
            let sa = a.address?;
            sa.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| sa.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Moves a connection along; true once both directions are over.
fn step(c: &mut Conn, scratch: &mut Vec<u8>) -> std::io::Result<bool> {
    if let Stage::Dialing { dialed, .. } = &c.stage {
        match so::getsockopt(dialed, sockopt::SocketError)? {
            0 => {}
            e if e == libc::EINPROGRESS || e == libc::EALREADY => return Ok(false),
            e => return Err(std::io::Error::from_raw_os_error(e)),
        }
        // Writable with no error: connected (or still in progress, which peer_addr tells).
        if dialed.peer_addr().is_err() {
            return Ok(false);
        }
        let Stage::Dialing { accepted, dialed } = std::mem::replace(&mut c.stage, Stage::Between) else {
            return Ok(false);
        };
        // Both are small and the sockets fresh: they fit in the send buffers.
        c.connected = true;
        write_all(&dialed, &c.to_dialed, &mut c.head_sent)?;
        write_all(&accepted, c.to_accepted, &mut 0)?;
        let relay =
            if c.tool_dialed { relay::Relay::new(dialed, accepted) } else { relay::Relay::new(accepted, dialed) };
        if scratch.is_empty() {
            scratch.resize(SCRATCH, 0);
        }
        c.stage = Stage::Relaying(relay);
    }
    match &mut c.stage {
        Stage::Relaying(r) => r.step(scratch),
        Stage::Dialing { .. } | Stage::Between => Ok(false),
    }
}

/// Writes all of `buf`, counting what was written in `written` (also on failure).
fn write_all(mut s: &TcpStream, mut buf: &[u8], written: &mut u64) -> std::io::Result<()> {
    while !buf.is_empty() {
        let n = s.write(buf)?;
        *written += n as u64;
        buf = &buf[n..];
    }
    Ok(())
}

fn write_some(mut s: &TcpStream, buf: &[u8]) {
    let _ = s.write(buf);
}

fn answer_proxy(s: &TcpStream, status: u16, why: &str) {
    let reason = match status {
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Service Unavailable",
    };
    let body = format!("agentd: {why}\n");
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    write_some(s, head.as_bytes());
}

/// Closes with a reset, so that the client sees the refusal at once.
fn reset(s: TcpStream) {
    let _ = so::setsockopt(&s, sockopt::Linger, &libc::linger { l_onoff: 1, l_linger: 0 });
}

/// Starts a non-blocking connect to `to` from the current namespace.
fn connect(to: SocketAddr) -> std::io::Result<TcpStream> {
    let family = if to.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = so::socket(family, SockType::Stream, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    let started = match to {
        SocketAddr::V4(a) => so::connect(fd.as_raw_fd(), &so::SockaddrIn::from(a)),
        SocketAddr::V6(a) => so::connect(fd.as_raw_fd(), &so::SockaddrIn6::from(a)),
    };
    match started {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(TcpStream::from(fd)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests;
