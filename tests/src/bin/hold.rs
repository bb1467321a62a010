//! A hostile client for the daemon's tests: `hold SOCKET COUNT PREFIX [PAD [DRIP_SECS]]` opens
//! COUNT connections to SOCKET, writes PREFIX (with `\r\n` written as such) and then up to PAD
//! bytes of `x` to each, without ever blocking, then for DRIP_SECS writes one byte at a time to
//! each in turn as fast as they take them, prints `ready N` and waits for a line on stdin.
//! Then it reads what the daemon sent on each connection, for up to a second, and prints one
//! JSON line: how many connected, the status of each answer (`"403": 12`), how many were
//! closed with no answer and how many are still open with none.
//!
//! `hold SOCKET storm SECS` connects and hangs up as fast as it can, from four threads, for
//! SECS seconds: enough to keep the socket's backlog full.
//!
//! The tests run it under another uid, to be the local user with no role or a role holder.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, socket, mode, secs] = args.as_slice() {
        if mode == "storm" {
            storm(socket, secs.parse().expect("SECS"));
            return;
        }
    }
    let [_, socket, count, prefix, rest @ ..] = args.as_slice() else {
        eprintln!("usage: hold SOCKET COUNT PREFIX [PAD]");
        std::process::exit(2);
    };
    let count: usize = count.parse().expect("COUNT");
    let pad: usize = rest.first().map_or(0, |p| p.parse().expect("PAD"));
    let drip: f64 = rest.get(1).map_or(0.0, |d| d.parse().expect("DRIP_SECS"));
    let prefix = prefix.replace("\\r\\n", "\r\n");
    raise_nofile();
    let mut conns = Vec::new();
    let mut failed = 0usize;
    let mut written = 0usize;
    let filler = vec![b'x'; 64 * 1024];
    for _ in 0..count {
        let Ok(mut s) = UnixStream::connect(socket) else {
            failed += 1;
            continue;
        };
        s.set_nonblocking(true).expect("nonblocking");
        written += write_some(&mut s, prefix.as_bytes());
        let mut left = pad;
        while left > 0 {
            let n = write_some(&mut s, &filler[..left.min(filler.len())]);
            written += n;
            if n == 0 {
                break;
            }
            left -= n;
        }
        conns.push(s);
    }
    let until = Instant::now() + Duration::from_secs_f64(drip);
    while Instant::now() < until {
        for s in &mut conns {
            written += write_some(s, b"x");
        }
    }
    println!("ready {}", conns.len());
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    let mut status: BTreeMap<String, usize> = BTreeMap::new();
    let (mut closed, mut open) = (0usize, 0usize);
    let mut bodies = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    for mut s in conns {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let eof = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > until || !got.is_empty() {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => break true,
            }
        };
        let text = String::from_utf8_lossy(&got).into_owned();
        match text.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)) {
            Some(code) => {
                *status.entry(code.to_string()).or_default() += 1;
                if bodies.len() < 3 {
                    bodies.push(text.split("\r\n\r\n").nth(1).unwrap_or_default().to_string());
                }
            }
            None if eof => closed += 1,
            None => open += 1,
        }
    }
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::json!({ "connected": count - failed, "connect_failed": failed, "written": written,
                            "status": status, "closed": closed, "open": open, "bodies": bodies })
    );
}

fn storm(socket: &str, secs: f64) {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let socket = socket.to_string();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < until {
                    if let Ok(s) = UnixStream::connect(&socket) {
                        let _ = s.set_nonblocking(true);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let n: u64 = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
    let _ = writeln!(std::io::stdout(), "{n}");
}

/// Writes what the socket takes now; 0 when it takes nothing.
fn write_some(s: &mut UnixStream, data: &[u8]) -> usize {
    s.write(data).unwrap_or_default()
}

fn raise_nofile() {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}
