//! Parse and validate a manifest, reporting every problem with its position.
//!
//! This walks `toml`'s spanned document (`DeTable`) instead of deriving `Deserialize`:
//! serde stops at the first error, and `policy check` must report all of them, each with a
//! line, a column, the dotted key and a suggestion for a misspelt key.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{suggest, Diagnostic, Diagnostics, Sink};
use crate::model::{agent_id, fits_decimals, NUMBER_DECIMALS};
use crate::model::{is_mcp_tool_name, McpLifetime, McpServer};
use crate::model::{
    Agent, AnswerMode, ArgKind, ArgSpec, AuditMode, AuditPolicy, EnvPolicy, Finite, FsGrants, Limits, LossAction,
    Manifest, NetGrants, Requires, Tool, DEFAULT_ARG_MAX_LENGTH, LIMITS, MANIFEST_VERSION, MAX_LANDLOCK_ABI,
    NUMBER_LIMIT,
};
use crate::template::ArgTemplate;
use crate::types::{AbsPath, EnvName, HostAddr, HostPort, Name};

type Value<'i> = Spanned<DeValue<'i>>;

// The keys of each table come from `crate::keys`, which the JSON Schema is written from too.
use crate::keys::{self, names, ANSWER_MODES, ARG_TYPES, AUDIT_MODES, LOSS_ACTIONS, MCP_LIFETIMES};

/// Parses and validates manifest text. `file` is used only in diagnostics.
///
/// ```
/// let src = r#"
/// version = 1
/// [agent]
/// name = "demo"
/// [tools.cat]
/// description = "Print a file"
/// argv = ["/usr/bin/cat", "{path}"]
/// [tools.cat.fs]
/// read = ["/usr", "/data"]
/// exec = ["/usr/bin"]
/// "#;
/// let m = agentd_policy::parse("demo.toml", src).expect("valid");
/// assert_eq!(m.agent.name.as_str(), "demo");
///
/// let typo = src.replace("read =", "raed =");
/// let err = agentd_policy::parse("demo.toml", &typo).unwrap_err();
/// assert!(err.to_string().contains("did you mean `tools.cat.fs.read`?"));
/// ```
pub fn parse(file: &str, src: &str) -> Result<Manifest, Diagnostics> {
    parse_with_warnings(file, src).map(|(m, _)| m)
}

/// [`parse`], also returning the warnings: what is valid but probably not what the author
/// meant (an argument that could become an option, for example).
pub fn parse_with_warnings(file: &str, src: &str) -> Result<(Manifest, Vec<Diagnostic>), Diagnostics> {
    let mut sink = Sink::new(file, src);
    let (doc, syntax) = DeTable::parse_recoverable(src);
    if !syntax.is_empty() {
        for e in syntax {
            let msg = e.message().trim().to_string();
            sink.error(e.span().unwrap_or(0..0), "", format!("TOML syntax: {msg}"));
        }
        return Err(sink.finish().err().unwrap_or(Diagnostics(Vec::new())));
    }
    let mut w = Walker { sink, mcp_units: Default::default(), grants: Vec::new(), shares: BTreeMap::new() };
    let manifest = w.manifest(doc.get_ref());
    let warnings = w.sink.finish()?;
    Ok((manifest.ok_or_else(|| Diagnostics(Vec::new()))?, warnings))
}

/// Parses bytes that may not be UTF-8 (a manifest file read from disk).
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Manifest, Diagnostics> {
    parse_bytes_with_warnings(file, bytes).map(|(m, _)| m)
}

/// [`parse_bytes`], also returning the warnings.
pub fn parse_bytes_with_warnings(file: &str, bytes: &[u8]) -> Result<(Manifest, Vec<Diagnostic>), Diagnostics> {
    match std::str::from_utf8(bytes) {
        Ok(src) => parse_with_warnings(file, src),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let src = std::str::from_utf8(valid).unwrap_or_default();
            let mut sink = Sink::new(file, src);
            sink.error(src.len()..src.len(), "", "file is not valid UTF-8 (TOML must be UTF-8)");
            Err(sink.finish().err().unwrap_or(Diagnostics(Vec::new())))
        }
    }
}

struct Walker<'s> {
    sink: Sink<'s>,
    /// The names in `grants` and `shares` that are MCP servers rather than tools.
    mcp_units: std::collections::BTreeSet<String>,
    /// Every `fs.write` and `fs.exec` path of every tool, for the checks across tools.
    grants: Vec<ToolGrant>,
    /// `fs.exec_shared_with` of each tool, each name where it was written.
    shares: BTreeMap<String, Vec<(Name, Range<usize>)>>,
}

