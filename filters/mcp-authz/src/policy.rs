//! The policy engine: compiled rules and their evaluation.
//!
//! Evaluation order for one call (method + target + arguments, by one identity):
//! 1. every `deny` rule, in configuration order: the first that matches denies (its `answer`, else
//!    `policy.deny_answer`);
//! 2. every `allow` rule, in configuration order: the first that matches allows;
//! 3. `policy.builtin_allow` method globs: allow, reported as rule `builtin`;
//! 4. `policy.default` (deny unless configured), reported as rule `default`.
//!
//! A rule matches when ALL its non-empty matchers match: protocol, any method glob, any target glob
//! (a call without a target never matches a rule with `targets`), every identity matcher, every argument
//! matcher. List filtering and agent cards evaluate each item as a call without arguments: deny rules
//! that have argument matchers are skipped (they deny only some calls), allow rules with argument
//! matchers count as matching (some calls are allowed), so an item is shown if some call may succeed.

use crate::config::{ArgMatcherConfig, ClaimMatcherConfig, DenyAnswer, Effect, PolicyConfig, Protocol};
use crate::identity::Identity;
use meshwarden_shared::config::{glob_match, ConfigError};
use serde_json::Value;

/// One authorizable call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call<'a> {
    pub protocol: Protocol,
    pub method: &'a str,
    /// Every name of an A2A method across protocol versions (rules match any); empty otherwise.
    pub method_names: &'a [&'a str],
    pub target: Option<&'a str>,
    /// Root of argument paths; `None` when evaluating a list item (arguments unknown).
    pub arguments: Option<&'a Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Name of the deciding rule, `builtin` or `default`.
    pub rule: String,
    pub answer: DenyAnswer,
}

/// A glob compiled once: the common shapes (`*`, exact, `prefix*`, `*suffix`, `*part*`) avoid the general
/// matcher, which matters when a list answer evaluates every item against every rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Glob {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    General(String),
}

impl Glob {
    pub fn new(p: &str) -> Glob {
        if p.contains('?') {
            return Glob::General(p.to_string());
        }
        let stars = p.matches('*').count();
        let inner = |s: &str| s.to_string();
        match stars {
            0 => Glob::Exact(inner(p)),
            _ if p.chars().all(|c| c == '*') => Glob::Any,
            1 if p.ends_with('*') => Glob::Prefix(inner(p.trim_end_matches('*'))),
            1 if p.starts_with('*') => Glob::Suffix(inner(p.trim_start_matches('*'))),
            2 if p.len() > 2 && p.starts_with('*') && p.ends_with('*') => Glob::Contains(inner(p.trim_matches('*'))),
            _ => Glob::General(p.to_string()),
        }
    }

    pub fn matches(&self, t: &str) -> bool {
        match self {
            Glob::Any => true,
            Glob::Exact(e) => t == e,
            Glob::Prefix(p) => t.starts_with(p.as_str()),
            Glob::Suffix(s) => t.ends_with(s.as_str()),
            Glob::Contains(c) => t.contains(c.as_str()),
            Glob::General(g) => glob_match(g, t),
        }
    }
}

#[derive(Debug)]
enum ClaimOp {
    Equals(Value),
    OneOf(Vec<Value>),
    Contains(String),
    Glob(Glob),
    Present(bool),
}

#[derive(Debug)]
struct ClaimMatcher {
    claim: String,
    op: ClaimOp,
}

#[derive(Debug)]
enum ArgOp {
    Equals(Value),
    OneOf(Vec<Value>),
    Regex(regex_lite::Regex),
    Range(Option<f64>, Option<f64>),
    Present(bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
    /// `[*]`: every element of a list (see [`ArgMatcher::matches`]).
    Each,
}

#[derive(Debug)]
struct ArgMatcher {
    path: Vec<Segment>,
    op: ArgOp,
}

#[derive(Debug)]
struct Rule {
    name: String,
    answer: Option<DenyAnswer>,
    protocol: Option<Protocol>,
    methods: Vec<Glob>,
    targets: Vec<Glob>,
    identity: Vec<ClaimMatcher>,
    arguments: Vec<ArgMatcher>,
    /// Deny rules fail closed on an argument a matcher cannot read as its type (see [`ArgMatcher::matches`]).
    deny: bool,
}

#[derive(Debug)]
pub struct Policy {
    deny: Vec<Rule>,
    allow: Vec<Rule>,
    builtin: Vec<Glob>,
    default: Effect,
    deny_answer: DenyAnswer,
    /// Whether a rule's identity matcher reads the `spiffe` claim (worked out once: the adapter reads the
    /// peer certificate only when something uses it).
    reads_spiffe: bool,
}

impl Default for Policy {
    fn default() -> Self {
        // Infallible for the default config (no rules); fall back to deny-all if that ever changed.
        Policy::compile(&PolicyConfig::default()).unwrap_or(Policy {
            deny: Vec::new(),
            allow: Vec::new(),
            builtin: Vec::new(),
            default: Effect::Deny,
            deny_answer: DenyAnswer::Hide,
            reads_spiffe: false,
        })
    }
}

/// Parse an argument path: keys separated by `.`, list indexes as `[n]`, every element as `[*]`:
/// `a.b[0].c`, `[2]`, `to[*]`, `items[*].id`.
pub fn parse_path(path: &str) -> Result<Vec<Segment>, String> {
    let mut out = Vec::new();
    let mut rest = path;
    if rest.is_empty() {
        return Err("empty path".into());
    }
    let mut expect_key = true;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or("unclosed [")?;
            let inner = r.get(..end).unwrap_or("");
            if inner == "*" {
                out.push(Segment::Each);
            } else {
                let idx = inner.parse::<usize>().map_err(|_| "index must be a number or *")?;
                out.push(Segment::Index(idx));
            }
            rest = r.get(end + 1..).unwrap_or("");
            expect_key = false;
            if let Some(r) = rest.strip_prefix('.') {
                rest = r;
                expect_key = true;
                if rest.is_empty() {
                    return Err("trailing .".into());
                }
            }
            continue;
        }
        if !expect_key {
            return Err("expected . or [ after ]".into());
        }
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let key = rest.get(..end).unwrap_or("");
        if key.is_empty() {
            return Err("empty key".into());
        }
        out.push(Segment::Key(key.to_string()));
        rest = rest.get(end..).unwrap_or("");
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
            if rest.is_empty() {
                return Err("trailing .".into());
            }
        } else {
            expect_key = false;
        }
    }
    Ok(out)
}

