//! The `agentd serve` configuration: which agents the daemon hosts, the model they share,
//! where state and the audit log live, the control socket, limits, and who may do what.
//!
//! Parsing is strict like the manifest's: unknown keys, bad values and references to agents
//! that do not exist are errors naming the file, line, column and key. Paths are kept as
//! written; the supervisor resolves relative ones against the config file's directory.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::diag::{Diagnostics, Sink};
use crate::types::Name;

/// Where the daemon listens by default.
pub const DEFAULT_SOCKET: &str = "/run/agentd/agentd.sock";
/// Where the daemon keeps its task store by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/agentd/state";

/// A parsed, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The control socket.
    pub socket: String,
    /// Directory of the task store.
    pub state_dir: String,
    /// The hash-chained audit log every call is recorded in.
    pub audit_log: String,
    /// The model every agent shares.
    pub model: ModelConfig,
    /// Host-wide limits.
    pub limits: HostLimits,
    /// Limits on API connections, before and around authorization.
    pub api: ApiLimits,
    /// Hosted agents by name.
    pub agents: BTreeMap<String, AgentConfig>,
    /// Roles, in file order.
    pub roles: Vec<Role>,
}

/// The shared model backend.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    /// In process: the embedded default, or a GGUF file.
    Local {
        /// A llama-family GGUF instead of the embedded model.
        path: Option<String>,
        /// KV cache memory all paused agents may hold, in MiB.
        kv_budget_mb: u64,
        /// Most sequences decoded in one batched step.
        max_batch: usize,
    },
    /// An OpenAI-compatible chat completions server.
    Openai {
        /// The API base, e.g. `http://127.0.0.1:8080/v1`.
        endpoint: String,
        /// The server's model name.
        name: String,
        /// How the server holds its model to the protocol: `auto` (default), `grammar`,
        /// `json_schema`, `tools` or `none`, as `agentd run --server-constraints` takes.
        constraints: String,
    },
    /// A scripted model for tests and benchmarks: every task makes `calls` calls of `tool`
    /// with `args`, then answers. It exercises everything but inference.
    Scripted {
        /// The tool each turn calls.
        tool: String,
        /// Its arguments.
        args: BTreeMap<String, String>,
        /// Calls per task.
        calls: usize,
    },
}

/// Host-wide limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// Tool calls running at once on the host (each in its own sandbox). At most 7: each
    /// sandbox worker holds one of the BPF layer's 8 event slots, and one is left for
    /// `agentd exec` and `agentd run` on the same host.
    pub max_concurrent_calls: usize,
    /// Tasks accepted but not finished; beyond it, submit answers "busy".
    pub max_queued_tasks: usize,
    /// Tasks whose loops run at once; the rest wait in order.
    pub max_running_tasks: usize,
    /// On SIGTERM, how long running calls may take to finish before they are killed.
    pub drain_timeout_ms: u64,
    /// Ended tasks the task store keeps (the newest), with their events and calls.
    pub keep_finished_tasks: usize,
    /// Days the task store keeps an ended task.
    pub keep_finished_days: usize,
}

/// `[api]`: what one connection to the control socket may hold, and for how long. A peer with
/// no role is answered 403 as it connects, before anything it sends is read, so none of this
/// is spent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Connections open at once, over all peers (uid 0 is never refused for this one, so the
    /// operator can always get in).
    pub max_connections: usize,
    /// Connections open at once from one uid.
    pub max_connections_per_uid: usize,
    /// Time a client has to send a request's headers, counted from when the daemon starts
    /// waiting for them (so also between requests on a kept-alive connection).
    pub header_timeout_ms: u64,
    /// Time a client has to send a request's whole body.
    pub body_timeout_ms: u64,
    /// A connection on which no byte moved either way for this long, while no request of it
    /// is being worked on, is closed (a watcher that stopped reading its event stream, a body
    /// that stalled).
    pub idle_timeout_ms: u64,
    /// Largest body of `POST /v1/tasks`, in KiB; the other routes take no body.
    pub max_body_kb: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: 256,
            max_connections_per_uid: 32,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            idle_timeout_ms: 60_000,
            max_body_kb: 512,
        }
    }
}

