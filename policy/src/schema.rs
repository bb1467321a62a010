//! A tool's arguments as JSON: the JSON Schema of `[tools.X.args]` (an MCP tool's
//! `inputSchema`, and a model server's tool parameters), and a JSON object of arguments
//! turned into the text values `agentd exec --arg` takes, which [`crate::compile`] then
//! checks. The schema describes; the compiler decides: a value the schema allows but the
//! manifest does not is refused there, with the argument named.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::grammar::{Offered, OfferedArg};
use crate::model::{ArgKind, Finite, Tool, NUMBER_DECIMALS, NUMBER_LIMIT};

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
    object_schema(tool.args.iter().map(|spec| ArgView {
        name: spec.name.as_str(),
        description: &spec.description,
        kind: &spec.kind,
        optional: spec.optional,
        dash_note: !spec.allow_leading_dash && text_may_lead_with_dash(&spec.kind),
    }))
}

/// The JSON Schema of an offered tool's arguments (a model server's tool parameters), from
/// the same generator as [`input_schema`]. An MCP server's tool gets its own words back.
pub fn offered_schema(tool: &Offered) -> Map<String, Value> {
    object_schema(tool.args.iter().map(|a| ArgView {
        name: &a.name,
        description: &a.description,
        kind: &a.kind,
        optional: a.optional,
        dash_note: false,
    }))
}

/// One argument, as the schema generator reads it.
struct ArgView<'a> {
    name: &'a str,
    description: &'a str,
    kind: &'a ArgKind,
    optional: bool,
    /// Whether to say that a leading `-` is refused.
    dash_note: bool,
}