/// JSON equality where numbers compare by value (1 == 1.0).
pub fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn one_op<T>(path: &str, ops: Vec<Option<T>>, names: &str) -> Result<T, ConfigError> {
    let mut set: Vec<T> = ops.into_iter().flatten().collect();
    if set.len() != 1 {
        return Err(ConfigError::at(path, format!("exactly one of {names} is required")));
    }
    set.pop().ok_or_else(|| ConfigError::at(path, "no operator"))
}

fn compile_claim(path: &str, c: &ClaimMatcherConfig) -> Result<ClaimMatcher, ConfigError> {
    if c.claim.is_empty() {
        return Err(ConfigError::at(&format!("{path}.claim"), "must not be empty"));
    }
    let op = one_op(
        path,
        vec![
            c.equals.clone().map(ClaimOp::Equals),
            c.one_of.clone().map(ClaimOp::OneOf),
            c.contains.clone().map(ClaimOp::Contains),
            c.glob.as_deref().map(|g| ClaimOp::Glob(Glob::new(g))),
            c.present.map(ClaimOp::Present),
        ],
        "equals, one_of, contains, glob, present",
    )?;
    Ok(ClaimMatcher { claim: c.claim.clone(), op })
}

fn compile_arg(path: &str, a: &ArgMatcherConfig) -> Result<ArgMatcher, ConfigError> {
    let segs = parse_path(&a.path).map_err(|e| ConfigError::at(&format!("{path}.path"), e))?;
    let regex = match &a.regex {
        Some(r) => {
            Some(regex_lite::Regex::new(r).map_err(|e| ConfigError::at(&format!("{path}.regex"), e.to_string()))?)
        }
        None => None,
    };
    let range = if a.min.is_some() || a.max.is_some() {
        if let (Some(lo), Some(hi)) = (a.min, a.max) {
            if lo > hi {
                return Err(ConfigError::at(&format!("{path}.min"), "min is greater than max"));
            }
        }
        Some(ArgOp::Range(a.min, a.max))
    } else {
        None
    };
    let op = one_op(
        path,
        vec![
            a.equals.clone().map(ArgOp::Equals),
            a.one_of.clone().map(ArgOp::OneOf),
            regex.map(ArgOp::Regex),
            range,
            a.present.map(ArgOp::Present),
        ],
        "equals, one_of, regex, min/max, present",
    )?;
    Ok(ArgMatcher { path: segs, op })
}

