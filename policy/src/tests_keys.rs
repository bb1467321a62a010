//! The manifest's JSON Schema and the parser agree: on every key, on the shipped file, on the
//! examples, and on the mutated manifests of the `policy check` fuzz test.

use std::collections::BTreeSet;

use proptest::prelude::*;

use crate::keys::{self, Key, Ty};
use crate::*;

/// A manifest that uses every key the parser knows, at least once (see [`every_key`]).
const EVERY_KEY_BASE: &str = r#"
version = 1

[agent]
name = "sink"
uid = 4000
gid = 4000
answer = "free"

[tools.t]
description = "every key"
argv = ["/usr/bin/grep", "{s}", "{i}", "{p}", "{n}", "{b}", "{l}"]
ok_exit = [0, 1]
allow_jit = false

[tools.t.args.s]
type = "string"
description = "s"
optional = false
allow_leading_dash = false
max_length = 10
one_of = ["a", "b"]

[tools.t.args.i]
type = "integer"
min = 1
max = 5

[tools.t.args.p]
type = "path"
under = ["read"]

[tools.t.args.n]
type = "number"
min = 0.5
max = 2

[tools.t.args.b]
type = "boolean"

[tools.t.args.l]
type = "list"
items = "string"
max_items = 3

[tools.t.fs]
read = ["/data"]
write = ["/out"]
exec = ["/usr/bin"]
exec_shared_with = []

[tools.t.net]
connect = ["127.0.0.1:8080"]
bind = ["127.0.0.1:9000"]
unix = []

[tools.t.limits]
timeout_ms = 1000
memory_mb = 64
pids = 8
cpu_percent = 50
output_bytes = 1000
tmp_mb = 0
file_mb = 1

[tools.t.env]
pass = ["LANG"]
set = { PATH = "/usr/bin" }

[tools.t.audit]
mode = "enforce"
on_audit_loss = "kill"
deny_open = ["/data/secret"]

[mcp.srv]
command = ["/usr/bin/srv"]
lifetime = "call"
tools = ["read"]
listing_sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
allow_jit = false

[requires]
landlock_abi = 1
bpf_lsm = false
"#;

/// [`EVERY_KEY_BASE`] with the MCP server's sandbox tables, which are the tool's.
fn every_key() -> String {
    let from = EVERY_KEY_BASE.find("[tools.t.fs]").unwrap_or(0);
    let to = EVERY_KEY_BASE.find("[mcp.srv]").unwrap_or(0);
    let sandbox = EVERY_KEY_BASE[from..to].replace("[tools.t.", "[mcp.srv.");
    format!("{EVERY_KEY_BASE}\n{sandbox}")
}

/// Dotted key paths of a spec, with `*` for names.
fn spec_paths(prefix: &str, keys: &[Key], out: &mut BTreeSet<String>) {
    for k in keys {
        let path = if prefix.is_empty() { k.name.to_string() } else { format!("{prefix}.{}", k.name) };
        out.insert(path.clone());
        match k.ty {
            Ty::Table(sub) => spec_paths(&path, sub, out),
            Ty::Names(&Ty::Table(sub)) => spec_paths(&format!("{path}.*"), sub, out),
            _ => {}
        }
    }
}

/// Dotted key paths of a document, with `*` where the spec has names.
fn doc_paths(prefix: &str, v: &toml::Value, out: &mut BTreeSet<String>) {
    let Some(t) = v.as_table() else { return };
    let named = matches!(prefix, "tools" | "mcp") || prefix.ends_with(".args");
    for (k, v) in t {
        let name = if named { "*" } else { k.as_str() };
        let path = if prefix.is_empty() { name.to_string() } else { format!("{prefix}.{name}") };
        if !named {
            out.insert(path.clone());
        }
        if !path.ends_with(".env.set") {
            doc_paths(&path, v, out);
        }
    }
}

#[test]
fn the_schema_has_exactly_the_keys_the_parser_accepts() {
    if let Err(d) = parse("every.toml", &every_key()) {
        panic!("{d}");
    }
    let mut spec = BTreeSet::new();
    spec_paths("", keys::TOP, &mut spec);
    let mut doc = BTreeSet::new();
    doc_paths("", &toml::from_str(&every_key()).expect("toml"), &mut doc);
    // `tools` and `mcp` themselves are tables of names; both sets have them.
    assert_eq!(spec, doc, "the spec and the manifest that uses every key differ");
    // And each key of each table, misspelt, is refused with the spec's key suggested.
    for (table, at) in [(keys::FS, "[tools.t.fs]"), (keys::LIMIT_KEYS, "[tools.t.limits]")] {
        for k in table {
            let typo = format!("{}x", k.name);
            let src = every_key().replacen(at, &format!("{at}\n{typo} = 1"), 1);
            let e = parse("m.toml", &src).expect_err("unknown key").to_string();
            assert!(
                e.contains(&format!(
                    "unknown key `tools.t.{}.{typo}`",
                    at.trim_matches(['[', ']']).rsplit('.').next().unwrap_or_default()
                )),
                "{e}"
            );
        }
    }
}

