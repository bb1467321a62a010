//! Exact `host:port` grants, shared by the fallback's cgroup socket programs and the LSM
//! `socket_connect`/`socket_bind` hooks.

use agentd_ebpf_common::{
    CallInfo, NetKey, AUDIT_ONLY, CALL_NET_RULES, EV_BIND, EV_CONNECT, MODE_ENFORCE, NET_BIND, NET_CONNECT, NET_SEND,
    VERDICT_ALLOWED, VERDICT_DENIED,
};
use aya_ebpf::bindings::bpf_sock_addr;
use aya_ebpf::macros::cgroup_sock_addr;
use aya_ebpf::programs::SockAddrContext;

use crate::{current_call, reserve, submit, NET_ALLOW};

/// One socket operation to decide.
pub struct Attempt {
    /// `NET_CONNECT` or `NET_BIND`.
    pub op: u32,
    /// AF_INET or AF_INET6.
    pub family: u16,
    /// Host byte order.
    pub port: u16,
    /// IPv4 in the first 4 bytes, or IPv6.
    pub addr: [u8; 16],
    /// SOCK_STREAM, SOCK_DGRAM, SOCK_RAW... (0 when unknown).
    pub sock_type: u32,
    /// `FROM_LSM` or 0.
    pub info: u32,
    /// A datagram sent to an address (checked against the connect grants).
    pub send: bool,
}

/// Whether the call may do `a`; records the attempt. Returns whether to let it happen.
pub fn check(cgid: u64, info: &CallInfo, a: &Attempt) -> bool {
    let mut key =
        NetKey { cgroup_id: cgid, op: a.op, family: a.family, port: a.port, addr: a.addr, ..NetKey::default() };
    // SAFETY: lookups copy nothing out.
    let exact = unsafe { NET_ALLOW.get(&key) }.is_some();
    let allowed = exact || {
        key.addr = [0; 16];
        key.any_addr = 1;
        // SAFETY: as above.
        unsafe { NET_ALLOW.get(&key) }.is_some()
    };
    let enforce = info.mode == MODE_ENFORCE;
    let kind = if a.op == NET_BIND { EV_BIND } else { EV_CONNECT };
    if let Some(mut entry) = reserve(cgid, info.ring, kind, if allowed { VERDICT_ALLOWED } else { VERDICT_DENIED }) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` is the reserved record.
        unsafe {
            (*ev).flags = if a.send { NET_SEND } else { a.op };
            (*ev).family = a.family;
            (*ev).port = a.port;
            (*ev).addr = a.addr;
            (*ev).sock_type = a.sock_type;
            (*ev).info = a.info | if !allowed && !enforce { AUDIT_ONLY } else { 0 };
        }
        submit(entry);
    }
    allowed || !enforce
}

fn sock_addr(ctx: &SockAddrContext, op: u32, v6: bool, send: bool) -> i32 {
    // These programs are attached to agentd's parent cgroup: every task below it belongs to a
    // call. One that is not registered (yet, or any more) gets nothing: fail closed.
    let Some((cgid, info)) = current_call() else { return 0 };
    if info.flags & CALL_NET_RULES == 0 {
        // No network granted: the call has its own empty namespace; Landlock denies TCP.
        return 1;
    }
    let sa: *const bpf_sock_addr = ctx.sock_addr;
    let mut a = Attempt { op, family: 0, port: 0, addr: [0; 16], sock_type: 0, info: 0, send };
    // SAFETY: the context pointer is valid for this program run; fields are read as the
    // verifier allows (u32 loads).
    unsafe {
        a.family = (*sa).user_family as u16;
        a.port = u16::from_be((*sa).user_port as u16);
        a.sock_type = (*sa).type_;
        if v6 {
            for i in 0..4 {
                let w = (*sa).user_ip6[i].to_ne_bytes();
                a.addr[i * 4..i * 4 + 4].copy_from_slice(&w);
            }
        } else {
            a.addr[..4].copy_from_slice(&(*sa).user_ip4.to_ne_bytes());
        }
    }
    i32::from(check(cgid, &info, &a))
}

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, true, false)
}

#[cgroup_sock_addr(bind4)]
pub fn bind4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_BIND, false, false)
}

#[cgroup_sock_addr(bind6)]
pub fn bind6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_BIND, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_addr(&ctx, NET_CONNECT, true, true)
}
