//! `compile`: manifest + call + host facts → [`ExecPlan`]. Pure: the host is consulted only
//! through the [`HostFs`] trait and the [`HostFacts`] value the caller passes in.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::access::{self, FsRight, NET_ABI, PINNED_ABI, RESOLVE_UNIX_ABI, SCOPE_ABI};
use crate::argv;
use crate::model::{Manifest, Tool};
use crate::plan::{
    BpfPlan, Brought, CgroupFlavor, CgroupPlan, ExecPlan, Identity, LandlockPlan, LandlockRule, Level, LoaderPlan,
    Mount, Namespaces, NetMode, NetOp, NetRule, NetworkPlan, Requirement, Rlimit, RlimitResource, RuleOrigin, Symlink,
    UnixConnect, WriteExecute,
};
use crate::template::RenderError;
use crate::types::{AbsPath, HostAddr, Name};

/// Read-only questions about the host filesystem, answered by the supervisor (or a fake in
/// tests).
pub trait HostFs {
    /// The canonical form of `path` (symlinks resolved); an error text if it does not exist.
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, String>;
    /// Whether `path` (canonical) is a directory.
    fn is_dir(&self, path: &Path) -> bool;
    /// If `path` is a symbolic link, what it points to, as stored.
    fn read_link(&self, path: &Path) -> Option<PathBuf>;
    /// The mount that contains `path` (canonical) and the mounts below it: (mount point,
    /// filesystem type). An error (the mount table cannot be read) refuses the grant: what it
    /// would expose cannot be checked.
    fn mounts_below(&self, path: &Path) -> Result<Vec<(PathBuf, String)>, String>;
    /// Owner uid, group gid and `st_mode` (type bits included) of `path` itself, a final
    /// symlink not followed; `None` if it cannot be read.
    fn owner_mode(&self, path: &Path) -> Option<(u32, u32, u32)>;
    /// The host account (user or group) that already has `uid` or `gid`, if any.
    fn account_with(&self, uid: u32, gid: u32) -> Option<String>;
    /// What the dynamic ELF program at `program` (canonical) needs to start, as the host's
    /// loader would find it; `None` if it is not one (a script, a static binary).
    fn elf_deps(&self, program: &Path) -> Option<ElfDeps> {
        let _ = program;
        None
    }
}

/// What a dynamic ELF program needs to start: paths as the loader opens them (not canonical).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElfDeps {
    /// `PT_INTERP`: the loader the kernel starts.
    pub interpreter: PathBuf,
    /// Each `DT_NEEDED` name, transitively, with where it was found.
    pub libraries: Vec<(String, PathBuf)>,
    /// Names that were not found on the host.
    pub missing: Vec<String>,
}

const S_IFMT: u32 = 0o170_000;
const S_IFSOCK: u32 = 0o140_000;
const S_ISVTX: u32 = 0o1000;

/// Filesystems that expose host kernel state: a grant must not bring one along as a submount.
const KERNEL_FS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "nsfs",
    "bpf",
    "securityfs",
    "debugfs",
    "tracefs",
    "configfs",
    "devtmpfs",
    "devpts",
    "mqueue",
    "fusectl",
    "efivarfs",
    "pstore",
    "binfmt_misc",
    "hugetlbfs",
];

/// Facts about the running kernel that change the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// Landlock ABI of the kernel, 0 if unavailable.
    pub landlock_abi: u32,
    /// Which cgroup hierarchy can hold the call.
    pub cgroup: CgroupFlavor,
    /// Whether BPF LSM enforcement is available to agentd.
    pub bpf_lsm: bool,
    /// Whether the kernel has the per-pid-namespace `vm.memfd_noexec` sysctl (Linux 6.3).
    pub memfd_noexec: bool,
    /// Whether agentd's fallback BPF programs (cgroup socket hooks, syscall tracing) run.
    pub bpf_fallback: bool,
    /// Whether the kernel has `PR_SET_MDWE` (memory-deny-write-execute, Linux 6.3).
    pub mdwe: bool,
    /// Whether the kernel has seccomp listeners and `pidfd_getfd` (Linux 5.6), with which
    /// agentd decides each connect to a Unix socket.
    pub unix_gate: bool,
}

/// One tool call as requested.
#[derive(Debug, Clone, Default)]
pub struct CallRequest {
    /// Id to give the call.
    pub call_id: String,
    /// Tool name.
    pub tool: String,
    /// `--arg KEY=VALUE` values for the argv template.
    pub args: BTreeMap<String, String>,
    /// `-- ARGV...`: replaces the tool's argv template when given.
    pub argv_override: Option<Vec<String>>,
    /// agentd's own environment, from which `env.pass` copies.
    pub agent_env: BTreeMap<String, String>,
}

