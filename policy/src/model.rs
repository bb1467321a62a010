//! The validated manifest: every value here has passed its checks.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::template::ArgTemplate;
use crate::types::{AbsPath, EnvName, HostPort, Name};

/// The manifest format version this crate understands.
pub const MANIFEST_VERSION: i64 = 1;

/// A whole agent manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Always [`MANIFEST_VERSION`].
    pub version: i64,
    /// Who the agent is and which host identity its tool calls run under.
    pub agent: Agent,
    /// The tools the agent may call, by name.
    pub tools: BTreeMap<Name, Tool>,
    /// Third-party MCP servers whose tools the agent may call, each run confined like a tool.
    pub mcp: BTreeMap<Name, McpServer>,
    /// What must be enforced, or calls are refused.
    pub requires: Requires,
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Agent {
    /// The agent's name.
    pub name: Name,
    /// Host uid that tool calls run as (never 0). Default: [`agent_id`] of the name.
    pub uid: u32,
    /// Host gid that tool calls run as (never 0). Default: [`agent_id`] of the name.
    pub gid: u32,
    /// Whether `uid` and `gid` were derived from the name (neither was in the manifest).
    pub derived_ids: bool,
    /// What the agent's final answer may be.
    pub answer: AnswerMode,
}

/// What an agent's final answer may be (`agent.answer`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerMode {
    /// Any one line of text.
    #[default]
    Free,
    /// A span copied byte for byte from one line of what this run's tools printed.
    Quote,
}

/// First uid (and gid) of the range agentd derives agents' identities from. The range lies
/// in what systemd documents as unused (between its container range, which ends at
/// 1879048191, and its foreign range at 2147352576), far above the ids of accounts and of
/// `/etc/subuid` allocations on usual hosts.
pub const AGENT_ID_BASE: u32 = 1_900_000_000;

/// Number of ids in the range.
pub const AGENT_ID_COUNT: u32 = 1 << 24;

/// The host uid and gid an agent runs as by default: a stable function of its name (64-bit
/// FNV-1a, reduced into the range), so that one agent's files are not every agent's. Two
/// names collide with probability 1 in 2^24; `agentd serve` refuses agents that share an
/// identity, and a call is refused if the id belongs to an account of the host.
pub fn agent_id(name: &str) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    AGENT_ID_BASE + u32::try_from(h % u64::from(AGENT_ID_COUNT)).unwrap_or(0)
}

/// `[tools.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tool {
    /// Shown to the model and in `policy explain`.
    pub description: String,
    /// The command template; `argv[0]` is a literal program path or name.
    pub argv: Vec<ArgTemplate>,
    /// What each placeholder of `argv` accepts, in the order the template first uses them.
    pub args: Vec<ArgSpec>,
    /// Filesystem grants.
    pub fs: FsGrants,
    /// Network grants.
    pub net: NetGrants,
    /// Resource limits.
    pub limits: Limits,
    /// Environment policy.
    pub env: EnvPolicy,
    /// What the BPF layer does with the call's actions.
    pub audit: AuditPolicy,
    /// Whether the tool may create memory that is both writable and executable, or make
    /// written memory executable (JIT compilers such as node or java need it). Off by default:
    /// the sandbox applies memory-deny-write-execute.
    pub allow_jit: bool,
    /// Exit codes that mean the call succeeded (`ok_exit`; default `[0]`): grep's 1 (no
    /// match) is an answer, not a failure. Timeouts, OOM kills and refusals fail whatever
    /// the code.
    pub ok_exit: Vec<i32>,
}

/// `lifetime` of an `[mcp.NAME]` server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum McpLifetime {
    /// A fresh sandbox for each `tools/call`: started, initialized, one call, torn down.
    Call,
    /// One sandbox per client session; its calls one at a time.
    Session,
}

/// `[mcp.NAME]`: a third-party MCP server (stdio), run in a sandbox as a tool is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct McpServer {
    /// How long one sandbox of the server lives.
    pub lifetime: McpLifetime,
    /// The server's tools that are offered; a call of any other is refused.
    pub tools: Vec<String>,
    /// The SHA-256 (hex) the server's listing of those tools must have: when set, a server
    /// whose listing differs is not offered (it changed since it was reviewed).
    pub listing_sha256: Option<String>,
    /// The server's sandbox: `command` as the argv (literal), with the grants, limits,
    /// environment and audit rules of a tool.
    pub sandbox: Tool,
}

