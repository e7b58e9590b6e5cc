//! Strict HTTP/1.x request framing, checked before hyper sees a byte.
//!
//! The guard sits between a client socket and hyper's HTTP/1 server. It buffers each request
//! head until it is complete, validates it, and only then releases it to hyper; body bytes are
//! released as they are validated (counted for `Content-Length`, chunk by chunk for `chunked`).
//! hyper therefore only ever parses requests whose framing has one reading. When a request is
//! refused the guard stops feeding hyper (reads stay pending, hyper sees neither EOF nor an
//! error) and hands the [`Violation`] to the caller, which records it, answers with
//! [`ViolationKind::status`] on the stream taken back with [`Watch::take_io`], and closes.
//!
//! # What is refused, and why
//!
//! hyper is lenient where a lenient reading lets a second parser (an upstream, an audit
//! reader) frame the same bytes differently: request smuggling. Each refusal below names the
//! rule it enforces.
//!
//! * **Line endings** — CRLF only (RFC 9112 §2.2). A bare LF ([`ViolationKind::BareLf`]) or a
//!   CR not followed by LF ([`ViolationKind::BareCr`]) anywhere in a head, a chunk line or a
//!   trailer section. Empty lines before a request line are tolerated and passed on
//!   (RFC 9112 §2.2 asks servers to ignore at least one).
//! * **Request line** (RFC 9112 §3) — `method SP request-target SP HTTP-version`, single
//!   spaces. The method must be a token (RFC 9110 §9.1, §5.6.2). The target must not hold `#`
//!   (a fragment is never sent, RFC 9112 §3.2; hyper would silently drop it, so the guard and
//!   an upstream would see different paths), a control byte, a space or a non-ASCII byte
//!   (RFC 9112 §3.2, RFC 3986 §2), nor a byte that the `http` crate's URI parser rejects (so
//!   hyper never refuses a target on its own). A target longer than
//!   [`Limits::max_target_bytes`] is `414` (RFC 9112 §3). Only `HTTP/1.0` and `HTTP/1.1` are
//!   served: any other well-formed `HTTP/d.d` is `505` (RFC 9110 §15.6.6) — hyper's parser does
//!   not accept `HTTP/1.2` as 1.1 either — anything else is `400`.
//! * **HTTP/2 prior knowledge** — a connection opening with the HTTP/2 preface
//!   (RFC 9113 §3.4) is refused here; the caller chooses HTTP/2 before the guard.
//! * **Size** — a head (request line, fields, final CRLF) larger than
//!   [`Limits::max_head_bytes`] or with more than [`Limits::max_headers`] fields is `431`
//!   (RFC 6585 §5).
//! * **Field lines** (RFC 9112 §5) — obsolete line folding (RFC 9112 §5.2), a name that is not
//!   a token or is followed by whitespace before the colon (RFC 9112 §5.1), a control byte in
//!   a value (RFC 9110 §5.5). The head is also parsed with `httparse` in its default (strict)
//!   configuration, the parser hyper uses; anything it refuses is refused here too.
//! * **Message framing** (RFC 9112 §6.3) — more than one `Content-Length` field, even with equal
//!   values, or a value other than plain digits (a list like `5, 5`, a sign, inner spaces, a
//!   value above 2^63−1); `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.1:
//!   such a message "ought to be handled as an error"; hyper lets `Transfer-Encoding` win, an
//!   upstream might not); `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1); any
//!   `Transfer-Encoding` other than exactly one field whose value is `chunked` is `501`
//!   (RFC 9112 §6.1). That refuses `gzip, chunked` too: the proxy inspects request bodies, and a
//!   transfer-coded body would be inspected in its coded form while the upstream sees the
//!   decoded one.
//! * **Routing** — more than one `Host` field (RFC 9112 §3.2: a server "MUST respond with a 400").
//! * **Protocol switches** — a request with an `Upgrade` field (RFC 9110 §7.8) or the `CONNECT`
//!   method (RFC 9110 §9.3.6). After either is answered the bytes on the connection are no
//!   longer HTTP requests, and the proxy does not let them through policy.
//! * **Chunked bodies** (RFC 9112 §7.1) — `chunk-size` is 1 to 16 hex digits; a chunk extension
//!   is `;name` or `;name=value` with a token name and a token or quoted-string value, with no
//!   whitespace anywhere (the bad whitespace, BWS, of RFC 9112 §7.1.1 is refused: hyper and many
//!   upstreams disagree on it). At most [`MAX_CHUNK_LINE_BYTES`] per chunk line and
//!   [`MAX_CHUNK_EXT_BYTES`] of extensions per message (hyper stops at 16 KiB without a record).
//!   Chunk data must be followed by exactly CRLF. The trailer section (RFC 9112 §7.1.2) is
//!   checked like a head's field lines; larger than [`Limits::max_trailer_bytes`] or with more
//!   than [`Limits::max_headers`] fields is `431`; fields that frame, route or authenticate a
//!   message (RFC 9110 §6.5.1) are refused.
//!
//! # Use
//!
//! [`Framing`] is the pure state machine: [`Framing::feed`] bytes in, take
//! [`Framing::releasable`] bytes out. [`guard`] wraps a stream for hyper and returns a [`Watch`]
//! to await violations and take the stream back.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use hyper::rt::{Read, ReadBuf, ReadBufCursor, Write};
use tokio::sync::Notify;

/// Longest chunk-size line (size, extensions and CRLF) accepted.
pub const MAX_CHUNK_LINE_BYTES: usize = 4 * 1024;
/// Most chunk-extension bytes (from the first `;` to the CR, per chunk) accepted in one message.
/// hyper refuses a body at 16 KiB of extensions; this stays well below.
pub const MAX_CHUNK_EXT_BYTES: usize = 8 * 1024;
/// Largest `Content-Length` accepted (2^63−1; hyper refuses values near `u64::MAX`).
pub const MAX_CONTENT_LENGTH: u64 = i64::MAX as u64;
/// Most hex digits in a chunk size (16 digits always fit in 64 bits).
const MAX_CHUNK_SIZE_DIGITS: usize = 16;
/// How many bytes of an offending value a violation's text shows.
const CLIP: usize = 80;
/// Headers checked with `httparse` on the stack before falling back to the heap.
const STACK_HEADERS: usize = 128;
/// The smallest free space offered to a read.
const MIN_READ: usize = 4 * 1024;
/// The HTTP/2 connection preface's first line.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Size limits of the guard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line, fields, final CRLF, plus any empty lines before the
    /// request line); larger is `431`. Default 64 KiB. Keep it below hyper's buffer limit
    /// (`max_buf_size`, about 400 KiB by default), or hyper refuses first.
    pub max_head_bytes: usize,
    /// Longest request target; longer is `414`. Default 8 KiB.
    pub max_target_bytes: usize,
    /// Most fields in a head, and in a trailer section; more is `431`. Default 100, hyper's own
    /// default (`max_headers`): do not raise it above hyper's setting.
    pub max_headers: usize,
    /// Largest trailer section (field lines and final CRLF); larger is `431`. Default 8 KiB:
    /// hyper refuses trailer sections of 16 KiB or more on its own (its `max_header_size`,
    /// when unset), so keep this below that.
    pub max_trailer_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_target_bytes: 8 * 1024,
            max_headers: 100,
            max_trailer_bytes: 8 * 1024,
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// The connection opened with the HTTP/2 prior-knowledge preface (RFC 9113 §3.4).
    Http2PriorKnowledge,
    /// The request line is not `method SP target SP version` (RFC 9112 §3).
    RequestLineInvalid,
    /// The method is not a token (RFC 9110 §9.1).
    MethodInvalid,
    /// The target holds `#`, a control byte, a space, a non-ASCII byte, or does not parse as a
    /// URI (RFC 9112 §3.2).
    TargetInvalid,
    /// The target is longer than [`Limits::max_target_bytes`] (RFC 9112 §3).
    UriTooLong,
    /// A well-formed HTTP version other than 1.0 and 1.1 (RFC 9110 §15.6.6).
    VersionUnsupported,
    /// A line ends with LF alone (RFC 9112 §2.2).
    BareLf,
    /// A CR not followed by LF (RFC 9112 §2.2).
    BareCr,
    /// The head is larger than [`Limits::max_head_bytes`] or has more than
    /// [`Limits::max_headers`] fields (RFC 6585 §5).
    HeadersTooLarge,
    /// A field line starts with whitespace: obsolete line folding (RFC 9112 §5.2).
    ObsFold,
    /// A field name is empty, not a token, lacks its colon, or is followed by whitespace
    /// (RFC 9112 §5.1).
    HeaderNameInvalid,
    /// A field value holds a control byte (RFC 9110 §5.5).
    HeaderValueInvalid,
    /// `httparse` (hyper's parser) refused the head for a reason not told apart above.
    HeaderInvalid,
    /// More than one `Content-Length` field (RFC 9112 §6.3).
    ContentLengthDuplicate,
    /// `Content-Length` is not 1 or more digits, or exceeds [`MAX_CONTENT_LENGTH`]
    /// (RFC 9110 §8.6).
    ContentLengthInvalid,
    /// `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.1, §6.3).
    ContentLengthWithTransferEncoding,
    /// `Transfer-Encoding` in an HTTP/1.0 request (RFC 9112 §6.1).
    TransferEncodingHttp10,
    /// `Transfer-Encoding` other than exactly one field `chunked` (RFC 9112 §6.1).
    TransferEncodingUnsupported,
    /// More than one `Host` field (RFC 9112 §3.2).
    HostDuplicate,
    /// The request asks for a protocol upgrade (RFC 9110 §7.8).
    UpgradeRefused,
    /// The request is a `CONNECT` (RFC 9110 §9.3.6).
    ConnectRefused,
    /// A chunk size that is not 1 to 16 hex digits, or is followed by anything but `;` or CRLF
    /// (RFC 9112 §7.1).
    ChunkSizeInvalid,
    /// A chunk extension that is not `;token[=token|quoted-string]` (RFC 9112 §7.1.1).
    ChunkExtensionInvalid,
    /// A chunk line longer than [`MAX_CHUNK_LINE_BYTES`], or more than [`MAX_CHUNK_EXT_BYTES`]
    /// of extensions in one message.
    ChunkExtensionsTooLarge,
    /// Chunk data not followed by exactly CRLF (RFC 9112 §7.1).
    ChunkDataUnterminated,
    /// A trailer field that frames, routes or authenticates a message (RFC 9110 §6.5.1).
    TrailerFieldForbidden,
    /// The trailer section is larger than [`Limits::max_trailer_bytes`] or has more than
    /// [`Limits::max_headers`] fields.
    TrailersTooLarge,
}

impl ViolationKind {
    /// Every kind, in declaration order.
    pub const ALL: [ViolationKind; 27] = [
        Self::Http2PriorKnowledge,
        Self::RequestLineInvalid,
        Self::MethodInvalid,
        Self::TargetInvalid,
        Self::UriTooLong,
        Self::VersionUnsupported,
        Self::BareLf,
        Self::BareCr,
        Self::HeadersTooLarge,
        Self::ObsFold,
        Self::HeaderNameInvalid,
        Self::HeaderValueInvalid,
        Self::HeaderInvalid,
        Self::ContentLengthDuplicate,
        Self::ContentLengthInvalid,
        Self::ContentLengthWithTransferEncoding,
        Self::TransferEncodingHttp10,
        Self::TransferEncodingUnsupported,
        Self::HostDuplicate,
        Self::UpgradeRefused,
        Self::ConnectRefused,
        Self::ChunkSizeInvalid,
        Self::ChunkExtensionInvalid,
        Self::ChunkExtensionsTooLarge,
        Self::ChunkDataUnterminated,
        Self::TrailerFieldForbidden,
        Self::TrailersTooLarge,
    ];

