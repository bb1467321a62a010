//! A chat completion's reply, as server-sent events (`"stream": true`, shown as it comes) or
//! as one JSON body (a server that does not stream, and the probes).

use std::io::{BufRead, BufReader, Read};

use serde_json::Value;

/// Most bytes of a reply's text (content and a call's arguments) before it is cut off: a
/// server that streams forever cannot fill memory.
const MAX_TEXT: usize = 1 << 20;

/// What a server replied.
#[derive(Debug, Default)]
pub(super) struct Reply {
    /// The message's text.
    pub content: String,
    /// Its first native tool call, if any.
    pub call: Option<NativeCall>,
    /// Tokens of the prompt, if the server said.
    pub prompt_tokens: Option<u64>,
    /// Tokens generated, if the server said.
    pub completion_tokens: Option<u64>,
    /// Events with text in them (about a token each), for servers that do not count.
    pub chunks: u64,
}

/// A native tool call: `tool_calls[0]`.
#[derive(Debug, Default)]
pub(super) struct NativeCall {
    /// Its id.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON text.
    pub arguments: String,
}

/// Reads a reply: an event stream if the server sent one (calling `on_text` with each piece
/// of content as it arrives), else one JSON object.
pub(super) fn read(body: impl Read, streamed: bool, on_text: &mut dyn FnMut(&str)) -> Result<Reply, String> {
    if !streamed {
        let mut text = String::new();
        body.take(MAX_TEXT as u64 * 2).read_to_string(&mut text).map_err(|e| format!("reading the reply: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("the reply is not JSON: {e}"))?;
        let mut r = Reply::default();
        let m = &v["choices"][0]["message"];
        r.content = m["content"].as_str().unwrap_or_default().to_string();
        if let Some(c) = m["tool_calls"].get(0) {
            r.call = Some(NativeCall {
                id: c["id"].as_str().unwrap_or_default().to_string(),
                name: c["function"]["name"].as_str().unwrap_or_default().to_string(),
                arguments: arguments_text(&c["function"]["arguments"]),
            });
        }
        usage(&v, &mut r);
        on_text(&r.content);
        return Ok(r);
    }
    let mut r = Reply::default();
    let mut reader = BufReader::new(body);
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(MAX_TEXT as u64)
            .read_line(&mut line)
            .map_err(|e| format!("reading the stream: {e}"))?;
        if n == 0 {
            break;
        }
        let Some(data) = line.trim_end_matches(['\r', '\n']).strip_prefix("data:") else { continue };
        let data = data.trim_start();
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("an event is not JSON ({e}): {data:.200}"))?;
        if !v["error"].is_null() {
            return Err(format!("the server reported an error: {}", v["error"]));
        }
        usage(&v, &mut r);
        let delta = &v["choices"][0]["delta"];
        if let Some(piece) = delta["content"].as_str().filter(|p| !p.is_empty()) {
            r.chunks += 1;
            r.content.push_str(piece);
            on_text(piece);
        }
        // Pieces of the first call (index 0); others are not taken.
        if let Some(c) =
            delta["tool_calls"].as_array().and_then(|a| a.iter().find(|c| c["index"].as_u64().unwrap_or(0) == 0))
        {
            r.chunks += 1;
            let call = r.call.get_or_insert_with(NativeCall::default);
            if let Some(id) = c["id"].as_str() {
                call.id = id.to_string();
            }
            if let Some(name) = c["function"]["name"].as_str() {
                call.name.push_str(name);
            }
            call.arguments.push_str(&arguments_text(&c["function"]["arguments"]));
        }
        let size = r.content.len() + r.call.as_ref().map_or(0, |c| c.arguments.len() + c.name.len());
        if size > MAX_TEXT {
            return Err(format!("the reply is over {MAX_TEXT} bytes"));
        }
    }
    Ok(r)
}

/// A call's arguments as a JSON text: servers send a string, some an object.
fn arguments_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn usage(v: &Value, r: &mut Reply) {
    if let Some(p) = v["usage"]["prompt_tokens"].as_u64() {
        r.prompt_tokens = Some(p);
    }
    if let Some(c) = v["usage"]["completion_tokens"].as_u64() {
        r.completion_tokens = Some(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_joined_and_shown_as_they_come() {
        let stream = "data: {\"choices\":[{\"delta\":{\"content\":\"Ans\"}}]}\n\n\
                      : a comment\n\
                      data: {\"choices\":[{\"delta\":{\"content\":\"wer: 4\"}}]}\n\n\
                      data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":3}}\n\n\
                      data: [DONE]\n\n";
        let mut shown = Vec::new();
        let r = read(stream.as_bytes(), true, &mut |t| shown.push(t.to_string())).expect("a reply");
        assert_eq!(r.content, "Answer: 4");
        assert_eq!(shown, ["Ans", "wer: 4"]);
        assert_eq!((r.prompt_tokens, r.completion_tokens, r.chunks), (Some(9), Some(3), 2));
    }

    #[test]
    fn a_streamed_tool_call_is_put_together() {
        let stream = "data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"c1\",\"function\":{\"name\":\"search\",\"arguments\":\"\"}}]}}]}\n\
                      data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"pattern\\\": \"}}]}}]}\n\
                      data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"\\\"x\\\"}\"}}]}}]}\n\
                      data: {\"choices\":[{\"delta\":{\"tool_calls\":[{\"index\":1,\"function\":{\"name\":\"rm\"}}]}}]}\n\
                      data: [DONE]\n";
        let r = read(stream.as_bytes(), true, &mut |_| {}).expect("a reply");
        let c = r.call.expect("a call");
        assert_eq!((c.id.as_str(), c.name.as_str(), c.arguments.as_str()), ("c1", "search", "{\"pattern\": \"x\"}"));
    }

    #[test]
    fn an_error_event_or_garbage_is_an_error() {
        assert!(read("data: {\"error\":{\"message\":\"boom\"}}\n".as_bytes(), true, &mut |_| {}).is_err());
        assert!(read("data: {not json\n".as_bytes(), true, &mut |_| {}).is_err());
        let whole = "{\"choices\":[{\"message\":{\"content\":\"hi\"}}],\"usage\":{\"completion_tokens\":1}}";
        assert_eq!(read(whole.as_bytes(), false, &mut |_| {}).expect("json").content, "hi");
    }
}
