//! Credential reflection guard: keeps an injected secret from coming back to the workload.
//!
//! scopegate injects credentials (e.g. `Authorization: Bearer <secret>`) into the
//! requests it forwards; the workload never holds them. An upstream route that echoes the
//! request (a debug endpoint, httpbin's `/anything`, an error page quoting the headers)
//! would hand the secret back. The pipeline builds [`Needles`] from the secrets it
//! injected into *this* request, redacts the response headers with
//! [`Needles::redact_headers`] and wraps the response body in a [`RedactingBody`], which
//! streams it through a [`Scanner`].
//!
//! # What is searched
//!
//! For each secret: the raw bytes and, where they differ, the forms an echo is likely to
//! produce: JSON string escaping (`"` → `\"`, `\` → `\\`, control characters as `\n` or
//! `\u00xx`, optionally `/` → `\/` as PHP writes it, optionally non-ASCII as `\uXXXX` as
//! Python writes it, hex digits in either case) and percent-encoding (everything but
//! `A-Z a-z 0-9 - . _ ~` as `%XX`, upper- or lowercase hex, optionally space as `+`).
//! Other transformations (base64 of the secret, HTML entities, case changes, a secret
//! split by the upstream) are not recognised.
//!
//! # Minimum length
//!
//! Secrets shorter than [`MIN_SECRET_LEN`] (8) bytes are **not** searched
//! ([`Needles::skipped`] counts them, so the caller can log it). A 1–7 byte needle matches
//! ordinary text far too often (a 4-byte alphanumeric secret appears by chance about once
//! per 14 MB of random text, a 2-byte one every few kilobytes), redaction would then
//! corrupt unrelated responses, and a credential that short is brute-forceable anyway.
//!
//! # Redaction
//!
//! Every byte covered by any occurrence of any needle (occurrences may overlap or be
//! adjacent) becomes `*`. The output has exactly the input's length, so `Content-Length`
//! and [`Body::size_hint`] stay valid. The body scanner holds back the last
//! `max_needle_len - 1` bytes of what it has seen, since they could be the start of a
//! secret split across chunks; they are released with the next chunk or at the end.
#![forbid(unsafe_code)]

use std::ops::Range;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};

/// Secrets shorter than this many bytes are not searched (see the module docs).
pub const MIN_SECRET_LEN: usize = 8;

/// The byte every redacted byte is replaced with.
pub const REDACTION_BYTE: u8 = b'*';

/// The byte strings to search for: every secret injected into one request, in each form
/// an echo may render it. `Debug` shows counts only, never the secrets.
#[derive(Clone)]
pub struct Needles {
    /// `None`: nothing to search for.
    automaton: Option<AhoCorasick>,
    /// The needles, deduplicated (for tests and diagnostics).
    patterns: Vec<Vec<u8>>,
    /// Secrets shorter than [`MIN_SECRET_LEN`], not searched.
    skipped: usize,
}

impl Needles {
    /// Builds the needles for the secrets injected into one request. Secrets shorter than
    /// [`MIN_SECRET_LEN`] bytes are skipped (counted by [`skipped`](Self::skipped)).
    pub fn new(secrets: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut skipped = 0;
        for secret in secrets {
            let secret = secret.as_ref();
            if secret.len() < MIN_SECRET_LEN {
                skipped += 1;
                continue;
            }
            patterns.extend(encodings(secret));
        }
        patterns.sort_unstable();
        patterns.dedup();
        let automaton = if patterns.is_empty() {
            None
        } else {
            match AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(&patterns)
            {
                Ok(ac) => Some(ac),
                // Only if the automaton would exceed aho-corasick's size limits
                // (megabytes of secrets): search as many needles as fit, longest first.
                Err(_) => fallback_automaton(&patterns),
            }
        };
        Needles {
            automaton,
            patterns,
            skipped,
        }
    }

    /// Whether there is nothing to search for (no secret, or all too short).
    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// How many secrets were too short to search.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The needles searched for (each secret in each encoding, deduplicated).
    pub fn patterns(&self) -> impl Iterator<Item = &[u8]> {
        self.patterns.iter().map(Vec::as_slice)
    }

