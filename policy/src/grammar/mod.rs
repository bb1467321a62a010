//! The language of tool calls a model may emit, as a byte-level automaton that constrained
//! decoding runs token by token.
//!
//! A call is one JSON object in a fixed layout, arguments in the order the tool's argv
//! template first uses them (optional ones may be left out):
//!
//! ```text
//! {"name": "search", "arguments": {"pattern": "api", "limit": 5, "files": ["a", "b"]}}
//! ```
//!
//! Only offered tools can be named (the manifest's own, and the tools of its `[mcp.NAME]`
//! servers as `NAME.TOOL`, see [`Offered`]), and each value must fit its spec:
//! strings are printable ASCII within `max_length` (and in `one_of`), integers and numbers
//! within `min..=max`, paths absolute and at or below one of their grants, lists within
//! `max_items`. The automaton accepts a byte only if some completion of the text so far is a
//! valid call, so decoding can always go on, and whatever it finishes is a call the policy
//! accepts.

use std::collections::BTreeMap;

use crate::model::{ArgKind, Manifest};

pub mod gbnf;
#[cfg(test)]
mod tests;
mod value;

use value::{feed_list, feed_scalar, list_text, quote};

/// A tool as a model is offered it: one of the manifest's own, or a tool of one of its
/// `[mcp.NAME]` servers, whose argument kinds come from its `inputSchema`
/// ([`crate::schema::offered_of_mcp`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offered {
    /// Its name in calls: the manifest's `NAME`, or `SERVER.TOOL`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// Its arguments, in the order calls write them.
    pub args: Vec<OfferedArg>,
    /// The `[mcp.NAME]` server it belongs to. Its description and its arguments' are then
    /// the server's words, not the manifest author's: prompts show them as data.
    pub server: Option<String>,
}

/// One argument of an [`Offered`] tool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedArg {
    /// Its name.
    pub name: String,
    /// What it is, for the model.
    pub description: String,
    /// What it accepts.
    pub kind: ArgKind,
    /// Whether a call may leave it out.
    pub optional: bool,
}

impl Offered {
    /// `manifest`'s own tools, in name order.
    pub fn of_manifest(manifest: &Manifest) -> Vec<Offered> {
        manifest
            .tools
            .iter()
            .map(|(name, t)| Offered {
                name: name.to_string(),
                description: t.description.clone(),
                args: t
                    .args
                    .iter()
                    .map(|a| OfferedArg {
                        name: a.name.to_string(),
                        description: a.description.clone(),
                        kind: a.kind.clone(),
                        optional: a.optional,
                    })
                    .collect(),
                server: None,
            })
            .collect()
    }
}

/// The tools a model may call, with their argument shapes.
#[derive(Debug, Clone)]
pub struct CallGrammar {
    tools: Vec<ToolShape>,
}

#[derive(Debug, Clone)]
struct ToolShape {
    name: String,
    args: Vec<(String, ArgKind)>,
    optional: Vec<bool>,
}

const OPEN: &str = "{\"name\": \"";
const AFTER_NAME: &str = ", \"arguments\": {";
const CLOSE: &str = "}}";

/// Where in a call the automaton is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallState {
    tool: Option<usize>,
    stage: Stage,
    values: Vec<(usize, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Bytes of [`OPEN`] so far.
    Open(usize),
    /// The tool's name so far.
    Name(Vec<u8>),
    /// Bytes of [`AFTER_NAME`] so far.
    AfterName(usize),
    /// Choosing the next argument's key (among `args[next..]`) or the end, bytes so far.
    Key {
        next: usize,
        buf: Vec<u8>,
    },
    /// Writing argument `arg`'s value.
    Value {
        arg: usize,
        v: ValueState,
    },
    Done,
}

/// A scalar value being written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Scalar {
    /// Content so far (unescaped, for strings).
    buf: Vec<u8>,
    /// Whether the opening quote (strings, paths) was seen.
    opened: bool,
    escape: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ValueState {
    Scalar(Scalar),
    List { items: Vec<String>, phase: ListPhase },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ListPhase {
    /// Before `[`.
    Open,
    /// After `[`: `]` or the first item.
    First,
    Item(Scalar),
    /// After an item: `]`, or `,` (false) then ` ` (true).
    After(bool),
    /// After `, `: the next item.
    Next,
}

/// What a byte did to a value.
enum Step {
    /// The value goes on.
    More,
    /// The byte closed the value.
    Ended,
    /// The value had already ended; the byte belongs to what follows (numbers).
    EndedBefore,
}

/// A complete call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The tool.
    pub tool: String,
    /// Argument values by name (see [`ArgKind`] for how each kind is written).
    pub args: BTreeMap<String, String>,
}

impl CallGrammar {
    /// The grammar of calls to `manifest`'s own tools.
    pub fn new(manifest: &Manifest) -> Self {
        Self::of(&Offered::of_manifest(manifest))
    }

    /// The grammar of calls to `tools`.
    pub fn of(tools: &[Offered]) -> Self {
        let tools = tools
            .iter()
            .map(|t| ToolShape {
                name: t.name.clone(),
                args: t.args.iter().map(|a| (a.name.clone(), a.kind.clone())).collect(),
                optional: t.args.iter().map(|a| a.optional).collect(),
            })
            .collect();
        Self { tools }
    }

    /// The state before the first byte.
    pub fn start(&self) -> CallState {
        CallState { tool: None, stage: Stage::Open(0), values: Vec::new() }
    }

