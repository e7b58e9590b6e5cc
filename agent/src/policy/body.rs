//! Request bodies for `json` rules: strict parsing, so that the proxy and the upstream
//! cannot read one body two ways.
//!
//! The caller buffers the body (only when
//! [`Destination::needs_body`](super::Destination::needs_body) says a candidate rule
//! inspects it, and at most the workload's [`body_cap`](super::Workload::body_cap) bytes,
//! else 413 `body_too_large`) and parses it with [`parse_json_body`]. A duplicate key at any
//! depth is refused: serde_json (and many servers) keep the last value, others the first,
//! so a duplicate would let a checked value differ from the one acted on. A key with a
//! control character (after unescaping) is refused too: servers that cut a key at NUL, or
//! strip control characters, would read `"amount\u0000"` as `amount`.
//!
//! # Exact numbers
//!
//! The parsed body is a [`JsonBody`]: the [`Value`] tree (numbers as `i64`/`u64`/`f64`)
//! plus the original bytes, which are also what the upstream receives. `min`/`max` (and
//! numeric `one_of`) constraints compare the number's **exact decimal text**, found again
//! in the original bytes by walking the field path ([`JsonBody::number_text`]), never the
//! rounded `f64`: `100.000000000000001` is more than 100, `1e-400` is more than 0.
//! serde_json's `arbitrary_precision` feature is not used: it would change number handling
//! for every serde_json user in the process (untagged and flattened serde types, the
//! audit records).
//!
//! [`Decimal`] parses the text into sign, significant digits and a decimal exponent and
//! compares digit strings: linear in the number's length, no bignum arithmetic (a 10,000
//! digit number costs a few microseconds). A number outside the finite `f64` range
//! (`1e400`, a 400-digit integer) is refused with 400 `json_number_invalid`: JSON parsers
//! disagree on it (infinity, an error, a bignum), so no check on it would be meaningful.
//! Exponents within that range but absurd in length (`1e-99999999999999999999`) are
//! accepted; the exponent saturates at ±10^15, far beyond any digit count a body can
//! hold, so comparisons stay exact.

use std::cell::Cell;
use std::cmp::Ordering;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The default body cap: 1 MiB.
pub const DEFAULT_BODY_CAP: usize = 1 << 20;

/// Deepest allowed nesting of arrays and objects.
pub const MAX_JSON_DEPTH: usize = 64;

/// Why a body was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The Content-Type is missing or not JSON.
    #[error("content type {} is not JSON (expected application/json or application/*+json)",
        .content_type.as_deref().map_or_else(|| "(none)".to_owned(), |c| format!("{c:?}")))]
    UnsupportedMediaType {
        /// The Content-Type header as received.
        content_type: Option<String>,
    },
    /// The body is not valid JSON (or has trailing data).
    #[error("the body is not valid JSON: {detail}")]
    InvalidJson {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// An object has the same key twice.
    #[error("the body has the key {key:?} twice in the object at {at}")]
    DuplicateKey {
        /// The key (clipped).
        key: String,
        /// Where, as a JSONPath-like string (`$`, `$.a[0]`).
        at: String,
    },
    /// Arrays and objects are nested deeper than [`MAX_JSON_DEPTH`].
    #[error("the body nests arrays and objects deeper than {max}")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// An object key contains a control character (U+0000–U+001F, U+007F–U+009F) or a
    /// line or paragraph separator (U+2028, U+2029) after unescaping.
    #[error("the body has the key {key:?} with a control character in the object at {at}")]
    InvalidKey {
        /// The key (clipped; the Debug rendering shows the control characters escaped).
        key: String,
        /// Where, as a JSONPath-like string (`$`, `$.a[0]`).
        at: String,
    },
    /// A number is outside the finite `f64` range (e.g. `1e400`).
    #[error("the body has a number outside the supported range: {detail}")]
    InvalidNumber {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// The body is larger than the cap (detected by the caller while buffering).
    #[error("the body is larger than {cap} bytes")]
    TooLarge {
        /// The cap.
        cap: usize,
    },
}

impl BodyError {
    /// The stable reason code.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::UnsupportedMediaType { .. } => "unsupported_media_type",
            BodyError::InvalidJson { .. } => "invalid_json",
            BodyError::DuplicateKey { .. } => "duplicate_json_key",
            BodyError::TooDeep { .. } => "json_too_deep",
            BodyError::InvalidKey { .. } => "json_key_invalid",
            BodyError::InvalidNumber { .. } => "json_number_invalid",
            BodyError::TooLarge { .. } => "body_too_large",
        }
    }

    /// The HTTP status for the client: 415, 400 or 413.
    pub fn status(&self) -> u16 {
        match self {
            BodyError::UnsupportedMediaType { .. } => 415,
            BodyError::TooLarge { .. } => 413,
            BodyError::InvalidJson { .. }
            | BodyError::DuplicateKey { .. }
            | BodyError::TooDeep { .. }
            | BodyError::InvalidKey { .. }
            | BodyError::InvalidNumber { .. } => 400,
        }
    }
}

