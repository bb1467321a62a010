//! Table-driven tests of parsing, validation and plan compilation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;

use crate::access::FsRight;
use crate::*;

pub(crate) const EXAMPLE: &str = r#"
version = 1

[agent]
name = "demo"

[tools.shell]
description = "Run a shell command"
argv = ["/bin/sh", "-c", "{command}"]

[tools.shell.fs]
read  = ["/usr", "/etc/ld.so.cache", "/data"]
write = ["/work/out"]
exec  = ["/usr/bin", "/usr/lib"]

[tools.shell.net]
connect = ["127.0.0.1:8080"]
bind    = []

[tools.shell.limits]
timeout_ms   = 5000
memory_mb    = 256
pids         = 64
cpu_percent  = 100
output_bytes = 1048576
tmp_mb       = 64

[tools.shell.env]
pass = ["LANG"]
set  = { PATH = "/usr/bin:/bin" }

[requires]
landlock_abi = 4
"#;

/// A merged-/usr host: /bin, /lib and /lib64 are links into /usr. Everything is root's and
/// 0755, except the entries of `modes`.
pub(crate) struct FakeFs {
    pub(crate) dirs: BTreeSet<&'static str>,
    pub(crate) files: BTreeSet<&'static str>,
    pub(crate) links: BTreeMap<&'static str, &'static str>,
    /// (uid, gid, mode) of particular paths, type bits included.
    pub(crate) modes: BTreeMap<&'static str, (u32, u32, u32)>,
    /// A uid that a host account has.
    pub(crate) taken_id: u32,
    /// What dynamic programs need, by canonical path.
    pub(crate) elf: BTreeMap<&'static str, ElfDeps>,
}

impl FakeFs {
    pub(crate) fn merged_usr() -> Self {
        Self {
            dirs: [
                "/usr",
                "/usr/bin",
                "/usr/lib",
                "/usr/lib64",
                "/usr/lib/python3.11",
                "/data",
                "/work",
                "/work/out",
                "/work/bin",
                "/etc",
                "/srv/ro",
                "/srv/ro/proc",
                "/srv/unreadable",
            ]
            .into(),
            files: ["/etc/ld.so.cache", "/usr/bin/sh"].into(),
            links: [
                ("/bin", "usr/bin"),
                ("/lib", "usr/lib"),
                ("/lib64", "usr/lib64"),
                ("/data/sys", "/sys"),
                ("/d", "/data"),
                ("/work/out/link", "/etc"),
            ]
            .into(),
            modes: BTreeMap::new(),
            taken_id: 1000,
            elf: BTreeMap::new(),
        }
    }
}

impl HostFs for FakeFs {
    fn canonicalize(&self, path: &Path) -> Result<PathBuf, String> {
        let s = path.to_str().unwrap_or_default();
        for (link, target) in &self.links {
            if let Ok(rest) = path.strip_prefix(link) {
                let t = Path::new("/").join(target);
                let t = if rest.as_os_str().is_empty() { t } else { t.join(rest) };
                return self.canonicalize(&t);
            }
        }
        if self.dirs.contains(s) || self.files.contains(s) || s == "/sys" {
            Ok(path.to_path_buf())
        } else {
            Err("No such file or directory".into())
        }
    }
    fn is_dir(&self, path: &Path) -> bool {
        self.dirs.contains(path.to_str().unwrap_or_default())
    }
    fn read_link(&self, path: &Path) -> Option<PathBuf> {
        self.links.get(path.to_str()?).map(PathBuf::from)
    }
    fn mounts_below(&self, path: &Path) -> Result<Vec<(PathBuf, String)>, String> {
        if path.starts_with("/srv/unreadable") {
            return Err("permission denied".into());
        }
        let table: String = [("/", "ext4"), ("/srv/ro/proc", "proc"), ("/usr", "ext4")]
            .iter()
            .enumerate()
            .map(|(i, (m, t))| format!("{i} 1 0:{i} / {m} rw - {t} x rw\n"))
            .collect();
        Ok(crate::mountinfo::mounts_below(&table, path))
    }
    fn elf_deps(&self, program: &Path) -> Option<ElfDeps> {
        self.elf.get(program.to_str()?).cloned()
    }
    fn account_with(&self, uid: u32, _gid: u32) -> Option<String> {
        (uid == self.taken_id).then(|| format!("user taken ({uid})"))
    }
    fn owner_mode(&self, path: &Path) -> Option<(u32, u32, u32)> {
        let s = path.to_str()?;
        if let Some(m) = self.modes.get(s) {
            return Some(*m);
        }
        if self.links.contains_key(s) {
            Some((0, 0, 0o120_777))
        } else if self.dirs.contains(s) || s == "/" {
            Some((0, 0, 0o40_755))
        } else if self.files.contains(s) {
            Some((0, 0, 0o100_644))
        } else {
            None
        }
    }
}