    /// The stable snake_case code, for audit records.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Http2PriorKnowledge => "http2_prior_knowledge",
            Self::RequestLineInvalid => "request_line_invalid",
            Self::MethodInvalid => "method_invalid",
            Self::TargetInvalid => "target_invalid",
            Self::UriTooLong => "uri_too_long",
            Self::VersionUnsupported => "version_unsupported",
            Self::BareLf => "bare_lf",
            Self::BareCr => "bare_cr",
            Self::HeadersTooLarge => "headers_too_large",
            Self::ObsFold => "obs_fold",
            Self::HeaderNameInvalid => "header_name_invalid",
            Self::HeaderValueInvalid => "header_value_invalid",
            Self::HeaderInvalid => "header_invalid",
            Self::ContentLengthDuplicate => "content_length_duplicate",
            Self::ContentLengthInvalid => "content_length_invalid",
            Self::ContentLengthWithTransferEncoding => "content_length_with_transfer_encoding",
            Self::TransferEncodingHttp10 => "transfer_encoding_http10",
            Self::TransferEncodingUnsupported => "transfer_encoding_unsupported",
            Self::HostDuplicate => "host_duplicate",
            Self::UpgradeRefused => "upgrade_refused",
            Self::ConnectRefused => "connect_refused",
            Self::ChunkSizeInvalid => "chunk_size_invalid",
            Self::ChunkExtensionInvalid => "chunk_extension_invalid",
            Self::ChunkExtensionsTooLarge => "chunk_extensions_too_large",
            Self::ChunkDataUnterminated => "chunk_data_unterminated",
            Self::TrailerFieldForbidden => "trailer_field_forbidden",
            Self::TrailersTooLarge => "trailers_too_large",
        }
    }

    /// The status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Self::UriTooLong => 414,
            Self::HeadersTooLarge | Self::TrailersTooLarge => 431,
            Self::TransferEncodingUnsupported => 501,
            Self::VersionUnsupported => 505,
            _ => 400,
        }
    }
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused request: what was wrong, and which request it was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// What was wrong.
    pub kind: ViolationKind,
    /// Human text naming the offending value (clipped, escaped).
    pub detail: String,
    /// The request's method, once its request line parsed.
    pub method: Option<String>,
    /// The request's raw target (clipped, escaped), once its request line parsed.
    pub target: Option<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.detail)
    }
}

impl std::error::Error for Violation {}

/// Where the connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Between requests: the last message (if any) is complete and handed over, and no byte of
    /// a next request arrived (empty lines aside).
    Idle,
    /// Part of a request head arrived; the head is not complete yet.
    Head,
    /// Inside a request body, or validated bytes still wait to be handed to the HTTP parser.
    Body,
    /// A request was refused.
    Failed,
}

// ---------------------------------------------------------------------------------------------
// Byte classes.

const fn class_table(kind: u8) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = match kind {
            // tchar, RFC 9110 §5.6.2
            0 => matches!(b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^'
                | b'_' | b'`' | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z'),
            // field-vchar / SP / HTAB, RFC 9110 §5.5 (obs-text allowed, as httparse does)
            1 => matches!(b, b'\t' | b' '..=0x7E | 0x80..=0xFF),
            // origin-form path bytes the `http` crate accepts ('?' and '#' handled apart)
            2 => matches!(b,
                0x21 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7A | 0x7C | 0x7E
                | b'"' | b'{' | b'}'),
            // query bytes the `http` crate accepts ('#' handled apart)
            3 => matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E),
            // qdtext, RFC 9110 §5.6.4
            _ => matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5B | 0x5D..=0x7E | 0x80..=0xFF),
        };
        i += 1;
    }
    t
}

static TCHAR: [bool; 256] = class_table(0);
static VALUE: [bool; 256] = class_table(1);
static PATH: [bool; 256] = class_table(2);
static QUERY: [bool; 256] = class_table(3);
static QDTEXT: [bool; 256] = class_table(4);

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// `bytes` escaped and clipped, without quotes.
fn clip(bytes: &[u8]) -> String {
    if bytes.len() > CLIP {
        format!("{}…", bytes[..CLIP].escape_ascii())
    } else {
        bytes.escape_ascii().to_string()
    }
}

