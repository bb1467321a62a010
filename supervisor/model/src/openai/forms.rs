//! How a server is asked to hold its model to agentd's protocol, in the strongest form it
//! takes: a grammar of the whole turn (llama.cpp's GBNF `grammar`, or vLLM's structured
//! outputs), else a JSON schema of it (`response_format`), else native tools with strict
//! schemas, else nothing (only the check of each reply). What a server takes is found once,
//! by asking it for something only a constrained model would write.

use std::fmt;
use std::str::FromStr;

use agentd_policy::grammar::Offered;
use agentd_policy::schema::offered_schema;
use serde_json::{json, Map, Value};

use crate::prompt;

/// What `--server-constraints` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Constraints {
    /// The strongest form the server turns out to take.
    #[default]
    Auto,
    /// A grammar of the turn, or an error if the server takes none.
    Grammar,
    /// A JSON schema of the turn.
    JsonSchema,
    /// Native tools with strict schemas.
    Tools,
    /// Nothing: each reply is only checked.
    None,
}

impl Constraints {
    /// Its name, as `--server-constraints` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Constraints::Auto => "auto",
            Constraints::Grammar => "grammar",
            Constraints::JsonSchema => "json_schema",
            Constraints::Tools => "tools",
            Constraints::None => "none",
        }
    }
}

impl FromStr for Constraints {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Constraints::Auto,
            "grammar" => Constraints::Grammar,
            "json_schema" => Constraints::JsonSchema,
            "tools" => Constraints::Tools,
            "none" => Constraints::None,
            other => return Err(format!("{other:?} is not one of auto, grammar, json_schema, tools, none")),
        })
    }
}

/// The form a server was found to take, with its spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// GBNF in this request field.
    Grammar(GrammarField),
    /// A JSON schema in `response_format`, spelled so.
    JsonSchema(SchemaField),
    /// `tools` with `strict` schemas, `tool_choice = "auto"`.
    Tools,
    /// No constraint.
    None,
}

/// Where a grammar goes in a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrammarField {
    /// `"grammar": "..."` (llama.cpp's server, llama-cpp-python).
    Grammar,
    /// `"structured_outputs": {"grammar": "..."}` (vLLM).
    StructuredOutputs,
    /// `"guided_grammar": "..."` (older vLLM, SGLang's spelling of it).
    GuidedGrammar,
}

/// How `response_format` carries a schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchemaField {
    /// OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    OpenAi,
    /// llama-cpp-python's `{"type": "json_object", "schema": ...}`.
    JsonObject,
}

impl Form {
    /// Its name, as `--server-constraints` spells it.
    pub fn name(&self) -> &'static str {
        match self {
            Form::Grammar(_) => "grammar",
            Form::JsonSchema(_) => "json_schema",
            Form::Tools => "tools",
            Form::None => "none",
        }
    }

    /// The forms `want` allows, strongest first.
    pub(super) fn candidates(want: Constraints) -> Vec<Form> {
        let grammar =
            [GrammarField::Grammar, GrammarField::StructuredOutputs, GrammarField::GuidedGrammar].map(Form::Grammar);
        let schema = [SchemaField::OpenAi, SchemaField::JsonObject].map(Form::JsonSchema);
        match want {
            Constraints::Auto => grammar.into_iter().chain(schema).chain([Form::Tools]).collect(),
            Constraints::Grammar => grammar.to_vec(),
            Constraints::JsonSchema => schema.to_vec(),
            Constraints::Tools => vec![Form::Tools],
            Constraints::None => vec![Form::None],
        }
    }

    /// A request that only a server holding the model to this form answers with `probe`
    /// (see [`Form::probe_passed`]).
    pub(super) fn probe(&self, model: &str) -> Value {
        let mut body = json!({
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 24,
            "temperature": 0.0,
        });
        let schema = json!({
            "type": "object",
            "properties": {"agentd": {"type": "string", "enum": [PROBE]}},
            "required": ["agentd"],
            "additionalProperties": false,
        });
        match self {
            // The features the turn grammar uses: rules, classes, escapes, bounded repeats.
            Form::Grammar(f) => {
                self.set_grammar(*f, &mut body, "root ::= \"agentd\" dash \"probe\" [\\x2D] [7]{1,1}\ndash ::= [-]\n")
            }
            Form::JsonSchema(f) => set_schema(*f, &mut body, schema),
            Form::Tools => {
                body["tools"] = json!([{"type": "function", "function": {
                    "name": "agentd_probe", "description": "Call this.", "parameters": schema, "strict": true}}]);
                body["tool_choice"] = json!({"type": "function", "function": {"name": "agentd_probe"}});
            }
            Form::None => {}
        }
        body
    }

    /// Whether a probe's reply shows the form was held to.
    pub(super) fn probe_passed(&self, content: &str, call: Option<(&str, &str)>) -> bool {
        let probed = |text: &str| serde_json::from_str::<Value>(text).is_ok_and(|v| v["agentd"] == PROBE);
        match self {
            Form::Grammar(_) => content.trim() == PROBE,
            Form::JsonSchema(_) => probed(content.trim()),
            Form::Tools => call.is_some_and(|(name, args)| name == "agentd_probe" && probed(args)),
            Form::None => true,
        }
    }

    fn set_grammar(&self, f: GrammarField, body: &mut Value, grammar: &str) {
        match f {
            GrammarField::Grammar => body["grammar"] = json!(grammar),
            GrammarField::StructuredOutputs => body["structured_outputs"] = json!({"grammar": grammar}),
            GrammarField::GuidedGrammar => body["guided_grammar"] = json!(grammar),
        }
    }

    /// Puts the constraint of one turn into `body`: `grammar` (GBNF of the turn), or the
    /// JSON schema of the turn over `tools` (`answer`: whether an answer may come), or the
    /// native tools (`native`: their function names).
    pub(super) fn apply(
        &self,
        body: &mut Value,
        grammar: Option<&str>,
        tools: &[Offered],
        native: &[String],
        answer: bool,
    ) {
        match self {
            Form::Grammar(f) => {
                if let Some(g) = grammar {
                    self.set_grammar(*f, body, g);
                }
            }
            Form::JsonSchema(f) => set_schema(*f, body, turn_schema(tools, answer)),
            Form::Tools => {
                let list: Vec<Value> = tools
                    .iter()
                    .zip(native)
                    .map(|(t, name)| {
                        json!({"type": "function", "function": {
                            "name": name, "description": prompt::tool_description_for_server(t),
                            "parameters": parameters(t), "strict": true}})
                    })
                    .collect();
                body["tools"] = Value::Array(list);
                body["tool_choice"] = json!("auto");
            }
            Form::None => {}
        }
    }

    /// What the system message adds, for forms whose replies are not the text protocol.
    pub(super) fn system_note(&self) -> Option<&'static str> {
        match self {
            Form::JsonSchema(_) => Some(
                "\n\nThis server takes each reply as one JSON object instead: {\"name\": TOOL, \"arguments\": {...}} \
                 to call a tool, or {\"answer\": \"...\"} for the final answer.",
            ),
            Form::Tools => Some(
                "\n\nCall tools through the function-calling interface instead of <tool_call> text; when you know \
                 the final answer, reply with it as plain text.",
            ),
            Form::Grammar(_) | Form::None => None,
        }
    }
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Form::Grammar(GrammarField::Grammar) => write!(f, "grammar (GBNF in \"grammar\")"),
            Form::Grammar(GrammarField::StructuredOutputs) => write!(f, "grammar (in \"structured_outputs.grammar\")"),
            Form::Grammar(GrammarField::GuidedGrammar) => write!(f, "grammar (in \"guided_grammar\")"),
            Form::JsonSchema(SchemaField::OpenAi) => write!(f, "json_schema (\"response_format\" json_schema)"),
            Form::JsonSchema(SchemaField::JsonObject) => {
                write!(f, "json_schema (\"response_format\" json_object with \"schema\")")
            }
            Form::Tools => write!(f, "tools (native, strict schemas)"),
            Form::None => write!(f, "none (replies are checked, not constrained)"),
        }
    }
}