pub(crate) const HOST: HostFacts = HostFacts {
    landlock_abi: 7,
    cgroup: CgroupFlavor::Hybrid,
    bpf_lsm: false,
    memfd_noexec: true,
    bpf_fallback: false,
    mdwe: true,
    unix_gate: true,
};

pub(crate) fn call(tool: &str, args: &[(&str, &str)]) -> CallRequest {
    CallRequest {
        call_id: "c1".into(),
        tool: tool.into(),
        args: args.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        argv_override: None,
        agent_env: [("LANG".to_string(), "C.UTF-8".to_string()), ("SECRET".to_string(), "x".to_string())].into(),
    }
}

fn errors(src: &str) -> Vec<Diagnostic> {
    match parse("m.toml", src) {
        Ok(_) => Vec::new(),
        Err(d) => d.0,
    }
}

#[test]
fn the_issue_example_parses() {
    let m = parse("m.toml", EXAMPLE).expect("the documented example is valid");
    let shell = &m.tools[&Name::parse("shell").expect("name")];
    assert_eq!(shell.limits.pids, 64);
    assert_eq!(shell.net.connect[0].to_string(), "127.0.0.1:8080");
    assert_eq!(m.requires.landlock_abi, 4);
    assert_eq!((m.agent.uid, m.agent.gid), (agent_id("demo"), agent_id("demo")));
    assert!(m.agent.derived_ids);
}

#[test]
fn reports_every_error_with_position_key_and_suggestion() {
    let src = EXAMPLE
        .replace("read  =", "raed  =")
        .replace("pids         = 64", "pids         = 0")
        .replace("127.0.0.1:8080", "127.0.0.1:99999")
        .replace("\"/work/out\"", "\"work/out\"")
        .replace("[requires]", "[requires]\nlandlock = 3");
    let errs = errors(&src);
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    let want = [
        ("tools.shell.fs.raed", "did you mean `tools.shell.fs.read`?"),
        ("tools.shell.fs.write", "relative"),
        ("tools.shell.net.connect", "out of range"),
        ("tools.shell.limits.pids", "out of range 1..=65536"),
        ("requires.landlock", "did you mean `requires.landlock_abi`?"),
    ];
    assert_eq!(errs.len(), want.len(), "{shown:#?}");
    for ((key, text), d) in want.iter().zip(&errs) {
        assert_eq!(&d.key, key, "{shown:#?}");
        assert!(d.message.contains(text), "{d}");
        assert!(d.to_string().starts_with(&format!("m.toml:{}:{}: error: ", d.line, d.col)));
    }
    let raed_line = src.lines().position(|l| l.starts_with("raed")).map(|i| i + 1);
    assert_eq!(Some(errs[0].line), raed_line);
    assert_eq!(errs[0].col, 1);
}

