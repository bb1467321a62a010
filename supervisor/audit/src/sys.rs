//! The audit crate's syscall seam: every `unsafe` block of the crate lives here, each with a
//! SAFETY line: the BPF ring buffer's mapping, `bpf(2)` commands aya does not offer, mounting
//! bpffs and securityfs, and file locks.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;

use libc::c_int;

/// A reader of a BPF ring buffer map, consuming records in place (as libbpf does).
///
/// Written here rather than with `aya::maps::RingBuf`: reopened from a pin in a second
/// process, aya 0.13's reader kept returning records without reaching the producer position
/// (spinning forever); the protocol is small and fixed by the kernel ABI.
#[derive(Debug)]
pub struct Ring {
    consumer: *mut u8,
    producer: *const u8,
    page: usize,
    size: usize,
    _fd: OwnedFd,
    /// An epoll set holding the map edge-triggered: ready only after the programs woke their
    /// readers (see [`Ring::wake_fd`]).
    wake: OwnedFd,
}

impl Ring {
    /// Maps the ring buffer map `fd` of `size` bytes (a power of two multiple of the page).
    pub fn open(fd: OwnedFd, size: usize) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // SAFETY: mapping the consumer page of a ring buffer map read-write, as the kernel allows.
        let consumer = unsafe {
            libc::mmap(ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd.as_raw_fd(), 0)
        };
        if consumer == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: mapping the producer page and the data pages (mapped twice by the kernel, so
        // records that wrap are contiguous) read-only, at the offset the ABI fixes.
        let producer = unsafe {
            libc::mmap(
                ptr::null_mut(),
                page + 2 * size,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                page as libc::off_t,
            )
        };
        if producer == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping what was mapped just above.
            unsafe { libc::munmap(consumer, page) };
            return Err(e);
        }
        // Keep the ring out of every child: it is 2 * size bytes of pages mapped one by one,
        // which fork would otherwise copy entry by entry into each sandbox's init (and unmap
        // again at its exit), and a sandbox has no business holding agentd's event stream.
        for (addr, len) in [(consumer, page), (producer, page + 2 * size)] {
            // SAFETY: advising on exactly a mapping made above; MADV_DONTFORK changes no data.
            // Failing only costs the copying, so the result is not needed.
            unsafe { libc::madvise(addr, len, libc::MADV_DONTFORK) };
        }
        match edge_triggered(fd.as_raw_fd()) {
            Ok(wake) => Ok(Self { consumer: consumer.cast(), producer: producer.cast(), page, size, _fd: fd, wake }),
            Err(e) => {
                // SAFETY: unmapping exactly the two mappings made above, used by nothing else.
                unsafe {
                    libc::munmap(consumer, page);
                    libc::munmap(producer, page + 2 * size);
                }
                Err(e)
            }
        }
    }

    /// An fd to poll that is ready when the programs woke their readers (a record that
    /// crossed an eighth of the ring, a hint other CPUs' reservations can make them skip; or
    /// a ring half full, for every record), not whenever a record is waiting: the
    /// map's own fd polls ready as long as one record is unread, which kept a busy tool's
    /// supervisor waking to read a handful of records at a time, several thousand times a
    /// second. The supervisor reads on its own tick otherwise. [`Ring::consume`] rearms it.
    pub fn wake_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Hands up to `limit` committed records to `f`, consuming them. Returns how many.
    pub fn consume(&mut self, limit: usize, mut f: impl FnMut(&[u8])) -> usize {
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        const BUSY: u32 = 1 << 31;
        const DISCARD: u32 = 1 << 30;
        const HDR: u64 = 8;
        // SAFETY: both positions are naturally aligned u64s at the start of their pages, which
        // stay mapped for as long as self lives; the kernel updates the producer atomically.
        let (cons_pos, prod_pos) =
            unsafe { (&*self.consumer.cast::<AtomicU64>(), &*self.producer.cast::<AtomicU64>()) };
        let data = self.producer.wrapping_add(self.page);
        let mask = (self.size as u64) - 1;
        // Rearm the wakeup before reading: one that comes while this reads is kept.
        let mut ready = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: `ready` is one writable epoll_event; a zero timeout never blocks. A failure
        // leaves the wakeup armed: one early wakeup more, none missed.
        unsafe { libc::epoll_wait(self.wake.as_raw_fd(), &mut ready, 1, 0) };
        let mut cons = cons_pos.load(Ordering::Acquire);
        let mut n = 0;
        while n < limit {
            let prod = prod_pos.load(Ordering::Acquire);
            if cons >= prod {
                break;
            }
            let off = usize::try_from(cons & mask).unwrap_or(0);
            // SAFETY: off < size, and the header is an aligned u32 inside the data mapping.
            let header = unsafe { &*data.add(off).cast::<AtomicU32>() }.load(Ordering::Acquire);
            if header & BUSY != 0 {
                break;
            }
            let len = header & !(BUSY | DISCARD);
            if header & DISCARD == 0 {
                // SAFETY: the record lies in [off + 8, off + 8 + len), within the doubled data
                // mapping (size * 2 bytes) since len < size.
                let record = unsafe { std::slice::from_raw_parts(data.add(off + HDR as usize), len as usize) };
                f(record);
                n += 1;
            }
            cons += (u64::from(len) + HDR + 7) & !7;
            cons_pos.store(cons, Ordering::Release);
        }
        n
    }
}