#[test]
fn the_shipped_schema_is_the_generated_one() {
    let shipped = include_str!("../../docs/manifest.schema.json");
    assert!(
        shipped == keys::json_schema_text(),
        "docs/manifest.schema.json is stale: run `cargo run -p agentd -- policy schema > docs/manifest.schema.json`"
    );
}

fn validator() -> jsonschema::Validator {
    jsonschema::validator_for(&keys::json_schema()).expect("the schema is a valid JSON Schema")
}

/// The manifest as JSON, as an editor's TOML plugin hands it to a JSON Schema validator.
fn as_json(src: &str) -> Option<serde_json::Value> {
    let v: toml::Value = toml::from_str(src).ok()?;
    serde_json::to_value(v).ok()
}

fn schema_errors(v: &jsonschema::Validator, src: &str) -> Vec<String> {
    match as_json(src) {
        Some(j) => v.iter_errors(&j).map(|e| format!("{e} at {}", e.instance_path())).collect(),
        None => vec!["not TOML".into()],
    }
}

/// Whether the parser's diagnostics include a problem of shape (an unknown key, or a value of
/// the wrong type), which the schema must see as well.
fn shape_problem(d: &Diagnostics) -> bool {
    const KINDS: [&str; 7] = ["a string", "an integer", "a float", "a boolean", "a datetime", "an array", "a table"];
    d.0.iter().any(|e| {
        e.message.contains("unknown key")
            || (e.message.contains(" must be ") && KINDS.iter().any(|k| e.message.ends_with(&format!(", not {k}"))))
    })
}

#[test]
fn the_schema_accepts_what_the_parser_accepts() {
    let v = validator();
    let mut sources: Vec<(String, String)> =
        vec![("every.toml".into(), every_key()), ("tests example".into(), crate::tests::EXAMPLE.into())];
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    for entry in walk(std::path::Path::new(examples)) {
        if entry.file_name().and_then(|n| n.to_str()) == Some("agent.toml") {
            sources.push((entry.display().to_string(), std::fs::read_to_string(&entry).expect("read")));
        }
    }
    assert!(sources.len() > 2, "no example manifests found under {examples}");
    for (name, src) in &sources {
        parse(name, src).unwrap_or_else(|d| panic!("{name}: {d}"));
        let errors = schema_errors(&v, src);
        assert!(errors.is_empty(), "{name}: valid for the parser, not for the schema: {errors:?}");
    }
    // And the other way round, on a shape error of each kind.
    for bad in ["[agent]\nname = 'a'\nnmae = 'b'", "[agent]\nname = 5", "[agent]\nname = 'a'\nanswer = 'maybe'"] {
        let src = format!("version = 1\n{bad}\n");
        assert!(parse("m.toml", &src).is_err(), "{src}");
        assert!(!schema_errors(&v, &src).is_empty(), "the schema accepts {src:?}");
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]
    /// The fuzz corpus of `policy check` (the example, cut and spliced): what the parser accepts
    /// the schema accepts, and what the schema accepts has no shape problem for the parser.
    #[test]
    fn schema_and_parser_agree_on_mutated_manifests(
        which in 0usize..2, pos in 0usize..2000, cut in 0usize..40, insert in "[ -~\n]{0,12}"
    ) {
        let mut s = if which == 0 { crate::tests::EXAMPLE.to_string() } else { every_key() };
        let pos = pos % s.len();
        let pos = (0..=pos).rev().find(|p| s.is_char_boundary(*p)).unwrap_or(0);
        let end = (pos + cut).min(s.len());
        let end = (end..=s.len()).find(|p| s.is_char_boundary(*p)).unwrap_or(s.len());
        s.replace_range(pos..end, &insert);
        let Some(json) = as_json(&s) else { return Ok(()) };
        let schema_ok = VALIDATOR.with(|v| v.is_valid(&json));
        match parse("fuzz.toml", &s) {
            Ok(_) => prop_assert!(schema_ok, "parser accepts, schema refuses:\n{s}"),
            Err(d) if schema_ok => prop_assert!(!shape_problem(&d), "schema accepts a shape the parser refuses:\n{s}\n{d}"),
            Err(_) => {}
        }
    }
}

thread_local! {
    static VALIDATOR: jsonschema::Validator = validator();
}
