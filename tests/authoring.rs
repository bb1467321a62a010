//! The policy author's loop through the real binary: `policy test` runs a tests file for real
//! (and fails when a manifest does not do what it says), `lint`, `diff` and `schema`, and the
//! fixes an author asked for (`ok_exit`, "not found" in `audit show`, a closed pipe).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use agentd_tests::{agentd, agentd_bin, audit_log_for, exec, sandbox_ready, stage_demo, Fixture};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The demo's tests file, pointed at the fixture's copy of the demo.
fn stage_demo_tests(fx: &Fixture) -> PathBuf {
    let (manifest, _) = stage_demo(fx);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let shipped = fs::read_to_string(root.join("examples/demo/agent.tests.toml")).expect("the demo's tests");
    let tests =
        shipped.replace("/tmp/agentd-demo/data", &fx.path("data")).replace("/tmp/agentd-demo/out", &fx.path("out"));
    let path = fx.dir.join("agent.tests.toml");
    fs::write(&path, tests).expect("write tests");
    assert_eq!(manifest, fx.dir.join("agent.toml"));
    path
}

#[test]
fn policy_test_runs_every_case_for_real_and_writes_junit() {
    if !sandbox_ready("policy_test_runs_every_case_for_real_and_writes_junit") {
        return;
    }
    let fx = Fixture::new("ptest");
    let tests = stage_demo_tests(&fx);
    let junit = fx.dir.join("junit.xml");
    let out = agentd(["policy".as_ref(), "test".as_ref(), fx.dir.as_os_str(), "--junit".as_ref(), junit.as_os_str()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let cases = fs::read_to_string(&tests).expect("tests").matches("[[case]]").count();
    let checks = fs::read_to_string(&tests).expect("tests").matches("[[check]]").count();
    assert!(stdout.contains(&format!("{} passed, 0 failed", cases + checks)), "{stdout}");
    // The evidence is the sandbox's: the refused write names the read-only mount.
    assert!(stdout.contains("EROFS by mount"), "{stdout}");
    let xml = fs::read_to_string(&junit).expect("junit written");
    assert!(xml.contains(&format!("tests=\"{}\" failures=\"0\"", cases + checks)), "{xml}");
    assert_eq!(xml.matches("<testcase ").count(), cases + checks, "{xml}");

    // A tests file that claims what the manifest does not do fails, with the evidence. The
    // secret of the fixture is outside every grant: a case that expects to read it fails, and
    // one that expects the read refused passes; the secret appears nowhere.
    let secret = fx.path("secret/token");
    let extra = format!(
        "\n[[case]]\nname = 'claims the secret is readable'\ntool = 'shell'\nargs = {{ command = 'cat {secret}' }}\n\
         expect = 'allow'\n\n[[case]]\nname = 'the secret is not readable'\ntool = 'shell'\n\
         args = {{ command = 'cat {secret}' }}\nexpect = 'deny'\ndenial = 'fs_read'\non = '{secret}'\n\n\
         [[case]]\nname = 'claims a write is refused'\ntool = 'shell'\nargs = {{ command = 'echo ok > {out}/x' }}\n\
         expect = 'deny'\ndenial = 'fs_write'\n\n[[check]]\ntool = 'search'\ncan_read = '{secret}'\n",
        out = fx.path("out")
    );
    let mut broken = fs::read_to_string(&tests).expect("tests");
    broken.push_str(&extra);
    fs::write(&tests, broken).expect("write");
    let out = agentd(["policy".as_ref(), "test".as_ref(), tests.as_os_str(), "--junit".as_ref(), junit.as_os_str()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains(&format!("{} passed, 3 failed", cases + checks + 1)), "{stdout}");
    let check = format!("search can_read {secret}");
    for failed in ["claims the secret is readable", "claims a write is refused", &check] {
        let line = stdout.lines().find(|l| l.contains(failed)).unwrap_or_default();
        assert!(line.contains("FAIL"), "{failed}: {stdout}");
    }
    assert!(stdout.contains("not visible in the sandbox"), "{stdout}");
    assert!(!stdout.contains(&fx.secret) && !text(&out.stderr).contains(&fx.secret), "the secret leaked: {stdout}");
    let xml = fs::read_to_string(&junit).expect("junit");
    assert_eq!(xml.matches("<failure ").count(), 3, "{xml}");
    // The log with the cases' records is kept and named.
    assert!(text(&out.stderr).contains("audit records are in"), "{}", text(&out.stderr));
}

#[test]
fn policy_test_refuses_bad_tests_files_with_their_location() {
    let fx = Fixture::new("ptestbad");
    let m = fx.manifest("");
    let tests = fx.dir.join("bad.tests.toml");
    let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    fs::write(&tests, format!("manifest = '{name}'\n[[case]]\nname = 'x'\ntool = 'sh'\nexpect = 'alow'\n")).expect("w");
    let out = agentd(["policy".as_ref(), "test".as_ref(), tests.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains(&format!("{}:5:", tests.display())) && err.contains("alow"), "{err}");
    fs::write(&tests, format!("manifest = '{name}'\n[[check]]\ntool = 'nope'\ncan_read = '/usr'\n")).expect("w");
    let out = agentd(["policy".as_ref(), "test".as_ref(), tests.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("tool \"nope\" is not in"), "{}", text(&out.stderr));
}

#[test]
fn lint_diff_and_schema_for_reviewers_and_editors() {
    let fx = Fixture::new("lint");
    let narrow = fx.manifest("");
    let wide = fx.manifest_granting(&["/etc", "/root"], &[], "[tools.sh.net]\nconnect = ['*:443']\n");
    let out = agentd(["policy".as_ref(), "lint".as_ref(), narrow.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
    let out = agentd(["policy".as_ref(), "lint".as_ref(), wide.as_os_str(), "--json".as_ref()]);
    assert_eq!(out.status.code(), Some(1), "high findings fail by default");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let codes: Vec<&str> =
        v[0]["findings"].as_array().expect("findings").iter().filter_map(|f| f["code"].as_str()).collect();
    for want in ["secret", "wholesale", "any_address"] {
        assert!(codes.contains(&want), "{want}: {v}");
    }
    let out = agentd(["policy".as_ref(), "lint".as_ref(), wide.as_os_str(), "--fail-on".as_ref(), "never".as_ref()]);
    assert_eq!(out.status.code(), Some(0));

    let out = agentd(["policy".as_ref(), "diff".as_ref(), narrow.as_os_str(), wide.as_os_str()]);
    let d = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{d}");
    assert!(d.contains("+ /root") && d.contains("+ *:443") && d.contains("this change widens"), "{d}");
    let out = agentd(["policy".as_ref(), "diff".as_ref(), wide.as_os_str(), narrow.as_os_str(), "--json".as_ref()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["wider"], false, "{v}");

    let out = agentd(["policy", "schema"]);
    let shipped = fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/manifest.schema.json")).expect("schema");
    assert_eq!(out.stdout, shipped, "docs/manifest.schema.json is not what `agentd policy schema` prints");
}

#[test]
fn ok_exit_makes_a_no_match_an_answer() {
    if !sandbox_ready("ok_exit_makes_a_no_match_an_answer") {
        return;
    }
    let fx = Fixture::new("okexit");
    let grep = |ok_exit: &str| {
        let m = fx.dir.join(format!("grep{}.toml", ok_exit.len()));
        fs::write(
            &m,
            format!(
                "version = 1\n[agent]\nname = 'it'\n[tools.grep]\nargv = ['/usr/bin/grep', '-r', '--', '{{q}}', '{data}']\n\
                 {ok_exit}\n[tools.grep.fs]\nread = ['/usr', '/etc/ld.so.cache', '{data}']\nexec = ['/usr/bin', '/usr/lib']\n",
                data = fx.path("data")
            ),
        )
        .expect("write");
        m
    };
    let strict = exec(&grep(""), "grep", &[("q", "no such text")], &[]);
    assert_eq!((strict.code, strict.json["ok"].as_bool()), (1, Some(false)), "{}", strict.json);
    let lenient = grep("ok_exit = [0, 1]");
    let r = exec(&lenient, "grep", &[("q", "no such text")], &[]);
    // The exit code stays the tool's; the verdict is what changes.
    assert_eq!((r.code, r.json["ok"].as_bool()), (1, Some(true)), "{}", r.json);
    let r = exec(&lenient, "grep", &[("q", "public")], &[]);
    assert_eq!((r.code, r.json["ok"].as_bool()), (0, Some(true)), "{}", r.json);
    // A timeout or a signal is never a success, whatever ok_exit says.
    let bad = fx.dir.join("bad.toml");
    fs::write(&bad, "version = 1\n[agent]\nname = 'it'\n[tools.t]\nargv = ['/bin/true']\nok_exit = [0, 124]\n")
        .expect("w");
    let out = agentd(["policy".as_ref(), "check".as_ref(), bad.as_os_str()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains(":6:") && text(&out.stderr).contains("ok_exit[1]"), "{}", text(&out.stderr));
}

#[test]
fn audit_show_labels_not_found_and_ends_quietly_at_a_closed_pipe() {
    if !sandbox_ready("audit_show_labels_not_found_and_ends_quietly_at_a_closed_pipe") {
        return;
    }
    let fx = Fixture::new("pipe");
    let m = fx.manifest("");
    // Enough records that the reader closes before agentd is done (more than a pipe holds).
    for _ in 0..10 {
        let r = exec(
            &m,
            "sh",
            &[("command", "cat /no/such/file; cat /usr/share/zoneinfo/*/* >/dev/null 2>&1; exit 0")],
            &[],
        );
        assert_eq!(r.code, 0, "{}", r.json);
    }
    let log = audit_log_for(&m);
    let out = agentd(["audit".as_ref(), "show".as_ref(), log.as_os_str()]);
    let shown = text(&out.stdout);
    assert!(shown.len() > 256 * 1024, "too little to fill a pipe: {} bytes", shown.len());
    let line = shown.lines().find(|l| l.contains(" open ") && l.contains("/no/such/file")).unwrap_or_default();
    assert!(line.contains("not found") && !line.contains("allowed"), "{line}");
    // `audit show | head -1`: agentd ends with 0 and says nothing, and the reader got its line.
    let script = format!("set -o pipefail; {:?} audit show {:?} | head -1", agentd_bin(), log);
    let out = Command::new("bash").args(["-c", &script]).output().expect("bash");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().count(), 1);
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));
}

#[test]
fn an_exec_grant_of_a_program_makes_it_runnable() {
    if !sandbox_ready("an_exec_grant_of_a_program_makes_it_runnable") {
        return;
    }
    let fx = Fixture::new("elf");
    // Nothing but the program: its loader and libraries come with it.
    let m = fx.dir.join("id.toml");
    fs::write(&m, "version = 1\n[agent]\nname = 'it'\n[tools.id]\nargv = ['/usr/bin/id', '-u']\n[tools.id.fs]\nexec = ['/usr/bin/id']\n")
        .expect("write");
    let r = exec(&m, "id", &[], &[]);
    assert_eq!(r.code, 0, "{}", r.json);
    assert!(r.stdout().trim().parse::<u32>().is_ok(), "{}", r.json);
    let out = agentd(["policy".as_ref(), "explain".as_ref(), m.as_os_str(), "--tool".as_ref(), "id".as_ref()]);
    let plan = text(&out.stdout);
    assert!(plan.contains("loader of /usr/bin/id") && plan.contains("libc.so.6 of /usr/bin/id"), "{plan}");
    // Python with its standard library read-only and its C extensions executable.
    // Debian's python3 is part of this machine kind (the python-runner example needs it too):
    // its absence is a failure, not a skip.
    let stdlib = fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3."))
                && p.join("lib-dynload").is_dir()
        })
        .expect("a python3.X standard library with lib-dynload under /usr/lib (Debian's python3)");
    let py = fx.dir.join("py.toml");
    fs::write(
        &py,
        format!(
            "version = 1\n[agent]\nname = 'it'\n[tools.py]\nargv = ['/usr/bin/python3', '-c', 'import math, json; print(math.sqrt(16))']\n\
             [tools.py.fs]\nread = ['{s}']\nexec = ['/usr/bin/python3', '{s}/lib-dynload']\n",
            s = stdlib.display()
        ),
    )
    .expect("write");
    let r = exec(&py, "py", &[], &[]);
    assert_eq!((r.code, r.stdout().as_str()), (0, "4.0\n"), "{}", r.json);
}

/// The whole loop on a real program: learn mode never shows a secret; a draft from the
/// recorded runs is no wider than the rule, and a manifest made of it passes its tests.
#[test]
fn learn_then_draft_gives_a_manifest_whose_tests_pass() {
    if !sandbox_ready("learn_then_draft_gives_a_manifest_whose_tests_pass") {
        return;
    }
    let fx = Fixture::new("learn");
    let script = fx.path("data/sum.py");
    fs::write(&script, "import csv, json, sys\nrows = list(csv.DictReader(open(sys.argv[1])))\nprint(json.dumps({'rows': len(rows)}))\n")
        .expect("script");
    fs::write(fx.path("data/in.csv"), "name,amount\na,1\nb,2\n").expect("csv");
    let manifest = |body: &str| {
        format!(
            "version = 1\n[agent]\nname = 'it'\n[tools.sum]\ndescription = 'rows of a CSV'\n\
             argv = ['/usr/bin/python3', '{script}', '{{file}}']\n[tools.sum.args.file]\ntype = 'path'\n{body}"
        )
    };
    let learn = fx.dir.join("learn.toml");
    fs::write(&learn, manifest(&format!("[tools.sum.fs]\nread = ['{}']\n", fx.path("data")))).expect("write");
    let log = fx.dir.join("learn.jsonl");
    let run = |m: &Path, extra: &[&str]| {
        let mut cmd = Command::new(agentd_bin());
        cmd.args(["exec", "--json", "--tool", "sum", "--arg"]).arg(format!("file={}", fx.path("data/in.csv")));
        cmd.arg("--manifest").arg(m).arg("--audit-log").arg(&log).args(extra);
        agentd_tests::parse(cmd.output().expect("agentd"))
    };
    let r = run(&learn, &["--learn"]);
    assert_eq!((r.code, r.stdout().as_str()), (0, "{\"rows\": 2}\n"), "{}", r.json);
    // In learn mode the host's secrets stay out of sight.
    let probe = fx.dir.join("probe.toml");
    fs::write(
        &probe,
        "version = 1\n[agent]\nname = 'it'\n[tools.sh]\nargv = ['/bin/sh', '-c', '{c}']\n[tools.sh.env]\nset = { PATH = '/usr/bin:/bin' }\n",
    )
    .expect("write");
    let mut cmd = Command::new(agentd_bin());
    cmd.args(["exec", "--json", "--learn", "--tool", "sh", "--arg"])
        .arg(format!(
            "c=cat /etc/passwd >/dev/null && echo passwd; cat /etc/shadow; ls /root /home; cat {}",
            fx.path("secret/token")
        ))
        .arg("--manifest")
        .arg(&probe)
        .arg("--audit-log")
        .arg(fx.dir.join("probe.jsonl"));
    let r = agentd_tests::parse(cmd.output().expect("agentd"));
    assert_eq!(r.stdout(), "passwd\n", "{}", r.json);
    fx.assert_no_leak(&r);
    assert!(r.stderr().contains("/etc/shadow: No such file"), "{}", r.stderr());

    let out = agentd([
        "policy".as_ref(),
        "draft".as_ref(),
        "--audit-log".as_ref(),
        log.as_os_str(),
        "--tool".as_ref(),
        "sum".as_ref(),
        "--manifest".as_ref(),
        learn.as_os_str(),
    ]);
    let draft = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{draft}{}", text(&out.stderr));
    // No wider than the rule: no shared tree, home or secret whole; the interpreter runnable.
    for never in agentd_policy_never() {
        assert!(!draft.contains(&format!("\"{never}\",")), "{never} granted whole:\n{draft}");
    }
    assert!(draft.contains("\"/usr/bin/python3\","), "{draft}");
    assert!(!draft.contains("finding: high"), "{draft}");
    // A manifest made of the draft runs the tool, and its tests pass.
    let drafted = fx.dir.join("agent.toml");
    let section = draft
        .lines()
        .filter(|l| !l.starts_with("[tools.sum]") && !l.starts_with("argv =") && !l.starts_with("description ="))
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&drafted, manifest(&section)).expect("write");
    let out = agentd(["policy".as_ref(), "check".as_ref(), drafted.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stderr),
        fs::read_to_string(&drafted).unwrap_or_default()
    );
    let r = run(&drafted, &[]);
    assert_eq!((r.code, r.stdout().as_str()), (0, "{\"rows\": 2}\n"), "{}", r.json);
    fs::write(
        fx.dir.join("agent.tests.toml"),
        format!(
            "[[case]]\nname = 'sums'\ntool = 'sum'\nargs = {{ file = '{csv}' }}\nexpect = 'allow'\nstdout_contains = 'rows'\n\n\
             [[check]]\ntool = 'sum'\ncan_read = '{secret}'\nexpect = 'deny'\n\n[[check]]\ntool = 'sum'\ncan_read = '/etc/shadow'\nexpect = 'deny'\n",
            csv = fx.path("data/in.csv"),
            secret = fx.path("secret/token")
        ),
    )
    .expect("tests");
    let out = agentd(["policy".as_ref(), "test".as_ref(), fx.dir.as_os_str()]);
    assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
}

/// The trees a draft never grants whole (as `agentd_policy::draft::NEVER`, which this
/// crate does not link).
fn agentd_policy_never() -> Vec<&'static str> {
    vec!["/", "/etc", "/usr", "/usr/lib", "/usr/share", "/var", "/home", "/root", "/tmp", "/usr/lib/x86_64-linux-gnu"]
}

/// A refused run becomes a passing one with the one addition `suggest` proposes.
#[test]
fn suggest_turns_a_refused_run_into_a_passing_one() {
    if !sandbox_ready("suggest_turns_a_refused_run_into_a_passing_one") {
        return;
    }
    let fx = Fixture::new("suggest");
    let file = fx.path("data/file.txt");
    let m = fx.dir.join("cat.toml");
    let body = |read: &str| {
        format!("version = 1\n[agent]\nname = 'it'\n[tools.show]\nargv = ['/usr/bin/cat', '{file}']\n[tools.show.fs]\nexec = ['/usr/bin/cat']\n{read}")
    };
    fs::write(&m, body("")).expect("write");
    let r = exec(&m, "show", &[], &[]);
    assert_eq!(r.code, 1, "{}", r.json);
    let log = audit_log_for(&m);
    let out = agentd([
        "policy".as_ref(),
        "suggest".as_ref(),
        "--audit-log".as_ref(),
        log.as_os_str(),
        "--manifest".as_ref(),
        m.as_os_str(),
        "--json".as_ref(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let s = v.as_array().expect("suggestions");
    assert_eq!(s.len(), 1, "{v}");
    assert_eq!((s[0]["key"].as_str(), s[0]["value"].as_str()), (Some("fs.read"), Some(file.as_str())), "{v}");
    fs::write(&m, body(&format!("read = ['{file}']\n"))).expect("write");
    let r = exec(&m, "show", &[], &[]);
    assert_eq!((r.code, r.stdout().as_str()), (0, "public data\n"), "{}", r.json);
}

/// Every example manifest names the shipped schema (`#:schema`), and taplo, as an editor
/// runs it, finds each valid and points at a mistake with its line.
#[test]
fn taplo_validates_the_examples_against_the_shipped_schema() {
    let taplo = std::env::var_os("AGENTD_MCP_TOOLS").map(|d| PathBuf::from(d).join("npm/node_modules/.bin/taplo"));
    let found = taplo.as_ref().is_some_and(|t| t.exists());
    if !agentd_tests::need(
        "taplo_validates_the_examples_against_the_shipped_schema",
        "mcp",
        found,
        "@taplo/cli is not installed ($AGENTD_MCP_TOOLS, from `cargo xtask setup`)",
    ) {
        return;
    }
    let taplo = taplo.unwrap_or_default();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut manifests = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).expect("examples").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == "agent.toml") {
                manifests.push(p);
            }
        }
    }
    assert!(!manifests.is_empty());
    for m in &manifests {
        let first = fs::read_to_string(m).expect("read").lines().next().unwrap_or_default().to_string();
        assert_eq!(first, "#:schema ../../docs/manifest.schema.json", "{}", m.display());
        let out = Command::new(&taplo).arg("check").arg(m).output().expect("taplo");
        assert!(out.status.success(), "{}: {}", m.display(), text(&out.stderr));
    }
    // A mistake an editor shows: a misspelt key, with its line.
    let fx = Fixture::new("taplo");
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo");
    let bad =
        fs::read_to_string(examples.join("agent.toml")).expect("demo").replace("timeout_ms = 5000", "timeout = 5000");
    let dir = fx.dir.join("examples/demo");
    fs::create_dir_all(&dir).expect("mkdir");
    fs::create_dir_all(fx.dir.join("docs")).expect("mkdir");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/manifest.schema.json"),
        fx.dir.join("docs/manifest.schema.json"),
    )
    .expect("copy schema");
    fs::write(dir.join("agent.toml"), bad).expect("write");
    let out = Command::new(&taplo).arg("check").arg(dir.join("agent.toml")).output().expect("taplo");
    assert!(!out.status.success());
    let said = text(&out.stderr) + &text(&out.stdout);
    assert!(said.contains("timeout") && said.contains("agent.toml:"), "{said}");
}