    /// The longest needle, in bytes (0 when empty).
    pub fn max_len(&self) -> usize {
        self.automaton
            .as_ref()
            .map_or(0, AhoCorasick::max_pattern_len)
    }

    /// A streaming scanner for one body.
    pub fn scanner(&self) -> Scanner {
        Scanner {
            automaton: self.automaton.clone(),
            keep: self.max_len().saturating_sub(1),
            tail: Vec::new(),
            tail_marks: Vec::new(),
            redacted: 0,
        }
    }

    /// Replaces every occurrence of a needle inside header values with `*` of the same
    /// length (the value keeps its sensitive flag). Returns whether anything was redacted.
    pub fn redact_headers(&self, headers: &mut HeaderMap) -> bool {
        let Some(ac) = &self.automaton else {
            return false;
        };
        let mut any = false;
        for value in headers.values_mut() {
            let mut marks = Vec::new();
            find_marks(ac, value.as_bytes(), &mut marks);
            if marks.is_empty() {
                continue;
            }
            let mut bytes = value.as_bytes().to_vec();
            apply(&mut bytes, &marks);
            // `*` is a valid header byte and every other byte came from a valid value.
            if let Ok(mut redacted) = HeaderValue::from_bytes(&bytes) {
                redacted.set_sensitive(value.is_sensitive());
                *value = redacted;
            } else {
                *value = HeaderValue::from_static("*");
            }
            any = true;
        }
        any
    }

    /// Redacts a complete byte string (a convenience for buffered bodies): the redacted
    /// copy, or `None` if nothing matched.
    pub fn redact(&self, bytes: &[u8]) -> Option<Vec<u8>> {
        let ac = self.automaton.as_ref()?;
        let mut marks = Vec::new();
        find_marks(ac, bytes, &mut marks);
        if marks.is_empty() {
            return None;
        }
        let mut out = bytes.to_vec();
        apply(&mut out, &marks);
        Some(out)
    }
}

impl std::fmt::Debug for Needles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Needles")
            .field("patterns", &self.patterns.len())
            .field("max_len", &self.max_len())
            .field("skipped", &self.skipped)
            .finish()
    }
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("held", &self.tail.len())
            .field("redacted", &self.redacted)
            .finish()
    }
}

/// Builds an automaton from as many needles as fit, longest first, if the full set is too
/// large for aho-corasick's limits. Practically unreachable (it takes megabytes of
/// secrets).
fn fallback_automaton(patterns: &[Vec<u8>]) -> Option<AhoCorasick> {
    let mut sorted: Vec<&Vec<u8>> = patterns.iter().collect();
    sorted.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut n = sorted.len() / 2;
    while n > 0 {
        if let Ok(ac) = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&sorted[..n])
        {
            return Some(ac);
        }
        n /= 2;
    }
    None
}

/// The forms of one secret to search for (may contain duplicates).
fn encodings(secret: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![secret.to_vec()];
    for slash in [false, true] {
        for ascii in [false, true] {
            for upper in [false, true] {
                if let Some(e) = json_escape(secret, slash, ascii, upper) {
                    out.push(e);
                }
            }
        }
    }
    for upper in [false, true] {
        for plus in [false, true] {
            out.push(percent_encode(secret, upper, plus));
        }
    }
    out
}

fn hex_digit(n: u8, upper: bool) -> u8 {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    digits[usize::from(n & 0xf)]
}

fn push_u_escape(out: &mut Vec<u8>, unit: u16, upper: bool) {
    out.extend_from_slice(b"\\u");
    for shift in [12, 8, 4, 0] {
        // The mask keeps the value below 16.
        out.push(hex_digit(((unit >> shift) & 0xf) as u8, upper));
    }
}

