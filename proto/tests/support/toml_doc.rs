//! [`Edit`]s applied to a TOML document.

use crate::support::{Edit, Wrong};

/// The value `w` as TOML.
pub fn value(w: &Wrong) -> toml::Value {
    match w {
        Wrong::Int(i) => toml::Value::Integer(*i),
        Wrong::Float(f) => toml::Value::Float(*f),
        Wrong::Str(s) => toml::Value::String(s.clone()),
        Wrong::Bool(b) => toml::Value::Boolean(*b),
        Wrong::Array(items) => toml::Value::Array(items.iter().map(value).collect()),
        Wrong::Table(k, v) => {
            let mut t = toml::Table::new();
            t.insert(k.clone(), value(v));
            toml::Value::Table(t)
        }
    }
}

/// A step of a key path.
#[derive(Debug, Clone, PartialEq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// `phases[1].seq_len`, as the config errors write it.
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

/// Every key path of `v`, parents before children.
pub fn paths(v: &toml::Value) -> Vec<Vec<Seg>> {
    fn walk(v: &toml::Value, at: &mut Vec<Seg>, out: &mut Vec<Vec<Seg>>) {
        match v {
            toml::Value::Table(t) => {
                for (k, child) in t {
                    at.push(Seg::Key(k.clone()));
                    out.push(at.clone());
                    walk(child, at, out);
                    at.pop();
                }
            }
            toml::Value::Array(items) => {
                for (i, child) in items.iter().enumerate() {
                    at.push(Seg::Index(i));
                    out.push(at.clone());
                    walk(child, at, out);
                    at.pop();
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn parent<'a>(root: &'a mut toml::Value, path: &[Seg]) -> Option<&'a mut toml::Value> {
    let mut here = root;
    for seg in path {
        here = match (here, seg) {
            (toml::Value::Table(t), Seg::Key(k)) => t.get_mut(k)?,
            (toml::Value::Array(a), Seg::Index(i)) => a.get_mut(*i)?,
            _ => return None,
        };
    }
    Some(here)
}

/// Applies `edit` at the `pick`-th key path (modulo their number); returns
/// the path it changed.
pub fn apply(root: &mut toml::Value, pick: usize, edit: &Edit) -> Option<Vec<Seg>> {
    let all = paths(root);
    let path = all.get(pick % all.len().max(1))?.clone();
    let (last, up) = path.split_last()?;
    let holder = parent(root, up)?;
    match (holder, last) {
        (toml::Value::Table(t), Seg::Key(k)) => match edit {
            Edit::Remove => {
                t.remove(k);
            }
            Edit::Set(w) => {
                t.insert(k.clone(), value(w));
            }
            Edit::AddSibling(name, w) => {
                t.insert(name.clone(), value(w));
            }
            Edit::Rename(name) => {
                if let Some(v) = t.remove(k) {
                    t.insert(name.clone(), v);
                }
            }
            Edit::Duplicate => {
                if let Some(v) = t.get(k).cloned() {
                    t.insert(format!("{k}_2"), v);
                }
            }
        },
        (toml::Value::Array(a), Seg::Index(i)) => match edit {
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
    Some(path)
}