/// Every example under `examples/` passes its tests file, staged in a fixture as a user
/// would copy it (its `/srv/agentd-examples/NAME` paths pointed there), with its data.
#[test]
fn every_example_passes_its_tests() {
    if !sandbox_ready("every_example_passes_its_tests") {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut names: Vec<String> = fs::read_dir(&root)
        .expect("examples")
        .flatten()
        .filter(|e| e.path().join("agent.tests.toml").exists())
        .filter_map(|e| e.file_name().to_str().map(String::from))
        // The demo and the HTTP client have tests of their own (staged data, a network).
        .filter(|n| n != "demo" && n != "http-client")
        .collect();
    names.sort();
    assert!(names.len() >= 3, "{names:?}");
    for name in &names {
        let fx = Fixture::new(&format!("ex-{name}"));
        let at = fx.dir.join(name);
        copy_tree(&root.join(name), &at);
        let prefix = format!("/srv/agentd-examples/{name}");
        for file in ["agent.toml", "agent.tests.toml"] {
            let text = fs::read_to_string(at.join(file)).expect("read").replace(&prefix, &at.display().to_string());
            fs::write(at.join(file), text).expect("write");
        }
        match name.as_str() {
            "python-runner" | "build" => {
                let out = if name == "build" { at.join("ws/build") } else { at.join("scratch") };
                fs::create_dir_all(&out).expect("mkdir");
                fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
            }
            "git-inspect" => {
                let repo = at.join("repo");
                fs::create_dir_all(&repo).expect("repo");
                let git = |args: &[&str]| {
                    let ok = Command::new("/usr/bin/git")
                        .args(["-c", "user.name=ex", "-c", "user.email=ex@example.com", "-C"])
                        .arg(&repo)
                        .args(args)
                        .status()
                        .is_ok_and(|s| s.success());
                    assert!(ok, "git {args:?}");
                };
                git(&["init", "-q"]);
                fs::write(repo.join("README"), "hello\n").expect("write");
                git(&["add", "README"]);
                git(&["commit", "-qm", "first commit"]);
                fs::write(repo.join("README"), "hello\nmore\n").expect("write");
                git(&["commit", "-qam", "second commit"]);
            }
            _ => {}
        }
        let out = agentd(["policy".as_ref(), "test".as_ref(), at.as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{name}:\n{}{}", text(&out.stdout), text(&out.stderr));
        let out = agentd(["policy".as_ref(), "lint".as_ref(), at.join("agent.toml").as_os_str()]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", text(&out.stdout));
    }
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for e in fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// The HTTP client example reaches its API by name, and nothing else: the API is served from a
/// network namespace of its own (an address that is neither special nor the host's), named
/// in a hosts file agentd reads.
#[test]
fn the_http_client_example_reaches_its_api_by_name_only() {
    if !sandbox_ready("the_http_client_example_reaches_its_api_by_name_only") {
        return;
    }
    let fx = Fixture::new("ex-http");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/http-client");
    let at = fx.dir.join("http-client");
    copy_tree(&root, &at);
    let hosts = fx.dir.join("hosts");
    fs::write(&hosts, "192.0.2.77 api.example.test\n").expect("hosts");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                agentd_tests::enter_new_netns();
                let remote = agentd_tests::Remote::start();
                let mut server = remote
                    .command("python3")
                    .args(["-m", "http.server", "8080", "--bind", "192.0.2.77", "--directory"])
                    .arg(at.join("api"))
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("http server");
                let up = (0..100).any(|_| {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    std::net::TcpStream::connect(("192.0.2.77", 8080)).is_ok()
                });
                assert!(up, "the API did not start");
                let out = Command::new(agentd_bin())
                    .args(["policy", "test"])
                    .arg(&at)
                    .env("AGENTD_HOSTS_FILE", &hosts)
                    .output()
                    .expect("agentd");
                let _ = server.kill();
                let _ = server.wait();
                assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
                assert!(text(&out.stdout).contains("connect other.example.test"), "{}", text(&out.stdout));
            })
            .join()
            .expect("the test's thread");
    });
}
