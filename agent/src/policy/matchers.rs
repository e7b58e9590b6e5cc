//! Rule matchers beyond method and path: `query`, `headers` and `json`, plus the anchored
//! regular expressions they (and `{name:REGEX}` path segments) use.
//!
//! Every matcher is compiled once, when the policy loads, and evaluated without I/O.
//! Matchers never put request values (header values, query values, body fields) into
//! failure messages: those may be secrets, and the messages end up in audit records.

use std::borrow::Cow;
use std::fmt;

use http::{HeaderMap, HeaderName};
use regex::Regex;
use serde_json::Value;

use super::body::{Decimal, JsonBody};
use super::decide::RuleFailure;
use super::error::{PolicyError, invalid};
use super::raw;

/// Most parameters a query may have when a rule constrains it.
const MAX_QUERY_PARAMS: usize = 256;

/// Request-controlled text in failure messages is cut to this many characters.
const CLIP: usize = 64;

/// `s`, cut to [`CLIP`] characters.
pub(crate) fn clip(s: &str) -> String {
    match s.char_indices().nth(CLIP) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

/// A regular expression that must match a whole value: compiled as `^(?:REGEX)$`.
#[derive(Clone, Debug)]
pub struct Pattern {
    source: Box<str>,
    regex: Regex,
}

impl Pattern {
    /// Compiles `source`; the error is the regex compiler's one-line message.
    pub fn new(source: &str) -> Result<Self, String> {
        if source.is_empty() {
            return Err("the regular expression is empty".to_owned());
        }
        // Compiled alone first, so that `a)|(b` cannot escape the anchoring group.
        Regex::new(source).map_err(|e| regex_message(&e))?;
        let regex = Regex::new(&format!("^(?:{source})$")).map_err(|e| regex_message(&e))?;
        Ok(Pattern {
            source: source.into(),
            regex,
        })
    }

    /// The expression as written (without the anchors).
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.regex.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The `error: ...` line of a regex error, without the prefix.
fn regex_message(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("error: "))
        .unwrap_or(text.trim())
        .to_owned()
}

/// A constraint on a textual value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ValueMatch {
    /// The value equals one of these exactly.
    OneOf(Box<[Box<str>]>),
    /// The whole value matches.
    Pattern(Pattern),
    /// The value equals none of these, compared ASCII case-insensitively (a deny-list errs
    /// on the side of refusing: `Admin` is refused by `not_one_of: [admin]`).
    NotOneOf(Box<[Box<str>]>),
    /// The whole value does not match.
    NotPattern(Pattern),
}

impl ValueMatch {
    /// Whether `v` satisfies the constraint.
    pub fn matches(&self, v: &str) -> bool {
        match self {
            ValueMatch::OneOf(values) => values.iter().any(|x| **x == *v),
            ValueMatch::Pattern(p) => p.is_match(v),
            ValueMatch::NotOneOf(values) => !values.iter().any(|x| x.eq_ignore_ascii_case(v)),
            ValueMatch::NotPattern(p) => !p.is_match(v),
        }
    }
}

impl fmt::Display for ValueMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |f: &mut fmt::Formatter<'_>, values: &[Box<str>]| {
            f.write_str("[")?;
            for (i, v) in values.iter().enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{v:?}")?;
            }
            f.write_str("]")
        };
        match self {
            ValueMatch::OneOf(values) => {
                f.write_str("one of ")?;
                list(f, values)
            }
            ValueMatch::Pattern(p) => write!(f, "pattern {p}"),
            ValueMatch::NotOneOf(values) => {
                f.write_str("none of ")?;
                list(f, values)
            }
            ValueMatch::NotPattern(p) => write!(f, "not pattern {p}"),
        }
    }
}

/// A value constraint and whether the parameter or header may be absent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueRule {
    /// What a present value must satisfy.
    pub matcher: ValueMatch,
    /// `optional: true`: absent is fine.
    pub optional: bool,
}

/// Validates `{one_of | pattern | not_one_of | not_pattern, optional}`; error paths are
/// relative to the map.
#[allow(
    clippy::result_large_err,
    reason = "built once per policy load, like the TryFrom impls"
)]
fn value_rule(raw: raw::ValueRule) -> Result<ValueRule, PolicyError> {
    let optional = raw.optional.unwrap_or(false);
    let given: Vec<&str> = [
        raw.one_of.as_ref().map(|_| "one_of"),
        raw.pattern.as_ref().map(|_| "pattern"),
        raw.not_one_of.as_ref().map(|_| "not_one_of"),
        raw.not_pattern.as_ref().map(|_| "not_pattern"),
    ]
    .into_iter()
    .flatten()
    .collect();
    match given.as_slice() {
        [] => {
            return Err(invalid!(InvalidMatcher {
                path: String::new(),
                reason: "needs `one_of`, `pattern`, `not_one_of` or `not_pattern`".to_owned(),
            }));
        }
        [_] => {}
        [first, second, ..] => {
            return Err(invalid!(InvalidMatcher {
                path: (*second).to_owned(),
                reason: format!("give either `{first}` or `{second}`, not both"),
            }));
        }
    }
    let list = |values: Vec<raw::Scalar>, key: &str| {
        if values.is_empty() {
            return Err(invalid!(InvalidMatcher {
                path: key.to_owned(),
                reason: format!("`{key}` needs at least one value"),
            }));
        }
        Ok(values
            .into_iter()
            .map(|v| v.0.into_boxed_str())
            .collect::<Box<[Box<str>]>>())
    };
    let regex = |p: String, key: &str| {
        Pattern::new(&p).map_err(|reason| {
            invalid!(InvalidRegex {
                path: key.to_owned(),
                value: p,
                reason,
            })
        })
    };
    let matcher = if let Some(values) = raw.one_of {
        ValueMatch::OneOf(list(values, "one_of")?)
    } else if let Some(p) = raw.pattern {
        ValueMatch::Pattern(regex(p, "pattern")?)
    } else if let Some(values) = raw.not_one_of {
        ValueMatch::NotOneOf(list(values, "not_one_of")?)
    } else if let Some(p) = raw.not_pattern {
        ValueMatch::NotPattern(regex(p, "not_pattern")?)
    } else {
        unreachable!("one matcher key was given")
    };
    Ok(ValueRule { matcher, optional })
}