impl Policy {
    pub fn compile(cfg: &PolicyConfig) -> Result<Policy, ConfigError> {
        let mut deny = Vec::new();
        let mut allow = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in cfg.rules.iter().enumerate() {
            let base = format!("policy.rules[{i}]");
            const RESERVED: &[&str] = &[
                "builtin",
                "default",
                "uri-dot-segments",
                "session-binding",
                "unknown-session",
                "task-binding",
                "event-id-binding",
            ];
            if r.name.is_empty() || RESERVED.contains(&r.name.as_str()) {
                return Err(ConfigError::at(
                    &format!("{base}.name"),
                    "must be non-empty and not `builtin`, `default`, `uri-dot-segments`, `session-binding`, \
                     `unknown-session`, `task-binding`, `event-id-binding` or `context-binding`",
                ));
            }
            if !names.insert(r.name.clone()) {
                return Err(ConfigError::at(&format!("{base}.name"), format!("duplicate rule name {:?}", r.name)));
            }
            if r.effect == Effect::Allow && r.answer.is_some() {
                return Err(ConfigError::at(&format!("{base}.answer"), "only deny rules have an answer"));
            }
            let identity = r
                .identity
                .iter()
                .enumerate()
                .map(|(j, c)| compile_claim(&format!("{base}.identity[{j}]"), c))
                .collect::<Result<Vec<_>, _>>()?;
            let arguments = r
                .arguments
                .iter()
                .enumerate()
                .map(|(j, a)| compile_arg(&format!("{base}.arguments[{j}]"), a))
                .collect::<Result<Vec<_>, _>>()?;
            let rule = Rule {
                name: r.name.clone(),
                answer: r.answer,
                protocol: r.protocol,
                methods: r.methods.iter().map(|g| Glob::new(g)).collect(),
                targets: r.targets.iter().map(|g| Glob::new(g)).collect(),
                identity,
                arguments,
                deny: r.effect == Effect::Deny,
            };
            match r.effect {
                Effect::Deny => deny.push(rule),
                Effect::Allow => allow.push(rule),
            }
        }
        let reads_spiffe = deny
            .iter()
            .chain(allow.iter())
            .flat_map(|r| r.identity.iter())
            .any(|m| crate::identity::is_spiffe_claim(&m.claim));
        Ok(Policy {
            reads_spiffe,
            deny,
            allow,
            builtin: cfg.builtin_allow.iter().map(|g| Glob::new(g)).collect(),
            default: cfg.default,
            deny_answer: cfg.deny_answer,
        })
    }

    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.deny.iter().chain(self.allow.iter()).map(|r| r.name.as_str())
    }

    /// Whether any rule's identity matcher reads the `spiffe` claim or a path inside it.
    pub fn reads_spiffe(&self) -> bool {
        self.reads_spiffe
    }

    pub fn rule_count(&self) -> usize {
        self.deny.len() + self.allow.len()
    }

    /// The rules whose identity matchers hold for `id` (computed once per request or list answer).
    pub fn view<'p>(&'p self, id: &Identity) -> View<'p> {
        View {
            policy: self,
            deny: self.deny.iter().filter(|r| r.identity.iter().all(|m| m.matches(id))).collect(),
            allow: self.allow.iter().filter(|r| r.identity.iter().all(|m| m.matches(id))).collect(),
        }
    }

    /// One call's decision: the same as `self.view(id).evaluate(call)`, with each rule's call matchers
    /// (usually a glob that fails on the first byte) tried before its identity matchers and no view built.
    pub fn evaluate(&self, id: &Identity, call: &Call) -> Decision {
        let applies = |r: &&Rule| r.matches_call(call) && r.identity.iter().all(|m| m.matches(id));
        let listing = call.arguments.is_none();
        if let Some(r) = self.deny.iter().filter(|r| !listing || r.arguments.is_empty()).find(applies) {
            return Decision { allowed: false, rule: r.name.clone(), answer: r.answer.unwrap_or(self.deny_answer) };
        }
        if let Some(r) = self.allow.iter().find(applies) {
            return Decision { allowed: true, rule: r.name.clone(), answer: self.deny_answer };
        }
        self.no_rule_applies(call)
    }

    /// The decision when no rule applies: the built-in methods, then the default.
    fn no_rule_applies(&self, call: &Call) -> Decision {
        if self.builtin.iter().any(|g| method_matches(g, call)) {
            return Decision { allowed: true, rule: "builtin".into(), answer: self.deny_answer };
        }
        Decision { allowed: self.default == Effect::Allow, rule: "default".into(), answer: self.deny_answer }
    }
}

/// A policy seen by one identity.
#[derive(Debug)]
pub struct View<'p> {
    policy: &'p Policy,
    deny: Vec<&'p Rule>,
    allow: Vec<&'p Rule>,
}

impl View<'_> {
    pub fn evaluate(&self, call: &Call) -> Decision {
        let p = self.policy;
        let listing = call.arguments.is_none();
        for r in &self.deny {
            if listing && !r.arguments.is_empty() {
                continue;
            }
            if r.matches_call(call) {
                return Decision { allowed: false, rule: r.name.clone(), answer: r.answer.unwrap_or(p.deny_answer) };
            }
        }
        for r in &self.allow {
            if r.matches_call(call) {
                return Decision { allowed: true, rule: r.name.clone(), answer: p.deny_answer };
            }
        }
        p.no_rule_applies(call)
    }

    /// Only whether the call is allowed (no rule name allocated): the list-filtering hot path.
    pub fn allows(&self, call: &Call) -> bool {
        let listing = call.arguments.is_none();
        if self.deny.iter().any(|r| (!listing || r.arguments.is_empty()) && r.matches_call(call)) {
            return false;
        }
        self.allow.iter().any(|r| r.matches_call(call))
            || self.policy.builtin.iter().any(|g| method_matches(g, call))
            || self.policy.default == Effect::Allow
    }
}

fn method_matches(glob: &Glob, call: &Call) -> bool {
    glob.matches(call.method) || call.method_names.iter().any(|a| glob.matches(a))
}

impl Rule {
    /// Everything but the identity matchers (see [`Policy::view`]).
    fn matches_call(&self, call: &Call) -> bool {
        if self.protocol.is_some_and(|p| p != call.protocol) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|g| method_matches(g, call)) {
            return false;
        }
        if !self.targets.is_empty() {
            match call.target {
                Some(t) if self.targets.iter().any(|g| g.matches(t)) => {}
                _ => return false,
            }
        }
        match call.arguments {
            // Listing: argument matchers are satisfiable by some call.
            None => true,
            Some(args) => {
                let proto_names = call.protocol == Protocol::A2a;
                self.arguments.iter().all(|m| m.matches(args, self.deny, proto_names))
            }
        }
    }
}

