//! The call grammar as GBNF, the grammar language llama.cpp's server takes (`grammar` in a
//! chat completion request), so a model behind a server is held to the same calls as the
//! in-process one, token by token, on the server's side.
//!
//! The rules accept the calls the byte automaton ([`CallGrammar::feed`]) accepts, in the same
//! layout, with one difference: numbers with decimals are bounded to their integer part
//! (`0.75` may come out where `max = 0.5`). Whatever a server returns is still read by the
//! automaton before it runs, so such a value is refused and asked again, never run. A tool or
//! argument that no call could write (an `enum` with no printable value) is left out.
//!
//! GBNF works on characters, llama.cpp's parser on UTF-8: literals are written with escapes
//! for quotes, backslashes and control characters, and rule names are `[a-z0-9-]`.

use std::fmt::Write as _;

use super::{CallGrammar, AFTER_NAME, CLOSE, OPEN};
use crate::model::{ArgKind, NUMBER_DECIMALS};

/// `s` as a GBNF string literal.
pub fn lit(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Printable ASCII but `"` and `\`: a string's bytes that need no escape.
const PLAIN: &str = r#"[ !#-\[\]-~]"#;
/// A path component's bytes: printable ASCII but `"`, `\` and `/`.
const PATH_BYTE: &str = r#"[ !#-.0-\[\]-~]"#;
/// The same, and not a dot.
const PATH_BYTE_NO_DOT: &str = r#"[ !#--0-\[\]-~]"#;

impl CallGrammar {
    /// GBNF rules whose rule `root` (a name in `[a-z0-9-]`) is a call, as the automaton
    /// reads one. The other rules it needs are named `root-...`. `None` when no tool can be
    /// called.
    pub fn gbnf(&self, root: &str) -> Option<String> {
        let mut rules = String::new();
        let mut tools = Vec::new();
        for (t, tool) in self.tools.iter().enumerate() {
            let name = format!("{root}-t{t}");
            // Argument rules, from the last: `a{j}f` when nothing was written yet, `a{j}n`
            // after a first argument.
            let n = tool.args.len();
            let mut ok = true;
            let mut values = Vec::with_capacity(n);
            for (j, (_, kind)) in tool.args.iter().enumerate() {
                let v = value(kind, &format!("{name}-v{j}"), &mut rules);
                if v.is_none() && !tool.optional[j] {
                    ok = false;
                }
                values.push(v);
            }
            if !ok {
                continue;
            }
            for j in (0..n).rev() {
                for first in [true, false] {
                    let sep = if first { "" } else { ", " };
                    let key = lit(&format!("{sep}\"{}\": ", tool.args[j].0));
                    let rest = |first: bool| {
                        if j + 1 == n {
                            String::new()
                        } else {
                            format!(" {name}-a{}{}", j + 1, if first { 'f' } else { 'n' })
                        }
                    };
                    let with = values[j].as_ref().map(|v| format!("{key} {v}{}", rest(false)));
                    let without = tool.optional[j].then(|| rest(first));
                    let alts: Vec<String> = [with, without.map(|w| if w.is_empty() { "\"\"".into() } else { w })]
                        .into_iter()
                        .flatten()
                        .collect();
                    let _ = writeln!(rules, "{name}-a{j}{} ::= {}", if first { 'f' } else { 'n' }, alts.join(" | "));
                }
            }
            let args = if n == 0 { String::new() } else { format!(" {name}-a0f") };
            let _ = writeln!(rules, "{name} ::= {}{args} {}", lit(&format!("{}\"{AFTER_NAME}", tool.name)), lit(CLOSE));
            tools.push(name);
        }
        if tools.is_empty() {
            return None;
        }
        Some(format!("{root} ::= {} ( {} )\n{rules}", lit(OPEN), tools.join(" | ")))
    }
}

/// The rule (or inline expression) for a value of `kind`, adding what it needs to `rules`
/// under `name`; `None` if no value could be written.
fn value(kind: &ArgKind, name: &str, rules: &mut String) -> Option<String> {
    let expr = match kind {
        ArgKind::String { one_of, max_length } if !one_of.is_empty() => {
            // The automaton writes only printable ASCII, escaping `"` and `\`, within the
            // length.
            let alts: Vec<String> = one_of
                .iter()
                .filter(|o| o.len() <= *max_length as usize && o.bytes().all(|b| (0x20..=0x7e).contains(&b)))
                .map(|o| lit(&super::value::quote(o)))
                .collect();
            if alts.is_empty() {
                return None;
            }
            alts.join(" | ")
        }
        ArgKind::String { max_length, .. } => {
            let _ = writeln!(rules, "{name}-c ::= {PLAIN} | \"\\\\\\\"\" | \"\\\\\\\\\"");
            format!("\"\\\"\" {} \"\\\"\"", up_to(&format!("{name}-c"), *max_length, rules))
        }
        ArgKind::Path { under } => {
            let bases: Vec<String> = under
                .iter()
                .map(ToString::to_string)
                .filter(|b| b.bytes().all(|c| (0x20..=0x7e).contains(&c) && c != b'"' && c != b'\\'))
                .collect();
            if bases.is_empty() {
                return None;
            }
            // A component is a name but `.` and `..`.
            let _ = writeln!(
                rules,
                "{name}-p ::= {PATH_BYTE_NO_DOT} {PATH_BYTE}* | \".\" {PATH_BYTE_NO_DOT} {PATH_BYTE}* | \"..\" {PATH_BYTE}+"
            );
            let alts: Vec<String> = bases.iter().map(|b| format!("{} (\"/\" {name}-p)*", lit(b))).collect();
            format!("\"\\\"\" ( {} ) \"\\\"\"", alts.join(" | "))
        }
        ArgKind::Integer { min, max } => int_range(i128::from(*min), i128::from(*max))?,
        ArgKind::Number { min, max } => {
            // The integer part in range for each sign; the decimals are free.
            let (lo, hi) = (min.get(), max.get());
            let whole = |x: f64| x.clamp(0.0, 9.99e15).floor() as i128;
            let frac = format!("( \".\" [0-9]{{1,{NUMBER_DECIMALS}}} )?");
            let mut alts = Vec::new();
            if hi >= 0.0 {
                alts.extend(int_range(whole(lo), whole(hi)).map(|i| format!("( {i} ) {frac}")));
            }
            if lo < 0.0 {
                alts.extend(int_range(whole(-hi), whole(-lo)).map(|i| format!("\"-\" ( {i} ) {frac}")));
            }
            if alts.is_empty() {
                return None;
            }
            alts.join(" | ")
        }
        ArgKind::Boolean => "\"true\" | \"false\"".into(),
        ArgKind::List { items, max_items } => {
            if *max_items == 0 {
                return Some(lit("[]"));
            }
            let Some(item) = value(items, &format!("{name}-i"), rules) else { return Some(lit("[]")) };
            let _ = writeln!(rules, "{name}-m ::= \", \" {item}");
            let more = if *max_items > 1 {
                format!(" {}", up_to(&format!("{name}-m"), max_items - 1, rules))
            } else {
                String::new()
            };
            format!("\"[\" ( {item}{more} )? \"]\"")
        }
    };
    let _ = writeln!(rules, "{name} ::= {expr}");
    Some(name.to_string())
}

/// Most repetitions llama.cpp takes in one `{m,n}` (it refuses over 2,000).
const MAX_REPEAT: u32 = 1000;

/// `rule` zero to `max` times. Above [`MAX_REPEAT`], as whole blocks of it and a rest:
/// `n = q·K + r` is fewer than `a` blocks and up to `K-1` more, or `a` blocks and up to `b`
/// more, where `max = a·K + b`.
fn up_to(rule: &str, max: u32, rules: &mut String) -> String {
    if max <= MAX_REPEAT {
        return format!("{rule}{{0,{max}}}");
    }
    let (a, b) = (max / MAX_REPEAT, max % MAX_REPEAT);
    let _ = writeln!(rules, "{rule}-k ::= {rule}{{{MAX_REPEAT}}}");
    format!("( {rule}-k{{0,{}}} {rule}{{0,{}}} | {rule}-k{{{a}}} {rule}{{0,{b}}} )", a - 1, MAX_REPEAT - 1)
}

/// The canonical decimal integers in `min..=max` (no `+`, leading zeros or `-0`), as a GBNF
/// expression; `None` if there are none.
pub fn int_range(min: i128, max: i128) -> Option<String> {
    if min > max {
        return None;
    }
    let mut alts = Vec::new();
    if min < 0 {
        // Negatives: `-` and a magnitude from max(1, -max) to -min.
        let hi = -min;
        let lo = (-max).max(1);
        alts.extend(unsigned_range(lo, hi).into_iter().map(|a| format!("\"-\" {a}")));
    }
    if max >= 0 {
        alts.extend(unsigned_range(min.max(0), max));
    }
    (!alts.is_empty()).then(|| alts.join(" | "))
}

/// Canonical numerals from `lo` to `hi` (both ≥ 0), as GBNF alternatives.
fn unsigned_range(lo: i128, hi: i128) -> Vec<String> {
    let mut out = Vec::new();
    if lo > hi {
        return out;
    }
    let (dl, dh) = (digits(lo), digits(hi));
    for len in dl..=dh {
        // The numerals of `len` digits in range: 0 alone has one digit.
        let first = if len == 1 { 0 } else { 10i128.pow(len as u32 - 1) };
        let last = 10i128.pow(len as u32) - 1;
        let (a, b) = (lo.max(first), hi.min(last));
        if a <= b {
            same_length(&a.to_string(), &b.to_string(), &mut out);
        }
    }
    out
}

fn digits(n: i128) -> usize {
    n.to_string().len()
}

/// Numerals of the same length from `a` to `b` (`a <= b`), as alternatives of digit classes.
fn same_length(a: &str, b: &str, out: &mut Vec<String>) {
    let (a0, b0) = (a.as_bytes()[0], b.as_bytes()[0]);
    let (ra, rb) = (&a[1..], &b[1..]);
    let class =
        |x: u8, y: u8| if x == y { lit(&(x as char).to_string()) } else { format!("[{}-{}]", x as char, y as char) };
    let any = |n: usize| if n == 0 { String::new() } else { format!(" [0-9]{{{n}}}") };
    if a.len() == 1 {
        out.push(class(a0, b0));
        return;
    }
    if a0 == b0 {
        let mut rest = Vec::new();
        same_length(ra, rb, &mut rest);
        out.extend(rest.into_iter().map(|r| format!("{} {r}", class(a0, a0))));
        return;
    }
    let zeros = ra.bytes().all(|c| c == b'0');
    let nines = rb.bytes().all(|c| c == b'9');
    // From a up to a0 followed by nines.
    let mid_lo = if zeros {
        a0
    } else {
        let mut rest = Vec::new();
        same_length(ra, &"9".repeat(ra.len()), &mut rest);
        out.extend(rest.into_iter().map(|r| format!("{} {r}", class(a0, a0))));
        a0 + 1
    };
    let mid_hi = if nines { b0 } else { b0 - 1 };
    if mid_lo <= mid_hi {
        out.push(format!("{}{}", class(mid_lo, mid_hi), any(ra.len())));
    }
    if !nines {
        let mut rest = Vec::new();
        same_length(&"0".repeat(rb.len()), rb, &mut rest);
        out.extend(rest.into_iter().map(|r| format!("{} {r}", class(b0, b0))));
    }
}

/// A reader of the GBNF this module and its users write (literals, classes, groups, `|`,
/// `*`, `+`, `?`, `{m,n}`, rule names), for tests that hold a grammar to the automaton it
/// stands for: whether rule `root` of `grammar` matches all of `text`. Slow (it tracks every
/// way through), and an error for GBNF it does not read.
pub fn matches(grammar: &str, root: &str, text: &str) -> Result<bool, String> {
    let rules = reader::parse(grammar)?;
    let chars: Vec<char> = text.chars().collect();
    let ends = reader::Matcher { rules: &rules, text: &chars }.rule(root, 0)?;
    Ok(ends.contains(&chars.len()))
}

mod reader {
    use std::collections::{BTreeMap, BTreeSet};

    #[derive(Debug, Clone)]
    pub(super) enum Expr {
        Lit(Vec<char>),
        Class { neg: bool, ranges: Vec<(char, char)> },
        Rule(String),
        Seq(Vec<Expr>),
        Alt(Vec<Expr>),
        Rep(Box<Expr>, usize, Option<usize>),
    }

    pub(super) fn parse(text: &str) -> Result<BTreeMap<String, Expr>, String> {
        let mut rules = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (name, body) = line.split_once("::=").ok_or_else(|| format!("no ::= in {line:?}"))?;
            let mut p = Parser { s: body.chars().collect(), i: 0 };
            let e = p.alt()?;
            p.ws();
            if p.i != p.s.len() {
                return Err(format!("trailing text in {line:?} at {}", p.i));
            }
            if rules.insert(name.trim().to_string(), e).is_some() {
                return Err(format!("rule {} twice", name.trim()));
            }
        }
        Ok(rules)
    }

    struct Parser {
        s: Vec<char>,
        i: usize,
    }

    impl Parser {
        fn ws(&mut self) {
            while self.s.get(self.i).is_some_and(|c| *c == ' ') {
                self.i += 1;
            }
        }
        fn alt(&mut self) -> Result<Expr, String> {
            let mut alts = vec![self.seq()?];
            loop {
                self.ws();
                if self.s.get(self.i) == Some(&'|') {
                    self.i += 1;
                    alts.push(self.seq()?);
                } else {
                    return Ok(if alts.len() == 1 { alts.remove(0) } else { Expr::Alt(alts) });
                }
            }
        }
        fn seq(&mut self) -> Result<Expr, String> {
            let mut items = Vec::new();
            loop {
                self.ws();
                match self.s.get(self.i) {
                    None | Some('|') | Some(')') => return Ok(Expr::Seq(items)),
                    _ => {
                        let a = self.atom()?;
                        items.push(self.postfix(a)?);
                    }
                }
            }
        }
        fn esc(&mut self) -> Result<char, String> {
            let c = *self.s.get(self.i).ok_or("end in escape")?;
            self.i += 1;
            Ok(match c {
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'x' => {
                    let h: String = self.s[self.i..self.i + 2].iter().collect();
                    self.i += 2;
                    char::from_u32(u32::from_str_radix(&h, 16).map_err(|e| e.to_string())?).ok_or("bad \\x")?
                }
                c => c,
            })
        }
        fn atom(&mut self) -> Result<Expr, String> {
            let c = self.s[self.i];
            self.i += 1;
            match c {
                '"' => {
                    let mut out = Vec::new();
                    loop {
                        let c = *self.s.get(self.i).ok_or("unterminated literal")?;
                        self.i += 1;
                        match c {
                            '"' => return Ok(Expr::Lit(out)),
                            '\\' => out.push(self.esc()?),
                            c => out.push(c),
                        }
                    }
                }
                '[' => {
                    let neg = self.s.get(self.i) == Some(&'^');
                    if neg {
                        self.i += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        let mut c = *self.s.get(self.i).ok_or("unterminated class")?;
                        self.i += 1;
                        if c == ']' {
                            return Ok(Expr::Class { neg, ranges });
                        }
                        if c == '\\' {
                            c = self.esc()?;
                        }
                        let mut hi = c;
                        if self.s.get(self.i) == Some(&'-') && self.s.get(self.i + 1) != Some(&']') {
                            self.i += 1;
                            hi = self.s[self.i];
                            self.i += 1;
                            if hi == '\\' {
                                hi = self.esc()?;
                            }
                        }
                        ranges.push((c, hi));
                    }
                }
                '(' => {
                    let e = self.alt()?;
                    self.ws();
                    if self.s.get(self.i) != Some(&')') {
                        return Err("unclosed group".into());
                    }
                    self.i += 1;
                    Ok(e)
                }
                c if c.is_ascii_alphanumeric() || c == '-' => {
                    let mut name = c.to_string();
                    while let Some(c) = self.s.get(self.i).filter(|c| c.is_ascii_alphanumeric() || **c == '-') {
                        name.push(*c);
                        self.i += 1;
                    }
                    Ok(Expr::Rule(name))
                }
                c => Err(format!("unexpected {c:?} at {}", self.i - 1)),
            }
        }
        fn postfix(&mut self, mut e: Expr) -> Result<Expr, String> {
            loop {
                let (lo, hi) = match self.s.get(self.i) {
                    Some('*') => (0, None),
                    Some('+') => (1, None),
                    Some('?') => (0, Some(1)),
                    Some('{') => {
                        let end = self.s[self.i..].iter().position(|c| *c == '}').ok_or("unclosed {")? + self.i;
                        let body: String = self.s[self.i + 1..end].iter().collect();
                        self.i = end;
                        let num = |t: &str| t.trim().parse::<usize>().map_err(|e| e.to_string());
                        match body.split_once(',') {
                            Some((a, "")) => (num(a)?, None),
                            Some((a, b)) => (num(a)?, Some(num(b)?)),
                            None => (num(&body)?, Some(num(&body)?)),
                        }
                    }
                    _ => return Ok(e),
                };
                self.i += 1;
                e = Expr::Rep(Box::new(e), lo, hi);
            }
        }
    }

    pub(super) struct Matcher<'a> {
        pub(super) rules: &'a BTreeMap<String, Expr>,
        pub(super) text: &'a [char],
    }

    impl Matcher<'_> {
        pub(super) fn rule(&self, name: &str, at: usize) -> Result<BTreeSet<usize>, String> {
            let e = self.rules.get(name).ok_or_else(|| format!("no rule {name}"))?;
            self.ends(e, at)
        }

        fn ends(&self, e: &Expr, at: usize) -> Result<BTreeSet<usize>, String> {
            let mut out = BTreeSet::new();
            match e {
                Expr::Lit(l) => {
                    if self.text.get(at..at + l.len()) == Some(l.as_slice()) {
                        out.insert(at + l.len());
                    }
                }
                Expr::Class { neg, ranges } => {
                    if let Some(c) = self.text.get(at) {
                        if ranges.iter().any(|(a, b)| (a..=b).contains(&c)) != *neg {
                            out.insert(at + 1);
                        }
                    }
                }
                Expr::Rule(n) => out = self.rule(n, at)?,
                Expr::Seq(items) => {
                    out.insert(at);
                    for item in items {
                        let mut next = BTreeSet::new();
                        for p in out {
                            next.extend(self.ends(item, p)?);
                        }
                        out = next;
                    }
                }
                Expr::Alt(alts) => {
                    for a in alts {
                        out.extend(self.ends(a, at)?);
                    }
                }
                Expr::Rep(inner, lo, hi) => {
                    let mut frontier: BTreeSet<usize> = [at].into();
                    let mut n = 0;
                    if *lo == 0 {
                        out.insert(at);
                    }
                    while !frontier.is_empty() && hi.is_none_or(|h| n < h) {
                        let mut next = BTreeSet::new();
                        for p in &frontier {
                            // An empty match would repeat forever and add nothing.
                            next.extend(self.ends(inner, *p)?.into_iter().filter(|q| q > p));
                        }
                        n += 1;
                        if n >= *lo {
                            out.extend(next.iter().copied());
                        }
                        frontier = next;
                    }
                }
            }
            Ok(out)
        }
    }
}