/// Why a plan could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    /// The tool is not in the manifest.
    #[error("tool {tool:?} is not in the manifest (it has: {known})")]
    UnknownTool {
        /// Requested tool.
        tool: String,
        /// Tools the manifest has.
        known: String,
    },
    /// The MCP server is not in the manifest.
    #[error("MCP server {server:?} is not in the manifest (it has: {})", if known.is_empty() { "none" } else { known })]
    UnknownMcpServer {
        /// Requested server.
        server: String,
        /// Servers the manifest has.
        known: String,
    },
    /// The argv template could not be filled.
    #[error("tool {tool:?}")]
    Args {
        /// Tool name.
        tool: String,
        /// What went wrong.
        #[source]
        source: RenderError,
    },
    /// An argument is outside what `[tools.NAME.args]` allows.
    #[error("tool {tool:?}: argument {name:?} {reason}")]
    BadArg {
        /// Tool name.
        tool: String,
        /// Argument name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The agent's derived identity belongs to an account of the host.
    #[error(
        "agent {agent:?} would run as uid {uid} gid {gid} (derived from its name), but {account} already has it \
         on this host; set `agent.uid` and `agent.gid` in the manifest"
    )]
    IdInUse {
        /// The agent.
        agent: String,
        /// The derived uid.
        uid: u32,
        /// The derived gid.
        gid: u32,
        /// Who has it.
        account: String,
    },
    /// The override argv was empty or held a NUL.
    #[error("the command after `--` is empty or contains a NUL byte")]
    BadOverride,
    /// A granted path is not usable on this host.
    #[error("`{key}` path {path}: {reason}")]
    Path {
        /// Manifest key, e.g. `tools.shell.fs.read`.
        key: String,
        /// The path as written.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Places on a merged-/usr system that are links into `/usr`; recreated in the sandbox when
/// their target is visible there.
const ROOT_LINKS: [&str; 6] = ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// Device nodes of the minimal `/dev`.
pub const DEV_NODES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// Default search path when the call's environment has no `PATH` (as glibc's `execvp`).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Builds the plan for one call. See the crate docs for the order of checks.
pub fn compile(
    manifest: &Manifest,
    req: &CallRequest,
    host: &HostFacts,
    fs: &dyn HostFs,
) -> Result<ExecPlan, CompileError> {
    let tool_name = Name::parse(&req.tool).ok();
    let Some((tool_name, tool)) = tool_name.as_ref().and_then(|n| manifest.tools.get_key_value(n)) else {
        let known = manifest.tools.keys().map(Name::as_str).collect::<Vec<_>>().join(", ");
        return Err(CompileError::UnknownTool { tool: req.tool.clone(), known });
    };
    compile_unit(manifest, "tools", tool_name, tool, req, host, fs)
}

/// Builds the plan that starts the MCP server `[mcp.NAME]`, `NAME` being `req.tool`: its
/// `command`, in a sandbox built as a tool's. The plan's `tool` is `mcp.NAME`.
pub fn compile_mcp_server(
    manifest: &Manifest,
    req: &CallRequest,
    host: &HostFacts,
    fs: &dyn HostFs,
) -> Result<ExecPlan, CompileError> {
    let name = Name::parse(&req.tool).ok();
    let Some((name, server)) = name.as_ref().and_then(|n| manifest.mcp.get_key_value(n)) else {
        let known = manifest.mcp.keys().map(Name::as_str).collect::<Vec<_>>().join(", ");
        return Err(CompileError::UnknownMcpServer { server: req.tool.clone(), known });
    };
    let mut plan = compile_unit(manifest, "mcp", name, &server.sandbox, req, host, fs)?;
    plan.tool = format!("mcp.{}", name.as_str());
    Ok(plan)
}

/// The plan of `tool`, written as `[{table}.{tool_name}]`.
fn compile_unit(
    manifest: &Manifest,
    table: &str,
    tool_name: &Name,
    tool: &Tool,
    req: &CallRequest,
    host: &HostFacts,
    fs: &dyn HostFs,
) -> Result<ExecPlan, CompileError> {
    let key = |k: &str| match k {
        "unix" => format!("{table}.{}.net.unix", req.tool),
        _ => format!("{table}.{}.fs.{k}", req.tool),
    };
    let agent = &manifest.agent;
    if agent.derived_ids {
        if let Some(account) = fs.account_with(agent.uid, agent.gid) {
            let (uid, gid) = (agent.uid, agent.gid);
            return Err(CompileError::IdInUse { agent: agent.name.to_string(), uid, gid, account });
        }
    }

    for spec in &tool.args {
        if let Some(value) = req.args.get(spec.name.as_str()) {
            spec.kind.check(value).map_err(|reason| CompileError::BadArg {
                tool: req.tool.clone(),
                name: spec.name.to_string(),
                reason,
            })?;
        }
    }
    let argv = match &req.argv_override {
        Some(v) if v.is_empty() || v.iter().any(|a| a.contains('\0')) || v[0].is_empty() => {
            return Err(CompileError::BadOverride)
        }
        Some(v) => v.clone(),
        None => argv::render(&tool.argv, &tool.args, &req.args)
            .map_err(|source| CompileError::Args { tool: req.tool.clone(), source })?,
    };
    if req.argv_override.is_some() && !req.args.is_empty() {
        return Err(CompileError::Args {
            tool: req.tool.clone(),
            source: RenderError::Unknown {
                name: req.args.keys().next().cloned().unwrap_or_default(),
                known: "none when `-- ARGV` replaces the template".into(),
            },
        });
    }

    let mut env = environment(tool, &req.agent_env);
    let path_var = env.iter().find(|(k, _)| k == "PATH").map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program_candidates = candidates(&argv[0], path_var);

    let mut grants = Grants::resolve(manifest, tool_name, tool, fs, &key)?;
    let loader = bring_loaders(&mut grants, tool, &program_candidates, fs);
    let (mounts, symlinks) = layout(&grants, tool, fs);
    let network = network(tool, &grants);
    if let Some(proxy) = network.proxy {
        proxy_environment(&mut env, proxy);
    }
    let mut mounts = mounts;
    if let Some(dns) = network.dns {
        // Last, so that it sits on top of a granted /etc. Where the granted /etc has it as
        // a symlink, on what the link leads to; a dangling one is left alone (resolvers
        // then ask 127.0.0.1, which is the stub).
        let resolv = Path::new(RESOLV_CONF);
        let at = match fs.read_link(resolv) {
            Some(_) if grants.visible(resolv) => fs.canonicalize(resolv).ok(),
            _ => Some(resolv.to_path_buf()),
        };
        if let Some(at) = at {
            let contents = format!("# agentd: the call's DNS stub; it answers the names the manifest grants\nnameserver {}\noptions timeout:2 attempts:2\n", dns.ip());
            mounts.push(Mount::File { path: at.display().to_string(), contents });
        }
    }
    let landlock = landlock(manifest, host, &grants, tool.limits.tmp_mb > 0);
    let mut requirements = requirements(manifest, host, &landlock, &network);
    requirements.push(Requirement {
        feature: "unix.connect".into(),
        level: Level::BestEffort,
        available: host.unix_gate,
        note: if host.unix_gate {
            "connects to Unix sockets by path reach only net.unix grants and the call's own /tmp".into()
        } else {
            "no seccomp listener or pidfd_getfd (Linux < 5.6): Unix sockets other than socketpair are refused".into()
        },
    });
    requirements.push(Requirement {
        feature: "memory.write_execute".into(),
        level: Level::BestEffort,
        available: true,
        note: match (tool.allow_jit, host.mdwe) {
            (true, _) => "allow_jit: the tool may make written memory executable".into(),
            (false, true) => "PR_SET_MDWE: written memory never becomes executable".into(),
            (false, false) => {
                "seccomp refuses writable+executable mmap and mprotect to executable (no PR_SET_MDWE before Linux 6.3)"
                    .into()
            }
        },
    });

    let l = &tool.limits;
    let net_rules = bpf_net_rules(&network);
    Ok(ExecPlan {
        call_id: req.call_id.clone(),
        agent: manifest.agent.name.to_string(),
        tool: req.tool.clone(),
        argv,
        ok_exit: tool.ok_exit.clone(),
        learn: Vec::new(),
        program_candidates,
        loader,
        env,
        identity: Identity { uid: manifest.agent.uid, gid: manifest.agent.gid },
        namespaces: Namespaces { user: true, pid: true, mount: true, ipc: true, uts: true, cgroup: true, net: true },
        network,
        mounts,
        symlinks,
        landlock,
        cgroup: CgroupPlan {
            flavor: host.cgroup,
            memory_bytes: l.memory_mb << 20,
            // One more for the namespace's init, which is agentd's, not the tool's.
            pids: l.pids + 1,
            cpu_quota_us: l.cpu_percent * 1000,
            cpu_period_us: 100_000,
        },
        memfd_noexec: host.memfd_noexec,
        rlimits: vec![
            Rlimit { resource: RlimitResource::Core, soft: 0, hard: 0 },
            Rlimit { resource: RlimitResource::Nofile, soft: 1024, hard: 4096 },
            Rlimit { resource: RlimitResource::Fsize, soft: l.file_mb << 20, hard: l.file_mb << 20 },
        ],
        unix_connect: if host.unix_gate { UnixConnect::Gate } else { UnixConnect::Refused },
        write_execute: match (tool.allow_jit, host.mdwe) {
            (true, _) => WriteExecute::Allowed,
            (false, true) => WriteExecute::Prctl,
            (false, false) => WriteExecute::Seccomp,
        },
        timeout_ms: l.timeout_ms,
        output_bytes: l.output_bytes,
        requirements,
        bpf: BpfPlan {
            mode: tool.audit.mode,
            on_audit_loss: tool.audit.on_audit_loss,
            net_rules,
            exec_paths: grants.paths.iter().filter(|(_, g)| g.exec).map(|(p, _)| p.display().to_string()).collect(),
            unix_sockets: grants.sockets.iter().map(|p| p.display().to_string()).collect(),
            deny_write_exec: !tool.allow_jit,
            deny_open: tool
                .audit
                .deny_open
                .iter()
                .map(|p| {
                    fs.canonicalize(p.as_path()).unwrap_or_else(|_| p.as_path().to_path_buf()).display().to_string()
                })
                .collect(),
        },
    })
}

fn environment(tool: &Tool, agent_env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for name in &tool.env.pass {
        if let Some(v) = agent_env.get(name.as_str()) {
            env.insert(name.as_str().to_string(), v.clone());
        }
    }
    for (k, v) in &tool.env.set {
        env.insert(k.as_str().to_string(), v.clone());
    }
    env.into_iter().collect()
}

/// Points clients that honour proxy variables at the call's HTTP CONNECT proxy, unless the
/// manifest sets them itself. Loopback stays direct.
fn proxy_environment(env: &mut Vec<(String, String)>, proxy: std::net::SocketAddr) {
    let url = format!("http://{proxy}");
    let direct = "localhost,127.0.0.1,::1".to_string();
    for (name, value) in [
        ("http_proxy", &url),
        ("https_proxy", &url),
        ("all_proxy", &url),
        ("HTTP_PROXY", &url),
        ("HTTPS_PROXY", &url),
        ("ALL_PROXY", &url),
        ("no_proxy", &direct),
        ("NO_PROXY", &direct),
    ] {
        if !env.iter().any(|(k, _)| k == name) {
            env.push((name.to_string(), value.clone()));
        }
    }
    env.sort();
}

/// `execvp` semantics: a name with a slash is used as is; otherwise each `PATH` entry is tried.
fn candidates(argv0: &str, path: &str) -> Vec<String> {
    if argv0.contains('/') {
        return vec![argv0.to_string()];
    }
    path.split(':')
        .map(|dir| if dir.is_empty() { argv0.to_string() } else { format!("{}/{argv0}", dir.trim_end_matches('/')) })
        .collect()
}

/// Canonical grants: each path once, with what it may be used for.
#[derive(Debug, Default)]
struct Grants {
    /// Canonical path → (is_dir, writable, exec).
    paths: BTreeMap<PathBuf, Grant>,
    /// Literal paths that differ from their canonical form.
    aliases: Vec<(PathBuf, PathBuf)>,
    /// Canonical `net.unix` sockets (also in `paths`, read-only, so that they are visible).
    sockets: Vec<PathBuf>,
    /// Where nothing may be executed: the tool's write grants, and other tools' unless shared.
    no_exec: Vec<PathBuf>,
    /// Every write grant of the agent's tools, as written and canonical: a symlink in one could
    /// be re-pointed.
    agent_writable: Vec<PathBuf>,
    /// The agent's uid and gid.
    ids: (u32, u32),
}

#[derive(Debug, Clone, Copy, Default)]
struct Grant {
    dir: bool,
    read: bool,
    write: bool,
    exec: bool,
}

impl Grants {
    fn resolve(
        manifest: &Manifest,
        me: &Name,
        tool: &Tool,
        fs: &dyn HostFs,
        key: &dyn Fn(&str) -> String,
    ) -> Result<Self, CompileError> {
        let lists: [(&str, &[AbsPath]); 4] =
            [("read", &tool.fs.read), ("write", &tool.fs.write), ("exec", &tool.fs.exec), ("unix", &tool.net.unix)];
        let fail = |name: &str, p: &AbsPath, reason: String| CompileError::Path {
            key: key(name),
            path: p.to_string(),
            reason,
        };
        let canonical = |name: &str, p: &AbsPath| -> Result<PathBuf, CompileError> {
            let canon = fs.canonicalize(p.as_path()).map_err(|e| fail(name, p, e))?;
            let canon = AbsPath::from_canonical(canon)
                .map_err(|e| fail(name, p, format!("resolves to a path that cannot be granted: {e}")))?;
            Ok(canon.as_path().to_path_buf())
        };
        let writable: Vec<PathBuf> = tool.fs.write.iter().map(|p| canonical("write", p)).collect::<Result<_, _>>()?;
        // Every write grant of the agent's other tools, as written and, where it exists,
        // canonical.
        // MCP servers are the agent's too (a name is either a tool or a server).
        let units = manifest
            .tools
            .iter()
            .map(|(n, t)| (n, t, "tool"))
            .chain(manifest.mcp.iter().map(|(n, s)| (n, &s.sandbox, "MCP server")));
        let others: Vec<(&Name, &Tool, &str, &AbsPath, Option<PathBuf>)> = units
            .filter(|(n, _, _)| *n != me)
            .flat_map(|(n, t, what)| t.fs.write.iter().map(move |p| (n, t, what, p, fs.canonicalize(p.as_path()).ok())))
            .collect();
        // The agent is the unit: any of its tools could re-point a symlink where it writes.
        let mut agent_writable = writable.clone();
        for p in &tool.fs.write {
            agent_writable.push(p.as_path().to_path_buf());
        }
        for (_, _, _, p, canon) in &others {
            agent_writable.push(p.as_path().to_path_buf());
            agent_writable.extend(canon.clone());
        }
        // Where the tool may not exec: its own write grants, and those of the other tools
        // unless both name each other in `fs.exec_shared_with` (checked literally at load,
        // canonically here: a symlink must not hide an overlap).
        let shared = |a: &Tool, b: &Name| a.fs.exec_shared_with.contains(b);
        let mut no_exec: Vec<(PathBuf, String)> = writable.iter().map(|w| (w.clone(), String::new())).collect();
        for (other_name, other, what, _, canon) in &others {
            if shared(tool, other_name) && shared(other, me) {
                continue;
            }
            if let Some(c) = canon {
                no_exec.push((c.clone(), format!(" of {what} \"{}\"", other_name.as_str())));
            }
        }
        let ids = (manifest.agent.uid, manifest.agent.gid);
        let mut g = Grants {
            no_exec: no_exec.iter().map(|(p, _)| p.clone()).collect(),
            agent_writable: agent_writable.clone(),
            ids,
            ..Grants::default()
        };
        for (name, list) in lists {
            for p in list {
                let canon = canonical(name, p)?;
                if let Some((link, why)) = replaceable_symlink(p.as_path(), &agent_writable, ids, fs) {
                    return Err(fail(
                        name,
                        p,
                        format!("goes through the symlink {} {why}: it could be pointed anywhere", link.display()),
                    ));
                }
                if name == "unix" {
                    let is_socket = fs.owner_mode(&canon).is_some_and(|(_, _, m)| m & S_IFMT == S_IFSOCK);
                    if !is_socket {
                        let what = if fs.is_dir(&canon) { "a directory" } else { "not a socket" };
                        return Err(fail(
                            name,
                            p,
                            format!("is {what}: a unix grant names one listening socket by its exact path"),
                        ));
                    }
                    g.sockets.push(canon.clone());
                }
                let mounts = fs.mounts_below(&canon).map_err(|e| {
                    fail(name, p, format!("cannot be checked for kernel filesystems mounted below it: {e}"))
                })?;
                if let Some((m, fstype)) = mounts.into_iter().find(|(_, t)| KERNEL_FS.contains(&t.as_str())) {
                    let place = if canon.starts_with(&m) { "holds it" } else { "is mounted below it" };
                    return Err(fail(
                        name,
                        p,
                        format!("{} ({fstype}) {place} and would expose host kernel state", m.display()),
                    ));
                }
                if name == "exec" {
                    if let Some((w, whose)) =
                        no_exec.iter().find(|(w, _)| canon.starts_with(w) || w.starts_with(&canon))
                    {
                        return Err(fail(
                            name,
                            p,
                            format!(
                                "resolves into the writable grant {}{whose}: a tool could write a program and run it",
                                w.display()
                            ),
                        ));
                    }
                }
                if canon != p.as_path() {
                    g.aliases.push((p.as_path().to_path_buf(), canon.clone()));
                }
                let dir = fs.is_dir(&canon);
                let e = g.paths.entry(canon).or_insert(Grant { dir, ..Grant::default() });
                match name {
                    "read" | "unix" => e.read = true,
                    "write" => e.write = true,
                    _ => e.exec = true,
                }
            }
        }
        Ok(g)
    }

    fn visible(&self, p: &Path) -> bool {
        self.paths.keys().any(|g| p.starts_with(g))
    }
}

/// The loader and libraries of the programs the tool runs by name (`argv[0]`, and each
/// `fs.exec` grant that is a file), brought into the sandbox read-only and executable where no
/// exec grant covers them already: `exec = ["/usr/bin/python3"]` means "this program,
/// runnable". Each is shown where the loader opens it (`/lib64/ld-linux-x86-64.so.2`), as a
/// link to where it is. Nothing is brought from where the agent may write.
fn bring_loaders(g: &mut Grants, tool: &Tool, candidates: &[String], fs: &dyn HostFs) -> LoaderPlan {
    let mut plan = LoaderPlan::default();
    let covered = |g: &Grants, p: &Path| g.paths.iter().any(|(e, v)| v.exec && p.starts_with(e));
    let mut programs: Vec<PathBuf> = Vec::new();
    // argv[0]: the first candidate that exists and that an exec grant covers (what execvp
    // will run); a program outside the exec grants is refused at exec whatever it needs.
    if let Some(p) =
        candidates.iter().filter_map(|c| fs.canonicalize(Path::new(c)).ok()).find(|c| !fs.is_dir(c) && covered(g, c))
    {
        programs.push(p);
    }
    for e in &tool.fs.exec {
        if let Ok(c) = fs.canonicalize(e.as_path()) {
            if !fs.is_dir(&c) && !programs.contains(&c) {
                programs.push(c);
            }
        }
    }
    let mut any_library = false;
    for program in programs {
        let Some(deps) = fs.elf_deps(&program) else { continue };
        let shown = program.display().to_string();
        let wanted = std::iter::once(("loader".to_string(), deps.interpreter.clone()))
            .filter(|(_, p)| !p.as_os_str().is_empty())
            .chain(deps.libraries.iter().map(|(n, p)| (n.clone(), p.clone())));
        for (what, literal) in wanted {
            let Ok(canon) = fs.canonicalize(&literal) else {
                plan.missing.push(format!("{shown}: {what} {} does not exist", literal.display()));
                continue;
            };
            any_library |= what != "loader";
            if covered(g, &canon) {
                continue;
            }
            // What a grant must pass, a brought file must pass too: a regular file, outside the
            // reserved trees and kernel filesystems, through no link the agent could re-point,
            // nowhere the agent may write.
            let refused = if fs.is_dir(&canon) {
                Some("is a directory".to_string())
            } else if let Err(e) = AbsPath::from_canonical(canon.clone()) {
                Some(e)
            } else if fs.mounts_below(&canon).map_or(true, |m| m.iter().any(|(_, t)| KERNEL_FS.contains(&t.as_str()))) {
                Some("is on a kernel filesystem".to_string())
            } else if let Some((link, why)) = replaceable_symlink(&literal, &g.agent_writable, g.ids, fs) {
                Some(format!("goes through the symlink {} {why}", link.display()))
            } else if g.no_exec.iter().any(|w| canon.starts_with(w) || w.starts_with(&canon)) {
                Some("is where the agent may write".to_string())
            } else {
                None
            };
            if let Some(why) = refused {
                plan.missing.push(format!("{shown}: {what} {} {why}, so it is not brought", literal.display()));
                continue;
            }
            let e = g.paths.entry(canon.clone()).or_default();
            e.exec = true;
            if literal != canon && !g.aliases.iter().any(|(a, _)| *a == literal) {
                g.aliases.push((literal.clone(), canon.clone()));
            }
            if !plan.brought.iter().any(|b| b.canonical == canon.display().to_string()) {
                plan.brought.push(Brought {
                    program: shown.clone(),
                    what,
                    path: literal.display().to_string(),
                    canonical: canon.display().to_string(),
                });
            }
        }
        for name in &deps.missing {
            plan.missing.push(format!("{shown}: library {name} is not on this host"));
        }
    }
    // The loader finds libraries faster, and where the author expects, through its cache.
    let cache = Path::new("/etc/ld.so.cache");
    if any_library && !g.visible(cache) {
        if let Ok(c) = fs.canonicalize(cache) {
            g.paths.entry(c).or_default().read = true;
        }
    }
    plan
}

/// The first symlink met while resolving `path` that the agent could replace, and why: it sits
/// inside a write grant of one of the agent's tools, or in a directory the agent's uid or gid
/// may write (and whose sticky bit does not protect the link). Whoever can replace it could
/// point the grant anywhere between two calls.
fn replaceable_symlink(
    path: &Path,
    writable: &[PathBuf],
    (uid, gid): (u32, u32),
    fs: &dyn HostFs,
) -> Option<(PathBuf, String)> {
    let mut resolved = PathBuf::from("/");
    for comp in path.components().skip(1) {
        let next = resolved.join(comp);
        if fs.read_link(&next).is_some() {
            if let Some(w) = writable.iter().find(|w| next.starts_with(w)) {
                return Some((next, format!("inside the writable grant {} of the agent's tools", w.display())));
            }
            let parent = fs.owner_mode(&resolved);
            let link_owner = fs.owner_mode(&next).map(|(u, ..)| u);
            if let Some((du, dg, mode)) = parent {
                // Its owner may always write it: it can chmod it first.
                let may_write = du == uid || (dg == gid && mode & 0o020 != 0) || mode & 0o002 != 0;
                let sticky_protects = mode & S_ISVTX != 0 && du != uid && link_owner != Some(uid);
                if may_write && !sticky_protects {
                    return Some((next, format!("in {}, which uid {uid} or gid {gid} may write", resolved.display())));
                }
            }
            resolved = fs.canonicalize(&next).ok()?;
        } else {
            resolved = next;
        }
    }
    None
}

/// Mounts (parents before children) and symlinks of the fresh root.
fn layout(g: &Grants, tool: &Tool, fs: &dyn HostFs) -> (Vec<Mount>, Vec<Symlink>) {
    let exec_paths: Vec<&PathBuf> = g.paths.iter().filter(|(_, v)| v.exec).map(|(p, _)| p).collect();
    let mut by_depth: Vec<(&PathBuf, &Grant)> = g.paths.iter().collect();
    by_depth.sort_by_key(|(p, _)| (p.components().count(), p.as_os_str().to_owned()));

    // The call's own /proc, /dev and /tmp first, so that grants below /tmp sit on top of it.
    // Sharing the host's network namespace, /proc/net would list the host's sockets: show
    // only the call's processes then.
    let mut mounts = vec![
        Mount::Proc { path: "/proc".into(), pids_only: tool.net.any() },
        Mount::Dev { path: "/dev".into(), nodes: DEV_NODES.iter().map(|n| n.to_string()).collect() },
    ];
    if tool.limits.tmp_mb > 0 {
        mounts.push(Mount::Tmpfs { path: "/tmp".into(), size_bytes: tool.limits.tmp_mb << 20 });
    }
    // Each mount is (path, writable, exec). A path is executable only inside an `exec` grant,
    // and the mount says so too (noexec elsewhere), so that mmap(PROT_EXEC) through the
    // dynamic loader cannot run files that execve may not.
    let in_exec = |p: &Path| exec_paths.iter().any(|e| p.starts_with(e));
    let mut mounted: Vec<(PathBuf, bool, bool)> = Vec::new();
    for (path, grant) in by_depth {
        let exec = in_exec(path);
        let cover = mounted.iter().filter(|(m, ..)| path.starts_with(m)).max_by_key(|(m, ..)| m.components().count());
        // Below a writable grant, a path is writable unless it is granted read-only itself.
        let writable = match cover {
            Some((_, w, _)) if !grant.read && !grant.write => *w,
            _ => grant.write,
        };
        let needs_mount = match cover {
            None => true,
            Some((_, w, x)) => *w != writable || *x != exec,
        };
        if needs_mount {
            mounted.push((path.clone(), writable, exec));
            mounts.push(Mount::Bind { path: path.display().to_string(), dir: grant.dir, writable, exec });
        }
    }
    let mut symlinks = Vec::new();
    let mut linked = BTreeSet::new();
    for link in ROOT_LINKS {
        let Some(target) = fs.read_link(Path::new(link)) else { continue };
        let absolute = Path::new("/").join(&target);
        if g.visible(&absolute) && !g.visible(Path::new(link)) {
            linked.insert(PathBuf::from(link));
            symlinks.push(Symlink { link: link.to_string(), target: target.display().to_string() });
        }
    }
    for (alias, canon) in &g.aliases {
        // Only where the alias would otherwise not exist: its parents are on the fresh root.
        let parent_on_root = alias.parent().is_none_or(|p| !g.visible(p));
        let under_link = linked.iter().any(|l| alias.starts_with(l));
        if parent_on_root && !under_link && !g.visible(alias) && linked.insert(alias.clone()) {
            symlinks.push(Symlink { link: alias.display().to_string(), target: canon.display().to_string() });
        }
    }
    (mounts, symlinks)
}

/// Where the DNS stub is named for the call's resolver.
const RESOLV_CONF: &str = "/etc/resolv.conf";

/// First port tried for the in-namespace HTTP proxy (the next free one if a grant uses it).
const PROXY_PORT: u16 = 3128;

fn network(tool: &Tool, g: &Grants) -> NetworkPlan {
    let ports = |list: &[crate::types::HostPort]| -> Vec<u16> {
        list.iter().map(|h| h.port.get()).collect::<BTreeSet<_>>().into_iter().collect()
    };
    let connect_ports = ports(&tool.net.connect);
    let forwarded = tool.net.any();
    // The proxy takes a port no grant uses: agentd listens on every address of the connect
    // ports, and a bind port would expose the proxy on the host.
    let bind_ports = ports(&tool.net.bind);
    let proxy = (PROXY_PORT..=u16::MAX)
        .find(|p| !connect_ports.contains(p) && !bind_ports.contains(p))
        .map(|p| std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), p));
    NetworkPlan {
        mode: if forwarded { NetMode::Forwarded } else { NetMode::Isolated },
        connect: tool.net.connect.clone(),
        bind: tool.net.bind.clone(),
        connect_ports,
        bind_ports,
        dns: forwarded.then_some(crate::net::DNS_STUB),
        proxy: proxy.filter(|_| forwarded && !tool.net.connect.is_empty()),
        unix: g.sockets.iter().map(|p| p.display().to_string()).collect(),
    }
}

