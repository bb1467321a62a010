//! Filling a tool's whole argv template from a call's arguments, under the tool's argument
//! specs.
//!
//! Each template element renders to exactly one argv element (see [`crate::template`]). Two
//! exceptions, both decided by the manifest, never by a value: an element that uses an
//! optional argument the call left out is dropped, and an element that is exactly one list
//! argument becomes one element per item.

use std::collections::{BTreeMap, BTreeSet};

use crate::model::ArgSpec;
use crate::template::{ArgTemplate, RenderError};
use crate::types::Name;

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
    // Before a literal `--`, an element that a value starts with `-` could be read as an option
    // (`-delete` to `find`, `--output=...` to many tools): refused unless its spec allows it.
    let dash_ok = |n: &Name| spec(n).is_some_and(|s| s.allow_leading_dash);
    let mut after_dashdash = false;
    let mut out = Vec::new();
    for (i, t) in template.iter().enumerate() {
        let options_end = after_dashdash || i == 0;
        if t.literal() == Some("--") {
            after_dashdash = true;
        }
        let missing = t.placeholders().find(|n| !args.contains_key(n.as_str()));
        if let Some(n) = missing {
            if spec(n).is_some_and(|s| s.optional) {
                continue;
            }
            return Err(RenderError::Missing(n.to_string()));
        }
        if let Some(n) = t.lone_placeholder() {
            if let Some(items) = spec(n).and_then(|s| s.kind.items_of(&args[n.as_str()])) {
                if items.iter().any(|i| i.contains('\0')) {
                    return Err(RenderError::Nul(n.to_string()));
                }
                if !options_end && !dash_ok(n) && items.iter().any(|i| i.starts_with('-')) {
                    return Err(RenderError::OptionLike(n.to_string()));
                }
                out.extend(items);
                continue;
            }
        }
        let element = t.render(args)?;
        if !options_end && element.starts_with('-') {
            if let Some(n) = t.first_char_from(args).filter(|n| !dash_ok(n)) {
                return Err(RenderError::OptionLike(n.to_string()));
            }
        }
        out.push(element);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ArgKind;

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
            allow_leading_dash: false,
        };
        let text = ArgKind::String { max_length: 10, one_of: Vec::new() };
        let list = ArgKind::List { items: Box::new(text.clone()), max_items: 4 };
        let specs = [spec("n", text.clone(), true), spec("files", list, false), spec("q", text, false)];
        let t = parse_all(&["grep", "--max-count={n}", "{q}", "{files}"]);
        let out = render(&t, &specs, &args(&[("q", "a b"), ("files", r#"["x y", "z"]"#)]));
        assert_eq!(out, Ok(vec!["grep".into(), "a b".into(), "x y".into(), "z".into()]));
        let dash = render(&t, &specs, &args(&[("q", "a b"), ("files", r#"["x y", "-z"]"#)]));
        assert_eq!(dash, Err(RenderError::OptionLike("files".into())));
        let out = render(&t, &specs, &args(&[("n", "3"), ("q", "a"), ("files", "[]")]));
        assert_eq!(out, Ok(vec!["grep".into(), "--max-count=3".into(), "a".into()]));
        assert_eq!(render(&t, &specs, &args(&[("files", "[]")])), Err(RenderError::Missing("q".into())));
        let nul = render(&t, &specs, &args(&[("q", "a"), ("files", r#"["a\u0000b"]"#)]));
        assert_eq!(nul, Err(RenderError::Nul("files".into())));
    }

    #[test]
    fn an_empty_element_renders_as_one_empty_argument() {
        assert_eq!(render(&parse_all(&[""]), &[], &BTreeMap::new()), Ok(vec![String::new()]));
    }
}
