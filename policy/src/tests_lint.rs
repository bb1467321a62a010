//! The policy author's tools: over-broad findings, diffs, and tests files with their static
//! checks.

use std::path::Path;

use crate::cases::{self, Expect};
use crate::diff::{diff, Direction};
use crate::lint::{self, Risk};
use crate::tests::{call, FakeFs, HOST};
use crate::*;

fn manifest(tools: &str) -> Manifest {
    parse("m.toml", &format!("version = 1\n[agent]\nname = 'a'\nuid = 4000\ngid = 4000\n{tools}"))
        .unwrap_or_else(|d| panic!("{d}"))
}

fn codes(m: &Manifest) -> Vec<(&'static str, String, Risk)> {
    lint::lint(m).into_iter().map(|f| (f.code, f.subject, f.risk)).collect()
}

#[test]
fn secrets_and_homes_are_known_by_path() {
    for (p, secret) in [
        ("/home/bob/.ssh/id_ed25519", true),
        ("/home/bob/.aws", true),
        ("/root/notes", true),
        ("/etc/shadow", true),
        ("/etc/ssh/ssh_host_ed25519_key", true),
        ("/home/bob/project", false),
        ("/etc/shadowx", false),
        ("/usr/share/doc", false),
    ] {
        assert_eq!(lint::secret(Path::new(p)).is_some(), secret, "{p}");
    }
    assert_eq!(lint::home_of(Path::new("/home/bob/src")), Some("/home/bob".into()));
    assert_eq!(lint::home_of(Path::new("/home")), None);
}

#[test]
fn over_broad_grants_are_found_with_their_risk() {
    let m = manifest(
        "[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nread = ['/home/alice', '/etc', '/srv/data']\n\
         write = ['/home/bob/.ssh']\n[tools.t.net]\n\
         connect = ['*:443', '*.example.com:443', '169.254.169.254:80', '10.0.0.0/8:5432', 'api.example.com:443']\n\
         bind = ['0.0.0.0:81']\nunix = ['/run/docker.sock']\n[tools.t.env]\npass = ['GITHUB_TOKEN', 'LANG']\n",
    );
    let found = codes(&m);
    let has = |code: &str, subject: &str, risk: Risk| {
        assert!(found.iter().any(|(c, s, r)| *c == code && s == subject && *r == risk), "{code} {subject}: {found:#?}")
    };
    has("home", "/home/alice", Risk::High);
    has("secret", "/home/bob/.ssh", Risk::High);
    has("wholesale", "/etc", Risk::Medium);
    has("holds_secrets", "/etc", Risk::High);
    has("any_address", "*:443", Risk::High);
    has("wildcard_name", "*.example.com:443", Risk::Medium);
    has("special_range", "169.254.169.254:80", Risk::High);
    has("special_range", "10.0.0.0/8:5432", Risk::Medium);
    has("bind_any", "0.0.0.0:81", Risk::Medium);
    has("low_port_bind", "0.0.0.0:81", Risk::Medium);
    has("root_socket", "/run/docker.sock", Risk::High);
    has("secret_env", "GITHUB_TOKEN", Risk::Medium);
    // Nothing is said of what is narrow.
    for quiet in ["/srv/data", "api.example.com:443", "LANG"] {
        assert!(!found.iter().any(|(_, s, _)| s == quiet), "{quiet}: {found:#?}");
    }
    // A home directory is one finding, not also "holds credentials".
    assert!(!found.iter().any(|(c, s, _)| *c == "holds_secrets" && s == "/home/alice"), "{found:#?}");
}

#[test]
fn a_narrow_manifest_has_no_findings() {
    let m = manifest(
        "[tools.t]\nargv = ['/usr/bin/grep', '{p}', '/srv/notes']\n[tools.t.fs]\nread = ['/usr', '/srv/notes']\n\
         exec = ['/usr/bin']\n[tools.t.net]\nconnect = ['api.example.com:443']\n",
    );
    assert_eq!(lint::lint(&m), Vec::new());
}

