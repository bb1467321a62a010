//! A record's `details`: any JSON object, or [`Fields`], the flat object that kernel events
//! are turned into.
//!
//! A busy tool makes tens of thousands of events a second, and each becomes a record. Built
//! as a `serde_json` tree, every one of them cost a dozen allocations for its keys and a tree
//! insertion per field before it was serialized; [`Fields`] keeps the keys as static strings in
//! a small sorted vector and is written straight into the log's line. Both serialize to the
//! same JSON object (keys in sorted order, as `serde_json`'s map writes them), so a reader of
//! the log cannot tell which one made a line.

use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::Value;

/// One value of [`Fields`].
#[derive(Debug, Clone, PartialEq)]
pub enum Field {
    /// `true` or `false`.
    Bool(bool),
    /// An unsigned number.
    U64(u64),
    /// A signed number.
    I64(i64),
    /// A string known when agentd was built (`"kernel"`, `"tracepoint"`).
    Static(&'static str),
    /// A string made at run time (a path).
    Text(String),
    /// Anything else (a list, a null).
    Json(Value),
}

impl Field {
    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Field::Static(s) => Some(s),
            Field::Text(s) => Some(s),
            Field::Json(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The number as an `i64`, if it is one that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Field::I64(n) => Some(*n),
            Field::U64(n) => i64::try_from(*n).ok(),
            Field::Json(v) => v.as_i64(),
            _ => None,
        }
    }

    /// The number as a `u64`, if it is a non-negative one.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Field::U64(n) => Some(*n),
            Field::I64(n) => u64::try_from(*n).ok(),
            Field::Json(v) => v.as_u64(),
            _ => None,
        }
    }

    fn to_value(&self) -> Value {
        match self {
            Field::Bool(b) => Value::Bool(*b),
            Field::U64(n) => (*n).into(),
            Field::I64(n) => (*n).into(),
            Field::Static(s) => (*s).into(),
            Field::Text(s) => s.as_str().into(),
            Field::Json(v) => v.clone(),
        }
    }
}

macro_rules! field_from {
    ($($t:ty => $variant:ident as $as:ty),* $(,)?) => {
        $(impl From<$t> for Field {
            fn from(v: $t) -> Self {
                Field::$variant(<$as>::from(v))
            }
        })*
    };
}

field_from!(bool => Bool as bool, u32 => U64 as u64, u64 => U64 as u64, i32 => I64 as i64, i64 => I64 as i64);

impl From<&'static str> for Field {
    fn from(s: &'static str) -> Self {
        Field::Static(s)
    }
}

impl From<String> for Field {
    fn from(s: String) -> Self {
        Field::Text(s)
    }
}

impl From<Value> for Field {
    fn from(v: Value) -> Self {
        Field::Json(v)
    }
}

impl Serialize for Field {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Field::Bool(b) => s.serialize_bool(*b),
            Field::U64(n) => s.serialize_u64(*n),
            Field::I64(n) => s.serialize_i64(*n),
            Field::Static(t) => s.serialize_str(t),
            Field::Text(t) => s.serialize_str(t),
            Field::Json(v) => v.serialize(s),
        }
    }
}

/// A flat JSON object whose keys are static strings, kept sorted (the order `serde_json`
/// writes a map in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fields(Vec<(&'static str, Field)>);

impl Fields {
    /// An empty object with room for a typical event's fields.
    pub fn new() -> Self {
        Self(Vec::with_capacity(16))
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| (*k).cmp(key))
    }

    /// Sets `key` to `value`, replacing what it held.
    pub fn insert(&mut self, key: &'static str, value: impl Into<Field>) {
        let value = value.into();
        match self.find(key) {
            Ok(i) => self.0[i].1 = value,
            Err(i) => self.0.insert(i, (key, value)),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Field> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Field::as_str)
    }

    /// Whether `key` is set.
    pub fn contains(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Removes `key`, returning what it held.
    pub fn remove(&mut self, key: &str) -> Option<Field> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// Only the fields named in `keys`.
    pub fn only(&self, keys: &[&str]) -> Fields {
        Fields(self.0.iter().filter(|(k, _)| keys.contains(k)).cloned().collect())
    }

    /// The same object as a JSON value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, v)| ((*k).to_string(), v.to_value())).collect())
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// A record's `details`.
#[derive(Debug, Clone, PartialEq)]
pub enum Details {
    /// Any JSON value (an object, for every kind agentd writes).
    Json(Value),
    /// A kernel event's fields.
    Fields(Fields),
}

impl Details {
    /// The details as a JSON value.
    pub fn to_value(&self) -> Value {
        match self {
            Details::Json(v) => v.clone(),
            Details::Fields(f) => f.to_value(),
        }
    }

    /// The event's fields, if these are.
    pub fn fields(&self) -> Option<&Fields> {
        match self {
            Details::Fields(f) => Some(f),
            Details::Json(_) => None,
        }
    }

    /// As [`Details::fields`], to change them.
    pub fn fields_mut(&mut self) -> Option<&mut Fields> {
        match self {
            Details::Fields(f) => Some(f),
            Details::Json(_) => None,
        }
    }
}

impl From<Value> for Details {
    fn from(v: Value) -> Self {
        Details::Json(v)
    }
}

impl From<Fields> for Details {
    fn from(f: Fields) -> Self {
        Details::Fields(f)
    }
}

impl Serialize for Details {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Details::Json(v) => v.serialize(s),
            Details::Fields(f) => f.serialize(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same fields written as `Fields` and as a `serde_json` map make the same bytes,
    /// whatever order they were set in.
    #[test]
    fn fields_serialize_like_a_json_map() {
        let mut f = Fields::new();
        f.insert("pid", 7u32);
        f.insert("path", "/etc/passwd".to_string());
        f.insert("result", -13i64);
        f.insert("hook", "tracepoint");
        f.insert("path_truncated", false);
        f.insert("access", Value::from(vec!["read"]));
        f.insert("pid", 8u32);
        let json = serde_json::json!({
            "pid": 8, "path": "/etc/passwd", "result": -13, "hook": "tracepoint",
            "path_truncated": false, "access": ["read"],
        });
        assert_eq!(serde_json::to_string(&f).ok(), serde_json::to_string(&json).ok());
        assert_eq!(f.to_value(), json);
        assert_eq!(f.remove("result").and_then(|v| v.as_i64()), Some(-13));
        assert!(!f.contains("result"));
        assert_eq!(f.only(&["pid", "hook"]).to_value(), serde_json::json!({ "pid": 8, "hook": "tracepoint" }));
    }
}
