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
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostAddr {
    /// Exactly this address.
    Ip(IpAddr),
    /// Every address of this range (`10.0.0.0/8:5432`, `[fd00::/8]:443`): how a manifest
    /// grants loopback, link-local or private addresses wholesale, and names resolving there.
    Range(ipnet::IpNet),
    /// A host name, or a `*.` wildcard under one; resolved by agentd, never by the tool.
    Name(DomainName),
    /// Any public address (`*:PORT`): only the port is restricted. Loopback, link-local,
    /// private and other special ranges are reached only through grants that name them.
    Any,
}

/// A `host:port` network grant: `127.0.0.1:8080`, `[::1]:53`, `10.0.0.0/8:5432`,
/// `api.example.com:443`, `*.pypi.example:443` or `*:443`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HostPort {
    /// The address part.
    pub addr: HostAddr,
    /// The port part.
    pub port: Port,
}

impl HostPort {
    /// Parses `IPV4:PORT`, `[IPV6]:PORT`, `IPV4/LEN:PORT`, `[IPV6/LEN]:PORT`, `NAME:PORT`,
    /// `*.NAME:PORT` or `*:PORT`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (host, port) = raw.rsplit_once(':').ok_or_else(|| {
            format!("{raw:?} is not host:port (e.g. \"127.0.0.1:8080\", \"[::1]:8080\" or \"api.example.com:443\")")
        })?;
        let port: i64 = port.parse().map_err(|_| format!("{raw:?}: port {port:?} is not a number"))?;
        let port = Port::new(port).map_err(|e| format!("{raw:?}: {e}"))?;
        let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
        let addr = if host == "*" {
            HostAddr::Any
        } else if let Some(v6) = bare {
            match v6.split_once('/') {
                Some(_) => range(raw, v6, true)?,
                None => HostAddr::Ip(v6.parse().map_err(|_| format!("{raw:?}: {v6:?} is not an IPv6 address"))?),
            }
        } else if host.contains(':') {
            return Err(format!("{raw:?}: write IPv6 addresses in brackets, e.g. \"[::1]:8080\""));
        } else if host.contains('/') {
            range(raw, host, false)?
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostAddr::Ip(ip)
        } else {
            HostAddr::Name(DomainName::parse(host).map_err(|e| format!("{raw:?}: {e}"))?)
        };
        Ok(Self { addr, port })
    }

    /// Whether this grant is for a name (resolved by agentd).
    pub fn is_name(&self) -> bool {
        matches!(self.addr, HostAddr::Name(_))
    }
}

/// Parses `ADDR/LEN` (IPv6 only where `v6`), refusing host bits past the prefix, which
/// would leave the author's intent unclear. A full-length prefix is the address itself.
fn range(raw: &str, text: &str, v6: bool) -> Result<HostAddr, String> {
    let net: ipnet::IpNet =
        text.parse().map_err(|_| format!("{raw:?}: {text:?} is not an address range (ADDR/LEN)"))?;
    if net.addr().is_ipv6() != v6 {
        return Err(format!("{raw:?}: IPv6 ranges go in brackets (\"[fd00::/8]:443\"), IPv4 ones do not"));
    }
    if net.trunc() != net {
        return Err(format!("{raw:?}: {text} has bits set past its prefix; write {}", net.trunc()));
    }
    Ok(if net.prefix_len() == net.max_prefix_len() { HostAddr::Ip(net.addr()) } else { HostAddr::Range(net) })
}

/// A host name in a grant: exact (`api.example.com`), or every name strictly under a domain
/// (`*.example.com`).
///
/// The wildcard rule: `*.example.com` matches `a.example.com` and `a.b.example.com`, never
/// `example.com` itself (grant that separately), never `badexample.com`. Names compare in
/// lower case, without a trailing dot. A wildcard needs at least two labels after `*.`
/// (`*.com` is refused), and `*` anywhere but the whole first label is refused.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainName {
    /// Whether this is `*.base`.
    pub wildcard: bool,
    /// The name, or for a wildcard the domain under which names match.
    pub base: String,
}

