//! The call grammar against valid, invalid and random calls.

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
[tools.plot]
description = "plot"
argv = ["/usr/bin/plot", "--scale={scale}", "--grid={grid}", "{points}", "{title}"]
[tools.plot.args.scale]
type = "number"
min = -2.5
max = 10
optional = true
[tools.plot.args.grid]
type = "boolean"
optional = true
[tools.plot.args.points]
type = "list"
items = "integer"
min = 0
max = 99
max_items = 3
[tools.plot.args.title]
max_length = 8
optional = true
"#;

fn grammar() -> (CallGrammar, Manifest) {
    let m = parse("g.toml", MANIFEST).expect("test manifest parses");
    (CallGrammar::new(&m), m)
}

#[test]
fn accepts_valid_calls_and_extracts_arguments() {
    let (g, _) = grammar();
    let call =
        g.parse(r#"{"name": "search", "arguments": {"pattern": "a\"b", "dir": "/srv/docs/x"}}"#).expect("valid call");
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
fn optional_arguments_numbers_booleans_and_lists() {
    let (g, m) = grammar();
    let ok = [
        (r#"{"name": "plot", "arguments": {"points": []}}"#, vec![("points", "[]")]),
        (
            r#"{"name": "plot", "arguments": {"scale": -2.5, "grid": true, "points": [1, 99, 0], "title": "t"}}"#,
            vec![("scale", "-2.5"), ("grid", "true"), ("points", "[1, 99, 0]"), ("title", "t")],
        ),
        (
            r#"{"name": "plot", "arguments": {"grid": false, "points": [7]}}"#,
            vec![("grid", "false"), ("points", "[7]")],
        ),
        (
            r#"{"name": "plot", "arguments": {"scale": 10.0, "points": [0]}}"#,
            vec![("scale", "10.0"), ("points", "[0]")],
        ),
    ];
    let plot = &m.tools.iter().find(|(n, _)| n.as_str() == "plot").expect("plot").1;
    for (text, want) in ok {
        let call = g.parse(text).unwrap_or_else(|| panic!("refused {text}"));
        let want: BTreeMap<String, String> = want.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert_eq!(call.args, want, "{text}");
        for spec in &plot.args {
            if let Some(v) = call.args.get(spec.name.as_str()) {
                assert_eq!(spec.kind.check(v), Ok(()), "{} = {v}", spec.name);
            }
        }
        assert_eq!(CallGrammar::render(&call, g.args_of("plot").expect("plot")), text);
    }
    for bad in [
        r#"{"name": "plot", "arguments": {}}"#,
        r#"{"name": "plot", "arguments": {"scale": 10.5, "points": []}}"#,
        r#"{"name": "plot", "arguments": {"scale": -3, "points": []}}"#,
        r#"{"name": "plot", "arguments": {"scale": 1., "points": []}}"#,
        r#"{"name": "plot", "arguments": {"scale": 1e3, "points": []}}"#,
        r#"{"name": "plot", "arguments": {"grid": yes, "points": []}}"#,
        r#"{"name": "plot", "arguments": {"points": [1, 2, 3, 4]}}"#,
        r#"{"name": "plot", "arguments": {"points": [100]}}"#,
        r#"{"name": "plot", "arguments": {"points": [1,2]}}"#,
        r#"{"name": "plot", "arguments": {"points": ["1"]}}"#,
        r#"{"name": "plot", "arguments": {"points": [], "grid": true}}"#,
        r#"{"name": "plot", "arguments": {"grid": true, "scale": 1, "points": []}}"#,
    ] {
        assert_eq!(g.parse(bad), None, "accepted {bad}");
    }
}

#[test]
fn a_doomed_fraction_is_refused_at_its_first_digit() {
    let (g, _) = grammar();
    let mut st = g.start();
    let prefix = r#"{"name": "plot", "arguments": {"scale": "#;
    assert!(prefix.bytes().all(|b| g.feed(&mut st, b)));
    let mut ten = st.clone();
    assert!(b"10.".iter().all(|b| g.feed(&mut ten, *b)));
    assert!(!g.feed(&mut ten.clone(), b'1'), "10.1 > 10");
    assert!(g.feed(&mut ten, b'0'), "10.0");
    let mut neg = st;
    assert!(b"-2.".iter().all(|b| g.feed(&mut neg, *b)));
    assert!(!g.feed(&mut neg.clone(), b'6'), "-2.6 < -2.5");
    assert!(g.feed(&mut neg, b'5'));
}

/// A one-tool grammar whose argument `x` has the given spec lines, and that spec's kind.
fn one_arg_kind(spec: &str) -> (CallGrammar, ArgKind) {
    let src = format!(
        "version = 1\n[agent]\nname = \"g\"\n[tools.t]\nargv = [\"/bin/t\", \"{{x}}\"]\n[tools.t.args.x]\n{spec}\n"
    );
    let m = parse("g.toml", &src).unwrap_or_else(|d| panic!("{d}"));
    let kind = m.tools.values().next().map(|t| t.args[0].kind.clone()).expect("one argument");
    (CallGrammar::new(&m), kind)
}

fn one_arg(spec: &str) -> CallGrammar {
    one_arg_kind(spec).0
}

/// Feeds `value` after the key; how many bytes were accepted, and whether `}}` then closes.
fn try_value(g: &CallGrammar, value: &str) -> (usize, bool) {
    let mut st = g.start();
    assert!(r#"{"name": "t", "arguments": {"x": "#.bytes().all(|b| g.feed(&mut st, b)));
    let taken = value.bytes().take_while(|b| g.feed(&mut st, *b)).count();
    (taken, taken == value.len() && "}}".bytes().all(|b| g.feed(&mut st, b)))
}

#[test]
fn number_bounds_hold_without_float_rounding_dead_ends() {
    let g = one_arg("type = \"number\"\nmin = 0.3\nmax = 1");
    assert_eq!(try_value(&g, "0.2").0, 2, "0.2x can never reach 0.3");
    assert!(try_value(&g, "0.3").1 && try_value(&g, "0.30").1 && try_value(&g, "1.0").1);
    let g = one_arg("type = \"number\"\nmin = 1.66\nmax = 1.66");
    assert!(try_value(&g, "1.66").1, "1 + 0.66 rounds above 1.66 in f64, but the text is exact");
    let g = one_arg("type = \"number\"\nmin = 0\nmax = 5");
    assert_eq!(try_value(&g, "-0").0, 0, "no negative number, not even -0");
    let g = one_arg("type = \"number\"\nmin = -1\nmax = 1");
    assert!(!try_value(&g, "-0").1 && !try_value(&g, "-0.0").1, "negative zero");
    assert!(try_value(&g, "-0.5").1 && try_value(&g, "-0.000000000000001").1);
    assert_eq!(try_value(&g, "0.0000000000000001").0, 17, "at most 15 decimals");
    let g = one_arg("type = \"integer\"\nmin = -5\nmax = 5");
    assert_eq!(try_value(&g, "-0").0, 1, "-0 is not canonical");
    for bad in ["+5", "007", "-0", " 5", "5 "] {
        assert!(ArgKind::Integer { min: -9, max: 9 }.check(bad).is_err(), "{bad:?} is not canonical");
    }
    let g = one_arg("type = \"list\"\nitems = \"number\"\nmin = 0\nmax = 1");
    assert!(try_value(&g, "[0.000001, 1]").1, "small numbers keep their written form");
}

proptest! {
    /// Random bounds, random bytes: the value can always be finished, and what is finished
    /// passes the same check `agentd exec` applies.
    #[test]
    fn numbers_never_dead_end(lo in -500i32..500, span in 0i32..300, seed in any::<u64>()) {
        let (min, max) = (f64::from(lo) / 100.0, f64::from(lo + span) / 100.0);
        let (g, kind) = one_arg_kind(&format!("type = \"number\"\nmin = {min:?}\nmax = {max:?}"));
        let mut st = g.start();
        let prefix = r#"{"name": "t", "arguments": {"x": "#;
        prop_assert!(prefix.bytes().all(|b| g.feed(&mut st, b)), "the key");
        let mut rng = seed | 1;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut out = String::new();
        for _ in 0..40 {
            if g.is_done(&st) { break; }
            let mut bytes: Vec<u8> = b"-.0123456789}".to_vec();
            bytes.sort_by_key(|_| next());
            let b = bytes.into_iter().find(|b| { let mut t = st.clone(); g.feed(&mut t, *b) });
            prop_assert!(b.is_some(), "dead end after {:?} in {}..={}", out, min, max);
            let b = b.unwrap_or(b'}');
            g.feed(&mut st, b);
            out.push(b as char);
        }
        if let Some(call) = g.call(&st) {
            let v = &call.args["x"];
            prop_assert!(kind.check(v).is_ok(), "{} in {}..={}", v, min, max);
        }
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
            let Some(v) = call.args.get(spec.name.as_str()) else {
                prop_assert!(spec.optional, "required {} left out in {}", spec.name, text);
                continue;
            };
            prop_assert!(spec.kind.check(v).is_ok(), "{} = {:?} out of bounds in {}", spec.name, v, text);
        }
        prop_assert_eq!(g.parse(&text), Some(call));
    }
}

/// The GBNF a server gets, without the number argument (whose decimals it leaves to the
/// automaton): the same language as the automaton.
fn gbnf_pair() -> (CallGrammar, String) {
    let (_, m) = grammar();
    let mut tools = Offered::of_manifest(&m);
    for t in &mut tools {
        t.args.retain(|a| !matches!(a.kind, ArgKind::Number { .. }));
    }
    let g = CallGrammar::of(&tools);
    let rules = g.gbnf("call").expect("tools to call");
    (g, rules)
}

#[test]
fn the_gbnf_accepts_and_refuses_what_the_automaton_does() {
    let (g, rules) = gbnf_pair();
    let cases = [
        r#"{"name": "search", "arguments": {"pattern": "a\"b\\c", "dir": "/srv/docs/x.md"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "123456789012", "dir": "/srv/notes"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "1234567890123", "dir": "/srv/notes"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/notes/../x"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/notes/.x/..y/..."}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/notes//x"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/srv/notesx"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a", "dir": "/etc/shadow"}}"#,
        r#"{"name": "search", "arguments": {"pattern": "a\n", "dir": "/srv/notes"}}"#,
        r#"{"name": "head", "arguments": {"lines": 500, "file": "/srv/notes/a"}}"#,
        r#"{"name": "head", "arguments": {"lines": 501, "file": "/srv/notes/a"}}"#,
        r#"{"name": "head", "arguments": {"lines": 0, "file": "/srv/notes/a"}}"#,
        r#"{"name": "head", "arguments": {"lines": 07, "file": "/srv/notes/a"}}"#,
        r#"{"name": "head", "arguments": {"file": "/srv/notes/a", "lines": 5}}"#,
        r#"{"name": "plot", "arguments": {"points": []}}"#,
        r#"{"name": "plot", "arguments": {"grid": true, "points": [1, 99, 0], "title": "t"}}"#,
        r#"{"name": "plot", "arguments": {"points": [1, 2, 3, 4]}}"#,
        r#"{"name": "plot", "arguments": {"points": [1,2]}}"#,
        r#"{"name": "plot", "arguments": {"grid": true}}"#,
        r#"{"name": "rm", "arguments": {}}"#,
    ];
    for text in cases {
        let want = g.parse(text).is_some();
        assert_eq!(gbnf::matches(&rules, "call", text), Ok(want), "{text}");
    }
}

#[test]
fn integer_ranges_in_gbnf_are_exact_and_canonical() {
    for (lo, hi) in [(0, 0), (1, 500), (-7, 7), (-120, -3), (5, 1234), (10, 99), (0, 1_000_000), (-1, 0), (99, 101)] {
        let rule = format!("n ::= {}\n", gbnf::int_range(lo, hi).expect("a range"));
        for n in -1300i128..1300 {
            let text = n.to_string();
            assert_eq!(gbnf::matches(&rule, "n", &text), Ok((lo..=hi).contains(&n)), "{n} in {lo}..={hi}");
        }
        for bad in ["007", "-0", "+5", "", "-", "1.0"] {
            assert_eq!(gbnf::matches(&rule, "n", bad), Ok(false), "{bad:?} in {lo}..={hi}");
        }
    }
    assert_eq!(gbnf::int_range(3, 2), None);
    let wide = format!("n ::= {}\n", gbnf::int_range(i64::MIN.into(), i64::MAX.into()).expect("all of i64"));
    for n in [i64::MIN, -1, 0, 9, i64::MAX] {
        assert_eq!(gbnf::matches(&wide, "n", &n.to_string()), Ok(true), "{n}");
    }
    assert_eq!(gbnf::matches(&wide, "n", "9223372036854775808"), Ok(false));
}

proptest! {
    /// Calls the automaton writes under random scores are matched by the GBNF; edits of
    /// them are matched by the GBNF exactly when the automaton accepts them.
    #[test]
    fn the_gbnf_is_the_automaton_on_random_calls(seed in any::<u64>()) {
        let (g, rules) = gbnf_pair();
        let mut rng = seed | 1;
        let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
        let mut st = g.start();
        let mut out = Vec::new();
        for _ in 0..200 {
            if g.is_done(&st) { break; }
            let mut scores: Vec<(u64, u8)> = (0x20u8..=0x7e).map(|b| (next(), b)).collect();
            scores.sort_unstable_by(|a, b| b.cmp(a));
            let b = scores.into_iter().map(|s| s.1).find(|b| { let mut t = st.clone(); g.feed(&mut t, *b) });
            prop_assert!(b.is_some());
            let b = b.unwrap_or(b' ');
            g.feed(&mut st, b);
            out.push(b);
        }
        prop_assume!(g.is_done(&st));
        let text = String::from_utf8(out).expect("ascii");
        prop_assert_eq!(gbnf::matches(&rules, "call", &text), Ok(true), "{}", text);
        for _ in 0..8 {
            let mut bytes = text.clone().into_bytes();
            let at = (next() as usize) % bytes.len();
            let b = b"\"\\/.,0123456789a-[] "[(next() as usize) % 20];
            match next() % 3 {
                0 => { bytes.remove(at); }
                1 => bytes.insert(at, b),
                _ => bytes[at] = b,
            }
            let edited = String::from_utf8(bytes).expect("ascii");
            let want = g.parse(&edited).is_some();
            prop_assert_eq!(gbnf::matches(&rules, "call", &edited), Ok(want), "{}", edited);
        }
    }
}

/// llama.cpp takes at most 2,000 repetitions in one `{m,n}`: longer bounds are written as
/// blocks, and still hold exactly.
#[test]
fn long_bounds_are_written_in_blocks_and_hold_exactly() {
    let g = one_arg("max_length = 2500");
    let rules = g.gbnf("call").expect("a tool");
    assert!(!rules.contains("{0,2500}"), "{rules}");
    for n in [0, 1, 999, 1000, 1001, 1999, 2000, 2499, 2500, 2501, 3000] {
        let text = format!(r#"{{"name": "t", "arguments": {{"x": "{}"}}}}"#, "a".repeat(n));
        assert_eq!(gbnf::matches(&rules, "call", &text), Ok(n <= 2500), "{n} bytes");
    }
}