/// An epoll set watching `fd` for input, edge-triggered.
fn edge_triggered(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: no pointers; the result is checked before use.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: epoll_create1 returned a new fd that nothing else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut want = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: 0 };
    // SAFETY: both fds are open; `want` is a valid epoll_event for the call's duration.
    if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut want) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ep)
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the two mappings made in open.
        unsafe {
            libc::munmap(self.consumer.cast(), self.page);
            libc::munmap(self.producer.cast_mut().cast(), self.page + 2 * self.size);
        }
    }
}

/// The effective uid.
/// Fills `buf` from the kernel's random numbers.
pub fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is valid, writable memory of its length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => done += n,
            Err(_) if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err(io::Error::last_os_error()),
        }
    }
    Ok(())
}

/// The effective user id.
pub fn geteuid() -> u32 {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// Takes an exclusive `flock` on `fd`; with `nonblocking`, `Ok(false)` if someone holds it.
pub fn flock(fd: RawFd, nonblocking: bool) -> io::Result<bool> {
    let op = libc::LOCK_EX | if nonblocking { libc::LOCK_NB } else { 0 };
    loop {
        // SAFETY: integer arguments only.
        if unsafe { libc::flock(fd, op) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// An event record from a BPF ring buffer, if the item is one.
pub fn read_event(bytes: &[u8]) -> Option<agentd_ebpf_common::Event> {
    if bytes.len() < std::mem::size_of::<agentd_ebpf_common::Event>() {
        return None;
    }
    // SAFETY: Event is #[repr(C)] plain old data valid for any bit pattern, and the slice holds
    // at least size_of::<Event>() bytes; read_unaligned makes no alignment assumption.
    Some(unsafe { ptr::read_unaligned(bytes.as_ptr().cast::<agentd_ebpf_common::Event>()) })
}

/// Takes a shared `flock` on `fd` without waiting: `Ok(false)` if someone holds it
/// exclusively.
pub fn flock_shared(fd: RawFd) -> io::Result<bool> {
    loop {
        // SAFETY: integer arguments only.
        if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Releases a `flock`.
pub fn flock_unlock(fd: RawFd) -> io::Result<()> {
    // SAFETY: integer arguments only.
    if unsafe { libc::flock(fd, libc::LOCK_UN) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(BPF_LINK_CREATE)`: attaches program `prog` to the cgroup `cgroup` as `attach_type`,
/// returning the link (which lives as long as its fd, or its pin).
pub fn bpf_link_create(prog: BorrowedFd<'_>, cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: c_int = 28;
    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 8],
    }
    let attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..LinkCreate::default()
    };
    // SAFETY: attr is a zero-padded union bpf_attr prefix of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_LINK_CREATE, ptr::addr_of!(attr), std::mem::size_of::<LinkCreate>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh link fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `bpf(BPF_MAP_CREATE)`: a map of `map_type` (with `inner` as the template of a map of
/// maps' values), named `name` (at most 15 bytes).
pub fn bpf_map_create(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    inner: Option<BorrowedFd<'_>>,
    name: &str,
) -> io::Result<OwnedFd> {
    const BPF_MAP_CREATE: c_int = 0;
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
        _rest: [u32; 12],
    }
    let mut attr = MapCreate {
        map_type,
        key_size,
        value_size,
        max_entries,
        inner_map_fd: inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..MapCreate::default()
    };
    let n = name.len().min(15);
    attr.map_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: attr is a zero-padded union bpf_attr prefix of the size passed.
    let fd =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, ptr::addr_of!(attr), std::mem::size_of::<MapCreate>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh map fd owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `bpf(BPF_OBJ_PIN)`: pins a BPF object (a link or a map) at `path` on bpffs.
pub fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &CStr) -> io::Result<()> {
    const BPF_OBJ_PIN: c_int = 6;
    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 4],
    }
    let attr = ObjPin { pathname: path.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, ..ObjPin::default() };
    // SAFETY: attr is a zero-padded union bpf_attr prefix; pathname is NUL-terminated and
    // outlives the call.
    if unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, ptr::addr_of!(attr), std::mem::size_of::<ObjPin>()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bpf(BPF_OBJ_GET)`: opens the BPF object pinned at `path`.
pub fn bpf_obj_get(path: &CStr) -> io::Result<OwnedFd> {
    const BPF_OBJ_GET: c_int = 7;
    #[repr(C)]
    #[derive(Default)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        _rest: [u64; 4],
    }
    let attr = ObjGet { pathname: path.as_ptr() as u64, ..ObjGet::default() };
    // SAFETY: attr is a zero-padded union bpf_attr prefix; pathname is NUL-terminated and
    // outlives the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, ptr::addr_of!(attr), std::mem::size_of::<ObjGet>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The id of the BPF link, program or map `fd` (`BPF_OBJ_GET_INFO_BY_FD`).
pub fn bpf_obj_id(fd: BorrowedFd<'_>) -> io::Result<u32> {
    const BPF_OBJ_GET_INFO_BY_FD: c_int = 15;
    #[repr(C)]
    #[derive(Default)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
        _rest: [u64; 4],
    }
    // struct bpf_link_info, bpf_prog_info and bpf_map_info all start with type and id; the
    // rest is left zero.
    let mut info = [0u32; 16];
    let attr = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
        ..InfoByFd::default()
    };
    // SAFETY: attr is a zero-padded union bpf_attr prefix; `info` is writable for info_len
    // bytes and outlives the call.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, ptr::addr_of!(attr), std::mem::size_of::<InfoByFd>())
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[1])
}

/// The ids of every BPF link on the host (`BPF_LINK_GET_NEXT_ID`), which takes no reference
/// to them: a link's id goes when the kernel starts freeing it.
pub fn bpf_link_ids() -> io::Result<Vec<u32>> {
    const BPF_LINK_GET_NEXT_ID: c_int = 31;
    #[repr(C)]
    #[derive(Default)]
    struct NextId {
        start_id: u32,
        next_id: u32,
        open_flags: u32,
        _rest: [u32; 5],
    }
    let mut ids = Vec::new();
    let mut attr = NextId::default();
    loop {
        // SAFETY: attr is a zero-padded union bpf_attr prefix the kernel writes next_id into.
        let r = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_LINK_GET_NEXT_ID, ptr::addr_of_mut!(attr), std::mem::size_of::<NextId>())
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.raw_os_error() == Some(libc::ENOENT) { Ok(ids) } else { Err(e) };
        }
        ids.push(attr.next_id);
        attr.start_id = attr.next_id;
    }
}

/// `membarrier(MEMBARRIER_CMD_GLOBAL)`: returns after an RCU grace period of the kernel's,
/// when every BPF program run that began before has ended.
pub fn rcu_barrier_global() -> io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: c_int = 1;
    // SAFETY: integer arguments only.
    if unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a pseudo filesystem (bpffs, securityfs) of type `fstype` at `path`.
pub fn mount_pseudo(fstype: &CStr, path: &CStr) -> io::Result<()> {
    // SAFETY: all strings are NUL-terminated.
    if unsafe { libc::mount(fstype.as_ptr(), path.as_ptr(), fstype.as_ptr(), 0, ptr::null()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lifts RLIMIT_MEMLOCK, which kernels before 5.11 charge BPF maps against.
pub fn raise_memlock() -> io::Result<()> {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit struct read by the kernel.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
