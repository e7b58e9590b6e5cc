//! Request bodies for `json` rules: strict parsing, so that the proxy and the upstream
//! cannot read one body two ways.
//!
//! The caller buffers the body (only when
//! [`Destination::needs_body`](super::Destination::needs_body) says a candidate rule
//! inspects it, and at most the workload's [`body_cap`](super::Workload::body_cap) bytes,
//! else 413 `body_too_large`) and parses it with [`parse_json_body`]. A duplicate key at any
//! depth is refused: serde_json (and many servers) keep the last value, others the first,
//! so a duplicate would let a checked value differ from the one acted on.

use std::cell::Cell;
use std::fmt;

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
            | BodyError::TooDeep { .. } => 400,
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

/// Parses a request body for `json` rules: checks the Content-Type, then parses strictly
/// (no duplicate keys at any depth, nesting at most [`MAX_JSON_DEPTH`], no trailing data).
pub fn parse_json_body(bytes: &[u8], content_type: Option<&str>) -> Result<Value, BodyError> {
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
        Ok(v) => Ok(v),
        Err(e) => Err(problem.take().unwrap_or(BodyError::InvalidJson {
            detail: e.to_string(),
        })),
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
            v.unwrap(),
            json!({"a": [1, {"b": null}], "c": "é", "d": 1.5})
        );
        assert_eq!(parse_json_body(b" 42 ", JSON).unwrap(), json!(42));
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
}
