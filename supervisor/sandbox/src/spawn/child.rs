//! What the child does between `clone3` and `execve`, in this fixed order:
//!
//! 1. wait for the supervisor to write the uid/gid maps (it joins us to the v1 cgroups of a
//!    hybrid host while we set up, and we wait for that again before the tool starts);
//! 2. die with the supervisor (`PR_SET_PDEATHSIG`); forbid executable memfds in our pid
//!    namespace (`vm.memfd_noexec = 2`, while still host uid 0); drop supplementary groups and switch to
//!    the unprivileged uid/gid (keeping capabilities inside the new user namespace, which the
//!    mounts need); set the hostname;
//! 3. mounts: capture every granted host path (`open_tree`), mount the fresh root (tmpfs),
//!    then in plan order `/proc`, `/dev`, `/tmp` and the captured grants (each after its mount
//!    point), symlinks; make the root read-only, `pivot_root` and detach the old root;
//! 4. `setsid`, rlimits, loopback up (isolated network only);
//! 5. `PR_SET_NO_NEW_PRIVS`, drop every capability (ambient, bounding, then the rest);
//! 6. Landlock: add the fresh root's rules, `restrict_self`, report the status;
//! 7. seccomp filters;
//! 8. default signal handling, stdio onto 0-2, every other fd close-on-exec;
//! 9. fork: the child `execve`s the tool along the candidates; this process stays as the pid
//!    namespace's init, reaps, and reports the tool's exit status.
//!
//! Any failure is reported to the supervisor as (step, errno) and the child exits.

use std::os::fd::{AsFd, AsRawFd, RawFd};

use landlock::{PathBeneath, RulesetCreated, RulesetCreatedAttr};

use super::landlock::Status;
use super::spec::{ChildSpec, Op};
use super::unix_gate;
use super::Step;
use crate::sys::{self, Errno};

const PR_SET_MDWE: libc::c_int = 65;
const PR_MDWE_REFUSE_EXEC_GAIN: libc::c_ulong = 1;

/// File descriptors the child uses, all inherited from the supervisor.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChildFds {
    pub sync: RawFd,
    pub status: RawFd,
    pub stdin: RawFd,
    pub stdout: RawFd,
    pub stderr: RawFd,
    /// Where init reports the tool's exit status.
    pub exit: RawFd,
}

/// Exit status of a child that failed before `execve` (the supervisor reports the details).
pub(crate) const SETUP_FAILED: i32 = 125;

fn report(fds: &ChildFds, step: Step, index: u16, errno: Errno) -> ! {
    let mut msg = [0u8; 8];
    msg[0] = b'E';
    msg[1] = step as u8;
    msg[2..4].copy_from_slice(&index.to_le_bytes());
    msg[4..8].copy_from_slice(&errno.to_le_bytes());
    let _ = sys::write_all(fds.status, &msg);
    sys::exit_now(SETUP_FAILED)
}

trait OrReport<T> {
    fn or_report(self, fds: &ChildFds, step: Step, index: u16) -> T;
}

impl<T> OrReport<T> for Result<T, Errno> {
    fn or_report(self, fds: &ChildFds, step: Step, index: u16) -> T {
        match self {
            Ok(v) => v,
            Err(e) => report(fds, step, index, e),
        }
    }
}