    /// The keys that may come next (with their argument index), and whether the call may end.
    fn keys(&self, st: &CallState, next: usize) -> (Vec<(usize, String)>, bool) {
        let Some(tool) = st.tool.map(|t| &self.tools[t]) else { return (Vec::new(), false) };
        let sep = if st.values.is_empty() { "" } else { ", " };
        let mut keys = Vec::new();
        for j in next..tool.args.len() {
            keys.push((j, format!("{sep}\"{}\": ", tool.args[j].0)));
            if !tool.optional[j] {
                return (keys, false);
            }
        }
        (keys, true)
    }

    /// Feeds one byte; false (and `st` unusable) if no valid call continues that way.
    pub fn feed(&self, st: &mut CallState, b: u8) -> bool {
        let opening = matches!(st.stage, Stage::Open(_));
        match &mut st.stage {
            Stage::Done => false,
            Stage::Open(pos) | Stage::AfterName(pos) => {
                let lit = if opening { OPEN } else { AFTER_NAME };
                if lit.as_bytes().get(*pos) != Some(&b) {
                    return false;
                }
                *pos += 1;
                if *pos == lit.len() {
                    st.stage = if opening { Stage::Name(Vec::new()) } else { Stage::Key { next: 0, buf: Vec::new() } };
                }
                true
            }
            Stage::Name(buf) => {
                if b == b'"' {
                    let Some(t) = self.tools.iter().position(|t| t.name.as_bytes() == buf.as_slice()) else {
                        return false;
                    };
                    st.tool = Some(t);
                    st.stage = Stage::AfterName(0);
                    return true;
                }
                buf.push(b);
                self.tools.iter().any(|t| t.name.as_bytes().starts_with(buf))
            }
            Stage::Key { next, buf } => {
                let (next, mut buf) = (*next, std::mem::take(buf));
                buf.push(b);
                let (keys, may_close) = self.keys(st, next);
                if may_close && buf == CLOSE.as_bytes() {
                    st.stage = Stage::Done;
                    return true;
                }
                if let Some((j, _)) = keys.iter().find(|(_, k)| k.as_bytes() == buf.as_slice()) {
                    let kind = &self.tools[st.tool.unwrap_or(0)].args[*j].1;
                    let v = match kind {
                        ArgKind::List { .. } => ValueState::List { items: Vec::new(), phase: ListPhase::Open },
                        _ => ValueState::Scalar(Scalar::default()),
                    };
                    st.stage = Stage::Value { arg: *j, v };
                    return true;
                }
                let ok = keys.iter().any(|(_, k)| k.as_bytes().starts_with(&buf))
                    || (may_close && CLOSE.as_bytes().starts_with(&buf));
                st.stage = Stage::Key { next, buf };
                ok
            }
            Stage::Value { arg, v } => {
                let arg = *arg;
                let Some(kind) = st.tool.and_then(|t| self.tools[t].args.get(arg)).map(|a| &a.1) else { return false };
                let step = match v {
                    ValueState::Scalar(sc) => feed_scalar(kind, sc, b),
                    ValueState::List { items, phase } => feed_list(kind, items, phase, b),
                };
                let end = |st: &mut CallState| {
                    let text = match std::mem::replace(&mut st.stage, Stage::Key { next: arg + 1, buf: Vec::new() }) {
                        Stage::Value { v: ValueState::Scalar(sc), .. } => String::from_utf8_lossy(&sc.buf).into_owned(),
                        Stage::Value { v: ValueState::List { items, .. }, .. } => list_text(kind, &items),
                        _ => String::new(),
                    };
                    st.values.push((arg, text));
                };
                match step {
                    None => false,
                    Some(Step::More) => true,
                    Some(Step::Ended) => {
                        end(st);
                        true
                    }
                    Some(Step::EndedBefore) => {
                        end(st);
                        self.feed(st, b)
                    }
                }
            }
        }
    }

    /// Whether `st` is a complete call.
    pub fn is_done(&self, st: &CallState) -> bool {
        matches!(st.stage, Stage::Done)
    }

    /// The call `st` completed.
    pub fn call(&self, st: &CallState) -> Option<ParsedCall> {
        let tool = &self.tools[st.tool?];
        if !self.is_done(st) {
            return None;
        }
        let args = st.values.iter().map(|(i, v)| (tool.args[*i].0.clone(), v.clone())).collect();
        Some(ParsedCall { tool: tool.name.clone(), args })
    }

    /// Parses a whole call.
    pub fn parse(&self, text: &str) -> Option<ParsedCall> {
        let mut st = self.start();
        text.bytes().all(|b| self.feed(&mut st, b)).then_some(())?;
        self.call(&st)
    }

    /// Renders a call in the grammar's layout (for prompts and examples, and the calls a
    /// server returns as JSON, which the automaton then reads).
    pub fn render(call: &ParsedCall, kinds: &[(String, ArgKind)]) -> String {
        let args: Vec<String> = kinds
            .iter()
            .filter_map(|(n, k)| {
                let v = call.args.get(n)?;
                Some(match k {
                    ArgKind::String { .. } | ArgKind::Path { .. } => format!("\"{n}\": {}", quote(v)),
                    // A list in the grammar's layout (`[1, 2]`), however it was written.
                    ArgKind::List { .. } => match k.items_of(v) {
                        Some(items) => format!("\"{n}\": {}", list_text(k, &items)),
                        None => format!("\"{n}\": {v}"),
                    },
                    _ => format!("\"{n}\": {v}"),
                })
            })
            .collect();
        format!("{OPEN}{}\"{AFTER_NAME}{}{CLOSE}", call.tool, args.join(", "))
    }

    /// The argument shapes of `tool`.
    pub fn args_of(&self, tool: &str) -> Option<&[(String, ArgKind)]> {
        self.tools.iter().find(|t| t.name == tool).map(|t| t.args.as_slice())
    }
}