/// One hosted agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Its manifest file.
    pub manifest: String,
    /// Its tool calls running at once, over all its tasks.
    pub max_concurrent_calls: usize,
    /// Its tasks accepted but not finished.
    pub max_queued_tasks: usize,
    /// Of those, most from one submitter uid, so that one user cannot take every place
    /// (default: half of `max_queued_tasks`, rounded up).
    pub max_queued_per_uid: usize,
    /// Most assistant turns per task.
    pub max_steps: usize,
    /// Most generated tokens per task.
    pub max_tokens: usize,
}

/// Who a role applies to, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Its name.
    pub name: String,
    /// Peers with one of these uids.
    pub uids: Vec<u32>,
    /// Peers with one of these gids (primary or supplementary).
    pub gids: Vec<u32>,
    /// Agents it may submit to, and whose tasks it may see and cancel; `*` for all.
    pub agents: Vec<String>,
    /// Whether it may see and cancel tasks that other uids submitted to those agents (by
    /// default only the caller's own).
    pub all_tasks: bool,
    /// Whether it may read audit records.
    pub audit: bool,
    /// Whether it may call those agents' tools directly, over MCP (`/mcp/{agent}`), with no
    /// model in between. Off by default: submitting tasks does not imply it.
    pub tools: bool,
}

