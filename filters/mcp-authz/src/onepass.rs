//! List filtering in one pass over the answer.
//!
//! The general path (`Engine::filter_answer_text`) reads an answer as nested raw values: the message,
//! then `result`, then the list, then each item for its name — every byte of a long list is scanned
//! about four times, and scanning is almost all of the cost (a 200-tool answer: ~75% of the time in
//! serde_json's string skipping). This module walks the same structure once with serde seeds: the
//! message's fields, `result`'s fields and each item's fields are captured as raw values in the same
//! scan, and only items the caller may use are written out.
//!
//! The semantics are those of the general path, including the awkward cases: the last of duplicate
//! keys wins; an item whose name is missing, not a string or given twice is removed (fail closed);
//! an answer that is not the expected shape is left as is. Kept items are re-emitted field by field
//! (raw values untouched, whitespace between tokens dropped).

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Decides whether a listed name is kept.
pub trait Keep {
    fn keep(&mut self, name: &str) -> bool;
}

impl<F: FnMut(&str) -> bool> Keep for F {
    fn keep(&mut self, name: &str) -> bool {
        self(name)
    }
}

/// What a one-pass read of a single JSON-RPC answer found.
pub struct ListAnswer<'a> {
    /// The raw `id` (the last one if repeated), to check against the plan.
    pub id: Option<&'a RawValue>,
    /// The rewritten message, when something was removed.
    pub rewritten: Option<String>,
    pub removed: usize,
    /// The (last) `result` also has one of the `other_keys` (another kind of list): the caller reads
    /// the answer on its general path.
    pub other_list: bool,
}

/// Read `text` (one JSON-RPC message, an object) and filter `result.<list_key>[]` by `item_name_key`;
/// report whether `result` also has a member named one of `other_keys` (other than `list_key`). `Err` = not valid JSON (the
/// caller fails closed, as the general path does).
pub fn filter_list<'a>(
    text: &'a str,
    list_key: &str,
    item_name_key: &str,
    other_keys: &[&str],
    keep: &mut dyn Keep,
) -> Result<ListAnswer<'a>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let top = Message { list_key, item_name_key, keep }.deserialize(&mut de)?;
    de.end()?;
    let Some(fields) = top else {
        return Ok(ListAnswer { id: None, rewritten: None, removed: 0, other_list: false });
    };
    let id = fields.iter().rev().find(|(k, _)| k == "id").and_then(|(_, v)| v.raw());
    // The last `result` decides, as in the general path.
    let (removed, other_list) = match fields.iter().rev().find(|(k, _)| k == "result").map(|(_, v)| v) {
        Some(Piece::Result(r)) => {
            (r.removed, r.fields.iter().any(|(k, _)| k != list_key && other_keys.contains(&k.as_ref())))
        }
        _ => (0, false),
    };
    if removed == 0 {
        return Ok(ListAnswer { id, rewritten: None, removed: 0, other_list });
    }
    let mut out = String::with_capacity(text.len());
    write_object(&mut out, &fields);
    Ok(ListAnswer { id, rewritten: Some(out), removed, other_list })
}

/// A field value: raw, or a part we rewrote.
enum Piece<'a> {
    Raw(&'a RawValue),
    /// `result` read as an object (fields, removed count).
    Result(ResultObject<'a>),
    /// The list, filtered: kept items already serialised, and how many were removed.
    List(String, usize),
    /// Something we do not rewrite and did not keep (a non-object `result`, a non-array list): the
    /// message is then forwarded as is, so its text is not needed.
    Other,
}

impl<'a> Piece<'a> {
    fn raw(&self) -> Option<&'a RawValue> {
        match self {
            Piece::Raw(r) => Some(r),
            _ => None,
        }
    }
}

struct ResultObject<'a> {
    fields: Vec<(Cow<'a, str>, Piece<'a>)>,
    removed: usize,
}

type Fields<'a> = Vec<(Cow<'a, str>, Piece<'a>)>;

/// Write `{...}` from fields; of duplicate keys only the last is written (at the first one's place).
fn write_object(out: &mut String, fields: &Fields<'_>) {
    out.push('{');
    let mut first = true;
    for (i, (k, v)) in fields.iter().enumerate() {
        if fields.iter().take(i).any(|(earlier, _)| earlier == k) {
            continue;
        }
        // The value that counts is the last one with this key.
        let v = fields.iter().rev().find(|(k2, _)| k2 == k).map_or(v, |(_, v2)| v2);
        if !first {
            out.push(',');
        }
        first = false;
        push_json_string(out, k);
        out.push(':');
        match v {
            Piece::Raw(r) => out.push_str(r.get()),
            Piece::Result(r) => write_object(out, &r.fields),
            Piece::List(items, _) => out.push_str(items),
            Piece::Other => out.push_str("null"),
        }
    }
    out.push('}');
}

/// Append `s` as a JSON string literal.
fn push_json_string(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::String(s.to_string()).to_string());
    }
}

// ------------------------------------------------------------------------------------------------
// Seeds. Each level accepts any JSON value (`deserialize_any`) so that an unexpected shape is read
// (validated) and reported as `None` / `Other` instead of failing.

