//! [`Edit`]s applied to a JSON document.

use crate::support::{Edit, Wrong};

/// The value `w` as JSON (NaN and infinities, which JSON cannot hold,
/// become `null`).
pub fn value(w: &Wrong) -> serde_json::Value {
    use serde_json::Value;
    match w {
        Wrong::Int(i) => Value::from(*i),
        Wrong::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Wrong::Str(s) => Value::String(s.clone()),
        Wrong::Bool(b) => Value::Bool(*b),
        Wrong::Array(items) => Value::Array(items.iter().map(value).collect()),
        Wrong::Table(k, v) => {
            let mut m = serde_json::Map::new();
            m.insert(k.clone(), value(v));
            Value::Object(m)
        }
    }
}

/// A step of a key path.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// `phases[1].shards[0].rows`, as serde_path_to_error writes it.
pub fn path_text(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Every key path of `v`, parents before children; arrays longer than
/// `max_items` contribute their first `max_items` elements only.
pub fn paths(v: &serde_json::Value, max_items: usize) -> Vec<Vec<Seg>> {
    fn walk(v: &serde_json::Value, max: usize, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, child) in m {
                    at.push(Seg::Key(k.clone()));
                    out.push(at.clone());
                    walk(child, max, at, out);
                    at.pop();
                }
            }
            serde_json::Value::Array(items) => {
                for (i, child) in items.iter().enumerate().take(max) {
                    at.push(Seg::Index(i));
                    out.push(at.clone());
                    walk(child, max, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, max_items, &mut Vec::new(), &mut out);
    out
}

fn at_path<'a>(root: &'a mut serde_json::Value, path: &[Seg]) -> Option<&'a mut serde_json::Value> {
    let mut here = root;
    for seg in path {
        here = match (here, seg) {
            (serde_json::Value::Object(m), Seg::Key(k)) => m.get_mut(k)?,
            (serde_json::Value::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(here)
}

/// Applies `edit` at `path`.
pub fn apply_at(root: &mut serde_json::Value, path: &[Seg], edit: &Edit) {
    let Some((last, up)) = path.split_last() else {
        return;
    };
    let Some(holder) = at_path(root, up) else {
        return;
    };
    match (holder, last) {
        (serde_json::Value::Object(m), Seg::Key(k)) => match edit {
            Edit::Remove => {
                m.remove(k);
            }
            Edit::Set(w) => {
                m.insert(k.clone(), value(w));
            }
            Edit::AddSibling(name, w) => {
                m.insert(name.clone(), value(w));
            }
            Edit::Rename(name) => {
                if let Some(v) = m.remove(k) {
                    m.insert(name.clone(), v);
                }
            }
            Edit::Duplicate => {
                if let Some(v) = m.get(k).cloned() {
                    m.insert(format!("{k}_2"), v);
                }
            }
        },
        (serde_json::Value::Array(a), Seg::Index(i)) => match edit {
            Edit::Remove if *i < a.len() => {
                a.remove(*i);
            }
            Edit::Set(w) if *i < a.len() => a[*i] = value(w),
            Edit::AddSibling(_, w) => a.push(value(w)),
            Edit::Duplicate | Edit::Rename(_) if *i < a.len() => {
                let copy = a[*i].clone();
                a.push(copy);
            }
            _ => {}
        },
        _ => {}
    }
}

/// Applies `edit` at the `pick`-th key path of `paths(root, max_items)`;
/// returns the path it changed.
pub fn apply(
    root: &mut serde_json::Value,
    max_items: usize,
    pick: usize,
    edit: &Edit,
) -> Option<Vec<Seg>> {
    let all = paths(root, max_items);
    let path = all.get(pick % all.len().max(1))?.clone();
    apply_at(root, &path, edit);
    Some(path)
}
