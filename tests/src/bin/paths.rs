//! A tool that makes the fallback tracer's job hard, for the audit tests. Each mode prints,
//! for every file it opened, the first line of what it read: the truth to hold the audit
//! records against.
//!
//! - `paths race A B N`: opens a path N times, each from a new thread, while another thread
//!   keeps rewriting the path's bytes between A and B (same length), so the string the kernel
//!   reads can differ from the one a tracer reads.
//! - `paths unfaulted FILE`: opens the path written in FILE, passing a pointer into a
//!   mapping of FILE that was never touched, so the page is not there when the syscall starts.
//! - `paths at DIR NAME`: opens NAME relative to a descriptor of DIR.
//! - `paths anon-exec`: writes anonymous memory, then asks for it to be made executable, and
//!   maps anonymous memory writable and executable at once; prints `mprotect=` and
//!   `mmap_wx=`, each `ok` or the error's name.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;

fn first_line(fd: i32) -> String {
    // SAFETY: `fd` was just opened by this process and is owned by the File from here on.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s.lines().next().unwrap_or("").to_string()
}

fn race(a: &str, b: &str, n: usize) {
    assert_eq!(a.len(), b.len(), "A and B must be the same length");
    let buf: Arc<Vec<AtomicU8>> = Arc::new((0..=a.len()).map(|_| AtomicU8::new(0)).collect());
    for (i, c) in a.bytes().enumerate() {
        buf[i].store(c, Ordering::SeqCst);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let (buf, stop) = (buf.clone(), stop.clone());
        let (a, b) = (a.as_bytes().to_vec(), b.as_bytes().to_vec());
        std::thread::spawn(move || {
            let mut turn = false;
            while !stop.load(Ordering::Relaxed) {
                let src = if turn { &a } else { &b };
                for (i, c) in src.iter().enumerate() {
                    buf[i].store(*c, Ordering::Relaxed);
                }
                turn = !turn;
            }
        })
    };
    for _ in 0..n {
        // Each open from a thread of its own: a thread's repeated opens of one file are
        // counted, not recorded one by one, and each of these is to be held against the truth.
        let path = buf.as_ptr() as usize;
        // SAFETY: the buffer is NUL-terminated (its last byte is never written) and lives
        // until after the thread is joined; the kernel reads it as bytes.
        let opener = std::thread::spawn(move || unsafe { libc::open(path as *const libc::c_char, libc::O_RDONLY) });
        let fd = opener.join().unwrap_or(-1);
        if fd >= 0 {
            println!("opened {}", first_line(fd));
        } else {
            println!("failed");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = swapper.join();
}

fn unfaulted(file: &str) {
    let len = std::fs::metadata(file).expect("stat").len() as usize;
    let f = std::fs::File::open(file).expect("open");
    use std::os::fd::AsRawFd;
    // SAFETY: a fresh private read-only mapping of a file this process holds open; nothing
    // reads it before the kernel does.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, f.as_raw_fd(), 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping holds the path and a NUL (the file ends with one).
    let fd = unsafe { libc::open(p as *const libc::c_char, libc::O_RDONLY) };
    assert!(fd >= 0, "open through the unfaulted page failed");
    println!("opened {}", first_line(fd));
}

fn at(dir: &str, name: &str) {
    let d = CString::new(dir).expect("dir");
    let n = CString::new(name).expect("name");
    // SAFETY: NUL-terminated strings that outlive the calls.
    let dfd = unsafe { libc::open(d.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
    assert!(dfd >= 0, "open {dir}");
    // SAFETY: as above.
    let fd = unsafe { libc::openat(dfd, n.as_ptr(), libc::O_RDONLY) };
    assert!(fd >= 0, "openat {name}");
    println!("opened {}", first_line(fd));
}

fn anon_exec() {
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh anonymous private mapping, used only through this pointer.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    // SAFETY: the mapping is 4096 writable bytes; 0xc3 is `ret`.
    unsafe { *(p as *mut u8) = 0xc3 };
    // SAFETY: the mapping made above.
    let r = unsafe { libc::mprotect(p, 4096, libc::PROT_READ | libc::PROT_EXEC) };
    outcome("mprotect", r == 0);
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    // SAFETY: a new anonymous mapping, never used.
    let q = unsafe { libc::mmap(std::ptr::null_mut(), 4096, rwx, flags, -1, 0) };
    outcome("mmap_wx", q != libc::MAP_FAILED);
}

/// Prints `what=ok`, or `what=` and the name of the error just seen.
fn outcome(what: &str, ok: bool) {
    match std::io::Error::last_os_error().raw_os_error() {
        _ if ok => println!("{what}=ok"),
        Some(libc::EACCES) => println!("{what}=EACCES"),
        Some(libc::EPERM) => println!("{what}=EPERM"),
        other => println!("{what}={other:?}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        [_, "race", a, b, n] => race(a, b, n.parse().expect("N")),
        [_, "unfaulted", file] => unfaulted(file),
        [_, "at", dir, name] => at(dir, name),
        [_, "anon-exec"] => anon_exec(),
        _ => {
            eprintln!("usage: paths race A B N | paths unfaulted FILE | paths at DIR NAME | paths anon-exec");
            std::process::exit(2);
        }
    }
}