/// The BPF layer's second check of the tool's own connects and binds, inside its namespace:
/// exact addresses where the grant has one, else the port on any address (ranges, names and
/// `*:PORT`, which agentd's listeners check first); and the DNS stub and the proxy.
fn bpf_net_rules(net: &NetworkPlan) -> Vec<NetRule> {
    let rule = |op, h: &crate::types::HostPort| NetRule {
        op,
        addr: match h.addr {
            HostAddr::Ip(ip) => Some(ip),
            _ => None,
        },
        port: h.port.get(),
    };
    let mut rules: Vec<NetRule> = net.connect.iter().map(|h| rule(NetOp::Connect, h)).collect();
    rules.extend(net.bind.iter().map(|h| rule(NetOp::Bind, h)));
    if let Some(dns) = net.dns {
        let v6 = std::net::SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), dns.port());
        for at in [dns, v6] {
            rules.push(NetRule { op: NetOp::Connect, addr: Some(at.ip()), port: at.port() });
        }
    }
    if let Some(p) = net.proxy {
        rules.push(NetRule { op: NetOp::Connect, addr: Some(p.ip()), port: p.port() });
    }
    rules
}

fn rights_for(rights: &[FsRight], dir: bool, abi: u32) -> Vec<FsRight> {
    let mut out: Vec<FsRight> =
        rights.iter().copied().filter(|r| r.min_abi() <= abi && (dir || r.applies_to_files())).collect();
    out.sort();
    out.dedup();
    out
}

