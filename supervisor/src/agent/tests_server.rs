//! The loop on scripted chat completions servers that take a constraint: a grammar, a JSON
//! schema, or native tools. Each server is found out by its probes, gets its constraint with
//! every turn, and its replies are still read by the automaton.

use agentd_model::engine::{RunConfig, Silent};
use agentd_model::openai::{Constraints, Remote};
use agentd_policy::grammar::gbnf;
use agentd_tests::{chat_server_with, completion, is_probe, Reply};
use serde_json::{json, Value};

use super::run;

/// `echo` (text "hi" or "ho") and `count` (n from 1 to 5).
fn manifest() -> agentd_policy::Manifest {
    agentd_policy::parse(
        "t.toml",
        "version = 1\n[agent]\nname = \"t\"\n[tools.echo]\ndescription = \"say\"\nargv = [\"/bin/echo\", \"{text}\"]\n\
         [tools.echo.args.text]\none_of = [\"hi\", \"ho\"]\n\
         [tools.count]\ndescription = \"count\"\nargv = [\"/bin/seq\", \"{n}\"]\n\
         [tools.count.args.n]\ntype = \"integer\"\nmin = 1\nmax = 5\n",
    )
    .expect("manifest")
}

fn exec_ok(
    calls: &mut Vec<agentd_policy::grammar::ParsedCall>,
) -> impl FnMut(&agentd_policy::grammar::ParsedCall, &str) -> Value + '_ {
    move |call, id| {
        calls.push(call.clone());
        json!({ "call_id": id, "exit_code": 0, "stdout": "hi", "stderr": "", "events": { "total": 1, "denied": 0 } })
    }
}

const CFG: RunConfig = RunConfig { max_steps: 4, max_tokens: 500, seed: None, temperature: 0.7, context_budget: 0 };

/// A server that takes llama.cpp's `grammar` acts as a constrained model would: of the
/// replies its model "wants", it sends the first the grammar allows. An ungranted tool and an
/// argument out of bounds are wanted first, and never come out.
#[test]
fn a_grammar_server_gets_the_turn_grammar_and_cannot_write_what_it_forbids() {
    let m = manifest();
    let wanted = [
        vec![
            "<tool_call>\n{\"name\": \"rm\", \"arguments\": {}}",
            "<tool_call>\n{\"name\": \"count\", \"arguments\": {\"n\": 50}}",
            "<tool_call>\n{\"name\": \"echo\", \"arguments\": {\"text\": \"rm -rf /\"}}",
            "Thought: count\n<tool_call>\n{\"name\": \"count\", \"arguments\": {\"n\": 5}}",
        ],
        vec!["Answer: made up", "Answer: hi"],
    ];
    let mut turn = 0;
    let (url, requests) = chat_server_with(move |req| {
        let Some(g) = req["grammar"].as_str() else { return Some(Reply::Json(completion("Hello."))) };
        if is_probe(req) {
            // What the probe's grammar allows.
            let probe = "agentd-probe-7";
            assert_eq!(gbnf::matches(g, "root", probe), Ok(true), "{g}");
            return Some(Reply::Json(completion(probe)));
        }
        let choice = wanted.get(turn)?.iter().find(|w| gbnf::matches(g, "root", w) == Ok(true))?;
        turn += 1;
        Some(Reply::Json(completion(choice)))
    });
    let mut agent = run::Agent::of_manifest(&m);
    agent.answer = agentd_policy::AnswerMode::Quote;
    let mut engine = Remote::new(&url, "mock");
    engine.offer(&agent.tools);
    let mut calls = Vec::new();
    let t = run::run(&mut engine, &agent, "count", &CFG, &mut exec_ok(&mut calls), &mut Silent, None).expect("run");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!((calls[0].tool.as_str(), calls[0].args["n"].as_str()), ("count", "5"));
    assert_eq!(t.answer.as_deref(), Some("hi"), "a quote of the result, not the made-up answer");
    assert_eq!(t.model.constraints.as_deref(), Some("grammar (GBNF in \"grammar\")"));
    let reqs: Vec<Value> = requests.try_iter().collect();
    assert_eq!(reqs.len(), 2, "no reply was refused: the grammar held");
    assert!(reqs.iter().all(|r| r["grammar"].is_string()));
}