/// `bytes` escaped, clipped and quoted, for violation texts.
fn show(bytes: &[u8]) -> String {
    format!("\"{}\"", clip(bytes))
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

type Refusal = (ViolationKind, String);

fn refuse<T>(kind: ViolationKind, detail: String) -> Result<T, Refusal> {
    Err((kind, detail))
}

// ---------------------------------------------------------------------------------------------
// Line scanning.

/// Progress through a CRLF-delimited section (a head, a chunk line, a trailer section). Offsets
/// are relative to the section's first byte.
#[derive(Clone, Copy, Debug, Default)]
struct Lines {
    /// Bytes already scanned.
    scanned: usize,
    /// Where the current line starts.
    line_start: usize,
    /// The last scanned byte was a CR.
    cr: bool,
}

enum LineError {
    BareLf(usize),
    BareCr(usize),
    /// The section holds more than its limit of bytes.
    Limit,
}

impl Lines {
    /// The next complete line of `section` as (start, end of content), CRLF excluded; `None` if
    /// more bytes are needed. `limit` is the most bytes the whole section may take.
    fn next(&mut self, section: &[u8], limit: usize) -> Result<Option<(usize, usize)>, LineError> {
        let stop = section.len().min(limit);
        let mut i = self.scanned;
        while i < stop {
            if self.cr {
                if section[i] != b'\n' {
                    return Err(LineError::BareCr(i - 1));
                }
                self.cr = false;
                let start = self.line_start;
                self.line_start = i + 1;
                self.scanned = i + 1;
                return Ok(Some((start, i - 1)));
            }
            match section[i..stop]
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
            {
                None => i = stop,
                Some(k) => {
                    if section[i + k] == b'\n' {
                        return Err(LineError::BareLf(i + k));
                    }
                    self.cr = true;
                    i += k + 1;
                }
            }
        }
        self.scanned = i;
        if section.len() > limit {
            return Err(LineError::Limit);
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------------------------------------
// The state machine.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Head,
    Fixed { remaining: u64 },
    ChunkLine,
    ChunkData { remaining: u64 },
    ChunkCr,
    ChunkLf,
    Trailers,
    Failed,
}

/// What the scan of the current head learned, offsets relative to the head's first byte.
#[derive(Clone, Copy, Debug, Default)]
struct HeadInfo {
    request_line: bool,
    http10: bool,
    headers: usize,
    cl_count: usize,
    cl: (usize, usize),
    te_count: usize,
    te: (usize, usize),
    host_count: usize,
    upgrade: bool,
}

/// The strict HTTP/1.x request-framing state machine.
///
/// Bytes go in with [`feed`](Self::feed) (or [`read_buf`](Self::read_buf) and
/// [`filled`](Self::filled), to read straight into the guard's buffer) and come out, once
/// validated, from [`releasable`](Self::releasable) and [`release`](Self::release). The outcome
/// and the bytes released do not depend on how the input is split.
#[derive(Debug)]
pub struct Framing {
    limits: Limits,
    /// Always initialised; `start..valid` is releasable, `valid..end` is not yet validated.
    buf: Vec<u8>,
    start: usize,
    valid: usize,
    end: usize,
    /// Stream offset of `buf[0]`.
    base: u64,
    state: State,
    lines: Lines,
    head: HeadInfo,
    /// Chunk-extension bytes in the current message.
    ext_bytes: usize,
    /// Fields in the current trailer section.
    trailers: usize,
    /// Method and target of the current request (their first bytes), kept for violations
    /// found in its body; escaped only when a violation is built.
    method: Vec<u8>,
    target: Vec<u8>,
    has_request: bool,
    /// Stream offsets where validated heads end, not yet fully released.
    head_ends: VecDeque<u64>,
    requests: u64,
    violation: Option<Violation>,
}

impl Framing {
    /// A guard at the start of a connection.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            buf: Vec::new(),
            start: 0,
            valid: 0,
            end: 0,
            base: 0,
            state: State::Head,
            lines: Lines::default(),
            head: HeadInfo::default(),
            ext_bytes: 0,
            trailers: 0,
            method: Vec::new(),
            target: Vec::new(),
            has_request: false,
            head_ends: VecDeque::new(),
            requests: 0,
            violation: None,
        }
    }

    /// Appends client bytes and validates as far as they allow. Returns how many bytes, from
    /// the front of everything fed and not yet [released](Self::release), may now be released
    /// (the length of [`releasable`](Self::releasable)), or the violation. Once failed, every
    /// call returns the same violation.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, Violation> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        self.reserve(input.len());
        self.buf[self.end..self.end + input.len()].copy_from_slice(input);
        self.filled(input.len())
    }

    /// Free space at the end of the buffer (at least 4 KiB), to read client bytes into;
    /// follow with [`filled`](Self::filled).
    pub fn read_buf(&mut self) -> &mut [u8] {
        self.reserve(MIN_READ);
        &mut self.buf[self.end..]
    }

    /// Validates `n` bytes written at the front of [`read_buf`](Self::read_buf); returns like
    /// [`feed`](Self::feed).
    pub fn filled(&mut self, n: usize) -> Result<usize, Violation> {
        if let Some(v) = &self.violation {
            return Err(v.clone());
        }
        self.end = (self.end + n).min(self.buf.len());
        match self.process() {
            Ok(()) => Ok(self.valid - self.start),
            Err((kind, detail)) => {
                let v = self.violation_of(kind, detail);
                self.state = State::Failed;
                self.violation = Some(v.clone());
                Err(v)
            }
        }
    }

    /// Validated bytes not yet released, from the front. After a violation this still holds
    /// the bytes validated before it (the IO wrapper does not hand them over).
    pub fn releasable(&self) -> &[u8] {
        &self.buf[self.start..self.valid]
    }

    /// Marks the first `n` bytes of [`releasable`](Self::releasable) as handed over.
    pub fn release(&mut self, n: usize) {
        self.start = (self.start + n).min(self.valid);
        let released = self.base + self.start as u64;
        while self.head_ends.front().is_some_and(|&end| end <= released) {
            self.head_ends.pop_front();
            self.requests += 1;
        }
        if self.start == self.end {
            // Nothing buffered: rewind for free.
            self.base += self.end as u64;
            self.start = 0;
            self.valid = 0;
            self.end = 0;
        }
    }

    /// How many request heads were validated and fully released.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Where the connection stands.
    pub fn phase(&self) -> Phase {
        match self.state {
            State::Failed => Phase::Failed,
            _ if self.start != self.valid => Phase::Body,
            State::Head => {
                let pending = self.end - self.valid;
                if !self.head.request_line && !self.lines.cr && self.lines.line_start == pending {
                    Phase::Idle
                } else {
                    Phase::Head
                }
            }
            _ => Phase::Body,
        }
    }

    /// The violation, once one was found.
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// Makes room for `n` more bytes after `end`.
    fn reserve(&mut self, n: usize) {
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.base += self.start as u64;
            self.valid -= self.start;
            self.end -= self.start;
            self.start = 0;
        }
        let need = self.end + n;
        if self.buf.len() < need {
            let size = need.max(self.buf.len() * 2).max(2 * MIN_READ);
            self.buf.resize(size, 0);
        }
    }

    fn violation_of(&self, kind: ViolationKind, detail: String) -> Violation {
        let (method, target) = if self.has_request {
            (Some(clip(&self.method)), Some(clip(&self.target)))
        } else {
            (None, None)
        };
        Violation {
            kind,
            detail,
            method,
            target,
        }
    }

    fn process(&mut self) -> Result<(), Refusal> {
        while self.valid < self.end {
            match self.state {
                State::Head => {
                    if !self.scan_head()? {
                        return Ok(());
                    }
                }
                State::Fixed { remaining } | State::ChunkData { remaining } => {
                    let n = remaining.min((self.end - self.valid) as u64);
                    // n <= end - valid, a usize
                    self.valid += n as usize;
                    let remaining = remaining - n;
                    self.state = match self.state {
                        State::Fixed { .. } if remaining == 0 => {
                            self.message_done();
                            State::Head
                        }
                        State::Fixed { .. } => State::Fixed { remaining },
                        _ if remaining == 0 => State::ChunkCr,
                        _ => State::ChunkData { remaining },
                    };
                }
                State::ChunkCr | State::ChunkLf => {
                    let b = self.buf[self.valid];
                    let want = if self.state == State::ChunkCr {
                        b'\r'
                    } else {
                        b'\n'
                    };
                    if b != want {
                        return refuse(
                            ViolationKind::ChunkDataUnterminated,
                            format!("chunk data followed by {} instead of CRLF", show(&[b])),
                        );
                    }
                    self.valid += 1;
                    self.state = if want == b'\r' {
                        State::ChunkLf
                    } else {
                        self.lines = Lines::default();
                        State::ChunkLine
                    };
                }
                State::ChunkLine => {
                    if !self.scan_chunk_line()? {
                        return Ok(());
                    }
                }
                State::Trailers => {
                    if !self.scan_trailers()? {
                        return Ok(());
                    }
                }
                State::Failed => {
                    return refuse(ViolationKind::HeaderInvalid, "guard failed".into());
                }
            }
        }
        Ok(())
    }

    fn message_done(&mut self) {
        self.state = State::Head;
        self.lines = Lines::default();
        self.head = HeadInfo::default();
        self.has_request = false;
    }

    // -- heads --------------------------------------------------------------------------------

    /// Scans the pending head; `true` once it was complete, validated and released.
    fn scan_head(&mut self) -> Result<bool, Refusal> {
        let limit = self.limits.max_head_bytes;
        loop {
            let section = &self.buf[self.valid..self.end];
            let line = match self.lines.next(section, limit) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(false),
                Err(LineError::BareLf(at)) => {
                    return refuse(ViolationKind::BareLf, bare_text("LF", section, at));
                }
                Err(LineError::BareCr(at)) => {
                    return refuse(ViolationKind::BareCr, bare_text("CR", section, at));
                }
                Err(LineError::Limit) => return Err(self.head_too_large(section, limit)),
            };
            let (start, end) = line;
            if !self.head.request_line {
                if start == end {
                    continue; // empty line before the request line (RFC 9112 §2.2)
                }
                let first = self.base + (self.valid + start) as u64 == 0;
                self.request_line(start, end, first)?;
                continue;
            }
            if start == end {
                self.finish_head(end + 2)?;
                return Ok(true);
            }
            self.field_line(start, end)?;
        }
    }

    fn head_too_large(&self, section: &[u8], limit: usize) -> Refusal {
        if !self.head.request_line {
            // The request line itself did not end within the limit.
            let line = &section[self.lines.line_start..limit.min(section.len())];
            if let Some(sp) = line.iter().position(|&b| b == b' ') {
                if let Err(e) = check_method(&line[..sp]) {
                    return e;
                }
                let rest = &line[sp + 1..];
                let target = rest
                    .iter()
                    .position(|&b| b == b' ')
                    .map_or(rest, |e| &rest[..e]);
                if target.len() > self.limits.max_target_bytes {
                    return (
                        ViolationKind::UriTooLong,
                        format!(
                            "request target longer than {} bytes: {}",
                            self.limits.max_target_bytes,
                            show(target)
                        ),
                    );
                }
            } else if let Err(e) = check_method(line) {
                return e;
            }
            return (
                ViolationKind::HeadersTooLarge,
                format!("request line longer than {limit} bytes"),
            );
        }
        (
            ViolationKind::HeadersTooLarge,
            format!("request head larger than {limit} bytes"),
        )
    }

    fn request_line(&mut self, start: usize, end: usize, first: bool) -> Result<(), Refusal> {
        let line = &self.buf[self.valid + start..self.valid + end];
        if first && line == H2_PREFACE_LINE {
            return refuse(
                ViolationKind::Http2PriorKnowledge,
                "HTTP/2 connection preface".into(),
            );
        }
        let Some(sp1) = line.iter().position(|&b| b == b' ') else {
            check_method(line)?;
            return refuse(
                ViolationKind::RequestLineInvalid,
                format!("no space in request line {}", show(line)),
            );
        };
        let method = &line[..sp1];
        check_method(method)?;
        let rest = &line[sp1 + 1..];
        let Some(sp2) = rest.iter().position(|&b| b == b' ') else {
            if rest.len() > self.limits.max_target_bytes {
                return refuse(ViolationKind::UriTooLong, self.long_target(rest));
            }
            return refuse(
                ViolationKind::RequestLineInvalid,
                format!("no HTTP version in request line {}", show(line)),
            );
        };
        let target = &rest[..sp2];
        let version = &rest[sp2 + 1..];
        if target.is_empty() {
            return refuse(
                ViolationKind::RequestLineInvalid,
                format!("empty request target in {}", show(line)),
            );
        }
        // From here on violations name the request.
        self.method.clear();
        self.method
            .extend_from_slice(&method[..method.len().min(CLIP + 1)]);
        self.target.clear();
        self.target
            .extend_from_slice(&target[..target.len().min(CLIP + 1)]);
        self.has_request = true;
        if target.len() > self.limits.max_target_bytes {
            return refuse(ViolationKind::UriTooLong, self.long_target(target));
        }
        check_target(target)?;
        self.head.http10 = match version {
            b"HTTP/1.1" => false,
            b"HTTP/1.0" => true,
            [b'H', b'T', b'T', b'P', b'/', d1, b'.', d2]
                if d1.is_ascii_digit() && d2.is_ascii_digit() =>
            {
                return refuse(
                    ViolationKind::VersionUnsupported,
                    format!("HTTP version {} not served", show(version)),
                );
            }
            _ => {
                return refuse(
                    ViolationKind::RequestLineInvalid,
                    format!("malformed HTTP version {}", show(version)),
                );
            }
        };
        if method == b"CONNECT" {
            return refuse(
                ViolationKind::ConnectRefused,
                format!("CONNECT {} not served", show(target)),
            );
        }
        self.head.request_line = true;
        Ok(())
    }

    fn long_target(&self, target: &[u8]) -> String {
        format!(
            "request target of {}{} bytes, more than {}: {}",
            if target.len() >= self.limits.max_head_bytes {
                "at least "
            } else {
                ""
            },
            target.len(),
            self.limits.max_target_bytes,
            show(target)
        )
    }

    /// Notes what the scan needs from one field line of a head; `httparse` checks its syntax
    /// when the head is complete.
    fn field_line(&mut self, start: usize, end: usize) -> Result<(), Refusal> {
        let line = &self.buf[self.valid + start..self.valid + end];
        if matches!(line[0], b' ' | b'\t') {
            return refuse(
                ViolationKind::ObsFold,
                format!("obsolete line folding: {}", show(line)),
            );
        }
        self.head.headers += 1;
        if self.head.headers > self.limits.max_headers {
            return refuse(
                ViolationKind::HeadersTooLarge,
                format!("more than {} header fields", self.limits.max_headers),
            );
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            return Ok(()); // httparse refuses it
        };
        let name = &line[..colon];
        let value = || {
            let raw = &line[colon + 1..];
            let lead = raw.iter().take_while(|&&b| b == b' ' || b == b'\t').count();
            let len = trim_ows(raw).len();
            let at = start + colon + 1 + lead;
            (at, at + len)
        };
        match name.len() {
            4 if name.eq_ignore_ascii_case(b"host") => self.head.host_count += 1,
            7 if name.eq_ignore_ascii_case(b"upgrade") => self.head.upgrade = true,
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                self.head.cl_count += 1;
                if self.head.cl_count == 1 {
                    self.head.cl = value();
                }
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                self.head.te_count += 1;
                if self.head.te_count == 1 {
                    self.head.te = value();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Checks a complete head of `len` bytes and releases it.
    fn finish_head(&mut self, len: usize) -> Result<(), Refusal> {
        let head = &self.buf[self.valid..self.valid + len];
        cross_check_head(head, self.head.headers)?;
        let info = self.head;
        let cl = &head[info.cl.0..info.cl.1];
        let te = &head[info.te.0..info.te.1];
        if info.cl_count > 0 && info.te_count > 0 {
            return refuse(
                ViolationKind::ContentLengthWithTransferEncoding,
                format!(
                    "Content-Length {} with Transfer-Encoding {}",
                    show(cl),
                    show(te)
                ),
            );
        }
        if info.cl_count > 1 {
            return refuse(
                ViolationKind::ContentLengthDuplicate,
                format!("{} Content-Length fields", info.cl_count),
            );
        }
        let mut length = 0;
        if info.cl_count == 1 {
            length = parse_content_length(cl).ok_or_else(|| {
                (
                    ViolationKind::ContentLengthInvalid,
                    format!("Content-Length {}", show(cl)),
                )
            })?;
        }
        if info.te_count > 0 {
            if info.http10 {
                return refuse(
                    ViolationKind::TransferEncodingHttp10,
                    format!("Transfer-Encoding {} in an HTTP/1.0 request", show(te)),
                );
            }
            if info.te_count > 1 {
                return refuse(
                    ViolationKind::TransferEncodingUnsupported,
                    format!("{} Transfer-Encoding fields", info.te_count),
                );
            }
            if !te.eq_ignore_ascii_case(b"chunked") {
                return refuse(
                    ViolationKind::TransferEncodingUnsupported,
                    format!("Transfer-Encoding {}, only \"chunked\" is served", show(te)),
                );
            }
        }
        if info.host_count > 1 {
            return refuse(
                ViolationKind::HostDuplicate,
                format!("{} Host fields", info.host_count),
            );
        }
        if info.upgrade {
            return refuse(
                ViolationKind::UpgradeRefused,
                "protocol upgrades are not served".into(),
            );
        }
        self.valid += len;
        self.head_ends.push_back(self.base + self.valid as u64);
        self.lines = Lines::default();
        self.state = if info.te_count == 1 {
            self.ext_bytes = 0;
            State::ChunkLine
        } else if length > 0 {
            State::Fixed { remaining: length }
        } else {
            self.message_done();
            State::Head
        };
        Ok(())
    }

    // -- chunked bodies -----------------------------------------------------------------------

    /// Scans a chunk-size line; `true` once it was validated and released.
    fn scan_chunk_line(&mut self) -> Result<bool, Refusal> {
        let section = &self.buf[self.valid..self.end];
        let (start, end) = match self.lines.next(section, MAX_CHUNK_LINE_BYTES) {
            Ok(Some(line)) => line,
            Ok(None) => return Ok(false),
            Err(LineError::BareLf(at)) => {
                return refuse(ViolationKind::BareLf, bare_text("LF", section, at));
            }
            Err(LineError::BareCr(at)) => {
                return refuse(ViolationKind::BareCr, bare_text("CR", section, at));
            }
            Err(LineError::Limit) => {
                let partial = &section[..MAX_CHUNK_LINE_BYTES];
                let digits = partial.iter().take_while(|b| b.is_ascii_hexdigit()).count();
                if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS || partial[digits] != b';' {
                    return refuse(
                        ViolationKind::ChunkSizeInvalid,
                        format!("chunk size line {}", show(partial)),
                    );
                }
                return refuse(
                    ViolationKind::ChunkExtensionsTooLarge,
                    format!("chunk line longer than {MAX_CHUNK_LINE_BYTES} bytes"),
                );
            }
        };
        let line = &section[start..end];
        let (size, ext) = parse_chunk_line(line)?;
        self.ext_bytes += ext;
        if self.ext_bytes > MAX_CHUNK_EXT_BYTES {
            return refuse(
                ViolationKind::ChunkExtensionsTooLarge,
                format!("more than {MAX_CHUNK_EXT_BYTES} bytes of chunk extensions"),
            );
        }
        self.valid += end + 2;
        self.lines = Lines::default();
        self.state = if size == 0 {
            self.trailers = 0;
            State::Trailers
        } else {
            State::ChunkData { remaining: size }
        };
        Ok(true)
    }

    /// Scans the trailer section; `true` once it was complete, validated and released.
    fn scan_trailers(&mut self) -> Result<bool, Refusal> {
        let limit = self.limits.max_trailer_bytes;
        loop {
            let section = &self.buf[self.valid..self.end];
            let (start, end) = match self.lines.next(section, limit) {
                Ok(Some(line)) => line,
                Ok(None) => return Ok(false),
                Err(LineError::BareLf(at)) => {
                    return refuse(ViolationKind::BareLf, bare_text("LF", section, at));
                }
                Err(LineError::BareCr(at)) => {
                    return refuse(ViolationKind::BareCr, bare_text("CR", section, at));
                }
                Err(LineError::Limit) => {
                    return refuse(
                        ViolationKind::TrailersTooLarge,
                        format!("trailer section larger than {limit} bytes"),
                    );
                }
            };
            if start == end {
                let len = end + 2;
                cross_check_trailers(&section[..len], self.trailers)?;
                self.valid += len;
                self.message_done();
                return Ok(true);
            }
            self.trailers += 1;
            if self.trailers > self.limits.max_headers {
                return refuse(
                    ViolationKind::TrailersTooLarge,
                    format!("more than {} trailer fields", self.limits.max_headers),
                );
            }
            let (name, _) = check_field_line(&section[start..end], "trailer ")?;
            if FORBIDDEN_TRAILERS
                .iter()
                .any(|f| name.eq_ignore_ascii_case(f.as_bytes()))
            {
                return refuse(
                    ViolationKind::TrailerFieldForbidden,
                    format!("trailer field {} not allowed", show(name)),
                );
            }
        }
    }
}

/// Trailer fields refused (RFC 9110 §6.5.1: framing, routing, authentication, content
/// processing, and fields that change how the connection or the rest of the message is read).
const FORBIDDEN_TRAILERS: [&str; 11] = [
    "content-length",
    "transfer-encoding",
    "host",
    "trailer",
    "connection",
    "upgrade",
    "te",
    "authorization",
    "proxy-authorization",
    "content-encoding",
    "content-type",
];

fn bare_text(what: &str, section: &[u8], at: usize) -> String {
    let from = at.saturating_sub(40);
    format!(
        "bare {what} at byte {at} after {}",
        show(&section[from..at])
    )
}

fn check_method(method: &[u8]) -> Result<(), Refusal> {
    if method.is_empty() {
        return refuse(ViolationKind::MethodInvalid, "empty method".into());
    }
    if let Some(&b) = method.iter().find(|&&b| !is_tchar(b)) {
        return refuse(
            ViolationKind::MethodInvalid,
            format!("byte {} in method {}", show(&[b]), show(method)),
        );
    }
    Ok(())
}

fn check_target(target: &[u8]) -> Result<(), Refusal> {
    for &b in target {
        let what = match b {
            b'#' => "fragment",
            0x00..=0x1F | 0x7F => "control byte",
            b' ' => "space",
            0x80..=0xFF => "non-ASCII byte",
            _ => continue,
        };
        return refuse(
            ViolationKind::TargetInvalid,
            format!("{what} {} in request target {}", show(&[b]), show(target)),
        );
    }
    if target[0] == b'/' {
        // origin-form: the bytes the `http` crate accepts
        let (path, query) = match target.iter().position(|&b| b == b'?') {
            Some(q) => (&target[..q], &target[q + 1..]),
            None => (target, &[][..]),
        };
        let bad = path
            .iter()
            .find(|&&b| !PATH[usize::from(b)])
            .or_else(|| query.iter().find(|&&b| !QUERY[usize::from(b)]));
        if let Some(&b) = bad {
            return refuse(
                ViolationKind::TargetInvalid,
                format!("byte {} in request target {}", show(&[b]), show(target)),
            );
        }
        return Ok(());
    }
    // absolute-form, authority-form, asterisk-form: rare, let the URI parser judge
    if let Err(e) = http::Uri::try_from(target) {
        return refuse(
            ViolationKind::TargetInvalid,
            format!("request target {}: {e}", show(target)),
        );
    }
    Ok(())
}

/// Checks one field line (of a trailer section, or of a head `httparse` refused); returns its
/// name and trimmed value.
fn check_field_line<'a>(line: &'a [u8], what: &str) -> Result<(&'a [u8], &'a [u8]), Refusal> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return refuse(
            ViolationKind::ObsFold,
            format!("obsolete line folding in {what}field line {}", show(line)),
        );
    }
    let n = line.iter().take_while(|&&b| is_tchar(b)).count();
    match line.get(n) {
        None => {
            return refuse(
                ViolationKind::HeaderNameInvalid,
                format!("no colon in {what}field line {}", show(line)),
            );
        }
        Some(b':') if n > 0 => {}
        Some(b':') => {
            return refuse(
                ViolationKind::HeaderNameInvalid,
                format!("empty {what}field name in {}", show(line)),
            );
        }
        Some(&b) => {
            return refuse(
                ViolationKind::HeaderNameInvalid,
                format!(
                    "byte {} in {what}field name {}",
                    show(&[b]),
                    show(&line[..n + 1])
                ),
            );
        }
    }
    let name = &line[..n];
    let value = trim_ows(&line[n + 1..]);
    if let Some(&b) = value.iter().find(|&&b| !VALUE[usize::from(b)]) {
        return refuse(
            ViolationKind::HeaderValueInvalid,
            format!(
                "control byte {} in value of {what}field {}",
                show(&[b]),
                show(name)
            ),
        );
    }
    Ok((name, value))
}

