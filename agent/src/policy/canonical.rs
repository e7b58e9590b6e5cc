//! Request-target normalisation: the ONE canonical form of a request path.
//!
//! The proxy calls [`normalize`] once per request. Its output is what the policy is matched
//! against AND what is forwarded upstream, so the upstream can never see a path that the
//! policy did not see. Inputs that could be read two ways are rejected, never repaired.
//!
//! Rules, applied to an origin-form request-target (`/path?query`):
//!
//! - the target must start with `/` (absolute-form `http://x/`, authority-form and `*` are
//!   rejected) and must not contain a fragment (`#`);
//! - the query is split off at the first `?` and kept verbatim (not decoded); it may not
//!   contain control characters, spaces or non-ASCII characters;
//! - in the path, percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded exactly once (`%61` → `a`, but `%2561` stays `%2561`); all other
//!   percent-encodings stay encoded with uppercase hex (`%c3%a9` → `%C3%A9`);
//! - rejected: an encoded `/` or `\`, a raw `\`, NUL (raw or `%00`), any other control
//!   character (raw or encoded), invalid percent-encoding, a percent-decoded path that is
//!   not valid UTF-8, a `;` (path parameters; see [`normalize_with`] for the opt-in), raw
//!   non-ASCII characters and any other character RFC 3986 does not allow in a path;
//! - dot-segments (`.` and `..`, including those spelled `%2e`) are resolved as in
//!   RFC 3986 §5.2.4, but a `..` that would climb above the root is rejected;
//! - an empty segment (`//`) is rejected; a trailing `/` is KEPT: `/a` and `/a/` are
//!   different resources to most servers (S3 keys `dir` and `dir/`, a PEP 503 index's
//!   `/simple/pkg/`), so the canonical form never adds or removes one. A path that ends in
//!   a dot-segment ends with `/` (RFC 3986 §5.2.4: `/a/b/..` is `/a/`, `/a/.` is `/a/`).

use std::fmt;

/// A request path in canonical form, plus the raw query. Built only by [`normalize`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CanonicalPath {
    /// Canonical path: starts with `/`, no empty, `.` or `..` segments; a trailing `/` is
    /// kept.
    path: String,
    /// Raw query without the `?`; `Some("")` for a target ending in `?`.
    query: Option<String>,
}

