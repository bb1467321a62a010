//! `agentd-vm-tests tool ACTION ARGS...`: actions run inside a sandbox. Each prints one line
//! `ACTION=ok` or `ACTION=ERRNO_NAME` so tests can check the exact outcome.

use std::ffi::CString;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::AtFlags;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{execveat, write, Pid};

fn report(action: &str, r: Result<(), Errno>) {
    match r {
        Ok(()) => println!("{action}=ok"),
        Err(e) => println!("{action}={e:?}"),
    }
}

/// memfd_create, copy a real program in, execveat(AT_EMPTY_PATH): the fileless exec trick.
/// Tried with MFD_EXEC (0x10, which nix does not name) and with the default flags.
fn memfd_exec() {
    let program = std::fs::read("/usr/bin/busybox").unwrap_or_default();
    for (label, flags) in [("memfd_exec", MFdFlags::from_bits_retain(0x10)), ("memfd_default", MFdFlags::empty())] {
        let fd = match memfd_create(label, flags) {
            Ok(fd) => fd,
            Err(e) => {
                println!("{label}_create={e:?}");
                continue;
            }
        };
        println!("{label}_create=ok");
        let _ = write(fd.as_fd(), &program);
        let argv = [CString::new("true").unwrap_or_default()];
        let env: [CString; 0] = [];
        let r = execveat(fd.as_fd(), c"", &argv, &env, AtFlags::AT_EMPTY_PATH);
        // Only returns on failure.
        report(&format!("{label}_execveat"), r.map(|_| ()));
    }
}

fn connect(addr: &str) {
    let r = match addr.parse::<SocketAddr>() {
        Ok(sa) => TcpStream::connect_timeout(&sa, Duration::from_secs(3))
            .map(|_| ())
            .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))),
        Err(_) => Err(Errno::EINVAL),
    };
    report(&format!("connect {addr}"), r);
}

/// Connects to the Unix socket at `path` and reads its first line.
fn unix(path: &str) {
    use std::io::Read;
    let r = std::os::unix::net::UnixStream::connect(path)
        .and_then(|mut s| {
            let mut b = [0u8; 16];
            s.read(&mut b).map(drop)
        })
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    report(&format!("unix {path}"), r);
}

/// Listens on a Unix socket at `path` and connects to it from a second thread.
fn unix_own(path: &str) {
    let r = std::os::unix::net::UnixListener::bind(path).and_then(|l| {
        let p = path.to_string();
        let t = std::thread::spawn(move || std::os::unix::net::UnixStream::connect(p).map(drop));
        let accepted = l.accept().map(drop);
        t.join().unwrap_or_else(|_| Err(std::io::Error::other("panicked"))).and(accepted)
    });
    report(&format!("unix-own {path}"), r.map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0))));
}

fn signal(pid: &str) {
    let r = pid.parse::<i32>().map_err(|_| Errno::EINVAL).and_then(|p| kill(Pid::from_raw(p), Signal::SIGTERM));
    report("kill", r);
}

fn ptrace(pid: &str) {
    let r = pid.parse::<i32>().map_err(|_| Errno::EINVAL).and_then(|p| nix::sys::ptrace::attach(Pid::from_raw(p)));
    report("ptrace", r);
}

/// Allocates and touches `mib` MiB, one MiB at a time.
fn alloc(mib: &str) {
    let mut held: Vec<Vec<u8>> = Vec::new();
    for _ in 0..mib.parse::<usize>().unwrap_or(0) {
        held.push(vec![1u8; 1 << 20]);
    }
    println!("alloc={}MiB", held.len());
}

fn mount() {
    let r = nix::mount::mount(Some("none"), "/tmp", Some("tmpfs"), nix::mount::MsFlags::empty(), None::<&str>);
    report("mount", r);
}

/// Looks `name` up through the system resolver (the call's, which is agentd's stub).
fn resolve(name: &str) {
    use std::net::ToSocketAddrs;
    match (name, 80).to_socket_addrs() {
        Ok(addrs) => {
            let list: Vec<String> = addrs.map(|a| a.ip().to_string()).collect();
            println!("resolve {name}=ok {}", list.join(","));
        }
        Err(e) => println!("resolve {name}=failed {e}"),
    }
}

/// Connects to `host:port` (a name or an address) and prints the first line it sends.
fn fetch(target: &str) {
    use std::io::Read;
    use std::net::ToSocketAddrs;
    let r = target.to_socket_addrs().map_err(|e| e.to_string()).and_then(|mut a| {
        let at = a.next().ok_or("no address")?;
        let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(3)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(3))).map_err(|e| e.to_string())?;
        let mut b = [0u8; 64];
        let n = s.read(&mut b).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&b[..n]).trim().to_string())
    });
    match r {
        Ok(text) => println!("fetch {target}=ok {text}"),
        Err(e) => println!("fetch {target}=failed {e}"),
    }
}

/// Listens on a socket it never bound (the kernel picks a port), writes the port to `file`,
/// and waits `secs` for the test to try reaching it from outside.
fn autobind(file: &str, secs: &str) {
    use nix::sys::socket::{getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn};
    use std::os::fd::AsRawFd;
    let r = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).and_then(|s| {
        listen(&s, Backlog::new(8).unwrap_or(Backlog::MAXCONN))?;
        let at: SockaddrIn = getsockname(s.as_raw_fd())?;
        Ok((s, at.port()))
    });
    match r {
        Ok((_s, port)) => {
            let _ = std::fs::write(file, port.to_string());
            println!("autobind=ok {port}");
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(3)));
        }
        Err(e) => report("autobind", Err(e)),
    }
}

/// Runs one action.
pub fn main(args: &[String]) -> ExitCode {
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "memfd-exec" => memfd_exec(),
        "connect" => args[1..].iter().for_each(|a| connect(a)),
        "unix" => args[1..].iter().for_each(|a| unix(a)),
        "unix-own" => unix_own(arg(1)),
        "kill" => signal(arg(1)),
        "ptrace" => ptrace(arg(1)),
        "mount" => mount(),
        "alloc" => alloc(arg(1)),
        "resolve" => args[1..].iter().for_each(|a| resolve(a)),
        "fetch" => args[1..].iter().for_each(|a| fetch(a)),
        "autobind" => autobind(arg(1), arg(2)),
        other => {
            eprintln!("unknown tool action {other:?}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}