fn scalar_string(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl ClaimMatcher {
    fn matches(&self, id: &Identity) -> bool {
        let v = id.claim(&self.claim);
        match &self.op {
            ClaimOp::Present(p) => v.is_some_and(|v| !v.is_null()) == *p,
            ClaimOp::Equals(want) => v.is_some_and(|v| json_eq(v, want)),
            ClaimOp::OneOf(set) => v.is_some_and(|v| set.iter().any(|w| json_eq(v, w))),
            // A list claim contains the element; a string claim contains it as a space-separated token
            // (OAuth `scope`).
            ClaimOp::Contains(want) => match v {
                Some(Value::Array(items)) => items.iter().any(|i| scalar_string(i).as_deref() == Some(want)),
                Some(Value::String(s)) => s.split_whitespace().any(|t| t == want),
                _ => false,
            },
            ClaimOp::Glob(g) => match v {
                Some(Value::Array(items)) => items.iter().any(|i| scalar_string(i).is_some_and(|s| g.matches(&s))),
                Some(other) => scalar_string(other).is_some_and(|s| g.matches(&s)),
                None => false,
            },
        }
    }
}

impl ArgMatcher {
    /// Whether the call's arguments satisfy this matcher, reading them the way a lax-validating tool
    /// server does (Pydantic/FastMCP, zod `coerce`): `"5000"` is the number 5000 to the tool, `"true"` the
    /// boolean, and a string holding a JSON object is that object (FastMCP's `pre_parse_json`). Comparing
    /// raw JSON types instead would let `{"limit": "5000"}` past a deny rule on `limit >= 101`.
    ///
    /// A value that is present but cannot be read as the matcher's type (`min` on `"abc"`, `regex` on an
    /// object) counts as a match in a deny rule and as no match in an allow rule: both fail closed.
    ///
    /// `proto_names` (A2A): a key found only under its other protobuf JSON spelling (`context_id` for
    /// `contextId`, which the a2a-sdk's `ParseDict` reads alike) is unclear in the same way.
    ///
    /// A path with `[*]` reaches every element of a list: a deny rule's matcher matches when **any**
    /// element matches (one external recipient denies), an allow rule's when **every** element matches
    /// (all recipients must be internal; an empty list qualifies, a missing one does not). A value at
    /// `[*]` that is not a list is unreadable (matches in a deny rule only).
    fn matches(&self, args: &Value, deny: bool, proto_names: bool) -> bool {
        if self.path.contains(&Segment::Each) {
            let mut reached = Vec::new();
            lookup_each(args, &self.path, proto_names, &mut reached);
            return if deny {
                reached.into_iter().any(|l| self.matches_value(l, deny))
            } else {
                reached.into_iter().all(|l| self.matches_value(l, deny))
            };
        }
        self.matches_value(lookup(args, &self.path, proto_names), deny)
    }

    /// One value a path reached, as [`ArgMatcher::matches`] describes.
    fn matches_value(&self, found: Lookup<'_>, deny: bool) -> bool {
        let v = match found {
            Lookup::Found(v) => v,
            Lookup::Missing => return matches!(self.op, ArgOp::Present(false)),
            // `{"Amount": 5000}` for `amount`: a Go server (case-insensitive keys) reads 5000 there.
            Lookup::Unclear => return deny,
        };
        let v = v.as_ref();
        match &self.op {
            ArgOp::Present(p) => v.is_null() != *p,
            ArgOp::Equals(want) => lax_eq(v, want),
            ArgOp::OneOf(set) => set.iter().any(|w| lax_eq(v, w)),
            ArgOp::Regex(re) => match v {
                Value::String(s) => re.is_match(s),
                Value::Number(_) | Value::Bool(_) => scalar_string(v).is_some_and(|s| re.is_match(&s)),
                Value::Null => false,
                _ => deny,
            },
            ArgOp::Range(lo, hi) => match lax_number(v) {
                Some(n) => lo.is_none_or(|lo| n >= lo) && hi.is_none_or(|hi| n <= hi),
                None => deny && !v.is_null(),
            },
        }
    }
}

/// What an argument path finds.
enum Lookup<'a> {
    Found(std::borrow::Cow<'a, Value>),
    Missing,
    /// Missing as spelled, but an object on the way has a key that is the path's key to a
    /// case-insensitive parser ([`fold_eq`]): Go servers read `Amount` as `amount`.
    Unclear,
}

impl Lookup<'_> {
    fn into_owned(self) -> Lookup<'static> {
        match self {
            Lookup::Found(v) => Lookup::Found(std::borrow::Cow::Owned(v.into_owned())),
            Lookup::Missing => Lookup::Missing,
            Lookup::Unclear => Lookup::Unclear,
        }
    }
}

/// Every value a path with `[*]` reaches (one [`Lookup`] per element; a list that is missing or `null`
/// gives one `Missing`, a value that is not a list one `Unclear`). A string holding a JSON list is that
/// list, as everywhere on a path.
fn lookup_each(root: &Value, path: &[Segment], proto_names: bool, out: &mut Vec<Lookup<'static>>) {
    let Some(at) = path.iter().position(|s| *s == Segment::Each) else {
        out.push(lookup(root, path, proto_names).into_owned());
        return;
    };
    let (prefix, rest) = (path.get(..at).unwrap_or_default(), path.get(at + 1..).unwrap_or_default());
    let list = match lookup(root, prefix, proto_names) {
        Lookup::Found(v) => v,
        other => return out.push(other.into_owned()),
    };
    let parsed;
    let list = match list.as_ref() {
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Array(_)) => {
                parsed = v;
                &parsed
            }
            _ => return out.push(Lookup::Unclear),
        },
        v => v,
    };
    match list {
        Value::Array(items) => items.iter().for_each(|item| lookup_each(item, rest, proto_names, out)),
        Value::Null => out.push(Lookup::Missing),
        _ => out.push(Lookup::Unclear),
    }
}