/// Whether `s` is a tool name as MCP allows it: 1 to 128 of ASCII letters, digits, `_`, `-`
/// and `.`.
pub fn is_mcp_tool_name(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// `[tools.NAME.args.ARG]`: what a caller (the model) may pass for one `argv` placeholder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgSpec {
    /// The placeholder's name.
    pub name: Name,
    /// Shown to the model.
    pub description: String,
    /// The values it accepts.
    pub kind: ArgKind,
    /// Whether a call may leave it out; the argv elements that use it are then dropped.
    pub optional: bool,
    /// Whether a value may begin with `-` where it starts an argv element before a literal
    /// `--`, i.e. where the program could read it as an option (`-delete` to `find`). Off
    /// by default: such values are refused.
    pub allow_leading_dash: bool,
}

/// A finite `f64` (the bounds of a number argument), so that the manifest stays `Eq`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Serialize)]
#[serde(transparent)]
pub struct Finite(f64);

impl Eq for Finite {}

impl Finite {
    /// `v` if it is finite.
    pub fn new(v: f64) -> Option<Self> {
        v.is_finite().then_some(Self(v))
    }

    /// The value.
    pub fn get(self) -> f64 {
        self.0
    }
}

/// The values an argument accepts. Constrained decoding enforces these bounds on the model.
///
/// A call carries every value as text: strings and paths as they are, integers and numbers
/// as JSON number literals, booleans as `true` or `false`, lists as a JSON array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ArgKind {
    /// Text of at most `max_length` bytes, or exactly one of `one_of` if not empty. (Constrained
    /// decoding further keeps a model to printable ASCII.)
    String {
        /// Longest value, in bytes.
        max_length: u32,
        /// The only values allowed, when not empty.
        one_of: Vec<String>,
    },
    /// A decimal integer in `min..=max`.
    Integer {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
    },
    /// An absolute path at or below one of `under` (grants of the tool).
    Path {
        /// The grant paths that bound it.
        under: Vec<AbsPath>,
    },
    /// A decimal number (JSON syntax, no exponent) in `min..=max`.
    Number {
        /// Smallest value.
        min: Finite,
        /// Largest value.
        max: Finite,
    },
    /// `true` or `false`.
    Boolean,
    /// A JSON array of at most `max_items` values of one scalar kind. In `argv` it is a whole
    /// element, which becomes one element per item.
    List {
        /// What each item accepts (never a list).
        items: Box<ArgKind>,
        /// Most items.
        max_items: u32,
    },
}

/// Largest magnitude of a number argument without bounds.
pub const NUMBER_LIMIT: f64 = 1e15;

/// Most digits after the point in a number argument (and in its bounds).
pub const NUMBER_DECIMALS: usize = 15;

/// Whether `v` can be written with at most [`NUMBER_DECIMALS`] decimals: a number bound must
/// be, or no value could sit exactly on it.
pub fn fits_decimals(v: f64) -> bool {
    format!("{v:.NUMBER_DECIMALS$}").parse::<f64>() == Ok(v)
}

/// Whether `s` is a JSON number without an exponent: `-?(0|[1-9][0-9]*)(\.[0-9]+)?`.
pub fn is_plain_number(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    digits(int) && (int == "0" || !int.starts_with('0')) && frac.is_none_or(digits)
}

/// Default `max_length` of a string argument.
pub const DEFAULT_ARG_MAX_LENGTH: u32 = 4096;