#[test]
fn bad_manifests_table() {
    let cases: &[(&str, &str)] = &[
        ("", "missing `version`"),
        ("version = 2\n[agent]\nname='a'", "unsupported manifest version 2"),
        ("version = 1", "missing `[agent]`"),
        ("version = 1\n[agent]\nname = 'a b'", "not a valid name"),
        ("version = 1\n[agent]\nname='a'\nuid = 0", "out of range"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\n", "missing `tools.t.argv`"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = []", "must name a program"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['{x}']", "must be a literal program"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = 'sh'", "must be an array of strings, not a string"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh', 3]", "`tools.t.argv[1]` must be a string"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.fs]\nread = ['/']", "whole host"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.fs]\nread = ['/proc/self']", "reserved"),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.fs]\nread = ['/a/../b']", "'..'"),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.net]\nconnect = ['local host:80']",
            "not a host name",
        ),
        ("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.limits]\nmemory_mb = -1", "out of range"),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.limits]\ntimeout_ms = 1.5",
            "must be an integer",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.env]\npass=['A']\nset={A='x'}",
            "both passed and set",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['sh']\n[tools.t.env]\nset={'A=B'='x'}",
            "not a valid environment",
        ),
        ("version = 1\n[agent]\nname='a'\n[requires]\nbpf_lsm = 'yes'", "must be a boolean"),
        ("version = 1\n[agent]\nname='a'\n[requires]\nlandlock_abi = 65", "out of range 0..=64"),
        ("version = 1\n[agent\nname='a'", "TOML syntax"),
        ("version = 1\nversion = 1\n[agent]\nname='a'", "TOML syntax"),
        ("version = 99999999999999999999\n[agent]\nname='a'", "too large"),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '--x={l}']\n[tools.t.args.l]\ntype='list'",
            "must be a whole argv element",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{a}{b}']\n[tools.t.args.a]\noptional=true\n[tools.t.args.b]",
            "shares an argv element",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='number'\nmax=inf",
            "must be a finite number",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='number'\nmin=2\nmax=1.5",
            "min 2 is above max 1.5",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='boolean'\nmax=1",
            "does not apply to type \"boolean\"",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\nitems='integer'",
            "does not apply to type \"string\"",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='list'\nitems='list'",
            "must be one of",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\noptional='yes'",
            "`tools.t.args.n.optional` must be a boolean",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '-m', '{n}']\n[tools.t.args.n]\noptional=true",
            "would hand \"-m\" the next argument",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '-e', '{n}']\n[tools.t.args.n]\ntype='list'",
            "would hand \"-e\" the next argument",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\none_of=['naïve']",
            "must be printable ASCII",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\nmax_length=3\none_of=['four']",
            "at most max_length (3)",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='path'\n[tools.t.fs]\nread=['/srv/jos\u{00e9}']",
            "could not write a path under it",
        ),
        (
            "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['ls', '{n}']\n[tools.t.args.n]\ntype='number'\nmin=1e-16",
            "at most 15 decimals",
        ),
    ];
    for (src, want) in cases {
        let errs = errors(src);
        assert!(
            errs.iter().any(|e| e.message.contains(want)),
            "manifest {src:?}: expected an error containing {want:?}, got {errs:#?}"
        );
    }
}

#[test]
fn invalid_utf8_is_an_error_not_a_panic() {
    let err = parse_bytes("m.toml", b"version = 1\n\xff\xfe").expect_err("not UTF-8");
    assert!(err.0[0].message.contains("UTF-8"));
    assert_eq!(err.0[0].line, 2);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_bytes("fuzz.toml", &bytes);
    }

    #[test]
    fn never_panics_on_mutated_example(pos in 0usize..EXAMPLE.len(), cut in 0usize..40, insert in "[ -~\n]{0,12}") {
        let mut s = EXAMPLE.to_string();
        let pos = (0..=pos).rev().find(|p| s.is_char_boundary(*p)).unwrap_or(0);
        let end = (pos + cut).min(s.len());
        let end = (end..=s.len()).find(|p| s.is_char_boundary(*p)).unwrap_or(s.len());
        s.replace_range(pos..end, &insert);
        if let Err(d) = parse("fuzz.toml", &s) {
            prop_assert!(!d.0.is_empty());
            for e in d.0 {
                prop_assert!(e.line >= 1 && e.col >= 1);
            }
        }
    }
}

fn example_plan(host: &HostFacts) -> ExecPlan {
    let m = parse("m.toml", EXAMPLE).expect("valid");
    compile(&m, &call("shell", &[("command", "echo hi")]), host, &FakeFs::merged_usr()).expect("compiles")
}