fn landlock(manifest: &Manifest, host: &HostFacts, g: &Grants, tmp: bool) -> LandlockPlan {
    let abi = host.landlock_abi.min(PINNED_ABI);
    let mut rules = Vec::new();
    for (path, grant) in &g.paths {
        let mut want: Vec<FsRight> = Vec::new();
        if grant.read {
            want.extend_from_slice(access::READ);
        }
        if grant.write {
            want.extend_from_slice(access::WRITE);
        }
        if grant.exec {
            want.extend_from_slice(access::EXEC);
        }
        rules.push(LandlockRule {
            path: path.display().to_string(),
            origin: RuleOrigin::Host,
            rights: rights_for(&want, grant.dir, abi),
        });
    }
    let mut sandbox = vec![("/", access::ROOT), ("/proc", access::READ), ("/dev", access::DEV)];
    if tmp {
        sandbox.push(("/tmp", access::WRITE));
    }
    for (path, rights) in sandbox {
        rules.push(LandlockRule {
            path: path.into(),
            origin: RuleOrigin::Sandbox,
            rights: rights_for(rights, true, abi),
        });
    }

    let mut degraded = Vec::new();
    let dropped: Vec<String> = access::HANDLED.iter().filter(|r| r.min_abi() > abi).map(|r| format!("{r:?}")).collect();
    if abi == 0 {
        degraded.push("Landlock is unavailable: no filesystem or network rules apply beyond mounts".into());
    } else if !dropped.is_empty() {
        degraded.push(format!("ABI {abi} cannot restrict: {}", dropped.join(", ")));
    }
    if abi < NET_ABI {
        degraded.push(format!("ABI {abi} has no TCP port rules (needs {NET_ABI})"));
    }
    if abi < SCOPE_ABI {
        degraded.push(format!("ABI {abi} cannot scope signals and abstract unix sockets (needs {SCOPE_ABI})"));
    }
    LandlockPlan {
        abi_pinned: PINNED_ABI,
        abi_kernel: host.landlock_abi,
        abi_used: abi,
        abi_required: manifest.requires.landlock_abi,
        handled: rights_for(access::HANDLED, true, abi),
        handles_tcp: abi >= NET_ABI,
        scoped: abi >= SCOPE_ABI,
        resolve_unix: host.landlock_abi >= RESOLVE_UNIX_ABI && host.unix_gate,
        rules,
        degraded,
    }
}

