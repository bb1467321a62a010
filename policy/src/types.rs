//! Validated newtypes: each one can only hold a value that passed its checks.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// An absolute path as written in a manifest: no `.`/`..` components, no NUL.
///
/// Canonicalisation against the host happens when a plan is compiled, not here.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct AbsPath(PathBuf);

/// Host trees a manifest may not grant: the sandbox gets its own `/proc` and a minimal `/dev`,
/// and `/sys` exposes the host kernel.
pub const RESERVED_TREES: [&str; 3] = ["/proc", "/sys", "/dev"];

impl AbsPath {
    /// Checks `raw` and wraps it. The error says what is wrong, for a diagnostic.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.contains('\0') {
            return Err("path contains a NUL byte".into());
        }
        let path = Path::new(raw);
        if !path.is_absolute() {
            return Err(format!("path {raw:?} is relative; paths must be absolute"));
        }
        if raw.split('/').any(|c| c == "." || c == "..") {
            return Err(format!("path {raw:?} contains '.' or '..'; write the path it means"));
        }
        let normal: PathBuf = path.components().collect();
        check_grantable(&normal)?;
        Ok(Self(normal))
    }

    /// Wraps a path that the caller has already canonicalised.
    pub fn from_canonical(path: PathBuf) -> Result<Self, String> {
        let s = path.to_str().ok_or_else(|| format!("path {path:?} is not UTF-8"))?;
        Self::parse(s)
    }

    /// The path.
    pub fn as_path(&self) -> &Path {
        &self.0
    }
}

fn check_grantable(path: &Path) -> Result<(), String> {
    if path == Path::new("/") {
        return Err("granting \"/\" would expose the whole host; list the directories the tool needs".into());
    }
    if path == Path::new("/tmp") {
        return Err("the sandbox's /tmp is its own tmpfs (limits.tmp_mb); grant a directory below /tmp instead".into());
    }
    for tree in RESERVED_TREES {
        if path.starts_with(tree) {
            return Err(format!(
                "{} is reserved: the sandbox gets its own /proc and a minimal /dev, and never the host's {tree}",
                path.display()
            ));
        }
    }
    Ok(())
}

impl fmt::Display for AbsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.display().fmt(f)
    }
}

/// A TCP/UDP port, 1 to 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Port(u16);

impl Port {
    /// Checks the range 1..=65535.
    pub fn new(port: i64) -> Result<Self, String> {
        match u16::try_from(port) {
            Ok(p) if p != 0 => Ok(Self(p)),
            _ => Err(format!("port {port} is out of range 1..=65535")),
        }
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Which addresses a network grant covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostAddr {
    /// Exactly this address.
    Ip(IpAddr),
    /// Any address (`*:PORT`): only the port is restricted.
    Any,
}

/// A `host:port` network grant: `127.0.0.1:8080`, `[::1]:53` or `*:443`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// The address part.
    pub addr: HostAddr,
    /// The port part.
    pub port: Port,
}

impl HostPort {
    /// Parses `IPV4:PORT`, `[IPV6]:PORT` or `*:PORT`. Host names are refused: a policy
    /// must not depend on DNS answers.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (host, port) = raw
            .rsplit_once(':')
            .ok_or_else(|| format!("{raw:?} is not host:port (e.g. \"127.0.0.1:8080\" or \"[::1]:8080\")"))?;
        let port: i64 = port.parse().map_err(|_| format!("{raw:?}: port {port:?} is not a number"))?;
        let port = Port::new(port).map_err(|e| format!("{raw:?}: {e}"))?;
        let addr = if host == "*" {
            HostAddr::Any
        } else {
            let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
            let ip: IpAddr = match bare {
                Some(v6) => v6.parse().map_err(|_| format!("{raw:?}: {v6:?} is not an IPv6 address"))?,
                None => host.parse().map_err(|_| {
                    format!(
                        "{raw:?}: {host:?} is not an IP address (host names are not allowed; IPv6 goes in brackets)"
                    )
                })?,
            };
            if matches!(ip, IpAddr::V6(_)) && bare.is_none() {
                return Err(format!("{raw:?}: write IPv6 addresses in brackets, e.g. \"[::1]:8080\""));
            }
            HostAddr::Ip(ip)
        };
        Ok(Self { addr, port })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            HostAddr::Any => write!(f, "*:{}", self.port.0),
            HostAddr::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port.0),
            HostAddr::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port.0),
        }
    }
}

impl Serialize for HostPort {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A name of a tool, agent or call argument: a letter, then letters, digits, `_` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    /// Checks the character set and a length of 1 to 64.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars();
        let ok = raw.len() <= 64
            && chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(Self(raw.to_string()))
        } else {
            Err(format!(
                "{raw:?} is not a valid name: start with a letter, then letters, digits, '_' or '-', at most 64"
            ))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct EnvName(String);

impl EnvName {
    /// Checks the POSIX portable character set.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut chars = raw.chars();
        let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
        if ok {
            Ok(Self(raw.to_string()))
        } else {
            Err(format!("{raw:?} is not a valid environment variable name"))
        }
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abs_path_table() {
        let ok = ["/usr", "/data/x", "/usr//lib/"];
        for p in ok {
            assert!(AbsPath::parse(p).is_ok(), "{p}");
        }
        assert_eq!(AbsPath::parse("/usr//lib/").map(|p| p.to_string()), Ok("/usr/lib".into()));
        let bad = [
            "usr",
            "",
            "/",
            "/tmp",
            "/tmp/",
            "/usr/../etc",
            "/./x",
            "/proc",
            "/proc/1",
            "/sys/x",
            "/dev",
            "/a\0b",
            "//",
        ];
        for p in bad {
            assert!(AbsPath::parse(p).is_err(), "{p:?} should be refused");
        }
        assert!(AbsPath::parse("/devices").is_ok(), "only the /dev tree itself is reserved");
    }

    #[test]
    fn host_port_table() {
        let ok = [("127.0.0.1:8080", "127.0.0.1:8080"), ("[::1]:53", "[::1]:53"), ("*:443", "*:443")];
        for (raw, shown) in ok {
            assert_eq!(HostPort::parse(raw).map(|h| h.to_string()), Ok(shown.to_string()));
        }
        let bad = [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "example.com:80",
            "::1:80",
            "[::1:80",
            ":80",
            "1.2.3.4:-1",
            "1.2.3.4:x",
        ];
        for raw in bad {
            assert!(HostPort::parse(raw).is_err(), "{raw} should be refused");
        }
    }

    #[test]
    fn names() {
        assert!(Name::parse("shell_2-x").is_ok());
        for bad in ["", "2x", "a b", "a.b", &"x".repeat(65)] {
            assert!(Name::parse(bad).is_err(), "{bad}");
        }
        assert!(EnvName::parse("_PATH1").is_ok());
        assert!(EnvName::parse("A=B").is_err());
    }
}