#[test]
fn plan_of_the_example() {
    let plan = example_plan(&HOST);
    assert_eq!(plan.argv, ["/bin/sh", "-c", "echo hi"]);
    assert_eq!(plan.program_candidates, ["/bin/sh"]);
    let env: Vec<&str> = plan.env.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        env,
        [
            "ALL_PROXY",
            "HTTPS_PROXY",
            "HTTP_PROXY",
            "LANG",
            "NO_PROXY",
            "PATH",
            "all_proxy",
            "http_proxy",
            "https_proxy",
            "no_proxy"
        ]
    );
    assert!(plan.env.contains(&("HTTPS_PROXY".into(), "http://127.0.0.1:3128".into())));
    assert_eq!(plan.network.mode, NetMode::Forwarded);
    assert!(plan.namespaces.net, "an exact address is forwarded into the call's own namespace");
    assert_eq!(plan.network.connect_ports, [8080]);
    assert_eq!(plan.network.dns.map(|d| d.to_string()).as_deref(), Some("127.0.0.1:53"));
    assert_eq!(plan.cgroup.memory_bytes, 256 << 20);
    assert_eq!(plan.cgroup.cpu_quota_us, 100_000);
    let binds: Vec<(&str, bool, bool)> = plan
        .mounts
        .iter()
        .filter_map(|m| match m {
            Mount::Bind { path, writable, exec, .. } => Some((path.as_str(), *writable, *exec)),
            _ => None,
        })
        .collect();
    // /usr is noexec except the exec grants, which get their own mounts; /work/out is noexec.
    assert_eq!(
        binds,
        [
            ("/data", false, false),
            ("/usr", false, false),
            ("/etc/ld.so.cache", false, false),
            ("/usr/bin", false, true),
            ("/usr/lib", false, true),
            ("/work/out", true, false)
        ]
    );
    let links: Vec<(&str, &str)> = plan.symlinks.iter().map(|s| (s.link.as_str(), s.target.as_str())).collect();
    assert_eq!(links, [("/bin", "usr/bin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")]);
    assert!(plan.unmet_requirement().is_none());
    let rule = |p: &str| plan.landlock.rules.iter().find(|r| r.path == p).map(|r| r.rights.clone());
    assert_eq!(rule("/usr/bin"), Some(vec![FsRight::Execute, FsRight::ReadFile, FsRight::ReadDir]));
    assert_eq!(rule("/etc/ld.so.cache"), Some(vec![FsRight::ReadFile]), "directory rights are not put on files");
    let out = rule("/work/out").unwrap_or_default();
    assert!(out.contains(&FsRight::WriteFile) && !out.contains(&FsRight::Execute) && !out.contains(&FsRight::MakeChar));
    let tmp = rule("/tmp").unwrap_or_default();
    assert!(tmp.contains(&FsRight::MakeReg) && !tmp.contains(&FsRight::Execute));
}

#[test]
fn landlock_degrades_with_the_abi_and_refuses_below_the_requirement() {
    let plan = example_plan(&HostFacts { landlock_abi: 2, ..HOST });
    assert_eq!(plan.landlock.abi_used, 2);
    assert!(!plan.landlock.handles_tcp);
    assert!(!plan.landlock.handled.contains(&FsRight::Truncate));
    assert!(plan.landlock.degraded.iter().any(|d| d.contains("Truncate")));
    let unmet = plan.unmet_requirement().map(|r| r.feature.as_str());
    assert_eq!(unmet, Some("landlock.fs"), "the manifest requires ABI 4");

    let m = parse("m.toml", &EXAMPLE.replace("landlock_abi = 4", "landlock_abi = 2")).expect("valid");
    let plan =
        compile(&m, &call("shell", &[("command", "x")]), &HostFacts { landlock_abi: 2, ..HOST }, &FakeFs::merged_usr())
            .expect("compiles");
    assert_eq!(plan.unmet_requirement(), None, "a forwarded grant needs no Landlock network rules");
    // `*:PORT` is forwarded too.
    let any = EXAMPLE.replace("landlock_abi = 4", "landlock_abi = 2").replace("\"127.0.0.1:8080\"", "\"*:8080\"");
    let m = parse("m.toml", &any).expect("valid");
    let plan =
        compile(&m, &call("shell", &[("command", "x")]), &HostFacts { landlock_abi: 2, ..HOST }, &FakeFs::merged_usr())
            .expect("compiles");
    assert_eq!(plan.network.mode, NetMode::Forwarded);
    assert_eq!(plan.unmet_requirement(), None);

    let plan = example_plan(&HostFacts { landlock_abi: 7, ..HOST });
    assert_eq!(plan.landlock.abi_used, 6, "pinned to the tested ABI");
    assert!(plan.landlock.degraded.is_empty());
}

