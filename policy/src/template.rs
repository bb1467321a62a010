//! `argv` templates: literal text with `{name}` placeholders filled from call arguments.
//! This module parses one element and fills it; [`crate::argv`] fills a tool's whole template
//! under its argument specs.
//!
//! An element renders to exactly one argv element: an argument value is never split or
//! re-parsed, so a value cannot add arguments. `{{` and `}}` write literal braces.

use std::collections::BTreeMap;

use serde::Serialize;

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
    /// A value would begin an argv element with `-` where the program could read it as an
    /// option, and its spec does not allow that.
    #[error(
        "argument {0:?} begins with '-' where the program could read it as an option; refused \
         (the manifest may allow it with allow_leading_dash = true, or place it after \"--\")"
    )]
    OptionLike(String),
}

/// The element as a manifest writes it: `{name}` for a placeholder, `{{` and `}}` for braces.
impl std::fmt::Display for ArgTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for piece in &self.0 {
            match piece {
                Piece::Lit(s) => f.write_str(&s.replace('{', "{{").replace('}', "}}"))?,
                Piece::Arg(n) => write!(f, "{{{n}}}")?,
            }
        }
        Ok(())
    }
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

    /// The placeholder's name, if the element is exactly one placeholder.
    pub fn lone_placeholder(&self) -> Option<&Name> {
        match self.0.as_slice() {
            [Piece::Arg(n)] => Some(n),
            _ => None,
        }
    }

    /// The first placeholder, if the element begins with one (and not with literal text).
    pub fn leading_placeholder(&self) -> Option<&Name> {
        match self.0.first() {
            Some(Piece::Arg(n)) => Some(n),
            _ => None,
        }
    }

    /// The placeholder whose value gives the rendered element its first character, if a
    /// value does (placeholders with empty values before it are skipped).
    pub(crate) fn first_char_from(&self, args: &BTreeMap<String, String>) -> Option<&Name> {
        for piece in &self.0 {
            match piece {
                Piece::Lit(s) if s.is_empty() => {}
                Piece::Lit(_) => return None,
                Piece::Arg(n) if args.get(n.as_str()).is_none_or(String::is_empty) => {}
                Piece::Arg(n) => return Some(n),
            }
        }
        None
    }

    /// The element with every placeholder filled from `args`.
    pub(crate) fn render(&self, args: &BTreeMap<String, String>) -> Result<String, RenderError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_templates() {
        for raw in ["{", "{}", "{1x}", "a}b", "{a b}", "x\0"] {
            assert!(ArgTemplate::parse(raw).is_err(), "{raw:?}");
        }
        let empty = ArgTemplate::parse("").expect("an empty element is one empty literal");
        assert_eq!(empty.literal(), Some(""));
        assert_eq!(empty.render(&BTreeMap::new()), Ok(String::new()));
    }
}