impl Role {
    /// Whether the role covers `agent`.
    pub fn allows(&self, agent: &str) -> bool {
        self.agents.iter().any(|a| a == "*" || a == agent)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    version: Spanned<u32>,
    #[serde(default)]
    paths: RawPaths,
    #[serde(default)]
    model: RawModel,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    agents: BTreeMap<Spanned<String>, RawAgent>,
    #[serde(default)]
    roles: BTreeMap<Spanned<String>, RawRole>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    socket: Option<String>,
    state_dir: Option<String>,
    audit_log: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawModel {
    backend: Option<Spanned<String>>,
    path: Option<String>,
    kv_budget_mb: Option<Spanned<u64>>,
    max_batch: Option<Spanned<usize>>,
    endpoint: Option<String>,
    name: Option<String>,
    constraints: Option<Spanned<String>>,
    tool: Option<String>,
    #[serde(default)]
    args: BTreeMap<String, String>,
    calls: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_concurrent_calls: Option<Spanned<usize>>,
    max_queued_tasks: Option<Spanned<usize>>,
    max_running_tasks: Option<Spanned<usize>>,
    drain_timeout_ms: Option<u64>,
    keep_finished_tasks: Option<Spanned<usize>>,
    keep_finished_days: Option<Spanned<usize>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    max_connections: Option<Spanned<usize>>,
    max_connections_per_uid: Option<Spanned<usize>>,
    header_timeout_ms: Option<Spanned<usize>>,
    body_timeout_ms: Option<Spanned<usize>>,
    idle_timeout_ms: Option<Spanned<usize>>,
    max_body_kb: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    manifest: String,
    max_concurrent_calls: Option<Spanned<usize>>,
    max_queued_tasks: Option<Spanned<usize>>,
    max_queued_per_uid: Option<Spanned<usize>>,
    max_steps: Option<Spanned<usize>>,
    max_tokens: Option<Spanned<usize>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    #[serde(default)]
    uids: Vec<u32>,
    #[serde(default)]
    gids: Vec<u32>,
    #[serde(default)]
    agents: Vec<Spanned<String>>,
    #[serde(default)]
    all_tasks: bool,
    #[serde(default)]
    audit: bool,
    #[serde(default)]
    tools: bool,
}

/// Checks that a count is within `lo..=hi`.
fn bounded(sink: &mut Sink<'_>, v: &Option<Spanned<usize>>, key: &str, lo: usize, hi: usize, default: usize) -> usize {
    match v {
        None => default,
        Some(s) if (lo..=hi).contains(s.get_ref()) => *s.get_ref(),
        Some(s) => {
            sink.error(s.span(), key, format!("`{key}` must be between {lo} and {hi}, not {}", s.get_ref()));
            default
        }
    }
}

/// Parses the text of a configuration file named `file`.
pub fn parse_config(file: &str, src: &str) -> Result<ServeConfig, Diagnostics> {
    let mut sink = Sink::new(file, src);
    let raw: RawConfig = match toml::from_str(src) {
        Ok(r) => r,
        Err(e) => {
            sink.error(e.span().unwrap_or(0..0), "", e.message().trim().to_string());
            return Err(sink.finish().err().unwrap_or(Diagnostics(Vec::new())));
        }
    };
    if *raw.version.get_ref() != 1 {
        sink.error(
            raw.version.span(),
            "version",
            format!("unsupported config version {}; this agentd reads version 1", raw.version.get_ref()),
        );
    }
    let model = model(&mut sink, raw.model);
    let l = &raw.limits;
    let limits = HostLimits {
        max_concurrent_calls: bounded(&mut sink, &l.max_concurrent_calls, "limits.max_concurrent_calls", 1, 7, 4),
        max_queued_tasks: bounded(&mut sink, &l.max_queued_tasks, "limits.max_queued_tasks", 1, 100_000, 1024),
        max_running_tasks: bounded(&mut sink, &l.max_running_tasks, "limits.max_running_tasks", 1, 4096, 256),
        drain_timeout_ms: l.drain_timeout_ms.unwrap_or(10_000),
        keep_finished_tasks: bounded(
            &mut sink,
            &l.keep_finished_tasks,
            "limits.keep_finished_tasks",
            1,
            10_000_000,
            10_000,
        ),
        keep_finished_days: bounded(&mut sink, &l.keep_finished_days, "limits.keep_finished_days", 1, 36_500, 30),
    };
    let api = api(&mut sink, &raw.api);
    let mut agents = BTreeMap::new();
    for (name, a) in raw.agents {
        if let Err(e) = Name::parse(name.get_ref()) {
            sink.error(name.span(), "agents", format!("agent name {:?}: {e}", name.get_ref()));
        }
        let key = |k: &str| format!("agents.{}.{k}", name.get_ref());
        let max_queued_tasks = bounded(&mut sink, &a.max_queued_tasks, &key("max_queued_tasks"), 1, 100_000, 256);
        let per_uid_default = max_queued_tasks.div_ceil(2);
        let cfg = AgentConfig {
            manifest: a.manifest,
            max_concurrent_calls: bounded(&mut sink, &a.max_concurrent_calls, &key("max_concurrent_calls"), 1, 64, 2),
            max_queued_tasks,
            max_queued_per_uid: bounded(
                &mut sink,
                &a.max_queued_per_uid,
                &key("max_queued_per_uid"),
                1,
                100_000,
                per_uid_default,
            ),
            max_steps: bounded(&mut sink, &a.max_steps, &key("max_steps"), 1, 1000, 8),
            max_tokens: bounded(&mut sink, &a.max_tokens, &key("max_tokens"), 1, 1_000_000, 1024),
        };
        agents.insert(name.into_inner(), cfg);
    }
    let mut roles = Vec::new();
    for (name, r) in raw.roles {
        for a in &r.agents {
            if a.get_ref() != "*" && !agents.contains_key(a.get_ref()) {
                let known: Vec<&str> = agents.keys().map(String::as_str).collect();
                let hint = crate::diag::suggest(a.get_ref(), &known)
                    .map(|s| format!("; did you mean {s:?}?"))
                    .unwrap_or_default();
                sink.error(
                    a.span(),
                    &format!("roles.{}.agents", name.get_ref()),
                    format!("no agent named {:?} is configured{hint}", a.get_ref()),
                );
            }
        }
        if r.uids.is_empty() && r.gids.is_empty() {
            sink.error(
                name.span(),
                &format!("roles.{}", name.get_ref()),
                format!("role {:?} names no uids or gids, so it applies to no one", name.get_ref()),
            );
        }
        roles.push(Role {
            name: name.get_ref().clone(),
            uids: r.uids,
            gids: r.gids,
            agents: r.agents.into_iter().map(Spanned::into_inner).collect(),
            all_tasks: r.all_tasks,
            audit: r.audit,
            tools: r.tools,
        });
    }
    sink.finish()?;
    let p = raw.paths;
    Ok(ServeConfig {
        socket: p.socket.unwrap_or_else(|| DEFAULT_SOCKET.to_string()),
        state_dir: p.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.to_string()),
        audit_log: p.audit_log.unwrap_or_else(|| "/var/lib/agentd/audit/audit.jsonl".to_string()),
        model: model.unwrap_or(ModelConfig::Local { path: None, kv_budget_mb: 256, max_batch: 8 }),
        limits,
        api,
        agents,
        roles,
    })
}

fn api(sink: &mut Sink<'_>, a: &RawApi) -> ApiLimits {
    let d = ApiLimits::default();
    let ms = |sink: &mut Sink<'_>, v: &Option<Spanned<usize>>, key: &str, lo: usize, default: u64| {
        bounded(sink, v, key, lo, 3_600_000, usize::try_from(default).unwrap_or(usize::MAX)) as u64
    };
    let max_connections = bounded(sink, &a.max_connections, "api.max_connections", 1, 65_536, d.max_connections);
    let per_uid = bounded(
        sink,
        &a.max_connections_per_uid,
        "api.max_connections_per_uid",
        1,
        max_connections,
        d.max_connections_per_uid.min(max_connections),
    );
    ApiLimits {
        max_connections,
        max_connections_per_uid: per_uid,
        header_timeout_ms: ms(sink, &a.header_timeout_ms, "api.header_timeout_ms", 100, d.header_timeout_ms),
        body_timeout_ms: ms(sink, &a.body_timeout_ms, "api.body_timeout_ms", 100, d.body_timeout_ms),
        idle_timeout_ms: ms(sink, &a.idle_timeout_ms, "api.idle_timeout_ms", 1000, d.idle_timeout_ms),
        max_body_kb: bounded(sink, &a.max_body_kb, "api.max_body_kb", 1, 65_536, d.max_body_kb),
    }
}