#[test]
fn write_grants_the_agent_cannot_write_are_found_with_the_fix() {
    let m = manifest("[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nwrite = ['/work/out', '/data']\n");
    let mut fs = FakeFs::merged_usr();
    // /work/out is the agent's; /data is root's 0755.
    fs.modes.insert("/work/out", (4000, 4000, 0o40_755));
    let found = lint::host_findings(&m, &fs);
    let unwritable: Vec<&str> = found.iter().filter(|f| f.code == "not_writable").map(|f| f.subject.as_str()).collect();
    assert_eq!(unwritable, ["/data"]);
    assert!(found[0].message.contains("chown 4000:4000"), "{}", found[0].message);
    // A parent without search permission for the agent hides a writable directory.
    fs.modes.insert("/work", (0, 0, 0o40_700));
    let found = lint::host_findings(&m, &fs);
    assert!(found.iter().any(|f| f.subject == "/work/out" && f.message.contains("cannot reach it")), "{found:#?}");
    // Group write for the agent's gid is enough.
    fs.modes.insert("/work", (0, 0, 0o40_755));
    fs.modes.insert("/data", (0, 4000, 0o40_775));
    assert!(lint::host_findings(&m, &fs).iter().all(|f| f.code != "not_writable"));
}

#[test]
fn interpreter_libraries_granted_read_only_are_pointed_out() {
    let fs = FakeFs::merged_usr();
    let py = manifest(
        "[tools.t]\nargv = ['/usr/bin/python3', '-c', 'pass']\n[tools.t.fs]\nread = ['/usr']\nexec = ['/usr/bin']\n",
    );
    let found = lint::host_findings(&py, &fs);
    assert!(found.iter().any(|f| f.code == "noexec_library" && f.subject == "/usr"), "{found:#?}");
    // With the library tree executable, or for a program that is no interpreter, nothing.
    let fixed = manifest(
        "[tools.t]\nargv = ['/usr/bin/python3', '-c', 'pass']\n[tools.t.fs]\nread = ['/usr']\nexec = ['/usr/bin', '/usr/lib']\n",
    );
    assert!(lint::host_findings(&fixed, &fs).iter().all(|f| f.code != "noexec_library"));
    let grep =
        manifest("[tools.t]\nargv = ['/usr/bin/grep', 'x']\n[tools.t.fs]\nread = ['/usr']\nexec = ['/usr/bin']\n");
    assert!(lint::host_findings(&grep, &fs).iter().all(|f| f.code != "noexec_library"));
}

#[test]
fn diff_says_what_widens_and_what_is_already_covered() {
    let old = manifest(
        "[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nread = ['/srv']\n[tools.t.limits]\nmemory_mb = 64\n\
         [tools.gone]\nargv = ['/usr/bin/true']\n",
    );
    let new = manifest(
        "[tools.t]\nargv = ['/usr/bin/true']\n[tools.t.fs]\nread = ['/srv', '/srv/a', '/home/alice']\n\
         [tools.t.net]\nconnect = ['*:443']\n[tools.t.limits]\nmemory_mb = 32\n[tools.new]\nargv = ['/usr/bin/true']\n",
    );
    let d = diff(&old, &new, None);
    assert!(d.wider);
    let unit = |u: &str| d.units.iter().find(|x| x.unit == u).unwrap_or_else(|| panic!("{u}: {d}"));
    assert_eq!(unit("tools.new").status, "added");
    assert_eq!(unit("tools.gone").status, "removed");
    let t = unit("tools.t");
    let change = |what: &str| t.changes.iter().find(|c| c.what == what).unwrap_or_else(|| panic!("{what}: {d}"));
    assert_eq!(change("+ /home/alice").direction, Direction::Wider);
    assert_eq!(change("+ /srv/a").direction, Direction::Neutral);
    assert_eq!(change("+ *:443").direction, Direction::Wider);
    assert_eq!(change("64 -> 32 (tighter)").direction, Direction::Narrower);
    // The findings are those of what is new only.
    let codes: Vec<&str> = t.new_findings.iter().map(|f| f.code).collect();
    assert_eq!(codes, ["any_address", "home"], "{d}");
    // Nothing changed: nothing to say.
    let same = diff(&old, &old, None);
    assert!(same.units.is_empty() && !same.wider, "{same}");
    // One tool only.
    assert!(diff(&old, &new, Some("t")).units.iter().all(|u| u.unit == "tools.t"));
}

#[test]
fn tests_files_have_located_errors() {
    let bad = "[[case]]\nname = 'x'\ntool = 't'\nexpect = 'allow'\nexpcet = 1\n";
    let e = cases::parse_tests("t.toml", bad).expect_err("unknown key").to_string();
    assert!(e.starts_with("t.toml:5:1: error:") && e.contains("expcet"), "{e}");
    let two = "[[check]]\ntool = 't'\ncan_read = '/a'\ncan_write = '/b'\n";
    let e = cases::parse_tests("t.toml", two).expect_err("two questions").to_string();
    assert!(e.contains("t.toml:1:1") && e.contains("exactly one"), "{e}");
    let deny_kind = "[[case]]\nname = 'x'\ntool = 't'\nexpect = 'deny'\ndenial = 'fs_raed'\n";
    let e = cases::parse_tests("t.toml", deny_kind).expect_err("bad kind").to_string();
    assert!(e.contains("t.toml:5") && e.contains("fs_read"), "{e}");
    let table_arg = "[[case]]\nname = 'x'\ntool = 't'\nexpect = 'allow'\nargs = { a = { b = 1 } }\n";
    assert!(cases::parse_tests("t.toml", table_arg).is_err());
}

