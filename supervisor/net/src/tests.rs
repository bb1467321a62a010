//! The whole network of a call, in two namespaces the test makes: "host" (with servers on
//! loopback and on a public-looking address) and the call's.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_policy::{HostPort, NetMode, NetworkPlan};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};

use super::*;

const PUBLIC: &str = "192.0.2.77";
/// An address of the test's "host" itself (not special: a documentation range).
const OWN: &str = "198.51.100.5";

fn sh(cmd: &str) {
    // A child process starts in the namespace of the thread that forks it.
    let ok = Command::new("sh").args(["-c", cmd]).status().is_ok_and(|s| s.success());
    assert!(ok, "{cmd}");
}

fn new_netns() -> OwnedFd {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
    sh("ip link set lo up");
    sys::current_netns().expect("ns")
}

fn plan(connect: &[&str], bind: &[&str]) -> NetworkPlan {
    let parse = |l: &[&str]| l.iter().map(|g| HostPort::parse(g).expect("grant")).collect::<Vec<_>>();
    let connect = parse(connect);
    let mut ports: Vec<u16> = connect.iter().map(|g| g.port.get()).collect();
    ports.sort_unstable();
    ports.dedup();
    NetworkPlan {
        mode: NetMode::Forwarded,
        bind_ports: parse(bind).iter().map(|g| g.port.get()).collect(),
        bind: parse(bind),
        connect,
        connect_ports: ports,
        dns: Some(agentd_policy::net::DNS_STUB),
        proxy: Some("127.0.0.1:3128".parse().expect("addr")),
        unix: Vec::new(),
    }
}