/// Whether `content_type` is `application/json` or `application/*+json`, with at most a
/// `charset=utf-8` parameter (JSON is UTF-8; any other charset is refused).
fn is_json_media_type(content_type: &str) -> bool {
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    let subtype = subtype.to_ascii_lowercase();
    if !kind.eq_ignore_ascii_case("application")
        || !(subtype == "json" || (subtype.ends_with("+json") && subtype.len() > 5))
    {
        return false;
    }
    parts.all(|param| {
        let param = param.trim();
        match param.split_once('=') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
                let value = value.trim().trim_matches('"');
                value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
            }
            Some(_) => true,
            None => param.is_empty(),
        }
    })
}

/// A parsed request body: the value tree and the original bytes (for exact numbers).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonBody {
    value: Value,
    raw: Box<[u8]>,
}

impl JsonBody {
    /// The parsed value. Numbers in it are rounded to `f64` when not integers; use
    /// [`number_text`](Self::number_text) for their exact text.
    pub fn value(&self) -> &Value {
        &self.value
    }

    /// The original bytes (what is forwarded).
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// The exact text of the number at `path` (object keys; array indexes as decimal
    /// strings, read like [`str::parse::<usize>`], as the value lookup does), or `None` if
    /// there is no number there. Walks the original bytes: linear in the bytes before the
    /// value.
    pub fn number_text<S: AsRef<str>>(&self, path: &[S]) -> Option<&str> {
        let range = Walker::new(&self.raw).find(path)?;
        std::str::from_utf8(&self.raw[range]).ok()
    }
}

impl AsRef<Value> for JsonBody {
    fn as_ref(&self) -> &Value {
        &self.value
    }
}

/// Parses a request body for `json` rules: checks the Content-Type, then parses strictly
/// (no duplicate keys at any depth, no control characters in keys, nesting at most
/// [`MAX_JSON_DEPTH`], numbers within the finite `f64` range, no trailing data).
pub fn parse_json_body(bytes: &[u8], content_type: Option<&str>) -> Result<JsonBody, BodyError> {
    if !content_type.is_some_and(is_json_media_type) {
        return Err(BodyError::UnsupportedMediaType {
            content_type: content_type.map(super::matchers::clip),
        });
    }
    let problem: Cell<Option<BodyError>> = Cell::new(None);
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = ValueSeed {
        depth: 0,
        at: &At::Root,
        problem: &problem,
    };
    let result = seed.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match result {
        Ok(value) => Ok(JsonBody {
            value,
            raw: bytes.into(),
        }),
        Err(e) => Err(problem.take().unwrap_or_else(|| {
            let detail = e.to_string();
            // serde_json's message for a number beyond f64 (pinned by a test).
            if detail.starts_with("number out of range") {
                BodyError::InvalidNumber { detail }
            } else {
                BodyError::InvalidJson { detail }
            }
        })),
    }
}