/// The value at `path`, stepping into a string that holds a JSON object or array as into that value.
/// A string that opens like one but that serde_json refuses is unclear: FastMCP's `pre_parse_json` reads
/// it with Python's `json.loads`, which also takes `NaN`, `Infinity`, numbers beyond a double (`1e400`),
/// lone surrogate escapes and nesting deeper than 128, so `"{\"limit\": 5000, \"x\": NaN}"` is the object
/// `{limit: 5000}` to the tool (the unknown `x` dropped by its model).
fn lookup<'a>(root: &'a Value, path: &[Segment], proto_names: bool) -> Lookup<'a> {
    use std::borrow::Cow;
    let mut cur: Cow<'a, Value> = Cow::Borrowed(root);
    for seg in path {
        if let Value::String(s) = cur.as_ref() {
            match serde_json::from_str::<Value>(s) {
                Ok(parsed @ (Value::Object(_) | Value::Array(_))) => cur = Cow::Owned(parsed),
                Err(_) if s.trim_start().starts_with(['{', '[']) => return Lookup::Unclear,
                _ => return Lookup::Missing,
            }
        }
        if let (Segment::Key(k), Value::Object(m)) = (seg, cur.as_ref()) {
            if !m.contains_key(k.as_str()) {
                let proto_fold = |s: &str| fold_key(s).replace('_', "");
                let unclear = m.keys().any(|key| fold_eq(key, k) || (proto_names && proto_fold(key) == proto_fold(k)));
                return if unclear { Lookup::Unclear } else { Lookup::Missing };
            }
        }
        let next = match cur {
            Cow::Borrowed(v) => match seg {
                Segment::Key(k) => v.get(k.as_str()).map(Cow::Borrowed),
                Segment::Index(i) => v.get(*i).map(Cow::Borrowed),
                Segment::Each => None,
            },
            Cow::Owned(v) => match seg {
                Segment::Key(k) => v.get(k.as_str()).cloned().map(Cow::Owned),
                Segment::Index(i) => v.get(*i).cloned().map(Cow::Owned),
                Segment::Each => None,
            },
        };
        match next {
            Some(n) => cur = n,
            None => return Lookup::Missing,
        }
    }
    Lookup::Found(cur)
}

/// Keys as Go's `encoding/json` matches them (shared: pii-redactor refuses the same bodies).
pub use meshwarden_shared::json::{go_fold_eq as fold_eq, go_fold_key as fold_key};

/// A number as a lax validator reads it: a JSON number, a boolean (1/0), or a string holding a finite
/// decimal number (surrounding blanks, `_` digit separators, `0x`/`0o`/`0b` integers allowed).
fn lax_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        Value::String(s) => number_in_string(s),
        _ => None,
    }
}

fn number_in_string(s: &str) -> Option<f64> {
    let t = s.trim();
    let (neg, body) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let lower = body.to_ascii_lowercase();
    let radix = [("0x", 16), ("0o", 8), ("0b", 2)].into_iter().find_map(|(p, r)| Some((lower.strip_prefix(p)?, r)));
    let n = match radix {
        Some((digits, r)) => i128::from_str_radix(&digits.replace('_', ""), r).ok()? as f64,
        None => {
            // `_` only between digits, as Python's int()/float() accept it.
            let separators_ok = !body.starts_with('_')
                && !body.ends_with('_')
                && body.as_bytes().windows(3).all(|w| match w {
                    [a, b'_', c] => a.is_ascii_digit() && c.is_ascii_digit(),
                    _ => true,
                });
            if !separators_ok || !body.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
                return None;
            }
            body.replace('_', "").parse::<f64>().ok()?
        }
    };
    n.is_finite().then_some(if neg { -n } else { n })
}