/// The secret as the content of a JSON string. `slash`: `/` as `\/`; `ascii`: non-ASCII
/// characters as `\uXXXX` (UTF-16 units; `None` if the secret is not UTF-8); `upper`:
/// uppercase hex digits in `\u` escapes.
fn json_escape(secret: &[u8], slash: bool, ascii: bool, upper: bool) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(secret.len() + 8);
    let escape_byte = |out: &mut Vec<u8>, b: u8| match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'/' if slash => out.extend_from_slice(b"\\/"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        0..=0x1f => push_u_escape(out, u16::from(b), upper),
        _ => out.push(b),
    };
    if ascii {
        let text = std::str::from_utf8(secret).ok()?;
        for c in text.chars() {
            if c.is_ascii() {
                // ASCII: one byte.
                escape_byte(&mut out, c as u8);
            } else {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    push_u_escape(&mut out, *unit, upper);
                }
            }
        }
    } else {
        for &b in secret {
            escape_byte(&mut out, b);
        }
    }
    Some(out)
}

/// The secret percent-encoded: everything but RFC 3986 unreserved characters as `%XX`
/// (`plus`: space as `+`, as in form encoding).
fn percent_encode(secret: &[u8], upper: bool, plus: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(secret.len() * 3);
    for &b in secret {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => out.push(b),
            b' ' if plus => out.push(b'+'),
            _ => out.extend_from_slice(&[b'%', hex_digit(b >> 4, upper), hex_digit(b, upper)]),
        }
    }
    out
}

/// Appends to `marks` the byte ranges of `hay` covered by any occurrence of any needle,
/// sorted and merged (adjacent ranges stay separate; that does not matter).
fn find_marks(ac: &AhoCorasick, hay: &[u8], marks: &mut Vec<Range<usize>>) {
    let mut from = 0;
    while from < hay.len() {
        // Leftmost-longest: the longest occurrence at the leftmost start ≥ `from`; it
        // covers every shorter one at the same start. Restarting one byte after its
        // start finds overlapping occurrences too.
        let Some(m) = ac.find(Input::new(hay).range(from..)) else {
            break;
        };
        let range = m.range();
        match marks.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => marks.push(range.clone()),
        }
        from = range.start + 1;
    }
}

/// Replaces the marked bytes with [`REDACTION_BYTE`].
fn apply(bytes: &mut [u8], marks: &[Range<usize>]) {
    for r in marks {
        let end = r.end.min(bytes.len());
        if r.start < end {
            bytes[r.start..end].fill(REDACTION_BYTE);
        }
    }
}