/// What the probes ask a constrained model to write.
const PROBE: &str = "agentd-probe-7";

fn set_schema(f: SchemaField, body: &mut Value, schema: Value) {
    body["response_format"] = match f {
        SchemaField::OpenAi => {
            json!({"type": "json_schema", "json_schema": {"name": "turn", "schema": schema, "strict": true}})
        }
        SchemaField::JsonObject => json!({"type": "json_object", "schema": schema}),
    };
}

/// The JSON schema of one turn: a call of one of `tools` (`{"name", "arguments"}`, the
/// arguments as [`offered_schema`] gives them), or, if `answer`, `{"answer": text}`.
pub fn turn_schema(tools: &[Offered], answer: bool) -> Value {
    let mut alts: Vec<Value> = tools
        .iter()
        .map(|t| {
            json!({
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [t.name]}, "arguments": parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    if answer {
        alts.push(json!({
            "type": "object",
            "properties": {"answer": {"type": "string", "minLength": 1}},
            "required": ["answer"],
            "additionalProperties": false,
        }));
    }
    // Each tool's schema was loosened by `parameters`; the answer's has no bound to loosen.
    let mut m = Map::new();
    m.insert("anyOf".into(), Value::Array(alts));
    Value::Object(m)
}

/// Most `maxLength` or `maxItems` a schema sent to a server keeps. llama.cpp's schema
/// converter writes a bound as that many nested rules, and refuses a grammar of a few
/// thousand (llama-cpp-python's server then exits). A larger bound is left to the check of
/// the reply.
const SERVER_MAX_BOUND: u64 = 256;

fn loosen(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for key in ["maxLength", "maxItems"] {
                if m.get(key).and_then(Value::as_u64).is_some_and(|n| n > SERVER_MAX_BOUND) {
                    m.remove(key);
                }
            }
            m.values_mut().for_each(loosen);
        }
        Value::Array(a) => a.iter_mut().for_each(loosen),
        _ => {}
    }
}

/// The JSON schema of `t`'s arguments as a server gets it: an MCP server's descriptions of
/// its arguments are left out (the system prompt shows them, cut and quoted as data), and
/// bounds llama.cpp cannot take are loosened ([`loosen`]).
fn parameters(t: &Offered) -> Value {
    let mut v = Value::Object(offered_schema(t));
    if t.server.is_some() {
        strip_descriptions(&mut v);
    }
    loosen(&mut v);
    v
}

fn strip_descriptions(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("description");
            m.values_mut().for_each(strip_descriptions);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_descriptions),
        _ => {}
    }
}

/// Function names for `tools` as the OpenAI API takes them (`[a-zA-Z0-9_-]{1,64}`): an MCP
/// tool `server.tool` becomes `server_tool`, and a clash gets a number.
pub(super) fn native_names(tools: &[Offered]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(tools.len());
    for t in tools {
        let base: String = t
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
            .take(60)
            .collect();
        let mut name = if base.is_empty() { "tool".to_string() } else { base.clone() };
        let mut n = 2;
        while out.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        out.push(name);
    }
    out
}
