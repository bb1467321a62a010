//! The agent is the unit: checks across an agent's tools, option injection, Unix socket
//! grants and the limits that bound a call's writes and memory.

use crate::tests::{call, FakeFs, HOST};
use crate::*;

fn manifest(tools: &str) -> Result<Manifest, Diagnostics> {
    parse("m.toml", &format!("version = 1\n[agent]\nname = 'a'\nuid = 4000\ngid = 4000\n{tools}"))
}

fn plan(tools: &str, tool: &str, args: &[(&str, &str)], fs: &FakeFs) -> Result<ExecPlan, String> {
    let m = manifest(tools).map_err(|d| d.to_string())?;
    compile(&m, &call(tool, args), &HOST, fs).map_err(|e| error_chain(&e))
}

const FIND: &str = "[tools.find]\nargv = ['/usr/bin/find', '/data', '-name', '{pattern}', '{extra}']\n\
                    [tools.find.fs]\nread = ['/data']\n";

#[test]
fn values_that_could_become_options_are_refused() {
    let fs = FakeFs::merged_usr();
    let run = |pattern: &str, extra: &str| plan(FIND, "find", &[("pattern", pattern), ("extra", extra)], &fs);
    // The attack: a "string" argument that a program reads as an option or an expression.
    for (pattern, extra) in [("*.txt", "-delete"), ("-delete", "x"), ("*.txt", "--exec=rm")] {
        let e = run(pattern, extra).expect_err("option-like value");
        assert!(e.contains("begins with '-' where the program could read it as an option"), "{e}");
    }
    // Positive controls: ordinary values, and a dash inside a value.
    assert_eq!(run("*.txt", "a-b").map(|p| p.argv.len()), Ok(5));
    // After a literal "--", or after literal text in the same element, a dash is only data.
    let after = "[tools.t]\nargv = ['/usr/bin/grep', '-e', '--regexp={q}', '--', '{file}', '{files}']\n\
                 [tools.t.args.q]\ntype = 'string'\n[tools.t.args.file]\ntype = 'string'\n\
                 [tools.t.args.files]\ntype = 'list'\nitems = 'string'\n";
    let p = plan(after, "t", &[("q", "-x"), ("file", "-f"), ("files", r#"["-a", "b"]"#)], &fs).expect("after --");
    assert_eq!(p.argv, ["/usr/bin/grep", "-e", "--regexp=-x", "--", "-f", "-a", "b"]);
    // Lists are checked item by item; an empty leading value does not hide the next one.
    let list = "[tools.t]\nargv = ['/usr/bin/ls', '{files}', '{a}{b}']\n[tools.t.args.files]\n\
                type = 'list'\nitems = 'string'\n[tools.t.args.a]\ntype = 'string'\n[tools.t.args.b]\ntype = 'string'\n";
    let e = plan(list, "t", &[("files", r#"["ok", "-R"]"#), ("a", "x"), ("b", "y")], &fs).expect_err("list item");
    assert!(e.contains("argument \"files\" begins with '-'"), "{e}");
    let e = plan(list, "t", &[("files", "[]"), ("a", ""), ("b", "-R")], &fs).expect_err("second placeholder");
    assert!(e.contains("argument \"b\" begins with '-'"), "{e}");
    // Negative numbers are options too, unless the manifest says the program expects them.
    let num = "[tools.t]\nargv = ['/usr/bin/seq', '{n}']\n[tools.t.args.n]\ntype = 'integer'\nmin = -5\nmax = 5\n";
    assert!(plan(num, "t", &[("n", "-3")], &fs).is_err());
    let allowed = num.replace("max = 5", "max = 5\nallow_leading_dash = true");
    assert_eq!(plan(&allowed, "t", &[("n", "-3")], &fs).map(|p| p.argv), Ok(vec!["/usr/bin/seq".into(), "-3".into()]));
}

#[test]
fn templates_where_an_argument_could_be_an_option_are_warned_about() {
    let warnings = |tools: &str| -> Vec<String> {
        let src = format!("version = 1\n[agent]\nname = 'a'\n{tools}");
        let (_, w) = parse_with_warnings("m.toml", &src).expect("valid");
        w.iter().map(ToString::to_string).collect()
    };
    let dash =
        "[tools.t]\nargv = ['/usr/bin/find', '{x}']\n[tools.t.args.x]\ntype = 'string'\nallow_leading_dash = true\n";
    let w = warnings(dash);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].starts_with("m.toml:5:1: warning: `tools.t.argv`: {x} starts an argv element"), "{w:?}");
    assert!(warnings(&dash.replace("'{x}'", "'--', '{x}'")).is_empty());
    assert!(warnings(&dash.replace("'{x}'", "'--name={x}'")).is_empty());
    let neg = "[tools.t]\nargv = ['/usr/bin/seq', '{n}']\n[tools.t.args.n]\ntype = 'integer'\nmin = -1\n";
    assert!(warnings(neg)[0].contains("negative values of {n} will be refused"), "{:?}", warnings(neg));
    assert!(warnings(&neg.replace("min = -1", "min = 0")).is_empty());
    // Warnings never refuse a manifest, and errors are reported without them.
    assert!(parse("m.toml", &format!("version = 1\n[agent]\nname = 'a'\n{dash}")).is_ok());
}

const WRITER_RUNNER: &str = "[tools.writer]\nargv = ['/usr/bin/tee', '/work/bin/x']\n\
     [tools.writer.fs]\nwrite = ['/work']\n\
     [tools.runner]\nargv = ['/work/bin/x']\n[tools.runner.fs]\nexec = ['/work/bin']\n";

#[test]
fn one_tool_may_not_write_where_another_executes() {
    let e = manifest(WRITER_RUNNER).expect_err("cross-tool write/exec");
    let d = &e.0[0];
    assert_eq!(d.key, "tools.runner.fs.exec");
    assert!(d.message.contains("overlaps `tools.writer.fs.write` path /work"), "{d}");
    assert_eq!((d.line, d.col), (13, 9), "{d}");
    // Both tools must opt in by name; one side is not enough.
    let one = WRITER_RUNNER.replace("write = ['/work']", "write = ['/work']\nexec_shared_with = ['runner']");
    assert!(manifest(&one).is_err());
    let both = one.replace("exec = ['/work/bin']", "exec = ['/work/bin']\nexec_shared_with = ['writer']");
    let m = manifest(&both).expect("mutual opt-in");
    let fs = FakeFs::merged_usr();
    assert!(compile(&m, &call("runner", &[]), &HOST, &fs).is_ok());
    let e = manifest(&one.replace("['runner']", "['ghost']")).expect_err("unknown tool");
    assert!(e.to_string().contains("names \"ghost\", which is not a tool or MCP server of this manifest"), "{e}");
    // A symlink must not hide the overlap from the literal check: /lib is /usr/lib.
    let aliased = "[tools.w]\nargv = ['/usr/bin/true']\n[tools.w.fs]\nwrite = ['/usr/lib']\n\
                   [tools.x]\nargv = ['/usr/bin/true']\n[tools.x.fs]\nexec = ['/lib']\n";
    let e = plan(aliased, "x", &[], &fs).expect_err("aliased overlap");
    assert!(e.contains("resolves into the writable grant /usr/lib of tool \"w\""), "{e}");
    // An MCP server of the agent is one of its units too.
    let server = "[mcp.m]\ncommand = ['/usr/bin/true']\ntools = ['t']\n[mcp.m.fs]\nwrite = ['/usr/lib']\n\
                  [tools.x]\nargv = ['/usr/bin/true']\n[tools.x.fs]\nexec = ['/lib']\n";
    let e = plan(server, "x", &[], &fs).expect_err("aliased overlap with an MCP server");
    assert!(e.contains("resolves into the writable grant /usr/lib of MCP server \"m\""), "{e}");
}

#[test]
fn grants_through_symlinks_the_agent_could_replace_are_refused() {
    let mut fs = FakeFs::merged_usr();
    // Another tool of the same agent writes where this tool's read grant resolves.
    let two = "[tools.w]\nargv = ['/usr/bin/true']\n[tools.w.fs]\nwrite = ['/work/out']\n\
               [tools.r]\nargv = ['/usr/bin/true']\n[tools.r.fs]\nread = ['/work/out/link']\n";
    let e = plan(two, "r", &[], &fs).expect_err("symlink in another tool's write grant");
    assert!(e.contains("symlink /work/out/link inside the writable grant /work/out of the agent's tools"), "{e}");
    // A symlink in a directory the agent's own uid may write (another agent, same uid).
    fs.dirs.insert("/srv/shared");
    fs.links.insert("/srv/shared/cfg", "/etc");
    fs.modes.insert("/srv/shared", (4000, 4000, 0o40_755));
    let one = "[tools.r]\nargv = ['/usr/bin/true']\n[tools.r.fs]\nread = ['/srv/shared/cfg']\n";
    let e = plan(one, "r", &[], &fs).expect_err("uid-writable directory");
    assert!(e.contains("in /srv/shared, which uid 4000 or gid 4000 may write"), "{e}");
    // A sticky, world-writable directory protects links that are not the agent's.
    fs.modes.insert("/srv/shared", (0, 0, 0o41_777));
    assert!(plan(one, "r", &[], &fs).is_ok());
    fs.modes.insert("/srv/shared/cfg", (4000, 4000, 0o120_777));
    assert!(plan(one, "r", &[], &fs).is_err(), "the agent owns the link in a sticky directory");
}

#[test]
fn a_kernel_filesystem_above_a_grant_is_refused() {
    let mut fs = FakeFs::merged_usr();
    fs.dirs.insert("/srv/ro/proc/1");
    let t = "[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nread = ['/srv/ro/proc/1']\n";
    let e = plan(t, "t", &[], &fs).expect_err("procfs holds the grant");
    assert!(e.contains("/srv/ro/proc (proc) holds it and would expose host kernel state"), "{e}");
}

#[test]
fn unix_grants_name_one_socket() {
    let mut fs = FakeFs::merged_usr();
    fs.dirs.insert("/run");
    fs.files.insert("/run/app.sock");
    fs.modes.insert("/run/app.sock", (0, 0, 0o140_666));
    fs.files.insert("/run/plain");
    let t = |p: &str| format!("[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.net]\nunix = ['{p}']\n");
    let p = plan(&t("/run/app.sock"), "t", &[], &fs).expect("a socket");
    assert_eq!(p.bpf.unix_sockets, ["/run/app.sock"]);
    assert_eq!(p.network.unix, ["/run/app.sock"]);
    assert!(p
        .mounts
        .iter()
        .any(|m| matches!(m, Mount::Bind { path, dir: false, writable: false, .. } if path == "/run/app.sock")));
    let e = plan(&t("/run"), "t", &[], &fs).expect_err("a directory");
    assert!(e.contains("is a directory: a unix grant names one listening socket"), "{e}");
    let e = plan(&t("/run/plain"), "t", &[], &fs).expect_err("a file");
    assert!(e.contains("is not a socket"), "{e}");
    // Without a grant, no host socket is allowed at all.
    let none = plan("[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nread = ['/run']\n", "t", &[], &fs);
    assert_eq!(none.map(|p| p.bpf.unix_sockets.len()), Ok(0));
}

#[test]
fn writes_are_bounded_and_memory_is_never_writable_and_executable_by_default() {
    let fs = FakeFs::merged_usr();
    let t = "[tools.t]\nargv = ['/usr/bin/true']\n";
    let p = plan(t, "t", &[], &fs).expect("plan");
    let fsize = p.rlimits.iter().find(|r| r.resource == RlimitResource::Fsize).expect("RLIMIT_FSIZE");
    assert_eq!((fsize.soft, fsize.hard), (1024 << 20, 1024 << 20));
    assert_eq!(p.write_execute, WriteExecute::Prctl);
    let old_kernel = HostFacts { mdwe: false, ..HOST };
    let m = manifest(t).expect("valid");
    let p = compile(&m, &call("t", &[]), &old_kernel, &fs).expect("plan");
    assert_eq!(p.write_execute, WriteExecute::Seccomp);
    let p = plan(&format!("{t}allow_jit = true\n[tools.t.limits]\nfile_mb = 5\n"), "t", &[], &fs).expect("plan");
    assert_eq!(p.write_execute, WriteExecute::Allowed);
    assert!(p.rlimits.iter().any(|r| r.resource == RlimitResource::Fsize && r.soft == 5 << 20));
}

#[test]
fn each_agent_gets_its_own_identity_unless_the_manifest_sets_one() {
    let id = |name: &str| agent_id(name);
    assert_ne!(id("billing"), id("support"));
    assert_eq!(id("billing"), id("billing"), "stable");
    for n in ["a", "billing", "x-very-long-agent-name-0123456789"] {
        assert!((AGENT_ID_BASE..AGENT_ID_BASE + AGENT_ID_COUNT).contains(&id(n)));
    }
    let src = |agent: &str| format!("version = 1\n[agent]\n{agent}\n[tools.t]\nargv = ['/usr/bin/true']\n");
    let m = parse("m.toml", &src("name = 'billing'")).expect("valid");
    assert_eq!((m.agent.uid, m.agent.gid, m.agent.derived_ids), (id("billing"), id("billing"), true));
    let m = parse("m.toml", &src("name = 'billing'\nuid = 1234")).expect("valid");
    assert_eq!((m.agent.uid, m.agent.gid, m.agent.derived_ids), (1234, id("billing"), false));
    // A derived id that a host account already has is refused, never shared.
    let mut fs = FakeFs::merged_usr();
    let m = parse("m.toml", &src("name = 'billing'")).expect("valid");
    assert!(compile(&m, &call("t", &[]), &HOST, &fs).is_ok());
    fs.taken_id = id("billing");
    let e = compile(&m, &call("t", &[]), &HOST, &fs).expect_err("taken");
    assert!(e.to_string().contains("but user taken"), "{e}");
    assert!(e.to_string().contains("set `agent.uid` and `agent.gid`"), "{e}");
    // An id the manifest chose is the author's decision.
    let m = parse("m.toml", &src(&format!("name = 'billing'\nuid = {0}\ngid = {0}", id("billing")))).expect("valid");
    assert!(compile(&m, &call("t", &[]), &HOST, &fs).is_ok());
}

/// `exec = ["/usr/bin/python3"]` means "this program, runnable": its loader and libraries
/// are brought, read-only and executable, where the loader opens them; nothing is brought
/// from where the agent writes, and what cannot be had is named.
#[test]
fn an_exec_grant_brings_the_programs_loader_and_libraries() {
    let mut fs = FakeFs::merged_usr();
    fs.files.extend(["/usr/bin/python3", "/usr/lib/ld-linux.so.2", "/usr/lib/libm.so.6", "/work/out/libevil.so"]);
    fs.elf.insert(
        "/usr/bin/python3",
        ElfDeps {
            interpreter: "/lib64/../lib/ld-linux.so.2".replace("/lib64/..", "").into(),
            libraries: vec![
                ("libm.so.6".into(), "/lib/libm.so.6".into()),
                ("libevil.so".into(), "/work/out/libevil.so".into()),
            ],
            missing: vec!["libgone.so.1".into()],
        },
    );
    let tools = "[tools.py]\nargv = ['/usr/bin/python3', '-c', 'pass']\n[tools.py.fs]\nexec = ['/usr/bin/python3']\n\
                 [tools.w]\nargv = ['/usr/bin/sh']\n[tools.w.fs]\nwrite = ['/work/out']\n";
    let p = plan(tools, "py", &[], &fs).expect("plan");
    let brought: Vec<(&str, &str)> = p.loader.brought.iter().map(|b| (b.what.as_str(), b.path.as_str())).collect();
    assert_eq!(brought, [("loader", "/lib/ld-linux.so.2"), ("libm.so.6", "/lib/libm.so.6")], "{:?}", p.loader);
    for file in ["/usr/lib/ld-linux.so.2", "/usr/lib/libm.so.6"] {
        assert!(
            p.mounts.iter().any(|m| matches!(m, Mount::Bind { path, exec: true, writable: false, .. } if path == file)),
            "{file}: {:?}",
            p.mounts
        );
    }
    // Where the loader looks, a link to the file (the fresh root has no /lib otherwise).
    assert!(
        p.symlinks.iter().any(|l| l.link == "/lib/libm.so.6" && l.target == "/usr/lib/libm.so.6"),
        "{:?}",
        p.symlinks
    );
    // Another tool writes /work/out: a library there could be planted, so it is not brought.
    assert!(p.loader.missing.iter().any(|m| m.contains("libevil.so") && m.contains("may write")), "{:?}", p.loader);
    assert!(p.loader.missing.iter().any(|m| m.contains("libgone.so.1")), "{:?}", p.loader);
    assert!(!p.mounts.iter().any(|m| matches!(m, Mount::Bind { path, .. } if path.contains("libevil"))));
}

/// A loader or library path is held to what a grant must pass: a crafted program naming a
/// directory, a kernel tree or a path through a link the agent can re-point brings nothing.
#[test]
fn a_crafted_program_brings_nothing_a_grant_could_not() {
    let mut fs = FakeFs::merged_usr();
    fs.files.extend(["/usr/bin/tool", "/usr/lib/libok.so"]);
    fs.elf.insert(
        "/usr/bin/tool",
        ElfDeps {
            interpreter: "/data".into(),
            libraries: vec![
                ("sys".into(), "/sys".into()),
                ("ok".into(), "/usr/lib/libok.so".into()),
                ("planted".into(), "/work/out/link/x".into()),
            ],
            missing: Vec::new(),
        },
    );
    let tools = "[tools.t]\nargv = ['/usr/bin/tool']\n[tools.t.fs]\nexec = ['/usr/bin/tool']\n\
                 [tools.w]\nargv = ['/usr/bin/sh']\n[tools.w.fs]\nwrite = ['/work/out']\n";
    let p = plan(tools, "t", &[], &fs).expect("plan");
    let brought: Vec<&str> = p.loader.brought.iter().map(|b| b.canonical.as_str()).collect();
    assert_eq!(brought, ["/usr/lib/libok.so"], "{:?}", p.loader);
    for what in ["/data is a directory", "/sys", "/work/out/link/x"] {
        assert!(p.loader.missing.iter().any(|m| m.contains(what)), "{what}: {:?}", p.loader.missing);
    }
    assert!(!p
        .mounts
        .iter()
        .any(|m| matches!(m, Mount::Bind { path, exec: true, .. } if path == "/data" || path == "/sys")));
}
