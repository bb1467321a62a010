//! Every key a manifest may hold, with its type and a line of documentation: the one list the
//! parser checks keys against ([`names`]) and the JSON Schema of the manifest is written from
//! ([`json_schema`]), so that the two cannot drift.
//!
//! The schema is what an editor (taplo, VS Code's Even Better TOML) validates and completes
//! with. It holds the shape: keys, types, enumerations, integer ranges. What needs more than a
//! shape (a path that must exist, an argument's placeholder in `argv`, tools that write where
//! others execute) only `agentd policy check` can say; the schema accepts every manifest the
//! parser accepts.

use serde_json::{json, Map, Value};

use crate::model::{LIMITS, MANIFEST_VERSION, MAX_LANDLOCK_ABI};

/// The type of a key's value.
#[derive(Debug, Clone, Copy)]
pub enum Ty {
    /// Any string.
    Str,
    /// An absolute path.
    Path,
    /// A name: a letter, then letters, digits, `_` or `-` (at most 64).
    Name,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// An integer in the range.
    Int(i64, i64),
    /// An integer or a float.
    Number,
    /// `true` or `false`.
    Bool,
    /// An array of values of the type.
    List(&'static Ty),
    /// A table with exactly these keys (each optional unless marked).
    Table(&'static [Key]),
    /// A table of names (tools, servers, arguments) to values of the type.
    Names(&'static Ty),
    /// A table of environment variable names to strings.
    EnvVars,
    /// Exactly this integer.
    Const(i64),
}

/// One key of a table.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key.
    pub name: &'static str,
    /// Its value's type.
    pub ty: Ty,
    /// Whether the table must have it.
    pub required: bool,
    /// What it is, for editors.
    pub doc: &'static str,
}

const fn key(name: &'static str, ty: Ty, doc: &'static str) -> Key {
    Key { name, ty, required: false, doc }
}

const fn must(name: &'static str, ty: Ty, doc: &'static str) -> Key {
    Key { name, ty, required: true, doc }
}

/// The names of a table's keys, in order.
pub fn names(table: &[Key]) -> Vec<&'static str> {
    table.iter().map(|k| k.name).collect()
}

/// `agent.answer`.
pub const ANSWER_MODES: &[&str] = &["free", "quote"];
/// `type` of an argument; `items` of a list takes the first five.
pub const ARG_TYPES: &[&str] = &["string", "integer", "path", "number", "boolean", "list"];
/// `lifetime` of an MCP server.
pub const MCP_LIFETIMES: &[&str] = &["call", "session"];
/// `audit.mode`.
pub const AUDIT_MODES: &[&str] = &["enforce", "audit"];
/// `audit.on_audit_loss`.
pub const LOSS_ACTIONS: &[&str] = &["kill", "record"];
/// `under` of a path argument.
pub const UNDER: &[&str] = &["read", "write", "exec"];

const PATHS: Ty = Ty::List(&Ty::Path);
const STRINGS: Ty = Ty::List(&Ty::Str);
const ENDPOINTS: Ty = Ty::List(&Ty::Str);

/// The top level.
pub const TOP: &[Key] = &[
    must("version", Ty::Const(MANIFEST_VERSION), "The manifest format version: 1."),
    must("agent", Ty::Table(AGENT), "Who the agent is and which host identity its calls run as."),
    key("tools", Ty::Names(&Ty::Table(TOOL)), "The tools the agent may call, by name."),
    key("mcp", Ty::Names(&Ty::Table(MCP)), "Third-party MCP servers (stdio), each confined like a tool."),
    key("requires", Ty::Table(REQUIRES), "What must be enforced, or calls are refused."),
];

/// `[agent]`.
pub const AGENT: &[Key] = &[
    must("name", Ty::Name, "The agent's name: a letter, then letters, digits, '_' or '-' (at most 64)."),
    key(
        "uid",
        Ty::Int(1, u32::MAX as i64 - 1),
        "Host uid its calls run as (never 0); derived from the name if absent.",
    ),
    key(
        "gid",
        Ty::Int(1, u32::MAX as i64 - 1),
        "Host gid its calls run as (never 0); derived from the name if absent.",
    ),
    key("answer", Ty::OneOf(ANSWER_MODES), "\"free\": any line; \"quote\": copied from what the tools printed."),
];

/// What a tool and an MCP server both have: grants, limits, environment, audit, JIT.
macro_rules! sandbox_keys {
    ($($extra:expr),* $(,)?) => {
        &[
            $($extra,)*
            key("fs", Ty::Table(FS), "Filesystem grants; nothing else of the host is visible."),
            key("net", Ty::Table(NET), "Network grants; none means no network at all."),
            key("limits", Ty::Table(LIMIT_KEYS), "Resource limits of each call."),
            key("env", Ty::Table(ENV), "The call's environment, which starts empty."),
            key("audit", Ty::Table(AUDIT), "What the BPF layer does with the call's actions."),
            key("allow_jit", Ty::Bool, "Let written memory become executable (JIT compilers); off by default."),
        ]
    };
}

/// `[tools.NAME]`.
pub const TOOL: &[Key] = sandbox_keys![
    key("description", Ty::Str, "Shown to the model and in `policy explain`."),
    must("argv", Ty::List(&Ty::Str), "The command: a literal program, then arguments with {placeholders}."),
    key("args", Ty::Names(&Ty::Table(ARG)), "What each {placeholder} of argv accepts."),
    key("ok_exit", Ty::List(&Ty::Int(0, 123)), "Exit codes that mean success (default [0]); grep's no match is 1."),
];

/// `[mcp.NAME]`.
pub const MCP: &[Key] = sandbox_keys![
    must("command", Ty::List(&Ty::Str), "The server's program and literal arguments."),
    key("lifetime", Ty::OneOf(MCP_LIFETIMES), "\"call\": a sandbox per call; \"session\": one per client session."),
    must("tools", STRINGS, "The server's tools that are offered; no other may be called."),
    key("listing_sha256", Ty::Str, "SHA-256 (64 hex digits) the reviewed listing of those tools must have."),
];

/// `[tools.NAME.args.ARG]`.
pub const ARG: &[Key] = &[
    key("type", Ty::OneOf(ARG_TYPES), "What the value is (default \"string\")."),
    key("description", Ty::Str, "Shown to the model."),
    key("optional", Ty::Bool, "A call may leave it out; argv elements that use it are dropped."),
    key("allow_leading_dash", Ty::Bool, "Let a value begin with '-' where the program could read it as an option."),
    key("max_length", Ty::Int(1, 65_536), "Longest string, in bytes (default 4096)."),
    key("one_of", STRINGS, "The only strings allowed."),
    key("min", Ty::Number, "Smallest integer or number."),
    key("max", Ty::Number, "Largest integer or number."),
    key("under", Ty::List(&Ty::OneOf(UNDER)), "A path lies under these grants of the tool (default [\"read\"])."),
    key("items", Ty::OneOf(ITEM_TYPES), "The type of a list's items."),
    key("max_items", Ty::Int(0, 1024), "Most items of a list (default 64)."),
];

/// The types a list's items may have.
const ITEM_TYPES: &[&str] = &["string", "integer", "path", "number", "boolean"];

/// `[tools.NAME.fs]`.
pub const FS: &[Key] = &[
    key("read", PATHS, "Visible read-only at the same path."),
    key("write", PATHS, "Visible read-write at the same path."),
    key("exec", PATHS, "Where programs may be executed; visible read-only."),
    key("exec_shared_with", Ty::List(&Ty::Name), "Tools that may execute where this one writes, or the reverse."),
];

/// `[tools.NAME.net]`.
pub const NET: &[Key] = &[
    key(
        "connect",
        ENDPOINTS,
        "Destinations: \"ADDR:PORT\", \"[V6]:PORT\", \"ADDR/LEN:PORT\", \"name:PORT\", \"*.name:PORT\", \"*:PORT\".",
    ),
    key("bind", ENDPOINTS, "Local addresses the tool may listen on: \"ADDR:PORT\" or \"*:PORT\"."),
    key("unix", PATHS, "Host Unix sockets (exact paths) the tool may connect to."),
];

/// `[tools.NAME.limits]`, from [`LIMITS`].
pub const LIMIT_KEYS: &[Key] = &[
    limit(0, "Wall-clock limit in ms; the whole process tree is killed."),
    limit(1, "Memory of the call's cgroup, in MiB."),
    limit(2, "Most tasks at once."),
    limit(3, "CPU bandwidth, in percent of one CPU."),
    limit(4, "Bytes kept per output stream."),
    limit(5, "Size of the private /tmp, in MiB; 0 for none."),
    limit(6, "Largest file a process may write, in MiB."),
];

const fn limit(i: usize, doc: &'static str) -> Key {
    key(LIMITS[i].key, Ty::Int(LIMITS[i].min as i64, LIMITS[i].max as i64), doc)
}

/// `[tools.NAME.env]`.
pub const ENV: &[Key] = &[
    key("pass", STRINGS, "Variables copied from agentd's environment when set there."),
    key("set", Ty::EnvVars, "Variables set to these values."),
];

/// `[tools.NAME.audit]`.
pub const AUDIT: &[Key] = &[
    key("mode", Ty::OneOf(AUDIT_MODES), "\"enforce\" (default) denies and records; \"audit\" only records."),
    key("on_audit_loss", Ty::OneOf(LOSS_ACTIONS), "\"kill\" (default) ends a call whose events are lost."),
    key("deny_open", PATHS, "Paths the BPF LSM layer refuses to open even where fs shows them."),
];

/// `[requires]`.
pub const REQUIRES: &[Key] = &[
    key("landlock_abi", Ty::Int(0, MAX_LANDLOCK_ABI as i64), "Minimum Landlock ABI (default 1; 0 allows none)."),
    key("bpf_lsm", Ty::Bool, "Refuse calls where BPF LSM enforcement is not available."),
];

/// The schema's `$id` (a name, not a place: the file is shipped in the repository).
pub const SCHEMA_ID: &str = "urn:agentd:schema:manifest:1";

/// The JSON Schema (draft 2020-12) of a manifest.
pub fn json_schema() -> Value {
    let mut schema = table(TOP);
    if let Value::Object(o) = &mut schema {
        let mut head = Map::new();
        head.insert("$schema".into(), json!("https://json-schema.org/draft/2020-12/schema"));
        head.insert("$id".into(), json!(SCHEMA_ID));
        head.insert("title".into(), json!("agentd manifest"));
        head.insert(
            "description".into(),
            json!("What an agent's tools may touch. Generated by `agentd policy schema`; `agentd policy check` says more."),
        );
        head.append(o);
        *o = head;
    }
    schema
}

fn table(keys: &[Key]) -> Value {
    let props: Map<String, Value> = keys
        .iter()
        .map(|k| {
            let mut v = ty(&k.ty);
            if let Value::Object(o) = &mut v {
                o.insert("description".into(), json!(k.doc));
            }
            (k.name.to_string(), v)
        })
        .collect();
    let required: Vec<&str> = keys.iter().filter(|k| k.required).map(|k| k.name).collect();
    let mut o = Map::new();
    o.insert("type".into(), json!("object"));
    o.insert("properties".into(), Value::Object(props));
    o.insert("additionalProperties".into(), json!(false));
    if !required.is_empty() {
        o.insert("required".into(), json!(required));
    }
    Value::Object(o)
}

/// A name of a tool, server, agent or argument.
const NAME_PATTERN: &str = "^[A-Za-z][A-Za-z0-9_-]{0,63}$";
/// An environment variable name.
const ENV_PATTERN: &str = "^[A-Za-z_][A-Za-z0-9_]*$";

fn ty(t: &Ty) -> Value {
    match t {
        Ty::Str => json!({ "type": "string" }),
        Ty::Path => json!({ "type": "string", "pattern": "^/" }),
        Ty::Name => json!({ "type": "string", "pattern": NAME_PATTERN }),
        Ty::OneOf(choices) => json!({ "type": "string", "enum": choices }),
        Ty::Int(min, max) => json!({ "type": "integer", "minimum": min, "maximum": max }),
        Ty::Number => json!({ "type": "number" }),
        Ty::Bool => json!({ "type": "boolean" }),
        Ty::List(item) => json!({ "type": "array", "items": ty(item) }),
        Ty::Table(keys) => table(keys),
        Ty::Names(value) => json!({
            "type": "object",
            "propertyNames": { "pattern": NAME_PATTERN },
            "additionalProperties": ty(value),
        }),
        Ty::EnvVars => json!({
            "type": "object",
            "propertyNames": { "pattern": ENV_PATTERN },
            "additionalProperties": { "type": "string" },
        }),
        Ty::Const(n) => json!({ "type": "integer", "const": n }),
    }
}

/// The schema as it is shipped (`docs/manifest.schema.json`): pretty JSON with a final newline.
pub fn json_schema_text() -> String {
    let mut s = serde_json::to_string_pretty(&json_schema()).unwrap_or_default();
    s.push('\n');
    s
}
