//! A tool's arguments as JSON: the JSON Schema of `[tools.X.args]` (an MCP tool's
//! `inputSchema`, and a model server's tool parameters), and a JSON object of arguments
//! turned into the text values `agentd exec --arg` takes, which [`crate::compile`] then
//! checks. The schema describes; the compiler decides: a value the schema allows but the
//! manifest does not is refused there, with the argument named.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::model::{ArgKind, Tool, NUMBER_DECIMALS};

/// Why a JSON object of arguments could not be turned into argument values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    /// The arguments are not a JSON object.
    #[error("the arguments must be a JSON object, not {0}")]
    NotAnObject(&'static str),
    /// The arguments are not JSON at all.
    #[error("the arguments are not JSON: {0}")]
    NotJson(String),
    /// An argument's value is of a shape no argument kind takes.
    #[error("argument {name:?}: {reason}")]
    Value {
        /// The argument.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The JSON Schema of `tool`'s arguments: an object with one property per argument (with
/// its description and bounds), those not `optional` required, and nothing else allowed.
pub fn input_schema(tool: &Tool) -> Map<String, Value> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for spec in &tool.args {
        let mut schema = kind_schema(&spec.kind);
        let mut notes = Vec::new();
        if let ArgKind::Path { under } = &spec.kind {
            let list: Vec<String> = under.iter().map(ToString::to_string).collect();
            notes.push(format!("An absolute path (no ., .. or //) at or below {}.", list.join(", ")));
        }
        if !spec.allow_leading_dash && text_may_lead_with_dash(&spec.kind) {
            notes.push("A value that begins with '-' is refused where the program could read it as an option.".into());
        }
        let mut description = spec.description.trim().to_string();
        for note in &notes {
            if !description.is_empty() && !description.ends_with(['.', '!', '?', ':']) {
                description.push('.');
            }
            if !description.is_empty() {
                description.push(' ');
            }
            description.push_str(note);
        }
        if !description.is_empty() {
            schema.insert("description".into(), description.into());
        }
        properties.insert(spec.name.to_string(), Value::Object(schema));
        if !spec.optional {
            required.push(Value::from(spec.name.to_string()));
        }
    }
    let mut out = Map::new();
    out.insert("type".into(), "object".into());
    out.insert("properties".into(), Value::Object(properties));
    if !required.is_empty() {
        out.insert("required".into(), Value::Array(required));
    }
    out.insert("additionalProperties".into(), false.into());
    out
}

/// Whether a value of `kind` is free text that could begin with `-`.
fn text_may_lead_with_dash(kind: &ArgKind) -> bool {
    match kind {
        ArgKind::String { one_of, .. } => one_of.is_empty() || one_of.iter().any(|o| o.starts_with('-')),
        ArgKind::List { items, .. } => text_may_lead_with_dash(items),
        _ => false,
    }
}

fn kind_schema(kind: &ArgKind) -> Map<String, Value> {
    let v = match kind {
        ArgKind::String { one_of, .. } if !one_of.is_empty() => json!({"type": "string", "enum": one_of}),
        ArgKind::String { max_length, .. } => json!({"type": "string", "maxLength": max_length}),
        ArgKind::Integer { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        ArgKind::Number { min, max } => json!({"type": "number", "minimum": min.get(), "maximum": max.get()}),
        ArgKind::Boolean => json!({"type": "boolean"}),
        ArgKind::Path { .. } => json!({"type": "string", "pattern": "^/", "maxLength": 4096}),
        ArgKind::List { items, max_items } => {
            json!({"type": "array", "items": Value::Object(kind_schema(items)), "maxItems": max_items})
        }
    };
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// `text` (a JSON object) as argument values: see [`args_from_json`].
pub fn args_from_json_text(text: &str) -> Result<BTreeMap<String, String>, ArgsError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ArgsError::NotJson(e.to_string()))?;
    match v {
        Value::Object(m) => args_from_json(&m),
        other => Err(ArgsError::NotAnObject(shape(&other))),
    }
}

/// A JSON object of arguments as the text values `--arg NAME=VALUE` would give: strings as
/// they are, numbers in plain decimal (no exponent), booleans as `true`/`false`, lists as
/// JSON arrays of those, and `null` as an argument left out. Which names and values the tool
/// accepts is [`crate::compile`]'s to check.
pub fn args_from_json(args: &Map<String, Value>) -> Result<BTreeMap<String, String>, ArgsError> {
    let mut out = BTreeMap::new();
    for (name, value) in args {
        let bad = |reason: String| ArgsError::Value { name: name.clone(), reason };
        let text = match value {
            Value::Null => continue,
            Value::Array(items) => {
                let items: Result<Vec<String>, String> = items
                    .iter()
                    .map(|item| match item {
                        Value::String(s) => Ok(Value::from(s.as_str()).to_string()),
                        Value::Array(_) | Value::Object(_) | Value::Null => {
                            Err(format!("a list may hold strings, numbers and booleans, not {}", shape(item)))
                        }
                        scalar => scalar_text(scalar),
                    })
                    .collect();
                format!("[{}]", items.map_err(bad)?.join(","))
            }
            Value::Object(_) => {
                return Err(bad("is an object; arguments are strings, numbers, booleans or lists".into()))
            }
            Value::String(s) => s.clone(),
            scalar => scalar_text(scalar).map_err(bad)?,
        };
        out.insert(name.clone(), text);
    }
    Ok(out)
}

/// 2^53: below it, every integer is an exact f64.
const EXACT: f64 = 9_007_199_254_740_992.0;

/// A number or boolean as an argument's text.
fn scalar_text(v: &Value) -> Result<String, String> {
    match v {
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Value::Number(n) => match n.as_f64() {
            // Integral values print as integers (JSON Schema counts 7.0 as an integer); an f64
            // is exact only below 2^53, so larger ones that are not integers in the JSON text
            // are refused rather than rounded.
            Some(f) if f.is_finite() && f.abs() >= EXACT => {
                Err(format!("{n} is too large to pass exactly (integers up to 2^63 are written without a point)"))
            }
            Some(f) if f.is_finite() && f == f.trunc() => Ok(format!("{}", f as i64)),
            Some(f) if f.is_finite() => {
                // Rust prints an f64 in plain decimal, never with an exponent: the shortest
                // form that reads back as the same value.
                let text = format!("{f}");
                let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
                if decimals > NUMBER_DECIMALS {
                    Err(format!("{text} has more than {NUMBER_DECIMALS} decimals"))
                } else {
                    Ok(text)
                }
            }
            _ => Err("is not a finite number".into()),
        },
        other => Err(format!("is {}", shape(other))),
    }
}

fn shape(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tool(toml_args: &str) -> Tool {
        let text = format!(
            "version = 1\n[agent]\nname = \"a\"\n[tools.t]\ndescription = \"T\"\nargv = {argv}\n[tools.t.fs]\nread = [\"/usr\"]\n{toml_args}",
            argv = r#"["/bin/echo", "{q}", "{n}", "{x}", "{f}", "{p}", "{l}", "{c}"]"#
        );
        let m = crate::parse("m.toml", &text).expect("manifest parses");
        m.tools.values().next().expect("one tool").clone()
    }

    const ARGS: &str = r#"
[tools.t.args.q]
description = "What to look for"
max_length = 64
[tools.t.args.n]
type = "integer"
min = 1
max = 50
optional = true
[tools.t.args.x]
type = "number"
min = -1.5
max = 2
optional = true
[tools.t.args.f]
type = "boolean"
optional = true
[tools.t.args.p]
type = "path"
optional = true
[tools.t.args.l]
type = "list"
items = "integer"
max_items = 3
optional = true
[tools.t.args.c]
one_of = ["red", "green"]
optional = true
"#;

    #[test]
    fn the_schema_follows_the_manifest() {
        let s = Value::Object(input_schema(&tool(ARGS)));
        assert_eq!(s["type"], "object");
        assert_eq!(s["additionalProperties"], false);
        assert_eq!(s["required"], json!(["q"]));
        let p = &s["properties"];
        assert_eq!(p["q"]["type"], "string");
        assert_eq!(p["q"]["maxLength"], 64);
        assert!(p["q"]["description"].as_str().expect("a description").starts_with("What to look for"));
        assert!(p["q"]["description"].as_str().expect("a description").contains("'-'"));
        assert_eq!(p["n"], json!({"type": "integer", "minimum": 1, "maximum": 50}));
        assert_eq!(p["x"]["minimum"], -1.5);
        assert_eq!(p["x"]["maximum"], 2.0);
        assert_eq!(p["f"], json!({"type": "boolean"}));
        assert_eq!(p["p"]["type"], "string");
        assert!(p["p"]["description"].as_str().expect("a description").contains("at or below /usr"));
        assert_eq!(
            p["l"],
            json!({"type": "array", "items": {"type": "integer", "minimum": i64::MIN, "maximum": i64::MAX}, "maxItems": 3})
        );
        assert_eq!(p["c"], json!({"type": "string", "enum": ["red", "green"]}));
    }

    #[test]
    fn json_arguments_become_the_texts_exec_checks() {
        let m = |v: Value| args_from_json(v.as_object().expect("an object"));
        let got = m(json!({"q": "-x", "n": 7, "x": 0.000001, "f": true, "l": [1, 2], "c": null, "w": 2.0}))
            .expect("converted");
        assert_eq!(got["q"], "-x");
        assert_eq!(got["n"], "7");
        assert_eq!(got["x"], "0.000001");
        assert_eq!(got["f"], "true");
        assert_eq!(got["l"], "[1,2]");
        assert_eq!(got["w"], "2");
        let big = m(json!({"n": 9_007_199_254_740_993.0_f64}));
        assert!(matches!(big, Err(ArgsError::Value { .. })), "{big:?}");
        assert_eq!(m(json!({"n": 9_007_199_254_740_993_i64})).expect("an integer")["n"], "9007199254740993");
        assert_eq!(m(json!({"n": 1e3})).expect("integral")["n"], "1000");
        assert_eq!(m(json!({"n": -0.0})).expect("zero")["n"], "0");
        assert!(!got.contains_key("c"));
        assert!(matches!(m(json!({"q": {"a": 1}})), Err(ArgsError::Value { .. })));
        assert!(matches!(m(json!({"l": [[1]]})), Err(ArgsError::Value { .. })));
        assert!(matches!(args_from_json_text("[1]"), Err(ArgsError::NotAnObject("an array"))));
        assert!(matches!(args_from_json_text("{"), Err(ArgsError::NotJson(_))));
        // The compiler has the last word: the same checks as `--arg`.
        let t = tool(ARGS);
        for (k, v) in m(json!({"n": 51})).expect("converted") {
            let spec = t.args.iter().find(|s| s.name.as_str() == k).expect("the argument");
            assert!(spec.kind.check(&v).is_err());
        }
    }
}