fn object_schema<'a>(args: impl Iterator<Item = ArgView<'a>>) -> Map<String, Value> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for spec in args {
        let mut schema = kind_schema(spec.kind);
        let mut notes = Vec::new();
        if let ArgKind::Path { under } = spec.kind {
            let list: Vec<String> = under.iter().map(ToString::to_string).collect();
            notes.push(format!("An absolute path (no ., .. or //) at or below {}.", list.join(", ")));
        }
        if spec.dash_note {
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

/// A regular expression (ECMA-262, as JSON Schema's `pattern`) of the paths at or below one
/// of `under`: absolute, no `.`, `..` or empty component.
fn path_pattern(under: &[crate::AbsPath]) -> String {
    let escape = |b: &str| {
        b.chars().fold(String::new(), |mut out, c| {
            if "\\^$.|?*+()[]{}".contains(c) {
                out.push('\\');
            }
            out.push(c);
            out
        })
    };
    // `/` itself is never a grant (AbsPath refuses it).
    let bases: Vec<String> = under.iter().map(|b| escape(&b.to_string())).collect();
    format!(r"^({})(/([^./][^/]*|\.[^./][^/]*|\.\.[^/]+))*$", bases.join("|"))
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
        ArgKind::Path { under } => json!({"type": "string", "pattern": path_pattern(under), "maxLength": 4096}),
        ArgKind::String { one_of, .. } if !one_of.is_empty() => json!({"type": "string", "enum": one_of}),
        ArgKind::String { max_length, .. } => json!({"type": "string", "maxLength": max_length}),
        ArgKind::Integer { min, max } => json!({"type": "integer", "minimum": min, "maximum": max}),
        ArgKind::Number { min, max } => json!({"type": "number", "minimum": min.get(), "maximum": max.get()}),
        ArgKind::Boolean => json!({"type": "boolean"}),
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

/// Longest string a schema without `maxLength` gets in the call grammar.
pub const DEFAULT_MAX_LENGTH: u32 = 1024;

/// Most items an array without `maxItems` gets in the call grammar.
pub const DEFAULT_MAX_ITEMS: u32 = 64;

/// Most properties of an MCP tool's schema the grammar takes: the automaton weighs every
/// key that may come next at every byte, for every token.
pub const MAX_PROPERTIES: usize = 32;

/// Most values of one `enum`, and most bytes of one value.
pub const MAX_ENUM: usize = 64;
/// See [`MAX_ENUM`].
pub const MAX_ENUM_BYTES: usize = 128;

/// Whether `v` may be an `enum` value of a server's schema: 1 to [`MAX_ENUM_BYTES`] bytes of
/// printable ASCII without `<`, `>`, `[`, `]`, `{`, `}`, `|`, `"`, `\` or a backquote, so that
/// the model can write it, and it can spell no chat template's control token and no markup.
fn enum_value_ok(v: &str) -> bool {
    (1..=MAX_ENUM_BYTES).contains(&v.len())
        && v.bytes().all(|b| (0x20..=0x7e).contains(&b) && !b"<>[]{}|\"\\`".contains(&b))
}

/// Why an MCP tool's `inputSchema` cannot be held by the call grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {reason}")]
pub struct SchemaError {
    /// Where in the schema (`inputSchema` or `properties.NAME...`).
    pub at: String,
    /// What cannot be expressed.
    pub reason: String,
}

/// Keywords that only describe, and constrain nothing the grammar would have to keep.
const ANNOTATIONS: &[&str] = &["description", "title", "default", "examples", "$comment", "deprecated", "format"];

/// The arguments of an MCP tool whose `inputSchema` is `schema`, as kinds of the call
/// grammar (the inverse of [`input_schema`]), so that a model's calls of it are constrained
/// like calls of the manifest's own tools. Only what the grammar can keep is accepted: an
/// object of properties that are strings (`maxLength`, `enum`), integers and numbers
/// (`minimum`, `maximum`), booleans, or arrays of those (`maxItems`). Anything else that
/// constrains a value (`pattern`, `minLength` over 1, nested objects, `anyOf`, `$ref`, ...)
/// is refused, naming where: the grammar would let through values the schema forbids, or
/// the reverse.
pub fn args_of_input_schema(schema: &Map<String, Value>) -> Result<Vec<OfferedArg>, SchemaError> {
    let root = "inputSchema";
    let err = |at: &str, reason: String| SchemaError { at: at.to_string(), reason };
    for (k, v) in schema {
        match k.as_str() {
            "type" if v == "object" => {}
            "type" => return Err(err(root, format!("the arguments must be an object, not {v}"))),
            "properties" | "required" | "$schema" => {}
            "additionalProperties" if v == &Value::Bool(false) || v == &Value::Bool(true) => {}
            k if ANNOTATIONS.contains(&k) => {}
            k => return Err(err(root, format!("`{k}` cannot be expressed by agentd's call grammar"))),
        }
    }
    let required: Vec<&str> = match schema.get("required") {
        None => Vec::new(),
        Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
        Some(other) => return Err(err(root, format!("`required` must be a list of names, not {other}"))),
    };
    let properties = match schema.get("properties") {
        None => return Ok(Vec::new()),
        Some(Value::Object(p)) => p,
        Some(other) => return Err(err(root, format!("`properties` must be an object, not {other}"))),
    };
    if properties.len() > MAX_PROPERTIES {
        return Err(err(
            root,
            format!("{} properties; the call grammar takes at most {MAX_PROPERTIES}", properties.len()),
        ));
    }
    if let Some(missing) = required.iter().find(|r| !properties.contains_key(**r)) {
        return Err(err(root, format!("`required` names {missing:?}, which is not a property")));
    }
    let mut out = Vec::new();
    for (name, prop) in properties {
        let at = format!("properties.{name}");
        if name.is_empty() || name.len() > 64 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
        {
            return Err(err(&at, "a property name must be 1-64 letters, digits, '_', '-' or '.'".into()));
        }
        let Value::Object(prop) = prop else { return Err(err(&at, "is not a schema object".into())) };
        let kind = kind_of(prop, &at, false)?;
        let description = prop.get("description").and_then(Value::as_str).unwrap_or_default().to_string();
        out.push(OfferedArg { name: name.clone(), description, kind, optional: !required.contains(&name.as_str()) });
    }
    Ok(out)
}

/// The tool `tool` of the `[mcp.NAME]` server `server`, as a model is offered it (named
/// `NAME.TOOL`), or why its `inputSchema` cannot be offered (see [`args_of_input_schema`]).
pub fn offered_of_mcp(
    server: &str,
    tool: &str,
    description: &str,
    schema: &Map<String, Value>,
) -> Result<Offered, SchemaError> {
    Ok(Offered {
        name: format!("{server}.{tool}"),
        description: description.to_string(),
        args: args_of_input_schema(schema)?,
        server: Some(server.to_string()),
    })
}

/// A model's call of an offered tool (argument texts, as the call grammar gives them) as
/// the JSON object of arguments its `tools/call` sends, each value checked against its kind
/// again: strings as strings, integers and numbers as numbers, booleans, lists as arrays.
pub fn json_of_args(args: &[OfferedArg], values: &BTreeMap<String, String>) -> Result<Map<String, Value>, ArgsError> {
    let mut out = Map::new();
    for (name, text) in values {
        let bad = |reason: String| ArgsError::Value { name: name.clone(), reason };
        let arg = args.iter().find(|a| a.name == *name).ok_or_else(|| bad("is not an argument of the tool".into()))?;
        arg.kind.check(text).map_err(bad)?;
        out.insert(name.clone(), json_value(&arg.kind, text).map_err(bad)?);
    }
    if let Some(missing) = args.iter().find(|a| !a.optional && !values.contains_key(&a.name)) {
        return Err(ArgsError::Value { name: missing.name.clone(), reason: "is required".into() });
    }
    Ok(out)
}

/// A checked value's text as JSON.
fn json_value(kind: &ArgKind, text: &str) -> Result<Value, String> {
    match kind {
        ArgKind::String { .. } | ArgKind::Path { .. } => Ok(Value::from(text)),
        ArgKind::Integer { .. } => text.parse::<i64>().map(Value::from).map_err(|e| e.to_string()),
        ArgKind::Number { .. } => {
            let f = text.parse::<f64>().map_err(|e| e.to_string())?;
            serde_json::Number::from_f64(f).map(Value::Number).ok_or_else(|| "is not a finite number".into())
        }
        ArgKind::Boolean => text.parse::<bool>().map(Value::from).map_err(|e| e.to_string()),
        ArgKind::List { items, .. } => {
            let list: Vec<Value> = serde_json::from_str(text).map_err(|e| format!("is not a list: {e}"))?;
            list.iter()
                .map(|item| match item {
                    Value::String(s) => json_value(items, s),
                    other => json_value(items, &other.to_string()),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
    }
}

/// Whether a number bound is one the grammar can hold exactly, as a manifest's must be.
fn bound_ok(v: f64) -> bool {
    v.abs() <= NUMBER_LIMIT && crate::model::fits_decimals(v)
}

/// The kind of one property (`item`: an array's items, which may not be arrays).
fn kind_of(prop: &Map<String, Value>, at: &str, item: bool) -> Result<ArgKind, SchemaError> {
    let err = |reason: String| SchemaError { at: at.to_string(), reason };
    let int = |k: &str| -> Result<Option<f64>, SchemaError> {
        match prop.get(k) {
            None => Ok(None),
            Some(v) => {
                v.as_f64().filter(|f| f.is_finite()).map(Some).ok_or_else(|| err(format!("`{k}` is not a number")))
            }
        }
    };
    let ty = prop.get("type").and_then(Value::as_str);
    let allowed: &[&str] = match (prop.get("enum"), ty) {
        (Some(_), _) => &["type", "enum"],
        (None, Some("string")) => &["type", "maxLength", "minLength"],
        (None, Some("integer" | "number")) => &["type", "minimum", "maximum"],
        (None, Some("boolean")) => &["type"],
        (None, Some("array")) if !item => &["type", "items", "maxItems", "minItems"],
        (None, Some("array")) => return Err(err("an array of arrays cannot be expressed".into())),
        (None, Some(other)) => {
            return Err(err(format!(
                "type {other:?} cannot be expressed (strings, integers, numbers, booleans and arrays of those can)"
            )))
        }
        (None, None) => return Err(err("a property needs a `type` (or an `enum`)".into())),
    };
    if let Some(k) = prop.keys().find(|k| !allowed.contains(&k.as_str()) && !ANNOTATIONS.contains(&k.as_str())) {
        return Err(err(format!("`{k}` cannot be expressed by agentd's call grammar")));
    }
    if let Some(e) = prop.get("enum") {
        let values: Option<Vec<String>> =
            e.as_array().and_then(|v| v.iter().map(|x| x.as_str().map(str::to_string)).collect());
        let values =
            values.filter(|v| !v.is_empty()).ok_or_else(|| err("only an `enum` of strings can be expressed".into()))?;
        if values.len() > MAX_ENUM {
            return Err(err(format!("an `enum` of {} values; at most {MAX_ENUM} can be offered", values.len())));
        }
        if let Some(bad) = values.iter().find(|v| !enum_value_ok(v)) {
            return Err(err(format!(
                "`enum` value {bad:?}: values must be 1-{MAX_ENUM_BYTES} bytes of printable ASCII without <>[]{{}}|\"\\`"
            )));
        }
        if ty.is_some_and(|t| t != "string") {
            return Err(err("an `enum` of strings must have type \"string\"".into()));
        }
        let max_length = values.iter().map(|v| u32::try_from(v.len()).unwrap_or(u32::MAX)).max().unwrap_or(0);
        return Ok(ArgKind::String { max_length, one_of: values });
    }
    match ty {
        Some("string") => {
            if int("minLength")?.is_some_and(|n| n > 1.0) {
                return Err(err("`minLength` over 1 cannot be expressed".into()));
            }
            let max_length = match int("maxLength")? {
                None => DEFAULT_MAX_LENGTH,
                Some(n) if (1.0..=65_536.0).contains(&n) => n as u32,
                Some(n) => return Err(err(format!("`maxLength` {n} is out of range (1-65536)"))),
            };
            Ok(ArgKind::String { max_length, one_of: Vec::new() })
        }
        Some("integer" | "number") if ["minimum", "maximum"].iter().any(|k| int(k).ok().flatten().is_some_and(|v| !bound_ok(v))) => {
            Err(err(format!(
                "a `minimum` or `maximum` beyond ±{NUMBER_LIMIT:e} or with more than {NUMBER_DECIMALS} decimals cannot be expressed"
            )))
        }
        Some("integer") => {
            let (lo, hi) = (int("minimum")?.unwrap_or(-NUMBER_LIMIT), int("maximum")?.unwrap_or(NUMBER_LIMIT));
            let (min, max) = (
                lo.clamp(-NUMBER_LIMIT, NUMBER_LIMIT).ceil() as i64,
                hi.clamp(-NUMBER_LIMIT, NUMBER_LIMIT).floor() as i64,
            );
            if min > max {
                return Err(err(format!("no integer is within {lo}..={hi}")));
            }
            Ok(ArgKind::Integer { min, max })
        }
        Some("number") => {
            let (lo, hi) = (int("minimum")?.unwrap_or(-NUMBER_LIMIT), int("maximum")?.unwrap_or(NUMBER_LIMIT));
            match (Finite::new(lo.max(-NUMBER_LIMIT)), Finite::new(hi.min(NUMBER_LIMIT))) {
                (Some(min), Some(max)) if min <= max => Ok(ArgKind::Number { min, max }),
                _ => Err(err(format!("no number is within {lo}..={hi}"))),
            }
        }
        Some("boolean") => Ok(ArgKind::Boolean),
        _ => {
            if int("minItems")?.is_some_and(|n| n > 0.0) {
                return Err(err("`minItems` over 0 cannot be expressed".into()));
            }
            let max_items = match int("maxItems")? {
                None => DEFAULT_MAX_ITEMS,
                Some(n) if (1.0..=1024.0).contains(&n) => n as u32,
                Some(n) => return Err(err(format!("`maxItems` {n} is out of range (1-1024)"))),
            };
            let Some(Value::Object(items)) = prop.get("items") else {
                return Err(err("an array needs `items`, a schema of one scalar kind".into()));
            };
            let items = kind_of(items, &format!("{at}.items"), true)?;
            Ok(ArgKind::List { items: Box::new(items), max_items })
        }
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

    /// A path's pattern names its grants (escaped) and refuses `.`, `..` and empty
    /// components; an offered tool's schema comes from the same generator.
    #[test]
    fn a_path_pattern_is_its_grants_and_clean_components() {
        let under = |list: &[&str]| list.iter().map(|p| crate::AbsPath::parse(p).expect("a path")).collect::<Vec<_>>();
        assert_eq!(
            path_pattern(&under(&["/srv/notes", "/a.b"])),
            r"^(/srv/notes|/a\.b)(/([^./][^/]*|\.[^./][^/]*|\.\.[^/]+))*$"
        );
        let t = tool(ARGS);
        let offered = &crate::grammar::Offered::of_manifest(&crate::parse("m.toml", &format!(
            "version = 1\n[agent]\nname = \"a\"\n[tools.t]\ndescription = \"T\"\nargv = {argv}\n[tools.t.fs]\nread = [\"/usr\"]\n{ARGS}",
            argv = r#"["/bin/echo", "{q}", "{n}", "{x}", "{f}", "{p}", "{l}", "{c}"]"#
        )).expect("parses"))[0];
        let (a, b) = (Value::Object(input_schema(&t)), Value::Object(offered_schema(offered)));
        assert_eq!(a["properties"]["n"], b["properties"]["n"]);
        assert_eq!(a["properties"]["p"]["pattern"], b["properties"]["p"]["pattern"]);
        assert_eq!(a["required"], b["required"]);
    }

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

    #[test]
    fn an_mcp_schema_becomes_grammar_kinds_or_a_located_refusal() {
        let schema = |v: Value| match v {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        // What server-filesystem's read_text_file and mcp-server-time's tools look like.
        let args = args_of_input_schema(&schema(json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "a file"},
                "head": {"type": "number", "description": "first lines"},
                "zone": {"type": "string", "enum": ["UTC", "Europe/Paris"]},
                "n": {"type": "integer", "minimum": 1, "maximum": 10},
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                "all": {"type": "boolean", "default": false}
            },
            "required": ["path"],
            "additionalProperties": false,
            "$schema": "http://json-schema.org/draft-07/schema#"
        })))
        .expect("expressible");
        let find = |n: &str| args.iter().find(|a| a.name == n).expect(n).clone();
        assert_eq!(
            find("path"),
            OfferedArg {
                name: "path".into(),
                description: "a file".into(),
                kind: ArgKind::String { max_length: DEFAULT_MAX_LENGTH, one_of: vec![] },
                optional: false
            }
        );
        assert!(find("head").optional, "not required, so optional");
        assert!(matches!(find("head").kind, ArgKind::Number { .. }));
        assert_eq!(
            find("zone").kind,
            ArgKind::String { max_length: 12, one_of: vec!["UTC".into(), "Europe/Paris".into()] }
        );
        assert_eq!(find("n").kind, ArgKind::Integer { min: 1, max: 10 });
        assert_eq!(
            find("tags").kind,
            ArgKind::List { items: Box::new(ArgKind::String { max_length: 8, one_of: vec![] }), max_items: 3 }
        );
        assert_eq!(find("all").kind, ArgKind::Boolean);

        // A model's call, through the grammar, becomes the arguments the server gets.
        let offered = offered_of_mcp(
            "fs",
            "read",
            "Reads",
            &schema(json!({
                "type": "object",
                "properties": {
                    "path": {"type": "string"},
                    "head": {"type": "number"},
                    "n": {"type": "integer", "minimum": 1, "maximum": 10},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
                    "all": {"type": "boolean"}
                },
                "required": ["path"]
            })),
        )
        .expect("expressible");
        assert_eq!(offered.name, "fs.read");
        let g = crate::grammar::CallGrammar::of(std::slice::from_ref(&offered));
        let call = g
            .parse(r#"{"name": "fs.read", "arguments": {"all": true, "head": 2.5, "n": 3, "path": "/a \"b\"", "tags": ["x", "y"]}}"#)
            .expect("a call the grammar accepts");
        assert_eq!(
            Value::Object(json_of_args(&offered.args, &call.args).expect("converted")),
            json!({"all": true, "head": 2.5, "n": 3, "path": "/a \"b\"", "tags": ["x", "y"]})
        );
        assert!(g.parse(r#"{"name": "fs.read", "arguments": {"n": 3}}"#).is_none(), "path is required");
        assert!(g.parse(r#"{"name": "fs.write", "arguments": {"path": "/a"}}"#).is_none(), "not offered");
        let bad = |k: &str, v: &str| {
            let mut a = BTreeMap::from([("path".to_string(), "/a".to_string())]);
            a.insert(k.into(), v.into());
            json_of_args(&offered.args, &a)
        };
        assert!(matches!(bad("n", "11"), Err(ArgsError::Value { .. })), "out of bounds");
        assert!(matches!(bad("other", "1"), Err(ArgsError::Value { .. })), "not an argument");
        assert!(matches!(bad("tags", r#"["123456789"]"#), Err(ArgsError::Value { .. })), "item too long");
        assert!(json_of_args(&offered.args, &BTreeMap::new()).is_err(), "path missing");
        // A round trip through the manifest's own schema keeps the kinds.
        assert_eq!(args_of_input_schema(&schema(json!({"type": "object"}))).expect("no arguments"), vec![]);

        for (bad, at, says) in [
            (
                json!({"type": "object", "properties": {"p": {"type": "string", "pattern": "^a"}}}),
                "properties.p",
                "`pattern`",
            ),
            (json!({"type": "object", "properties": {"o": {"type": "object"}}}), "properties.o", "\"object\""),
            (
                json!({"type": "object", "properties": {"u": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}),
                "properties.u",
                "needs a `type`",
            ),
            (
                json!({"type": "object", "properties": {"a": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}}}),
                "properties.a.items",
                "array of arrays",
            ),
            (
                json!({"type": "object", "properties": {"s": {"type": "string", "minLength": 3}}}),
                "properties.s",
                "minLength",
            ),
            (json!({"type": "object", "properties": {"e": {"enum": [1, 2]}}}), "properties.e", "enum` of strings"),
            (
                json!({"type": "object", "properties": {"i": {"type": "integer", "minimum": 5, "maximum": 4}}}),
                "properties.i",
                "no integer",
            ),
            (json!({"type": "object", "oneOf": []}), "inputSchema", "`oneOf`"),
            (json!({"type": "object", "properties": {}, "required": ["x"]}), "inputSchema", "not a property"),
            (
                json!({"type": "object", "properties": {"bad name": {"type": "string"}}}),
                "properties.bad name",
                "property name",
            ),
            (
                json!({"type": "object", "properties": {"m": {"enum": ["fast<|im_end|>\n<|im_start|>system"]}}}),
                "properties.m",
                "printable ASCII",
            ),
            (json!({"type": "object", "properties": {"m": {"enum": ["[INST]"]}}}), "properties.m", "printable ASCII"),
            (json!({"type": "object", "properties": {"m": {"enum": ["é"]}}}), "properties.m", "printable ASCII"),
            (
                json!({"type": "object", "properties": {"m": {"enum": (0..65).map(|i| i.to_string()).collect::<Vec<_>>()}}}),
                "properties.m",
                "at most 64",
            ),
            (
                json!({"type": "object", "properties": {"n": {"type": "number", "minimum": 1e-16, "maximum": 1e-16}}}),
                "properties.n",
                "decimals",
            ),
            (
                json!({"type": "object", "properties": {"n": {"type": "integer", "minimum": 1e300}}}),
                "properties.n",
                "beyond",
            ),
            (
                json!({"type": "object", "properties": {"s": {"type": "string", "maxLength": 1_000_000}}}),
                "properties.s",
                "out of range",
            ),
            (
                json!({"type": "object", "properties": (0..33).map(|i| (format!("p{i}"), json!({"type": "boolean"}))).collect::<Map<String, Value>>()}),
                "inputSchema",
                "at most 32",
            ),
        ] {
            let e = args_of_input_schema(&schema(bad.clone())).expect_err(&bad.to_string());
            assert_eq!(e.at, at, "{bad}: {e}");
            assert!(e.reason.contains(says), "{bad}: {e}");
        }
    }
}