// ---------------------------------------------------------------------------------------
// Query.
// ---------------------------------------------------------------------------------------

/// One `query:` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QueryConstraint {
    /// `any`: absent, or present with any value.
    Any,
    /// `absent`: must not be present.
    Absent,
    /// `present`: must be present, any value.
    Present,
    /// `{one_of}` / `{pattern}` / `{not_one_of}` / `{not_pattern}`: every occurrence must
    /// match; must be present unless `optional: true`.
    Value(ValueRule),
}

/// A rule's `query` and `query_repeat`: the complete list of allowed parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueryRules {
    params: Vec<(Box<str>, QueryConstraint)>,
    repeat: Vec<Box<str>>,
}

/// A parsed query: decoded `(name, value)` pairs in order.
pub(crate) type QueryPairs<'a> = Vec<(Cow<'a, str>, Cow<'a, str>)>;

impl QueryRules {
    /// The parameters and their constraints, in file order.
    pub fn params(&self) -> impl Iterator<Item = (&str, &QueryConstraint)> {
        self.params.iter().map(|(n, c)| (&**n, c))
    }

    /// Checks a parsed query.
    pub(crate) fn check(&self, pairs: &QueryPairs<'_>) -> Result<(), RuleFailure> {
        let mut counts = vec![0u32; self.params.len()];
        for (name, value) in pairs {
            let Some(at) = self.params.iter().position(|(n, _)| **n == **name) else {
                return Err(RuleFailure::QueryParamNotAllowed { name: clip(name) });
            };
            let constraint = &self.params[at].1;
            if *constraint == QueryConstraint::Absent {
                return Err(RuleFailure::QueryParamNotAllowed { name: clip(name) });
            }
            counts[at] += 1;
            if counts[at] > 1 && !self.repeat.iter().any(|r| **r == **name) {
                return Err(RuleFailure::QueryParamRepeated { name: clip(name) });
            }
            if let QueryConstraint::Value(rule) = constraint
                && !rule.matcher.matches(value)
            {
                return Err(RuleFailure::QueryValueNotAllowed {
                    name: clip(name),
                    expected: rule.matcher.to_string(),
                });
            }
        }
        for ((name, constraint), count) in self.params.iter().zip(&counts) {
            let required = match constraint {
                QueryConstraint::Present => true,
                QueryConstraint::Value(rule) => !rule.optional,
                QueryConstraint::Any | QueryConstraint::Absent => false,
            };
            if *count == 0 && required {
                return Err(RuleFailure::QueryParamRequired {
                    name: name.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// Validates `query` (and `query_repeat`); error paths are relative to the rule.
pub(crate) fn query_rules(
    query: Option<raw::OrderedMap<raw::QueryRule>>,
    repeat: Option<Vec<String>>,
    errors: &mut Vec<PolicyError>,
) -> Option<QueryRules> {
    let Some(query) = query else {
        if repeat.is_some() {
            errors.push(invalid!(InvalidMatcher {
                path: "query_repeat".to_owned(),
                reason: "`query_repeat` needs a `query` that lists the parameters".to_owned(),
            }));
        }
        return None;
    };
    let mut params = Vec::with_capacity(query.0.len());
    for (name, rule) in query.0 {
        let path = format!("query.{name}");
        if name.is_empty() {
            errors.push(invalid!(InvalidMatcher {
                path: path.clone(),
                reason: "a query parameter name must not be empty".to_owned(),
            }));
        }
        let constraint = match rule {
            raw::QueryRule::Any => QueryConstraint::Any,
            raw::QueryRule::Absent => QueryConstraint::Absent,
            raw::QueryRule::Present => QueryConstraint::Present,
            raw::QueryRule::Value(v) => match value_rule(v) {
                Ok(rule) => QueryConstraint::Value(rule),
                Err(e) => {
                    errors.push(e.nested(&path));
                    continue;
                }
            },
        };
        params.push((name.into_boxed_str(), constraint));
    }
    let mut repeats: Vec<Box<str>> = Vec::new();
    for (i, name) in repeat.unwrap_or_default().into_iter().enumerate() {
        let listed = params.iter().find(|(n, _)| **n == *name);
        let reason = match listed {
            None => format!("{name:?} is not listed in `query`"),
            Some((_, QueryConstraint::Absent)) => {
                format!("{name:?} is `absent` in `query`, so it cannot repeat")
            }
            Some(_) if repeats.iter().any(|r| **r == *name) => format!("{name:?} is listed twice"),
            Some(_) => {
                repeats.push(name.into_boxed_str());
                continue;
            }
        };
        errors.push(invalid!(InvalidMatcher {
            path: format!("query_repeat[{i}]"),
            reason,
        }));
    }
    Some(QueryRules {
        params,
        repeat: repeats,
    })
}

/// Parses a raw query as `application/x-www-form-urlencoded`: pairs split on `&`, then
/// on the first `=`; `+` is a space; percent-escapes decoded; empty pairs skipped.
/// Rejected: invalid percent-encoding, names or values that are not UTF-8 after decoding,
/// a raw `;` (some servers split pairs on it, so it is ambiguous), and more than 256
/// parameters. The error is a human detail.
pub(crate) fn parse_query(query: &str) -> Result<QueryPairs<'_>, String> {
    if query.contains(';') {
        return Err(
            "a raw ';' in the query is ambiguous (some servers split on it); \
                    encode it as %3B"
                .to_owned(),
        );
    }
    let mut pairs = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if pairs.len() == MAX_QUERY_PARAMS {
            return Err(format!("more than {MAX_QUERY_PARAMS} query parameters"));
        }
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        pairs.push((form_decode(name)?, form_decode(value)?));
    }
    Ok(pairs)
}

/// The most query parameter names an audit record carries.
pub const MAX_RECORDED_QUERY_NAMES: usize = 32;
/// The longest query parameter name an audit record carries, in bytes.
pub const MAX_RECORDED_QUERY_NAME: usize = 64;

/// The parameter names of a raw query as an audit record carries them (decoded as
/// [`parse_query`] decodes them, in order, repeats kept, never values), and whether some
/// could not be recorded: more than [`MAX_RECORDED_QUERY_NAMES`], one longer than
/// [`MAX_RECORDED_QUERY_NAME`] or not printable ASCII (it is left out), or a query that
/// does not parse (no names).
pub fn recorded_query_names(query: &str) -> (Vec<String>, bool) {
    let Ok(pairs) = parse_query(query) else {
        return (Vec::new(), true);
    };
    let mut clipped = pairs.len() > MAX_RECORDED_QUERY_NAMES;
    let mut names = Vec::with_capacity(pairs.len().min(MAX_RECORDED_QUERY_NAMES));
    for (name, _) in pairs.iter().take(MAX_RECORDED_QUERY_NAMES) {
        if name.len() > MAX_RECORDED_QUERY_NAME
            || !name.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
        {
            clipped = true;
            continue;
        }
        names.push(name.clone().into_owned());
    }
    (names, clipped)
}

/// Decodes one form-urlencoded component.
fn form_decode(s: &str) -> Result<Cow<'_, str>, String> {
    if !s.contains(['%', '+']) {
        return Ok(Cow::Borrowed(s));
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| char::from(*b).to_digit(16));
                let (Some(h), Some(l)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err(format!("invalid percent-encoding in {:?}", clip(s)));
                };
                out.push(u8::try_from(h * 16 + l).unwrap_or(0));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map(Cow::Owned)
        .map_err(|_| format!("{:?} is not UTF-8 after percent-decoding", clip(s)))
}

// ---------------------------------------------------------------------------------------
// Headers.
// ---------------------------------------------------------------------------------------

/// One `headers:` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderConstraint {
    /// Present (once), any value.
    Required,
    /// Absent.
    Forbidden,
    /// Present once (or absent, with `optional: true`), and the value matches.
    Value(ValueRule),
}

/// A rule's `headers`: constraints on the listed headers; other headers are free.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderRules(Vec<(HeaderName, HeaderConstraint)>);

impl HeaderRules {
    /// The constrained headers (lowercase names), in file order.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &HeaderConstraint)> {
        self.0.iter().map(|(n, c)| (n.as_str(), c))
    }

    /// Checks the request's headers. A constrained header present more than once is
    /// always refused: a duplicated header never lets the first (or last) value win.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), RuleFailure> {
        for (name, constraint) in &self.0 {
            let mut values = headers.get_all(name).iter();
            let (first, second) = (values.next(), values.next());
            let fail = |f: fn(String) -> RuleFailure| Err(f(name.as_str().to_owned()));
            match (first, second, constraint) {
                (Some(_), Some(_), _) => return fail(|name| RuleFailure::DuplicateHeader { name }),
                (Some(_), None, HeaderConstraint::Forbidden) => {
                    return fail(|name| RuleFailure::HeaderForbidden { name });
                }
                (None, _, HeaderConstraint::Forbidden)
                | (Some(_), None, HeaderConstraint::Required) => {}
                (None, _, HeaderConstraint::Value(rule)) if rule.optional => {}
                (None, _, _) => return fail(|name| RuleFailure::HeaderRequired { name }),
                (Some(v), None, HeaderConstraint::Value(rule)) => {
                    // A value that is not visible ASCII matches no constraint, a deny-list
                    // included.
                    if !v.to_str().is_ok_and(|v| rule.matcher.matches(v)) {
                        return Err(RuleFailure::HeaderNotAllowed {
                            name: name.as_str().to_owned(),
                            expected: rule.matcher.to_string(),
                        });
                    }
                }
            }
        }
        Ok(())
    }
}

