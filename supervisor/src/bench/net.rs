//! `agentd bench net`: a connection through agentd's network (a call's namespace, its
//! listener, the relay) against the same connection made directly, on loopback, interleaved
//! in one run: connect-to-first-byte latency and bulk throughput.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentd_net::{Inside, Network, ResolverConfig};
use agentd_policy::{HostPort, NetMode, NetworkPlan};
use agentd_sandbox::spawn::NetnsPool;
use serde::Serialize;

/// A server that answers one byte with one byte, for as many connections as come.
fn ping_server() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let at = l.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut b = [0u8; 1];
            if s.read_exact(&mut b).is_ok() {
                let _ = s.write_all(&b);
            }
        }
    });
    Ok(at)
}

/// A server that reads everything and then answers with the count (8 bytes).
fn sink_server() -> Result<SocketAddr, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let at = l.local_addr().map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                }
                let _ = s.write_all(&total.to_le_bytes());
            });
        }
    });
    Ok(at)
}

#[derive(Debug, Serialize)]
struct Latency {
    p50_us: f64,
    p99_us: f64,
}

#[derive(Debug, Serialize)]
struct Side {
    connect_first_byte: Latency,
    mb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    connections: usize,
    transfer_mib: usize,
    direct: Side,
    forwarded: Side,
    added_p50_ms: f64,
    added_p99_ms: f64,
    throughput_ratio: f64,
}

fn latency(mut v: Vec<Duration>) -> Latency {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    Latency { p50_us: at(0.5), p99_us: at(0.99) }
}

/// Where clients of the forwarded side are made: the call's namespace.
struct Sides<'a> {
    pool: &'a NetnsPool,
    ns: &'a OwnedFd,
}

impl Sides<'_> {
    fn connect(&self, forwarded: bool, to: SocketAddr) -> Result<TcpStream, String> {
        if !forwarded {
            return TcpStream::connect(to).map_err(|e| e.to_string());
        }
        self.pool.enter(self.ns.as_fd()).map_err(|e| e.to_string())?;
        let s = TcpStream::connect(to);
        self.pool.go_home();
        s.map_err(|e| e.to_string())
    }
}

fn ping(sides: &Sides<'_>, forwarded: bool, to: SocketAddr) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = sides.connect(forwarded, to)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(b"x").map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).map_err(|e| format!("no answer: {e}"))?;
    Ok(t.elapsed())
}

fn transfer(sides: &Sides<'_>, forwarded: bool, to: SocketAddr, mib: usize) -> Result<f64, String> {
    let chunk = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut s = sides.connect(forwarded, to)?;
    for _ in 0..mib {
        s.write_all(&chunk).map_err(|e| e.to_string())?;
    }
    s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count).map_err(|e| format!("no count: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let got = u64::from_le_bytes(count);
    if got != (mib as u64) << 20 {
        return Err(format!("{got} bytes arrived of {}", mib << 20));
    }
    Ok(mib as f64 * 1.048_576 / secs)
}

pub(crate) fn run(n: usize, mib: usize, json: bool) -> Result<(), String> {
    if nix::unistd::geteuid().as_raw() != 0 {
        return Err("needs root (it makes a network namespace)".into());
    }
    let (pinger, sink) = (ping_server()?, sink_server()?);
    let grants = [pinger, sink].map(|a| HostPort::parse(&a.to_string()).map_err(|e| e.to_string()));
    let [g1, g2] = grants;
    let plan = NetworkPlan {
        mode: NetMode::Forwarded,
        connect: vec![g1?, g2?],
        bind: Vec::new(),
        connect_ports: vec![pinger.port(), sink.port()],
        bind_ports: Vec::new(),
        dns: None,
        proxy: None,
        unix: Vec::new(),
    };
    let mut pool = NetnsPool::new().map_err(|e| e.to_string())?;
    let inside = pool.in_prepared(|| Inside::setup(&plan).map_err(std::io::Error::other)).map_err(|e| e.to_string())?;
    let ns = pool.take().ok_or("no namespace was prepared")?;
    let mut net = Network::new(&plan, inside, Arc::new(ResolverConfig::default())).map_err(|e| e.to_string())?;
    // agentd's side runs in a thread of its own, as the supervisor's loop would.
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let driver = std::thread::spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            let _ = net.wait(Duration::from_millis(20));
            net.progress();
            drop(net.take_events());
        }
    });
    let sides = Sides { pool: &pool, ns: &ns };
    let (mut direct, mut forwarded) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        // Interleaved, starting with either side in turn.
        for fw in if i % 2 == 0 { [false, true] } else { [true, false] } {
            let d = ping(&sides, fw, pinger)?;
            if fw { &mut forwarded } else { &mut direct }.push(d);
        }
        if !json && (i + 1) % (n / 10).max(1) == 0 {
            eprint!("\rconnections: {}/{n}", i + 1);
        }
    }
    if !json {
        eprintln!();
    }
    let (mut direct_mbs, mut forwarded_mbs) = (Vec::new(), Vec::new());
    for round in 0..3 {
        for fw in if round % 2 == 0 { [false, true] } else { [true, false] } {
            let v = transfer(&sides, fw, sink, mib)?;
            if fw { &mut forwarded_mbs } else { &mut direct_mbs }.push(v);
        }
        if !json {
            eprintln!("transfer round {}/3 done", round + 1);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = driver.join();
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let report = Report {
        connections: n,
        transfer_mib: mib,
        direct: Side { connect_first_byte: latency(direct), mb_per_s: best(&direct_mbs) },
        forwarded: Side { connect_first_byte: latency(forwarded), mb_per_s: best(&forwarded_mbs) },
        added_p50_ms: 0.0,
        added_p99_ms: 0.0,
        throughput_ratio: 0.0,
    };
    let report = Report {
        added_p50_ms: (report.forwarded.connect_first_byte.p50_us - report.direct.connect_first_byte.p50_us) / 1000.0,
        added_p99_ms: (report.forwarded.connect_first_byte.p99_us - report.direct.connect_first_byte.p99_us) / 1000.0,
        throughput_ratio: report.forwarded.mb_per_s / report.direct.mb_per_s,
        ..report
    };
    if json {
        outln!("{}", serde_json::to_string(&report).map_err(|e| e.to_string())?);
        return Ok(());
    }
    outln!("agentd bench net: {n} connections each way, interleaved; {mib} MiB x 3 each way (best shown)");
    outln!("  {:<12} {:>14} {:>14} {:>10}", "path", "p50 us", "p99 us", "MB/s");
    for (name, s) in [("direct", &report.direct), ("forwarded", &report.forwarded)] {
        let l = &s.connect_first_byte;
        outln!("  {:<12} {:>14.1} {:>14.1} {:>10.0}", name, l.p50_us, l.p99_us, s.mb_per_s);
    }
    outln!(
        "  added per connection: p50 {:.3} ms, p99 {:.3} ms (goal <= 0.2); throughput {:.0}% of direct (goal >= 80%)",
        report.added_p50_ms,
        report.added_p99_ms,
        report.throughput_ratio * 100.0
    );
    Ok(())
}