#[test]
fn static_checks_are_answered_from_the_plan() {
    let m = manifest(
        "[tools.t]\nargv = ['/usr/bin/sh']\n[tools.t.fs]\nread = ['/usr', '/data']\nwrite = ['/work/out']\n\
         exec = ['/usr/bin']\n[tools.t.net]\nconnect = ['api.example.com:443', '127.0.0.1:8080']\n",
    );
    let plan = compile(&m, &call("t", &[]), &HOST, &FakeFs::merged_usr()).expect("plan");
    let ask = |src: &str| {
        let f = cases::parse_tests("t.toml", &format!("[[check]]\ntool = 't'\n{src}\n")).expect("parses");
        cases::answer(&f.checks[0], &plan, &|p: &str| p.to_string())
    };
    for yes in [
        "can_read = '/data/x'",
        "can_write = '/work/out/report'",
        "can_exec = '/usr/bin/sh'",
        "can_connect = 'api.example.com:443'",
        "can_connect = '127.0.0.1:8080'",
        "can_read = '/etc/shadow'\nexpect = 'deny'",
        "can_write = '/data/x'\nexpect = 'deny'",
        "can_exec = '/data/x'\nexpect = 'deny'",
        "can_connect = 'api.example.com:80'\nexpect = 'deny'",
        "can_connect = '10.0.0.1:443'\nexpect = 'deny'",
        // The call's /tmp is its own empty tmpfs: the host's files there are not visible.
        "can_read = '/tmp/host-file'\nexpect = 'deny'",
    ] {
        assert!(ask(yes).is_ok(), "{yes}: {:?}", ask(yes));
    }
    let wrong = ask("can_write = '/data/x'").expect_err("read-only");
    assert!(wrong.contains("read-only"), "{wrong}");
    let hidden = ask("can_read = '/home/x'").expect_err("hidden");
    assert!(hidden.contains("not visible"), "{hidden}");
    assert_eq!(
        cases::parse_tests("t.toml", "[[check]]\ntool = 't'\ncan_read = '/a'\n").map(|f| f.checks[0].expect).ok(),
        Some(Expect::Allow)
    );
}

fn files(paths: &[&str]) -> std::collections::BTreeMap<std::path::PathBuf, u64> {
    paths.iter().map(|p| (std::path::PathBuf::from(p), 1)).collect()
}

fn grants(paths: &[&str]) -> Vec<String> {
    crate::draft::group(&files(paths)).into_iter().map(|d| d.grant).collect()
}

#[test]
fn drafts_group_files_no_wider_than_the_rule() {
    // A package's directory takes the place of its files.
    assert_eq!(
        grants(&["/usr/lib/python3.11/os.py", "/usr/lib/python3.11/json/a.py", "/usr/lib/python3.11/json/b.py"]),
        ["/usr/lib/python3.11"]
    );
    // Shared trees, homes and secrets are never granted whole.
    assert_eq!(grants(&["/etc/passwd", "/etc/group"]), ["/etc/group", "/etc/passwd"]);
    assert_eq!(grants(&["/etc/ssh/ssh_config", "/etc/ssh/moduli"]), ["/etc/ssh/moduli", "/etc/ssh/ssh_config"]);
    assert_eq!(grants(&["/home/al/.bashrc", "/home/al/notes"]), ["/home/al/.bashrc", "/home/al/notes"]);
    assert_eq!(grants(&["/home/al/.config/a", "/home/al/.config/b"]), ["/home/al/.config/a", "/home/al/.config/b"]);
    assert_eq!(grants(&["/usr/lib/x86_64-linux-gnu/a.so", "/usr/lib/x86_64-linux-gnu/b.so"]).len(), 2);
    // A project in a home, or a deep enough tree, is a directory.
    assert_eq!(grants(&["/home/al/proj/a.c", "/home/al/proj/src/b.c"]), ["/home/al/proj"]);
    assert_eq!(grants(&["/etc/ssl/certs/a.pem", "/etc/ssl/certs/b.pem"]), ["/etc/ssl/certs"]);
    // The host's accounts' homes, wherever they are, are never granted whole.
    let homes = [std::path::PathBuf::from("/var/lib/postgresql")];
    let pg = crate::draft::group_among(&files(&["/var/lib/postgresql/a", "/var/lib/postgresql/b"]), &homes);
    assert_eq!(pg.len(), 2);
    // One file stays a file.
    assert_eq!(grants(&["/usr/share/zoneinfo/UTC"]), ["/usr/share/zoneinfo/UTC"]);
    for dir in crate::draft::NEVER {
        assert!(!crate::draft::groupable(Path::new(dir)), "{dir}");
    }
}