/// Whether a key character is refused: Unicode `Cc` (C0, DEL, C1) and the line and
/// paragraph separators (which JavaScript once treated as line ends). Format characters
/// (`Cf`, e.g. U+200B) are allowed.
fn is_refused_key_char(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// Finds a value's bytes in JSON that serde_json has already accepted (so it is valid:
/// the walker only needs to be correct for valid JSON, and returns `None` rather than
/// panicking on anything else).
struct Walker<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Walker<'a> {
    fn new(b: &'a [u8]) -> Self {
        Walker { b, i: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.ws();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// At `"`: skips the string, returns its content's range (escapes not decoded).
    fn string(&mut self) -> Option<Range<usize>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        loop {
            j += memchr::memchr2(b'"', b'\\', self.b.get(j..)?)?;
            if self.b[j] == b'"' {
                self.i = j + 1;
                return Some(start..j);
            }
            j += 2;
        }
    }

    /// Skips one value of any kind.
    fn skip_value(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                        }
                        b'{' | b'[' => {
                            depth += 1;
                            self.i += 1;
                        }
                        b'}' | b']' => {
                            depth = depth.checked_sub(1)?;
                            self.i += 1;
                            if depth == 0 {
                                return Some(());
                            }
                        }
                        _ => self.i += 1,
                    }
                }
            }
            _ => {
                while self.peek().is_some_and(|c| {
                    !matches!(c, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r')
                }) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// Whether the key at `range` (raw string content) decodes to `want`.
    fn key_is(&self, range: Range<usize>, want: &str) -> bool {
        let raw = &self.b[range.clone()];
        if !raw.contains(&b'\\') {
            return raw == want.as_bytes();
        }
        // With escapes: let serde_json decode the quoted string.
        let quoted = &self.b[range.start - 1..range.end + 1];
        serde_json::from_slice::<String>(quoted).is_ok_and(|k| k == want)
    }

    /// The range of the number at `path`, if there is one.
    fn find<S: AsRef<str>>(mut self, path: &[S]) -> Option<Range<usize>> {
        for seg in path {
            let seg = seg.as_ref();
            self.ws();
            match self.peek()? {
                b'{' => {
                    self.i += 1;
                    loop {
                        self.ws();
                        let key = self.string()?;
                        self.eat(b':')?;
                        if self.key_is(key, seg) {
                            break;
                        }
                        self.skip_value()?;
                        self.eat(b',')?;
                    }
                }
                b'[' => {
                    let index: usize = seg.parse().ok()?;
                    self.i += 1;
                    self.ws();
                    if self.peek()? == b']' {
                        return None;
                    }
                    for _ in 0..index {
                        self.skip_value()?;
                        self.eat(b',')?;
                    }
                }
                _ => return None,
            }
        }
        self.ws();
        let start = self.i;
        if !matches!(self.peek()?, b'-' | b'0'..=b'9') {
            return None;
        }
        while matches!(
            self.peek(),
            Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
        ) {
            self.i += 1;
        }
        Some(start..self.i)
    }
}

/// A decimal number, exactly: `(-1)^negative × 0.DIGITS × 10^exponent`, with no leading
/// or trailing zero digits (zero: no digits, any sign).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decimal {
    negative: bool,
    digits: Box<[u8]>,
    exponent: i64,
}

/// Exponents saturate here: far beyond any digit count, so comparisons stay exact.
const EXPONENT_CAP: i64 = 1_000_000_000_000_000;

