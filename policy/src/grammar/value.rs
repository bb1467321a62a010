//! The values of a call: scalars (strings, paths, integers, numbers, booleans) and lists,
//! byte by byte, and whether what was written so far can still become a value in bounds.

use super::{ListPhase, Scalar, Step};
use crate::model::{ArgKind, NUMBER_DECIMALS};

/// `s` as a JSON string in the grammar's escapes (`\"` and `\\` only).
pub(super) fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// A finished list's value: a JSON array in the grammar's layout.
pub(super) fn list_text(kind: &ArgKind, items: &[String]) -> String {
    let quoted =
        matches!(kind, ArgKind::List { items, .. } if matches!(**items, ArgKind::String { .. } | ArgKind::Path { .. }));
    let items: Vec<String> = items.iter().map(|i| if quoted { quote(i) } else { i.clone() }).collect();
    format!("[{}]", items.join(", "))
}

pub(super) fn feed_list(kind: &ArgKind, items: &mut Vec<String>, phase: &mut ListPhase, b: u8) -> Option<Step> {
    let ArgKind::List { items: item_kind, max_items } = kind else { return None };
    let start_item = |items: &Vec<String>, phase: &mut ListPhase| {
        if items.len() >= *max_items as usize {
            return None;
        }
        let mut sc = Scalar::default();
        match feed_scalar(item_kind, &mut sc, b)? {
            Step::More => {
                *phase = ListPhase::Item(sc);
                Some(Step::More)
            }
            // Every scalar takes at least one byte before it can end.
            Step::Ended | Step::EndedBefore => None,
        }
    };
    match phase {
        ListPhase::Open => {
            *phase = ListPhase::First;
            (b == b'[').then_some(Step::More)
        }
        ListPhase::First if b == b']' => Some(Step::Ended),
        ListPhase::First | ListPhase::Next => start_item(items, phase),
        ListPhase::Item(sc) => match feed_scalar(item_kind, sc, b)? {
            Step::More => Some(Step::More),
            Step::Ended => {
                items.push(String::from_utf8_lossy(&sc.buf).into_owned());
                *phase = ListPhase::After(false);
                Some(Step::More)
            }
            Step::EndedBefore => {
                items.push(String::from_utf8_lossy(&sc.buf).into_owned());
                *phase = ListPhase::After(false);
                feed_list(kind, items, phase, b)
            }
        },
        ListPhase::After(false) if b == b']' => Some(Step::Ended),
        ListPhase::After(false) if b == b',' && items.len() < *max_items as usize => {
            *phase = ListPhase::After(true);
            Some(Step::More)
        }
        ListPhase::After(true) if b == b' ' => {
            *phase = ListPhase::Next;
            Some(Step::More)
        }
        ListPhase::After(_) => None,
    }
}

/// Feeds one byte of a scalar value; `None` if no valid value continues that way.
pub(super) fn feed_scalar(kind: &ArgKind, sc: &mut Scalar, b: u8) -> Option<Step> {
    match kind {
        ArgKind::Integer { .. } | ArgKind::Number { .. } => {
            let numeric = b.is_ascii_digit() || (b == b'-' && sc.buf.is_empty());
            let dot = b == b'.' && matches!(kind, ArgKind::Number { .. }) && !sc.buf.contains(&b'.');
            if numeric || dot {
                sc.buf.push(b);
                let ok = match kind {
                    ArgKind::Integer { min, max } => int_prefix_ok(&sc.buf, *min, *max),
                    ArgKind::Number { min, max } => number_prefix_ok(&sc.buf, min.get(), max.get()),
                    _ => false,
                };
                return ok.then_some(Step::More);
            }
            // Any other byte ends the number and belongs to what follows.
            let text = String::from_utf8_lossy(&sc.buf);
            kind.check(&text).is_ok().then_some(Step::EndedBefore)
        }
        ArgKind::Boolean => {
            sc.buf.push(b);
            let done = sc.buf == b"true" || sc.buf == b"false";
            let ok = b"true".starts_with(&sc.buf) || b"false".starts_with(&sc.buf);
            ok.then_some(if done { Step::Ended } else { Step::More })
        }
        ArgKind::List { .. } => None,
        ArgKind::String { .. } | ArgKind::Path { .. } => {
            if !sc.opened {
                sc.opened = true;
                return (b == b'"').then_some(Step::More);
            }
            if sc.escape {
                sc.escape = false;
                if b != b'"' && b != b'\\' {
                    return None;
                }
                sc.buf.push(b);
            } else if b == b'\\' {
                sc.escape = true;
                // Paths never need escapes; a string may still go on with `\"` or `\\`.
                let room = |c: &[u8]| string_prefix_ok(kind, &[&sc.buf[..], c].concat());
                return (matches!(kind, ArgKind::String { .. }) && (room(b"\"") || room(b"\\"))).then_some(Step::More);
            } else if b == b'"' {
                let text = String::from_utf8_lossy(&sc.buf);
                return kind.check(&text).is_ok().then_some(Step::Ended);
            } else {
                if !(0x20..=0x7e).contains(&b) {
                    return None;
                }
                sc.buf.push(b);
            }
            string_prefix_ok(kind, &sc.buf).then_some(Step::More)
        }
    }
}