/// Validates `headers`; error paths are relative to the rule.
pub(crate) fn header_rules(
    headers: Option<raw::OrderedMap<raw::HeaderRule>>,
    errors: &mut Vec<PolicyError>,
) -> Option<HeaderRules> {
    let headers = headers?;
    let mut out: Vec<(HeaderName, HeaderConstraint)> = Vec::with_capacity(headers.0.len());
    for (written, rule) in headers.0 {
        let path = format!("headers.{written}");
        let Ok(name) = HeaderName::from_bytes(written.as_bytes()) else {
            errors.push(invalid!(InvalidMatcher {
                path,
                reason: format!("{written:?} is not a valid header name"),
            }));
            continue;
        };
        if out.iter().any(|(n, _)| *n == name) {
            errors.push(invalid!(InvalidMatcher {
                path,
                reason: format!(
                    "header {name} is listed twice (header names are case-insensitive)"
                ),
            }));
            continue;
        }
        let constraint = match rule {
            raw::HeaderRule::Required => HeaderConstraint::Required,
            raw::HeaderRule::Forbidden => HeaderConstraint::Forbidden,
            raw::HeaderRule::Value(v) => match value_rule(v) {
                Ok(rule) => HeaderConstraint::Value(rule),
                Err(e) => {
                    errors.push(e.nested(&path));
                    continue;
                }
            },
        };
        out.push((name, constraint));
    }
    Some(HeaderRules(out))
}

// ---------------------------------------------------------------------------------------
// JSON body.
// ---------------------------------------------------------------------------------------

/// One `json:` entry: constraints on one field of the body, all of which must hold.
#[derive(Clone, Debug, PartialEq)]
pub struct JsonRule {
    field: Box<str>,
    segments: Box<[Box<str>]>,
    one_of: Option<Box<[Value]>>,
    min: Option<f64>,
    max: Option<f64>,
    /// `min` and `max` as exact decimals (the shortest decimals of the `f64`s).
    min_exact: Option<Decimal>,
    max_exact: Option<Decimal>,
    pattern: Option<Pattern>,
    max_len: Option<u64>,
    absent: bool,
}