/// Whether `path` is `base` or lies below it: a plain prefix at a `/` boundary, with no `.`,
/// `..` or empty components anywhere in `path`.
pub fn path_is_under(path: &str, base: &str) -> bool {
    let clean = path.starts_with('/') && path[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    clean && (path == base || path.strip_prefix(base).is_some_and(|rest| rest.starts_with('/')))
}

impl ArgKind {
    /// Whether an argument of this kind may appear inside a longer argv element (lists must
    /// stand alone).
    pub(crate) fn embeddable(&self) -> bool {
        !matches!(self, ArgKind::List { .. })
    }

    /// Whether a value may be negative (and so begin with `-`).
    pub(crate) fn may_be_negative(&self) -> bool {
        match self {
            ArgKind::Integer { min, .. } => *min < 0,
            ArgKind::Number { min, .. } => min.get() < 0.0,
            ArgKind::List { items, .. } => items.may_be_negative(),
            _ => false,
        }
    }

    /// Whether `value` is acceptable; the reason if not.
    pub fn check(&self, value: &str) -> Result<(), String> {
        match self {
            ArgKind::String { max_length, one_of } => {
                if value.len() > *max_length as usize {
                    return Err(format!("is {} bytes long; at most {max_length} are allowed", value.len()));
                }
                if !one_of.is_empty() && !one_of.iter().any(|o| o == value) {
                    return Err(format!("must be one of {}", one_of.join(", ")));
                }
                Ok(())
            }
            // Only the canonical form: `+5`, `007` or `-0` would reach argv as written.
            ArgKind::Integer { min, max } => match value.parse::<i64>() {
                Ok(n) if n.to_string() != value => Err("is not a decimal integer in canonical form".into()),
                Ok(n) if (*min..=*max).contains(&n) => Ok(()),
                Ok(n) => Err(format!("{n} is outside {min}..={max}")),
                Err(_) => Err("is not a decimal integer".into()),
            },
            ArgKind::Path { under } => {
                if under.iter().any(|b| path_is_under(value, &b.to_string())) {
                    Ok(())
                } else {
                    let list: Vec<String> = under.iter().map(ToString::to_string).collect();
                    Err(format!("must be an absolute path (no ., .. or //) at or below {}", list.join(", ")))
                }
            }
            ArgKind::Number { min, max } => {
                let decimals = value.split_once('.').map_or(0, |(_, f)| f.len());
                if !is_plain_number(value) || decimals > NUMBER_DECIMALS {
                    return Err(format!(
                        "is not a decimal number (like -3, 0.25 or 12.5; at most {NUMBER_DECIMALS} decimals)"
                    ));
                }
                match value.parse::<f64>() {
                    Ok(n) if n == 0.0 && value.starts_with('-') => Err("is a negative zero".into()),
                    Ok(n) if n >= min.get() && n <= max.get() => Ok(()),
                    _ => Err(format!("{value} is outside {}..={}", min.get(), max.get())),
                }
            }
            ArgKind::Boolean if value == "true" || value == "false" => Ok(()),
            ArgKind::Boolean => Err("must be true or false".into()),
            ArgKind::List { items, max_items } => {
                let values = list_items(value).ok_or("is not a JSON array of plain values")?;
                if values.len() > *max_items as usize {
                    return Err(format!("has {} items; at most {max_items} are allowed", values.len()));
                }
                for (i, v) in values.iter().enumerate() {
                    items.check(v).map_err(|e| format!("item {i} {e}"))?;
                }
                Ok(())
            }
        }
    }

    /// A value of this kind that stands for the argument `name` where no call gives one
    /// (`policy explain`, static checks): `{name}` for free text, else the simplest value
    /// the bounds allow. The plan does not depend on argument values.
    pub fn sample(&self, name: &str) -> String {
        match self {
            ArgKind::String { one_of, max_length } => match one_of.first() {
                Some(first) => first.clone(),
                None => format!("{{{name}}}").chars().take(*max_length as usize).collect(),
            },
            ArgKind::Integer { min, max } => 0i64.clamp(*min, *max).to_string(),
            ArgKind::Number { min, max } => {
                let v = 0f64.clamp(min.get(), max.get());
                if v.fract() == 0.0 && v.abs() < 1e15 {
                    format!("{}", v as i64)
                } else {
                    format!("{v}")
                }
            }
            ArgKind::Path { under } => under.first().map(ToString::to_string).unwrap_or_default(),
            ArgKind::Boolean => "false".into(),
            ArgKind::List { .. } => "[]".into(),
        }
    }

    /// The text of each item of a list value, as a scalar argument of the item kind carries
    /// it; `None` if `value` is not a JSON array of strings, numbers and booleans.
    pub fn items_of(&self, value: &str) -> Option<Vec<String>> {
        match self {
            ArgKind::List { .. } => list_items(value),
            _ => None,
        }
    }
}

/// `[tools.NAME.audit]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct AuditPolicy {
    /// Deny and record, or only record.
    pub mode: AuditMode,
    /// What happens when events of the call are lost.
    pub on_audit_loss: LossAction,
    /// Paths (files or trees) that the BPF LSM layer refuses to open, even where `fs` makes
    /// them visible; enforced only where BPF LSM is available.
    pub deny_open: Vec<AbsPath>,
}

/// `[tools.NAME.audit] mode`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// Deny what the manifest does not grant, and record it (the default).
    #[default]
    Enforce,
    /// Record only; the other layers still enforce.
    Audit,
}

/// `[tools.NAME.audit] on_audit_loss`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossAction {
    /// Kill the call as soon as one of its events is lost (the default: nothing it does may
    /// go unrecorded).
    #[default]
    Kill,
    /// Let it run, and count the lost events in its summary.
    Record,
}

/// `[tools.NAME.fs]`: what the sandbox can see and do on the filesystem.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FsGrants {
    /// Visible read-only at the same path.
    pub read: Vec<AbsPath>,
    /// Visible read-write at the same path.
    pub write: Vec<AbsPath>,
    /// Where `execve` is allowed; visible read-only if not otherwise granted.
    pub exec: Vec<AbsPath>,
    /// Other tools of the agent that may execute where this one writes, or write where this
    /// one executes. Both tools must name each other; otherwise such an overlap is refused.
    pub exec_shared_with: Vec<Name>,
}