/// Parses the complete head with `httparse`, as hyper will; on refusal, finds the offending
/// line for a precise reason.
fn cross_check_head(head: &[u8], fields: usize) -> Result<(), Refusal> {
    let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
    let mut heap = Vec::new();
    let slots = if fields <= STACK_HEADERS {
        &mut stack[..fields]
    } else {
        heap.resize_with(fields, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let outcome =
        httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, head, slots);
    let error = match outcome {
        Ok(httparse::Status::Complete(n)) if n == head.len() => return Ok(()),
        Ok(httparse::Status::Complete(n)) => format!("head ends at byte {n}"),
        Ok(httparse::Status::Partial) => "head incomplete".to_string(),
        Err(e) => e.to_string(),
    };
    // The request line was checked already: find the field line httparse objects to.
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .skip_while(|l| l.is_empty())
        .skip(1)
        .take_while(|l| !l.is_empty());
    lines.try_for_each(|l| check_field_line(l, "").map(|_| ()))?;
    refuse(
        ViolationKind::HeaderInvalid,
        format!("request head refused by httparse: {error}"),
    )
}

/// Parses the trailer section with `httparse`, as hyper will.
fn cross_check_trailers(section: &[u8], fields: usize) -> Result<(), Refusal> {
    let mut headers = vec![httparse::EMPTY_HEADER; fields];
    match httparse::parse_headers(section, &mut headers) {
        Ok(httparse::Status::Complete((n, _))) if n == section.len() => Ok(()),
        other => refuse(
            ViolationKind::HeaderInvalid,
            format!("trailer section refused by httparse: {other:?}"),
        ),
    }
}

fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n <= MAX_CONTENT_LENGTH).then_some(n)
}

/// Parses `chunk-size [ chunk-ext ]` (CRLF excluded); returns the size and the extension bytes.
fn parse_chunk_line(line: &[u8]) -> Result<(u64, usize), Refusal> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > MAX_CHUNK_SIZE_DIGITS {
        return refuse(
            ViolationKind::ChunkSizeInvalid,
            format!("chunk size line {}", show(line)),
        );
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => b - b'A' + 10,
        };
        size = (size << 4) | u64::from(d);
    }
    let ext = &line[digits..];
    if ext.is_empty() {
        return Ok((size, 0));
    }
    if ext[0] != b';' {
        return refuse(
            ViolationKind::ChunkSizeInvalid,
            format!(
                "chunk size followed by {} in {}",
                show(&ext[..1]),
                show(line)
            ),
        );
    }
    check_chunk_ext(ext).map_err(|why| {
        (
            ViolationKind::ChunkExtensionInvalid,
            format!("{why} in chunk extension {}", show(ext)),
        )
    })?;
    Ok((size, ext.len()))
}

/// `*( ";" token [ "=" ( token / quoted-string ) ] )`, no whitespace (RFC 9112 §7.1.1).
fn check_chunk_ext(mut ext: &[u8]) -> Result<(), &'static str> {
    while let [b';', rest @ ..] = ext {
        let name = rest.iter().take_while(|&&b| is_tchar(b)).count();
        if name == 0 {
            return Err("missing name");
        }
        ext = &rest[name..];
        let [b'=', value @ ..] = ext else {
            continue;
        };
        if let [b'"', quoted @ ..] = value {
            let mut i = 0;
            loop {
                match quoted.get(i) {
                    None => return Err("unterminated quoted-string"),
                    Some(b'"') => break,
                    Some(b'\\') => match quoted.get(i + 1) {
                        Some(&b) if b == b'\t' || b == b' ' || (0x21..=0x7E).contains(&b) => {
                            i += 2;
                        }
                        Some(&b) if b >= 0x80 => i += 2,
                        _ => return Err("bad quoted-pair"),
                    },
                    Some(&b) if QDTEXT[usize::from(b)] => i += 1,
                    Some(_) => return Err("bad byte in quoted-string"),
                }
            }
            ext = &quoted[i + 1..];
        } else {
            let token = value.iter().take_while(|&&b| is_tchar(b)).count();
            if token == 0 {
                return Err("missing value");
            }
            ext = &value[token..];
        }
    }
    if ext.is_empty() {
        Ok(())
    } else {
        Err("unexpected byte")
    }
}