/// A server with native tools: the call comes back as `tool_calls` (streamed in pieces),
/// its result goes back as a `tool` message with its id, and the schemas offered are the
/// manifest's, strict.
#[test]
fn native_tool_calls_go_out_and_come_back_with_their_ids() {
    let m = manifest();
    let mut turn = 0;
    let (url, requests) = chat_server_with(move |req| {
        if req["tools"].is_null() {
            return Some(Reply::Json(completion("Hello.")));
        }
        if is_probe(req) {
            return Some(Reply::Json(json!({"choices": [{"message": {"role": "assistant", "content": null,
                "tool_calls": [{"id": "p", "type": "function", "function": {"name": "agentd_probe", "arguments": "{\"agentd\": \"agentd-probe-7\"}"}}]}}]})));
        }
        turn += 1;
        let piece = |args: &str| json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": args}}]}}]});
        Some(match turn {
            // A call of a tool that is not offered: refused, never run.
            1 => Reply::Json(json!({"choices": [{"message": {"role": "assistant", "content": "",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "rm", "arguments": "{}"}}]}}]})),
            2 => Reply::Events(vec![
                json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "srv-1", "type": "function", "function": {"name": "count", "arguments": ""}}]}}]}),
                piece("{\"n\": "),
                piece("3}"),
            ]),
            3 => Reply::Events(vec![
                json!({"choices": [{"delta": {"content": "three "}}]}),
                json!({"choices": [{"delta": {"content": "lines"}}]}),
            ]),
            _ => return None,
        })
    });
    let agent = run::Agent::of_manifest(&m);
    let mut engine = Remote::new(&url, "mock").constraints(Constraints::Tools);
    engine.offer(&agent.tools);
    let mut calls = Vec::new();
    let t =
        run::run(&mut engine, &agent, "count to 3", &CFG, &mut exec_ok(&mut calls), &mut Silent, None).expect("run");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].args["n"], "3");
    assert_eq!(t.answer.as_deref(), Some("three lines"));
    let reqs: Vec<Value> = requests.try_iter().collect();
    assert_eq!(reqs.len(), 3);
    let tools = reqs[0]["tools"].as_array().expect("tools");
    let count = tools.iter().find(|t| t["function"]["name"] == "count").expect("count offered");
    assert_eq!(count["function"]["strict"], true);
    assert_eq!(
        count["function"]["parameters"]["properties"]["n"],
        json!({"type": "integer", "minimum": 1, "maximum": 5})
    );
    let last = reqs[2]["messages"].as_array().expect("messages");
    let asked = last.iter().rev().find(|m| m["tool_calls"].is_array()).expect("the call, as a native call");
    let id = asked["tool_calls"][0]["id"].as_str().expect("an id");
    assert_eq!(asked["tool_calls"][0]["function"]["arguments"], "{\"n\":3}");
    let result = last.iter().find(|m| m["role"] == "tool" && m["tool_call_id"] == id).expect("the result, by id");
    assert!(result["content"].as_str().is_some_and(|c| c.contains("tool_result")), "{result}");
    assert!(reqs[1]["messages"].to_string().contains("not used"), "the refusal was told");
}

/// A server that takes a JSON schema gets the turn's schema; its JSON replies are read as
/// turns; and one that takes no grammar, asked for one, is an error that says so.
#[test]
fn a_json_schema_server_gets_the_turn_schema() {
    let m = manifest();
    let mut turn = 0;
    let (url, requests) = chat_server_with(move |req| {
        let schema = &req["response_format"]["json_schema"]["schema"];
        if schema.is_null() {
            return Some(Reply::Json(completion("Hello.")));
        }
        if is_probe(req) {
            return Some(Reply::Json(completion("{\"agentd\": \"agentd-probe-7\"}")));
        }
        turn += 1;
        Some(Reply::Json(completion(match turn {
            // A string where the integer goes, holding JSON of its own: refused, not
            // written into the call as an argument the model never set.
            1 => "{\"name\": \"count\", \"arguments\": {\"n\": \"3}} <tool_call>\"}}",
            2 => "{\"name\": \"echo\", \"arguments\": {\"text\": \"ho\"}}",
            3 => "{\"answer\": \"it said\nho\"}",
            _ => return None,
        })))
    });
    let agent = run::Agent::of_manifest(&m);
    let mut engine = Remote::new(&url, "mock");
    engine.offer(&agent.tools);
    let mut calls = Vec::new();
    let t = run::run(&mut engine, &agent, "say ho", &CFG, &mut exec_ok(&mut calls), &mut Silent, None).expect("run");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].args["text"], "ho");
    assert_eq!(t.answer.as_deref(), Some("it said"), "the answer's first line");
    assert_eq!(t.model.constraints.as_deref(), Some("json_schema (\"response_format\" json_schema)"));
    assert_eq!(t.counters.refused_replies, 1);
    let reqs: Vec<Value> = requests.try_iter().collect();
    let alts = reqs[0]["response_format"]["json_schema"]["schema"]["anyOf"].as_array().expect("a schema of the turn");
    assert_eq!(alts.len(), 3, "two tools and the answer");

    let mut strict = Remote::new(&url, "mock").constraints(Constraints::Grammar);
    let e = strict.resolve().expect_err("no grammar here");
    assert!(e.to_string().contains("does not take --server-constraints grammar"), "{e}");
}
