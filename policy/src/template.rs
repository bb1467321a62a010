//! `argv` templates: literal text with `{name}` placeholders filled from call arguments.
//!
//! Each template element renders to exactly one argv element: an argument value is never
//! split or re-parsed, so a value cannot add arguments. `{{` and `}}` write literal braces.
//! Two exceptions, both decided by the manifest, never by a value: an element that uses an
//! optional argument the call left out is dropped, and an element that is exactly one list
//! argument becomes one element per item.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::model::{ArgKind, ArgSpec};
use crate::types::Name;

/// One piece of a template element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Piece {
    /// Literal text.
    Lit(String),
    /// A placeholder for the call argument of this name.
    Arg(Name),
}

/// One argv element of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ArgTemplate(Vec<Piece>);

/// Why a template could not be filled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// A placeholder had no value.
    #[error("argument {0:?} is required by the tool's argv template but was not given (use --arg {0}=VALUE)")]
    Missing(String),
    /// A value was given that no placeholder uses.
    #[error("argument {name:?} is not used by the tool's argv template (it takes: {known})")]
    Unknown {
        /// The name given.
        name: String,
        /// The names the template takes.
        known: String,
    },
    /// A value contained a NUL byte, which cannot be passed to exec.
    #[error("argument {0:?} contains a NUL byte")]
    Nul(String),
}

impl ArgTemplate {
    /// Parses one element. The error text is meant for a diagnostic.
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.contains('\0') {
            return Err("argv element contains a NUL byte".into());
        }
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                    let name = Name::parse(&name)
                        .map_err(|e| format!("bad placeholder in {raw:?}: {e} (write {{{{ for a literal brace)"))?;
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Arg(name));
                }
                '}' => return Err(format!("unmatched '}}' in {raw:?} (write }}}} for a literal brace)")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() || pieces.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Self(pieces))
    }

    /// The placeholder names this element uses.
    pub fn placeholders(&self) -> impl Iterator<Item = &Name> {
        self.0.iter().filter_map(|p| match p {
            Piece::Arg(n) => Some(n),
            Piece::Lit(_) => None,
        })
    }

    /// The element's text if it has no placeholder.
    pub fn literal(&self) -> Option<&str> {
        match self.0.as_slice() {
            [Piece::Lit(s)] => Some(s),
            _ => None,
        }
    }

    /// Whether the element is exactly one placeholder.
    pub fn is_lone_placeholder(&self) -> bool {
        matches!(self.0.as_slice(), [Piece::Arg(_)])
    }

    fn render(&self, args: &BTreeMap<String, String>) -> Result<String, RenderError> {
        let mut out = String::new();
        for piece in &self.0 {
            match piece {
                Piece::Lit(s) => out.push_str(s),
                Piece::Arg(n) => out.push_str(args.get(n.as_str()).ok_or_else(|| RenderError::Missing(n.to_string()))?),
            }
        }
        Ok(out)
    }
}

/// Renders a whole argv template. Every placeholder must be given unless its spec in `specs`
/// is optional, and every given argument must be used: a call that names an argument the
/// tool does not take is refused.
pub fn render(
    template: &[ArgTemplate],
    specs: &[ArgSpec],
    args: &BTreeMap<String, String>,
) -> Result<Vec<String>, RenderError> {
    let known: BTreeSet<&str> = template.iter().flat_map(|t| t.placeholders()).map(Name::as_str).collect();
    for (name, value) in args {
        if !known.contains(name.as_str()) {
            let known = if known.is_empty() {
                "none".to_string()
            } else {
                known.iter().copied().collect::<Vec<_>>().join(", ")
            };
            return Err(RenderError::Unknown { name: name.clone(), known });
        }
        if value.contains('\0') {
            return Err(RenderError::Nul(name.clone()));
        }
    }
    let spec = |n: &Name| specs.iter().find(|s| s.name == *n);
    let mut out = Vec::new();
    for t in template {
        let missing = t.placeholders().find(|n| !args.contains_key(n.as_str()));
        if let Some(n) = missing {
            if spec(n).is_some_and(|s| s.optional) {
                continue;
            }
            return Err(RenderError::Missing(n.to_string()));
        }
        if let [Piece::Arg(n)] = t.0.as_slice() {
            if let Some(items) = spec(n).and_then(|s| s.kind.items_of(&args[n.as_str()])) {
                if items.iter().any(|i| i.contains('\0')) {
                    return Err(RenderError::Nul(n.to_string()));
                }
                out.extend(items);
                continue;
            }
        }
        out.push(t.render(args)?);
    }
    Ok(out)
}

