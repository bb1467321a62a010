//! What agentd sets up inside a call's network namespace before the call is born into it:
//! every address routed to loopback, a listener on each granted port, the DNS stub and the
//! proxy.

use std::net::{Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, OwnedFd};

use agentd_policy::NetworkPlan;
use nix::sys::socket::{self as so, sockopt, AddressFamily, SockFlag, SockType};

use crate::{sys, NetError};

/// What agentd sets up inside the call's namespace, before the call is born into it.
#[derive(Debug)]
pub struct Inside {
    pub(crate) listeners: Vec<TcpListener>,
    pub(crate) dns: Option<UdpSocket>,
    pub(crate) proxy: Option<TcpListener>,
    pub(crate) ns: OwnedFd,
}

impl Inside {
    /// Sets up the current network namespace (the call's, entered by the caller): every
    /// address routed to loopback, a listener on each granted port, the DNS stub and the
    /// proxy.
    pub fn setup(plan: &NetworkPlan) -> Result<Inside, NetError> {
        sys::route_everything_to_loopback().map_err(NetError::Namespace)?;
        let mut listeners = Vec::new();
        for port in &plan.connect_ports {
            let l = listen_any(*port).map_err(|source| NetError::Listen { at: any(*port), source })?;
            listeners.push(l);
        }
        let dns = match plan.dns {
            Some(at) => Some(udp_any(at.port()).map_err(|source| NetError::Listen { at, source })?),
            None => None,
        };
        let proxy = match plan.proxy {
            Some(at) => Some(listen_at(at).map_err(|source| NetError::Listen { at, source })?),
            None => None,
        };
        let ns = sys::current_netns().map_err(NetError::Namespace)?;
        Ok(Inside { listeners, dns, proxy, ns })
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port)
}

/// A dual-stack listener on every address of `port` (IPv4 only where the kernel has no IPv6).
fn listen_any(port: u16) -> std::io::Result<TcpListener> {
    match dual_stack(SockType::Stream, port) {
        Ok(fd) => {
            so::listen(&fd, so::Backlog::new(1024).unwrap_or(so::Backlog::MAXCONN))?;
            Ok(TcpListener::from(fd))
        }
        Err(nix::errno::Errno::EAFNOSUPPORT) => listen_at(SocketAddr::new([0, 0, 0, 0].into(), port)),
        Err(e) => Err(e.into()),
    }
}

fn udp_any(port: u16) -> std::io::Result<UdpSocket> {
    match dual_stack(SockType::Datagram, port) {
        Ok(fd) => Ok(UdpSocket::from(fd)),
        Err(nix::errno::Errno::EAFNOSUPPORT) => {
            let s = UdpSocket::bind(SocketAddr::new([0, 0, 0, 0].into(), port))?;
            s.set_nonblocking(true)?;
            Ok(s)
        }
        Err(e) => Err(e.into()),
    }
}

fn dual_stack(ty: SockType, port: u16) -> nix::Result<OwnedFd> {
    let fd = so::socket(AddressFamily::Inet6, ty, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?;
    so::setsockopt(&fd, sockopt::Ipv6V6Only, &false)?;
    so::bind(fd.as_raw_fd(), &so::SockaddrIn6::from(std::net::SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)))?;
    Ok(fd)
}

pub(crate) fn listen_at(at: SocketAddr) -> std::io::Result<TcpListener> {
    let l = TcpListener::bind(at)?;
    l.set_nonblocking(true)?;
    Ok(l)
}