impl DomainName {
    /// Checks a name as written in a grant.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let (wildcard, rest) = match raw.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, raw),
        };
        let base = normalize_name(rest).map_err(|e| format!("{raw:?} is not a host name: {e}"))?;
        if wildcard && !base.contains('.') {
            return Err(format!(
                "{raw:?}: a wildcard needs at least two labels after \"*.\" (it would match a whole top-level domain)"
            ));
        }
        Ok(Self { wildcard, base })
    }

    /// Whether `name` (as a client asks for it) is covered.
    pub fn matches(&self, name: &str) -> bool {
        let Ok(name) = normalize_name(name) else { return false };
        if !self.wildcard {
            return name == self.base;
        }
        name.strip_suffix(&self.base).and_then(|head| head.strip_suffix('.')).is_some_and(|head| !head.is_empty())
    }
}

/// Lower-cases `name` and drops one trailing dot, checking it is a DNS host name: labels of
/// 1 to 63 letters, digits and inner hyphens (`_` too, which some services use), at most 253
/// bytes, and a last label that is not all digits (so that it cannot pass for an address).
pub fn normalize_name(name: &str) -> Result<String, String> {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err("a host name has 1 to 253 characters".into());
    }
    for label in name.split('.') {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if label.is_empty() || label.len() > 63 || !label.chars().all(ok_char) {
            return Err(format!("label {label:?}: labels are 1 to 63 letters, digits, '-' or '_' (write international names in punycode)"));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with '-'"));
        }
    }
    if name.rsplit('.').next().is_some_and(|l| l.chars().all(|c| c.is_ascii_digit())) {
        return Err("its last label is a number (write addresses as addresses)".into());
    }
    Ok(name)
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.addr {
            HostAddr::Any => write!(f, "*:{}", self.port.0),
            HostAddr::Ip(IpAddr::V4(ip)) => write!(f, "{ip}:{}", self.port.0),
            HostAddr::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port.0),
            HostAddr::Range(n @ ipnet::IpNet::V4(_)) => write!(f, "{n}:{}", self.port.0),
            HostAddr::Range(n @ ipnet::IpNet::V6(_)) => write!(f, "[{n}]:{}", self.port.0),
            HostAddr::Name(n) => write!(f, "{n}:{}", self.port.0),
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
        let ok = [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:53", "[::1]:53"),
            ("*:443", "*:443"),
            ("10.0.0.0/8:5432", "10.0.0.0/8:5432"),
            ("[fd00::/8]:443", "[fd00::/8]:443"),
            ("10.1.2.3/32:80", "10.1.2.3:80"),
            ("Api.Example.COM.:443", "api.example.com:443"),
            ("*.pypi.example:443", "*.pypi.example:443"),
        ];
        for (raw, shown) in ok {
            assert_eq!(HostPort::parse(raw).map(|h| h.to_string()), Ok(shown.to_string()));
        }
        let bad = [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:65536",
            "::1:80",
            "10.1.2.3/8:80",
            "[10.0.0.0/8]:80",
            "fd00::/8:80",
            "*.com:443",
            "a.*.example.com:443",
            "*example.com:443",
            "-x.example.com:443",
            "a..b:443",
            "1.2.3.4.5:80",
            "caf\u{e9}.example:443",
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
    fn wildcards_match_strictly_below_their_domain() {
        let w = DomainName::parse("*.pypi.example").expect("parse");
        for yes in ["files.pypi.example", "a.b.pypi.example", "FILES.PYPI.EXAMPLE."] {
            assert!(w.matches(yes), "{yes}");
        }
        for no in ["pypi.example", "evilpypi.example", "pypi.example.evil", "x.pypi.example.evil", "", "."] {
            assert!(!w.matches(no), "{no}");
        }
        let exact = DomainName::parse("api.example.com").expect("parse");
        assert!(exact.matches("API.example.com.") && !exact.matches("x.api.example.com"));
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