impl CanonicalPath {
    /// The canonical path (starts with `/`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The raw query, without the leading `?`, exactly as received.
    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// The path segments, in order; the root `/` has none. Segments are never empty (a
    /// trailing `/` adds no segment; see [`CanonicalPath::has_trailing_slash`]).
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path.split('/').filter(|s| !s.is_empty())
    }

    /// Whether the path ends with `/` after at least one segment (`/a/`; not the root).
    pub fn has_trailing_slash(&self) -> bool {
        self.path.len() > 1 && self.path.ends_with('/')
    }

    /// The request-target to forward upstream: the canonical path plus `?query`.
    pub fn as_request_target(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

impl fmt::Display for CanonicalPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// Why a request-target was rejected. Every variant names the offending input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// The request-target is empty.
    #[error("the request target is empty")]
    Empty,
    /// The target does not start with `/` (absolute-form, authority-form, `*`, ...).
    #[error("{target:?}: {}", self.problem())]
    NotOriginForm {
        /// The offending request-target.
        target: String,
    },
    /// The target contains a `#`.
    #[error("{target:?}: {}", self.problem())]
    Fragment {
        /// The offending request-target.
        target: String,
    },
    /// The path contains `%2F` (an encoded `/`).
    #[error("{target:?}: {} ({encoded})", self.problem())]
    EncodedSlash {
        /// The offending request-target.
        target: String,
        /// The encoding as written, e.g. `%2f`.
        encoded: String,
    },
    /// The path contains `%5C` (an encoded `\`).
    #[error("{target:?}: {} ({encoded})", self.problem())]
    EncodedBackslash {
        /// The offending request-target.
        target: String,
        /// The encoding as written, e.g. `%5c`.
        encoded: String,
    },
    /// The path contains a raw `\`.
    #[error("{target:?}: {}", self.problem())]
    Backslash {
        /// The offending request-target.
        target: String,
    },
    /// The target contains NUL, raw or as `%00`.
    #[error("{target:?}: {}", self.problem())]
    Nul {
        /// The offending request-target.
        target: String,
    },
    /// The target contains a control character, raw or (in the path) percent-encoded.
    #[error("{target:?}: {}", self.problem())]
    ControlChar {
        /// The offending request-target.
        target: String,
    },
    /// The target contains a character that is not allowed there (e.g. a space, `|`,
    /// `{`, a raw non-ASCII character).
    #[error("{target:?}: {} {ch:?}", self.problem())]
    InvalidChar {
        /// The offending request-target.
        target: String,
        /// The character.
        ch: char,
    },
    /// A `%` not followed by two hex digits.
    #[error("{target:?}: {} at byte {at}", self.problem())]
    InvalidPercentEncoding {
        /// The offending request-target.
        target: String,
        /// Byte offset of the `%` in the target.
        at: usize,
    },
    /// The percent-decoded path is not valid UTF-8.
    #[error("{target:?}: {}", self.problem())]
    InvalidUtf8 {
        /// The offending request-target.
        target: String,
    },
    /// The path contains `;` (path parameters).
    #[error("{target:?}: {}", self.problem())]
    PathParameter {
        /// The offending request-target.
        target: String,
    },
    /// The path contains an empty segment (`//`).
    #[error("{target:?}: {}", self.problem())]
    EmptySegment {
        /// The offending request-target.
        target: String,
    },
    /// A `..` segment would climb above the root.
    #[error("{target:?}: {}", self.problem())]
    AboveRoot {
        /// The offending request-target.
        target: String,
    },
    /// With path parameters allowed: a segment whose name part (before the first `;`) is
    /// empty, `.` or `..` (`..;/`, `.;x`, `;x`). Servers that strip path parameters would
    /// see a dot-segment or an empty segment that normalisation did not resolve.
    #[error("{target:?}: {}", self.problem())]
    AmbiguousPathParameter {
        /// The offending request-target.
        target: String,
    },
}

/// Options of [`normalize_with`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NormalizeOptions {
    /// Accept `;` (path parameters) in path segments. The parameters stay part of the
    /// segment, for matching and forwarding: `/a;v=1` has the one segment `a;v=1`. A
    /// segment whose part before the first `;` is empty, `.` or `..` is still rejected.
    pub allow_semicolon: bool,
}

impl PathError {
    /// A stable snake_case code for logs, metrics and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NotOriginForm { .. } => "not_origin_form",
            Self::Fragment { .. } => "fragment",
            Self::EncodedSlash { .. } => "encoded_slash",
            Self::EncodedBackslash { .. } => "encoded_backslash",
            Self::Backslash { .. } => "backslash",
            Self::Nul { .. } => "nul",
            Self::ControlChar { .. } => "control_character",
            Self::InvalidChar { .. } => "invalid_character",
            Self::InvalidPercentEncoding { .. } => "invalid_percent_encoding",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::PathParameter { .. } => "path_parameter",
            Self::EmptySegment { .. } => "empty_segment",
            Self::AboveRoot { .. } => "above_root",
            Self::AmbiguousPathParameter { .. } => "ambiguous_path_parameter",
        }
    }

    /// A short human description of the problem, without the input.
    pub fn problem(&self) -> &'static str {
        match self {
            Self::Empty => "the request target is empty",
            Self::NotOriginForm { .. } => "not an origin-form request target (must start with '/')",
            Self::Fragment { .. } => "a fragment ('#') is not allowed",
            Self::EncodedSlash { .. } => "an encoded '/' is not allowed",
            Self::EncodedBackslash { .. } => "an encoded '\\' is not allowed",
            Self::Backslash { .. } => "'\\' is not allowed",
            Self::Nul { .. } => "NUL is not allowed",
            Self::ControlChar { .. } => "control characters are not allowed",
            Self::InvalidChar { .. } => "character not allowed here:",
            Self::InvalidPercentEncoding { .. } => "invalid percent-encoding",
            Self::InvalidUtf8 { .. } => "the decoded path is not valid UTF-8",
            Self::PathParameter { .. } => "path parameters (';') are not allowed",
            Self::EmptySegment { .. } => "empty path segments ('//') are not allowed",
            Self::AboveRoot { .. } => "'..' climbs above the root",
            Self::AmbiguousPathParameter { .. } => {
                "a path parameter (';') on an empty or dot segment is ambiguous"
            }
        }
    }
}