/// Merges two sorted lists of ranges into one sorted, merged list.
fn merge(a: Vec<Range<usize>>, b: Vec<Range<usize>>) -> Vec<Range<usize>> {
    if a.is_empty() {
        return b;
    }
    if b.is_empty() {
        return a;
    }
    let mut all = a;
    all.extend(b);
    all.sort_unstable_by_key(|r| r.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(all.len());
    for r in all {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Redacts one body as a stream of chunks (from [`Needles::scanner`]).
///
/// Concatenating every [`push`](Self::push) output and the [`finish`](Self::finish)
/// output gives the input with every occurrence of every needle replaced by `*` of the
/// same length, however the input was split. `Debug` shows counts only.
pub struct Scanner {
    automaton: Option<AhoCorasick>,
    /// Bytes held back: `max_len - 1`.
    keep: usize,
    /// The held-back bytes, unredacted (a later needle may overlap a redacted one).
    tail: Vec<u8>,
    /// Ranges of `tail` already known to be redacted.
    tail_marks: Vec<Range<usize>>,
    /// Bytes redacted in the output so far.
    redacted: u64,
}

impl Scanner {
    /// Feeds the next chunk. Returns the bytes that are safe to emit now (possibly empty)
    /// and whether any of them were redacted.
    pub fn push(&mut self, chunk: Bytes) -> (Bytes, bool) {
        let Some(ac) = &self.automaton else {
            return (chunk, false);
        };
        if chunk.is_empty() {
            return (chunk, false);
        }
        if self.tail.is_empty() {
            // Search the chunk in place; copy only what must change.
            let mut marks = Vec::new();
            find_marks(ac, &chunk, &mut marks);
            let emit = chunk.len().saturating_sub(self.keep);
            self.tail = chunk[emit..].to_vec();
            self.tail_marks = shift_marks(&marks, emit);
            let (out, n) = if marks.iter().any(|r| r.start < emit) {
                let mut bytes = chunk[..emit].to_vec();
                let n = count(&marks, emit);
                apply(&mut bytes, &marks);
                (Bytes::from(bytes), n)
            } else {
                (chunk.slice(..emit), 0)
            };
            return self.emitted(out, n);
        }
        let mut buf = std::mem::take(&mut self.tail);
        buf.extend_from_slice(&chunk);
        let mut found = Vec::new();
        find_marks(ac, &buf, &mut found);
        let marks = merge(std::mem::take(&mut self.tail_marks), found);
        let emit = buf.len().saturating_sub(self.keep);
        self.tail = buf[emit..].to_vec();
        self.tail_marks = shift_marks(&marks, emit);
        buf.truncate(emit);
        let n = count(&marks, emit);
        apply(&mut buf, &marks);
        self.emitted(Bytes::from(buf), n)
    }

    /// Flushes the held-back bytes at the end of the body; the scanner is then empty (and
    /// could scan another body).
    pub fn finish(&mut self) -> (Bytes, bool) {
        let mut tail = std::mem::take(&mut self.tail);
        let marks = std::mem::take(&mut self.tail_marks);
        let n = count(&marks, tail.len());
        apply(&mut tail, &marks);
        self.emitted(Bytes::from(tail), n)
    }

    /// How many bytes are held back (emitted by a later `push` or by `finish`).
    pub fn held(&self) -> usize {
        self.tail.len()
    }

    /// Bytes redacted in the output so far.
    pub fn redacted_bytes(&self) -> u64 {
        self.redacted
    }

    fn emitted(&mut self, out: Bytes, redacted: u64) -> (Bytes, bool) {
        self.redacted += redacted;
        (out, redacted > 0)
    }
}

/// The parts of `marks` at or after `at`, shifted to start at 0.
fn shift_marks(marks: &[Range<usize>], at: usize) -> Vec<Range<usize>> {
    marks
        .iter()
        .filter(|r| r.end > at)
        .map(|r| r.start.max(at) - at..r.end - at)
        .collect()
}

/// How many bytes before `end` the marks cover.
fn count(marks: &[Range<usize>], end: usize) -> u64 {
    marks
        .iter()
        .map(|r| r.end.min(end).saturating_sub(r.start) as u64)
        .sum()
}

/// Called once, at the first redaction in a response, with the number of body bytes
/// redacted in the output so far (at least 1; a secret split by the hold-back may be
/// counted only partly; 0 if the first redaction was in the trailers).
pub type OnReflected = Box<dyn FnOnce(u64) + Send>;

pin_project_lite::pin_project! {
    /// A response body with every needle redacted (see the module docs), for
    /// `http_body::Body` bodies of [`Bytes`]. Trailers are redacted like headers.
    ///
    /// The same length as the inner body, so an exact
    /// [`size_hint`](Body::size_hint) stays exact. `Send`/`Sync`/`Unpin` when the inner
    /// body is.
    pub struct RedactingBody<B> {
        #[pin]
        inner: B,
        scanner: Scanner,
        needles: Needles,
        // A Mutex only to make the body `Sync` (for `BoxBody`); never locked
        // (`get_mut`).
        on_reflected: Mutex<Option<OnReflected>>,
        // Trailers waiting for the held-back bytes to be emitted first.
        trailers: Option<HeaderMap>,
        done: bool,
    }
}

impl<B> RedactingBody<B> {
    /// Wraps `inner`; `on_reflected` is called at the first redaction, if any.
    pub fn new(inner: B, needles: Needles, on_reflected: OnReflected) -> Self {
        RedactingBody {
            inner,
            scanner: needles.scanner(),
            needles,
            on_reflected: Mutex::new(Some(on_reflected)),
            trailers: None,
            done: false,
        }
    }

    /// Bytes redacted so far.
    pub fn redacted_bytes(&self) -> u64 {
        self.scanner.redacted_bytes()
    }
}

/// Calls the callback if it has not been called yet.
fn reflected(slot: &mut Mutex<Option<OnReflected>>, redacted: u64) {
    let slot = match slot.get_mut() {
        Ok(slot) => slot,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(callback) = slot.take() {
        callback(redacted);
    }
}

impl<B> Body for RedactingBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
        if *this.done {
            return Poll::Ready(None);
        }
        loop {
            let frame = match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => {
                    *this.done = true;
                    let (tail, hit) = this.scanner.finish();
                    if hit {
                        reflected(this.on_reflected, this.scanner.redacted_bytes());
                    }
                    return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail))));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let (out, hit) = this.scanner.push(data);
                    if hit {
                        reflected(this.on_reflected, this.scanner.redacted_bytes());
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Err(frame) => {
                    let Ok(mut trailers) = frame.into_trailers() else {
                        // Neither data nor trailers (a future frame kind): drop it.
                        continue;
                    };
                    // Trailers end the body: the held-back bytes go first.
                    *this.done = true;
                    let (tail, hit) = this.scanner.finish();
                    let hit_trailers = this.needles.redact_headers(&mut trailers);
                    if hit || hit_trailers {
                        reflected(this.on_reflected, this.scanner.redacted_bytes());
                    }
                    if tail.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    *this.trailers = Some(trailers);
                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.trailers.is_none()
            && (self.done || (self.scanner.held() == 0 && self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        if self.done {
            return SizeHint::with_exact(0);
        }
        let held = self.scanner.held() as u64;
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(held));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(held));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]
    use super::*;
    use http_body_util::{BodyExt, Full};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    /// The expected output: every occurrence of every pattern replaced, by brute force.
    fn naive(needles: &Needles, hay: &[u8]) -> Vec<u8> {
        let mut out = hay.to_vec();
        for p in needles.patterns() {
            for i in 0..hay.len().saturating_sub(p.len() - 1) {
                if hay[i..].starts_with(p) {
                    out[i..i + p.len()].fill(b'*');
                }
            }
        }
        out
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    /// Runs a scanner over `hay` split at random sizes (biased towards tiny chunks).
    fn scan_chunked(needles: &Needles, hay: &[u8], rng: &mut StdRng) -> (Vec<u8>, u64) {
        let mut scanner = needles.scanner();
        let mut out = Vec::new();
        let mut rest = hay;
        let mut flagged = 0;
        while !rest.is_empty() {
            let n = match rng.random_range(0..4) {
                0 => 1,
                1 => rng.random_range(1..=4),
                2 => rng.random_range(1..=40),
                _ => rng.random_range(1..=400),
            }
            .min(rest.len());
            let (chunk, more) = rest.split_at(n);
            rest = more;
            let before = scanner.redacted_bytes();
            let (bytes, hit) = scanner.push(Bytes::copy_from_slice(chunk));
            assert_eq!(hit, scanner.redacted_bytes() > before);
            assert!(scanner.held() < needles.max_len().max(1));
            flagged += u64::from(hit);
            out.extend_from_slice(&bytes);
        }
        let (bytes, hit) = scanner.finish();
        flagged += u64::from(hit);
        out.extend_from_slice(&bytes);
        assert_eq!(scanner.held(), 0);
        (out, flagged)
    }

    #[test]
    fn encodings_are_generated() {
        let n = Needles::new(["abc/\"d\\e f\u{e9}\n"]);
        let pats: Vec<String> = n
            .patterns()
            .map(|p| String::from_utf8(p.to_vec()).unwrap())
            .collect();
        for expected in [
            "abc/\"d\\e f\u{e9}\n",
            r#"abc/\"d\\e f\u{e9}\n"#,
            r#"abc\/\"d\\e f\u{e9}\n"#,
            r#"abc/\"d\\e f\u00e9\n"#,
            r#"abc/\"d\\e f\u00E9\n"#,
            "abc%2F%22d%5Ce%20f%C3%A9%0A",
            "abc%2f%22d%5ce%20f%c3%a9%0a",
            "abc%2F%22d%5Ce+f%C3%A9%0A",
        ] {
            let expected = expected.replace("\\u{e9}", "\u{e9}");
            assert!(pats.contains(&expected), "{expected:?} not in {pats:?}");
        }
        // A plain token has one form.
        let n = Needles::new(["sk_live_0123456789abcdef"]);
        assert_eq!(n.patterns().count(), 1);
        // Control characters as \u00xx.
        let n = Needles::new(["abcdefgh\u{1}"]);
        assert!(n.patterns().any(|p| p == br"abcdefgh\u0001"));
    }

    #[test]
    fn short_secrets_are_skipped() {
        let n = Needles::new(["", "a", "1234567"]);
        assert!(n.is_empty());
        assert_eq!(n.skipped(), 3);
        assert_eq!(n.redact(b"1234567 a"), None);
        let mut s = n.scanner();
        assert_eq!(s.push(Bytes::from_static(b"1234567")).0, &b"1234567"[..]);
        assert_eq!(s.finish().0.len(), 0);
        let n = Needles::new(["12345678", "x"]);
        assert!(!n.is_empty());
        assert_eq!(n.skipped(), 1);
        assert_eq!(n.redact(b"x12345678x").unwrap(), b"x********x");
    }

    #[test]
    fn overlapping_and_adjacent() {
        let n = Needles::new(["abababab"]);
        assert_eq!(n.redact(b"xabababababx").unwrap(), b"x**********x");
        assert_eq!(n.redact(b"abababababababab").unwrap(), b"****************");
        let n = Needles::new(["aaaaaaaa", "aaaabbbbbbbb"]);
        assert_eq!(
            n.redact(b"caaaaaaaabbbbbbbbc").unwrap(),
            b"c****************c"
        );
    }

    #[test]
    fn property_random_chunks() {
        let mut rng = StdRng::seed_from_u64(0x5c09_e6a7);
        for round in 0..600 {
            // Small alphabets make overlaps and near-misses common.
            let alphabet: &[u8] = if round % 3 == 0 { b"ab" } else { b"abc\"\\/ %" };
            let n_secrets = rng.random_range(1..=3);
            let secrets: Vec<Vec<u8>> = (0..n_secrets)
                .map(|_| {
                    let len = rng.random_range(8..=20);
                    (0..len)
                        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                        .collect()
                })
                .collect();
            let needles = Needles::new(&secrets);
            let pats: Vec<Vec<u8>> = needles.patterns().map(<[u8]>::to_vec).collect();
            let mut hay: Vec<u8> = (0..rng.random_range(0..600))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            for _ in 0..rng.random_range(0..6) {
                let p = &pats[rng.random_range(0..pats.len())];
                let at = rng.random_range(0..=hay.len());
                hay.splice(at..at, p.iter().copied());
            }
            let expected = naive(&needles, &hay);
            let (out, flagged) = scan_chunked(&needles, &hay, &mut rng);
            assert_eq!(out, expected, "round {round}");
            assert_eq!(out.len(), hay.len());
            for p in &pats {
                assert!(!contains(&out, p), "round {round}: {p:?} survived");
            }
            assert_eq!(flagged > 0, expected != hay, "round {round}");
            assert_eq!(
                needles.redact(&hay).unwrap_or_else(|| hay.clone()),
                expected
            );
        }
    }

    #[test]
    fn property_realistic_secret_in_json() {
        let mut rng = StdRng::seed_from_u64(7);
        let secret = "tok_3f2b8c1e/9d4a+4e6b\"8f7a";
        let needles = Needles::new([secret, "other-secret-value"]);
        let json_form = serde_json::to_string(secret).unwrap();
        let json_form = &json_form[1..json_form.len() - 1];
        let pct = "tok_3f2b8c1e%2F9d4a%2B4e6b%228f7a";
        for round in 0..200 {
            let mut hay = String::new();
            for _ in 0..rng.random_range(1..8) {
                match rng.random_range(0..4) {
                    0 => hay.push_str(json_form),
                    1 => hay.push_str(pct),
                    2 => hay.push_str(secret),
                    _ => {
                        for _ in 0..rng.random_range(0..100) {
                            hay.push(char::from(rng.random_range(b' '..=b'~')));
                        }
                    }
                }
            }
            let (out, _) = scan_chunked(&needles, hay.as_bytes(), &mut rng);
            assert_eq!(out, naive(&needles, hay.as_bytes()), "round {round}");
            for form in [secret, json_form, pct] {
                assert!(!contains(&out, form.as_bytes()), "round {round}");
            }
        }
        // httpbin-style echo, one byte at a time.
        let echo = serde_json::json!({"headers": {"Authorization": format!("Bearer {secret}")}})
            .to_string();
        let mut s = needles.scanner();
        let mut out = Vec::new();
        for b in echo.as_bytes() {
            out.extend_from_slice(&s.push(Bytes::copy_from_slice(&[*b])).0);
        }
        out.extend_from_slice(&s.finish().0);
        assert_eq!(out.len(), echo.len());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "{{\"headers\":{{\"Authorization\":\"Bearer {}\"}}}}",
                "*".repeat(json_form.len())
            )
        );
    }

    #[test]
    fn headers() {
        let needles = Needles::new(["s3cr3t-t0ken-value"]);
        let mut h = HeaderMap::new();
        h.insert(
            "x-echo",
            HeaderValue::from_static("Bearer s3cr3t-t0ken-value"),
        );
        let mut sensitive = HeaderValue::from_static("a=s3cr3t-t0ken-value;b=s3cr3t-t0ken-value");
        sensitive.set_sensitive(true);
        h.append("set-cookie", sensitive);
        h.append("set-cookie", HeaderValue::from_static("plain"));
        h.insert(
            "location",
            HeaderValue::from_static("/cb?k=s3cr3t-t0ken-value"),
        );
        assert!(needles.redact_headers(&mut h));
        assert_eq!(h["x-echo"], "Bearer ******************");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies[0], "a=******************;b=******************");
        assert!(cookies[0].is_sensitive());
        assert_eq!(cookies[1], "plain");
        assert_eq!(h["location"], "/cb?k=******************");
        assert!(!needles.redact_headers(&mut h));
        assert!(!Needles::new(Vec::<&str>::new()).redact_headers(&mut h));
    }

    fn counting() -> (OnReflected, Arc<AtomicUsize>, Arc<AtomicU64>) {
        let calls = Arc::new(AtomicUsize::new(0));
        let arg = Arc::new(AtomicU64::new(u64::MAX));
        let (c, a) = (calls.clone(), arg.clone());
        let cb: OnReflected = Box::new(move |n| {
            c.fetch_add(1, Ordering::SeqCst);
            a.store(n, Ordering::SeqCst);
        });
        (cb, calls, arg)
    }

    /// A body of the given frames, with an exact size hint (unlike `StreamBody`).
    struct Frames {
        frames: std::collections::VecDeque<Frame<Bytes>>,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.frames.pop_front().map(Ok))
        }

        fn is_end_stream(&self) -> bool {
            self.frames.is_empty()
        }

        fn size_hint(&self) -> SizeHint {
            let n = self
                .frames
                .iter()
                .filter_map(|f| f.data_ref().map(Bytes::len))
                .sum::<usize>();
            SizeHint::with_exact(n as u64)
        }
    }

    fn frames(chunks: &[&'static [u8]], trailers: Option<HeaderMap>) -> Frames {
        let mut frames: std::collections::VecDeque<_> = chunks
            .iter()
            .map(|c| Frame::data(Bytes::from_static(c)))
            .collect();
        if let Some(t) = trailers {
            frames.push_back(Frame::trailers(t));
        }
        Frames { frames }
    }

    #[tokio::test]
    async fn body_redacts_across_frames_and_calls_back_once() {
        let needles = Needles::new(["SECRET-0123456789"]);
        let (cb, calls, arg) = counting();
        let inner = frames(
            &[
                b"{\"a\":\"SECRET-01",
                b"23456789\",",
                b"\"b\":\"SECRET-0123456789\"}",
            ],
            None,
        );
        let len = inner.size_hint().exact().unwrap();
        let body = RedactingBody::new(inner, needles, cb);
        assert_eq!(body.size_hint().exact(), Some(len));
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(out.len() as u64, len);
        assert_eq!(
            &out[..],
            b"{\"a\":\"*****************\",\"b\":\"*****************\"}"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The first secret was emitted in parts (the held-back tail came later).
        assert!((1..=34).contains(&arg.load(Ordering::SeqCst)));
    }

    #[tokio::test]
    async fn body_size_hint_stays_exact_while_streaming() {
        let needles = Needles::new(["SECRET-0123456789"]);
        let (cb, _, _) = counting();
        let mut body = RedactingBody::new(
            frames(&[b"xxSECRET-0123", b"456789yy", b"zz"], None),
            needles,
            cb,
        );
        let mut total = 0;
        assert_eq!(body.size_hint().exact(), Some(23));
        while let Some(frame) = body.frame().await {
            total += frame.unwrap().into_data().unwrap().len();
            assert_eq!(body.size_hint().exact(), Some(23 - total as u64));
        }
        assert_eq!(total, 23);
        assert!(body.is_end_stream());
    }

    #[tokio::test]
    async fn no_secret_passes_through_unchanged() {
        let needles = Needles::new(["SECRET-0123456789"]);
        let (cb, calls, _) = counting();
        let input: &[&'static [u8]] = &[b"SECRET-012345678", b"9", b"-- SECRET-01234567 --"];
        // The second chunk completes the secret: use a near miss instead.
        let input = [input[0], b"X", input[2]];
        let body = RedactingBody::new(frames(&input, None), needles.clone(), cb);
        let out = body.collect().await.unwrap().to_bytes();
        assert_eq!(&out[..], &input.concat()[..]);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
        // Full, and no needles at all.
        let (cb, calls, _) = counting();
        let body = RedactingBody::new(
            Full::new(Bytes::from_static(b"hello")),
            Needles::new(["short"]),
            cb,
        );
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn full_body_and_trailers() {
        let needles = Needles::new(["SECRET-0123456789"]);
        let (cb, calls, _) = counting();
        let body = RedactingBody::new(
            Full::new(Bytes::from_static(b"echo: SECRET-0123456789")),
            needles.clone(),
            cb,
        );
        assert_eq!(
            &body.collect().await.unwrap().to_bytes()[..],
            b"echo: *****************"
        );
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        // Trailers only: redacted, the callback still fires once, with 0 body bytes.
        let mut t = HeaderMap::new();
        t.insert("x-echo", HeaderValue::from_static("SECRET-0123456789"));
        let (cb, calls, arg) = counting();
        let body = RedactingBody::new(frames(&[b"ok SECRET"], Some(t)), needles, cb);
        let collected = body.collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["x-echo"], "*****************");
        assert_eq!(&collected.to_bytes()[..], b"ok SECRET");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(arg.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn body_property_random_frames() {
        let mut rng = StdRng::seed_from_u64(42);
        let secret = b"Bearer abcdefghijkl";
        for _ in 0..50 {
            let mut hay: Vec<u8> = (0..rng.random_range(0..300))
                .map(|_| b"abcBearer "[rng.random_range(0..10)])
                .collect();
            let hits = rng.random_range(0..3);
            for _ in 0..hits {
                let at = rng.random_range(0..=hay.len());
                hay.splice(at..at, secret.iter().copied());
            }
            let mut frames = std::collections::VecDeque::new();
            let mut rest = &hay[..];
            while !rest.is_empty() {
                let n = rng.random_range(1..=20).min(rest.len());
                frames.push_back(Frame::data(Bytes::copy_from_slice(&rest[..n])));
                rest = &rest[n..];
            }
            let needles = Needles::new([secret]);
            let expected = naive(&needles, &hay);
            let (cb, calls, _) = counting();
            let body = RedactingBody::new(Frames { frames }, needles, cb);
            let out = body.collect().await.unwrap().to_bytes();
            assert_eq!(&out[..], &expected[..]);
            assert_eq!(calls.load(Ordering::SeqCst), usize::from(expected != hay));
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let n = Needles::new(["s3cr3t-t0ken-value"]);
        let mut s = n.scanner();
        s.push(Bytes::from_static(b"xx s3cr3t-t0ken"));
        for text in [format!("{n:?}"), format!("{s:?}")] {
            assert!(!text.contains("s3cr3t"), "{text}");
        }
    }

    #[test]
    fn body_is_send_sync_unpin() {
        fn check<T: Send + Sync + Unpin + 'static>() {}
        check::<RedactingBody<Full<Bytes>>>();
        check::<Scanner>();
        check::<Needles>();
    }
}