#[test]
fn defaults_fail_closed() {
    let src = "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nexec = ['/usr/bin']";
    let m = parse("m.toml", src).expect("valid");
    let plan =
        compile(&m, &call("t", &[]), &HostFacts { landlock_abi: 0, ..HOST }, &FakeFs::merged_usr()).expect("compiles");
    assert_eq!(plan.unmet_requirement().map(|r| r.feature.as_str()), Some("landlock.fs"));
    assert!(plan.namespaces.net && plan.network.mode == NetMode::Isolated);
    assert!(plan.env.is_empty(), "nothing from agentd's environment unless passed");
    let plan =
        compile(&m, &call("t", &[]), &HostFacts { cgroup: CgroupFlavor::Unavailable, ..HOST }, &FakeFs::merged_usr())
            .expect("compiles");
    assert_eq!(plan.unmet_requirement().map(|r| r.feature.as_str()), Some("cgroup.limits"));
    let m = parse("m.toml", &format!("{src}\n[requires]\nbpf_lsm = true")).expect("valid");
    let plan = compile(&m, &call("t", &[]), &HOST, &FakeFs::merged_usr()).expect("compiles");
    assert_eq!(plan.unmet_requirement().map(|r| r.feature.as_str()), Some("bpf_lsm"));
}

#[test]
fn compile_errors_table() {
    let m = parse("m.toml", EXAMPLE).expect("valid");
    let fs = FakeFs::merged_usr();
    let err = |req: CallRequest| error_chain(&compile(&m, &req, &HOST, &fs).expect_err("must fail"));
    assert!(err(call("nope", &[])).contains("has: shell"));
    assert!(err(call("shell", &[])).contains("--arg command=VALUE"));
    assert!(err(call("shell", &[("command", "x"), ("other", "y")])).contains("not used"));
    let mut r = call("shell", &[]);
    r.argv_override = Some(vec![]);
    assert!(err(r).contains("empty"));

    let typed = "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['/bin/ls', '{n}', '{l}']\n\
                 [tools.t.args.n]\ntype='number'\nmax=1\nallow_leading_dash=true\n[tools.t.args.l]\ntype='list'\nitems='boolean'\nmax_items=1";
    let typed = parse("t.toml", typed).expect("valid");
    let bad =
        |args: &[(&str, &str)]| error_chain(&compile(&typed, &call("t", args), &HOST, &fs).expect_err("must fail"));
    assert!(bad(&[("n", "1.5"), ("l", "[]")]).contains("outside"));
    assert!(bad(&[("n", "1e0"), ("l", "[]")]).contains("not a decimal number"));
    assert!(bad(&[("n", "0"), ("l", "[true, false]")]).contains("at most 1"));
    assert!(bad(&[("n", "0"), ("l", "[1]")]).contains("item 0 must be true or false"));
    assert!(bad(&[("n", "0"), ("l", "true")]).contains("not a JSON array"));
    assert!(bad(&[("n", "-0"), ("l", "[]")]).contains("negative zero"));
    let plan = compile(&typed, &call("t", &[("n", "-0.5"), ("l", "[true]")]), &HOST, &fs).expect("valid call");
    assert_eq!(plan.argv, ["/bin/ls", "-0.5", "true"]);

    let missing = parse("m.toml", &EXAMPLE.replace("\"/data\"", "\"/nonexistent\"")).expect("valid");
    let e = compile(&missing, &call("shell", &[("command", "x")]), &HOST, &fs).expect_err("missing path");
    assert!(e.to_string().contains("`tools.shell.fs.read` path /nonexistent"), "{e}");

    let escape = parse("m.toml", &EXAMPLE.replace("\"/data\"", "\"/data/sys\"")).expect("valid");
    let e = compile(&escape, &call("shell", &[("command", "x")]), &HOST, &fs).expect_err("symlink into /sys");
    assert!(e.to_string().contains("reserved"), "{e}");
}