impl Decimal {
    /// Parses a number in JSON syntax (`-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`);
    /// also accepts leading zeros and a leading `+` in the mantissa (Rust's `{:e}` output
    /// and YAML numbers are within this). `None` if it is not a number.
    pub fn parse(text: &str) -> Option<Decimal> {
        let b = text.as_bytes();
        let mut i = 0;
        let negative = match b.first() {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let int_start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let int = &b[int_start..i];
        let mut frac: &[u8] = &[];
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            i = start;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            frac = &b[start..i];
            if frac.is_empty() {
                return None;
            }
        }
        if int.is_empty() {
            return None;
        }
        let mut exp: i64 = 0;
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            let exp_negative = match b.get(i) {
                Some(b'-') => {
                    i += 1;
                    true
                }
                Some(b'+') => {
                    i += 1;
                    false
                }
                _ => false,
            };
            let start = i;
            while let Some(d) = b.get(i).filter(|d| d.is_ascii_digit()) {
                exp = (exp * 10 + i64::from(d - b'0')).min(EXPONENT_CAP);
                i += 1;
            }
            if i == start {
                return None;
            }
            if exp_negative {
                exp = -exp;
            }
        }
        if i != b.len() {
            return None;
        }
        // All significant digits: int then frac; the point sits after `int.len()`.
        let lead_int = int.iter().take_while(|&&d| d == b'0').count();
        let (digits, point): (Vec<u8>, i64) = if lead_int < int.len() {
            let mut d = int[lead_int..].to_vec();
            d.extend_from_slice(frac);
            (d, len_i64(int.len() - lead_int))
        } else {
            let lead_frac = frac.iter().take_while(|&&d| d == b'0').count();
            (frac[lead_frac..].to_vec(), -len_i64(lead_frac))
        };
        let mut digits = digits;
        while digits.last() == Some(&b'0') {
            digits.pop();
        }
        let exponent = if digits.is_empty() {
            0
        } else {
            point.saturating_add(exp)
        };
        Some(Decimal {
            negative: negative && !digits.is_empty(),
            digits: digits.into_boxed_slice(),
            exponent,
        })
    }

    /// The decimal a policy `f64` stands for: the shortest decimal that reads back as the
    /// same `f64` (what Rust prints; `0.1` is 0.1, not 0.1000000000000000055…). `None`
    /// for infinities and NaN.
    pub fn from_f64(f: f64) -> Option<Decimal> {
        if !f.is_finite() {
            return None;
        }
        Decimal::parse(&format!("{f:e}"))
    }

    /// The exact decimal of a JSON number value as serde_json holds it (integers exactly,
    /// floats as [`from_f64`](Self::from_f64)).
    pub fn from_number(n: &serde_json::Number) -> Option<Decimal> {
        if let Some(i) = n.as_i64() {
            Decimal::parse(&i.to_string())
        } else if let Some(u) = n.as_u64() {
            Decimal::parse(&u.to_string())
        } else {
            Decimal::from_f64(n.as_f64()?)
        }
    }

    fn sign(&self) -> i8 {
        match (self.digits.is_empty(), self.negative) {
            (true, _) => 0,
            (false, true) => -1,
            (false, false) => 1,
        }
    }
}

fn len_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (self.sign(), other.sign());
        if a != b || a == 0 {
            return a.cmp(&b);
        }
        let magnitude = self
            .exponent
            .cmp(&other.exponent)
            .then_with(|| self.digits.cmp(&other.digits));
        if a < 0 {
            magnitude.reverse()
        } else {
            magnitude
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Where a value is, for duplicate-key messages; built on the stack, rendered only on
/// error.
enum At<'a> {
    Root,
    Key(&'a str, &'a At<'a>),
    Index(usize, &'a At<'a>),
}

impl fmt::Display for At<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            At::Root => f.write_str("$"),
            At::Key(k, up) => write!(f, "{up}.{k}"),
            At::Index(i, up) => write!(f, "{up}[{i}]"),
        }
    }
}

#[derive(Clone, Copy)]
struct ValueSeed<'a> {
    /// Arrays and objects enclosing this value.
    depth: usize,
    at: &'a At<'a>,
    problem: &'a Cell<Option<BodyError>>,
}