#[test]
fn a_draft_is_a_valid_section_with_its_evidence_and_headroom() {
    let obs = crate::draft::Observed {
        calls: 2,
        argv: vec!["/usr/bin/python3".into(), "/srv/app/run.py".into()],
        reads: files(&["/srv/app/run.py", "/srv/app/lib/util.py", "/etc/passwd"]),
        // /etc on the way to /etc/passwd; /usr/share listed for itself.
        listed: files(&["/etc", "/usr/share"]),
        writes: files(&["/srv/out/report.txt", "/srv/out/log.txt"]),
        // A program inside a directory granted for libraries stays a grant of its own (that
        // is what brings its libraries).
        programs: files(&["/usr/bin/python3", "/usr/lib/python3.11/lib-dynload/helper"]),
        mapped: files(&["/usr/lib/python3.11/lib-dynload/_json.so", "/usr/lib/python3.11/lib-dynload/_csv.so"]),
        connects: [("api.example.com:443".to_string(), 3)].into(),
        peaks: lint::Peaks { calls: 2, duration_ms: 1500, memory_mb: 40, pids: 3, output_bytes: 100 },
        homes: Vec::new(),
    };
    let (text, findings) = crate::draft::draft("app", &obs, None, "audit.jsonl");
    let m =
        parse("m.toml", &format!("version = 1\n[agent]\nname = 'a'\n{text}")).unwrap_or_else(|d| panic!("{d}\n{text}"));
    let t = &m.tools[&Name::parse("app").expect("name")];
    let read: Vec<String> = t.fs.read.iter().map(ToString::to_string).collect();
    assert_eq!(read, ["/etc/passwd", "/srv/app"], "{text}");
    assert_eq!(t.fs.write.iter().map(ToString::to_string).collect::<Vec<_>>(), ["/srv/out"], "{text}");
    let exec: Vec<String> = t.fs.exec.iter().map(ToString::to_string).collect();
    assert_eq!(
        exec,
        ["/usr/bin/python3", "/usr/lib/python3.11/lib-dynload", "/usr/lib/python3.11/lib-dynload/helper"],
        "{text}"
    );
    assert_eq!(t.net.connect.iter().map(ToString::to_string).collect::<Vec<_>>(), ["api.example.com:443"]);
    assert_eq!((t.limits.timeout_ms, t.limits.memory_mb, t.limits.pids), (6000, 160, 12), "{text}");
    assert!(text.contains("\"/srv/app\",  # 2 reads, e.g. /srv/app/lib/util.py"), "{text}");
    assert!(text.contains("listed but not granted (shared trees the rule keeps whole): /usr/share\n"), "{text}");
    assert!(findings.is_empty(), "{findings:?}");
}

#[test]
fn a_sample_of_each_argument_kind_is_a_value_it_accepts() {
    let m = manifest(
        "[tools.t]\nargv = ['/usr/bin/x', '{s}', '{o}', '{i}', '{n}', '{p}', '{b}', '{l}', '{neg}']\n[tools.t.fs]\nread = ['/data']\n\
         [tools.t.args.s]\nmax_length = 2\n[tools.t.args.o]\none_of = ['a', 'b']\n[tools.t.args.i]\ntype = 'integer'\nmin = 5\nmax = 9\n\
         [tools.t.args.n]\ntype = 'number'\nmin = 0.25\nmax = 0.5\n[tools.t.args.p]\ntype = 'path'\n\
         [tools.t.args.b]\ntype = 'boolean'\n[tools.t.args.l]\ntype = 'list'\nitems = 'integer'\n\
         [tools.t.args.neg]\ntype = 'integer'\nmin = -9\nmax = -3\nallow_leading_dash = true\n",
    );
    for spec in &m.tools[&Name::parse("t").expect("name")].args {
        let v = spec.kind.sample(spec.name.as_str());
        assert_eq!(spec.kind.check(&v), Ok(()), "{}: {v:?}", spec.name);
    }
}