impl JsonRule {
    /// The field path as written, e.g. `customer.address.country`.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The value at the field path: keys index objects, numeric segments also index
    /// arrays.
    fn lookup<'v>(&self, body: &'v Value) -> Option<&'v Value> {
        let mut v = body;
        for seg in &self.segments {
            v = match v {
                Value::Object(map) => map.get(&**seg)?,
                Value::Array(items) => items.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(v)
    }

    /// Checks the parsed body. Numbers compare exactly: the number's text in the body
    /// (what the upstream reads) against the constraint's decimal, never a rounded `f64`.
    pub(crate) fn check(&self, body: &JsonBody) -> Result<(), RuleFailure> {
        let fail = |constraint: String| {
            Err(RuleFailure::JsonConstraintFailed {
                field: self.field.to_string(),
                constraint,
            })
        };
        let Some(v) = self.lookup(body.value()) else {
            return if self.absent {
                Ok(())
            } else {
                fail("is missing".to_owned())
            };
        };
        if self.absent {
            return fail("must be absent".to_owned());
        }
        // The exact value of a number, from the body's text; `None` if `v` is not a
        // number (or, which cannot happen for a body that parsed, its text is not found:
        // then every numeric constraint fails).
        let exact = match v {
            Value::Number(_) => body.number_text(&self.segments).and_then(Decimal::parse),
            _ => None,
        };
        if let Some(values) = &self.one_of
            && !values.iter().any(|x| match (x, &exact) {
                (Value::Number(n), Some(e)) => Decimal::from_number(n).is_some_and(|d| d == *e),
                (Value::Number(_), None) => false,
                _ => json_eq(x, v),
            })
        {
            let list: Vec<String> = values.iter().map(Value::to_string).collect();
            return fail(format!("must be one of [{}]", list.join(", ")));
        }
        if let (Some(min), Some(min_exact)) = (self.min, &self.min_exact)
            && exact.as_ref().is_none_or(|n| n < min_exact)
        {
            return fail(format!("must be a number ≥ {min}"));
        }
        if let (Some(max), Some(max_exact)) = (self.max, &self.max_exact)
            && exact.as_ref().is_none_or(|n| n > max_exact)
        {
            return fail(format!("must be a number ≤ {max}"));
        }
        if let Some(p) = &self.pattern
            && !v.as_str().is_some_and(|s| p.is_match(s))
        {
            return fail(format!("must be a string matching {p}"));
        }
        if let Some(max_len) = self.max_len {
            let len = match v {
                Value::String(s) => Some(s.chars().count()),
                Value::Array(a) => Some(a.len()),
                _ => None,
            };
            if !len.is_some_and(|l| u64::try_from(l).is_ok_and(|l| l <= max_len)) {
                return fail(format!(
                    "must be a string or array of at most {max_len} characters or elements"
                ));
            }
        }
        Ok(())
    }
}

/// JSON equality where numbers compare by value (`1` equals `1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (as_i128(x), as_i128(y)) {
            (Some(x), Some(y)) => x == y,
            _ => x.as_f64().zip(y.as_f64()).is_some_and(|(x, y)| x == y),
        },
        _ => a == b,
    }
}

fn as_i128(n: &serde_json::Number) -> Option<i128> {
    n.as_i64()
        .map(i128::from)
        .or_else(|| n.as_u64().map(i128::from))
        .or_else(|| {
            let f = n.as_f64()?;
            // Integral floats compare as integers; the range keeps the cast exact.
            (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i128)
        })
}

/// A YAML scalar as a JSON value.
fn yaml_to_json(v: serde_yaml::Value) -> Option<Value> {
    Some(match v {
        serde_yaml::Value::Null => Value::Null,
        serde_yaml::Value::Bool(b) => Value::Bool(b),
        serde_yaml::Value::String(s) => Value::String(s),
        serde_yaml::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::Number(serde_json::Number::from_f64(n.as_f64()?)?)
            }
        }
        _ => return None,
    })
}