/// Normalises an origin-form request-target (`/a/b?x=1`) into its canonical form.
///
/// See the module documentation for the rules. Same as [`normalize_with`] with the
/// default options (no `;`).
pub fn normalize(target: &str) -> Result<CanonicalPath, PathError> {
    normalize_with(target, NormalizeOptions::default())
}

/// [`normalize`] with options; use `allow_semicolon` only for a destination that opts in
/// ([`Destination::allows_path_params`](super::Destination::allows_path_params)).
pub fn normalize_with(target: &str, options: NormalizeOptions) -> Result<CanonicalPath, PathError> {
    let owned = || target.to_owned();
    if target.is_empty() {
        return Err(PathError::Empty);
    }
    if !target.starts_with('/') {
        return Err(PathError::NotOriginForm { target: owned() });
    }
    if target.contains('#') {
        return Err(PathError::Fragment { target: owned() });
    }
    let (raw_path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if let Some(q) = query {
        check_query(q, target)?;
    }

    let path = match already_canonical(raw_path) {
        Some(path) => path.to_owned(),
        None => normalize_path(raw_path, target, options)?,
    };
    Ok(CanonicalPath {
        path,
        query: query.map(str::to_owned),
    })
}

/// The full algorithm for the path part of `target`.
fn normalize_path(
    raw_path: &str,
    target: &str,
    options: NormalizeOptions,
) -> Result<String, PathError> {
    let owned = || target.to_owned();
    let raw_segments: Vec<&str> = raw_path[1..].split('/').collect();
    let last = raw_segments.len() - 1;
    let mut segments: Vec<String> = Vec::with_capacity(raw_segments.len());
    // Whether the output ends with '/': a trailing '/' or a final dot-segment.
    let mut trailing_slash = false;
    let mut offset = 1; // byte offset of the current segment in `target`
    for (i, raw) in raw_segments.iter().enumerate() {
        let segment = decode_segment(raw, offset, target, options)?;
        offset += raw.len() + 1;
        if let Some((name, _)) = segment.split_once(';')
            && matches!(name, "" | "." | "..")
        {
            return Err(PathError::AmbiguousPathParameter { target: owned() });
        }
        trailing_slash = i == last && matches!(segment.as_str(), "" | "." | "..");
        match segment.as_str() {
            // A trailing '/' (and the root itself) is kept; anything else empty is `//`.
            "" if i == last => {}
            "" => return Err(PathError::EmptySegment { target: owned() }),
            "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::AboveRoot { target: owned() });
                }
            }
            _ => segments.push(segment),
        }
    }

    let mut path = String::with_capacity(raw_path.len());
    for s in &segments {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    Ok(path)
}

/// The fast path: `raw_path` (starting with '/'), if it is already canonical: only raw
/// path characters (no '%', no ';'), no empty segment but a trailing one, and no
/// dot-segment. [`normalize_path`] would return exactly this, with any options.
fn already_canonical(raw_path: &str) -> Option<&str> {
    let path = match raw_path.strip_suffix('/') {
        Some("") => return Some("/"),
        Some(p) => p,
        None => raw_path,
    };
    let bytes = path.as_bytes();
    let mut segment_start = 1;
    for i in 1..=bytes.len() {
        if i == bytes.len() || bytes[i] == b'/' {
            match &bytes[segment_start..i] {
                b"" | b"." | b".." => return None,
                _ => {}
            }
            segment_start = i + 1;
        } else if !is_raw_pchar(bytes[i]) {
            return None;
        }
    }
    Some(raw_path)
}

/// The query stays verbatim; it only must not smuggle bytes that no HTTP parser should pass.
fn check_query(query: &str, target: &str) -> Result<(), PathError> {
    for ch in query.chars() {
        match ch {
            '\0' => {
                return Err(PathError::Nul {
                    target: target.to_owned(),
                });
            }
            c if c.is_ascii_control() => {
                return Err(PathError::ControlChar {
                    target: target.to_owned(),
                });
            }
            ' ' => return Err(invalid_char(target, ch)),
            c if !c.is_ascii() => return Err(invalid_char(target, ch)),
            _ => {}
        }
    }
    Ok(())
}