fn requirements(manifest: &Manifest, host: &HostFacts, ll: &LandlockPlan, net: &NetworkPlan) -> Vec<Requirement> {
    let req = |feature: &str, required: bool, available: bool, note: String| Requirement {
        feature: feature.into(),
        level: if required { Level::Required } else { Level::BestEffort },
        available,
        note,
    };
    let need = manifest.requires.landlock_abi;
    let mut reqs = vec![
        req(
            "namespaces",
            true,
            true,
            "user, pid, mount, ipc, uts, cgroup and network namespaces".into(),
        ),
        req(
            "cgroup.limits",
            true,
            host.cgroup != CgroupFlavor::Unavailable,
            "memory, pids and cpu limits of the call's own cgroup".into(),
        ),
        req(
            "seccomp",
            true,
            true,
            "refuses io_uring, keyrings, bpf, perf events, userfaultfd and sockets other than TCP and UDP".into(),
        ),
        req(
            "landlock.fs",
            need >= 1,
            host.landlock_abi >= need.max(1),
            format!("filesystem rules; manifest requires ABI >= {need}, kernel has {}", host.landlock_abi),
        ),
        req(
            "landlock.net",
            false,
            ll.handles_tcp,
            match net.mode {
                NetMode::Forwarded => format!("TCP port rules (ABI {NET_ABI}) as a second check: the call has its own network namespace, where only agentd's listeners lead out"),
                NetMode::Isolated => "no network granted: the call has its own network namespace".into(),
            },
        ),
        req(
            "memfd.noexec",
            false,
            true,
            if host.memfd_noexec {
                "vm.memfd_noexec = 2 in the call's pid namespace: no executable memfds".into()
            } else {
                "memfd_create is refused by seccomp (no vm.memfd_noexec before Linux 6.3)".into()
            },
        ),
        req(
            "landlock.scope",
            false,
            ll.scoped,
            format!("signal and abstract-unix-socket scoping (ABI {SCOPE_ABI}); the host's abstract sockets are out of reach anyway, in another network namespace"),
        ),
        req("bpf_lsm", manifest.requires.bpf_lsm, host.bpf_lsm, "BPF LSM audit and enforcement".into()),
    ];
    if net.mode == NetMode::Forwarded {
        let bpf = host.bpf_lsm || host.bpf_fallback;
        reqs.push(req(
            "net.second_check",
            false,
            bpf,
            if bpf {
                "agentd's BPF programs check the tool's own connects and binds as well".into()
            } else {
                "only agentd's listeners check destinations (no BPF layer for a second check)".into()
            },
        ));
    }
    reqs
}