#[test]
fn grants_that_could_be_redirected_or_expose_the_kernel_are_refused() {
    let fs = FakeFs::merged_usr();
    let tool = |fs_toml: &str| {
        let src = format!("version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['x']\n[tools.t.fs]\n{fs_toml}");
        parse("m.toml", &src)
    };
    let compile_err = |fs_toml: &str| {
        let m = tool(fs_toml).expect("valid manifest");
        compile(&m, &call("t", &[]), &HOST, &fs).map(|_| ()).map_err(|e| e.to_string())
    };
    let e = compile_err("write = ['/work/out']\nread = ['/work/out/link']").expect_err("symlink in a writable grant");
    assert!(e.contains("symlink /work/out/link inside the writable grant /work/out"), "{e}");
    let e = compile_err("read = ['/srv/ro']").expect_err("proc below the grant");
    assert!(e.contains("/srv/ro/proc (proc)"), "{e}");
    // A mount table that cannot be read refuses the grant rather than skipping the check.
    let e = compile_err("read = ['/srv/unreadable']").expect_err("unchecked grant");
    assert!(e.contains("cannot be checked for kernel filesystems mounted below it"), "{e}");
    // Writable and executable at once: refused by the parser (lexically) and the compiler.
    let e = tool("write = ['/work']\nexec = ['/work/bin']").expect_err("overlap");
    assert!(e.to_string().contains("overlaps"), "{e}");
    let e = tool("write = ['/work/bin']\nexec = ['/work']").expect_err("overlap");
    assert!(e.to_string().contains("overlaps"), "{e}");
    assert!(compile_err("read = ['/usr', '/work/out']\nexec = ['/usr/bin']").is_ok());
}

#[test]
fn override_argv_is_searched_in_path() {
    let m = parse("m.toml", EXAMPLE).expect("valid");
    let mut r = call("shell", &[]);
    r.argv_override = Some(vec!["ls".into(), "-l".into()]);
    let plan = compile(&m, &r, &HOST, &FakeFs::merged_usr()).expect("compiles");
    assert_eq!(plan.argv, ["ls", "-l"]);
    assert_eq!(plan.program_candidates, ["/usr/bin/ls", "/bin/ls"]);
}

#[test]
fn nested_grants_get_their_own_mounts() {
    let src = "version = 1\n[agent]\nname='a'\n[tools.t]\nargv = ['x']\n[tools.t.fs]\nwrite = ['/work']\nread = ['/work/out', '/d']";
    let m = parse("m.toml", src).expect("valid");
    let plan = compile(&m, &call("t", &[]), &HOST, &FakeFs::merged_usr()).expect("compiles");
    let binds: Vec<(&str, bool)> = plan
        .mounts
        .iter()
        .filter_map(|m| match m {
            Mount::Bind { path, writable, .. } => Some((path.as_str(), *writable)),
            _ => None,
        })
        .collect();
    assert_eq!(binds, [("/data", false), ("/work", true), ("/work/out", false)]);
    assert!(plan.symlinks.iter().any(|s| s.link == "/d" && s.target == "/data"), "{:?}", plan.symlinks);
}

/// The first TOML block of a Markdown file.
fn first_toml_block(markdown: &str) -> &str {
    markdown.split("```toml\n").nth(1).and_then(|b| b.split("```").next()).expect("a ```toml block")
}

/// The manifests shown to users, on the README's front page and at the top of the manifest
/// reference, are valid ones.
#[test]
fn the_documented_manifests_parse() {
    for (name, text) in
        [("README.md", include_str!("../../README.md")), ("docs/manifest.md", include_str!("../../docs/manifest.md"))]
    {
        if let Err(d) = parse(name, first_toml_block(text)) {
            panic!("the manifest in {name} is invalid:\n{d}");
        }
    }
}