// ---------------------------------------------------------------------------------------------
// The IO wrapper.

struct Slot<S> {
    io: Option<S>,
    framing: Framing,
    eof: bool,
    /// A head stayed partial past the header timeout.
    head_timed_out: bool,
}

struct Shared<S> {
    slot: Mutex<Slot<S>>,
    notify: Notify,
}

impl<S> Shared<S> {
    fn lock(&self) -> MutexGuard<'_, Slot<S>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Wraps a client stream for hyper's HTTP/1 server; see [`guard`].
pub struct Guarded<S> {
    shared: Arc<Shared<S>>,
    vectored: bool,
    head: Option<HeadTimer>,
}

/// The header timeout of one connection: one timer, armed when a read waits while a head
/// is partial, re-armed (not reallocated) for the next partial head.
struct HeadTimer {
    timeout: std::time::Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The head (by the count of heads before it) the timer is armed for.
    armed_for: Option<u64>,
}

impl HeadTimer {
    /// Whether the head `index` has waited past the timeout (arms the timer on first call).
    fn expired(&mut self, index: u64, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::now() + self.timeout;
        match (&mut self.sleep, self.armed_for) {
            (Some(sleep), Some(armed)) if armed == index => {
                return sleep.as_mut().poll(cx).is_ready();
            }
            (Some(sleep), _) => sleep.as_mut().reset(deadline),
            (None, _) => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        self.armed_for = Some(index);
        self.sleep
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
    }
}

/// The error a [`Guarded`] read returns when a request head stayed partial past the header
/// timeout (see [`Guarded::with_header_timeout`]); [`is_header_timeout`] recognises it, and
/// [`Watch::head_timed_out`] tells it happened even when hyper ends the connection
/// quietly (it does, for a read error before any byte of the head reached it).
#[derive(Debug, thiserror::Error)]
#[error("the request head was not complete within {timeout:?}")]
pub struct HeaderTimeout {
    /// The header timeout.
    pub timeout: std::time::Duration,
}

/// Whether `error` (or an error it wraps, such as hyper's) is a [`HeaderTimeout`].
pub fn is_header_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.downcast_ref::<HeaderTimeout>().is_some()
            || e.downcast_ref::<io::Error>()
                .and_then(io::Error::get_ref)
                .is_some_and(|inner| inner.is::<HeaderTimeout>())
        {
            return true;
        }
        source = e.source();
    }
    false
}

impl<S> Guarded<S> {
    /// Refuses a request head that stays partial for `timeout` from the first read that
    /// waited on it: the read fails with a [`HeaderTimeout`] (the caller records
    /// `header_timeout` and the connection closes). Waiting for the first byte of a head
    /// is not timed here (that is the idle timeout, hyper's header timer in the pipeline).
    pub fn with_header_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.head = Some(HeadTimer {
            timeout,
            sleep: None,
            armed_for: None,
        });
        self
    }
}

/// The caller's side of a [`Guarded`] stream: violations, progress, and the stream itself.
pub struct Watch<S> {
    shared: Arc<Shared<S>>,
}

impl<S> Clone for Watch<S> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Where a guarded connection stands, for telling apart the ways it can end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Request heads validated and handed to hyper.
    pub requests: u64,
    /// Where the byte stream stands.
    pub phase: Phase,
    /// The client's side of the stream reached EOF.
    pub eof: bool,
}

impl Snapshot {
    /// The client closed in the middle of a request (a partial head or body was buffered).
    pub fn partial_at_eof(&self) -> bool {
        self.eof && matches!(self.phase, Phase::Head | Phase::Body)
    }
}

/// Puts the framing guard between `io` and hyper: serve the [`Guarded`] stream with hyper's
/// HTTP/1 server (`hyper::server::conn::http1`), and keep the [`Watch`].
///
/// hyper only receives bytes the guard validated. On a violation hyper's reads stay pending
/// forever (it sees neither EOF nor an error); [`Watch::violated`] resolves. Drop hyper's
/// connection future, then [`Watch::take_io`] and answer on the stream.
pub fn guard<S>(io: S, limits: Limits) -> (Guarded<S>, Watch<S>)
where
    S: Write,
{
    let vectored = io.is_write_vectored();
    let shared = Arc::new(Shared {
        slot: Mutex::new(Slot {
            io: Some(io),
            framing: Framing::new(limits),
            eof: false,
            head_timed_out: false,
        }),
        notify: Notify::new(),
    });
    (
        Guarded {
            shared: shared.clone(),
            vectored,
            head: None,
        },
        Watch { shared },
    )
}

fn taken() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream taken back from the guard",
    )
}

impl<S: Read + Unpin> Read for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut guard = this.shared.lock();
        let Slot {
            io,
            framing,
            eof,
            head_timed_out,
        } = &mut *guard;
        if framing.violation().is_some() {
            return Poll::Pending;
        }
        loop {
            let ready = framing.releasable();
            if !ready.is_empty() {
                let n = ready.len().min(buf.remaining());
                buf.put_slice(&ready[..n]);
                framing.release(n);
                return Poll::Ready(Ok(()));
            }
            if *eof {
                return Poll::Ready(Ok(()));
            }
            let Some(io) = io.as_mut() else {
                return Poll::Ready(Err(taken()));
            };
            let mut read = ReadBuf::new(framing.read_buf());
            match Pin::new(io).poll_read(cx, read.unfilled()) {
                Poll::Pending => {
                    if let Some(head) = this.head.as_mut()
                        && framing.phase() == Phase::Head
                        && head.expired(framing.requests(), cx)
                    {
                        let timeout = head.timeout;
                        *head_timed_out = true;
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            HeaderTimeout { timeout },
                        )));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            if n == 0 {
                *eof = true;
                return Poll::Ready(Ok(()));
            }
            if framing.filled(n).is_err() {
                drop(guard);
                this.shared.notify.notify_waiters();
                return Poll::Pending;
            }
        }
    }
}

impl<S: Write + Unpin> Guarded<S> {
    fn with_io<T>(
        &self,
        f: impl FnOnce(Pin<&mut S>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match self.shared.lock().io.as_mut() {
            Some(io) => f(Pin::new(io)),
            None => Poll::Ready(Err(taken())),
        }
    }
}

impl<S: Write + Unpin> Write for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with_io(|io| io.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with_io(|io| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with_io(|io| io.poll_shutdown(cx))
    }

    fn is_write_vectored(&self) -> bool {
        self.vectored
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with_io(|io| io.poll_write_vectored(cx, bufs))
    }
}

impl<S> Watch<S> {
    /// Resolves once a request was refused. Cancel-safe: may be polled again, from
    /// `tokio::select!` in a loop, and by several waiters.
    pub async fn violated(&self) -> Violation {
        loop {
            let notified = self.shared.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = self.violation() {
                return v;
            }
            notified.await;
        }
    }

    /// The violation, if a request was refused.
    pub fn violation(&self) -> Option<Violation> {
        self.shared.lock().framing.violation().cloned()
    }

    /// Takes the client stream back. Call it after dropping hyper's connection future: the
    /// [`Guarded`] stream answers `NotConnected` afterwards. `None` once taken.
    pub fn take_io(&self) -> Option<S> {
        self.shared.lock().io.take()
    }

    /// Whether a read failed because a head stayed partial past the header timeout (hyper
    /// may end such a connection as if the client had closed it, so ask here).
    pub fn head_timed_out(&self) -> bool {
        self.shared.lock().head_timed_out
    }

    /// Request heads validated and handed to hyper so far.
    pub fn requests(&self) -> u64 {
        self.shared.lock().framing.requests()
    }

    /// No partial request is buffered, and everything validated was handed over.
    pub fn idle(&self) -> bool {
        self.shared.lock().framing.phase() == Phase::Idle
    }