/// The `Visitor` methods for JSON shapes a level does not rewrite: read (skip) the value, answer `None`.
macro_rules! not_this_shape {
    (scalars) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
    };
    (seq) => {
        fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Self::Value, S::Error> {
            while s.next_element::<IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    };
    (map) => {
        fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok(None)
        }
    };
}

struct Message<'k, 'f> {
    list_key: &'k str,
    item_name_key: &'k str,
    keep: &'f mut dyn Keep,
}

impl<'de, 'k, 'f> DeserializeSeed<'de> for Message<'k, 'f> {
    type Value = Option<Fields<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'k, 'f> Visitor<'de> for Message<'k, 'f> {
    type Value = Option<Fields<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON-RPC message")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
        let mut fields = Vec::new();
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            let piece = if k == "result" {
                match m.next_value_seed(ResultSeed {
                    list_key: self.list_key,
                    item_name_key: self.item_name_key,
                    keep: &mut *self.keep,
                })? {
                    Some(r) => Piece::Result(r),
                    None => Piece::Other,
                }
            } else {
                Piece::Raw(m.next_value::<&'de RawValue>()?)
            };
            fields.push((k, piece));
        }
        Ok(Some(fields))
    }
    not_this_shape!(seq);
    not_this_shape!(scalars);
}

struct ResultSeed<'k, 'f> {
    list_key: &'k str,
    item_name_key: &'k str,
    keep: &'f mut dyn Keep,
}

impl<'de, 'k, 'f> DeserializeSeed<'de> for ResultSeed<'k, 'f> {
    type Value = Option<ResultObject<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'k, 'f> Visitor<'de> for ResultSeed<'k, 'f> {
    type Value = Option<ResultObject<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a result")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
        let mut fields = Vec::new();
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            let piece = if k == self.list_key {
                match m.next_value_seed(ListSeed { item_name_key: self.item_name_key, keep: &mut *self.keep })? {
                    Some((items, removed)) => Piece::List(items, removed),
                    None => Piece::Other,
                }
            } else {
                Piece::Raw(m.next_value::<&'de RawValue>()?)
            };
            fields.push((k, piece));
        }
        // The last occurrence of the list key decides (as in the general path).
        let removed = match fields.iter().rev().find(|(k, _)| k == self.list_key).map(|(_, v)| v) {
            Some(Piece::List(_, n)) => *n,
            _ => 0,
        };
        Ok(Some(ResultObject { fields, removed }))
    }
    not_this_shape!(seq);
    not_this_shape!(scalars);
}

struct ListSeed<'k, 'f> {
    item_name_key: &'k str,
    keep: &'f mut dyn Keep,
}

impl<'de, 'k, 'f> DeserializeSeed<'de> for ListSeed<'k, 'f> {
    type Value = Option<(String, usize)>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'k, 'f> Visitor<'de> for ListSeed<'k, 'f> {
    type Value = Option<(String, usize)>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list")
    }
    fn visit_seq<S: SeqAccess<'de>>(self, mut s: S) -> Result<Self::Value, S::Error> {
        let mut out = String::new();
        out.push('[');
        let mut removed = 0;
        let mut first = true;
        while let Some(item) = s.next_element_seed(ItemSeed { item_name_key: self.item_name_key })? {
            let kept = match &item {
                Some(item) => item.name.as_deref().is_some_and(|n| self.keep.keep(n)),
                None => false,
            };
            match item {
                Some(item) if kept => {
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    out.push('{');
                    for (i, (k, v)) in item.fields.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        push_json_string(&mut out, k);
                        out.push(':');
                        out.push_str(v.get());
                    }
                    out.push('}');
                }
                _ => removed += 1,
            }
        }
        out.push(']');
        Ok(Some((out, removed)))
    }
    not_this_shape!(map);
    not_this_shape!(scalars);
}

struct Item<'de> {
    /// Fields in order. Items with duplicate keys never get here with a name (see below).
    fields: Vec<(Cow<'de, str>, &'de RawValue)>,
    name: Option<String>,
}

struct ItemSeed<'k> {
    item_name_key: &'k str,
}

impl<'de, 'k> DeserializeSeed<'de> for ItemSeed<'k> {
    type Value = Option<Item<'de>>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, 'k> Visitor<'de> for ItemSeed<'k> {
    type Value = Option<Item<'de>>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list item")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
        let mut fields: Vec<(Cow<'de, str>, &'de RawValue)> = Vec::new();
        let mut names = 0usize;
        let mut name = None;
        while let Some(k) = m.next_key::<Cow<'de, str>>()? {
            let v = m.next_value::<&'de RawValue>()?;
            if k == self.item_name_key {
                names += 1;
                // A string, or not a usable name (then the item is removed).
                name = serde_json::from_str::<String>(v.get()).ok();
            }
            fields.push((k, v));
        }
        // A repeated name field: clients disagree on which one counts, so the item is not kept.
        if names > 1 {
            name = None;
        }
        Ok(Some(Item { fields, name }))
    }
    not_this_shape!(seq);
    not_this_shape!(scalars);
}