/// A boolean in a string, as Pydantic's lax mode reads it.
fn bool_in_string(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "t" | "yes" | "y" | "on" | "1" => Some(true),
        "false" | "f" | "no" | "n" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// Equality after the coercions a lax-validating server applies (see [`ArgMatcher::matches`]).
fn lax_eq(v: &Value, want: &Value) -> bool {
    if json_eq(v, want) {
        return true;
    }
    match (v, want) {
        (Value::String(s), Value::Number(w)) | (Value::Number(w), Value::String(s)) => {
            number_in_string(s).is_some_and(|n| Some(n) == w.as_f64())
        }
        (Value::Bool(b), Value::Number(n)) | (Value::Number(n), Value::Bool(b)) => {
            n.as_f64() == Some(if *b { 1.0 } else { 0.0 })
        }
        (Value::String(s), Value::Bool(b)) | (Value::Bool(b), Value::String(s)) => bool_in_string(s) == Some(*b),
        (Value::String(s), Value::Object(_) | Value::Array(_)) => {
            serde_json::from_str::<Value>(s).is_ok_and(|parsed| !parsed.is_string() && lax_eq(&parsed, want))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use meshwarden_shared::config::parse_config;
    use serde_json::json;

    fn policy(v: Value) -> Policy {
        let cfg: Config = parse_config(json!({"policy": v}).to_string().as_bytes()).unwrap();
        Policy::compile(&cfg.policy).unwrap()
    }

    fn who(claims: Value) -> Identity {
        Identity::from_claims(claims.as_object().unwrap().clone())
    }

    fn tool<'a>(name: &'a str, args: &'a Value) -> Call<'a> {
        Call {
            protocol: Protocol::Mcp,
            method: "tools/call",
            method_names: &[],
            target: Some(name),
            arguments: Some(args),
        }
    }

    fn example() -> Policy {
        policy(json!({
            "rules": [
                {"name": "finance-tools", "effect": "allow", "methods": ["tools/call"], "targets": ["ledger_*"],
                 "identity": [{"claim": "groups", "contains": "finance"}]},
                {"name": "writers", "effect": "allow", "methods": ["tools/call"], "targets": ["*"],
                 "identity": [{"claim": "scope", "contains": "tools:write"}]},
                {"name": "readers", "effect": "allow", "methods": ["tools/call"], "targets": ["search", "get_*"]},
                {"name": "no-prod-delete", "effect": "deny", "answer": "forbid", "targets": ["delete_*"],
                 "arguments": [{"path": "env", "equals": "prod"}]},
                {"name": "small-pages", "effect": "deny", "targets": ["search"],
                 "arguments": [{"path": "options.limit", "min": 101}]},
                {"name": "no-interns", "effect": "deny", "identity": [{"claim": "role", "glob": "intern*"}]}
            ]
        }))
    }

    #[test]
    fn deny_wins_then_allow_then_default() {
        let p = example();
        let none = json!({});
        let alice = who(json!({"sub": "alice", "groups": ["finance"]}));
        assert_eq!(p.evaluate(&alice, &tool("ledger_read", &none)).rule, "finance-tools");
        assert!(p.evaluate(&alice, &tool("ledger_read", &none)).allowed);
        let d = p.evaluate(&alice, &tool("delete_row", &none));
        assert_eq!((d.allowed, d.rule.as_str()), (false, "default"));
        let bob = who(json!({"sub": "bob", "scope": "tools:read tools:write"}));
        assert!(p.evaluate(&bob, &tool("delete_row", &json!({"env": "dev"}))).allowed);
        let d = p.evaluate(&bob, &tool("delete_row", &json!({"env": "prod"})));
        assert_eq!((d.allowed, d.rule.as_str(), d.answer), (false, "no-prod-delete", DenyAnswer::Forbid));
        let intern = who(json!({"sub": "i", "role": "intern-2026", "scope": "tools:write"}));
        assert_eq!(p.evaluate(&intern, &tool("search", &none)).rule, "no-interns");
    }

    #[test]
    fn one_call_evaluation_equals_the_view() {
        // `evaluate` tries call matchers before identity matchers; the decision must be the view's.
        let p = example();
        let people = [
            who(json!({})),
            who(json!({"sub": "alice", "groups": ["finance"]})),
            who(json!({"sub": "bob", "scope": "tools:read tools:write"})),
            who(json!({"sub": "i", "role": "intern-2026", "scope": "tools:write"})),
        ];
        let args = [json!({}), json!({"env": "prod"}), json!({"options": {"limit": 500}}), json!({"env": "dev"})];
        let mut seen = std::collections::BTreeSet::new();
        for id in &people {
            for name in ["ledger_read", "delete_row", "search", "get_x", "other"] {
                for a in &args {
                    let call = tool(name, a);
                    let listing = Call { arguments: None, ..tool(name, a) };
                    for c in [&call, &listing] {
                        let d = p.evaluate(id, c);
                        assert_eq!(d, p.view(id).evaluate(c), "{name} {a} {id:?}");
                        seen.insert(d.rule);
                    }
                }
            }
        }
        assert_eq!(seen.len(), 7, "every rule and the default reached: {seen:?}");
    }

    #[test]
    fn argument_rules() {
        let p = example();
        let anyone = who(json!({}));
        assert!(p.evaluate(&anyone, &tool("search", &json!({"options": {"limit": 100}}))).allowed);
        assert_eq!(p.evaluate(&anyone, &tool("search", &json!({"options": {"limit": 101.5}}))).rule, "small-pages");
        // Lax servers read "999" as 999: the deny rule must too, whatever the argument's JSON type.
        for limit in [json!("999"), json!(" 1_000 "), json!("0x3e8"), json!("abc"), json!({"n": 1}), json!("1e3")] {
            let d = p.evaluate(&anyone, &tool("search", &json!({"options": {"limit": limit}})));
            assert_eq!(d.rule, "small-pages", "{limit}");
        }
        let d = p.evaluate(&anyone, &tool("search", &json!({"options": "{\"limit\": 5000}"})));
        assert_eq!(d.rule, "small-pages", "options sent as a JSON string");
        // JSON that Python's json.loads reads (FastMCP pre-parses such strings with it) and serde_json
        // refuses: present but unreadable, so the deny rule holds (an allow rule would not allow).
        for options in [
            r#"{"limit": 5000, "x": NaN}"#,
            r#"{"limit": 5000, "x": -Infinity}"#,
            r#"{"limit": 5000, "x": 1e400}"#,
            r#"{"limit": 5000, "x": "\ud800"}"#,
            r#" [{"limit": 5000}, NaN]"#,
        ] {
            let d = p.evaluate(&anyone, &tool("search", &json!({ "options": options })));
            assert_eq!(d.rule, "small-pages", "options {options}");
        }
        let deep = format!(r#"{{"limit": 5000, "x": {}{}}}"#, "[".repeat(200), "]".repeat(200));
        assert_eq!(p.evaluate(&anyone, &tool("search", &json!({ "options": deep }))).rule, "small-pages");
        assert!(p.evaluate(&anyone, &tool("search", &json!({"options": "not json"}))).allowed, "a plain string");
        assert!(p.evaluate(&anyone, &tool("search", &json!({"options": {"limit": "100"}}))).allowed);
        assert!(p.evaluate(&anyone, &tool("search", &json!({"options": {"limit": null}}))).allowed);
        assert_eq!(p.evaluate(&anyone, &tool("delete_row", &json!({"env": "prod"}))).rule, "no-prod-delete");
        let p2 = policy(json!({"rules": [
            {"name": "paths", "effect": "allow", "targets": ["read_file"],
             "arguments": [{"path": "path", "regex": "^/public/[a-z]+$"}, {"path": "mode", "one_of": ["r", "ro"]}]},
            {"name": "first-item", "effect": "allow", "targets": ["batch"], "arguments": [{"path": "items[0].id", "equals": 7}]}
        ]}));
        assert!(p2.evaluate(&anyone, &tool("read_file", &json!({"path": "/public/a", "mode": "r"}))).allowed);
        assert!(!p2.evaluate(&anyone, &tool("read_file", &json!({"path": "/etc/passwd", "mode": "r"}))).allowed);
        assert!(!p2.evaluate(&anyone, &tool("read_file", &json!({"path": "/public/a"}))).allowed, "missing argument");
        assert!(p2.evaluate(&anyone, &tool("batch", &json!({"items": [{"id": 7.0}]}))).allowed);
        assert!(p2.evaluate(&anyone, &tool("batch", &json!({"items": [{"id": "7"}]}))).allowed, "lax equality");
        assert!(p2.evaluate(&anyone, &tool("batch", &json!({"items": "[{\"id\": 7}]"}))).allowed);
        assert!(!p2.evaluate(&anyone, &tool("batch", &json!({"items": [{"id": "8"}]}))).allowed);
        // An allow rule fails closed on what it cannot read; a deny rule's regex on a non-string denies.
        assert!(!p2.evaluate(&anyone, &tool("read_file", &json!({"path": ["/public/a"], "mode": "r"}))).allowed);
        let p3 = policy(json!({"default": "allow", "rules": [
            {"name": "no-etc", "effect": "deny", "arguments": [{"path": "path", "regex": "^/etc"}]},
            {"name": "no-force", "effect": "deny", "arguments": [{"path": "force", "equals": true}]}
        ]}));
        assert_eq!(p3.evaluate(&anyone, &tool("read", &json!({"path": {"p": "/etc"}}))).rule, "no-etc");
        assert!(p3.evaluate(&anyone, &tool("read", &json!({"path": "/home"}))).allowed);
        for force in [json!("true"), json!(" Yes"), json!(1), json!("on")] {
            assert_eq!(p3.evaluate(&anyone, &tool("rm", &json!({"force": force}))).rule, "no-force", "{force}");
        }
        assert!(p3.evaluate(&anyone, &tool("rm", &json!({"force": "false"}))).allowed);
        assert!(!p2.evaluate(&anyone, &tool("batch", &json!({"items": []}))).allowed);
    }

    /// `[*]`: a deny rule matches when any element matches, an allow rule when every element does.
    #[test]
    fn every_element_paths() {
        let anyone = who(json!({}));
        let p = policy(json!({"rules": [
            {"name": "internal-only", "effect": "allow", "targets": ["send_email"],
             "arguments": [{"path": "to[*]", "regex": "^[^@]+@corp\\.example$"}]},
            {"name": "no-blocked", "effect": "deny", "targets": ["send_email"],
             "arguments": [{"path": "cc[*].address", "equals": "ceo@corp.example"}]},
            {"name": "small-items", "effect": "deny", "targets": ["order"], "arguments": [{"path": "items[*].qty", "min": 100}]},
            {"name": "orders", "effect": "allow", "targets": ["order"]}
        ]}));
        let send = |args: Value| p.evaluate(&anyone, &tool("send_email", &args));
        assert!(send(json!({"to": ["a@corp.example", "b@corp.example"]})).allowed);
        assert!(!send(json!({"to": ["a@corp.example", "x@evil.example"]})).allowed, "one external recipient");
        assert!(!send(json!({"to": ["x@evil.example", "a@corp.example"]})).allowed, "in any position");
        assert!(send(json!({"to": "[\"a@corp.example\"]"})).allowed, "a list sent as a JSON string");
        assert!(!send(json!({"to": "[\"a@corp.example\", \"x@evil.example\"]"})).allowed);
        assert!(send(json!({"to": []})).allowed, "an empty list: every element qualifies");
        assert!(!send(json!({})).allowed, "a missing list does not");
        assert!(!send(json!({"to": "a@corp.example"})).allowed, "not a list: unreadable, no allow");
        assert!(!send(json!({"to": ["a@corp.example", ["x@evil.example"]]})).allowed, "a nested list is unreadable");
        assert!(!send(json!({"to": ["a@corp.example", null]})).allowed);
        let with_cc = |cc: Value| send(json!({"to": ["a@corp.example"], "cc": cc}));
        assert!(with_cc(json!([{"address": "b@corp.example"}])).allowed);
        assert_eq!(with_cc(json!([{"address": "b@corp.example"}, {"address": "ceo@corp.example"}])).rule, "no-blocked");
        assert!(with_cc(json!([{"name": "no address"}])).allowed, "an element without the key does not deny");
        assert_eq!(
            with_cc(json!({"address": "ceo@corp.example"})).rule,
            "no-blocked",
            "not a list: unreadable, denies"
        );
        let order = |items: Value| p.evaluate(&anyone, &tool("order", &json!({"items": items})));
        assert!(order(json!([{"qty": 1}, {"qty": 99}])).allowed);
        assert_eq!(order(json!([{"qty": 1}, {"qty": "150"}])).rule, "small-items", "lax numbers per element");
        assert_eq!(order(json!([{"qty": 1}, {"qty": "lots"}])).rule, "small-items", "unreadable element denies");
        assert!(order(json!([])).allowed);
        // Nested lists: every element of every list.
        let nested = policy(json!({"rules": [{"name": "n", "effect": "allow",
            "arguments": [{"path": "groups[*].members[*]", "regex": "^u[0-9]+$"}]}]}));
        let call = |args: Value| nested.evaluate(&anyone, &tool("t", &args)).allowed;
        assert!(call(json!({"groups": [{"members": ["u1", "u2"]}, {"members": ["u3"]}]})));
        assert!(!call(json!({"groups": [{"members": ["u1"]}, {"members": ["u3", "root"]}]})));
        assert!(!call(json!({"groups": [{"members": ["u1"]}, {}]})), "a group without members");
    }

    #[test]
    fn listing_ignores_argument_only_denies() {
        let p = example();
        let bob = who(json!({"scope": "tools:write"}));
        let item = Call {
            protocol: Protocol::Mcp,
            method: "tools/call",
            method_names: &[],
            target: Some("delete_row"),
            arguments: None,
        };
        assert!(p.evaluate(&bob, &item).allowed);
        let intern = who(json!({"role": "intern", "scope": "tools:write"}));
        assert!(!p.evaluate(&intern, &item).allowed);
    }

    #[test]
    fn builtin_and_default_allow_and_a2a_aliases() {
        let p = policy(json!({"rules": [{"name": "no-list", "effect": "deny", "methods": ["tools/list"],
            "identity": [{"claim": "sub", "present": false}]},
            {"name": "a2a-send", "effect": "allow", "protocol": "a2a", "methods": ["SendMessage"]}]}));
        let anon = who(json!({}));
        let list = Call {
            protocol: Protocol::Mcp,
            method: "tools/list",
            method_names: &[],
            target: None,
            arguments: Some(&Value::Null),
        };
        assert_eq!(p.evaluate(&anon, &list).rule, "no-list");
        assert_eq!(p.evaluate(&who(json!({"sub": "x"})), &list).rule, "builtin");
        let send = Call {
            protocol: Protocol::A2a,
            method: "message/send",
            method_names: &["message/send", "SendMessage"],
            target: None,
            arguments: Some(&Value::Null),
        };
        assert_eq!(p.evaluate(&anon, &send).rule, "a2a-send");
        let as_mcp = Call { protocol: Protocol::Mcp, ..send.clone() };
        assert_eq!(p.evaluate(&anon, &as_mcp).rule, "default");
        let open = policy(json!({"default": "allow", "builtin_allow": []}));
        assert!(open.evaluate(&anon, &tool("x", &Value::Null)).allowed);
    }

    #[test]
    fn compiled_globs_agree_with_the_general_matcher() {
        let pats = ["*", "**", "", "abc", "abc*", "*abc", "*b*", "a*c", "a?c", "*a*b*", "tools/*", "é*"];
        let texts = ["", "abc", "abcd", "xabc", "xbx", "aXc", "ab", "tools/call", "éa", "a*b"];
        for p in pats {
            let g = Glob::new(p);
            for t in texts {
                assert_eq!(g.matches(t), glob_match(p, t), "{p:?} vs {t:?} ({g:?})");
            }
        }
    }

    #[test]
    fn paths() {
        assert_eq!(
            parse_path("a.b[2].c").unwrap(),
            vec![Segment::Key("a".into()), Segment::Key("b".into()), Segment::Index(2), Segment::Key("c".into())]
        );
        assert_eq!(parse_path("[0]").unwrap(), vec![Segment::Index(0)]);
        assert_eq!(
            parse_path("items[*].id").unwrap(),
            vec![Segment::Key("items".into()), Segment::Each, Segment::Key("id".into())]
        );
        for bad in ["", "a.", ".a", "a..b", "a[x]", "a[1", "a[0]b", "a[**]", "a[*"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn config_errors_name_the_field() {
        let err = parse_config::<Config>(
            br#"{"policy":{"rules":[{"name":"a","effect":"allow","arguments":[{"path":"x","regex":"("}]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "$.policy.rules[0].arguments[0].regex");
        let err = parse_config::<Config>(
            br#"{"policy":{"rules":[{"name":"a","effect":"allow","identity":[{"claim":"x","equals":1,"glob":"a"}]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "$.policy.rules[0].identity[0]");
        let err = parse_config::<Config>(
            br#"{"policy":{"rules":[{"name":"a","effect":"allow"},{"name":"a","effect":"deny"}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "$.policy.rules[1].name");
        let err = parse_config::<Config>(br#"{"policy":{"rules":[{"name":"a","effect":"maybe"}]}}"#).unwrap_err();
        assert_eq!(err.path, "$.policy.rules[0].effect");
        let err = parse_config::<Config>(
            br#"{"policy":{"rules":[{"name":"a","effect":"allow","arguments":[{"path":"a..b","present":true}]}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.path, "$.policy.rules[0].arguments[0].path");
        let err = parse_config::<Config>(br#"{"polcy":{}}"#).unwrap_err();
        assert_eq!(err.path, "$.polcy");
        for bad in ["0", "10001"] {
            let cfg = format!(r#"{{"stats_flush_interval_ms":{bad}}}"#);
            assert_eq!(parse_config::<Config>(cfg.as_bytes()).unwrap_err().path, "$.stats_flush_interval_ms");
        }
        assert!(parse_config::<Config>(br#"{"stats_flush_interval_ms":1000}"#).is_ok());
    }
}