/// Validates one `json:` entry; error paths are relative to the entry.
fn json_rule(raw: raw::JsonRule, errors: &mut Vec<PolicyError>) -> Option<JsonRule> {
    let before = errors.len();
    let segments: Vec<Box<str>> = raw.field.split('.').map(Box::from).collect();
    if raw.field.is_empty() || segments.iter().any(|s| s.is_empty()) {
        errors.push(invalid!(InvalidMatcher {
            path: "field".to_owned(),
            reason: format!(
                "{:?} is not a field path (dot-separated keys and array indexes, e.g. \
                 customer.country or items.0.sku)",
                raw.field
            ),
        }));
    }
    let has_value_constraint = raw.one_of.is_some()
        || raw.min.is_some()
        || raw.max.is_some()
        || raw.pattern.is_some()
        || raw.max_len.is_some();
    match raw.absent {
        Some(false) => errors.push(invalid!(InvalidMatcher {
            path: "absent".to_owned(),
            reason: "`absent: false` has no effect; omit it".to_owned(),
        })),
        Some(true) if has_value_constraint => errors.push(invalid!(InvalidMatcher {
            path: "absent".to_owned(),
            reason: "`absent: true` cannot be combined with other constraints".to_owned(),
        })),
        None if !has_value_constraint => errors.push(invalid!(InvalidMatcher {
            path: String::new(),
            reason: format!(
                "the entry for {:?} has no constraint (one_of, min, max, pattern, max_len or \
                 absent)",
                raw.field
            ),
        })),
        _ => {}
    }
    for (name, n) in [("min", raw.min), ("max", raw.max)] {
        if n.is_some_and(|n| !n.is_finite()) {
            errors.push(invalid!(InvalidMatcher {
                path: name.to_owned(),
                reason: format!("`{name}` must be a finite number"),
            }));
        }
    }
    if let (Some(min), Some(max)) = (raw.min, raw.max)
        && min > max
    {
        errors.push(invalid!(InvalidMatcher {
            path: "min".to_owned(),
            reason: format!("min {min} is greater than max {max}"),
        }));
    }
    let one_of = match raw.one_of {
        None => None,
        Some(values) if values.is_empty() => {
            errors.push(invalid!(InvalidMatcher {
                path: "one_of".to_owned(),
                reason: "`one_of` needs at least one value".to_owned(),
            }));
            None
        }
        Some(values) => {
            let mut out = Vec::with_capacity(values.len());
            for (i, v) in values.into_iter().enumerate() {
                match yaml_to_json(v) {
                    Some(v) => out.push(v),
                    None => errors.push(invalid!(InvalidMatcher {
                        path: format!("one_of[{i}]"),
                        reason: "a `one_of` value must be a string, number, boolean or null"
                            .to_owned(),
                    })),
                }
            }
            Some(out.into_boxed_slice())
        }
    };
    let pattern = match raw.pattern {
        None => None,
        Some(p) => match Pattern::new(&p) {
            Ok(p) => Some(p),
            Err(reason) => {
                errors.push(invalid!(InvalidRegex {
                    path: "pattern".to_owned(),
                    value: p,
                    reason,
                }));
                None
            }
        },
    };
    (errors.len() == before).then(|| JsonRule {
        field: raw.field.into_boxed_str(),
        segments: segments.into_boxed_slice(),
        one_of,
        min: raw.min,
        max: raw.max,
        min_exact: raw.min.and_then(Decimal::from_f64),
        max_exact: raw.max.and_then(Decimal::from_f64),
        pattern,
        max_len: raw.max_len,
        absent: raw.absent == Some(true),
    })
}

