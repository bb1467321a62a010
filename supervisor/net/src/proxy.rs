//! The in-namespace HTTP proxy's request head: `CONNECT host:port` for tunnels (HTTPS and
//! anything else), or an absolute-form request (`GET http://host/path`) for plain HTTP.

/// The longest request head agentd reads.
pub const MAX_HEAD: usize = 8 * 1024;

/// What the client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The host as written (a name, an IPv4 address, or an IPv6 one without brackets).
    pub host: String,
    /// The port.
    pub port: u16,
    /// A tunnel: answer `200` once connected, then relay.
    pub tunnel: bool,
    /// For plain HTTP, the head to send on with an origin-form target; for a tunnel, what the
    /// client sent after its head (sent on once connected).
    pub forward: Vec<u8>,
}

/// Where the head ends in `buf`, if it has.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// Parses a complete head (`buf[..end]`, with whatever followed it). The error is the
/// status line's reason.
pub fn parse(buf: &[u8], end: usize) -> Result<Request, &'static str> {
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "request head is not UTF-8")?;
    let (line, rest) = head.split_once("\r\n").ok_or("no request line")?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        return Err("only HTTP/1.x");
    }
    if method == "CONNECT" {
        let (host, port) = split_authority(target, None)?;
        return Ok(Request { host, port, tunnel: true, forward: buf[end..].to_vec() });
    }
    let after =
        target.strip_prefix("http://").ok_or("plain requests need an absolute http:// URL; use CONNECT for others")?;
    let (authority, path) = match after.find('/') {
        Some(i) => (&after[..i], &after[i..]),
        None => (after, "/"),
    };
    if authority.contains('@') {
        return Err("user information in the URL");
    }
    let (host, port) = split_authority(authority, Some(80))?;
    let mut forward = format!("{method} {path} {version}\r\n{rest}").into_bytes();
    forward.extend_from_slice(&buf[end..]);
    Ok(Request { host, port, tunnel: false, forward })
}

/// `host:port`, `[v6]:port`, or (with a default port) a bare host.
fn split_authority(a: &str, default_port: Option<u16>) -> Result<(String, u16), &'static str> {
    let (host, port) = if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed IPv6 bracket")?;
        (h, after.strip_prefix(':'))
    } else {
        match a.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (a, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or("bad port")?,
        None => default_port.ok_or("CONNECT needs host:port")?,
    };
    if host.is_empty() {
        return Err("no host");
    }
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let b = b"CONNECT api.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\nHELLO";
        let r = parse(b, head_end(b).expect("end")).expect("parse");
        assert_eq!(
            (r.host.as_str(), r.port, r.tunnel, r.forward.as_slice()),
            ("api.example.com", 443, true, &b"HELLO"[..])
        );
        let b = b"GET http://[::1]:8080/a?b HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n";
        let r = parse(b, head_end(b).expect("end")).expect("parse");
        assert_eq!((r.host.as_str(), r.port, r.tunnel), ("::1", 8080, false));
        assert!(r.forward.starts_with(b"GET /a?b HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n"));
        let b = b"GET http://example.com HTTP/1.0\r\n\r\n";
        let r = parse(b, head_end(b).expect("end")).expect("parse");
        assert_eq!((r.port, r.forward.as_slice()), (80, &b"GET / HTTP/1.0\r\n\r\n"[..]));
        for bad in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"CONNECT example.com HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            b"GET http://u:p@example.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT a b HTTP/1.1\r\n\r\n",
        ] {
            assert!(parse(bad, head_end(bad).expect("end")).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