/// Runs in the child; never returns.
pub(crate) fn run(spec: &mut ChildSpec, ruleset: Option<RulesetCreated>, fds: ChildFds, parent_fds: &[RawFd]) -> ! {
    // 1-2. Die with the supervisor; then wait for it to finish our maps and cgroups. Closing
    // our copies of its pipe ends first means its death reads as end-of-file here.
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0).or_report(&fds, Step::Sync, 0);
    for fd in parent_fds {
        sys::close(*fd);
    }
    wait_for_supervisor(&fds);
    // The sysctl applies to the writer's pid namespace (ours), and its file is only writable
    // by host uid 0, which we still are for this one step.
    if spec.memfd_noexec {
        sys::write_file(c"/proc/sys/vm/memfd_noexec", b"2").or_report(&fds, Step::MemfdNoexec, 0);
    }
    // The host uid that created the namespace (root) is not mapped inside it, and files can
    // only be created on our own tmpfs by a mapped uid: take the call's identity first. Our
    // capabilities in the new user namespace survive this (no uid here was ever ns-root).
    sys::set_identity(spec.uid, spec.gid).or_report(&fds, Step::Identity, 0);
    sys::sethostname(&spec.hostname).or_report(&fds, Step::Hostname, 0);

    // 3. Mounts. Capture every host path first: the fresh root may cover some of them.
    sys::mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None).or_report(&fds, Step::MakePrivate, 0);
    // Before Linux 5.12 there is no mount_setattr: each grant is then cloned without the
    // mounts below it (whose flags could not all be set) and its flags are set by a remount
    // once attached.
    let mut remount = false;
    for (i, c) in spec.captures.iter().enumerate() {
        let source = sys::open_path_nofollow(&c.source).or_report(&fds, Step::Capture, i as u16);
        let mut fd = sys::open_tree_clone(source.as_fd(), !remount).or_report(&fds, Step::Capture, i as u16);
        if !remount {
            match sys::mount_setattr(fd, c.attrs) {
                Err(libc::ENOSYS) => {
                    remount = true;
                    sys::close(fd);
                    fd = sys::open_tree_clone(source.as_fd(), false).or_report(&fds, Step::Capture, i as u16);
                }
                r => r.or_report(&fds, Step::Capture, i as u16),
            }
        }
        drop(source);
        spec.capture_fds[i] = fd;
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    sys::mount(Some(c"agentd"), &spec.root, Some(c"tmpfs"), nosuid_nodev, Some(&spec.root_opts)).or_report(
        &fds,
        Step::RootTmpfs,
        0,
    );
    for (i, op) in spec.ops.iter().enumerate() {
        let done = match op {
            Op::Mkdir(p) => sys::mkdir(p, 0o755),
            Op::Touch(p) => sys::touch(p),
            Op::Attach(c, p) => {
                let attached =
                    sys::open_path_nofollow(p).and_then(|t| sys::move_mount(spec.capture_fds[*c], t.as_fd()));
                let flags = libc::MS_REMOUNT | libc::MS_BIND | sys::ms_flags(spec.captures[*c].attrs);
                attached.and_then(|()| if remount { sys::mount(None, p, None, flags, None) } else { Ok(()) })
            }
            Op::Tmpfs(p, flags, opts) => sys::mount(Some(c"agentd"), p, Some(c"tmpfs"), *flags, Some(opts)),
            Op::Proc(p, data) => {
                sys::mount(Some(c"proc"), p, Some(c"proc"), nosuid_nodev | libc::MS_NOEXEC, data.as_deref())
            }
            Op::Symlink(target, link) => sys::symlink(target, link),
            Op::ReadOnly(p) => {
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC;
                sys::mount(None, p, None, flags, None)
            }
        };
        done.or_report(&fds, Step::Build, i as u16);
    }
    for fd in &spec.capture_fds {
        sys::close(*fd);
    }
    let ro = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | nosuid_nodev;
    sys::mount(None, &spec.root, None, ro, None).or_report(&fds, Step::RootReadOnly, 0);
    sys::chdir(&spec.root).or_report(&fds, Step::Pivot, 0);
    sys::pivot_to_cwd().or_report(&fds, Step::Pivot, 0);

    // 4. Session, rlimits, loopback.
    sys::setsid().or_report(&fds, Step::Setsid, 0);
    for (i, (res, soft, hard)) in spec.rlimits.iter().enumerate() {
        sys::setrlimit(*res, *soft, *hard).or_report(&fds, Step::Rlimit, i as u16);
    }
    if spec.isolate_net {
        sys::loopback_up().or_report(&fds, Step::Loopback, 0);
    }

    // 5. no_new_privs, capabilities.
    sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).or_report(&fds, Step::NoNewPrivs, 0);
    if spec.mdwe {
        // Inherited by every child and kept across execve: no mapping of the tool's may gain
        // execute permission once it could have been written.
        sys::prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0).or_report(&fds, Step::Mdwe, 0);
    }
    sys::drop_all_caps(spec.last_cap).or_report(&fds, Step::DropCaps, 0);
    // Credential changes cleared both: die with agentd, and keep the tool (and agentd's init
    // copy) out of reach of ptrace and /proc/<pid>/mem from inside. A parent that died before
    // this point shows up as EPIPE on the Landlock report below.
    sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0).or_report(&fds, Step::DropCaps, 1);
    sys::prctl(libc::PR_SET_DUMPABLE, 0, 0).or_report(&fds, Step::DropCaps, 2);

    // 6. Landlock (on a kernel without it, only no_new_privs, which restricting sets too).
    let msg = match ruleset {
        Some(mut ruleset) => {
            for (i, (path, access)) in spec.sandbox_rules.iter().enumerate() {
                let fd = sys::open_path(path).or_report(&fds, Step::Landlock, i as u16);
                ruleset = match ruleset.add_rule(PathBeneath::new(fd, *access)) {
                    Ok(r) => r,
                    Err(_) => report(&fds, Step::Landlock, i as u16, libc::EINVAL),
                };
            }
            let status = match ruleset.restrict_self() {
                Ok(s) => s,
                Err(_) => report(&fds, Step::Landlock, u16::MAX, libc::EPERM),
            };
            [b'L', Status::from_ruleset(&status.ruleset).to_byte(), u8::from(status.no_new_privs)]
        }
        None => {
            sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0).or_report(&fds, Step::Landlock, u16::MAX);
            [b'L', Status::None.to_byte(), 1]
        }
    };
    sys::write_all(fds.status, &msg).or_report(&fds, Step::Landlock, 0);
    // Landlock's own Unix-socket right (ABI 9), in a domain of its own: the same sockets the
    // gate allows, as a second check on every connect init makes.
    if let Some(g) = spec.unix_gate.as_ref().filter(|g| g.landlock) {
        let mut beneath: Vec<&std::ffi::CStr> = g.granted.iter().map(|p| p.as_c_str()).collect();
        if g.tmp {
            beneath.push(c"/tmp");
        }
        sys::notify::landlock_resolve_unix(&beneath).or_report(&fds, Step::Landlock, u16::MAX - 1);
    }

    // 7. seccomp.
    if seccompiler::apply_filter(&spec.seccomp.program).is_err() {
        report(&fds, Step::Seccomp, 0, libc::EINVAL);
    }

    // 8. signals, stdio, fds, exec.
    sys::reset_signals().or_report(&fds, Step::Stdio, 0);
    // Past `limits.file_mb` a write then fails with EFBIG, which tools report, rather than
    // killing the tool with SIGXFSZ (and a core file it may not write).
    sys::ignore_signal(libc::SIGXFSZ);
    for (from, to) in [(fds.stdin, 0), (fds.stdout, 1), (fds.stderr, 2)] {
        sys::dup2(from, to).or_report(&fds, Step::Stdio, to as u16);
    }
    sys::cloexec_from(3, spec.highest_fd).or_report(&fds, Step::Stdio, 3);

    // The supervisor has been moving us into the v1 cgroups meanwhile (hybrid hosts): no tool
    // code may run before that is done, and init and the tool must both be inside.
    wait_for_supervisor(&fds);
    sys::close(fds.sync);

    // Scrubbed before the fork, so the tool cannot race it to read agentd's strings.
    sys::scrub_proc_strings();

    // 9. Split into the namespace's init and the tool. The tool is not pid 1, so it can be
    // signalled (even by itself) like any process; init reaps orphans and, once the tool has
    // exited, reports how and exits, which ends every process left in the namespace.
    // The tool starts vfork-style (sharing our memory until it execs): copying this copy of
    // agentd's page tables for a process that execs at once would be wasted time.
    // What the Unix-socket gate lets through, looked up in the fresh root while nothing of the
    // tool's runs yet.
    let gate = spec.unix_gate.as_ref().map(|g| unix_gate::Rules::find(&g.granted, g.tmp));
    let mut stack = std::mem::take(&mut spec.tool_stack);
    let ctx = ToolCtx { spec, fds, listener: std::cell::Cell::new(-1) };
    match sys::vfork_run(tool_main, &ctx, &mut stack) {
        // The tool shared our fd table until it exec'd: its listener (close-on-exec) is ours now.
        Ok(tool) => init(tool, &fds, gate.map(|rules| (ctx.listener.get(), rules))),
        Err(e) => report(&fds, Step::Fork, 0, e),
    }
}