fn string_prefix_ok(kind: &ArgKind, buf: &[u8]) -> bool {
    match kind {
        ArgKind::String { max_length, one_of } => {
            buf.len() <= *max_length as usize
                && (one_of.is_empty() || one_of.iter().any(|o| o.as_bytes().starts_with(buf)))
        }
        ArgKind::Path { under } => {
            let Ok(text) = std::str::from_utf8(buf) else { return false };
            under.iter().any(|base| path_prefix_ok(text, &base.to_string()))
        }
        _ => false,
    }
}

/// Whether `text` can still grow into a path at or below `base`.
fn path_prefix_ok(text: &str, base: &str) -> bool {
    if base.starts_with(text) {
        return true;
    }
    let Some(rest) = text.strip_prefix(base) else { return false };
    let Some(rest) = rest.strip_prefix('/') else { return false };
    // Every finished component must be a real name; the last one is still being written.
    let mut parts: Vec<&str> = rest.split('/').collect();
    parts.pop();
    parts.iter().all(|c| !c.is_empty() && *c != "." && *c != "..")
}

/// Whether the digits so far can still become an integer in `min..=max`.
fn int_prefix_ok(buf: &[u8], min: i64, max: i64) -> bool {
    let (neg, digits) = match buf.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, buf),
    };
    // A negative zero is never canonical, and `check` refuses it.
    if neg && (min >= 0 || digits.first() == Some(&b'0')) {
        return false;
    }
    if digits.is_empty() {
        return true;
    }
    if digits.len() > 1 && digits[0] == b'0' || digits.len() > 19 {
        return false;
    }
    let Ok(p) = std::str::from_utf8(digits).unwrap_or("x").parse::<i128>() else { return false };
    let (min, max) = (i128::from(min), i128::from(max));
    // Appending k more digits gives magnitudes in [p*10^k, p*10^k + 10^k - 1].
    let mut scale: i128 = 1;
    for _ in 0..=(19 - digits.len()) {
        let (lo, hi) = (p * scale, p * scale + scale - 1);
        let (lo, hi) = if neg { (-hi, -lo) } else { (lo, hi) };
        if hi >= min && lo <= max && !(p == 0 && scale > 1) {
            return true;
        }
        scale *= 10;
    }
    false
}

/// Whether `buf` (`-?digits(.digits?)?`) can still become a number in `min..=max` that
/// [`ArgKind::check`] accepts. Each prefix's completions lie between two texts (the prefix
/// padded with zeros, and with nines to [`NUMBER_DECIMALS`] places), parsed exactly as `check`
/// parses, so float rounding cannot open a dead end. Negative zero is no completion.
fn number_prefix_ok(buf: &[u8], min: f64, max: f64) -> bool {
    let Ok(text) = std::str::from_utf8(buf) else { return false };
    let (neg, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (body, None),
    };
    if int.len() > 1 && int.starts_with('0')
        || int.len() > 16
        || (int.is_empty() && frac.is_some())
        || frac.is_some_and(|f| f.len() > NUMBER_DECIMALS)
    {
        return false;
    }
    let nines = "9".repeat(NUMBER_DECIMALS);
    let smallest = 10f64.powi(-(NUMBER_DECIMALS as i32));
    // Do the completions with magnitudes from `lo` to `hi` meet [min, max]?
    let meets = |lo: &str, hi: &str| {
        let (lo, hi) = (lo.parse::<f64>().unwrap_or(f64::MAX), hi.parse::<f64>().unwrap_or(f64::MAX));
        if neg {
            hi >= smallest && -hi <= max && -lo.max(smallest) >= min
        } else {
            lo <= max && hi >= min
        }
    };
    match (int, frac) {
        ("", _) => meets("0", &format!("{}.{nines}", "9".repeat(16))),
        (_, Some(f)) => meets(&format!("{int}.{f}0"), &format!("{int}.{f}{}", &nines[f.len()..])),
        ("0", None) => meets("0", &format!("0.{nines}")),
        (_, None) => (0..=16 - int.len())
            .any(|k| meets(&format!("{int}{}", "0".repeat(k)), &format!("{int}{}.{nines}", "9".repeat(k)))),
    }
}