impl ValueSeed<'_> {
    fn fail<E: de::Error>(&self, problem: BodyError) -> E {
        let message = problem.to_string();
        self.problem.set(Some(problem));
        E::custom(message)
    }

    fn enter<E: de::Error>(&self) -> Result<usize, E> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(self.fail(BodyError::TooDeep {
                max: MAX_JSON_DEPTH,
            }));
        }
        Ok(self.depth + 1)
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut items = Vec::new();
        loop {
            let at = At::Index(items.len(), self.at);
            let seed = ValueSeed {
                depth,
                at: &at,
                problem: self.problem,
            };
            match seq.next_element_seed(seed)? {
                Some(v) => items.push(v),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.enter()?;
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if key.chars().any(is_refused_key_char) {
                return Err(self.fail(BodyError::InvalidKey {
                    key: super::matchers::clip(&key),
                    at: self.at.to_string(),
                }));
            }
            if object.contains_key(&key) {
                return Err(self.fail(BodyError::DuplicateKey {
                    key: super::matchers::clip(&key),
                    at: self.at.to_string(),
                }));
            }
            let at = At::Key(&key, self.at);
            let value = map.next_value_seed(ValueSeed {
                depth,
                at: &at,
                problem: self.problem,
            })?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use serde_json::json;

    const JSON: Option<&str> = Some("application/json");

    #[test]
    fn parses_valid_json() {
        let v = parse_json_body(br#"{"a": [1, {"b": null}], "c": "\u00e9", "d": 1.5}"#, JSON);
        assert_eq!(
            v.unwrap().value(),
            &json!({"a": [1, {"b": null}], "c": "é", "d": 1.5})
        );
        assert_eq!(parse_json_body(b" 42 ", JSON).unwrap().value(), &json!(42));
        // The same key in different objects is fine.
        assert!(parse_json_body(br#"{"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}"#, JSON).is_ok());
    }

    #[test]
    fn content_types() {
        for ok in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=\"UTF-8\"",
            "application/merge-patch+json",
            "application/vnd.api+json; charset=utf-8",
            "application/json; foo=bar",
        ] {
            assert!(parse_json_body(b"{}", Some(ok)).is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some(""),
            Some("text/plain"),
            Some("text/json"),
            Some("application/jsonp"),
            Some("application/+json"),
            Some("application/x-www-form-urlencoded"),
            Some("application/json; charset=utf-16"),
            Some("application/json; charset=latin1"),
            Some("multipart/form-data; boundary=x"),
        ] {
            let e = parse_json_body(b"{}", bad).unwrap_err();
            assert_eq!(
                (e.code(), e.status()),
                ("unsupported_media_type", 415),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_json_body(b"{}", Some("text/plain"))
                .unwrap_err()
                .to_string(),
            "content type \"text/plain\" is not JSON (expected application/json or \
             application/*+json)"
        );
        assert_eq!(
            parse_json_body(b"{}", None).unwrap_err().to_string(),
            "content type (none) is not JSON (expected application/json or application/*+json)"
        );
    }

    #[test]
    fn invalid_json() {
        for bad in [
            &b""[..],
            b"{",
            b"{\"a\": 1,}",
            b"[1, 2",
            b"{\"a\": 1} x",
            b"{\"a\": 1}{}",
            b"\xef\xbb\xbf{}",
            b"{'a': 1}",
            b"NaN",
            b"\"\\ud800\"",
            b"\"\xff\"",
            b"{\"a\": 01}",
        ] {
            let e = parse_json_body(bad, JSON).unwrap_err();
            assert_eq!(
                (e.code(), e.status()),
                ("invalid_json", 400),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn duplicate_keys_at_any_depth() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"a": 1, "a": 2}"#,
                "the body has the key \"a\" twice in the object at $",
            ),
            (
                br#"{"x": {"y": [0, {"k": 1, "k": 1}]}}"#,
                "the body has the key \"k\" twice in the object at $.x.y[1]",
            ),
            (
                br#"[[[{"amount": 1, "amount": 999999}]]]"#,
                "the body has the key \"amount\" twice in the object at $[0][0][0]",
            ),
            // Escapes are decoded before keys are compared.
            (
                br#"{"a": 1, "\u0061": 2}"#,
                "the body has the key \"a\" twice in the object at $",
            ),
        ];
        for (body, message) in cases {
            let e = parse_json_body(body, JSON).unwrap_err();
            assert_eq!((e.code(), e.status()), ("duplicate_json_key", 400));
            assert_eq!(e.to_string(), *message);
        }
    }

    #[test]
    fn depth_limit() {
        let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(parse_json_body(nested(64).as_bytes(), JSON).is_ok());
        let e = parse_json_body(nested(65).as_bytes(), JSON).unwrap_err();
        assert_eq!((e.code(), e.status()), ("json_too_deep", 400));
        let objects = format!("{}1{}", r#"{"a":"#.repeat(65), "}".repeat(65));
        assert_eq!(
            parse_json_body(objects.as_bytes(), JSON)
                .unwrap_err()
                .code(),
            "json_too_deep"
        );
        // Far deeper than serde_json's own limit: still our error, no stack overflow.
        let e = parse_json_body(nested(100_000).as_bytes(), JSON).unwrap_err();
        assert_eq!(e.code(), "json_too_deep");
    }

    #[test]
    fn too_large_is_the_callers() {
        let e = BodyError::TooLarge {
            cap: DEFAULT_BODY_CAP,
        };
        assert_eq!((e.code(), e.status()), ("body_too_large", 413));
        assert_eq!(e.to_string(), "the body is larger than 1048576 bytes");
    }

    fn dec(s: &str) -> Decimal {
        Decimal::parse(s).unwrap_or_else(|| panic!("{s:?} is not a number"))
    }

    #[test]
    fn decimal_parsing_normalises() {
        for (a, b) in [
            ("100", "1e2"),
            ("100", "100.0"),
            ("100", "1E2"),
            ("100", "1E+2"),
            ("100", "0.1e3"),
            ("100", "10000e-2"),
            ("1", "0.1e1"),
            ("0", "-0"),
            ("0", "0.000"),
            ("0", "-0.0e-999"),
            ("0", "0e99999999999999999999999"),
            ("-1.5", "-15e-1"),
            ("0.001", "1e-3"),
            ("0.001", "0.00100"),
        ] {
            assert_eq!(dec(a), dec(b), "{a} vs {b}");
            assert_eq!(dec(a).cmp(&dec(b)), Ordering::Equal);
        }
        for bad in [
            "", "-", ".5", "1.", "1e", "1e+", "e1", "1x", "--1", "1.2.3", "0x10",
        ] {
            assert_eq!(Decimal::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn decimal_ordering() {
        // Each strictly less than the next.
        let ascending = [
            "-1e300",
            "-100.000000000000001",
            "-100",
            "-99.99999999999999999",
            "-1",
            "-0.1000000000000000055511151231257827",
            "-0.1",
            "-1e-400",
            "0",
            "1e-99999999999999999999",
            "1e-400",
            "0.0999999999999999999",
            "0.1",
            "0.1000000000000000055511151231257827",
            "0.1000000000000000055511151231257827021181583404541015625",
            "0.10000000000000001",
            "1",
            "99.999",
            "100",
            "100.000000000000001",
            "1e300",
        ];
        for w in ascending.windows(2) {
            assert!(dec(w[0]) < dec(w[1]), "{} < {}", w[0], w[1]);
            assert!(dec(w[1]) > dec(w[0]), "{} > {}", w[1], w[0]);
        }
        // The exact f64 0.1 is the 55-digit decimal, a policy's 0.1 is 0.1.
        assert_eq!(
            dec("0.1000000000000000055511151231257827021181583404541015625"),
            Decimal::parse(&format!("{:.55}", 0.1_f64)).unwrap()
        );
        assert_eq!(Decimal::from_f64(0.1).unwrap(), dec("0.1"));
        assert_eq!(Decimal::from_f64(100.0).unwrap(), dec("100"));
        assert_eq!(Decimal::from_f64(-0.0).unwrap(), dec("0"));
        assert_eq!(Decimal::from_f64(1e300).unwrap(), dec("1e300"));
        assert_eq!(Decimal::from_f64(f64::INFINITY), None);
        assert_eq!(Decimal::from_f64(f64::NAN), None);
        assert_eq!(
            Decimal::from_number(&serde_json::Number::from(u64::MAX)).unwrap(),
            dec("18446744073709551615")
        );
        assert_eq!(
            Decimal::from_number(&serde_json::Number::from(i64::MIN)).unwrap(),
            dec("-9223372036854775808")
        );
    }

    #[test]
    fn decimal_long_digit_strings_are_cheap() {
        let zeros = "0".repeat(10_000);
        let long_fraction = format!("100.{zeros}1");
        let long_under = format!("99.{}", "9".repeat(10_000));
        let tiny = format!("0.{zeros}1");
        let started = std::time::Instant::now();
        for _ in 0..100 {
            assert!(dec(&long_fraction) > dec("100"));
            assert!(dec(&long_under) < dec("100"));
            assert!(dec(&tiny) > dec("0"));
            assert!(dec(&tiny) < dec("1e-10000"));
            assert!(dec(&format!("1{zeros}")) > dec("1e9999"));
            assert_eq!(dec(&format!("1{zeros}")), dec("1e10000"));
        }
        // 600 comparisons of 10k-digit numbers, parsing included; generous for CI.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn numbers_keep_their_text() {
        let body = br#"{"a": {"b\u0022c": [1, {"x": 2}, 100.000000000000001]}, "n": -0, "s": "1",
            "k\\": 1E2, "arr": [], "t": {"u": [ [3, "]", {"v": "}"}], 4 ]}}"#;
        let b = parse_json_body(body, JSON).unwrap();
        assert_eq!(b.raw(), &body[..]);
        assert_eq!(
            b.number_text(&["a", "b\"c", "2"]),
            Some("100.000000000000001")
        );
        assert_eq!(b.number_text(&["a", "b\"c", "0"]), Some("1"));
        assert_eq!(b.number_text(&["a", "b\"c", "1", "x"]), Some("2"));
        assert_eq!(b.number_text(&["n"]), Some("-0"));
        assert_eq!(b.number_text(&["k\\"]), Some("1E2"));
        assert_eq!(b.number_text(&["t", "u", "1"]), Some("4"));
        assert_eq!(b.number_text(&["t", "u", "0", "0"]), Some("3"));
        assert_eq!(b.number_text(&["s"]), None);
        assert_eq!(b.number_text(&["a"]), None);
        assert_eq!(b.number_text(&["a", "b\"c", "3"]), None);
        assert_eq!(b.number_text(&["arr", "0"]), None);
        assert_eq!(b.number_text(&["missing"]), None);
        assert_eq!(b.number_text(&["n", "x"]), None);
        let long = format!("{{\"amount\": 100.{}1}}", "0".repeat(10_000));
        let b = parse_json_body(long.as_bytes(), JSON).unwrap();
        assert_eq!(b.number_text(&["amount"]).map(str::len), Some(10_005));
    }

    #[test]
    fn numbers_beyond_f64_are_refused() {
        for bad in [
            "1e400".to_owned(),
            "-1e400".to_owned(),
            "{\"amount\": 1e99999999999999999999}".to_owned(),
            format!("[1{}]", "0".repeat(10_000)),
        ] {
            let e = parse_json_body(bad.as_bytes(), JSON).unwrap_err();
            assert_eq!(
                (e.code(), e.status()),
                ("json_number_invalid", 400),
                "{bad:.40}: {e}"
            );
            assert!(
                e.to_string().starts_with("the body has a number outside"),
                "{e}"
            );
        }
        // Underflow is fine: the exact text is compared.
        for ok in [
            "1e-400",
            "0e99999999999999999999",
            "1e308",
            "-1e-99999999999999999999",
        ] {
            assert!(parse_json_body(ok.as_bytes(), JSON).is_ok(), "{ok}");
        }
    }

    #[test]
    fn keys_with_control_characters_are_refused() {
        let cases: &[(&[u8], &str)] = &[
            (
                br#"{"amount\u0000": 5}"#,
                "the body has the key \"amount\\0\" with a control character in the object at $",
            ),
            (
                br#"{"a": {"x\u001fy": 1}}"#,
                "the body has the key \"x\\u{1f}y\" with a control character in the object at $.a",
            ),
            (
                br#"[{"\u007f": 1}]"#,
                "the body has the key \"\\u{7f}\" with a control character in the object at $[0]",
            ),
            (
                "{\"a\u{85}\": 1}".as_bytes(),
                "the body has the key \"a\\u{85}\" with a control character in the object at $",
            ),
            (
                br#"{"a\u2028": 1}"#,
                "the body has the key \"a\\u{2028}\" with a control character in the object at $",
            ),
            (
                br#"{"a\u2029": 1}"#,
                "the body has the key \"a\\u{2029}\" with a control character in the object at $",
            ),
            (
                br#"{"\n": 1}"#,
                "the body has the key \"\\n\" with a control character in the object at $",
            ),
        ];
        for (body, message) in cases {
            let e = parse_json_body(body, JSON).unwrap_err();
            assert_eq!((e.code(), e.status()), ("json_key_invalid", 400));
            assert_eq!(e.to_string(), *message);
        }
        // Refused before the duplicate check would see `amount` twice (it would not).
        let e = parse_json_body(br#"{"amount": 1, "amount\u0000": 2}"#, JSON).unwrap_err();
        assert_eq!(e.code(), "json_key_invalid");
        // Control characters in string values, and format characters in keys, are fine.
        assert!(parse_json_body(br#"{"a": "x\u0000y", "b\u200b": 1, "\u00e9": 2}"#, JSON).is_ok());
    }
}