/// Names, ranges and `*:PORT`: what each lets through, and the special ranges that only a
/// grant naming them reaches.
#[test]
fn network_grants_by_address_range_and_name() {
    let src = EXAMPLE.replace(
        "connect = [\"127.0.0.1:8080\"]",
        "connect = [\"127.0.0.1:8080\", \"10.0.0.0/8:5432\", \"api.example.com:443\", \"*.pypi.example:443\", \"*:80\", \"db.internal:5432\"]",
    );
    let m = parse("m.toml", &src).expect("valid");
    let plan = compile(&m, &call("shell", &[("command", "x")]), &HOST, &FakeFs::merged_usr()).expect("compiles");
    let net = &plan.network;
    assert_eq!(net.connect_ports, [80, 443, 5432, 8080]);
    let ok = |a: &str| net.allows_address(a.parse().expect("addr")).is_ok();
    assert!(ok("127.0.0.1:8080") && ok("[::ffff:127.0.0.1]:8080"), "the grant, however it is spelled");
    assert!(!ok("127.0.0.2:8080") && !ok("[::1]:8080") && !ok("127.0.0.1:8081"));
    assert!(ok("10.1.2.3:5432") && !ok("11.1.2.3:5432") && !ok("10.1.2.3:5433"));
    assert!(ok("93.184.216.34:80") && ok("[2606:2800:220:1::1]:80"), "*:80 is any public address");
    for special in ["127.0.0.1:80", "169.254.169.254:80", "192.168.1.1:80", "[::1]:80", "[::ffff:169.254.169.254]:80"] {
        assert!(!ok(special), "`*:80` must not reach {special}");
    }
    assert!(!ok("93.184.216.34:443"), "a name grant is not an address grant");
    assert_eq!(net.name_ports("API.example.com."), [443]);
    assert_eq!(net.name_ports("files.pypi.example"), [443]);
    assert!(net.name_ports("pypi.example").is_empty(), "a wildcard does not cover its parent");
    assert!(net.name_ports("evil.example.com").is_empty());
    let resolved = |ip: &str, port| net.allows_resolved(ip.parse().expect("ip"), port).is_ok();
    assert!(resolved("93.184.216.34", 443));
    assert!(!resolved("169.254.169.254", 443) && !resolved("127.0.0.1", 443) && !resolved("10.0.0.5", 443));
    assert!(resolved("10.0.0.5", 5432), "db.internal may resolve into the granted range");
    assert!(!resolved("192.168.0.5", 5432));
    let rules: Vec<String> = plan.bpf.net_rules.iter().map(|r| format!("{:?} {:?}:{}", r.op, r.addr, r.port)).collect();
    assert!(rules.contains(&"Connect Some(127.0.0.1):53".to_string()), "{rules:?}");
    assert!(rules.contains(&"Connect None:443".to_string()), "{rules:?}");
    // The proxy never takes a bind port (it would be exposed on the host).
    let src = EXAMPLE.replace("bind    = []", "bind    = [\"127.0.0.1:3128\"]");
    let m = parse("m.toml", &src).expect("valid");
    let plan = compile(&m, &call("shell", &[("command", "x")]), &HOST, &FakeFs::merged_usr()).expect("compiles");
    assert_eq!(plan.network.proxy.map(|p| p.port()), Some(3129));

    for (bad, why) in [
        ("bind = [\"api.example.com:80\"]\nconnect = []", "bind grants are an address"),
        ("udp = [\"1.2.3.4:53\"]", "UDP grants are not supported"),
        ("connect = [\"*.com:443\"]", "at least two labels"),
        ("connect = [\"127.0.0.1:9000\"]\nbind = [\"127.0.0.1:9000\"]", "also a connect port"),
    ] {
        let src = EXAMPLE.replace("connect = [\"127.0.0.1:8080\"]\nbind    = []", bad);
        let err = parse("m.toml", &src).expect_err(bad).to_string();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

const MCP: &str = r#"
version = 1
[agent]
name = "files"
[tools.notes]
argv = ["/bin/cat", "/srv/docs/notes"]
[tools.notes.fs]
read = ["/usr", "/srv/docs"]
exec = ["/usr/bin"]
[mcp.files]
command = ["/usr/bin/node", "/opt/mcp/server-filesystem/dist/index.js", "/"]
lifetime = "session"
tools = ["read_text_file", "list_directory"]
[mcp.files.fs]
read = ["/srv/docs", "/usr", "/opt/mcp/server-filesystem"]
exec = ["/usr/bin", "/usr/lib", "/opt/mcp/server-filesystem"]
[mcp.files.limits]
timeout_ms = 10000
"#;

#[test]
fn mcp_servers_parse_like_tools() {
    let m = parse("m.toml", MCP).expect("valid");
    let files = &m.mcp[&Name::parse("files").expect("name")];
    assert_eq!(files.lifetime, McpLifetime::Session);
    assert_eq!(files.tools, ["read_text_file", "list_directory"]);
    assert_eq!(files.sandbox.argv.len(), 3);
    assert_eq!(files.sandbox.argv[0].literal(), Some("/usr/bin/node"));
    assert_eq!(files.sandbox.limits.timeout_ms, 10000);
    assert_eq!(files.sandbox.fs.exec.len(), 3);
    let call = parse("m.toml", &MCP.replace("lifetime = \"session\"\n", "")).expect("valid");
    assert_eq!(call.mcp[&Name::parse("files").expect("name")].lifetime, McpLifetime::Call);
    assert_eq!(files.listing_sha256, None);
    let pin = "ab".repeat(32);
    let pinned =
        parse("m.toml", &MCP.replace("lifetime = \"session\"", &format!("listing_sha256 = \"{pin}\""))).expect("valid");
    assert_eq!(pinned.mcp[&Name::parse("files").expect("name")].listing_sha256.as_deref(), Some(pin.as_str()));
}

#[test]
fn bad_mcp_servers_are_located_errors() {
    let cases: &[(&str, &str, &str)] = &[
        ("lifetime = \"session\"", "lifetime = \"forever\"", "mcp.files.lifetime"),
        ("tools = [\"read_text_file\", \"list_directory\"]\n", "", "mcp.files.tools"),
        ("tools = [\"read_text_file\", \"list_directory\"]", "tools = []", "mcp.files.tools"),
        ("tools = [\"read_text_file\", \"list_directory\"]", "tools = [\"read file\"]", "mcp.files.tools"),
        ("\"/opt/mcp/server-filesystem/dist/index.js\", \"/\"]", "\"{root}\"]", "mcp.files.command"),
        ("command = [\"/usr/bin/node\"", "comand = [\"/usr/bin/node\"", "mcp.files.comand"),
        ("[mcp.files.limits]", "[mcp.files.limits]\npids = 0", "mcp.files.limits.pids"),
        ("[mcp.files]", "[mcp.notes]", "mcp.notes"),
        ("lifetime = \"session\"", "lifetime = \"session\"\nlisting_sha256 = \"ABC\"", "mcp.files.listing_sha256"),
        (
            "exec = [\"/usr/bin\", \"/usr/lib\", \"/opt/mcp/server-filesystem\"]",
            "exec = [\"/srv/docs/bin\"]\nwrite = [\"/srv/docs/bin\"]",
            "mcp.files.fs.exec",
        ),
    ];
    for (from, to, key) in cases {
        let src = MCP
            .replacen(from, to, 1)
            .replace("[mcp.files.", if to.contains("[mcp.notes]") { "[mcp.notes." } else { "[mcp.files." });
        let errs = errors(&src);
        assert!(errs.iter().any(|d| d.key == *key && d.line > 0), "{to:?}: want an error at {key}, got {errs:#?}");
    }
    // An MCP server that executes where a tool writes, as for two tools.
    let src = MCP.replace("exec = [\"/usr/bin\"]", "exec = [\"/usr/bin\"]\nwrite = [\"/opt/mcp/server-filesystem/x\"]");
    let errs = errors(&src);
    assert!(
        errs.iter().any(|d| d.key == "mcp.files.fs.exec" && d.message.contains("`tools.notes.fs.write`")),
        "{errs:#?}"
    );
}