/// Whether `kind` may appear inside a longer argv element (lists must stand alone).
pub(crate) fn embeddable(kind: &ArgKind) -> bool {
    !matches!(kind, ArgKind::List { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn parse_all(raw: &[&str]) -> Vec<ArgTemplate> {
        raw.iter().map(|r| ArgTemplate::parse(r).expect("valid template")).collect()
    }

    #[test]
    fn renders_each_value_as_one_element() {
        let t = parse_all(&["/bin/sh", "-c", "{command}", "--x={a}{b}", "{{lit}}"]);
        let out = render(&t, &[], &args(&[("command", "echo hi; rm -rf /"), ("a", "1 2"), ("b", "")]));
        assert_eq!(
            out,
            Ok(vec!["/bin/sh".into(), "-c".into(), "echo hi; rm -rf /".into(), "--x=1 2".into(), "{lit}".into()])
        );
    }

    #[test]
    fn refuses_missing_unknown_and_nul() {
        let t = parse_all(&["cat", "{path}"]);
        assert_eq!(render(&t, &[], &args(&[])), Err(RenderError::Missing("path".into())));
        assert!(matches!(render(&t, &[], &args(&[("path", "x"), ("extra", "y")])), Err(RenderError::Unknown { .. })));
        assert_eq!(render(&t, &[], &args(&[("path", "a\0b")])), Err(RenderError::Nul("path".into())));
    }

    #[test]
    fn optional_arguments_drop_their_elements_and_lists_expand() {
        let spec = |name: &str, kind: ArgKind, optional: bool| ArgSpec {
            name: Name::parse(name).expect("name"),
            description: String::new(),
            kind,
            optional,
        };
        let text = ArgKind::String { max_length: 10, one_of: Vec::new() };
        let list = ArgKind::List { items: Box::new(text.clone()), max_items: 4 };
        let specs = [spec("n", text.clone(), true), spec("files", list, false), spec("q", text, false)];
        let t = parse_all(&["grep", "--max-count={n}", "{q}", "{files}"]);
        let out = render(&t, &specs, &args(&[("q", "a b"), ("files", r#"["x y", "-z"]"#)]));
        assert_eq!(out, Ok(vec!["grep".into(), "a b".into(), "x y".into(), "-z".into()]));
        let out = render(&t, &specs, &args(&[("n", "3"), ("q", "a"), ("files", "[]")]));
        assert_eq!(out, Ok(vec!["grep".into(), "--max-count=3".into(), "a".into()]));
        assert_eq!(render(&t, &specs, &args(&[("files", "[]")])), Err(RenderError::Missing("q".into())));
        let nul = render(&t, &specs, &args(&[("q", "a"), ("files", r#"["a\u0000b"]"#)]));
        assert_eq!(nul, Err(RenderError::Nul("files".into())));
    }

    #[test]
    fn bad_templates() {
        for raw in ["{", "{}", "{1x}", "a}b", "{a b}", "x\0"] {
            assert!(ArgTemplate::parse(raw).is_err(), "{raw:?}");
        }
        assert_eq!(ArgTemplate::parse("").map(|t| render(&[t], &[], &BTreeMap::new())), Ok(Ok(vec![String::new()])));
    }
}