/// Validates `json`; error paths are relative to the rule.
pub(crate) fn json_rules(
    json: Option<Vec<raw::JsonRule>>,
    errors: &mut Vec<PolicyError>,
) -> Vec<JsonRule> {
    let mut out = Vec::new();
    for (i, entry) in json.unwrap_or_default().into_iter().enumerate() {
        let mut errs = Vec::new();
        match json_rule(entry, &mut errs) {
            Some(rule) => out.push(rule),
            None => {
                let prefix = format!("json[{i}]");
                errors.extend(errs.into_iter().map(|e| e.nested(&prefix)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use http::HeaderValue;
    use serde_json::json;

    fn body_of(text: &str) -> JsonBody {
        crate::policy::parse_json_body(text.as_bytes(), Some("application/json")).unwrap()
    }

    fn rule_of(
        yaml: &str,
    ) -> (
        Option<QueryRules>,
        Option<HeaderRules>,
        Vec<JsonRule>,
        Vec<String>,
    ) {
        #[derive(serde::Deserialize)]
        struct R {
            query: Option<raw::OrderedMap<raw::QueryRule>>,
            query_repeat: Option<Vec<String>>,
            headers: Option<raw::OrderedMap<raw::HeaderRule>>,
            json: Option<Vec<raw::JsonRule>>,
        }
        let r: R = serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {e}"));
        let mut errors = Vec::new();
        let q = query_rules(r.query, r.query_repeat, &mut errors);
        let h = header_rules(r.headers, &mut errors);
        let j = json_rules(r.json, &mut errors);
        let errors = errors
            .iter()
            .map(|e| e.to_string().trim_start_matches(":0:0: ").to_owned())
            .collect();
        (q, h, j, errors)
    }

    #[test]
    fn patterns_are_anchored() {
        let p = Pattern::new("[0-9]+").unwrap();
        assert!(p.is_match("123"));
        assert!(!p.is_match("a123"));
        assert!(!p.is_match("123\n"));
        let alt = Pattern::new("a|b").unwrap();
        assert!(alt.is_match("a") && alt.is_match("b") && !alt.is_match("ab"));
        assert_eq!(Pattern::new("a)|(b").unwrap_err(), "unopened group");
        assert_eq!(
            Pattern::new("").unwrap_err(),
            "the regular expression is empty"
        );
        assert_eq!(
            Pattern::new("a{").unwrap_err(),
            "unclosed counted repetition"
        );
    }

    #[test]
    fn query_parsing() {
        type Expect = Result<&'static [(&'static str, &'static str)], ()>;
        let cases: &[(&str, Expect)] = &[
            ("", Ok(&[])),
            ("a=1", Ok(&[("a", "1")])),
            ("a=1&b=2", Ok(&[("a", "1"), ("b", "2")])),
            ("a", Ok(&[("a", "")])),
            ("a=", Ok(&[("a", "")])),
            ("=x", Ok(&[("", "x")])),
            ("a=1&&b", Ok(&[("a", "1"), ("b", "")])),
            ("a=b=c", Ok(&[("a", "b=c")])),
            ("q=a+b", Ok(&[("q", "a b")])),
            ("q=a%2Bb", Ok(&[("q", "a+b")])),
            ("%61=%62", Ok(&[("a", "b")])),
            ("q=caf%C3%A9", Ok(&[("q", "café")])),
            ("q=%2f%3F", Ok(&[("q", "/?")])),
            ("q=%", Err(())),
            ("q=%4", Err(())),
            ("q=%zz", Err(())),
            ("q=%ff", Err(())),
            ("q=%c3", Err(())),
            ("a=1;b=2", Err(())),
        ];
        for (q, expected) in cases {
            let got = parse_query(q);
            match (expected, &got) {
                (Ok(want), Ok(pairs)) => {
                    let pairs: Vec<(&str, &str)> =
                        pairs.iter().map(|(n, v)| (&**n, &**v)).collect();
                    assert_eq!(pairs, *want, "{q:?}");
                }
                (Err(()), Err(_)) => {}
                _ => panic!("{q:?}: {got:?}"),
            }
        }
        let many = vec!["a=1"; 257].join("&");
        assert!(parse_query(&many).is_err());
    }

    #[test]
    fn query_constraints() {
        let (q, _, _, errors) = rule_of(
            "query:\n  expand: absent\n  limit: {pattern: '[0-9]{1,3}'}\n  sort: {one_of: [asc, desc]}\n  \
             cursor: any\n  id: present\n  tag: any\nquery_repeat: [tag, id]\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let q = q.unwrap();
        // (query, expected code or ok)
        let cases: &[(&str, Option<&str>)] = &[
            ("id=1&limit=10&sort=asc", None),
            ("id=1&limit=10&sort=asc&cursor=x&tag=a&tag=b", None),
            ("id=1&id=2&limit=10&sort=asc", None),
            ("limit=10&sort=asc", Some("query_param_required")),
            ("id=1&sort=asc", Some("query_param_required")),
            ("id=1&limit=10", Some("query_param_required")),
            ("id=1&limit=1000&sort=asc", Some("query_value_not_allowed")),
            ("id=1&limit=10&sort=ASC", Some("query_value_not_allowed")),
            (
                "id=1&limit=10&sort=asc&expand=x",
                Some("query_param_not_allowed"),
            ),
            (
                "id=1&limit=10&sort=asc&expand",
                Some("query_param_not_allowed"),
            ),
            (
                "id=1&limit=10&sort=asc&other=1",
                Some("query_param_not_allowed"),
            ),
            (
                "id=1&limit=10&sort=asc&limit=10",
                Some("query_param_repeated"),
            ),
            (
                "id=1&limit=10&sort=asc&%6Cimit=10",
                Some("query_param_repeated"),
            ),
            (
                "id=1&limit=10&sort=asc&cursor=1&cursor=2",
                Some("query_param_repeated"),
            ),
            (
                "id=1&limit=10&sort=desc&sort=asc",
                Some("query_param_repeated"),
            ),
            ("id=1&limit=1%30&sort=asc", None),
            ("id=1&limit=+10&sort=asc", Some("query_value_not_allowed")),
        ];
        for (query, expected) in cases {
            let got = q
                .check(&parse_query(query).unwrap())
                .err()
                .map(|f| f.code());
            assert_eq!(got, *expected, "{query}");
        }
    }

    #[test]
    fn query_validation() {
        let (_, _, _, errors) = rule_of("query_repeat: [a]\n");
        assert_eq!(
            errors,
            ["query_repeat: `query_repeat` needs a `query` that lists the parameters"]
        );
        let (_, _, _, errors) = rule_of(
            "query: {a: absent, b: {one_of: []}, c: {pattern: '('}, d: {}, e: {one_of: [x], pattern: y}}\n\
             query_repeat: [a, z, e, e]\n",
        );
        assert_eq!(
            errors,
            [
                "query.b.one_of: `one_of` needs at least one value",
                "query.c.pattern: \"(\" is not a valid regular expression: unclosed group",
                "query.d: needs `one_of`, `pattern`, `not_one_of` or `not_pattern`",
                "query.e.pattern: give either `one_of` or `pattern`, not both",
                "query_repeat[0]: \"a\" is `absent` in `query`, so it cannot repeat",
                "query_repeat[1]: \"z\" is not listed in `query`",
                "query_repeat[2]: \"e\" is not listed in `query`",
                "query_repeat[3]: \"e\" is not listed in `query`",
            ]
        );
    }

    #[test]
    fn optional_and_negated_value_constraints() {
        let (q, h, _, errors) = rule_of(
            "query:\n  max-keys: {pattern: '[0-9]{1,4}', optional: true}\n  \
             prefix: {not_pattern: '.*\\.\\..*', optional: true}\n  \
             list-type: {one_of: ['2']}\n\
             headers:\n  X-Role: {not_one_of: [admin, root], optional: true}\n  \
             X-Tenant: {not_pattern: 'internal-.*'}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let (q, h) = (q.unwrap(), h.unwrap());
        let query = |text: &str| q.check(&parse_query(text).unwrap()).err().map(|f| f.code());
        for (text, want) in [
            // optional: absent is fine, present must match.
            ("list-type=2", None),
            ("list-type=2&max-keys=100", None),
            ("list-type=2&max-keys=lots", Some("query_value_not_allowed")),
            ("list-type=2&prefix=photos/", None),
            ("list-type=2&prefix=a/../b", Some("query_value_not_allowed")),
            // percent-decoded before the deny pattern sees it
            (
                "list-type=2&prefix=a/%2E%2E/b",
                Some("query_value_not_allowed"),
            ),
            // not optional: still required.
            ("max-keys=1", Some("query_param_required")),
            ("list-type=2&other=1", Some("query_param_not_allowed")),
        ] {
            assert_eq!(query(text), want, "{text}");
        }
        let headers = |pairs: &[(&str, &[u8])]| {
            let mut map = HeaderMap::new();
            for (n, v) in pairs {
                map.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(v).unwrap(),
                );
            }
            h.check(&map).err().map(|f| f.code())
        };
        let tenant: (&str, &[u8]) = ("x-tenant", b"acme");
        for (pairs, want) in [
            (vec![tenant], None),
            (vec![tenant, ("x-role", b"reader".as_slice())], None),
            // a deny-list compares ASCII case-insensitively
            (
                vec![tenant, ("x-role", b"admin".as_slice())],
                Some("header_not_allowed"),
            ),
            (
                vec![tenant, ("x-role", b"ADMIN".as_slice())],
                Some("header_not_allowed"),
            ),
            (
                vec![tenant, ("x-role", b"Root".as_slice())],
                Some("header_not_allowed"),
            ),
            // a value that is not visible ASCII passes no constraint, a deny-list neither
            (
                vec![tenant, ("x-role", b"r\xe9ader".as_slice())],
                Some("header_not_allowed"),
            ),
            // optional, yet twice is still refused
            (
                vec![
                    tenant,
                    ("x-role", b"reader".as_slice()),
                    ("x-role", b"admin".as_slice()),
                ],
                Some("duplicate_header"),
            ),
            (
                vec![("x-tenant", b"internal-ops".as_slice())],
                Some("header_not_allowed"),
            ),
            // not optional: a negated constraint still needs the header
            (vec![], Some("header_required")),
        ] {
            assert_eq!(headers(&pairs), want, "{pairs:?}");
        }
        let (_, _, _, errors) = rule_of(
            "query: {a: {optional: true}, b: {not_one_of: []}, c: {not_pattern: '('}, \
             d: {pattern: x, not_pattern: y}, e: {one_of: [x], not_one_of: [y]}}\n",
        );
        assert_eq!(
            errors,
            [
                "query.a: needs `one_of`, `pattern`, `not_one_of` or `not_pattern`",
                "query.b.not_one_of: `not_one_of` needs at least one value",
                "query.c.not_pattern: \"(\" is not a valid regular expression: unclosed group",
                "query.d.not_pattern: give either `pattern` or `not_pattern`, not both",
                "query.e.not_one_of: give either `one_of` or `not_one_of`, not both",
            ]
        );
    }

    #[test]
    fn header_constraints() {
        let (_, h, _, errors) = rule_of(
            "headers:\n  X-Api-Version: {one_of: ['2024-01-01']}\n  content-type: {pattern: 'application/json(; ?charset=utf-8)?'}\n  \
             authorization: required\n  x-debug: forbidden\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let h = h.unwrap();
        let ok: &[(&str, &str)] = &[
            ("x-api-version", "2024-01-01"),
            ("content-type", "application/json"),
            ("authorization", "Bearer x"),
        ];
        let headers = |extra: &[(&str, &str)], drop: &str| {
            let mut map = HeaderMap::new();
            for (n, v) in ok.iter().filter(|(n, _)| *n != drop).chain(extra) {
                map.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            map
        };
        // (extra headers, header removed from the good set, expected code)
        type Case = (
            &'static [(&'static str, &'static str)],
            &'static str,
            Option<&'static str>,
        );
        let cases: &[Case] = &[
            (&[], "", None),
            (&[("X-Other", "1")], "", None),
            (
                &[("content-type", "application/json; charset=utf-8")],
                "content-type",
                None,
            ),
            (&[], "authorization", Some("header_required")),
            (&[], "x-api-version", Some("header_required")),
            (&[("x-debug", "1")], "", Some("header_forbidden")),
            (&[("x-debug", "")], "", Some("header_forbidden")),
            (
                &[("x-debug", "1"), ("x-debug", "2")],
                "",
                Some("duplicate_header"),
            ),
            (
                &[("authorization", "Bearer y")],
                "",
                Some("duplicate_header"),
            ),
            (
                &[("X-Api-Version", "2024-01-01")],
                "",
                Some("duplicate_header"),
            ),
            (
                &[("x-api-version", "2023-01-01")],
                "x-api-version",
                Some("header_not_allowed"),
            ),
            (
                &[("content-type", "text/plain")],
                "content-type",
                Some("header_not_allowed"),
            ),
            (
                &[("content-type", "application/jsonx")],
                "content-type",
                Some("header_not_allowed"),
            ),
        ];
        for (extra, drop, expected) in cases {
            let got = h.check(&headers(extra, drop)).err().map(|f| f.code());
            assert_eq!(got, *expected, "{extra:?} without {drop:?}");
        }
        // Non-UTF-8 bytes never match a value constraint.
        let mut map = headers(&[], "x-api-version");
        map.insert(
            "x-api-version",
            HeaderValue::from_bytes(b"2024-01-01\xff").unwrap(),
        );
        assert_eq!(h.check(&map).unwrap_err().code(), "header_not_allowed");

        let (_, _, _, errors) =
            rule_of("headers: {X-A: required, x-a: forbidden, 'bad name': required}\n");
        assert_eq!(
            errors,
            [
                "headers.x-a: header x-a is listed twice (header names are case-insensitive)",
                "headers.bad name: \"bad name\" is not a valid header name",
            ]
        );
    }

    #[test]
    fn json_constraints() {
        let (_, _, j, errors) = rule_of(
            "json:\n  - {field: currency, one_of: [usd, eur]}\n  - {field: amount, min: 1, max: 100000}\n  \
             - {field: customer.country, pattern: '[A-Z]{2}'}\n  - {field: items, max_len: 2}\n  \
             - {field: items.0.qty, one_of: [1, 2, true]}\n  - {field: note, max_len: 5}\n  - {field: admin, absent: true}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let check = |body: &Value| -> Option<String> {
            let body = body_of(&body.to_string());
            j.iter()
                .find_map(|r| r.check(&body).err())
                .map(|f| f.to_string())
        };
        let good = json!({
            "currency": "usd", "amount": 100, "customer": {"country": "DE"},
            "items": [{"qty": 1}], "note": "héllo"
        });
        assert_eq!(check(&good), None);
        let with = |pointer: &str, v: Value| {
            let mut b = good.clone();
            *b.pointer_mut(pointer).unwrap() = v;
            b
        };
        let cases = [
            (
                with("/currency", json!("gbp")),
                "json field currency must be one of [\"usd\", \"eur\"]",
            ),
            (
                with("/currency", json!(["usd"])),
                "json field currency must be one of [\"usd\", \"eur\"]",
            ),
            (
                with("/amount", json!(100001)),
                "json field amount must be a number ≤ 100000",
            ),
            (
                with("/amount", json!(0.5)),
                "json field amount must be a number ≥ 1",
            ),
            (
                with("/amount", json!("100")),
                "json field amount must be a number ≥ 1",
            ),
            (
                with("/customer", json!("DE")),
                "json field customer.country is missing",
            ),
            (
                with("/customer/country", json!("de")),
                "json field customer.country must be a string matching [A-Z]{2}",
            ),
            (
                with("/items", json!([{"qty": 1}, {}, {}])),
                "json field items must be a string or array of at most 2 characters or elements",
            ),
            (with("/items/0/qty", json!(1.0)), ""),
            (with("/items/0/qty", json!(true)), ""),
            (
                with("/items/0/qty", json!(3)),
                "json field items.0.qty must be one of [1, 2, true]",
            ),
            (
                with("/items/0/qty", json!("1")),
                "json field items.0.qty must be one of [1, 2, true]",
            ),
            (
                with("/note", json!("héllo!")),
                "json field note must be a string or array of at most 5 characters or elements",
            ),
            (
                with("/note", json!(5)),
                "json field note must be a string or array of at most 5 characters or elements",
            ),
            (json!({"currency": "usd"}), "json field amount is missing"),
            (json!([1]), "json field currency is missing"),
        ];
        for (body, expected) in cases {
            assert_eq!(check(&body).unwrap_or_default(), expected, "{body}");
        }
        let mut admin = good.clone();
        admin["admin"] = json!(false);
        assert_eq!(check(&admin).unwrap(), "json field admin must be absent");
        admin["admin"] = Value::Null;
        assert_eq!(check(&admin).unwrap(), "json field admin must be absent");
    }

    #[test]
    fn json_numbers_compare_exactly() {
        let (_, _, j, errors) = rule_of(
            "json:\n  - {field: amount, min: 0, max: 100}\n  - {field: rate, max: 0.1}\n  \
             - {field: fee, min: 0.1}\n  - {field: qty, one_of: [1, 2.5]}\n",
        );
        assert!(errors.is_empty(), "{errors:?}");
        let check = |text: String| -> Option<String> {
            let body = body_of(&text);
            j.iter()
                .find_map(|r| r.check(&body).err())
                .map(|f| f.to_string())
        };
        let with = |amount: &str, rate: &str, fee: &str, qty: &str| {
            format!(r#"{{"amount": {amount}, "rate": {rate}, "fee": {fee}, "qty": {qty}}}"#)
        };
        let amount = |a: &str| check(with(a, "0", "1", "1"));
        let over = Some("json field amount must be a number ≤ 100".to_owned());
        let under = Some("json field amount must be a number ≥ 0".to_owned());
        for ok in [
            "100", "100.0", "1e2", "1E2", "0.1e3", "10000e-2", "-0", "0", "0.0", "-0.0e5",
        ] {
            assert_eq!(amount(ok), None, "{ok}");
        }
        let zeros = "0".repeat(10_000);
        for (bad, why) in [
            ("100.000000000000001", &over),
            ("100.00000000000000000000000001", &over),
            ("1.00000000000000001e2", &over),
            ("1e-400", &None),
            ("-1e-400", &under),
            ("-0.000000000000000000001", &under),
            (&format!("100.{zeros}1"), &over),
            (&format!("-0.{zeros}1"), &under),
            (&format!("99.{}", "9".repeat(10_000)), &None),
        ] {
            assert_eq!(&amount(bad), why, "{bad:.40}");
        }
        // The policy's 0.1 is the decimal 0.1, not the f64's 0.1000000000000000055…
        let rate = |r: &str| check(with("1", r, "1", "1"));
        let rate_over = Some("json field rate must be a number ≤ 0.1".to_owned());
        assert_eq!(rate("0.1"), None);
        assert_eq!(rate("0.10"), None);
        assert_eq!(rate("1e-1"), None);
        assert_eq!(rate("0.1000000000000000055511151231257827"), rate_over);
        assert_eq!(rate("0.10000000000000001"), rate_over);
        assert_eq!(rate("0.09999999999999999999"), None);
        let fee = |f: &str| check(with("1", "0", f, "1"));
        let fee_under = Some("json field fee must be a number ≥ 0.1".to_owned());
        assert_eq!(fee("0.1"), None);
        assert_eq!(fee("0.09999999999999999999"), fee_under);
        assert_eq!(fee("0.1000000000000000000001"), None);
        // one_of numbers compare exactly too.
        let qty = |q: &str| check(with("1", "0", "1", q));
        let qty_no = Some("json field qty must be one of [1, 2.5]".to_owned());
        for ok in ["1", "1.0", "1e0", "2.5", "25e-1", "2.50"] {
            assert_eq!(qty(ok), None, "{ok}");
        }
        for bad in [
            "1.0000000000000001",
            "2.5000000000000000001",
            "\"1\"",
            "true",
        ] {
            assert_eq!(qty(bad), qty_no, "{bad}");
        }
        // A string is not a number.
        assert_eq!(amount("\"50\""), under);
    }

    #[test]
    fn json_validation() {
        let (_, _, _, errors) = rule_of(
            "json:\n  - {field: a}\n  - {field: 'a..b', max: 1}\n  - {field: b, absent: false}\n  \
             - {field: c, absent: true, max: 1}\n  - {field: d, min: 2, max: 1}\n  - {field: e, one_of: []}\n  \
             - {field: f, one_of: [[1]]}\n  - {field: g, pattern: '['}\n  - {field: h, max: .inf}\n",
        );
        assert_eq!(
            errors,
            [
                "json[0]: the entry for \"a\" has no constraint (one_of, min, max, pattern, max_len or absent)",
                "json[1].field: \"a..b\" is not a field path (dot-separated keys and array indexes, e.g. customer.country or items.0.sku)",
                "json[2].absent: `absent: false` has no effect; omit it",
                "json[3].absent: `absent: true` cannot be combined with other constraints",
                "json[4].min: min 2 is greater than max 1",
                "json[5].one_of: `one_of` needs at least one value",
                "json[6].one_of[0]: a `one_of` value must be a string, number, boolean or null",
                "json[7].pattern: \"[\" is not a valid regular expression: unclosed character class",
                "json[8].max: `max` must be a finite number",
            ]
        );
    }
}
