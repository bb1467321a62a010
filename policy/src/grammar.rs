//! The language of tool calls a model may emit, as a byte-level automaton that constrained
//! decoding runs token by token.
//!
//! A call is one JSON object in a fixed layout, arguments in the order the tool's argv
//! template first uses them:
//!
//! ```text
//! {"name": "search", "arguments": {"pattern": "api", "limit": 5}}
//! ```
//!
//! Only granted tools can be named, and each value must fit its `[tools.NAME.args]` spec:
//! strings are printable ASCII within `max_length` (and in `one_of`), integers within
//! `min..=max`, paths absolute and at or below one of their grants. The automaton accepts a
//! byte only if some completion of the text so far is a valid call, so decoding can always go
//! on, and whatever it finishes is a call the policy accepts.

use std::collections::BTreeMap;

use crate::model::{ArgKind, Manifest};

/// The tools a model may call, with their argument shapes.
#[derive(Debug, Clone)]
pub struct CallGrammar {
    tools: Vec<ToolShape>,
}

#[derive(Debug, Clone)]
struct ToolShape {
    name: String,
    args: Vec<(String, ArgKind)>,
}

const OPEN: &str = "{\"name\": \"";
const AFTER_NAME: &str = ", \"arguments\": {";
const CLOSE: &str = "}}";

/// Where in a call the automaton is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallState {
    tool: Option<usize>,
    piece: usize,
    pos: usize,
    buf: Vec<u8>,
    escape: bool,
    values: Vec<String>,
}

enum Piece<'g> {
    Lit(String),
    ToolName,
    Value(&'g ArgKind),
    Done,
}

/// A complete call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The tool.
    pub tool: String,
    /// Argument values by name.
    pub args: BTreeMap<String, String>,
}

impl CallGrammar {
    /// The grammar of calls to `manifest`'s tools.
    pub fn new(manifest: &Manifest) -> Self {
        let tools = manifest
            .tools
            .iter()
            .map(|(name, t)| ToolShape {
                name: name.to_string(),
                args: t.args.iter().map(|a| (a.name.to_string(), a.kind.clone())).collect(),
            })
            .collect();
        Self { tools }
    }

    /// The state before the first byte.
    pub fn start(&self) -> CallState {
        CallState { tool: None, piece: 0, pos: 0, buf: Vec::new(), escape: false, values: Vec::new() }
    }