/// An echo server on `at`, in the current namespace, for as many connections as come.
fn echo(at: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(at).expect("bind echo");
    let addr = l.local_addr().expect("addr");
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

struct Rig {
    net: Network,
    call: OwnedFd,
    host: OwnedFd,
}

impl Rig {
    /// Runs `f` in the call's namespace.
    fn inside<T>(&self, f: impl FnOnce() -> T) -> T {
        sys::enter_netns(self.call.as_fd()).expect("enter");
        let r = f();
        sys::enter_netns(self.host.as_fd()).expect("home");
        r
    }

    /// Drives the network until `done` says so (or panics after 5 s).
    fn until(&mut self, what: &str, mut done: impl FnMut(&mut Network) -> bool) {
        let end = Instant::now() + Duration::from_secs(5);
        while !done(&mut self.net) {
            assert!(Instant::now() < end, "timed out: {what}");
            let mut fds = self.net.pollfds();
            let _ = sys::poll(&mut fds, 10);
            self.net.progress();
        }
    }

    /// Sends `payload` through `s` (made inside) and reads it back, driving the network.
    fn round_trip(&mut self, s: &mut TcpStream, payload: &[u8]) -> Result<Vec<u8>, String> {
        s.set_nonblocking(true).map_err(|e| e.to_string())?;
        let (mut written, mut got) = (0, Vec::new());
        let end = Instant::now() + Duration::from_secs(5);
        while got.len() < payload.len() {
            if Instant::now() > end {
                return Err(format!("{} of {} bytes came back", got.len(), payload.len()));
            }
            if written < payload.len() {
                if let Ok(n) = s.write(&payload[written..]) {
                    written += n;
                }
            }
            self.net.progress();
            let mut buf = [0u8; 65536];
            match s.read(&mut buf) {
                Ok(0) => return Err("closed".into()),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(got)
    }

    /// Asks the stub for `name` (type `ty`) from inside; the answer's code and addresses.
    fn ask(&mut self, name: &str, ty: RecordType) -> (ResponseCode, Vec<IpAddr>) {
        let sock = self.inside(|| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("udp");
            s.connect("127.0.0.1:53").expect("connect");
            s
        });
        let mut m = Message::new();
        m.set_id(4242).set_message_type(MessageType::Query).set_op_code(OpCode::Query).set_recursion_desired(true);
        m.add_query(Query::query(Name::from_ascii(format!("{name}.")).expect("name"), ty));
        sock.send(&m.to_vec().expect("encode")).expect("send");
        sock.set_nonblocking(true).expect("nonblocking");
        let mut reply = None;
        let mut buf = [0u8; 1500];
        self.until(&format!("the stub's answer for {name}"), |_| {
            if let Ok(n) = sock.recv(&mut buf) {
                reply = Some(Message::from_vec(&buf[..n]).expect("decode"));
            }
            reply.is_some()
        });
        let r = reply.expect("reply");
        assert_eq!(r.id(), 4242);
        (r.response_code(), r.answers().iter().filter_map(|a| a.data().ip_addr()).collect())
    }

    fn events(&mut self) -> Vec<Event> {
        self.net.take_events()
    }
}

/// Grants by address, range, name and wildcard, each reached the way a client would, and
/// everything else refused and recorded; bind grants reach the tool from the host; autobind
/// reaches nothing.
#[test]
fn the_call_reaches_what_its_grants_say_and_nothing_else() {
    let test = "tests::the_call_reaches_what_its_grants_say_and_nothing_else";
    if !agentd_tests::need(test, "root", agentd_tests::is_root(), "network namespaces need root") {
        return;
    }
    std::thread::spawn(|| {
        let host = new_netns();
        // The public-looking server is in a namespace of its own, reached over a veth pair:
        // an address of the host's own would be refused.
        let remote = agentd_tests::Remote::start();
        let local = echo("127.0.0.1:0".parse().expect("addr"));
        sh(&format!("ip addr add {OWN}/32 dev lo"));
        // A server that takes connections and never reads.
        let holder = TcpListener::bind("127.0.0.1:0").expect("bind");
        let held_port = holder.local_addr().expect("addr").port();
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            for s in holder.incoming().flatten() {
                let _ = nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::RcvBuf, &4096);
                kept.push(s);
            }
        });
        let remote_ns = std::fs::File::open(remote.ns_path()).expect("remote ns");
        sys::enter_netns(remote_ns.as_fd()).expect("enter remote");
        let public = echo(SocketAddr::new(PUBLIC.parse().expect("ip"), 0));
        sys::enter_netns(host.as_fd()).expect("back");
        let p = local.port();
        let q = public.port();
        let grants = [
            format!("127.0.0.1:{p}"),
            format!("svc.agentd.test:{q}"),
            format!("*.wild.agentd.test:{q}"),
            format!("meta.agentd.test:{q}"),
            format!("loop.agentd.test:{q}"),
            format!("own.agentd.test:{q}"),
            format!("127.0.0.1:{held_port}"),
        ];
        let bind_port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("free port");
            // (The address below is this host's own: names must not lead to it.)
            l.local_addr().expect("addr").port()
        };
        let grants: Vec<&str> = grants.iter().map(String::as_str).collect();
        let bind = format!("127.0.0.1:{bind_port}");
        let plan = plan(&grants, &[&bind]);
        let call = new_netns();
        let inside = Inside::setup(&plan).expect("inside");
        sys::enter_netns(host.as_fd()).expect("home");
        let mut cfg = ResolverConfig::default();
        for (name, ip) in [
            ("svc.agentd.test", PUBLIC),
            ("a.wild.agentd.test", PUBLIC),
            ("wild.agentd.test", PUBLIC),
            ("meta.agentd.test", "169.254.169.254"),
            ("loop.agentd.test", "127.0.0.1"),
            ("own.agentd.test", OWN),
        ] {
            cfg.hosts.insert(name.into(), vec![ip.parse().expect("ip")]);
        }
        let net = Network::new(&plan, inside, Arc::new(cfg)).expect("network");
        let mut rig = Rig { net, call, host };

        // An exact grant: bytes both ways, in order, counted. More than the relay's buffer, so
        // that both sides fill up and resume.
        let mut s = rig.inside(|| TcpStream::connect(local)).expect("connect to the grant");
        let payload: Vec<u8> = (0..(SCRATCH as u32 * 2 + 12_345)).map(|i| (i.wrapping_mul(7919) % 251) as u8).collect();
        assert!(rig.round_trip(&mut s, &payload).expect("echo") == payload, "the bytes came back changed");
        drop(s);
        rig.until("the connection's record", |n| n.events.iter().any(|e| e.to == Some(local)));
        let e = rig.events().into_iter().find(|e| e.to == Some(local)).expect("record");
        assert!(e.allowed && e.connected == Some(true), "{e:?}");
        let n = payload.len() as u64;
        assert_eq!((e.sent_bytes, e.received_bytes), (Some(n), Some(n)));

        // Its IPv4-mapped spelling is the same destination; a mapped spelling of another
        // address is not granted.
        let mapped = |ip: &str, port| SocketAddr::new(format!("::ffff:{ip}").parse::<IpAddr>().expect("ip"), port);
        let mut s = rig.inside(|| TcpStream::connect(mapped("127.0.0.1", p))).expect("mapped spelling");
        assert_eq!(rig.round_trip(&mut s, b"same").expect("echo"), b"same");
        for other in [mapped("127.0.0.2", p), SocketAddr::new("127.0.0.2".parse().expect("ip"), p)] {
            let mut s = rig.inside(|| TcpStream::connect(other)).expect("the listener takes it, then refuses");
            assert!(rig.round_trip(&mut s, b"x").is_err(), "{other} reached something");
        }
        let other_port = SocketAddr::new(local.ip(), p.wrapping_add(1).max(1));
        assert!(rig.inside(|| TcpStream::connect(other_port)).is_err(), "a port nobody granted answers");
        let elsewhere = SocketAddr::new(PUBLIC.parse().expect("ip"), p);
        let mut s = rig.inside(|| TcpStream::connect(elsewhere)).expect("listener");
        assert!(rig.round_trip(&mut s, b"x").is_err(), "the granted port at another address");
        rig.until("the refusals' records", |n| n.events.iter().filter(|e| !e.allowed).count() >= 2);
        let refused: Vec<Event> = rig.events().into_iter().filter(|e| !e.allowed).collect();
        assert!(refused.iter().any(|e| e.to == Some(elsewhere)), "{refused:?}");

        // Names: granted ones answer what agentd resolved; a wildcard covers names below
        // it, not its parent; special addresses are withheld; others do not exist.
        assert_eq!(
            rig.ask("svc.agentd.test", RecordType::A),
            (ResponseCode::NoError, vec![PUBLIC.parse().expect("ip")])
        );
        assert_eq!(rig.ask("SVC.agentd.test", RecordType::AAAA), (ResponseCode::NoError, vec![]));
        assert_eq!(rig.ask("a.wild.agentd.test", RecordType::A).1.len(), 1);
        for name in
            ["wild.agentd.test", "meta.agentd.test", "loop.agentd.test", "other.agentd.test", "evilsvc.agentd.test"]
        {
            assert_eq!(rig.ask(name, RecordType::A), (ResponseCode::NXDomain, vec![]), "{name}");
        }
        let events = rig.events();
        let resolve =
            |name: &str| events.iter().find(|e| e.kind == EventKind::Resolve && e.name.as_deref() == Some(name));
        assert!(resolve("svc.agentd.test").is_some_and(|e| e.allowed), "{events:?}");
        assert!(resolve("meta.agentd.test").is_some_and(|e| !e.allowed && e.withheld[0].contains("link-local")));
        assert!(resolve("other.agentd.test").is_some_and(|e| !e.allowed));
        // The resolved address is reachable on the name's port, and recorded with its name.
        let mut s = rig.inside(|| TcpStream::connect(public)).expect("by name");
        assert_eq!(rig.round_trip(&mut s, b"named").expect("echo"), b"named");
        drop(s);
        rig.until("the named connection's record", |n| n.events.iter().any(|e| e.to == Some(public)));
        let e = rig.events().into_iter().find(|e| e.to == Some(public)).expect("record");
        assert_eq!(e.name.as_deref(), Some("svc.agentd.test"));

        // The proxy: CONNECT to a granted name works; others get 403.
        let proxy = |rig: &mut Rig, target: &str| -> (String, TcpStream) {
            let mut s = rig.inside(|| TcpStream::connect("127.0.0.1:3128")).expect("proxy");
            s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes()).expect("head");
            s.set_nonblocking(true).expect("nb");
            let mut head = Vec::new();
            rig.until("the proxy's answer", |_| {
                let mut b = [0u8; 512];
                if let Ok(n) = s.read(&mut b) {
                    head.extend_from_slice(&b[..n]);
                }
                proxy::head_end(&head).is_some()
            });
            (String::from_utf8_lossy(&head).into_owned(), s)
        };
        let (status, mut s) = proxy(&mut rig, &format!("svc.agentd.test:{q}"));
        assert!(status.starts_with("HTTP/1.1 200"), "{status}");
        assert_eq!(rig.round_trip(&mut s, b"tunnel").expect("echo"), b"tunnel");
        for target in
            [format!("other.agentd.test:{q}"), format!("meta.agentd.test:{q}"), format!("svc.agentd.test:{p}")]
        {
            let (status, _) = proxy(&mut rig, &target);
            assert!(status.starts_with("HTTP/1.1 403"), "{target}: {status}");
        }

        // A bind grant: a client on the host reaches the tool's listener inside.
        let tool = rig.inside(|| TcpListener::bind(bind.as_str())).expect("the tool listens");
        let mut client = TcpStream::connect(bind.as_str()).expect("the host side listens");
        client.set_nonblocking(true).expect("nb");
        let mut accepted = None;
        tool.set_nonblocking(true).expect("nb");
        rig.until("the tool accepts", |_| {
            if let Ok((s, _)) = tool.accept() {
                accepted = Some(s);
            }
            accepted.is_some()
        });
        let mut accepted = accepted.expect("accepted");
        accepted.write_all(b"from the tool").expect("write");
        let mut got = Vec::new();
        rig.until("the client reads", |_| {
            let mut b = [0u8; 64];
            if let Ok(n) = client.read(&mut b) {
                got.extend_from_slice(&b[..n]);
            }
            got == b"from the tool"
        });

        // This host's own addresses are not reached by a name (or `*:PORT`).
        assert_eq!(rig.ask("own.agentd.test", RecordType::A), (ResponseCode::NXDomain, vec![]));
        let events = rig.events();
        let own = events.iter().find(|e| e.name.as_deref() == Some("own.agentd.test")).expect("own record");
        assert!(!own.allowed && own.withheld[0].contains("this host's own"), "{own:?}");

        // A tool that asks for name after name is recorded for the first 1024; the rest are
        // counted in one record at the end.
        for i in 0..(MAX_REFUSALS + 100) {
            let sock = rig.inside(|| UdpSocket::bind("127.0.0.1:0").expect("udp"));
            let mut m = Message::new();
            m.set_id(1).set_message_type(MessageType::Query).set_op_code(OpCode::Query);
            m.add_query(Query::query(Name::from_ascii(format!("n{i}.flood.test.")).expect("name"), RecordType::A));
            sock.send_to(&m.to_vec().expect("encode"), "127.0.0.1:53").expect("send");
            if i % 64 == 0 {
                rig.net.progress();
            }
        }
        rig.net.progress();
        let flood =
            rig.events().iter().filter(|e| e.name.as_deref().is_some_and(|n| n.ends_with(".flood.test"))).count();
        assert!(flood <= MAX_REFUSALS, "{flood} records of refused names");

        // A destination that never reads, and a tool that fills the way and then resets: the
        // loop sleeps rather than wake on a socket it cannot read.
        let mut stalled = rig.inside(|| TcpStream::connect(("127.0.0.1", held_port))).expect("connect");
        stalled.set_nonblocking(true).expect("nb");
        let chunk = vec![7u8; 1 << 20];
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let _ = stalled.write(&chunk);
            rig.net.progress();
        }
        let _ = nix::sys::socket::setsockopt(
            &stalled,
            nix::sys::socket::sockopt::Linger,
            &libc::linger { l_onoff: 1, l_linger: 0 },
        );
        drop(stalled);
        let mut wakeups = 0;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            let mut fds = rig.net.pollfds();
            if sys::poll(&mut fds, 100).expect("poll") > 0 {
                wakeups += 1;
            }
            rig.net.progress();
        }
        assert!(wakeups < 20, "agentd woke {wakeups} times in 500 ms with nothing to move");

        // Autobind: a listener the tool never bound takes a port of its namespace only.
        let auto = rig.inside(|| {
            let s = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::empty(),
                None,
            )
            .expect("socket");
            nix::sys::socket::listen(&s, nix::sys::socket::Backlog::new(8).expect("backlog")).expect("listen");
            let at: nix::sys::socket::SockaddrIn = nix::sys::socket::getsockname(s.as_raw_fd()).expect("name");
            (s, at.port())
        });
        assert!(TcpStream::connect(("127.0.0.1", auto.1)).is_err(), "an autobound port reached from the host");
        let events = rig.net.close();
        assert!(events.iter().any(|e| e.kind == EventKind::Inbound && e.allowed), "{events:?}");
        let counted =
            events.iter().find(|e| e.error.as_deref().is_some_and(|w| w.contains("past the"))).expect("count");
        assert!(counted.repeated >= 100, "{counted:?}");
    })
    .join()
    .expect("the namespace thread");
}