fn invalid_char(target: &str, ch: char) -> PathError {
    PathError::InvalidChar {
        target: target.to_owned(),
        ch,
    }
}

/// Unreserved characters (RFC 3986 §2.3): decoded when percent-encoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters allowed raw in a path segment: unreserved, sub-delims except ';', ':', '@'.
fn is_raw_pchar(b: u8) -> bool {
    is_unreserved(b)
        || matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+')
        || matches!(b, b',' | b'=' | b':' | b'@')
}

/// Decodes one path segment: unreserved escapes decoded, others re-emitted with uppercase
/// hex. `offset` is the segment's byte offset in `target` (for error positions).
fn decode_segment(
    raw: &str,
    offset: usize,
    target: &str,
    options: NormalizeOptions,
) -> Result<String, PathError> {
    let owned = || target.to_owned();
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    // Every byte of the segment after percent-decoding, to check UTF-8 validity.
    let mut decoded: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let byte = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| h << 4 | l),
                _ => None,
            };
            let Some(byte) = byte else {
                return Err(PathError::InvalidPercentEncoding {
                    target: owned(),
                    at: offset + i,
                });
            };
            let encoded = &raw[i..i + 3];
            match byte {
                0 => return Err(PathError::Nul { target: owned() }),
                b'/' => {
                    return Err(PathError::EncodedSlash {
                        target: owned(),
                        encoded: encoded.to_owned(),
                    });
                }
                b'\\' => {
                    return Err(PathError::EncodedBackslash {
                        target: owned(),
                        encoded: encoded.to_owned(),
                    });
                }
                c if c.is_ascii_control() => {
                    return Err(PathError::ControlChar { target: owned() });
                }
                c if is_unreserved(c) => out.push(char::from(c)),
                _ => out.push_str(&encoded.to_ascii_uppercase()),
            }
            decoded.push(byte);
            i += 3;
            continue;
        }
        match b {
            0 => return Err(PathError::Nul { target: owned() }),
            b'\\' => return Err(PathError::Backslash { target: owned() }),
            b';' if options.allow_semicolon => out.push(';'),
            b';' => return Err(PathError::PathParameter { target: owned() }),
            c if c.is_ascii_control() => return Err(PathError::ControlChar { target: owned() }),
            c if is_raw_pchar(c) => out.push(char::from(c)),
            _ => {
                let ch = raw[i..]
                    .chars()
                    .next()
                    .unwrap_or(char::REPLACEMENT_CHARACTER);
                return Err(invalid_char(target, ch));
            }
        }
        decoded.push(b);
        i += 1;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8 { target: owned() });
    }
    Ok(out)
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Ok(expected request-target)` or `Err(error code)`.
    type Expect = Result<&'static str, &'static str>;

    const CASES: &[(&str, Expect)] = &[
        // Plain paths.
        ("/", Ok("/")),
        ("/a", Ok("/a")),
        ("/a/b/c", Ok("/a/b/c")),
        ("/v1/charges", Ok("/v1/charges")),
        ("/A/B", Ok("/A/B")),
        ("/a-b_c.d~e", Ok("/a-b_c.d~e")),
        ("/a:b@c", Ok("/a:b@c")),
        ("/!$&'()*+,=", Ok("/!$&'()*+,=")),
        ("/...", Ok("/...")),
        ("/.a/a.", Ok("/.a/a.")),
        ("/a..b", Ok("/a..b")),
        ("/*", Ok("/*")),
        // Trailing slash.
        ("/a/", Ok("/a/")),
        ("/a/b/", Ok("/a/b/")),
        ("/a/?x=1", Ok("/a/?x=1")),
        // Empty segments.
        ("//", Err("empty_segment")),
        ("//a", Err("empty_segment")),
        ("/a//b", Err("empty_segment")),
        ("/a//", Err("empty_segment")),
        ("///", Err("empty_segment")),
        ("/a/.//b", Err("empty_segment")),
        // Dot segments.
        ("/.", Ok("/")),
        ("/./", Ok("/")),
        ("/a/./b", Ok("/a/b")),
        ("/a/.", Ok("/a/")),
        ("/a/b/..", Ok("/a/")),
        ("/a/b/../", Ok("/a/")),
        ("/a/b/../c", Ok("/a/c")),
        ("/a/../b/../c", Ok("/c")),
        ("/a/..", Ok("/")),
        ("/a/b/../../c", Ok("/c")),
        ("/./a/./b/.", Ok("/a/b/")),
        ("/..", Err("above_root")),
        ("/../", Err("above_root")),
        ("/a/../..", Err("above_root")),
        ("/a/../../b", Err("above_root")),
        ("/../etc/passwd", Err("above_root")),
        ("/./..", Err("above_root")),
        // Encoded dots are dots.
        ("/%2e", Ok("/")),
        ("/a/%2e/b", Ok("/a/b")),
        ("/a/b/%2e%2e", Ok("/a/")),
        ("/a/b/%2E%2e/", Ok("/a/")),
        ("/a/b/.%2e/c", Ok("/a/c")),
        ("/a/b/%2e./c", Ok("/a/c")),
        ("/%2e%2e", Err("above_root")),
        ("/%2e%2e/etc", Err("above_root")),
        ("/%2E%2E/etc/passwd", Err("above_root")),
        ("/a/%2e%2e/%2e%2e/etc", Err("above_root")),
        ("/%2e%2e%2e", Ok("/...")),
        // Unreserved escapes are decoded exactly once.
        ("/%61", Ok("/a")),
        ("/%41%42", Ok("/AB")),
        ("/%7e%5F%2D", Ok("/~_-")),
        ("/%30%39", Ok("/09")),
        ("/a%2db", Ok("/a-b")),
        ("/%2561", Ok("/%2561")),
        ("/%252e%252e", Ok("/%252e%252e")),
        ("/%25", Ok("/%25")),
        // Reserved and other escapes stay encoded, hex uppercased.
        ("/%3a", Ok("/%3A")),
        ("/%3A", Ok("/%3A")),
        ("/a%3bb", Ok("/a%3Bb")),
        ("/%3f", Ok("/%3F")),
        ("/%23", Ok("/%23")),
        ("/%20", Ok("/%20")),
        ("/%40", Ok("/%40")),
        ("/%7b%7D", Ok("/%7B%7D")),
        ("/%2a", Ok("/%2A")),
        // UTF-8.
        ("/caf%c3%a9", Ok("/caf%C3%A9")),
        ("/caf%C3%A9", Ok("/caf%C3%A9")),
        ("/%e2%82%ac", Ok("/%E2%82%AC")),
        ("/%f0%9f%98%80", Ok("/%F0%9F%98%80")),
        ("/%c3", Err("invalid_utf8")),
        ("/%c3/%a9", Err("invalid_utf8")),
        ("/%ff", Err("invalid_utf8")),
        ("/%c0%af", Err("invalid_utf8")),
        ("/%e2%82", Err("invalid_utf8")),
        ("/%ed%a0%80", Err("invalid_utf8")),
        ("/café", Err("invalid_character")),
        ("/\u{202e}", Err("invalid_character")),
        // Encoded separators.
        ("/a%2fb", Err("encoded_slash")),
        ("/a%2Fb", Err("encoded_slash")),
        ("/%2f", Err("encoded_slash")),
        ("/..%2f..%2fetc", Err("encoded_slash")),
        ("/a%5cb", Err("encoded_backslash")),
        ("/a%5Cb", Err("encoded_backslash")),
        ("/a\\b", Err("backslash")),
        ("/\\..\\", Err("backslash")),
        // NUL and control characters.
        ("/a%00", Err("nul")),
        ("/a\0b", Err("nul")),
        ("/a?x=\0", Err("nul")),
        ("/a%0d%0aHost:x", Err("control_character")),
        ("/a%09", Err("control_character")),
        ("/a%7f", Err("control_character")),
        ("/a\tb", Err("control_character")),
        ("/a\r\n", Err("control_character")),
        ("/a?x=\r\n", Err("control_character")),
        // Invalid percent-encoding.
        ("/%zz", Err("invalid_percent_encoding")),
        ("/%4", Err("invalid_percent_encoding")),
        ("/%", Err("invalid_percent_encoding")),
        ("/a%g1", Err("invalid_percent_encoding")),
        ("/%%41", Err("invalid_percent_encoding")),
        ("/%4?x", Err("invalid_percent_encoding")),
        // Path parameters.
        ("/a;b", Err("path_parameter")),
        ("/..;/", Err("path_parameter")),
        ("/a/..;/b", Err("path_parameter")),
        ("/a;jsessionid=1", Err("path_parameter")),
        // Characters not allowed in a path.
        ("/a b", Err("invalid_character")),
        ("/a|b", Err("invalid_character")),
        ("/{id}", Err("invalid_character")),
        ("/a\"b", Err("invalid_character")),
        ("/<script>", Err("invalid_character")),
        ("/a[0]", Err("invalid_character")),
        ("/a^b", Err("invalid_character")),
        ("/a`b", Err("invalid_character")),
        // Fragments.
        ("/a#b", Err("fragment")),
        ("/a#", Err("fragment")),
        ("/a?x=1#frag", Err("fragment")),
        ("/%23ok#no", Err("fragment")),
        // Not origin-form.
        ("", Err("empty")),
        ("*", Err("not_origin_form")),
        ("a/b", Err("not_origin_form")),
        ("http://x/", Err("not_origin_form")),
        ("https://api.example.com/v1", Err("not_origin_form")),
        ("example.com:443", Err("not_origin_form")),
        ("?x=1", Err("not_origin_form")),
        (" /a", Err("not_origin_form")),
        // Query is preserved verbatim.
        ("/a?x=1", Ok("/a?x=1")),
        ("/a?", Ok("/a?")),
        ("/?x", Ok("/?x")),
        ("/a?x=%2f&y=%zz", Ok("/a?x=%2f&y=%zz")),
        ("/a?x=a?b", Ok("/a?x=a?b")),
        ("/a?x=/../b", Ok("/a?x=/../b")),
        ("/a?expand[]=customer", Ok("/a?expand[]=customer")),
        ("/a/./b?q=%61", Ok("/a/b?q=%61")),
        ("/%61?%61", Ok("/a?%61")),
        ("/a?x=1;y=2", Ok("/a?x=1;y=2")),
        ("/a?x=\\", Ok("/a?x=\\")),
        ("/a?x=1 2", Err("invalid_character")),
        ("/a?x=é", Err("invalid_character")),
        // Errors in the path are found even with a query.
        ("/a/../..?x", Err("above_root")),
        ("/a%2f?x", Err("encoded_slash")),
    ];

    #[test]
    fn table() {
        assert!(CASES.len() >= 100, "{} cases", CASES.len());
        let mut failures = Vec::new();
        for (input, expected) in CASES {
            let got = normalize(input)
                .map(|c| c.as_request_target())
                .map_err(|e| e.code());
            let ok = match (&got, expected) {
                (Ok(g), Ok(e)) => g == e,
                (Err(g), Err(e)) => g == e,
                _ => false,
            };
            if !ok {
                failures.push(format!("{input:?}: expected {expected:?}, got {got:?}"));
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }

    #[test]
    fn equivalent_spellings_share_one_form() {
        let forms: Vec<_> = ["/a", "/%61", "/b/../a", "/./a"]
            .iter()
            .map(|t| normalize(t).map(|c| c.path().to_owned()))
            .collect();
        assert!(forms.iter().all(|f| f.as_deref() == Ok("/a")), "{forms:?}");
        // A trailing slash is part of the resource; its spellings share their own form.
        let forms: Vec<_> = ["/a/", "/%61/", "/a/b/..", "/a/.", "/a/./", "/b/../a/"]
            .iter()
            .map(|t| normalize(t).map(|c| c.path().to_owned()))
            .collect();
        assert!(forms.iter().all(|f| f.as_deref() == Ok("/a/")), "{forms:?}");
        assert!(normalize("/a/").is_ok_and(|c| c.has_trailing_slash()));
        assert!(!normalize("/").is_ok_and(|c| c.has_trailing_slash()));
        // Idempotent, and never adds or removes a slash.
        for t in ["/a", "/a/", "/a/b/", "/x/%7E/", "/a/b/c"] {
            let once = normalize(t).unwrap_or_else(|e| panic!("{e}"));
            let twice = normalize(once.path()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(once, twice);
            assert_eq!(once.path().ends_with('/'), t.ends_with('/'), "{t}");
        }
    }

    #[test]
    fn accessors() {
        let c = normalize("/a/%62/c?x=1&y").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.path(), "/a/b/c");
        assert_eq!(c.query(), Some("x=1&y"));
        assert_eq!(c.segments().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(c.as_request_target(), "/a/b/c?x=1&y");
        assert_eq!(c.to_string(), "/a/b/c?x=1&y");
        let root = normalize("/").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(root.segments().count(), 0);
        assert_eq!(root.query(), None);
    }

    #[test]
    fn errors_name_the_input() {
        let e = normalize("/a%2fb").expect_err("encoded slash");
        assert_eq!(
            e.to_string(),
            "\"/a%2fb\": an encoded '/' is not allowed (%2f)"
        );
        let e = normalize("/x/%zz").expect_err("bad escape");
        assert_eq!(
            e.to_string(),
            "\"/x/%zz\": invalid percent-encoding at byte 3"
        );
        let e = normalize("/a b").expect_err("space");
        assert_eq!(e.to_string(), "\"/a b\": character not allowed here: ' '");
    }

    #[test]
    fn path_parameters_when_allowed() {
        let opts = NormalizeOptions {
            allow_semicolon: true,
        };
        let cases: &[(&str, Expect)] = &[
            ("/a;b", Ok("/a;b")),
            ("/cars;color=red/x", Ok("/cars;color=red/x")),
            ("/a;jsessionid=1?x=1", Ok("/a;jsessionid=1?x=1")),
            ("/a;v=1/", Ok("/a;v=1/")),
            ("/%61;%62", Ok("/a;b")),
            ("/a%3Bb", Ok("/a%3Bb")),
            ("/a/..;/b", Err("ambiguous_path_parameter")),
            ("/..;/", Err("ambiguous_path_parameter")),
            ("/a/.;x/b", Err("ambiguous_path_parameter")),
            ("/a/%2e%2e;/b", Err("ambiguous_path_parameter")),
            ("/;x", Err("ambiguous_path_parameter")),
            ("/a/;/b", Err("ambiguous_path_parameter")),
            ("/a;b/../c", Ok("/c")),
            ("/a;b//c", Err("empty_segment")),
            ("/a;b%2fc", Err("encoded_slash")),
            ("/a;b%00", Err("nul")),
        ];
        for (input, expected) in cases {
            let got = normalize_with(input, opts)
                .map(|c| c.as_request_target())
                .map_err(|e| e.code());
            let ok = match (&got, expected) {
                (Ok(g), Ok(e)) => g == e,
                (Err(g), Err(e)) => g == e,
                _ => false,
            };
            assert!(ok, "{input:?}: expected {expected:?}, got {got:?}");
        }
        // Without the option, every ';' is refused.
        assert_eq!(
            normalize("/a;b").map_err(|e| e.code()),
            Err("path_parameter")
        );
        assert_eq!(
            normalize_with("/a;b", NormalizeOptions::default()).map_err(|e| e.code()),
            Err("path_parameter")
        );
    }

    #[test]
    fn fast_path_agrees_with_the_full_algorithm() {
        let mut fast = 0;
        for (input, _) in CASES {
            let raw_path = input.split(['?', '#']).next().unwrap_or_default();
            if !raw_path.starts_with('/') {
                continue;
            }
            if let Some(path) = already_canonical(raw_path) {
                fast += 1;
                for allow_semicolon in [false, true] {
                    let options = NormalizeOptions { allow_semicolon };
                    assert_eq!(
                        normalize_path(raw_path, input, options).as_deref(),
                        Ok(path),
                        "{input:?}"
                    );
                }
            }
        }
        assert!(fast >= 20, "{fast} fast-path cases");
    }
}