struct ToolCtx<'a> {
    spec: &'a ChildSpec,
    fds: ChildFds,
    /// The gate's listener, set by the tool before it execs (shared memory and fd table).
    listener: std::cell::Cell<RawFd>,
}

/// Entry of the vfork child: install the gate's filter, exec the tool (or report why not and
/// exit).
fn tool_main(ctx: &ToolCtx<'_>) -> libc::c_int {
    if let Some(g) = &ctx.spec.unix_gate {
        match sys::notify::seccomp_listener(&g.program) {
            Ok(fd) => ctx.listener.set(fd),
            Err(e) => report(&ctx.fds, Step::Seccomp, 1, e),
        }
    }
    exec(ctx.spec, &ctx.fds)
}

/// Blocks until the supervisor writes the next sync byte; exits quietly if it went away.
fn wait_for_supervisor(fds: &ChildFds) {
    match sys::read_byte(fds.sync) {
        Ok(true) => {}
        Ok(false) => sys::exit_now(SETUP_FAILED),
        Err(e) => report(fds, Step::Sync, 0, e),
    }
}

/// pid 1 of the call's namespace: waits for the tool, then reports its exit to the supervisor.
/// With the Unix-socket gate, it also makes the tool's connects (see `unix_gate`).
fn init(tool: libc::pid_t, fds: &ChildFds, gate: Option<(RawFd, unix_gate::Rules)>) -> ! {
    // Only the tool may report setup errors from here on, and no copy of its pipes may stay
    // open here: keep nothing but the exit report (and the gate's listener).
    let listener = gate.as_ref().map_or(-1, |(l, _)| *l);
    sys::close_all_except_two(fds.exit, listener);
    let _ = sys::prctl(libc::PR_SET_NAME, c"agentd-init".as_ptr() as libc::c_ulong, 0);
    let Some((listener, rules)) = gate.filter(|(l, _)| *l >= 0) else {
        loop {
            match sys::wait_any() {
                Ok((pid, status)) if pid == tool => report_exit(fds, status),
                Ok(_) => {}
                Err(_) => sys::exit_now(SETUP_FAILED),
            }
        }
    };
    // SIGCHLD through a signalfd, so that one poll waits for both children and connects. A
    // child that ended before the signal was blocked is found by the first reaping pass.
    let Ok(sigchld) = sys::signalfd(&[libc::SIGCHLD]) else { sys::exit_now(SETUP_FAILED) };
    let mut gate = unix_gate::Gate::new(listener, rules, fds.exit);
    let mut listening = true;
    let mut pfds: Vec<libc::pollfd> = Vec::new();
    loop {
        loop {
            match sys::notify::wait_nohang() {
                Ok(Some((pid, status))) if pid == tool => {
                    if gate.refused > unix_gate::MAX_REPORTED {
                        let mut msg = [b'D', 0, 0, 0, 0];
                        msg[1..].copy_from_slice(&(gate.refused - unix_gate::MAX_REPORTED).to_le_bytes());
                        let _ = sys::write_all(fds.exit, &msg);
                    }
                    report_exit(fds, status)
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(libc::ECHILD) => break,
                Err(_) => sys::exit_now(SETUP_FAILED),
            }
        }
        pfds.clear();
        pfds.push(libc::pollfd { fd: sigchld.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        pfds.push(libc::pollfd { fd: if listening { listener } else { -1 }, events: libc::POLLIN, revents: 0 });
        let timeout = gate.wants(&mut pfds);
        if sys::poll(&mut pfds, timeout).is_err() {
            sys::exit_now(SETUP_FAILED);
        }
        if pfds[0].revents != 0 {
            sys::drain(sigchld.as_fd());
        }
        if pfds[1].revents & libc::POLLIN != 0 {
            gate.serve_one();
        } else if pfds[1].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            // Every task of the tool is gone: nothing more will connect.
            listening = false;
        }
        gate.progress(&pfds[2..]);
    }
}

/// Reports the tool's exit status to the supervisor, and ends init (and so the namespace).
fn report_exit(fds: &ChildFds, status: libc::c_int) -> ! {
    let (kind, value) =
        if libc::WIFSIGNALED(status) { (b'S', libc::WTERMSIG(status)) } else { (b'C', libc::WEXITSTATUS(status)) };
    let mut msg = [kind, 0, 0, 0, 0];
    msg[1..].copy_from_slice(&value.to_le_bytes());
    let _ = sys::write_all(fds.exit, &msg);
    sys::exit_now(0)
}

fn exec(spec: &ChildSpec, fds: &ChildFds) -> ! {
    let mut worst = libc::ENOENT;
    for c in &spec.candidates {
        match sys::execve(c, &spec.argv_ptrs, &spec.envp_ptrs) {
            libc::ENOENT | libc::ENOTDIR => {}
            libc::EACCES => worst = libc::EACCES,
            e => report(fds, Step::Exec, 0, e),
        }
    }
    report(fds, Step::Exec, 0, worst)
}