/// What `model.constraints` takes.
pub const SERVER_CONSTRAINTS: [&str; 5] = ["auto", "grammar", "json_schema", "tools", "none"];

fn model(sink: &mut Sink<'_>, m: RawModel) -> Option<ModelConfig> {
    let (backend, span): (String, Range<usize>) = match &m.backend {
        Some(b) => (b.get_ref().clone(), b.span()),
        None => ("local".to_string(), 0..0),
    };
    let missing = |sink: &mut Sink<'_>, key: &str| {
        sink.error(
            span.clone(),
            &format!("model.{key}"),
            format!("`model.backend = \"{backend}\"` needs `model.{key}`"),
        );
    };
    match backend.as_str() {
        "local" => Some(ModelConfig::Local {
            path: m.path,
            kv_budget_mb: match m.kv_budget_mb {
                Some(v) if *v.get_ref() == 0 => {
                    sink.error(v.span(), "model.kv_budget_mb", "`model.kv_budget_mb` must be at least 1");
                    1
                }
                Some(v) => v.into_inner(),
                None => 256,
            },
            max_batch: bounded(sink, &m.max_batch, "model.max_batch", 1, 64, 8),
        }),
        "openai" => {
            let (Some(endpoint), Some(name)) = (m.endpoint.clone(), m.name.clone()) else {
                if m.endpoint.is_none() {
                    missing(sink, "endpoint");
                }
                if m.name.is_none() {
                    missing(sink, "name");
                }
                return None;
            };
            let constraints = match m.constraints {
                None => "auto".to_string(),
                Some(c) if SERVER_CONSTRAINTS.contains(&c.get_ref().as_str()) => c.into_inner(),
                Some(c) => {
                    sink.error(
                        c.span(),
                        "model.constraints",
                        format!("{:?} is not one of {}", c.get_ref(), SERVER_CONSTRAINTS.join(", ")),
                    );
                    return None;
                }
            };
            Some(ModelConfig::Openai { endpoint, name, constraints })
        }
        "scripted" => {
            let Some(tool) = m.tool else {
                missing(sink, "tool");
                return None;
            };
            Some(ModelConfig::Scripted { tool, args: m.args, calls: m.calls.unwrap_or(1) })
        }
        other => {
            sink.error(
                span,
                "model.backend",
                format!("unknown model backend {other:?}; use \"local\", \"openai\" or \"scripted\""),
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1
[paths]
socket = "/tmp/a.sock"
[model]
backend = "scripted"
tool = "echo"
args = { text = "hi" }
calls = 2
[agents.demo]
manifest = "demo.toml"
[roles.ops]
uids = [0]
agents = ["*"]
audit = true
[roles.ci]
gids = [100]
agents = ["demo"]
"#;

    #[test]
    fn parses_a_full_config() {
        let c = parse_config("a.toml", GOOD).expect("valid");
        assert_eq!(c.socket, "/tmp/a.sock");
        assert_eq!(c.state_dir, DEFAULT_STATE_DIR);
        assert_eq!(c.agents["demo"].max_concurrent_calls, 2);
        assert!(matches!(c.model, ModelConfig::Scripted { calls: 2, .. }));
        assert_eq!(c.roles.len(), 2);
        assert!(c.roles.iter().any(|r| r.name == "ci" && r.allows("demo") && !r.allows("other") && !r.audit));
        assert!(c.roles.iter().all(|r| !r.all_tasks), "others' tasks are hidden unless a role says so");
        let all =
            parse_config("a.toml", &GOOD.replace("audit = true", "audit = true\nall_tasks = true")).expect("valid");
        assert!(all.roles.iter().any(|r| r.name == "ops" && r.all_tasks));
        assert!(c.roles.iter().all(|r| !r.tools), "direct tool calls are off unless a role says so");
        let tools = parse_config("a.toml", &GOOD.replace("audit = true", "audit = true\ntools = true")).expect("valid");
        assert!(tools.roles.iter().any(|r| r.name == "ops" && r.tools));
    }

    fn err(src: &str) -> String {
        parse_config("a.toml", src).err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn errors_name_line_and_key() {
        let bad = GOOD.replace("agents = [\"demo\"]", "agents = [\"dmeo\"]");
        let e = err(&bad);
        assert!(e.starts_with("a.toml:18:"), "{e}");
        assert!(e.contains("no agent named \"dmeo\"") && e.contains("did you mean \"demo\""), "{e}");

        let typo = GOOD.replace("socket =", "sokcet =");
        let e = err(&typo);
        assert!(e.starts_with("a.toml:4:") && e.contains("sokcet"), "{e}");

        let e = err(&GOOD.replace("calls = 2", "calls = \"two\""));
        assert!(e.starts_with("a.toml:9:"), "{e}");

        let e = err(&GOOD.replace("uids = [0]\n", ""));
        assert!(e.contains("applies to no one"), "{e}");

        let e = err("version = 1\n[limits]\nmax_concurrent_calls = 0\n");
        assert!(e.starts_with("a.toml:3:") && e.contains("between 1 and 7"), "{e}");

        let e = err("version = 1\n[limits]\n\nkeep_finished_days = 0\n");
        assert!(e.starts_with("a.toml:4:") && e.contains("keep_finished_days"), "{e}");

        let e = err("version = 1\n[api]\nmax_connections = 8\nmax_connections_per_uid = 9\n");
        assert!(
            e.starts_with("a.toml:4:") && e.contains("api.max_connections_per_uid") && e.contains("between 1 and 8"),
            "{e}"
        );

        let e = err("version = 1\n[api]\nheader_timeout_ms = 0\n");
        assert!(e.starts_with("a.toml:3:") && e.contains("api.header_timeout_ms"), "{e}");

        let e = err("version = 1\n[model]\nbackend = \"openai\"\n");
        assert!(e.contains("needs `model.endpoint`") && e.contains("needs `model.name`"), "{e}");
    }

    #[test]
    fn the_shipped_sample_config_parses() {
        let c = parse_config("dist/agentd.toml", include_str!("../../dist/agentd.toml")).expect("the sample is valid");
        assert_eq!(c.limits.max_concurrent_calls, 4);
        assert!(c.roles.iter().any(|r| r.name == "developers" && r.allows("demo") && !r.audit));
    }

    #[test]
    fn defaults_fail_closed() {
        let c = parse_config("a.toml", "version = 1\n").expect("valid");
        assert!(c.roles.is_empty(), "no role unless configured: everyone is refused");
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert!(matches!(c.model, ModelConfig::Local { path: None, .. }));
        assert_eq!(c.api, ApiLimits::default(), "every connection is bounded by default");
    }
}