/// One `fs.write` or `fs.exec` path of a tool, where it was written.
struct ToolGrant {
    tool: String,
    exec: bool,
    path: AbsPath,
    span: Range<usize>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn kind(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

impl Walker<'_> {
    fn err(&mut self, span: Range<usize>, key: &str, msg: impl Into<String>) {
        self.sink.error(span, key, msg);
    }

    fn warn(&mut self, span: Range<usize>, key: &str, msg: impl Into<String>) {
        self.sink.warning(span, key, msg);
    }

    fn boolean(&mut self, t: &DeTable<'_>, key: &str, path: &str) -> bool {
        match Self::get(t, key) {
            Some(v) => match v.get_ref() {
                DeValue::Boolean(b) => *b,
                _ => {
                    self.expect(v, &join(path, key), "a boolean");
                    false
                }
            },
            None => false,
        }
    }

    /// Reports every key of `t` that is not in `allowed`, with the closest valid key.
    fn check_keys(&mut self, t: &DeTable<'_>, path: &str, allowed: &[&str]) {
        for k in t.keys() {
            let name = k.get_ref().as_ref();
            if allowed.contains(&name) {
                continue;
            }
            let full = join(path, name);
            let hint = match suggest(name, allowed) {
                Some(s) => format!("; did you mean `{}`?", join(path, s)),
                None => format!("; valid keys here: {}", allowed.join(", ")),
            };
            self.err(k.span(), &full, format!("unknown key `{full}`{hint}"));
        }
    }

    fn get<'t, 'i>(t: &'t DeTable<'i>, key: &str) -> Option<&'t Value<'i>> {
        t.iter().find(|(k, _)| k.get_ref() == key).map(|(_, v)| v)
    }

    fn expect(&mut self, v: &Value<'_>, path: &str, want: &str) {
        let got = kind(v.get_ref());
        self.err(v.span(), path, format!("`{path}` must be {want}, not {got}"));
    }

    fn table<'t, 'i>(&mut self, v: &'t Value<'i>, path: &str) -> Option<&'t DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            _ => {
                self.expect(v, path, "a table");
                None
            }
        }
    }

    fn string(&mut self, v: &Value<'_>, path: &str) -> Option<String> {
        match v.get_ref() {
            DeValue::String(s) => Some(s.to_string()),
            _ => {
                self.expect(v, path, "a string");
                None
            }
        }
    }

    fn int(&mut self, v: &Value<'_>, path: &str) -> Option<i64> {
        match v.get_ref() {
            DeValue::Integer(i) => match i64::from_str_radix(i.as_str(), i.radix()) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.err(v.span(), path, format!("`{path}` is too large"));
                    None
                }
            },
            _ => {
                self.expect(v, path, "an integer");
                None
            }
        }
    }

    fn int_in(&mut self, v: &Value<'_>, path: &str, min: u64, max: u64) -> Option<u64> {
        let n = self.int(v, path)?;
        match u64::try_from(n) {
            Ok(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.err(v.span(), path, format!("`{path}` = {n} is out of range {min}..={max}"));
                None
            }
        }
    }

    /// An array of strings, each with its span. Reports non-strings individually.
    fn strings(&mut self, v: &Value<'_>, path: &str) -> Vec<(String, Range<usize>)> {
        let DeValue::Array(items) = v.get_ref() else {
            self.expect(v, path, "an array of strings");
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if let Some(s) = self.string(item, &format!("{path}[{i}]")) {
                out.push((s, item.span()));
            }
        }
        out
    }

    /// An optional sub-table: `None` if absent, and reported if present but not a table.
    fn sub<'t, 'i>(&mut self, t: &'t DeTable<'i>, key: &str, path: &str) -> Option<&'t DeTable<'i>> {
        let v = Self::get(t, key)?;
        self.table(v, &join(path, key))
    }

    fn manifest(&mut self, top: &DeTable<'_>) -> Option<Manifest> {
        self.check_keys(top, "", &names(keys::TOP));
        let version = match Self::get(top, "version") {
            None => {
                self.err(0..0, "version", format!("missing `version`; add `version = {MANIFEST_VERSION}` at the top"));
                None
            }
            Some(v) => match self.int(v, "version") {
                Some(MANIFEST_VERSION) => Some(MANIFEST_VERSION),
                Some(n) => {
                    self.err(
                        v.span(),
                        "version",
                        format!("unsupported manifest version {n}; this agentd reads version {MANIFEST_VERSION}"),
                    );
                    None
                }
                None => None,
            },
        };
        let agent = match Self::get(top, "agent") {
            None => {
                self.err(0..0, "agent", "missing `[agent]` table with `name = \"...\"`");
                None
            }
            Some(v) => self.table(v, "agent").and_then(|t| self.agent(t, v.span())),
        };
        let mut tools = BTreeMap::new();
        if let Some(t) = self.sub(top, "tools", "") {
            for (k, v) in t {
                let path = join("tools", k.get_ref());
                let name = Name::parse(k.get_ref()).map_err(|e| self.err(k.span(), &path, format!("tool name {e}")));
                let tool = self.table(v, &path).and_then(|t| self.tool(t, v.span(), &path));
                if let (Ok(name), Some(tool)) = (name, tool) {
                    tools.insert(name, tool);
                }
            }
        }
        let mut mcp = BTreeMap::new();
        if let Some(t) = self.sub(top, "mcp", "") {
            for (k, v) in t {
                let path = join("mcp", k.get_ref());
                let name =
                    Name::parse(k.get_ref()).map_err(|e| self.err(k.span(), &path, format!("MCP server name {e}")));
                let server = self.table(v, &path).and_then(|t| self.mcp_server(t, v.span(), &path));
                if let (Ok(name), Some(server)) = (name, server) {
                    mcp.insert(name, server);
                }
            }
        }
        for (name, _) in mcp.iter().filter(|(n, _)| tools.contains_key(*n)) {
            let key = format!("mcp.{}", name.as_str());
            let span = self.sub(top, "mcp", "").and_then(|t| Self::get(t, name.as_str())).map_or(0..0, |v| v.span());
            let msg = format!(
                "`{key}` has the name of a tool (`tools.{}`): a name is either a tool or an MCP server",
                name.as_str()
            );
            self.err(span, &key, msg);
        }
        self.check_across_tools(&tools, &mcp);
        let requires = self.sub(top, "requires", "").map(|t| self.requires(t)).unwrap_or_default();
        Some(Manifest { version: version?, agent: agent?, tools, mcp, requires })
    }

    /// The agent is the unit: a model that calls one tool can call them all. Where one tool
    /// writes and another executes, the first could plant a program for the second, which
    /// would then run it with its own grants. Refused unless both name each other in
    /// `fs.exec_shared_with`; tools that do not exist there are reported too.
    fn check_across_tools(&mut self, tools: &BTreeMap<Name, Tool>, mcp: &BTreeMap<Name, McpServer>) {
        let shares = std::mem::take(&mut self.shares);
        for (tool, names) in &shares {
            for (n, span) in names {
                if !tools.contains_key(n) && !mcp.contains_key(n) {
                    let key = format!("{}.fs.exec_shared_with", self.unit_key(tool));
                    let msg =
                        format!("`{key}` names \"{}\", which is not a tool or MCP server of this manifest", n.as_str());
                    self.err(span.clone(), &key, msg);
                }
            }
        }
        let named = |a: &str, b: &str| shares.get(a).is_some_and(|v| v.iter().any(|(n, _)| n.as_str() == b));
        let grants = std::mem::take(&mut self.grants);
        for e in grants.iter().filter(|g| g.exec) {
            for w in grants.iter().filter(|g| !g.exec && g.tool != e.tool) {
                let overlap =
                    e.path.as_path().starts_with(w.path.as_path()) || w.path.as_path().starts_with(e.path.as_path());
                if !overlap || (named(&e.tool, &w.tool) && named(&w.tool, &e.tool)) {
                    continue;
                }
                let key = format!("{}.fs.exec", self.unit_key(&e.tool));
                let msg = format!(
                    "`{key}` path {} overlaps `{}.fs.write` path {}: the model could write a program with \
                     one tool and run it with the other; if that is intended, list each tool in the other's \
                     `fs.exec_shared_with`",
                    e.path,
                    self.unit_key(&w.tool),
                    w.path
                );
                self.err(e.span.clone(), &key, msg);
            }
        }
    }

    /// `tools.NAME` or `mcp.NAME`: where the unit called `name` is written.
    fn unit_key(&self, name: &str) -> String {
        if self.mcp_units.contains(name) {
            format!("mcp.{name}")
        } else {
            format!("tools.{name}")
        }
    }

    /// `[mcp.NAME]`: a third-party MCP server's command, lifetime, offered tools and sandbox.
    fn mcp_server(&mut self, t: &DeTable<'_>, span: Range<usize>, path: &str) -> Option<McpServer> {
        self.check_keys(t, path, &names(keys::MCP));
        let command = self.command(t, span.clone(), path);
        let lifetime = match self.choice(t, "lifetime", path, MCP_LIFETIMES) {
            Some(1) => McpLifetime::Session,
            _ => McpLifetime::Call,
        };
        let key = join(path, "tools");
        let mut tools: Vec<String> = Vec::new();
        match Self::get(t, "tools") {
            None => self.err(
                span,
                &key,
                format!("missing `{key}`: the server's tools that are offered (e.g. [\"read_file\"]); no other is"),
            ),
            Some(v) => {
                let items = self.strings(v, &key);
                if items.is_empty() {
                    self.err(v.span(), &key, format!("`{key}` is empty: the server would offer nothing"));
                }
                for (s, sp) in items {
                    if !is_mcp_tool_name(&s) {
                        self.err(
                            sp,
                            &key,
                            format!(
                                "`{key}`: {s:?} is not an MCP tool name (1-128 of letters, digits, '_', '-' and '.')"
                            ),
                        );
                    } else if !tools.contains(&s) {
                        tools.push(s);
                    }
                }
            }
        }
        let key = join(path, "listing_sha256");
        let listing_sha256 = Self::get(t, "listing_sha256").and_then(|v| {
            let text = self.string(v, &key)?;
            let ok = text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !ok {
                self.err(
                    v.span(),
                    &key,
                    format!("`{key}` must be 64 lowercase hex digits (the SHA-256 `agentd mcp` reports for the server's listing)"),
                );
            }
            ok.then_some(text)
        });
        let mut sandbox = self.sandbox(t, String::new(), path);
        sandbox.argv = command?;
        Some(McpServer { lifetime, tools, listing_sha256, sandbox })
    }

    /// `command` of an MCP server: a program and literal arguments (the server gets its
    /// requests over MCP, never in its argv).
    fn command(&mut self, t: &DeTable<'_>, span: Range<usize>, path: &str) -> Option<Vec<ArgTemplate>> {
        let key = join(path, "command");
        let argv = self.argv_at(t, span, path, "command")?;
        let mut literal = true;
        for tpl in &argv {
            if let Some(n) = tpl.placeholders().next() {
                let msg = format!(
                    "`{key}` has the placeholder {{{}}}: an MCP server's command is literal (its requests come over MCP)",
                    n.as_str()
                );
                self.err(Self::get(t, "command").map_or(0..0, |v| v.span()), &key, msg);
                literal = false;
            }
        }
        literal.then_some(argv)
    }

    fn agent(&mut self, t: &DeTable<'_>, span: Range<usize>) -> Option<Agent> {
        self.check_keys(t, "agent", &names(keys::AGENT));
        let name = match Self::get(t, "name") {
            None => {
                self.err(span, "agent.name", "missing `agent.name`");
                None
            }
            Some(v) => self.string(v, "agent.name").and_then(|s| {
                Name::parse(&s).map_err(|e| self.err(v.span(), "agent.name", format!("agent name {e}"))).ok()
            }),
        };
        let name = name?;
        let derived = agent_id(name.as_str());
        let mut id = |key: &str| -> Option<u32> {
            let path = join("agent", key);
            let Some(v) = Self::get(t, key) else { return Some(derived) };
            let n = self.int_in(v, &path, 1, u64::from(u32::MAX - 1))?;
            u32::try_from(n).ok()
        };
        let (uid, gid) = (id("uid"), id("gid"));
        let derived_ids = Self::get(t, "uid").is_none() && Self::get(t, "gid").is_none();
        let answer = match self.choice(t, "answer", "agent", ANSWER_MODES) {
            Some(1) => AnswerMode::Quote,
            _ => AnswerMode::Free,
        };
        Some(Agent { name, uid: uid?, gid: gid?, derived_ids, answer })
    }

    fn tool(&mut self, t: &DeTable<'_>, span: Range<usize>, path: &str) -> Option<Tool> {
        self.check_keys(t, path, &names(keys::TOOL));
        let description = match Self::get(t, "description") {
            Some(v) => self.string(v, &join(path, "description")).unwrap_or_default(),
            None => String::new(),
        };
        let argv = self.argv(t, span, path);
        let mut tool = self.sandbox(t, description, path);
        tool.argv = argv?;
        tool.args = self.args(t, &tool.argv, &tool.fs, path);
        if let Some(v) = Self::get(t, "ok_exit") {
            tool.ok_exit = self.ok_exit(v, &join(path, "ok_exit"));
        }
        Some(tool)
    }

    /// What a tool and an MCP server both have: grants, limits, environment, audit rules and
    /// `allow_jit` (no argv or arguments yet).
    fn sandbox(&mut self, t: &DeTable<'_>, description: String, path: &str) -> Tool {
        let fs = self.sub(t, "fs", path).map(|f| self.fs(f, &join(path, "fs"))).unwrap_or_default();
        let net = self.sub(t, "net", path).map(|n| self.net(n, &join(path, "net"))).unwrap_or_default();
        let limits = self.sub(t, "limits", path).map(|l| self.limits(l, &join(path, "limits"))).unwrap_or_default();
        let env = self.sub(t, "env", path).map(|e| self.env(e, &join(path, "env"))).unwrap_or_default();
        let audit = self.sub(t, "audit", path).map(|a| self.audit(a, &join(path, "audit"))).unwrap_or_default();
        let allow_jit = self.boolean(t, "allow_jit", path);
        Tool {
            description,
            argv: Vec::new(),
            args: Vec::new(),
            fs,
            net,
            limits,
            env,
            audit,
            allow_jit,
            ok_exit: vec![0],
        }
    }

    /// `ok_exit`: a non-empty list of distinct exit codes, 0 to 123. 124 and up are agentd's
    /// own (timeout, refusal, not executable, not found) or a signal's, never an answer.
    fn ok_exit(&mut self, v: &Value<'_>, path: &str) -> Vec<i32> {
        let DeValue::Array(items) = v.get_ref() else {
            self.expect(v, path, "an array of exit codes, e.g. [0, 1]");
            return vec![0];
        };
        if items.is_empty() {
            self.err(v.span(), path, format!("`{path}` is empty: no exit would succeed; leave it out for [0]"));
            return vec![0];
        }
        let mut out: Vec<i32> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let key = format!("{path}[{i}]");
            let Some(n) = self.int(item, &key) else { continue };
            match i32::try_from(n) {
                Ok(code) if (0..=123).contains(&code) => {
                    if out.contains(&code) {
                        self.err(item.span(), &key, format!("exit code {code} is listed twice in `{path}`"));
                    } else {
                        out.push(code);
                    }
                }
                _ => self.err(
                    item.span(),
                    &key,
                    format!(
                        "`{key}` = {n} cannot mean success: exit codes are 0..=255, and 124 and up mean a timeout, \
                         a refusal, a program not found or a signal"
                    ),
                ),
            }
        }
        out.sort_unstable();
        if out.is_empty() {
            out.push(0);
        }
        out
    }

    /// `[tools.NAME.args]`: one entry per placeholder of `argv`, in template order. Without the
    /// table, every placeholder is a string of up to [`DEFAULT_ARG_MAX_LENGTH`] bytes.
    fn args(&mut self, t: &DeTable<'_>, argv: &[ArgTemplate], fs: &FsGrants, path: &str) -> Vec<ArgSpec> {
        let mut names: Vec<Name> = Vec::new();
        for p in argv.iter().flat_map(ArgTemplate::placeholders) {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
        let key = join(path, "args");
        let table = self.sub(t, "args", path);
        if let Some(table) = table {
            for (k, _) in table.iter() {
                let name = k.get_ref().as_ref();
                if !names.iter().any(|n| n.as_str() == name) {
                    let known: Vec<&str> = names.iter().map(Name::as_str).collect();
                    let msg = format!(
                        "`{key}.{name}` is not a placeholder of `{}`, which takes: {}",
                        join(path, "argv"),
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    );
                    self.err(k.span(), &join(&key, name), msg);
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            let spec = match table.and_then(|tb| Self::get(tb, name.as_str()).map(|v| (tb, v))) {
                None if table.is_some() => {
                    let msg = format!("missing `{key}.{name}`: every placeholder of the argv template needs an entry");
                    self.err(
                        t.iter().find(|(k, _)| k.get_ref() == "args").map(|(k, _)| k.span()).unwrap_or(0..0),
                        &key,
                        msg,
                    );
                    None
                }
                None => Some(ArgSpec {
                    name: name.clone(),
                    description: String::new(),
                    kind: ArgKind::String { max_length: DEFAULT_ARG_MAX_LENGTH, one_of: Vec::new() },
                    optional: false,
                    allow_leading_dash: false,
                }),
                Some((_, v)) => {
                    let full = join(&key, name.as_str());
                    self.table(v, &full).and_then(|a| self.arg(a, name.clone(), fs, &full))
                }
            };
            out.extend(spec);
        }
        self.check_elements(t, argv, &out, path);
        out
    }

    /// A list must be a whole argv element, and an optional argument's element (dropped when
    /// the call leaves it out) may not carry another argument with it.
    fn check_elements(&mut self, t: &DeTable<'_>, argv: &[ArgTemplate], specs: &[ArgSpec], path: &str) {
        let span = t.iter().find(|(k, _)| k.get_ref() == "argv").map(|(k, _)| k.span()).unwrap_or(0..0);
        let key = join(path, "argv");
        let mut previous: Option<&ArgTemplate> = None;
        let mut after_dashdash = false;
        for element in argv.iter().skip(1) {
            if element.literal() == Some("--") {
                after_dashdash = true;
            }
            let leading = if after_dashdash { None } else { element.leading_placeholder() };
            if let Some(spec) = leading.and_then(|n| specs.iter().find(|s| s.name == *n)) {
                let n = &spec.name;
                if spec.allow_leading_dash {
                    let msg = format!(
                        "`{key}`: {{{n}}} starts an argv element before any \"--\" and may begin with '-' \
                         (allow_leading_dash), so the program could read it as an option; put it after a \
                         literal \"--\" or write \"--option={{{n}}}\""
                    );
                    self.warn(span.clone(), &key, msg);
                } else if spec.kind.may_be_negative() {
                    let msg = format!(
                        "`{key}`: negative values of {{{n}}} will be refused, since they start an argv element \
                         before any \"--\" and could be read as options; set \
                         `{key_args}.{n}.allow_leading_dash = true` if the program expects them there",
                        key_args = join(path, "args")
                    );
                    self.warn(span.clone(), &key, msg);
                }
            }
        }
        for element in argv {
            let names: Vec<&Name> = element.placeholders().collect();
            let lone = element.lone_placeholder().is_some();
            // `"-m", "{n}"` with `n` left out, or an empty list, would hand `-m` the next value.
            let flag = previous.and_then(ArgTemplate::literal).filter(|l| l.starts_with('-') && *l != "--");
            if let (true, Some(flag)) = (lone, flag) {
                let spec = specs.iter().find(|s| names.contains(&&s.name));
                if let Some(spec) = spec.filter(|s| s.optional || !s.kind.embeddable()) {
                    let msg = format!(
                        "`{key}`: {{{}}} may be left out or empty, which would hand {flag:?} the next argument; \
                         write \"{flag}={{{}}}\" or make it required",
                        spec.name, spec.name
                    );
                    self.err(span.clone(), &key, msg);
                }
            }
            previous = Some(element);
            for spec in specs.iter().filter(|s| names.contains(&&s.name)) {
                if !lone && !spec.kind.embeddable() {
                    let msg = format!("`{key}`: the list argument {{{}}} must be a whole argv element", spec.name);
                    self.err(span.clone(), &key, msg);
                }
                if spec.optional && names.iter().any(|n| **n != spec.name) {
                    let msg = format!(
                        "`{key}`: the optional argument {{{}}} shares an argv element with another argument; \
                         that element is dropped when it is left out",
                        spec.name
                    );
                    self.err(span.clone(), &key, msg);
                }
            }
        }
    }

    fn arg(&mut self, t: &DeTable<'_>, name: Name, fs: &FsGrants, path: &str) -> Option<ArgSpec> {
        let arg_keys = names(keys::ARG);
        self.check_keys(t, path, &arg_keys);
        let description = Self::get(t, "description").and_then(|v| self.string(v, &join(path, "description")));
        let optional = self.boolean(t, "optional", path);
        let allow_leading_dash = self.boolean(t, "allow_leading_dash", path);
        let ty = self.choice(t, "type", path, ARG_TYPES).unwrap_or(0);
        let list = ty == 5;
        // A list's other keys bound its items.
        let item = if list { self.choice(t, "items", path, &ARG_TYPES[..5]).unwrap_or(0) } else { ty };
        let mut allowed: Vec<&str> = vec!["type", "description", "optional", "allow_leading_dash"];
        allowed.extend_from_slice(match item {
            1 | 3 => &["min", "max"],
            2 => &["under"],
            4 => &[],
            _ => &["max_length", "one_of"],
        });
        if list {
            allowed.extend_from_slice(&["items", "max_items"]);
        }
        for (k, _) in t.iter() {
            let kname = k.get_ref().as_ref();
            if arg_keys.contains(&kname) && !allowed.contains(&kname) {
                let tname = if list { format!("list of {}", ARG_TYPES[item]) } else { ARG_TYPES[ty].to_string() };
                self.err(
                    k.span(),
                    &join(path, kname),
                    format!("`{}` does not apply to type \"{tname}\"", join(path, kname)),
                );
            }
        }
        let mut kind = self.arg_kind(t, item, fs, path)?;
        if list {
            let max_items = match Self::get(t, "max_items") {
                Some(v) => u32::try_from(self.int_in(v, &join(path, "max_items"), 0, 1024)?).ok()?,
                None => 64,
            };
            kind = ArgKind::List { items: Box::new(kind), max_items };
        }
        Some(ArgSpec { name, description: description.unwrap_or_default(), kind, optional, allow_leading_dash })
    }

    /// The scalar kind `ty` (an index into [`ARG_TYPES`]) with its bounds from `t`.
    fn arg_kind(&mut self, t: &DeTable<'_>, ty: usize, fs: &FsGrants, path: &str) -> Option<ArgKind> {
        let first_span = || t.iter().next().map(|(k, _)| k.span()).unwrap_or(0..0);
        let kind = match ty {
            1 => {
                let min = Self::get(t, "min").and_then(|v| self.int(v, &join(path, "min"))).unwrap_or(i64::MIN);
                let max = Self::get(t, "max").and_then(|v| self.int(v, &join(path, "max"))).unwrap_or(i64::MAX);
                if min > max {
                    self.err(first_span(), path, format!("`{path}`: min {min} is above max {max}"));
                    return None;
                }
                ArgKind::Integer { min, max }
            }
            3 => {
                let min = self.bound(t, "min", path, -NUMBER_LIMIT)?;
                let max = self.bound(t, "max", path, NUMBER_LIMIT)?;
                if min > max {
                    self.err(first_span(), path, format!("`{path}`: min {} is above max {}", min.get(), max.get()));
                    return None;
                }
                ArgKind::Number { min, max }
            }
            4 => ArgKind::Boolean,
            2 => {
                let lists = [("read", &fs.read), ("write", &fs.write), ("exec", &fs.exec)];
                let chosen: Vec<(String, Range<usize>)> = match Self::get(t, "under") {
                    Some(v) => self.strings(v, &join(path, "under")),
                    None => vec![("read".to_string(), 0..0)],
                };
                let mut under = Vec::new();
                for (which, sp) in chosen {
                    match lists.iter().find(|(n, _)| *n == which) {
                        Some((_, grants)) => under.extend(grants.iter().cloned()),
                        None => self.err(
                            sp,
                            &join(path, "under"),
                            format!(
                                "`{}` entries are \"read\", \"write\" or \"exec\", not {which:?}",
                                join(path, "under")
                            ),
                        ),
                    }
                }
                if under.is_empty() {
                    let msg =
                        format!("`{path}` is a path under grants the tool does not have: it could never be given");
                    self.err(first_span(), path, msg);
                    return None;
                }
                if let Some(bad) =
                    under.iter().map(ToString::to_string).find(|g| !writable(g) || g.contains(['"', '\\']))
                {
                    let msg = format!(
                        "`{path}`: grant {bad:?} is not printable ASCII without quotes or backslashes, \
                         so a model could not write a path under it"
                    );
                    self.err(first_span(), path, msg);
                    return None;
                }
                ArgKind::Path { under }
            }
            _ => {
                let max_length = match Self::get(t, "max_length") {
                    Some(v) => u32::try_from(self.int_in(v, &join(path, "max_length"), 1, 65_536)?).ok()?,
                    None => DEFAULT_ARG_MAX_LENGTH,
                };
                let mut one_of = Vec::new();
                if let Some(v) = Self::get(t, "one_of") {
                    for (s, span) in self.strings(v, &join(path, "one_of")) {
                        // The model writes printable ASCII only; an entry it cannot write
                        // would leave constrained decoding stuck halfway through it.
                        if !writable(&s) || s.len() > max_length as usize {
                            let msg = format!(
                                "`{}` entry {s:?} must be printable ASCII and at most max_length ({max_length}) bytes",
                                join(path, "one_of")
                            );
                            self.err(span, &join(path, "one_of"), msg);
                        }
                        one_of.push(s);
                    }
                }
                ArgKind::String { max_length, one_of }
            }
        };
        Some(kind)
    }

    /// A number bound `key` of `t` (an integer or a float), `default` if absent.
    fn bound(&mut self, t: &DeTable<'_>, key: &str, path: &str, default: f64) -> Option<Finite> {
        let full = join(path, key);
        let Some(v) = Self::get(t, key) else { return Finite::new(default) };
        let n = match v.get_ref() {
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            DeValue::Integer(_) => self.int(v, &full).map(|i| i as f64),
            _ => {
                self.expect(v, &full, "a number");
                return None;
            }
        };
        match n.and_then(Finite::new).filter(|f| f.get().abs() <= NUMBER_LIMIT && fits_decimals(f.get())) {
            Some(f) => Some(f),
            None => {
                let msg = format!(
                    "`{full}` must be a finite number within ±{NUMBER_LIMIT:e}, with at most {NUMBER_DECIMALS} decimals"
                );
                self.err(v.span(), &full, msg);
                None
            }
        }
    }

    /// A string key that must be one of `choices`.
    fn choice(&mut self, t: &DeTable<'_>, key: &str, path: &str, choices: &[&str]) -> Option<usize> {
        let full = join(path, key);
        let v = Self::get(t, key)?;
        let s = self.string(v, &full)?;
        let found = choices.iter().position(|c| *c == s);
        if found.is_none() {
            let quoted: Vec<String> = choices.iter().map(|c| format!("\"{c}\"")).collect();
            self.err(v.span(), &full, format!("`{full}` must be one of {}, not {s:?}", quoted.join(", ")));
        }
        found
    }

    fn audit(&mut self, t: &DeTable<'_>, path: &str) -> AuditPolicy {
        self.check_keys(t, path, &names(keys::AUDIT));
        let mode = match self.choice(t, "mode", path, AUDIT_MODES) {
            Some(1) => AuditMode::Audit,
            _ => AuditMode::Enforce,
        };
        let on_audit_loss = match self.choice(t, "on_audit_loss", path, LOSS_ACTIONS) {
            Some(1) => LossAction::Record,
            _ => LossAction::Kill,
        };
        let deny_open = self.paths(t, "deny_open", path).into_iter().map(|(p, _)| p).collect();
        AuditPolicy { mode, on_audit_loss, deny_open }
    }

    fn argv(&mut self, t: &DeTable<'_>, span: Range<usize>, path: &str) -> Option<Vec<ArgTemplate>> {
        self.argv_at(t, span, path, "argv")
    }

    /// A command template under `name` (`argv` of a tool, `command` of an MCP server).
    fn argv_at(&mut self, t: &DeTable<'_>, span: Range<usize>, path: &str, name: &str) -> Option<Vec<ArgTemplate>> {
        let key = join(path, name);
        let Some(v) = Self::get(t, name) else {
            self.err(
                span,
                &key,
                format!("missing `{key}`, the command to run (e.g. [\"/usr/bin/cat\", \"{{path}}\"])"),
            );
            return None;
        };
        let items = self.strings(v, &key);
        if items.is_empty() {
            self.err(v.span(), &key, format!("`{key}` must name a program"));
            return None;
        }
        let mut out = Vec::new();
        for (i, (s, sp)) in items.iter().enumerate() {
            match ArgTemplate::parse(s) {
                Ok(tpl) if i == 0 && tpl.placeholders().next().is_some() => {
                    self.err(sp.clone(), &key, format!("`{key}[0]` must be a literal program, not a placeholder: the manifest, not the caller, chooses what runs"));
                }
                Ok(_) if i == 0 && s.is_empty() => self.err(sp.clone(), &key, format!("`{key}[0]` is empty")),
                Ok(tpl) => out.push(tpl),
                Err(e) => self.err(sp.clone(), &key, e),
            }
        }
        (out.len() == items.len()).then_some(out)
    }

    fn paths(&mut self, t: &DeTable<'_>, key: &str, path: &str) -> Vec<(AbsPath, Range<usize>)> {
        let full = join(path, key);
        let Some(v) = Self::get(t, key) else { return Vec::new() };
        let mut out: Vec<(AbsPath, Range<usize>)> = Vec::new();
        for (s, sp) in self.strings(v, &full) {
            match AbsPath::parse(&s) {
                Ok(p) if !out.iter().any(|(q, _)| *q == p) => out.push((p, sp)),
                Ok(_) => {}
                Err(e) => self.err(sp, &full, format!("`{full}`: {e}")),
            }
        }
        out
    }

    fn fs(&mut self, t: &DeTable<'_>, path: &str) -> FsGrants {
        self.check_keys(t, path, &names(keys::FS));
        let (read, write, exec) =
            (self.paths(t, "read", path), self.paths(t, "write", path), self.paths(t, "exec", path));
        // A place that is both writable and executable lets a tool write a program and run it.
        for (e, sp) in &exec {
            let overlap = |w: &&(AbsPath, Range<usize>)| {
                e.as_path().starts_with(w.0.as_path()) || w.0.as_path().starts_with(e.as_path())
            };
            if let Some((w, _)) = write.iter().find(overlap) {
                let (key, wkey) = (join(path, "exec"), join(path, "write"));
                let msg = format!(
                    "`{key}` path {e} overlaps `{wkey}` path {w}: a tool could write a program there and run it"
                );
                self.err(sp.clone(), &key, msg);
            }
        }
        // Tools and MCP servers share one namespace of names for these checks (a name is
        // either), and the messages say which table each is in.
        let unit = path.strip_suffix(".fs").unwrap_or(path);
        let tool = unit.strip_prefix("tools.").or_else(|| unit.strip_prefix("mcp.")).unwrap_or(unit).to_string();
        if unit.starts_with("mcp.") {
            self.mcp_units.insert(tool.clone());
        }
        for (list, is_exec) in [(&write, false), (&exec, true)] {
            for (p, sp) in list {
                self.grants.push(ToolGrant { tool: tool.clone(), exec: is_exec, path: p.clone(), span: sp.clone() });
            }
        }
        let mut shared: Vec<(Name, Range<usize>)> = Vec::new();
        if let Some(v) = Self::get(t, "exec_shared_with") {
            let full = join(path, "exec_shared_with");
            for (s, sp) in self.strings(v, &full) {
                match Name::parse(&s) {
                    Ok(n) if n.as_str() == tool => self.err(sp, &full, format!("`{full}` names the tool itself")),
                    Ok(n) if !shared.iter().any(|(m, _)| *m == n) => shared.push((n, sp)),
                    Ok(_) => {}
                    Err(e) => self.err(sp, &full, format!("`{full}`: tool name {e}")),
                }
            }
        }
        let exec_shared_with = shared.iter().map(|(n, _)| n.clone()).collect();
        self.shares.insert(tool, shared);
        let strip = |v: Vec<(AbsPath, Range<usize>)>| v.into_iter().map(|(p, _)| p).collect();
        FsGrants { read: strip(read), write: strip(write), exec: strip(exec), exec_shared_with }
    }

    /// `connect` or `bind` entries; a bind on one of `taken` (the connect ports) is refused.
    fn host_ports(&mut self, t: &DeTable<'_>, key: &str, path: &str, taken: &[u16]) -> Vec<HostPort> {
        let full = join(path, key);
        let Some(v) = Self::get(t, key) else { return Vec::new() };
        let mut out: Vec<HostPort> = Vec::new();
        for (s, sp) in self.strings(v, &full) {
            match HostPort::parse(&s) {
                Ok(hp) if key == "bind" && matches!(hp.addr, HostAddr::Name(_) | HostAddr::Range(_)) => self.err(
                    sp,
                    &full,
                    format!("`{full}`: {s:?}: bind grants are an address (\"127.0.0.1:8080\") or \"*:PORT\", not a name or a range"),
                ),
                Ok(hp) if taken.contains(&hp.port.get()) => self.err(
                    sp,
                    &full,
                    format!("`{full}`: {s:?}: port {} is also a connect port, where agentd listens inside the call's namespace (the tool could not listen there, and a connection would loop back)", hp.port.get()),
                ),
                Ok(hp) if !out.contains(&hp) => out.push(hp),
                Ok(_) => {}
                Err(e) => self.err(sp, &full, format!("`{full}`: {e}")),
            }
        }
        out
    }

    fn net(&mut self, t: &DeTable<'_>, path: &str) -> NetGrants {
        if let Some(k) = t.keys().find(|k| k.get_ref().as_ref() == "udp") {
            let full = join(path, "udp");
            self.err(
                k.span(),
                &full,
                format!("`{full}`: UDP grants are not supported: a call's only UDP is DNS, through agentd's stub, which answers the names in `connect`"),
            );
        }
        self.check_keys(t, path, &[names(keys::NET), vec!["udp"]].concat());
        let unix = self.paths(t, "unix", path).into_iter().map(|(p, _)| p).collect();
        let connect = self.host_ports(t, "connect", path, &[]);
        let ports: Vec<u16> = connect.iter().map(|h| h.port.get()).collect();
        NetGrants { bind: self.host_ports(t, "bind", path, &ports), connect, unix }
    }

    fn limits(&mut self, t: &DeTable<'_>, path: &str) -> Limits {
        self.check_keys(t, path, &names(keys::LIMIT_KEYS));
        Limits::from_values(LIMITS.map(|spec| {
            let full = join(path, spec.key);
            Self::get(t, spec.key).and_then(|v| self.int_in(v, &full, spec.min, spec.max)).unwrap_or(spec.default)
        }))
    }

    fn env(&mut self, t: &DeTable<'_>, path: &str) -> EnvPolicy {
        self.check_keys(t, path, &names(keys::ENV));
        let mut env = EnvPolicy::default();
        if let Some(v) = Self::get(t, "pass") {
            let full = join(path, "pass");
            for (s, sp) in self.strings(v, &full) {
                match EnvName::parse(&s) {
                    Ok(n) if !env.pass.contains(&n) => env.pass.push(n),
                    Ok(_) => {}
                    Err(e) => self.err(sp, &full, format!("`{full}`: {e}")),
                }
            }
        }
        if let Some(set) = self.sub(t, "set", path) {
            for (k, v) in set {
                let full = join(&join(path, "set"), k.get_ref());
                let name = EnvName::parse(k.get_ref()).map_err(|e| self.err(k.span(), &full, format!("`{full}`: {e}")));
                let value = self.string(v, &full);
                if let Some(val) = &value {
                    if val.contains('\0') {
                        self.err(v.span(), &full, format!("`{full}` contains a NUL byte"));
                        continue;
                    }
                }
                if let (Ok(name), Some(value)) = (name, value) {
                    if env.pass.contains(&name) {
                        self.err(k.span(), &full, format!("`{}` is both passed and set; choose one", name.as_str()));
                    }
                    env.set.insert(name, value);
                }
            }
        }
        env
    }

    fn requires(&mut self, t: &DeTable<'_>) -> Requires {
        self.check_keys(t, "requires", &names(keys::REQUIRES));
        let mut r = Requires::default();
        if let Some(v) = Self::get(t, "landlock_abi") {
            if let Some(n) = self.int_in(v, "requires.landlock_abi", 0, u64::from(MAX_LANDLOCK_ABI)) {
                r.landlock_abi = u32::try_from(n).unwrap_or(MAX_LANDLOCK_ABI);
            }
        }
        r.bpf_lsm = self.boolean(t, "bpf_lsm", "requires");
        r
    }
}

/// Whether a model can write `s` in a call: printable ASCII.
fn writable(s: &str) -> bool {
    s.bytes().all(|b| (0x20..=0x7e).contains(&b))
}