/// `[tools.NAME.net]`. `connect` and `bind` empty means no IP network at all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NetGrants {
    /// Destinations the tool may connect to.
    pub connect: Vec<HostPort>,
    /// Local addresses the tool may bind.
    pub bind: Vec<HostPort>,
    /// Host Unix sockets (exact socket paths, never directories) the tool may connect to.
    /// Every other host socket is unreachable, even where a read or write grant shows it;
    /// sockets the call makes itself, and `socketpair`, always work.
    pub unix: Vec<AbsPath>,
}

impl NetGrants {
    /// Whether any IP network access is granted.
    pub fn any(&self) -> bool {
        !self.connect.is_empty() || !self.bind.is_empty()
    }
}

/// `[tools.NAME.limits]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Wall-clock limit; the whole process tree is killed when it fires.
    pub timeout_ms: u64,
    /// Memory limit of the call's cgroup, in MiB (swap is not allowed on top).
    pub memory_mb: u64,
    /// Maximum number of tasks in the call's cgroup.
    pub pids: u64,
    /// CPU bandwidth, in percent of one CPU.
    pub cpu_percent: u64,
    /// Bytes kept per stream (stdout, stderr); the rest is counted and dropped.
    pub output_bytes: u64,
    /// Size of the private tmpfs at `/tmp`, in MiB; 0 means no writable `/tmp`.
    pub tmp_mb: u64,
    /// Largest file a process of the call may write, in MiB (`RLIMIT_FSIZE`); a write past
    /// it fails with `EFBIG`.
    pub file_mb: u64,
}

/// One limit key: its name, inclusive range and default.
#[derive(Debug, Clone, Copy)]
pub struct LimitSpec {
    /// The key under `[tools.NAME.limits]`.
    pub key: &'static str,
    /// Smallest accepted value.
    pub min: u64,
    /// Largest accepted value.
    pub max: u64,
    /// Value when the key is absent.
    pub default: u64,
}

/// The limit keys, their ranges and defaults.
pub const LIMITS: [LimitSpec; 7] = [
    LimitSpec { key: "timeout_ms", min: 1, max: 86_400_000, default: 30_000 },
    LimitSpec { key: "memory_mb", min: 8, max: 1_048_576, default: 512 },
    LimitSpec { key: "pids", min: 1, max: 65_536, default: 128 },
    LimitSpec { key: "cpu_percent", min: 1, max: 102_400, default: 100 },
    LimitSpec { key: "output_bytes", min: 0, max: 1 << 30, default: 1 << 20 },
    LimitSpec { key: "tmp_mb", min: 0, max: 65_536, default: 64 },
    LimitSpec { key: "file_mb", min: 1, max: 1_048_576, default: 1024 },
];

impl Limits {
    /// Builds limits from values in [`LIMITS`] order.
    pub(crate) fn from_values(v: [u64; 7]) -> Self {
        Self {
            timeout_ms: v[0],
            memory_mb: v[1],
            pids: v[2],
            cpu_percent: v[3],
            output_bytes: v[4],
            tmp_mb: v[5],
            file_mb: v[6],
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::from_values(LIMITS.map(|l| l.default))
    }
}

/// `[tools.NAME.env]`: the sandbox starts from an empty environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EnvPolicy {
    /// Copied from agentd's own environment when set there.
    pub pass: Vec<EnvName>,
    /// Set to these values.
    pub set: BTreeMap<EnvName, String>,
}

/// `[requires]`: what must be enforced, or calls are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Requires {
    /// Minimum Landlock ABI. Default 1: a call never runs without Landlock unless the
    /// manifest says `landlock_abi = 0`.
    pub landlock_abi: u32,
    /// Whether BPF LSM enforcement is required.
    pub bpf_lsm: bool,
}

impl Default for Requires {
    fn default() -> Self {
        Self { landlock_abi: 1, bpf_lsm: false }
    }
}

/// Largest `requires.landlock_abi` accepted.
pub const MAX_LANDLOCK_ABI: u32 = 64;

/// Each item's text, numbers exactly as written (re-printing `0.000001` would give `1e-6`).
fn list_items(value: &str) -> Option<Vec<String>> {
    let raw: Vec<&serde_json::value::RawValue> = serde_json::from_str(value).ok()?;
    raw.into_iter()
        .map(|r| {
            let text = r.get().trim();
            match serde_json::from_str::<serde_json::Value>(text).ok()? {
                serde_json::Value::String(s) => Some(s),
                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => Some(text.to_string()),
                _ => None,
            }
        })
        .collect()
}