    /// Requests handed over, phase, and EOF, read at once.
    pub fn snapshot(&self) -> Snapshot {
        let slot = self.shared.lock();
        Snapshot {
            requests: slot.framing.requests(),
            phase: slot.framing.phase(),
            eof: slot.eof,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use ViolationKind as K;

    /// Feeds `input` in the pieces between `cuts`, releasing everything releasable after each
    /// feed; returns the outcome and every byte released (on a violation, including the bytes
    /// validated before it).
    fn drive(input: &[u8], cuts: &[usize], limits: Limits) -> (Option<Violation>, Vec<u8>) {
        let mut f = Framing::new(limits);
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain(std::iter::once(&input.len())) {
            let r = f.feed(&input[from..to]);
            out.extend_from_slice(f.releasable());
            let n = f.releasable().len();
            f.release(n);
            if let Err(v) = r {
                // Stays failed.
                assert_eq!(f.feed(b"GET / HTTP/1.1\r\n\r\n"), Err(v.clone()));
                assert_eq!(f.phase(), Phase::Failed);
                return (Some(v), out);
            }
            assert_eq!(r, Ok(n));
            from = to;
        }
        (None, out)
    }

    /// The outcome fed whole, after checking that every split gives the same.
    fn outcome(input: &[u8], limits: Limits) -> (Option<Violation>, Vec<u8>) {
        let whole = drive(input, &[], limits);
        let bytewise: Vec<usize> = (1..input.len()).collect();
        assert_eq!(drive(input, &bytewise, limits), whole, "byte at a time");
        let cuts: Vec<usize> = if input.len() <= 2048 {
            (1..input.len()).collect()
        } else {
            (1..input.len())
                .step_by(input.len() / 97)
                .chain([input.len() - 1])
                .collect()
        };
        for cut in cuts {
            assert_eq!(drive(input, &[cut], limits), whole, "split at {cut}");
        }
        whole
    }

    fn head(lines: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        for l in lines {
            v.extend_from_slice(l.as_bytes());
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"\r\n");
        v
    }

    fn get(extra: &[&str]) -> Vec<u8> {
        let mut lines = vec!["GET /p?q=1 HTTP/1.1", "Host: example.com"];
        lines.extend_from_slice(extra);
        head(&lines)
    }

    fn post(extra: &[&str], body: &[u8]) -> Vec<u8> {
        let mut lines = vec!["POST /p HTTP/1.1", "Host: example.com"];
        lines.extend_from_slice(extra);
        let mut v = head(&lines);
        v.extend_from_slice(body);
        v
    }

    fn chunked(body: impl AsRef<[u8]>) -> Vec<u8> {
        post(&["Transfer-Encoding: chunked"], body.as_ref())
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// (name, input, kind, bytes released before the violation)
    #[rustfmt::skip]
    fn hostile() -> Vec<(&'static str, Vec<u8>, ViolationKind, usize)> {
        let first = get(&[]);
        let pre = first.len();
        let long_value = format!("X-Long: {}", "a".repeat(70_000));
        let many: Vec<String> = (0..101).map(|i| format!("X-{i}: v")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let many_trailers: String = (0..101).map(|i| format!("T-{i}: v\r\n")).collect();
        let big_trailer = format!("T: {}\r\n", "a".repeat(9000));
        let long_ext = format!("5;a={}\r\nhello\r\n0\r\n\r\n", "b".repeat(5000));
        let ext = format!(";a={}", "b".repeat(3000));
        let many_ext = format!("1{ext}\r\na\r\n1{ext}\r\nb\r\n1{ext}\r\nc\r\n0\r\n\r\n");
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8200));
        let endless_target = format!("GET /{}", "a".repeat(70_000));
        let long_method = "A".repeat(70_000);
        let post_head_len = post(&["Content-Length: 5"], b"").len();
        let chunked_head_len = chunked("").len();
        vec![
            // request line
            ("h2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), K::Http2PriorKnowledge, 0),
            ("h2 version", head(&["GET / HTTP/2.0", "Host: a"]), K::VersionUnsupported, 0),
            ("h2 preface later", cat(&[&first, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), K::VersionUnsupported, pre),
            ("HTTP/1.2", head(&["GET / HTTP/1.2", "Host: a"]), K::VersionUnsupported, 0),
            ("HTTP/0.9 version", head(&["GET / HTTP/0.9"]), K::VersionUnsupported, 0),
            ("HTTP/3.0", head(&["GET / HTTP/3.0"]), K::VersionUnsupported, 0),
            ("lowercase version", head(&["GET / http/1.1"]), K::RequestLineInvalid, 0),
            ("HTTP/1.10", head(&["GET / HTTP/1.10"]), K::RequestLineInvalid, 0),
            ("no version", b"GET /\r\n\r\n".to_vec(), K::RequestLineInvalid, 0),
            ("no space", b"GET\r\n\r\n".to_vec(), K::RequestLineInvalid, 0),
            ("double space", head(&["GET  / HTTP/1.1"]), K::RequestLineInvalid, 0),
            ("trailing space", head(&["GET / HTTP/1.1 "]), K::RequestLineInvalid, 0),
            ("tab separator", head(&["GET\t/ HTTP/1.1"]), K::MethodInvalid, 0),
            ("method paren", head(&["G(T / HTTP/1.1"]), K::MethodInvalid, 0),
            ("empty method", head(&[" / HTTP/1.1"]), K::MethodInvalid, 0),
            ("method NUL", head(&["GE\0T / HTTP/1.1"]), K::MethodInvalid, 0),
            ("method too long", long_method.into_bytes(), K::HeadersTooLarge, 0),
            ("fragment", head(&["GET /a#b HTTP/1.1", "Host: a"]), K::TargetInvalid, 0),
            ("NUL in target", head(&["GET /a\0b HTTP/1.1"]), K::TargetInvalid, 0),
            ("DEL in target", head(&["GET /a\x7fb HTTP/1.1"]), K::TargetInvalid, 0),
            ("tab in target", head(&["GET /a\tb HTTP/1.1"]), K::TargetInvalid, 0),
            ("non-ASCII target", cat(&[b"GET /\xc3\xa9 HTTP/1.1\r\n\r\n"]), K::TargetInvalid, 0),
            ("< in path", head(&["GET /a<b HTTP/1.1"]), K::TargetInvalid, 0),
            ("backtick in path", head(&["GET /a`b HTTP/1.1"]), K::TargetInvalid, 0),
            ("quote in query", head(&["GET /a?b\"c HTTP/1.1"]), K::TargetInvalid, 0),
            ("bad absolute-form", head(&["GET http://[::1/ HTTP/1.1"]), K::TargetInvalid, 0),
            ("target too long", long_target.into_bytes(), K::UriTooLong, 0),
            ("endless target", endless_target.into_bytes(), K::UriTooLong, 0),
            ("CONNECT", head(&["CONNECT example.com:443 HTTP/1.1", "Host: example.com:443"]), K::ConnectRefused, 0),
            // line endings
            ("bare CR in request line", b"GET / HTTP/1.1\rX\r\n\r\n".to_vec(), K::BareCr, 0),
            ("bare LF request line", b"GET / HTTP/1.1\nHost: a\r\n\r\n".to_vec(), K::BareLf, 0),
            ("bare LF before request", b"\nGET / HTTP/1.1\r\n\r\n".to_vec(), K::BareLf, 0),
            ("bare LF in field", b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n".to_vec(), K::BareLf, 0),
            ("bare LF final", b"GET / HTTP/1.1\r\nHost: a\r\n\n".to_vec(), K::BareLf, 0),
            ("bare CR in value", b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n".to_vec(), K::BareCr, 0),
            ("CR CR LF", b"GET / HTTP/1.1\r\nHost: a\r\r\n\r\n".to_vec(), K::BareCr, 0),
            // field lines
            ("obs-fold space", get(&["X: a", " b"]), K::ObsFold, 0),
            ("obs-fold tab", get(&["X: a", "\tb"]), K::ObsFold, 0),
            ("fold first", head(&["GET / HTTP/1.1", " Host: a"]), K::ObsFold, 0),
            ("NUL in value", get(&["X: a\0b"]), K::HeaderValueInvalid, 0),
            ("SOH in value", get(&["X: a\x01b"]), K::HeaderValueInvalid, 0),
            ("DEL in value", get(&["X: a\x7fb"]), K::HeaderValueInvalid, 0),
            ("ESC in value", get(&["X: \x1b[31m"]), K::HeaderValueInvalid, 0),
            ("space before colon", get(&["X : a"]), K::HeaderNameInvalid, 0),
            ("no colon", get(&["Xa"]), K::HeaderNameInvalid, 0),
            ("empty name", get(&[": a"]), K::HeaderNameInvalid, 0),
            ("paren in name", get(&["X(y): a"]), K::HeaderNameInvalid, 0),
            ("non-ASCII name", cat(&[b"GET / HTTP/1.1\r\nX\xc3\xa9: a\r\n\r\n"]), K::HeaderNameInvalid, 0),
            ("101 fields", get(&many), K::HeadersTooLarge, 0),
            ("head too large", get(&[&long_value]), K::HeadersTooLarge, 0),
            // Content-Length
            ("CL twice equal", post(&["Content-Length: 5", "Content-Length: 5"], b"hello"), K::ContentLengthDuplicate, 0),
            ("CL twice differing", post(&["Content-Length: 5", "content-length: 6"], b"hello!"), K::ContentLengthDuplicate, 0),
            ("CL list", post(&["Content-Length: 5, 5"], b"hello"), K::ContentLengthInvalid, 0),
            ("CL list no space", post(&["Content-Length: 5,5"], b"hello"), K::ContentLengthInvalid, 0),
            ("CL plus", post(&["Content-Length: +5"], b"hello"), K::ContentLengthInvalid, 0),
            ("CL negative", post(&["Content-Length: -1"], b""), K::ContentLengthInvalid, 0),
            ("CL inner space", post(&["Content-Length: 5 5"], b""), K::ContentLengthInvalid, 0),
            ("CL empty", post(&["Content-Length:"], b""), K::ContentLengthInvalid, 0),
            ("CL hex", post(&["Content-Length: 0x10"], b""), K::ContentLengthInvalid, 0),
            ("CL overflow", post(&["Content-Length: 99999999999999999999999"], b""), K::ContentLengthInvalid, 0),
            ("CL above 2^63", post(&["Content-Length: 9223372036854775808"], b""), K::ContentLengthInvalid, 0),
            ("CL with TE", post(&["Content-Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n"), K::ContentLengthWithTransferEncoding, 0),
            ("TE with CL", post(&["transfer-encoding: chunked", "CONTENT-LENGTH: 5"], b"0\r\n\r\n"), K::ContentLengthWithTransferEncoding, 0),
            ("TE bad with CL", post(&["Transfer-Encoding: gzip", "Content-Length: 5"], b"hello"), K::ContentLengthWithTransferEncoding, 0),
            // Transfer-Encoding
            ("TE gzip, chunked", post(&["Transfer-Encoding: gzip, chunked"], b"0\r\n\r\n"), K::TransferEncodingUnsupported, 0),
            ("TE gzip", post(&["Transfer-Encoding: gzip"], b""), K::TransferEncodingUnsupported, 0),
            ("TE chunked twice in list", post(&["Transfer-Encoding: chunked, chunked"], b""), K::TransferEncodingUnsupported, 0),
            ("TE two fields", post(&["Transfer-Encoding: chunked", "Transfer-Encoding: chunked"], b""), K::TransferEncodingUnsupported, 0),
            ("TE xchunked", post(&["Transfer-Encoding: xchunked"], b""), K::TransferEncodingUnsupported, 0),
            ("TE identity", post(&["Transfer-Encoding: identity"], b""), K::TransferEncodingUnsupported, 0),
            ("TE chunked;q", post(&["Transfer-Encoding: chunked;q=1"], b""), K::TransferEncodingUnsupported, 0),
            ("TE in HTTP/1.0", head(&["POST / HTTP/1.0", "Transfer-Encoding: chunked"]), K::TransferEncodingHttp10, 0),
            // routing, upgrades
            ("Host twice", get(&["host: b"]), K::HostDuplicate, 0),
            ("Upgrade", get(&["Connection: Upgrade", "Upgrade: websocket"]), K::UpgradeRefused, 0),
            ("Upgrade h2c", get(&["Upgrade: h2c"]), K::UpgradeRefused, 0),
            // chunked
            ("chunk size space", chunked("5 \r\nhello\r\n0\r\n\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size tab", chunked("5\t\r\nhello\r\n0\r\n\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size space ext", chunked("5 ;x\r\nhello\r\n0\r\n\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size empty", chunked("\r\nhello\r\n0\r\n\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size x", chunked("x\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size negative", chunked("-5\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size 0x", chunked("0x5\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk size 17 digits", chunked("00000000000000005\r\nhello\r\n0\r\n\r\n"), K::ChunkSizeInvalid, chunked_head_len),
            ("chunk ext empty", chunked("5;\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext no value", chunked("5;a=\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext unterminated", chunked("5;a=\"unterminated\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext escaped end", chunked("5;a=\"b\\\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext space after ;", chunked("5; a=b\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext space before =", chunked("5;a =b\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext space after =", chunked("5;a= b\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext trailing space", chunked("5;a=b \r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext junk after quote", chunked("5;a=\"b\"c\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk ext NUL in quote", chunked("5;a=\"\0\"\r\nhello\r\n0\r\n\r\n"), K::ChunkExtensionInvalid, chunked_head_len),
            ("chunk line too long", chunked(&long_ext), K::ChunkExtensionsTooLarge, chunked_head_len),
            ("chunk exts too large", chunked(&many_ext), K::ChunkExtensionsTooLarge, chunked_head_len + 2 * (3006 + 3)),
            ("chunk data long", chunked("5\r\nhelloX\r\n0\r\n\r\n"), K::ChunkDataUnterminated, chunked_head_len + 8),
            ("chunk data LF", chunked("5\r\nhello\n0\r\n\r\n"), K::ChunkDataUnterminated, chunked_head_len + 8),
            ("chunk data CR X", chunked("5\r\nhello\rX0\r\n\r\n"), K::ChunkDataUnterminated, chunked_head_len + 9),
            ("chunk line bare LF", chunked("5\nhello\r\n0\r\n\r\n"), K::BareLf, chunked_head_len),
            ("chunk line bare CR", chunked("5\rhello\r\n0\r\n\r\n"), K::BareCr, chunked_head_len),
            ("last chunk bare LF", chunked("0\n\r\n"), K::BareLf, chunked_head_len),
            ("trailer bare LF", chunked("0\r\nT: a\n\r\n"), K::BareLf, chunked_head_len + 3),
            ("trailer final bare LF", chunked("0\r\nT: a\r\n\n"), K::BareLf, chunked_head_len + 3),
            ("trailer obs-fold", chunked("0\r\nT: a\r\n b\r\n\r\n"), K::ObsFold, chunked_head_len + 3),
            ("trailer no colon", chunked("0\r\nTa\r\n\r\n"), K::HeaderNameInvalid, chunked_head_len + 3),
            ("trailer space before colon", chunked("0\r\nT : a\r\n\r\n"), K::HeaderNameInvalid, chunked_head_len + 3),
            ("trailer NUL", chunked("0\r\nT: a\0\r\n\r\n"), K::HeaderValueInvalid, chunked_head_len + 3),
            ("trailer CL", chunked("0\r\nContent-Length: 5\r\n\r\n"), K::TrailerFieldForbidden, chunked_head_len + 3),
            ("trailer TE", chunked("0\r\ntransfer-encoding: chunked\r\n\r\n"), K::TrailerFieldForbidden, chunked_head_len + 3),
            ("trailer Host", chunked("0\r\nHost: evil\r\n\r\n"), K::TrailerFieldForbidden, chunked_head_len + 3),
            ("trailer Authorization", chunked("0\r\nAuthorization: Bearer x\r\n\r\n"), K::TrailerFieldForbidden, chunked_head_len + 3),
            ("trailer too large", chunked(format!("0\r\n{big_trailer}\r\n")), K::TrailersTooLarge, chunked_head_len + 3),
            ("101 trailers", chunked(format!("0\r\n{many_trailers}\r\n")), K::TrailersTooLarge, chunked_head_len + 3),
            // pipelines: the first request is released, the second refused
            ("smuggled after GET", cat(&[&first, &post(&["Content-Length: 5", "Transfer-Encoding: chunked"], b"0\r\n\r\n")]), K::ContentLengthWithTransferEncoding, pre),
            ("bytes after CL body", cat(&[&post(&["Content-Length: 5"], b"hello"), b"0\r\n\r\n"]), K::RequestLineInvalid, post_head_len + 5),
            ("smuggled after chunked", cat(&[&chunked("5\r\nhello\r\n0\r\n\r\n"), &get(&["Host: x"])]), K::HostDuplicate, chunked_head_len + 15),
            ("h2 preface after CRLF", b"\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), K::VersionUnsupported, 0),
        ]
    }

    #[test]
    fn hostile_inputs_are_refused_whatever_the_split() {
        let cases = hostile();
        assert!(cases.len() >= 60, "{} cases", cases.len());
        let mut seen = std::collections::HashSet::new();
        for (name, input, kind, released) in cases {
            let (v, out) = outcome(&input, Limits::default());
            let v = v.unwrap_or_else(|| panic!("{name}: accepted"));
            assert_eq!(v.kind, kind, "{name}: {v}");
            assert_eq!(v.kind.status(), kind.status());
            assert_eq!(out.len(), released, "{name}: released {}", show(&out));
            assert_eq!(out, input[..released], "{name}");
            assert!(
                !v.detail.is_empty() && v.detail.chars().count() < 400,
                "{name}: {v}"
            );
            seen.insert(kind);
        }
        // Every kind but the httparse fallback is reached by some input.
        for kind in ViolationKind::ALL {
            assert!(
                kind == K::HeaderInvalid || seen.contains(&kind),
                "{kind} untested"
            );
        }
    }

    #[test]
    fn statuses_and_codes() {
        assert_eq!(K::UriTooLong.status(), 414);
        assert_eq!(K::HeadersTooLarge.status(), 431);
        assert_eq!(K::TrailersTooLarge.status(), 431);
        assert_eq!(K::TransferEncodingUnsupported.status(), 501);
        assert_eq!(K::VersionUnsupported.status(), 505);
        assert_eq!(K::ContentLengthWithTransferEncoding.status(), 400);
        let codes: std::collections::HashSet<_> = ViolationKind::ALL.iter().map(K::code).collect();
        assert_eq!(codes.len(), ViolationKind::ALL.len());
        for code in codes {
            assert!(
                code.bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
            );
        }
    }

    #[test]
    fn violations_name_the_request() {
        let input = post(&["Content-Length: 5", "Content-Length: 5"], b"hello");
        let (v, _) = outcome(&input, Limits::default());
        let v = v.unwrap();
        assert_eq!(v.method.as_deref(), Some("POST"));
        assert_eq!(v.target.as_deref(), Some("/p"));
        // Found in the body: still named.
        let (v, _) = outcome(&chunked("5 \r\nhello\r\n0\r\n\r\n"), Limits::default());
        assert_eq!(v.unwrap().target.as_deref(), Some("/p"));
        // Before the request line parsed: unnamed.
        let (v, _) = outcome(b"G(T / HTTP/1.1\r\n\r\n", Limits::default());
        let v = v.unwrap();
        assert_eq!((v.method, v.target), (None, None));
        // Clipped and escaped.
        let long = format!("GET /{}\x01 HTTP/1.1\r\n\r\n", "a".repeat(200));
        let (v, _) = outcome(long.as_bytes(), Limits::default());
        let v = v.unwrap();
        assert_eq!(v.kind, K::TargetInvalid);
        assert!(v.target.as_ref().unwrap().ends_with('…'), "{v:?}");
        assert!(v.target.as_ref().unwrap().len() < 100);
        assert!(v.detail.contains("\\x01"), "{v:?}");
    }

    #[rustfmt::skip]
    fn valid() -> Vec<(&'static str, Vec<u8>, u64)> {
        let hundred: Vec<String> = (0..98).map(|i| format!("X-{i}: v")).collect();
        let hundred: Vec<&str> = hundred.iter().map(String::as_str).collect();
        vec![
            ("GET", get(&[]), 1),
            ("GET with headers", get(&["Accept: */*", "User-Agent: t/1", "X-Obs: caf\u{e9}"]), 1),
            ("POST with CL", post(&["Content-Length: 11"], b"hello world"), 1),
            ("CL zero", post(&["Content-Length: 0"], b""), 1),
            ("CL leading zeros", post(&["Content-Length: 005"], b"hello"), 1),
            ("CL with OWS", post(&["Content-Length: \t5 "], b"hello"), 1),
            ("GET with body", head(&["GET / HTTP/1.1", "Host: a", "Content-Length: 2"]).into_iter().chain(*b"hi").collect(), 1),
            ("chunked", chunked("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), 1),
            ("chunked uppercase", post(&["Transfer-Encoding: CHUNKED"], b"A\r\n0123456789\r\n0\r\n\r\n"), 1),
            ("chunked extensions", chunked(b"5;name=val;flag;q=\"a \\\"b\\\" \t\xff\"\r\nhello\r\n0;last=1\r\n\r\n"), 1),
            ("chunked trailers", chunked("5\r\nhello\r\n0\r\nX-Sum: 1\r\nX-Other: a b\r\n\r\n"), 1),
            ("chunked 16 digits", chunked("0000000000000005\r\nhello\r\n0\r\n\r\n"), 1),
            ("three pipelined", cat(&[&get(&[]), &post(&["Content-Length: 3"], b"abc"), &chunked("1\r\nx\r\n0\r\n\r\n")]), 3),
            ("empty line first", cat(&[b"\r\n\r\n", &get(&[])]), 1),
            ("HTTP/1.0", head(&["GET / HTTP/1.0"]), 1),
            ("OPTIONS *", head(&["OPTIONS * HTTP/1.1", "Host: a"]), 1),
            ("absolute-form", head(&["GET http://a.example/b?c HTTP/1.1", "Host: a.example"]), 1),
            ("odd path bytes", head(&["GET /a{b}|c\"d!$&'()*+,;=:@~?x=/?{}|` HTTP/1.1", "Host: a"]), 1),
            ("no Host, long method", head(&["PROPFIND-X.Y /a HTTP/1.1"]), 1),
            ("100 fields", get(&hundred), 1),
            ("Connection and Expect", post(&["Connection: keep-alive", "Expect: 100-continue", "Content-Length: 1"], b"x"), 1),
        ]
    }

    #[test]
    fn valid_inputs_are_released_whole_whatever_the_split() {
        for (name, input, requests) in valid() {
            let (v, out) = outcome(&input, Limits::default());
            assert_eq!(v, None, "{name}");
            assert_eq!(out, input, "{name}");
            let mut f = Framing::new(Limits::default());
            assert_eq!(f.feed(&input), Ok(input.len()), "{name}");
            f.release(input.len());
            assert_eq!(f.requests(), requests, "{name}");
            assert_eq!(f.phase(), Phase::Idle, "{name}");
        }
    }

    /// Bytes fed one at a time: how much is releasable after each byte.
    fn releasable_after_each_byte(input: &[u8]) -> Vec<usize> {
        let mut f = Framing::new(Limits::default());
        let mut total = 0;
        input
            .iter()
            .map(|&b| {
                total += f.feed(&[b]).unwrap();
                let n = f.releasable().len();
                f.release(n);
                total
            })
            .collect()
    }

    #[test]
    fn nothing_is_released_before_a_head_is_complete() {
        let input = get(&["Accept: */*"]);
        let steps = releasable_after_each_byte(&input);
        assert!(
            steps[..input.len() - 1].iter().all(|&n| n == 0),
            "{steps:?}"
        );
        assert_eq!(steps[input.len() - 1], input.len());

        // A body is released as it arrives.
        let input = post(&["Content-Length: 5"], b"hello");
        let h = input.len() - 5;
        let steps = releasable_after_each_byte(&input);
        assert!(steps[..h - 1].iter().all(|&n| n == 0));
        assert_eq!(steps[h - 1..], [h, h + 1, h + 2, h + 3, h + 4, h + 5]);

        // Chunk lines wait for their CRLF, chunk data passes through, trailers wait for the end.
        let body = "5;a=b\r\nhello\r\n0\r\nT: v\r\n\r\n";
        let input = chunked(body);
        let h = input.len() - body.len();
        let steps = releasable_after_each_byte(&input);
        let expect: Vec<usize> = [
            vec![0; h - 1],
            vec![h; 7], // head, then "5;a=b\r" held
            vec![h + 7, h + 8, h + 9, h + 10, h + 11, h + 12, h + 13, h + 14], // line, data, CRLF
            vec![h + 14, h + 14, h + 17], // "0\r\n"
            vec![h + 17; 7], // trailers held
            vec![h + 25],
        ]
        .concat();
        assert_eq!(steps, expect);
    }

    #[test]
    fn pipelined_heads_are_released_one_by_one() {
        let a = get(&[]);
        let b = post(&["Content-Length: 3"], b"abc");
        let mut f = Framing::new(Limits::default());
        // Both whole, plus half of a third head.
        let third = get(&[]);
        let input = cat(&[&a, &b, &third[..10]]);
        assert_eq!(f.feed(&input), Ok(a.len() + b.len()));
        assert_eq!(f.releasable(), &input[..a.len() + b.len()]);
        assert_eq!(f.requests(), 0);
        f.release(a.len() - 1);
        assert_eq!(f.requests(), 0);
        f.release(1);
        assert_eq!(f.requests(), 1);
        assert_eq!(f.phase(), Phase::Body);
        f.release(b.len());
        assert_eq!(f.requests(), 2);
        assert_eq!(f.phase(), Phase::Head);
        assert_eq!(f.feed(&third[10..]), Ok(third.len()));
        f.release(third.len());
        assert_eq!((f.requests(), f.phase()), (3, Phase::Idle));
    }

    #[test]
    fn phases() {
        let mut f = Framing::new(Limits::default());
        assert_eq!(f.phase(), Phase::Idle);
        f.feed(b"\r\n").unwrap();
        assert_eq!(f.phase(), Phase::Idle);
        f.feed(b"\r").unwrap();
        assert_eq!(f.phase(), Phase::Head);
        f.feed(b"\nG").unwrap();
        assert_eq!(f.phase(), Phase::Head);
        let rest = b"ET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n";
        let n = f.feed(rest).unwrap();
        f.release(n);
        assert_eq!((f.phase(), f.requests()), (Phase::Body, 1));
        let n = f.feed(b"hi").unwrap();
        assert_eq!(f.phase(), Phase::Body); // not handed over yet
        f.release(n);
        assert_eq!(f.phase(), Phase::Idle);
    }

    #[test]
    fn limits_are_exact() {
        let limits = Limits {
            max_head_bytes: 64,
            max_target_bytes: 10,
            max_headers: 2,
            max_trailer_bytes: 16,
        };
        let exact = b"GET /123456789 HTTP/1.1\r\nHost: a\r\nX-Pad: 1234567890123456789\r\n\r\n";
        assert_eq!(exact.len(), 64);
        assert_eq!(outcome(exact, limits).0, None);
        let over = b"GET /123456789 HTTP/1.1\r\nHost: a\r\nX-Pad: 12345678901234567890\r\n\r\n";
        assert_eq!(outcome(over, limits).0.unwrap().kind, K::HeadersTooLarge);
        let target = b"GET /1234567890 HTTP/1.1\r\n\r\n";
        assert_eq!(outcome(target, limits).0.unwrap().kind, K::UriTooLong);
        let fields = b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n";
        assert_eq!(outcome(fields, limits).0.unwrap().kind, K::HeadersTooLarge);
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n";
        let fits = cat(&[head, b"T: 123456789\r\n\r\n"]);
        assert_eq!(outcome(&fits, limits).0, None);
        let over = cat(&[head, b"T: 1234567890\r\n\r\n"]);
        assert_eq!(outcome(&over, limits).0.unwrap().kind, K::TrailersTooLarge);
        let over = cat(&[head, b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n"]);
        let limits = Limits {
            max_trailer_bytes: 100,
            ..limits
        };
        assert_eq!(outcome(&over, limits).0.unwrap().kind, K::TrailersTooLarge);
    }

    #[test]
    fn large_bodies_stream_through_a_small_buffer() {
        let body = vec![b'x'; 1 << 20];
        let input = post(&[&format!("Content-Length: {}", body.len())], &body);
        let mut f = Framing::new(Limits::default());
        let mut out = Vec::new();
        for piece in input.chunks(1000) {
            f.feed(piece).unwrap();
            out.extend_from_slice(f.releasable());
            let n = f.releasable().len();
            f.release(n);
        }
        assert_eq!(out, input);
        assert!(
            f.buf.len() <= 2 * MIN_READ,
            "buffer grew to {}",
            f.buf.len()
        );
        // Through read_buf/filled too.
        let mut f = Framing::new(Limits::default());
        let mut out = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            let spare = f.read_buf();
            assert!(spare.len() >= MIN_READ);
            let n = spare.len().min(rest.len()).min(3000);
            spare[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            f.filled(n).unwrap();
            out.extend_from_slice(f.releasable());
            let n = f.releasable().len();
            f.release(n);
        }
        assert_eq!(out, input);
    }

    /// `cargo test --release -p scopegate --lib framing::tests::cost -- --ignored --nocapture`
    #[test]
    #[ignore = "timing"]
    fn cost() {
        let one = get(&[
            "User-Agent: curl/8.5.0",
            "Accept: */*",
            "Accept-Encoding: gzip, br",
            "Authorization: Bearer abcdefghijklmnopqrstuvwxyz0123456789",
            "X-Request-Id: 6f1c1b7e-1a2b-4c3d-9e8f-0a1b2c3d4e5f",
            "Connection: keep-alive",
            "Cache-Control: no-cache",
        ]);
        let mut f = Framing::new(Limits::default());
        let rounds = 1_000_000;
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            let n = f.feed(&one).unwrap();
            assert_eq!(n, one.len());
            f.release(n);
        }
        let per = t.elapsed() / rounds;
        println!("{} bytes, 9 fields: {per:?} per request", one.len());
        assert_eq!(f.requests(), u64::from(rounds));
    }

    // -- the IO wrapper with hyper ------------------------------------------------------------

    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper::{Request, Response};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    async fn read_until(client: &mut DuplexStream, needle: &[u8]) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0; 4096];
        while !got.windows(needle.len()).any(|w| w == needle) {
            let n = client.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    type Conn = std::pin::Pin<Box<dyn std::future::Future<Output = hyper::Result<()>> + Send>>;

    fn serve(io: Guarded<TokioIo<DuplexStream>>) -> (Conn, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let counter = counter.clone();
            async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let path = req.uri().path().to_string();
                let body = req.into_body().collect().await?.to_bytes();
                let text = format!("{path} got {}", body.len());
                Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(text))))
            }
        });
        let conn = http1::Builder::new().serve_connection(io, service);
        (Box::pin(conn), hits)
    }

    #[tokio::test]
    async fn hyper_serves_valid_requests_and_never_sees_a_smuggled_one() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = guard(TokioIo::new(server), Limits::default());
        let (mut conn, hits) = serve(io);
        let client_side = tokio::spawn(async move {
            let ok = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
            client.write_all(ok).await.unwrap();
            let first = read_until(&mut client, b"/a got 5").await;
            let smuggle = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\
                            Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /c HTTP/1.1\r\n\r\n";
            client.write_all(smuggle).await.unwrap();
            let second = read_until(&mut client, b"\r\n\r\n").await;
            (first, second)
        });
        let v = tokio::select! {
            r = conn.as_mut() => panic!("hyper ended first: {r:?}"),
            v = watch.violated() => v,
        };
        assert_eq!(v.kind, K::ContentLengthWithTransferEncoding);
        assert_eq!(
            (v.method.as_deref(), v.target.as_deref()),
            (Some("POST"), Some("/b"))
        );
        // Cancel-safe and repeatable.
        assert_eq!(watch.violated().await, v);
        assert_eq!(watch.violation(), Some(v.clone()));
        // hyper is parked, not failed.
        assert!(futures_poll_once(conn.as_mut()).await.is_none());
        drop(conn);
        assert_eq!(hits.load(Ordering::SeqCst), 1);
        let snap = watch.snapshot();
        assert_eq!(
            (snap.requests, snap.phase, snap.eof),
            (1, Phase::Failed, false)
        );
        let mut io = watch.take_io().unwrap().into_inner();
        assert!(watch.take_io().is_none());
        let status = v.kind.status();
        let answer = format!(
            "HTTP/1.1 {status} Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        );
        io.write_all(answer.as_bytes()).await.unwrap();
        io.shutdown().await.unwrap();
        let (first, second) = client_side.await.unwrap();
        let first = String::from_utf8(first).unwrap();
        assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
        assert_eq!(String::from_utf8(second).unwrap(), answer);
    }

    /// Polls a future once; `Some` if it completed.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(out) => Some(out),
                Poll::Pending => None,
            })
        })
        .await
    }

    /// Whatever the guard accepts, hyper serves: no refusal of hyper's own goes unrecorded.
    #[tokio::test]
    async fn hyper_serves_every_valid_input() {
        for (name, input, requests) in valid() {
            let (mut client, server) = tokio::io::duplex(1 << 16);
            let (io, watch) = guard(TokioIo::new(server), Limits::default());
            let (conn, hits) = serve(io);
            let served = tokio::spawn(conn);
            client.write_all(&input).await.unwrap();
            let mut got = Vec::new();
            let wait = async {
                let mut buf = [0; 4096];
                while got.windows(7).filter(|w| w == b" 200 OK").count() < requests as usize {
                    let n = client.read(&mut buf).await.unwrap();
                    assert!(n > 0, "{name}: closed after {}", show(&got));
                    got.extend_from_slice(&buf[..n]);
                }
            };
            tokio::time::timeout(std::time::Duration::from_secs(5), wait)
                .await
                .unwrap_or_else(|_| panic!("{name}: no answer"));
            assert_eq!(hits.load(Ordering::SeqCst), requests as usize, "{name}");
            assert_eq!(watch.requests(), requests, "{name}");
            assert_eq!(watch.violation(), None, "{name}");
            drop(client);
            let _ = served.await.unwrap();
        }
    }

    #[tokio::test]
    async fn violated_waits_and_survives_cancellation() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = guard(TokioIo::new(server), Limits::default());
        let (mut conn, hits) = serve(io);
        // Cancelled several times while nothing is wrong.
        for _ in 0..3 {
            tokio::select! {
                r = conn.as_mut() => panic!("{r:?}"),
                _ = watch.violated() => panic!("no violation yet"),
                _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {}
            }
        }
        client
            .write_all(b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let other = watch.clone();
        let v = tokio::select! {
            r = conn.as_mut() => panic!("{r:?}"),
            v = watch.violated() => v,
        };
        assert_eq!(v.kind, K::TargetInvalid);
        assert_eq!(other.violated().await, v);
        drop(conn);
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_eq!(watch.requests(), 0);
    }

    #[tokio::test]
    async fn eof_between_requests_and_mid_request() {
        // Between requests.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = guard(TokioIo::new(server), Limits::default());
        let (conn, _) = serve(io);
        let served = tokio::spawn(conn);
        client
            .write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, b"/a got 0").await;
        client.shutdown().await.unwrap();
        served.await.unwrap().unwrap();
        let snap = watch.snapshot();
        assert_eq!(
            (snap.requests, snap.phase, snap.eof),
            (1, Phase::Idle, true)
        );
        assert!(!snap.partial_at_eof());
        assert!(watch.idle());

        // Mid-head: hyper never saw the partial head, so it ends without an error.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = guard(TokioIo::new(server), Limits::default());
        let (conn, hits) = serve(io);
        let served = tokio::spawn(conn);
        client.write_all(b"GET /a HTTP/1.1\r\nHo").await.unwrap();
        client.shutdown().await.unwrap();
        served.await.unwrap().unwrap();
        let snap = watch.snapshot();
        assert_eq!((snap.requests, snap.phase), (0, Phase::Head));
        assert!(snap.partial_at_eof());
        assert_eq!(hits.load(Ordering::SeqCst), 0);
        assert_eq!(watch.violation(), None);

        // Mid-body: hyper has the head and reports the incomplete body.
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let (io, watch) = guard(TokioIo::new(server), Limits::default());
        let (conn, _) = serve(io);
        let served = tokio::spawn(conn);
        client
            .write_all(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nhel")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let _ = served.await.unwrap(); // hyper's error, if any, surfaces here or in the body
        let snap = watch.snapshot();
        assert_eq!((snap.requests, snap.phase), (1, Phase::Body));
        assert!(snap.partial_at_eof());
    }
}