    fn piece(&self, st: &CallState) -> Piece<'_> {
        match st.piece {
            0 => return Piece::Lit(OPEN.into()),
            1 => return Piece::ToolName,
            2 => return Piece::Lit(AFTER_NAME.into()),
            _ => {}
        }
        let Some(tool) = st.tool.map(|t| &self.tools[t]) else { return Piece::Done };
        let i = st.piece - 3;
        let n = tool.args.len();
        if i < 2 * n {
            let (name, kind) = &tool.args[i / 2];
            if i % 2 == 0 {
                let sep = if i == 0 { "" } else { ", " };
                return Piece::Lit(format!("{sep}\"{name}\": "));
            }
            return Piece::Value(kind);
        }
        if i == 2 * n {
            Piece::Lit(CLOSE.into())
        } else {
            Piece::Done
        }
    }

    /// Feeds one byte; false (and `st` unusable) if no valid call continues that way.
    pub fn feed(&self, st: &mut CallState, b: u8) -> bool {
        match self.piece(st) {
            Piece::Done => false,
            Piece::Lit(lit) => {
                if lit.as_bytes().get(st.pos) != Some(&b) {
                    return false;
                }
                st.pos += 1;
                if st.pos == lit.len() {
                    st.piece += 1;
                    st.pos = 0;
                }
                true
            }
            Piece::ToolName => {
                if b == b'"' {
                    let Some(t) = self.tools.iter().position(|t| t.name.as_bytes() == st.buf.as_slice()) else {
                        return false;
                    };
                    st.tool = Some(t);
                    st.buf.clear();
                    st.piece += 1;
                    return true;
                }
                st.buf.push(b);
                self.tools.iter().any(|t| t.name.as_bytes().starts_with(&st.buf))
            }
            Piece::Value(kind) => self.feed_value(st, kind, b),
        }
    }

    fn feed_value(&self, st: &mut CallState, kind: &ArgKind, b: u8) -> bool {
        if let ArgKind::Integer { min, max } = kind {
            if b.is_ascii_digit() || (b == b'-' && st.buf.is_empty()) {
                st.buf.push(b);
                return int_prefix_ok(&st.buf, *min, *max);
            }
            // Any other byte ends the number and belongs to what follows.
            let text = String::from_utf8_lossy(&st.buf).into_owned();
            if kind.check(&text).is_err() {
                return false;
            }
            self.end_value(st, text);
            return self.feed(st, b);
        }
        if st.pos == 0 {
            // The opening quote.
            st.pos = 1;
            return b == b'"';
        }
        if st.escape {
            st.escape = false;
            if b != b'"' && b != b'\\' {
                return false;
            }
            st.buf.push(b);
        } else if b == b'\\' {
            st.escape = true;
            // Paths never need escapes; a string may still go on with `\"` or `\\`.
            let room = |c: &[u8]| self.string_prefix_ok(kind, &[&st.buf[..], c].concat());
            return matches!(kind, ArgKind::String { .. }) && (room(b"\"") || room(b"\\"));
        } else if b == b'"' {
            let text = String::from_utf8_lossy(&st.buf).into_owned();
            if kind.check(&text).is_err() {
                return false;
            }
            self.end_value(st, text);
            return true;
        } else {
            if !(0x20..=0x7e).contains(&b) {
                return false;
            }
            st.buf.push(b);
        }
        self.string_prefix_ok(kind, &st.buf)
    }

    fn string_prefix_ok(&self, kind: &ArgKind, buf: &[u8]) -> bool {
        match kind {
            ArgKind::String { max_length, one_of } => {
                buf.len() <= *max_length as usize
                    && (one_of.is_empty() || one_of.iter().any(|o| o.as_bytes().starts_with(buf)))
            }
            ArgKind::Path { under } => {
                let Ok(text) = std::str::from_utf8(buf) else { return false };
                under.iter().any(|base| path_prefix_ok(text, &base.to_string()))
            }
            ArgKind::Integer { .. } => false,
        }
    }

    fn end_value(&self, st: &mut CallState, text: String) {
        st.values.push(text);
        st.buf.clear();
        st.pos = 0;
        st.escape = false;
        st.piece += 1;
    }

    /// Whether `st` is a complete call.
    pub fn is_done(&self, st: &CallState) -> bool {
        matches!(self.piece(st), Piece::Done)
    }

    /// The call `st` completed.
    pub fn call(&self, st: &CallState) -> Option<ParsedCall> {
        let tool = &self.tools[st.tool?];
        if !self.is_done(st) {
            return None;
        }
        let args = tool.args.iter().map(|(n, _)| n.clone()).zip(st.values.iter().cloned()).collect();
        Some(ParsedCall { tool: tool.name.clone(), args })
    }

    /// Parses a whole call.
    pub fn parse(&self, text: &str) -> Option<ParsedCall> {
        let mut st = self.start();
        text.bytes().all(|b| self.feed(&mut st, b)).then_some(())?;
        self.call(&st)
    }

    /// Renders a call in the grammar's layout (for prompts and examples).
    pub fn render(call: &ParsedCall, kinds: &[(String, ArgKind)]) -> String {
        let args: Vec<String> = kinds
            .iter()
            .filter_map(|(n, k)| {
                let v = call.args.get(n)?;
                Some(match k {
                    ArgKind::Integer { .. } => format!("\"{n}\": {v}"),
                    _ => format!("\"{n}\": \"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")),
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

/// Whether `text` can still grow into a path at or below `base`.
fn path_prefix_ok(text: &str, base: &str) -> bool {
    if base.starts_with(text) {
        return true;
    }
    let Some(rest) = text.strip_prefix(base) else { return false };
    let Some(rest) = rest.strip_prefix('/') else { return false };
    // Every finished component must be a real name; the last one is still being written.
    let mut parts: Vec<&str> = rest.split('/').collect();
    parts.pop();
    parts.iter().all(|c| !c.is_empty() && *c != "." && *c != "..")
}

/// Whether the digits so far can still become an integer in `min..=max`.
fn int_prefix_ok(buf: &[u8], min: i64, max: i64) -> bool {
    let (neg, digits) = match buf.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, buf),
    };
    if neg && min >= 0 {
        return false;
    }
    if digits.is_empty() {
        return true;
    }
    if digits.len() > 1 && digits[0] == b'0' || digits.len() > 19 {
        return false;
    }
    let Ok(p) = std::str::from_utf8(digits).unwrap_or("x").parse::<i128>() else { return false };
    let (min, max) = (i128::from(min), i128::from(max));
    // Appending k more digits gives magnitudes in [p*10^k, p*10^k + 10^k - 1].
    let mut scale: i128 = 1;
    for _ in 0..=(19 - digits.len()) {
        let (lo, hi) = (p * scale, p * scale + scale - 1);
        let (lo, hi) = if neg { (-hi, -lo) } else { (lo, hi) };
        if hi >= min && lo <= max && !(p == 0 && scale > 1) {
            return true;
        }
        scale *= 10;
    }
    false
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::parse;

    const MANIFEST: &str = r#"
version = 1
[agent]
name = "g"
[tools.search]
description = "search"
argv = ["/usr/bin/grep", "-r", "--", "{pattern}", "{dir}"]
[tools.search.args.pattern]
max_length = 12
[tools.search.args.dir]
type = "path"
under = ["read"]
[tools.search.fs]
read = ["/srv/notes", "/srv/docs"]
[tools.head]
description = "first lines"
argv = ["/usr/bin/head", "-n", "{lines}", "{file}"]
[tools.head.args.lines]
type = "integer"
min = 1
max = 500
[tools.head.args.file]
type = "path"
[tools.head.fs]
read = ["/srv/notes"]
"#;

    fn grammar() -> (CallGrammar, Manifest) {
        let m = parse("g.toml", MANIFEST).expect("test manifest parses");
        (CallGrammar::new(&m), m)
    }

    #[test]
    fn accepts_valid_calls_and_extracts_arguments() {
        let (g, _) = grammar();
        let call = g
            .parse(r#"{"name": "search", "arguments": {"pattern": "a\"b", "dir": "/srv/docs/x"}}"#)
            .expect("valid call");
        assert_eq!(call.tool, "search");
        assert_eq!(call.args["pattern"], "a\"b");
        assert_eq!(call.args["dir"], "/srv/docs/x");
        let call = g.parse(r#"{"name": "head", "arguments": {"lines": 20, "file": "/srv/notes"}}"#).expect("valid");
        assert_eq!(call.args["lines"], "20");
    }

    #[test]
    fn refuses_what_the_policy_refuses() {
        let (g, _) = grammar();
        for bad in [
            r#"{"name": "rm", "arguments": {}}"#,
            r#"{"name": "search", "arguments": {"pattern": "this is far too long", "dir": "/srv/docs"}}"#,
            r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/etc"}}"#,
            r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/docs/../../etc"}}"#,
            r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/docsx"}}"#,
            r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/docs//x"}}"#,
            r#"{"name": "head", "arguments": {"lines": 0, "file": "/srv/notes"}}"#,
            r#"{"name": "head", "arguments": {"lines": 501, "file": "/srv/notes"}}"#,
            r#"{"name": "head", "arguments": {"lines": 007, "file": "/srv/notes"}}"#,
            r#"{"name": "head", "arguments": {"file": "/srv/notes", "lines": 2}}"#,
            "{\"name\": \"search\", \"arguments\": {\"pattern\": \"a\nb\", \"dir\": \"/srv/docs\"}}",
        ] {
            assert_eq!(g.parse(bad), None, "accepted {bad}");
        }
    }

    #[test]
    fn a_doomed_number_is_refused_at_its_first_digit() {
        let (g, _) = grammar();
        let mut st = g.start();
        let prefix = r#"{"name": "head", "arguments": {"lines": "#;
        assert!(prefix.bytes().all(|b| g.feed(&mut st, b)));
        let mut nine = st.clone();
        assert!(g.feed(&mut nine, b'9'), "9 can become 9..99");
        assert!(g.feed(&mut nine, b'9'), "99");
        assert!(!g.feed(&mut nine, b'9'), "999 > 500");
        let mut neg = st;
        assert!(!g.feed(&mut neg, b'-'), "min is 1");
    }

    proptest! {
        /// Random "logits": at every step, the highest-scoring byte the grammar accepts is
        /// taken, as constrained greedy decoding does. Whatever comes out is a valid call, to
        /// a granted tool, with every argument inside its bounds.
        #[test]
        fn constrained_decoding_only_produces_valid_calls(seed in any::<u64>()) {
            let (g, m) = grammar();
            let mut rng = seed | 1;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut st = g.start();
            let mut out = Vec::new();
            for _ in 0..400 {
                if g.is_done(&st) { break; }
                let mut scores: Vec<(u64, u8)> = (0x20u8..=0x7e).map(|b| (next(), b)).collect();
                scores.sort_unstable_by(|a, b| b.cmp(a));
                let mut took = false;
                for (_, b) in scores {
                    let mut trial = st.clone();
                    if g.feed(&mut trial, b) {
                        st = trial;
                        out.push(b);
                        took = true;
                        break;
                    }
                }
                prop_assert!(took, "dead end after {:?}", String::from_utf8_lossy(&out));
            }
            let text = String::from_utf8(out).expect("ascii");
            let call = g.call(&st);
            prop_assume!(call.is_some(), "ran out of steps: {}", text);
            let call = call.expect("checked");
            let tool = m.tools.iter().find(|(n, _)| n.as_str() == call.tool).map(|(_, t)| t);
            prop_assert!(tool.is_some(), "ungranted tool in {}", text);
            for spec in &tool.expect("checked").args {
                let v = &call.args[spec.name.as_str()];
                prop_assert!(spec.kind.check(v).is_ok(), "{} = {:?} out of bounds in {}", spec.name, v, text);
            }
            prop_assert_eq!(g.parse(&text), Some(call));
        }
    }
}
