//! Zero-copy scanner of the SIP fields routing needs.
//!
//! [`SipMessage::parse`] walks the header section once: the walk itself finds
//! the empty line ending it (no separate CRLFCRLF search), classifies each
//! header name with one switch on (length, first letter), and keeps only
//! `u32` offsets into the message's [`Bytes`]. What routing reads is parsed
//! during that pass and read back in O(1): the Request-URI (scheme, user,
//! host, port, parameter area), the top via-parm (sent-by host/port, branch,
//! received, rport, parameters), Call-ID, CSeq, Max-Forwards, Content-Length,
//! the From and To tags, the first value of every header [`SipMessage::header`]
//! answers without a walk, and whether any `X-Viaduct-*` header is present.
//! Nothing is allocated per message.
//! ```text
//!  0                   sl_end      fields.start            fields.end  body.start   body.end
//!  │ start-line         │CRLF│ name ":" value CRLF ...         │CRLF│    body         │
//!  └─ INVITE sip:b@x SIP/2.0     │   ╰─ folded: CRLF (SP|HT) ...     └ empty line
//!                                ╰─ name = token, LWS allowed before ":"
//!
//!  Via:   proto LWS? "/" LWS? version LWS? "/" LWS? transport LWS host [":" port]
//!         *( LWS? ";" LWS? name [LWS? "=" LWS? value] ) [ "," via-parm ... ]
//!  From/To/Contact/Route:
//!         [ display ] "<" URI ">" *( ";" param )   |   URI-without-;?, *( ";" param )
//!  URI:   scheme ":" [ user [":" password] "@" ] host [":" port] *( ";" p[=v] ) [ "?" headers ]
//! ```
//!
//! Header names are case-insensitive and compact forms (`i`, `l`, `v`, `f`,
//! `t`, `m`, ...) are recognised everywhere. Missing headers are `None`,
//! never errors: the router decides.
//!
//! Validation is split in two, so responses and in-dialog requests pay only
//! for what they use:
//!
//! | check                                                        | where |
//! |--------------------------------------------------------------|-------|
//! | start line, Request-URI                                      | [`SipMessage::parse`] |
//! | header line syntax, limits, Content-Length vs body           | [`SipMessage::parse`] |
//! | every via-parm of every Via; Call-ID, CSeq, Max-Forwards, Content-Length | [`SipMessage::parse`] |
//! | single-valued headers repeated with another value (multi01)  | [`SipMessage::parse`] |
//! | From/To: one name-addr or addr-spec (quotbal, badaspec, baddn) | [`SipMessage::validate`] |
//! | first Contact value (regbadct), first Route value            | [`SipMessage::validate`] |
//!
//! The scan locates the From/To tags with a light scan that skips quoted
//! strings and `<...>`; on any value [`SipMessage::validate`] accepts it agrees
//! with the full parse (checked by the `sip_scan` fuzz target). A router calls
//! `validate` on initial requests (no To tag) before acting on them;
//! [`SipMessage::from`], [`SipMessage::to`], [`SipMessage::contact`] and
//! [`SipMessage::top_route`] parse on each call and return `None` for a
//! malformed value, and the rewriter skips edits of a malformed Contact or
//! Route.

use std::ops::Range;

use bytes::Bytes;
use memchr::memmem;

use super::find::find;

use super::Limits;

/// Why a framed SIP message could not be scanned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScanError {
    /// The message has no empty line (CRLFCRLF) ending its header section.
    #[error("SIP header section is not terminated by an empty line (CRLFCRLF)")]
    UnterminatedHeaders,
    /// The header section is longer than [`Limits::max_header_bytes`].
    #[error("SIP header section exceeds max_header_bytes = {limit}")]
    HeaderTooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The message is larger than 4 GiB, beyond what the scanner's offsets hold.
    #[error("SIP message of {len} bytes exceeds the scanner's 4 GiB offset range")]
    MessageTooLarge {
        /// Length of the message.
        len: usize,
    },
    /// The request or status line (line 1) is malformed.
    #[error("invalid SIP start line: {reason}")]
    InvalidStartLine {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The Request-URI of the request line is malformed.
    #[error("invalid Request-URI in the request line: {reason}")]
    InvalidRequestUri {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A header line has no colon separating name and value.
    #[error("SIP header line {line} has no colon")]
    MissingColon {
        /// 1-based line number in the message (the start line is line 1).
        line: usize,
    },
    /// A header name is empty or holds characters that are not `token` chars.
    #[error("SIP header line {line} has an invalid header name")]
    InvalidHeaderName {
        /// 1-based line number in the message (the start line is line 1).
        line: usize,
    },
    /// More header fields than [`Limits::max_headers`].
    #[error("SIP message has more than max_headers = {limit} header fields")]
    TooManyHeaders {
        /// The limit in force.
        limit: usize,
    },
    /// A routing-critical header is present but malformed.
    #[error("malformed {header} header (line {line}): {reason}")]
    MalformedHeader {
        /// The header's canonical name, e.g. `"Via"`.
        header: &'static str,
        /// 1-based line number where the header field starts.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A single-valued header appears again with a different value (RFC 4475 multi01).
    #[error("single-valued {header} header repeated with a different value (line {line})")]
    RepeatedHeader {
        /// The header's canonical name, e.g. `"Call-ID"`.
        header: &'static str,
        /// 1-based line number of the repetition.
        line: usize,
    },
    /// Content-Length announces more body bytes than the message holds.
    #[error("body is {got} bytes but Content-Length says {content_length}")]
    BodyTruncated {
        /// The Content-Length value.
        content_length: usize,
        /// Body bytes actually present.
        got: usize,
    },
}

// ---------------------------------------------------------------------------
// Lexical helpers (shared with the framer and the rewriter).

const fn token_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.' | b'!' | b'%' | b'*' | b'_' | b'+' | b'`' | b'\'' | b'~'
            );
        i += 1;
    }
    t
}
static TOKEN: [bool; 256] = token_table();

/// `token` characters of RFC 3261 §25.1.
pub(crate) fn is_token(b: u8) -> bool {
    TOKEN[b as usize]
}

/// Whitespace inside a header value: SP, HT, and the CR LF of folded lines.
pub(crate) fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

pub(crate) fn skip_lws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_lws(s[i]) {
        i += 1;
    }
    i
}

pub(crate) fn trim_lws(s: &[u8]) -> &[u8] {
    let start = skip_lws(s, 0);
    let mut end = s.len();
    while end > start && is_lws(s[end - 1]) {
        end -= 1;
    }
    &s[start..end]
}

/// Offset of `sub` inside `base`; `sub` must be a sub-slice of `base`.
pub(crate) fn offset_in(sub: &[u8], base: &[u8]) -> usize {
    (sub.as_ptr() as usize).wrapping_sub(base.as_ptr() as usize)
}

static CRLFCRLF: std::sync::LazyLock<memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memmem::Finder::new(b"\r\n\r\n"));

/// Index of the first CRLFCRLF in `buf` (searcher built once).
pub(crate) fn find_crlfcrlf(buf: &[u8]) -> Option<usize> {
    CRLFCRLF.find(buf)
}

fn eq_ic(a: &[u8], b: &[u8]) -> bool {
    a.eq_ignore_ascii_case(b)
}

/// Parses 1*DIGIT (surrounding LWS not allowed) as u64, `None` if not digits
/// or overflowing.
pub(crate) fn parse_u64(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    Some(v)
}

// ---------------------------------------------------------------------------
// Header field iteration.

/// One header field: name, trimmed value and the whole line(s) it occupies.
#[derive(Debug, Clone)]
pub(crate) struct Field {
    /// Name, trailing SP/HT trimmed.
    pub(crate) name: Range<usize>,
    /// Value, LWS trimmed (may contain folds).
    pub(crate) value: Range<usize>,
    /// The field's bytes including continuation lines and the final CRLF.
    pub(crate) line: Range<usize>,
}

/// A header line that is not `name ":" value` (the scan reports the details).
#[derive(Debug, Clone, Copy)]
pub(crate) struct FieldError;

/// Iterates the header fields in `buf[pos..end]`, where `end` is just past the
/// CRLF of the last header line.
#[derive(Debug, Clone)]
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8], pos: usize, end: usize) -> Self {
        Fields { buf, pos, end }
    }
}

/// End of the physical line starting at `p` in `buf[..end]`: (content end,
/// next line start). Lines end at CRLF only: a bare LF or CR is part of the
/// line (the framer and the scanner must agree on line boundaries).
#[inline(always)]
pub(crate) fn crlf_line_end(buf: &[u8], p: usize, end: usize) -> (usize, usize) {
    let mut from = p;
    while let Some(off) = find(b'\n', &buf[from..end]) {
        let lf = from + off;
        if lf > p && buf[lf - 1] == b'\r' {
            return (lf - 1, lf + 1);
        }
        from = lf + 1;
    }
    (end, end)
}

impl Iterator for Fields<'_> {
    type Item = Result<Field, FieldError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            return None;
        }
        let (buf, end) = (self.buf, self.end);
        let start = self.pos;
        // Name: token chars, then SP/HT, then ':' (the common case); else the
        // first ':' of the first line, as the scan's error path does.
        let mut i = start;
        while i < end && is_token(buf[i]) {
            i += 1;
        }
        let mut name_end = i;
        while i < end && matches!(buf[i], b' ' | b'\t') {
            i += 1;
        }
        let (first_end, mut next) = crlf_line_end(buf, start, end);
        let colon = if name_end > start && i < end && buf[i] == b':' {
            i
        } else {
            let Some(colon) = find(b':', &buf[start..first_end]).map(|c| start + c) else {
                self.pos = skip_continuations(buf, next, end);
                return Some(Err(FieldError));
            };
            name_end = colon;
            while name_end > start && matches!(buf[name_end - 1], b' ' | b'\t') {
                name_end -= 1;
            }
            colon
        };
        let mut content_end = first_end;
        while next < end && matches!(buf[next], b' ' | b'\t') {
            (content_end, next) = crlf_line_end(buf, next, end);
        }
        self.pos = next;
        if name_end == start || matches!(buf[start], b' ' | b'\t') {
            return Some(Err(FieldError));
        }
        let vs = skip_lws(&buf[..content_end], colon + 1);
        let mut ve = content_end;
        while ve > vs && is_lws(buf[ve - 1]) {
            ve -= 1;
        }
        Some(Ok(Field {
            name: start..name_end,
            value: vs..ve,
            line: start..next,
        }))
    }
}

fn skip_continuations(buf: &[u8], mut next: usize, end: usize) -> usize {
    while next < end && matches!(buf[next], b' ' | b'\t') {
        next = crlf_line_end(buf, next, end).1;
    }
    next
}

/// Header fields the scanner tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Known {
    CallId,
    ContentLength,
    Via,
    From,
    To,
    Contact,
    CSeq,
    MaxForwards,
    Route,
    Other,
}

/// Classifies a header name (case-insensitive, compact forms included):
/// one switch on (length, first letter), then at most one comparison.
#[inline]
pub(crate) fn classify(name: &[u8]) -> Known {
    let Some(&first) = name.first() else {
        return Known::Other;
    };
    // Lower-cases ASCII letters; other token chars never match a letter below.
    let is = |long: &[u8]| eq_ic(&name[1..], &long[1..]);
    match (name.len(), first | 0x20) {
        (1, b'i') => Known::CallId,
        (1, b'l') => Known::ContentLength,
        (1, b'v') => Known::Via,
        (1, b'f') => Known::From,
        (1, b't') => Known::To,
        (1, b'm') => Known::Contact,
        (2, b't') if is(b"to") => Known::To,
        (3, b'v') if is(b"via") => Known::Via,
        (4, b'f') if is(b"from") => Known::From,
        (4, b'c') if is(b"cseq") => Known::CSeq,
        (5, b'r') if is(b"route") => Known::Route,
        (7, b'c') if is(b"call-id") => Known::CallId,
        (7, b'c') if is(b"contact") => Known::Contact,
        (12, b'm') if is(b"max-forwards") => Known::MaxForwards,
        (14, b'c') if is(b"content-length") => Known::ContentLength,
        _ => Known::Other,
    }
}

/// `s` as two little-endian words (at most 16 bytes), for [`classify_at`].
const fn name_key(s: &[u8]) -> [u64; 2] {
    let mut k = [0u64; 2];
    let mut i = 0;
    while i < s.len() {
        k[i / 8] |= (s[i] as u64) << (8 * (i % 8));
        i += 1;
    }
    k
}

/// [`classify`] for the name `buf[start..start + len]`, which the caller
/// checked is all `token` chars: the same switch on (length, first letter),
/// then a comparison of whole words instead of a byte loop when 16 bytes can
/// be read at `start`.
#[inline]
fn classify_at(buf: &[u8], start: usize, len: usize) -> Known {
    const LOWER: u64 = u64::from_le_bytes([0x20; 8]);
    let first = buf[start] | 0x20;
    let (known, key) = match (len, first) {
        (1, _) => return classify(&buf[start..start + 1]),
        (2, b't') => (Known::To, name_key(b"to")),
        (3, b'v') => (Known::Via, name_key(b"via")),
        (4, b'f') => (Known::From, name_key(b"from")),
        (4, b'c') => (Known::CSeq, name_key(b"cseq")),
        (5, b'r') => (Known::Route, name_key(b"route")),
        (7, b'c') => match buf.get(start + 3) {
            Some(b'l' | b'L') => (Known::CallId, name_key(b"call-id")),
            _ => (Known::Contact, name_key(b"contact")),
        },
        (12, b'm') => (Known::MaxForwards, name_key(b"max-forwards")),
        (14, b'c') => (Known::ContentLength, name_key(b"content-length")),
        _ => return Known::Other,
    };
    let Some(word) = buf.get(start..start + 16) else {
        return classify(&buf[start..start + len]);
    };
    // Unwraps: 8-byte halves of a 16-byte slice.
    #[allow(clippy::unwrap_used)]
    let (w0, w1) = (
        u64::from_le_bytes(word[..8].try_into().unwrap()),
        u64::from_le_bytes(word[8..].try_into().unwrap()),
    );
    // `| 0x20` lower-cases letters and keeps digits and `-.!%*_+`'~`; of the
    // bytes it maps onto a letter or '-', only upper-case letters and CR are
    // not that byte already, and CR is not a token char: so on token chars
    // this is an exact case-insensitive comparison.
    let mask = |n: usize| {
        if n >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * n)) - 1
        }
    };
    let hit =
        (w0 | LOWER) & mask(len) == key[0] && (len <= 8 || (w1 | LOWER) & mask(len - 8) == key[1]);
    if hit {
        known
    } else {
        Known::Other
    }
}

/// Length of the run of `token` chars at the start of `s`.
#[inline]
fn token_run(s: &[u8]) -> usize {
    run_len(s, &TOKEN)
}

/// Length of the run of bytes `b` with `table[b]` at the start of `s`.
#[inline]
fn run_len(s: &[u8], table: &[bool; 256]) -> usize {
    let ok = |b: u8| table[b as usize];
    let mut n = 0;
    // Four at a time: fewer, better predicted branches on typical names and
    // values.
    for c in s.chunks_exact(4) {
        if !(ok(c[0]) & ok(c[1]) & ok(c[2]) & ok(c[3])) {
            break;
        }
        n += 4;
    }
    while n < s.len() && ok(s[n]) {
        n += 1;
    }
    n
}

/// Compact forms registered with IANA (RFC 3261 §7.3.3 and later RFCs).
const COMPACT: [(u8, &str); 20] = [
    (b'a', "accept-contact"),
    (b'b', "referred-by"),
    (b'c', "content-type"),
    (b'd', "request-disposition"),
    (b'e', "content-encoding"),
    (b'f', "from"),
    (b'i', "call-id"),
    (b'j', "reject-contact"),
    (b'k', "supported"),
    (b'l', "content-length"),
    (b'm', "contact"),
    (b'n', "identity-info"),
    (b'o', "event"),
    (b'r', "refer-to"),
    (b's', "subject"),
    (b't', "to"),
    (b'u', "allow-events"),
    (b'v', "via"),
    (b'x', "session-expires"),
    (b'y', "identity"),
];

/// A header name to look for, in its long and compact spellings.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NameQuery<'a> {
    long: &'a [u8],
    short: Option<u8>,
}

impl<'a> NameQuery<'a> {
    pub(crate) fn new(name: &'a str) -> Self {
        let n = name.as_bytes().trim_ascii();
        if n.len() == 1 {
            let c = n[0].to_ascii_lowercase();
            if let Some(&(_, long)) = COMPACT.iter().find(|(s, _)| *s == c) {
                return NameQuery {
                    long: long.as_bytes(),
                    short: Some(c),
                };
            }
            return NameQuery {
                long: n,
                short: None,
            };
        }
        let short = COMPACT
            .iter()
            .find(|(_, l)| eq_ic(l.as_bytes(), n))
            .map(|(s, _)| *s);
        NameQuery { long: n, short }
    }

    pub(crate) fn matches(&self, name: &[u8]) -> bool {
        eq_ic(name, self.long)
            || (name.len() == 1 && Some(name[0].to_ascii_lowercase()) == self.short)
    }
}

// ---------------------------------------------------------------------------
// Parameters.

/// End (exclusive) of a quoted string starting at `s[i] == '"'`.
fn quoted_end(s: &[u8], i: usize) -> Result<usize, &'static str> {
    let mut j = i + 1;
    while j < s.len() {
        match s[j] {
            b'\\' => j += 2,
            b'"' => return Ok(j + 1),
            _ => j += 1,
        }
    }
    Err("unterminated quoted string")
}

/// One header parameter: name and optional value ranges within the scanned slice,
/// plus the range from the name to the end of the value.
#[derive(Debug, Clone)]
pub(crate) struct Param {
    pub(crate) name: Range<usize>,
    pub(crate) value: Option<Range<usize>>,
}

/// Scans `*( LWS? ";" LWS? name [ LWS? "=" LWS? value ] )` from `i`, calling
/// `f` for each parameter. Stops before a `,` or at the end of `s`; anything
/// else is an error. Returns where it stopped.
pub(crate) fn scan_params(
    s: &[u8],
    mut i: usize,
    mut f: impl FnMut(Param),
) -> Result<usize, &'static str> {
    loop {
        // Fast path: `;name=value` or `;name` without LWS, a plain value, and
        // (without a value) ';', ',' or the end next; what the general steps
        // below find too. Anything else goes through them from `i`.
        if s.get(i) == Some(&b';') {
            let ns = i + 1;
            let ne = ns + token_run(&s[ns..]);
            if ne > ns {
                match s.get(ne) {
                    Some(b'=') => {
                        let vs = ne + 1;
                        let ve = vs + run_len(&s[vs..], &PVALUE);
                        if ve > vs {
                            f(Param {
                                name: ns..ne,
                                value: Some(vs..ve),
                            });
                            i = ve;
                            continue;
                        }
                    }
                    Some(b';' | b',') | None => {
                        f(Param {
                            name: ns..ne,
                            value: None,
                        });
                        i = ne;
                        continue;
                    }
                    _ => {}
                }
            }
        }
        i = skip_lws(s, i);
        if i >= s.len() || s[i] == b',' {
            return Ok(i);
        }
        if s[i] != b';' {
            return Err("unexpected character where a ';' parameter was expected");
        }
        i = skip_lws(s, i + 1);
        let ns = i;
        i += token_run(&s[i..]);
        if i == ns {
            return Err("empty parameter name");
        }
        let name = ns..i;
        let j = skip_lws(s, i);
        if j < s.len() && s[j] == b'=' {
            let vs = skip_lws(s, j + 1);
            let ve = if vs < s.len() && s[vs] == b'"' {
                quoted_end(s, vs)?
            } else {
                vs + run_len(&s[vs..], &PVALUE)
            };
            if ve == vs {
                return Err("empty parameter value");
            }
            f(Param {
                name,
                value: Some(vs..ve),
            });
            i = ve;
        } else {
            f(Param { name, value: None });
            i = j;
        }
    }
}

/// Looks a header parameter up in a `;`-separated region already validated.
fn header_param<'a>(region: &'a [u8], name: &str) -> Option<Option<&'a [u8]>> {
    let mut found = None;
    let _ = scan_params(region, 0, |p| {
        if found.is_none() && eq_ic(&region[p.name.clone()], name.as_bytes()) {
            found = Some(p.value.map(|v| &region[v]));
        }
    });
    found
}

/// Iterates URI parameters in `;a=b;c` (no LWS, no quoting): (name, value, whole range).
pub(crate) fn uri_params(
    region: &[u8],
) -> impl Iterator<Item = (&[u8], Option<&[u8]>, Range<usize>)> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < region.len() {
            if region[pos] == b';' {
                pos += 1;
                continue;
            }
            let start = pos;
            let end = find(b';', &region[pos..]).map_or(region.len(), |e| pos + e);
            pos = end;
            let item = &region[start..end];
            return Some(match find(b'=', item) {
                Some(eq) => (&item[..eq], Some(&item[eq + 1..]), start..end),
                None => (item, None, start..end),
            });
        }
        None
    })
}

// ---------------------------------------------------------------------------
// Typed views.

/// The request or status line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartLine<'a> {
    /// `Method SP Request-URI SP SIP-Version`.
    Request {
        /// The method token, e.g. `INVITE`.
        method: &'a [u8],
        /// The Request-URI, raw.
        uri: &'a [u8],
        /// The version, e.g. `SIP/2.0` (the router answers 505 to others).
        version: &'a [u8],
    },
    /// `SIP-Version SP Status-Code SP Reason-Phrase`.
    Response {
        /// The status code, 100..=699.
        code: u16,
        /// The reason phrase, raw (may be empty or UTF-8).
        reason: &'a [u8],
        /// The version, e.g. `SIP/2.0`.
        version: &'a [u8],
    },
}

/// The CSeq header: sequence number and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CSeq<'a> {
    /// The sequence number (at most 2^32-1).
    pub seq: u32,
    /// The method token.
    pub method: &'a [u8],
}

/// One via-parm of a Via header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via<'a> {
    /// Protocol name, normally `SIP`.
    pub protocol: &'a [u8],
    /// Protocol version, normally `2.0`.
    pub version: &'a [u8],
    /// Transport, e.g. `UDP`, `TCP`, `TLS`, `SCTP`, `WS`.
    pub transport: &'a [u8],
    /// sent-by host; an IPv6 reference keeps its brackets.
    pub host: &'a [u8],
    /// sent-by port.
    pub port: Option<u16>,
    /// The `branch` parameter.
    pub branch: Option<&'a [u8]>,
    /// The `received` parameter.
    pub received: Option<&'a [u8]>,
    /// The `rport` parameter: `Some(None)` for a bare `;rport`.
    pub rport: Option<Option<u16>>,
    /// All parameters, raw, from the first `;` (empty if none).
    pub params: &'a [u8],
    /// The whole via-parm, trimmed.
    pub raw: &'a [u8],
}

impl<'a> Via<'a> {
    /// A parameter by name (case-insensitive): `Some(None)` if present without value.
    pub fn param(&self, name: &str) -> Option<Option<&'a [u8]>> {
        header_param(self.params, name)
    }
}

const fn host_table() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        i += 1;
    }
    t
}
static HOST: [bool; 256] = host_table();

const fn pvalue_table() -> [bool; 256] {
    let mut t = [true; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = false;
        c += 1;
    }
    t[0x7f] = false;
    let bad = b";, \t\r\n\"<>";
    let mut i = 0;
    while i < bad.len() {
        t[bad[i] as usize] = false;
        i += 1;
    }
    t
}
static PVALUE: [bool; 256] = pvalue_table();

/// Scans a host (`[IPv6]` or hostname/IPv4) at `s[i..]`, returning its end.
pub(crate) fn scan_host(s: &[u8], i: usize) -> Result<usize, &'static str> {
    if i < s.len() && s[i] == b'[' {
        let close = find(b']', &s[i..]).ok_or("unterminated IPv6 reference")? + i;
        let inner = &s[i + 1..close];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
        {
            return Err("invalid IPv6 reference");
        }
        return Ok(close + 1);
    }
    let j = i + run_len(s.get(i..).unwrap_or_default(), &HOST);
    if j == i {
        return Err("missing host");
    }
    Ok(j)
}

/// 1 to 5 digits, at most 65535.
fn parse_port(s: &[u8]) -> Result<u16, &'static str> {
    if s.is_empty() || s.len() > 5 {
        return Err("invalid port");
    }
    let mut v = 0u32;
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err("invalid port");
        }
        v = v * 10 + u32::from(d);
    }
    u16::try_from(v).map_err(|_| "invalid port")
}

fn scan_token(s: &[u8], i: usize) -> usize {
    i + token_run(s.get(i..).unwrap_or_default())
}

/// Parses the via-parm at `s[i..]`; returns it and the index after its
/// terminating `,` (or `s.len()`).
pub(crate) fn parse_via(s: &[u8], i: usize) -> Result<(Via<'_>, usize), &'static str> {
    let (v, next) = parse_via_spans(s, i)?;
    Ok((v.get(s), next))
}

/// Whether `name` is `lower` (ASCII letters, lower case) in any case: `b |
/// 0x20` maps exactly the two cases of a letter onto the lower one.
#[inline(always)]
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b)
}

/// [`parse_via`] as offsets into `s` (`s` is at most a message long, so
/// they fit the spans' `u32`): the scan keeps them with one addition each.
fn parse_via_spans(s: &[u8], i: usize) -> Result<(ViaSpans, usize), &'static str> {
    let start = skip_lws(s, i);
    let mut parts = [0..0, 0..0, 0..0];
    let mut j = start;
    // Fast path: the sent-protocol almost always starts `SIP/2.0/` and a
    // token follows (the general loop splits it the same way).
    let fast = match s.get(start..start + 12) {
        // The usual three-letter transport (UDP, TCP, TLS, WSS) and its SP.
        Some([b'S', b'I', b'P', b'/', b'2', b'.', b'0', b'/', t0, t1, t2, b' '])
            if is_token(*t0) && is_token(*t1) && is_token(*t2) =>
        {
            Some(start + 11)
        }
        Some([b'S', b'I', b'P', b'/', b'2', b'.', b'0', b'/', ..]) => {
            Some(scan_token(s, start + 8)).filter(|&e| e > start + 8)
        }
        _ => match s.get(start..start + 8) {
            Some(b"SIP/2.0/") => Some(scan_token(s, start + 8)).filter(|&e| e > start + 8),
            _ => None,
        },
    };
    if let Some(e) = fast {
        parts = [start..start + 3, start + 4..start + 7, start + 8..e];
        j = e;
    } else {
        for (k, part) in parts.iter_mut().enumerate() {
            if k > 0 {
                j = skip_lws(s, j);
                if j >= s.len() || s[j] != b'/' {
                    return Err("sent-protocol is not name/version/transport");
                }
                j = skip_lws(s, j + 1);
            }
            let e = scan_token(s, j);
            if e == j {
                return Err("sent-protocol is not name/version/transport");
            }
            *part = j..e;
            j = e;
        }
    }
    let h = skip_lws(s, j);
    if h == j {
        return Err("no whitespace between sent-protocol and sent-by");
    }
    let he = scan_host(s, h)?;
    let mut j = skip_lws(s, he);
    let mut port = None;
    if j < s.len() && s[j] == b':' {
        let ps = skip_lws(s, j + 1);
        let mut pe = ps;
        while pe < s.len() && s[pe].is_ascii_digit() {
            pe += 1;
        }
        port = Some(parse_port(&s[ps..pe])?);
        j = pe;
    }
    let params_start = skip_lws(s, j);
    // (name's first occurrence, its value); `Some(None)`: without a value.
    let mut branch: Option<Option<Range<usize>>> = None;
    let mut received: Option<Option<Range<usize>>> = None;
    let mut rport: Option<Option<Range<usize>>> = None;
    // Where the first `received` and `rport` are, name through value.
    let (mut received_param, mut rport_param) = (None, None);
    let end = scan_params(s, j, |p| {
        let n = &s[p.name.clone()];
        let (slot, whole) = match n.len() {
            6 if is_name(n, b"branch") => (&mut branch, None),
            8 if is_name(n, b"received") => (&mut received, Some(&mut received_param)),
            5 if is_name(n, b"rport") => (&mut rport, Some(&mut rport_param)),
            _ => return,
        };
        if slot.is_none() {
            if let Some(w) = whole {
                let end = p.value.as_ref().map_or(p.name.end, |v| v.end);
                *w = Some(Span::new(p.name.start..end));
            }
            *slot = Some(p.value);
        }
    })?;
    let rport = match rport {
        None => None,
        Some(None) => Some(None),
        Some(Some(v)) => Some(Some(parse_port(&s[v]).map_err(|_| "invalid rport")?)),
    };
    let valued = |p: Option<Option<Range<usize>>>| match p {
        None => Ok(None),
        Some(Some(v)) => Ok(Some(Span::new(v))),
        Some(None) => Err("branch/received without a value"),
    };
    let (branch, received) = (valued(branch)?, valued(received)?);
    // `start` and `params_start` are past any LWS; trim the end.
    let mut raw_end = end;
    while raw_end > start && is_lws(s[raw_end - 1]) {
        raw_end -= 1;
    }
    let params = if params_start < end {
        Span::new(params_start..raw_end)
    } else {
        Span::new(end..end)
    };
    let next = if end < s.len() { end + 1 } else { end };
    Ok((
        ViaSpans {
            protocol: Span::new(parts[0].clone()),
            version: Span::new(parts[1].clone()),
            transport: Span::new(parts[2].clone()),
            host: Span::new(h..he),
            port,
            branch,
            received,
            rport,
            received_param,
            rport_param,
            params,
            raw: Span::new(start..raw_end),
        },
        next,
    ))
}

/// A parsed URI. `sip:`/`sips:` URIs are split into parts; other schemes keep
/// everything after the colon in `host`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri<'a> {
    /// The scheme, e.g. `sip`.
    pub scheme: &'a [u8],
    /// The user part (may contain `;`, RFC 4475 semiuri), without password.
    pub user: Option<&'a [u8]>,
    /// Host; an IPv6 reference keeps its brackets.
    pub host: &'a [u8],
    /// Port.
    pub port: Option<u16>,
    /// URI parameters, raw, starting with `;` (empty if none).
    pub params: &'a [u8],
    /// URI headers after `?`, raw, without the `?`.
    pub headers: Option<&'a [u8]>,
    /// The whole URI.
    pub raw: &'a [u8],
}

impl<'a> Uri<'a> {
    /// Whether the scheme is `sip` or `sips` (the only URIs split into parts).
    pub fn is_sip(&self) -> bool {
        eq_ic(self.scheme, b"sip") || eq_ic(self.scheme, b"sips")
    }

    /// Parses a URI (no surrounding `<>`, no whitespace).
    pub fn parse(raw: &'a [u8]) -> Option<Self> {
        parse_uri(raw).ok()
    }

    /// A URI parameter by name (case-insensitive): `Some(None)` if present without value.
    pub fn param(&self, name: &str) -> Option<Option<&'a [u8]>> {
        uri_params(self.params)
            .find(|(n, _, _)| eq_ic(n, name.as_bytes()))
            .map(|(_, v, _)| v)
    }
}

pub(crate) fn parse_uri(raw: &[u8]) -> Result<Uri<'_>, &'static str> {
    match parse_sip_uri_fast(raw) {
        Some(uri) => Ok(uri.get(raw)),
        None => parse_uri_general(raw),
    }
}

/// [`parse_uri`] as offsets into `raw`.
fn parse_uri_spans(raw: &[u8]) -> Result<UriSpans, &'static str> {
    match parse_sip_uri_fast(raw) {
        Some(uri) => Ok(uri),
        None => parse_uri_general(raw).map(|u| UriSpans::of(&u, raw)),
    }
}

/// Bytes of a URI for [`parse_sip_uri_fast`]: bit 0 for a byte the general
/// parser rejects (controls, SP, DEL, `<`, `>`, `"`) and for `?` and `[`
/// (headers and IPv6 references are left to it), bit 1 for `@`.
static URI_FAST: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        if b < 0x21 || matches!(b, 0x7f | b'<' | b'>' | b'"' | b'?' | b'[') {
            t[i] = 1;
        }
        i += 1;
    }
    t[b'@' as usize] = 2;
    t
};

/// [`parse_uri`] for the usual shape: a lower-case `sip:` or `sips:`
/// scheme, a hostname or IPv4 host, no `?` headers, as offsets into `raw`.
/// One pass through [`URI_FAST`] checks the characters and notes an `@`
/// (on URIs of 20 to 60 bytes a table lookup per byte costs less than the
/// vectorised comparison with its remainder loops), then the parts are
/// split as [`parse_uri_general`] splits them. `None` means "not this
/// shape, or malformed": the general parser then decides (and names the
/// error).
fn parse_sip_uri_fast(raw: &[u8]) -> Option<UriSpans> {
    let scheme_len = if raw.starts_with(b"sip:") {
        3
    } else if raw.starts_with(b"sips:") {
        4
    } else {
        return None;
    };
    let flags = raw.iter().fold(0u8, |m, &b| m | URI_FAST[b as usize]);
    if flags & 1 != 0 {
        return None;
    }
    let rest_at = scheme_len + 1;
    let rest = &raw[rest_at..];
    let (user, hp_start) = if flags & 2 != 0 {
        let at = find(b'@', rest)?;
        let user_len = find(b':', &rest[..at]).unwrap_or(at);
        if user_len == 0 {
            return None;
        }
        (Some(Span::new(rest_at..rest_at + user_len)), at + 1)
    } else {
        (None, 0)
    };
    let hp_at = rest_at + hp_start;
    let hp = &rest[hp_start..];
    let he = run_len(hp, &HOST);
    if he == 0 {
        return None;
    }
    let mut j = he;
    let mut port = None;
    if hp.get(j) == Some(&b':') {
        let ps = j + 1;
        let pe = ps + hp[ps..].iter().take_while(|b| b.is_ascii_digit()).count();
        port = Some(parse_port(&hp[ps..pe]).ok()?);
        j = pe;
    }
    let params = &hp[j..];
    if let Some((&first, tail)) = params.split_first() {
        // Every ';' starts a parameter with a non-empty name.
        let empty_name = params.iter().zip(tail).fold(false, |bad, (&a, &b)| {
            bad | ((a == b';') & ((b == b';') | (b == b'=')))
        });
        if first != b';' || params.last() == Some(&b';') || empty_name {
            return None;
        }
    }
    Some(UriSpans {
        scheme: Span::new(0..scheme_len),
        user,
        host: Span::new(hp_at..hp_at + he),
        port,
        params: Span::new(hp_at + j..raw.len()),
        headers: None,
        raw: Span::new(0..raw.len()),
    })
}

/// [`parse_uri`] for any URI, with the reason of a rejection.
fn parse_uri_general(raw: &[u8]) -> Result<Uri<'_>, &'static str> {
    let colon = find(b':', raw).ok_or("no scheme")?;
    let scheme = &raw[..colon];
    if scheme.is_empty()
        || !scheme[0].is_ascii_alphabetic()
        || !scheme
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
    {
        return Err("invalid scheme");
    }
    // A reduction without early exit, so it vectorises.
    if raw.iter().fold(false, |bad, &b| {
        bad | (b < 0x21) | (b == 0x7f) | (b == b'<') | (b == b'>') | (b == b'"')
    }) {
        return Err("whitespace, control character, '<', '>' or '\"' inside the URI");
    }
    let rest = &raw[colon + 1..];
    if !(eq_ic(scheme, b"sip") || eq_ic(scheme, b"sips")) {
        if rest.is_empty() {
            return Err("empty URI after the scheme");
        }
        return Ok(Uri {
            scheme,
            user: None,
            host: rest,
            port: None,
            // Empty, but positioned at the end of the URI like every other view.
            params: &raw[raw.len()..],
            headers: None,
            raw,
        });
    }
    let (user, hp_start) = match find(b'@', rest) {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = find(b':', userinfo).map_or(userinfo, |c| &userinfo[..c]);
            if user.is_empty() {
                return Err("empty user part");
            }
            (Some(user), at + 1)
        }
        None => (None, 0),
    };
    let hp = &rest[hp_start..];
    let he = scan_host(hp, 0)?;
    let host = &hp[..he];
    let mut j = he;
    let mut port = None;
    if j < hp.len() && hp[j] == b':' {
        let ps = j + 1;
        let mut pe = ps;
        while pe < hp.len() && hp[pe].is_ascii_digit() {
            pe += 1;
        }
        port = Some(parse_port(&hp[ps..pe])?);
        j = pe;
    }
    let q = find(b'?', &hp[j..]).map_or(hp.len(), |q| j + q);
    let params = &hp[j..q];
    if !params.is_empty() {
        if params[0] != b';' {
            return Err("unexpected character after host");
        }
        if params[1..].split(|&b| b == b';').any(|p| {
            let name = find(b'=', p).map_or(p, |e| &p[..e]);
            name.is_empty()
        }) {
            return Err("empty URI parameter");
        }
    }
    let headers = (q < hp.len()).then(|| &hp[q + 1..]);
    Ok(Uri {
        scheme,
        user,
        host,
        port,
        params,
        headers,
        raw,
    })
}

/// A name-addr or addr-spec with header parameters (From, To, Contact, Route).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr<'a> {
    /// Display name as written (quotes kept for a quoted string), if any.
    pub display: Option<&'a [u8]>,
    /// The URI (inside `<>` for a name-addr).
    pub uri: Uri<'a>,
    /// Header parameters after the URI (e.g. `;tag=..`), raw, from the first `;`.
    pub params: &'a [u8],
    /// The whole value, trimmed.
    pub raw: &'a [u8],
}

impl<'a> NameAddr<'a> {
    /// A header parameter by name (case-insensitive), e.g. `tag`.
    pub fn param(&self, name: &str) -> Option<Option<&'a [u8]>> {
        header_param(self.params, name)
    }

    /// Parses one name-addr / addr-spec value (commas not allowed after it).
    pub fn parse(value: &'a [u8]) -> Option<Self> {
        match parse_name_addr(value, 0) {
            Ok((na, next)) if next >= value.len() => Some(na),
            _ => None,
        }
    }
}

/// Parses the name-addr/addr-spec at `s[i..]`; returns it and the index after
/// its terminating `,` (or `s.len()`).
pub(crate) fn parse_name_addr(s: &[u8], i: usize) -> Result<(NameAddr<'_>, usize), &'static str> {
    let start = skip_lws(s, i);
    let mut j = start;
    let mut display = None;
    let uri_range;
    let after_uri;
    if j < s.len() && s[j] == b'"' {
        let qe = quoted_end(s, j)?;
        display = Some(&s[j..qe]);
        j = skip_lws(s, qe);
        if j >= s.len() || s[j] != b'<' {
            return Err("quoted display name not followed by '<'");
        }
    } else {
        let mut k = j;
        while k < s.len()
            && (is_token(s[k]) || matches!(s[k], b' ' | b'\t' | b'\r' | b'\n') || s[k] >= 0x80)
        {
            k += 1;
        }
        if k < s.len() && s[k] == b'<' {
            let d = trim_lws(&s[j..k]);
            if !d.is_empty() {
                display = Some(d);
            }
            j = k;
        }
    }
    if j < s.len() && s[j] == b'<' {
        let close = find(b'>', &s[j..]).ok_or("'<' without '>'")? + j;
        if s[j + 1..close].iter().any(|&b| is_lws(b)) {
            return Err("whitespace inside '<>'");
        }
        uri_range = j + 1..close;
        after_uri = close + 1;
    } else {
        // addr-spec: the URI ends at the first ';', ',' or whitespace.
        let mut e = j;
        while e < s.len() && !matches!(s[e], b';' | b',' | b' ' | b'\t' | b'\r' | b'\n') {
            e += 1;
        }
        if find(b'?', &s[j..e]).is_some() {
            return Err("URI with '?' headers must be enclosed in '<>'");
        }
        uri_range = j..e;
        after_uri = e;
    }
    let uri = parse_uri(&s[uri_range])?;
    let ps = skip_lws(s, after_uri);
    let end = scan_params(s, after_uri, |_| {})?;
    let next = if end < s.len() { end + 1 } else { end };
    Ok((
        NameAddr {
            display,
            uri,
            params: &s[ps.min(end)..end],
            raw: trim_lws(&s[start..end]),
        },
        next,
    ))
}

// ---------------------------------------------------------------------------
// The message.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    // Offsets fit: parse rejects messages longer than u32::MAX.
    fn new(r: Range<usize>) -> Self {
        Span {
            start: r.start as u32,
            end: r.end as u32,
        }
    }
    /// The span of `sub` inside `base`. `sub` is a sub-slice of `base`, except
    /// for the empty `&[]` some views hold: that becomes an empty span at 0.
    fn of(sub: &[u8], base: &[u8]) -> Self {
        let off = offset_in(sub, base);
        if off > base.len() || sub.len() > base.len() - off {
            return Span::default();
        }
        Span::new(off..off + sub.len())
    }
    fn get(self, buf: &[u8]) -> &[u8] {
        buf.get(self.start as usize..self.end as usize)
            .unwrap_or_default()
    }
}

/// A [`Uri`] kept as offsets (built once by the scan, read in O(1)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct UriSpans {
    scheme: Span,
    user: Option<Span>,
    host: Span,
    port: Option<u16>,
    params: Span,
    headers: Option<Span>,
    raw: Span,
}

impl UriSpans {
    /// The spans moved `by` bytes on.
    fn shifted(self, by: usize) -> Self {
        let by = by as u32;
        let sh = |s: Span| Span {
            start: s.start + by,
            end: s.end + by,
        };
        UriSpans {
            scheme: sh(self.scheme),
            user: self.user.map(sh),
            host: sh(self.host),
            port: self.port,
            params: sh(self.params),
            headers: self.headers.map(sh),
            raw: sh(self.raw),
        }
    }

    fn of(u: &Uri<'_>, base: &[u8]) -> Self {
        UriSpans {
            scheme: Span::of(u.scheme, base),
            user: u.user.map(|s| Span::of(s, base)),
            host: Span::of(u.host, base),
            port: u.port,
            params: Span::of(u.params, base),
            headers: u.headers.map(|s| Span::of(s, base)),
            raw: Span::of(u.raw, base),
        }
    }
    fn get(self, b: &[u8]) -> Uri<'_> {
        Uri {
            scheme: self.scheme.get(b),
            user: self.user.map(|s| s.get(b)),
            host: self.host.get(b),
            port: self.port,
            params: self.params.get(b),
            headers: self.headers.map(|s| s.get(b)),
            raw: self.raw.get(b),
        }
    }
}

/// The top via-parm kept as offsets (parsed once by the scan).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ViaSpans {
    protocol: Span,
    version: Span,
    transport: Span,
    host: Span,
    port: Option<u16>,
    branch: Option<Span>,
    received: Option<Span>,
    rport: Option<Option<u16>>,
    /// The first `received` and `rport` parameters, name through value:
    /// what a proxy fills on ingress (`Rewrite::set_top_via_params`).
    received_param: Option<Span>,
    rport_param: Option<Span>,
    params: Span,
    raw: Span,
}

impl ViaSpans {
    /// The spans moved `by` bytes on (from a header value to the message).
    fn shifted(self, by: usize) -> Self {
        let by = by as u32;
        let sh = |s: Span| Span {
            start: s.start + by,
            end: s.end + by,
        };
        ViaSpans {
            protocol: sh(self.protocol),
            version: sh(self.version),
            transport: sh(self.transport),
            host: sh(self.host),
            port: self.port,
            branch: self.branch.map(sh),
            received: self.received.map(sh),
            rport: self.rport,
            received_param: self.received_param.map(sh),
            rport_param: self.rport_param.map(sh),
            params: sh(self.params),
            raw: sh(self.raw),
        }
    }
    fn get(self, b: &[u8]) -> Via<'_> {
        Via {
            protocol: self.protocol.get(b),
            version: self.version.get(b),
            transport: self.transport.get(b),
            host: self.host.get(b),
            port: self.port,
            branch: self.branch.map(|s| s.get(b)),
            received: self.received.map(|s| s.get(b)),
            rport: self.rport,
            params: self.params.get(b),
            raw: self.raw.get(b),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartSpans {
    Request {
        method: Span,
        uri: UriSpans,
        version: Span,
    },
    Response {
        code: u16,
        reason: Span,
        version: Span,
    },
}

/// A name-addr header (From, To, Contact, Route) as the scan leaves it: the
/// raw first value and its line, validated only by [`SipMessage::validate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AddrField {
    value: Span,
    line: u32,
}

/// A framed SIP message with the offsets of what routing needs.
///
/// Cheap to clone (the bytes are reference counted). All accessors borrow from
/// [`SipMessage::bytes`].
#[derive(Debug, Clone)]
pub struct SipMessage {
    bytes: Bytes,
    start: StartSpans,
    fields: Span,
    body: Span,
    call_id: Option<Span>,
    cseq: Option<(u32, Span)>,
    via: Option<Span>,
    top_via: Option<ViaSpans>,
    /// The via-parm below the top one.
    second_via: Option<ViaSpans>,
    route: Option<AddrField>,
    contact: Option<AddrField>,
    from: Option<AddrField>,
    to: Option<AddrField>,
    from_tag: Option<Span>,
    to_tag: Option<Span>,
    max_forwards: Option<u32>,
    content_length: Option<u32>,
    header_count: u32,
    /// Offset of the first header line whose name starts with `X-Viaduct-`.
    viaduct: Option<u32>,
    /// Where the Via, Route and Max-Forwards lines are: a walk for all of
    /// one (Via walks, Route and Max-Forwards removal) covers only them.
    via_lines: Lines,
    route_lines: Lines,
    max_forwards_lines: Lines,
}

/// The header lines of one kind: the first's start, the last's end (past
/// its CRLF), how many (0: none, the range is empty).
#[derive(Debug, Clone, Copy, Default)]
struct Lines {
    start: u32,
    end: u32,
    count: u32,
}

impl Lines {
    #[inline]
    fn add(&mut self, start: usize, end: usize) {
        if self.count == 0 {
            self.start = start as u32;
        }
        self.end = end as u32;
        self.count += 1;
    }
}

fn is_version(v: &[u8]) -> bool {
    if v == b"SIP/2.0" {
        return true;
    }
    if v.len() < 7 || !eq_ic(&v[..4], b"SIP/") {
        return false;
    }
    let rest = &v[4..];
    match find(b'.', rest) {
        Some(d) => {
            d > 0
                && d + 1 < rest.len()
                && rest[..d].iter().all(u8::is_ascii_digit)
                && rest[d + 1..].iter().all(u8::is_ascii_digit)
        }
        None => false,
    }
}

fn parse_start_line(line: &[u8]) -> Result<StartSpans, ScanError> {
    let bad = |reason| ScanError::InvalidStartLine { reason };
    if line.len() >= 4 && eq_ic(&line[..4], b"SIP/") {
        let sp = find(b' ', line).ok_or(bad("status line has no status code"))?;
        if !is_version(&line[..sp]) {
            return Err(bad("status line version is not SIP/x.y"));
        }
        let rest = &line[sp + 1..];
        let code_end = find(b' ', rest).unwrap_or(rest.len());
        let code = &rest[..code_end];
        if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
            return Err(bad("status code is not 3 digits"));
        }
        let code = u16::from(code[0] - b'0') * 100
            + u16::from(code[1] - b'0') * 10
            + u16::from(code[2] - b'0');
        if !(100..=699).contains(&code) {
            return Err(bad("status code outside 100..=699"));
        }
        let reason_start = sp + 1 + (code_end + 1).min(rest.len());
        if line[reason_start..]
            .iter()
            .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(bad("control character in the reason phrase"));
        }
        return Ok(StartSpans::Response {
            code,
            reason: Span::new(reason_start..line.len()),
            version: Span::new(0..sp),
        });
    }
    let sp1 = find(b' ', line).ok_or(bad("request line has no Request-URI"))?;
    if sp1 == 0 || !line[..sp1].iter().all(|&b| is_token(b)) {
        return Err(bad("method is not a token"));
    }
    let sp2 = find(b' ', &line[sp1 + 1..])
        .map(|o| sp1 + 1 + o)
        .ok_or(bad("request line has no SIP version"))?;
    if sp2 == sp1 + 1 {
        return Err(bad("more than one SP between method and Request-URI"));
    }
    let version = &line[sp2 + 1..];
    if find(b' ', version).is_some() || version.is_empty() {
        return Err(bad(
            "extra SP in the request line (whitespace in the Request-URI or after the version)",
        ));
    }
    if !is_version(version) {
        return Err(bad("request line version is not SIP/x.y"));
    }
    let uri = parse_uri_spans(&line[sp1 + 1..sp2])
        .map_err(|reason| ScanError::InvalidRequestUri { reason })?;
    Ok(StartSpans::Request {
        method: Span::new(0..sp1),
        uri: uri.shifted(sp1 + 1),
        version: Span::new(sp2 + 1..line.len()),
    })
}

fn malformed(header: &'static str, line: usize) -> impl Fn(&'static str) -> ScanError {
    move |reason| ScanError::MalformedHeader {
        header,
        line,
        reason,
    }
}

/// Stores a single-valued name-addr header, rejecting a different
/// repetition; `Ok(true)` if this is its first occurrence.
fn set_single_addr(
    slot: &mut Option<AddrField>,
    buf: &[u8],
    value: Range<usize>,
    header: &'static str,
    line: usize,
) -> Result<bool, ScanError> {
    match slot {
        Some(prev) if prev.value.get(buf) != &buf[value.clone()] => {
            Err(ScanError::RepeatedHeader { header, line })
        }
        Some(_) => Ok(false),
        None => {
            *slot = Some(AddrField {
                value: Span::new(value),
                line: line as u32,
            });
            Ok(true)
        }
    }
}

/// Stores a single-valued header, rejecting a different repetition.
fn set_single(
    slot: &mut Option<Span>,
    buf: &[u8],
    value: Range<usize>,
    header: &'static str,
    line: usize,
) -> Result<(), ScanError> {
    match slot {
        Some(prev) if prev.get(buf) != &buf[value.clone()] => {
            Err(ScanError::RepeatedHeader { header, line })
        }
        Some(_) => Ok(()),
        None => {
            *slot = Some(Span::new(value));
            Ok(())
        }
    }
}

/// Where the header parameters of a From/To value start: after the `>` of a
/// name-addr, or at the first `;` (or `,`) of an addr-spec. Quoted strings are
/// skipped. A light scan, not a validation: it agrees with
/// [`parse_name_addr`] on every value that parses.
fn header_params_start(v: &[u8]) -> Option<usize> {
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'"' => i = quoted_end(v, i).ok()?,
            b'<' => return Some(find(b'>', &v[i..])? + i + 1),
            b';' | b',' => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// The value of the `tag` header parameter of a From/To value, if any.
///
/// Fast path for the usual shapes, `<uri>;tag=x` and `display <uri>;tag=x`
/// with an unquoted display name of token chars and spaces: the parameters
/// start after the first `>`, and when the first one is `;tag=` followed by
/// a non-empty unquoted value, that value is the answer (what
/// [`scan_params`] reports first). Anything else takes the general scan.
fn find_tag(v: &[u8]) -> Option<Range<usize>> {
    if let Some(lt) = find(b'<', v) {
        if v[..lt].iter().all(|&b| is_token(b) || b == b' ') {
            let gt = find(b'>', &v[lt..])? + lt;
            let ps = gt + 1;
            match v.get(ps..ps + 5) {
                None => return None,
                Some([b';', t, a, g, b'=']) if [*t, *a, *g].eq_ignore_ascii_case(b"tag") => {
                    let vs = ps + 5;
                    let ve = vs + run_len(&v[vs..], &PVALUE);
                    if ve > vs {
                        return Some(vs..ve);
                    }
                }
                _ => {}
            }
            return find_tag_from(v, ps);
        }
    }
    find_tag_from(v, header_params_start(v)?)
}

/// The `tag` parameter among the header parameters of `v` starting at `ps`.
fn find_tag_from(v: &[u8], ps: usize) -> Option<Range<usize>> {
    let mut found: Option<Option<Range<usize>>> = None;
    let _ = scan_params(v, ps, |p| {
        if found.is_none() && eq_ic(&v[p.name.clone()], b"tag") {
            found = Some(p.value);
        }
    });
    found.flatten()
}

/// Whether a header name starts with `X-Viaduct-` (case-insensitive).
pub(crate) fn is_viaduct_name(name: &[u8]) -> bool {
    name.len() >= 10 && name[0] | 0x20 == b'x' && eq_ic(&name[1..10], b"-viaduct-")
}

/// The error of a message whose header section is missing or too large, as
/// checked before anything else: the scan's fast path finds the end of the
/// header section as it walks, and consults this only on failure.
fn termination_error(buf: &[u8], limits: &Limits) -> Option<ScanError> {
    match find_crlfcrlf(buf) {
        None if buf.len() > limits.max_header_bytes => Some(ScanError::HeaderTooLarge {
            limit: limits.max_header_bytes,
        }),
        None => Some(ScanError::UnterminatedHeaders),
        Some(h) if h + 4 > limits.max_header_bytes => Some(ScanError::HeaderTooLarge {
            limit: limits.max_header_bytes,
        }),
        Some(_) => None,
    }
}

/// The error for a header line at `start` that the fast path could not split
/// into `token LWS? ":"` (cold path, same precedence as [`Fields`]).
#[cold]
fn field_error(buf: &[u8], start: usize, line: usize, count: usize, limits: &Limits) -> ScanError {
    let (first_end, _) = crlf_line_end(buf, start, buf.len());
    let Some(colon) = find(b':', &buf[start..first_end]).map(|c| start + c) else {
        return ScanError::MissingColon { line };
    };
    let mut name_end = colon;
    while name_end > start && matches!(buf[name_end - 1], b' ' | b'\t') {
        name_end -= 1;
    }
    if name_end == start || matches!(buf[start], b' ' | b'\t') {
        return ScanError::InvalidHeaderName { line };
    }
    if count + 1 > limits.max_headers {
        return ScanError::TooManyHeaders {
            limit: limits.max_headers,
        };
    }
    ScanError::InvalidHeaderName { line }
}

/// Validates one From/To value: exactly one name-addr or addr-spec.
fn check_single_name_addr(v: &[u8]) -> Result<(), &'static str> {
    let (_, next) = parse_name_addr(v, 0)?;
    if next < v.len() || v.last() == Some(&b',') {
        return Err("more than one value");
    }
    Ok(())
}

fn parse_cseq(v: &[u8]) -> Result<(u32, Range<usize>), &'static str> {
    let mut d = 0;
    while d < v.len() && v[d].is_ascii_digit() {
        d += 1;
    }
    if d == 0 {
        return Err("sequence number is not a number");
    }
    let seq = parse_u64(&v[..d])
        .and_then(|n| u32::try_from(n).ok())
        .ok_or("sequence number exceeds 2^32-1")?;
    let ms = skip_lws(v, d);
    if ms == d {
        return Err("no whitespace between sequence number and method");
    }
    let me = scan_token(v, ms);
    if me == ms || me != v.len() {
        return Err("method is not a token");
    }
    Ok((seq, ms..me))
}

impl SipMessage {
    /// Scans a framed message with [`Limits::default`].
    pub fn parse(bytes: Bytes) -> Result<Self, ScanError> {
        Self::parse_with(bytes, &Limits::default())
    }

    /// Scans a framed message (start line, headers, empty line, body).
    ///
    /// Bytes after `Content-Length` body bytes are ignored (they are not part
    /// of the body); fewer is [`ScanError::BodyTruncated`].
    pub fn parse_with(bytes: Bytes, limits: &Limits) -> Result<Self, ScanError> {
        let buf = &bytes[..];
        if u32::try_from(buf.len()).is_err() {
            return Err(ScanError::MessageTooLarge { len: buf.len() });
        }
        let mut msg = Self::blank();
        match msg.scan(buf, limits) {
            Ok(()) => {
                msg.bytes = bytes;
                Ok(msg)
            }
            // A missing or oversized header section is reported first, as
            // if it had been checked before the walk.
            Err(e) => Err(termination_error(buf, limits).unwrap_or(e)),
        }
    }

    /// A message with nothing found yet, for [`SipMessage::scan`] to fill in
    /// place (the struct is a few hundred bytes: building it where it stays
    /// saves copies on the hot path).
    pub(crate) fn blank() -> Self {
        SipMessage {
            bytes: Bytes::new(),
            start: StartSpans::Response {
                code: 0,
                reason: Span::default(),
                version: Span::default(),
            },
            fields: Span::default(),
            body: Span::default(),
            call_id: None,
            cseq: None,
            via: None,
            top_via: None,
            second_via: None,
            route: None,
            contact: None,
            from: None,
            to: None,
            from_tag: None,
            to_tag: None,
            max_forwards: None,
            content_length: None,
            header_count: 0,
            viaduct: None,
            via_lines: Lines::default(),
            route_lines: Lines::default(),
            max_forwards_lines: Lines::default(),
        }
    }

    /// The stream framer's fast path: scans the message at the start of
    /// `buf` (which may hold more bytes after it) into `self` (from
    /// [`SipMessage::blank`]) and, if it scans cleanly and has a
    /// Content-Length, returns its length; the caller then gives it its
    /// bytes with [`SipMessage::set_bytes`]. `None` means "frame it the slow
    /// way" (incomplete, malformed, no Content-Length): the caller must then
    /// behave exactly as [`StreamFramer::decode`](super::StreamFramer::decode)
    /// followed by [`SipMessage::parse_with`], which on a clean message give
    /// the same result (same header end, same Content-Length, same fields).
    pub(crate) fn scan_stream_prefix(&mut self, buf: &[u8], limits: &Limits) -> Option<usize> {
        if u32::try_from(buf.len()).is_err() {
            return None;
        }
        self.scan(buf, limits).ok()?;
        self.content_length?;
        Some(self.body.end as usize)
    }

    /// The datagram framer's fast path: scans a whole datagram into `self`
    /// (from [`SipMessage::blank`]) and, if it scans cleanly, returns the
    /// length of the message in it (through the Content-Length body, or the
    /// whole datagram without one); the caller truncates the datagram to it
    /// and gives it with [`SipMessage::set_bytes`]. `None` means "frame it
    /// the slow way": [`frame_datagram`](super::frame_datagram) then
    /// [`SipMessage::parse_with`], which on a clean message give the same.
    pub(crate) fn scan_datagram(&mut self, buf: &[u8], limits: &Limits) -> Option<usize> {
        if u32::try_from(buf.len()).is_err() {
            return None;
        }
        self.scan(buf, limits).ok()?;
        Some(self.body.end as usize)
    }

    /// Gives a message scanned by [`SipMessage::scan_stream_prefix`] its bytes
    /// (exactly the `total` bytes it was scanned from).
    pub(crate) fn set_bytes(&mut self, bytes: Bytes) {
        debug_assert_eq!(bytes.len(), self.body.end as usize);
        self.bytes = bytes;
    }

    /// The one pass over the header section: finds its end, classifies every
    /// header name and records what routing reads.
    ///
    /// `self` comes from [`SipMessage::blank`]; on error it is left half
    /// filled and must be dropped.
    fn scan(&mut self, buf: &[u8], limits: &Limits) -> Result<(), ScanError> {
        let msg = self;
        let len = buf.len();
        let (sl_end, fields_start) = crlf_line_end(buf, 0, len);
        if sl_end == len {
            return Err(ScanError::UnterminatedHeaders);
        }
        msg.start = parse_start_line(&buf[..sl_end])?;
        let max_header_bytes = limits.max_header_bytes;
        let mut p = fields_start;
        let mut line_no = 2usize;
        let mut count = 0usize;
        let fields_end = loop {
            // The header section ends at p + 2 at the earliest.
            if p + 2 > max_header_bytes {
                return Err(ScanError::HeaderTooLarge {
                    limit: max_header_bytes,
                });
            }
            if p + 1 < len && buf[p] == b'\r' && buf[p + 1] == b'\n' {
                break p;
            }
            // Fast path: `token *(SP / HT) ":"`; anything else is an error
            // worked out by `field_error`.
            let start = p;
            let mut i = p + token_run(&buf[p..]);
            let name_end = i;
            while i < len && matches!(buf[i], b' ' | b'\t') {
                i += 1;
            }
            if name_end == start || i >= len || buf[i] != b':' {
                return Err(field_error(buf, start, line_no, count, limits));
            }
            let colon = i;
            let (mut content_end, mut next) = crlf_line_end(buf, colon + 1, len);
            let line = line_no;
            line_no += 1;
            while next < len && matches!(buf[next], b' ' | b'\t') {
                (content_end, next) = crlf_line_end(buf, next, len);
                line_no += 1;
            }
            if content_end == len {
                return Err(ScanError::UnterminatedHeaders);
            }
            count += 1;
            if count > limits.max_headers {
                return Err(ScanError::TooManyHeaders {
                    limit: limits.max_headers,
                });
            }
            let vs = skip_lws(&buf[..content_end], colon + 1);
            let mut ve = content_end;
            while ve > vs && is_lws(buf[ve - 1]) {
                ve -= 1;
            }
            let known = classify_at(buf, start, name_end - start);
            msg.field(buf, known, &buf[start..name_end], vs..ve, line, start)?;
            // Offsets fit in u32: checked before the scan.
            match known {
                Known::Via => msg.via_lines.add(start, next),
                Known::Route => msg.route_lines.add(start, next),
                Known::MaxForwards => msg.max_forwards_lines.add(start, next),
                _ => {}
            }
            p = next;
        };
        msg.fields = Span::new(fields_start..fields_end);
        let body_start = fields_end + 2;
        let avail = len - body_start;
        let body_len = match msg.content_length {
            Some(cl) => {
                let cl = cl as usize;
                if cl > avail {
                    return Err(ScanError::BodyTruncated {
                        content_length: cl,
                        got: avail,
                    });
                }
                cl
            }
            None => avail,
        };
        msg.body = Span::new(body_start..body_start + body_len);
        msg.header_count = count as u32;
        Ok(())
    }

    /// Records one header field: `name` (all token chars, classified as
    /// `known`), its LWS-trimmed
    /// `value` range, its 1-based `line` and where its line starts.
    #[inline]
    fn field(
        &mut self,
        buf: &[u8],
        known: Known,
        name: &[u8],
        value: Range<usize>,
        line: usize,
        line_start: usize,
    ) -> Result<(), ScanError> {
        let v = &buf[value.clone()];
        match known {
            Known::Other => {
                if self.viaduct.is_none() && is_viaduct_name(name) {
                    self.viaduct = Some(line_start as u32);
                }
            }
            Known::CallId => {
                let bad = malformed("Call-ID", line);
                if v.is_empty() {
                    return Err(bad("empty value"));
                }
                // LWS and controls; a reduction without early exit, so it
                // vectorises.
                if v.iter()
                    .fold(false, |bad, &b| bad | (b <= b' ') | (b == 0x7f))
                {
                    return Err(bad("whitespace or control character in the value"));
                }
                set_single(&mut self.call_id, buf, value, "Call-ID", line)?;
            }
            Known::CSeq => {
                let (seq, m) = parse_cseq(v).map_err(malformed("CSeq", line))?;
                let m = value.start + m.start..value.start + m.end;
                match self.cseq {
                    Some((s, pm)) if s != seq || pm.get(buf) != &buf[m.clone()] => {
                        return Err(ScanError::RepeatedHeader {
                            header: "CSeq",
                            line,
                        })
                    }
                    Some(_) => {}
                    None => self.cseq = Some((seq, Span::new(m))),
                }
            }
            Known::MaxForwards => {
                let n = parse_u64(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("not a number up to 2^32-1")
                    .map_err(malformed("Max-Forwards", line))?;
                match self.max_forwards {
                    Some(p) if p != n => {
                        return Err(ScanError::RepeatedHeader {
                            header: "Max-Forwards",
                            line,
                        })
                    }
                    _ => self.max_forwards = Some(n),
                }
            }
            Known::ContentLength => {
                let n = parse_u64(v)
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("not a non-negative number")
                    .map_err(malformed("Content-Length", line))?;
                match self.content_length {
                    Some(p) if p != n => {
                        return Err(ScanError::RepeatedHeader {
                            header: "Content-Length",
                            line,
                        })
                    }
                    _ => self.content_length = Some(n),
                }
            }
            Known::Via => {
                if v.is_empty() {
                    return Err(malformed("Via", line)("empty value"));
                }
                let (first, mut i) = parse_via_spans(v, 0).map_err(malformed("Via", line))?;
                if self.top_via.is_none() {
                    self.top_via = Some(first.shifted(value.start));
                    self.via = Some(Span::new(value.clone()));
                } else if self.second_via.is_none() {
                    self.second_via = Some(first.shifted(value.start));
                }
                while i < v.len() {
                    let (parm, next) = parse_via_spans(v, i).map_err(malformed("Via", line))?;
                    if self.second_via.is_none() {
                        self.second_via = Some(parm.shifted(value.start));
                    }
                    i = next;
                }
                if v.last() == Some(&b',') {
                    return Err(malformed("Via", line)("empty via-parm after ','"));
                }
            }
            Known::From => {
                if set_single_addr(&mut self.from, buf, value.clone(), "From", line)? {
                    self.from_tag =
                        find_tag(v).map(|t| Span::new(value.start + t.start..value.start + t.end));
                }
            }
            Known::To => {
                if set_single_addr(&mut self.to, buf, value.clone(), "To", line)? {
                    self.to_tag =
                        find_tag(v).map(|t| Span::new(value.start + t.start..value.start + t.end));
                }
            }
            Known::Contact => {
                if self.contact.is_none() {
                    self.contact = Some(AddrField {
                        value: Span::new(value),
                        line: line as u32,
                    });
                }
            }
            Known::Route => {
                if self.route.is_none() {
                    self.route = Some(AddrField {
                        value: Span::new(value),
                        line: line as u32,
                    });
                }
            }
        }
        Ok(())
    }

    /// Full syntax validation of what the scan only locates: the From and
    /// To values (one name-addr or addr-spec each), the first Contact value
    /// (`*` or a name-addr/addr-spec) and the first Route value. Call it on
    /// initial requests before acting on them (RFC 4475 quotbal, badaspec,
    /// regbadct); in-dialog requests and responses can be relayed without it.
    ///
    /// Reports the malformed header on the lowest line, as
    /// [`ScanError::MalformedHeader`].
    pub fn validate(&self) -> Result<(), ScanError> {
        let b = &self.bytes[..];
        let mut first: Option<ScanError> = None;
        let mut first_line = u32::MAX;
        let mut check = |field: Option<AddrField>,
                         header: &'static str,
                         f: fn(&[u8]) -> Result<(), &'static str>| {
            if let Some(a) = field {
                if a.line < first_line {
                    if let Err(reason) = f(a.value.get(b)) {
                        first_line = a.line;
                        first = Some(malformed(header, a.line as usize)(reason));
                    }
                }
            }
        };
        check(self.from, "From", check_single_name_addr);
        check(self.to, "To", check_single_name_addr);
        check(self.contact, "Contact", |v| {
            if v.is_empty() {
                return Err("empty value");
            }
            if v != b"*" {
                parse_name_addr(v, 0)?;
            }
            Ok(())
        });
        check(self.route, "Route", |v| parse_name_addr(v, 0).map(|_| ()));
        first.map_or(Ok(()), Err)
    }

    /// The whole message.
    pub fn bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// A zero-copy [`Bytes`] for `part`, which must borrow from this message
    /// (e.g. the result of [`SipMessage::call_id`]).
    ///
    /// # Panics
    ///
    /// If `part` is not within [`SipMessage::bytes`] (see [`Bytes::slice_ref`]).
    pub fn slice(&self, part: &[u8]) -> Bytes {
        self.bytes.slice_ref(part)
    }

    /// The request or status line.
    pub fn start_line(&self) -> StartLine<'_> {
        let b = &self.bytes[..];
        match self.start {
            StartSpans::Request {
                method,
                uri,
                version,
            } => StartLine::Request {
                method: method.get(b),
                uri: uri.raw.get(b),
                version: version.get(b),
            },
            StartSpans::Response {
                code,
                reason,
                version,
            } => StartLine::Response {
                code,
                reason: reason.get(b),
                version: version.get(b),
            },
        }
    }

    /// The method of a request.
    pub fn method(&self) -> Option<&[u8]> {
        match self.start {
            StartSpans::Request { method, .. } => Some(method.get(&self.bytes)),
            StartSpans::Response { .. } => None,
        }
    }

    /// The status code of a response.
    pub fn status(&self) -> Option<u16> {
        match self.start {
            StartSpans::Request { .. } => None,
            StartSpans::Response { code, .. } => Some(code),
        }
    }

    /// Whether this is a request.
    pub fn is_request(&self) -> bool {
        matches!(self.start, StartSpans::Request { .. })
    }

    /// The Request-URI of a request (parsed and validated by the scan).
    pub fn request_uri(&self) -> Option<Uri<'_>> {
        match self.start {
            StartSpans::Request { uri, .. } => Some(uri.get(&self.bytes)),
            StartSpans::Response { .. } => None,
        }
    }

    /// The Call-ID value.
    pub fn call_id(&self) -> Option<&[u8]> {
        self.call_id.map(|s| s.get(&self.bytes))
    }

    /// The CSeq header.
    pub fn cseq(&self) -> Option<CSeq<'_>> {
        self.cseq.map(|(seq, m)| CSeq {
            seq,
            method: m.get(&self.bytes),
        })
    }

    /// The first via-parm of the first Via header.
    pub fn top_via(&self) -> Option<Via<'_>> {
        self.top_via.map(|v| v.get(&self.bytes))
    }

    /// Where the top via-parm's first parameter `name` is in
    /// [`bytes`](Self::bytes), name through value, if the scan keeps that
    /// name's place (`received` and `rport`, what a proxy fills on
    /// ingress): `Some(None)` when the Via has no such parameter, `None`
    /// when the scan does not track the name (or there is no Via).
    pub(crate) fn top_via_param_at(&self, name: &str) -> Option<Option<Range<usize>>> {
        let v = self.top_via?;
        let at = match name.len() {
            8 if name.eq_ignore_ascii_case("received") => v.received_param,
            5 if name.eq_ignore_ascii_case("rport") => v.rport_param,
            _ => return None,
        };
        Some(at.map(|s| s.start as usize..s.end as usize))
    }

    /// The via-parm below the top one (the next in the top Via header, else
    /// the first of the next Via header): the hop a proxy answers to. The
    /// scan parsed it (as it parses every via-parm) and kept its place.
    pub fn second_via(&self) -> Option<Via<'_>> {
        self.second_via.map(|v| v.get(&self.bytes))
    }

    /// Every via-parm of every Via header, top first.
    pub fn vias(&self) -> impl Iterator<Item = Via<'_>> {
        self.headers("via").flat_map(|v| {
            let mut i = 0;
            std::iter::from_fn(move || {
                if i >= v.len() {
                    return None;
                }
                let (via, next) = parse_via(v, i).ok()?;
                i = next;
                Some(via)
            })
        })
    }

    /// The first value of the first Route header, parsed on each call
    /// (`None` if malformed: see [`SipMessage::validate`]).
    pub fn top_route(&self) -> Option<NameAddr<'_>> {
        let v = self.raw_route()?;
        parse_name_addr(v, 0).ok().map(|(na, _)| na)
    }

    /// The first value of the first Contact header, parsed on each call
    /// (`None` for `Contact: *` or if malformed: see [`SipMessage::validate`]).
    pub fn contact(&self) -> Option<NameAddr<'_>> {
        let v = self.raw_contact()?;
        parse_name_addr(v, 0).ok().map(|(na, _)| na)
    }

    /// The From header, parsed on each call (`None` if malformed: see
    /// [`SipMessage::validate`]).
    pub fn from(&self) -> Option<NameAddr<'_>> {
        let v = self.from?.value.get(&self.bytes);
        parse_name_addr(v, 0).ok().map(|(na, _)| na)
    }

    /// The To header, parsed on each call (`None` if malformed: see
    /// [`SipMessage::validate`]).
    pub fn to(&self) -> Option<NameAddr<'_>> {
        let v = self.to?.value.get(&self.bytes);
        parse_name_addr(v, 0).ok().map(|(na, _)| na)
    }

    /// The From tag (located by the scan; O(1)). On a From that
    /// [`SipMessage::validate`] accepts, equal to
    /// `from()?.param("tag").flatten()`.
    pub fn from_tag(&self) -> Option<&[u8]> {
        self.from_tag.map(|s| s.get(&self.bytes))
    }

    /// The To tag (located by the scan; O(1)). On a To that
    /// [`SipMessage::validate`] accepts, equal to
    /// `to()?.param("tag").flatten()`.
    pub fn to_tag(&self) -> Option<&[u8]> {
        self.to_tag.map(|s| s.get(&self.bytes))
    }

    /// Whether a header name starts with `X-Viaduct-` (case-insensitive),
    /// recorded by the scan: the balancer strips such headers from outside
    /// traffic ([`Rewrite::remove_headers_with_prefix`](super::Rewrite::remove_headers_with_prefix)).
    pub fn has_viaduct_headers(&self) -> bool {
        self.viaduct.is_some()
    }

    /// The Max-Forwards value.
    pub fn max_forwards(&self) -> Option<u32> {
        self.max_forwards
    }

    /// The Content-Length value.
    pub fn content_length(&self) -> Option<usize> {
        self.content_length.map(|c| c as usize)
    }

    /// How many header fields the message has.
    pub fn header_count(&self) -> usize {
        self.header_count as usize
    }

    /// The first value of a header, raw and LWS-trimmed (folds inside kept).
    /// `name` is case-insensitive and compact-aware (`"i"` finds `Call-ID`
    /// and `"call-id"` finds `i`).
    ///
    /// O(1) for the headers the scan records (Call-ID, Via, From, To, Contact,
    /// Route) and for absent Max-Forwards, CSeq, Content-Length and
    /// `X-Viaduct-*` headers; a present Max-Forwards is found by a walk of
    /// its own lines only, anything else by a walk of the header lines.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        let n = name.as_bytes().trim_ascii();
        let b = &self.bytes[..];
        let mut from = self.fields.start as usize;
        if !n.is_empty() {
            match classify(n) {
                Known::CallId => return self.call_id(),
                Known::Via => return self.raw_via(),
                Known::From => return self.from.map(|a| a.value.get(b)),
                Known::To => return self.to.map(|a| a.value.get(b)),
                Known::Contact => return self.raw_contact(),
                Known::Route => return self.raw_route(),
                Known::MaxForwards if self.max_forwards.is_none() => return None,
                Known::ContentLength if self.content_length.is_none() => return None,
                Known::CSeq if self.cseq.is_none() => return None,
                _ => {}
            }
            if is_viaduct_name(n) {
                from = self.viaduct? as usize;
            }
        }
        let q = NameQuery::new(name);
        let fields = if from == self.fields.start as usize {
            self.fields_for(name)
        } else {
            Fields::new(b, from, self.fields.end as usize)
        };
        fields
            .filter_map(Result::ok)
            .find(|f| q.matches(&b[f.name.clone()]))
            .map(|f| &b[f.value])
    }

    /// Every value of a header, one per header line (comma lists not split).
    /// Via, Route and Max-Forwards: a walk of their own lines only.
    pub fn headers<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> {
        let q = NameQuery::new(name);
        let buf = &self.bytes[..];
        self.fields_for(name)
            .filter_map(Result::ok)
            .filter(move |f| q.matches(&buf[f.name.clone()]))
            .map(move |f| &buf[f.value])
    }

    pub(crate) fn fields(&self) -> Fields<'_> {
        Fields::new(
            &self.bytes,
            self.fields.start as usize,
            self.fields.end as usize,
        )
    }

    /// The header fields that can hold `name`: for Via, Route and
    /// Max-Forwards (long or compact) those from its first line to its
    /// last (none if absent), else all of them.
    pub(crate) fn fields_for(&self, name: &str) -> Fields<'_> {
        let n = name.as_bytes().trim_ascii();
        let lines = match classify(n) {
            Known::Via => self.via_lines,
            Known::Route => self.route_lines,
            Known::MaxForwards => self.max_forwards_lines,
            _ => return self.fields(),
        };
        let (start, end) = if lines.count == 0 {
            (self.fields.end, self.fields.end)
        } else {
            (lines.start, lines.end)
        };
        Fields::new(&self.bytes, start as usize, end as usize)
    }

    /// Offset where header fields start (just after the start line's CRLF).
    pub(crate) fn fields_start(&self) -> usize {
        self.fields.start as usize
    }

    /// The header fields: from just after the start line to just after the
    /// CRLF of the last header line.
    pub(crate) fn field_range(&self) -> (usize, usize) {
        (self.fields.start as usize, self.fields.end as usize)
    }

    /// The raw value of the first Via, Contact, Route header (for the rewriter).
    pub(crate) fn raw_via(&self) -> Option<&[u8]> {
        self.via.map(|s| s.get(&self.bytes))
    }
    pub(crate) fn raw_contact(&self) -> Option<&[u8]> {
        self.contact.map(|a| a.value.get(&self.bytes))
    }
    pub(crate) fn raw_route(&self) -> Option<&[u8]> {
        self.route.map(|a| a.value.get(&self.bytes))
    }
    /// Offset of the first `X-Viaduct-*` header line, if any.
    pub(crate) fn viaduct_start(&self) -> Option<usize> {
        self.viaduct.map(|o| o as usize)
    }

    /// The body (exactly Content-Length bytes when present).
    pub fn body(&self) -> &[u8] {
        self.body.get(&self.bytes)
    }

    /// The body's length, known from the scan before the bytes are given
    /// (see [`SipMessage::scan_datagram`]).
    pub(crate) fn body_len(&self) -> usize {
        (self.body.end - self.body.start) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn msg(s: &str) -> Result<SipMessage, ScanError> {
        SipMessage::parse(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn second_via_is_the_next_via_parm_in_any_layout() {
        let second = |vias: &str| {
            let m = msg(&format!(
                "SIP/2.0 200 OK\r\n{vias}Call-ID: c\r\nCSeq: 1 INVITE\r\nl: 0\r\n\r\n"
            ))
            .unwrap();
            let got = m.second_via().map(|v| v.host.to_vec());
            assert_eq!(got, m.vias().nth(1).map(|v| v.host.to_vec()), "{vias}");
            got
        };
        let b = |s: &str| Some(s.as_bytes().to_vec());
        // Same header, with and without LWS around the comma.
        assert_eq!(
            second("Via: SIP/2.0/TCP a;branch=z9hG4bK1,SIP/2.0/UDP b\r\n"),
            b("b")
        );
        assert_eq!(
            second("Via: SIP/2.0/TCP a ;x , SIP/2.0/UDP b;rport\r\n"),
            b("b")
        );
        // Next header, compact name, other headers between.
        assert_eq!(
            second("v: SIP/2.0/TCP a\r\nFrom: <sip:f@x>;tag=1\r\nVia: SIP/2.0/UDP b:5070\r\n"),
            b("b")
        );
        // Folded onto a continuation line.
        assert_eq!(second("Via: SIP/2.0/TCP a,\r\n SIP/2.0/UDP b\r\n"), b("b"));
        // Three in the first header: the second of them.
        assert_eq!(
            second("Via: SIP/2.0/TCP a, SIP/2.0/TCP b, SIP/2.0/TCP c\r\n"),
            b("b")
        );
        assert_eq!(second("Via: SIP/2.0/TCP a;branch=z9hG4bK1\r\n"), None);
    }

    #[test]
    fn headers_of_recorded_kinds_match_a_full_walk() {
        // Via, Route and Max-Forwards lines interleaved with others, long
        // and compact names, folded values: the recorded line ranges must
        // find exactly what a walk of every line finds.
        let m = msg(
            "BYE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h1;branch=z9hG4bK1\r\nX-A: 1\r\n\
                     v: SIP/2.0/TCP h2;branch=z9hG4bK2,\r\n SIP/2.0/UDP h3;branch=z9hG4bK3\r\n\
                     Route: <sip:r1;lr>\r\nMax-Forwards: 70\r\nCall-ID: c\r\nroute: <sip:r2;lr>\r\n\
                     CSeq: 1 BYE\r\nVIA: SIP/2.0/UDP h4;branch=z9hG4bK4\r\nl: 0\r\n\r\n",
        )
        .unwrap();
        let b = &m.bytes()[..];
        for name in [
            "Via",
            "v",
            "VIA",
            "Route",
            "route",
            "Max-Forwards",
            "max-forwards",
            "X-A",
            "Call-ID",
            "Contact",
            "l",
        ] {
            let q = NameQuery::new(name);
            let all: Vec<&[u8]> = m
                .fields()
                .flatten()
                .filter(|f| q.matches(&b[f.name.clone()]))
                .map(|f| &b[f.value])
                .collect();
            assert_eq!(m.headers(name).collect::<Vec<_>>(), all, "{name}");
            assert_eq!(m.header(name), all.first().copied(), "{name}");
        }
        assert_eq!(m.vias().count(), 4);
        assert_eq!(m.headers("Route").count(), 2);
        let none =
            msg("OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nl: 0\r\n\r\n")
                .unwrap();
        assert_eq!(none.headers("Route").count(), 0);
        assert_eq!(none.header("Max-Forwards"), None);
    }

    const INV: &str = "INVITE sip:bob@biloxi.example.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bK776asdhds;rport\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.example.com>\r\n\
From: \"Alice\" <sip:alice@atlanta.example.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.example.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.example.com>\r\n\
Content-Length: 4\r\n\r\nbody";

    #[test]
    fn scans_basic_request() {
        let m = msg(INV).unwrap();
        assert!(m.is_request());
        assert_eq!(m.method(), Some(&b"INVITE"[..]));
        assert_eq!(
            m.call_id(),
            Some(&b"a84b4c76e66710@pc33.atlanta.example.com"[..])
        );
        let v = m.top_via().unwrap();
        assert_eq!(v.transport, b"UDP");
        assert_eq!(v.host, b"pc33.atlanta.example.com");
        assert_eq!(v.branch, Some(&b"z9hG4bK776asdhds"[..]));
        assert_eq!(v.rport, Some(None));
        assert_eq!(m.cseq().unwrap().seq, 314159);
        assert_eq!(m.from_tag(), Some(&b"1928301774"[..]));
        assert_eq!(m.to_tag(), None);
        assert_eq!(m.max_forwards(), Some(70));
        assert_eq!(m.body(), b"body");
        assert_eq!(m.header("i"), m.call_id());
        assert_eq!(
            m.header("CONTACT"),
            Some(&b"<sip:alice@pc33.atlanta.example.com>"[..])
        );
    }

    #[test]
    fn status_line_rules() {
        assert!(msg("SIP/2.0 200 OK\r\n\r\n").is_ok());
        assert!(msg("SIP/2.0 100 \r\n\r\n").is_ok());
        assert!(matches!(
            msg("SIP/2.0 4294967301 Big\r\n\r\n"),
            Err(ScanError::InvalidStartLine { .. })
        ));
        assert!(matches!(
            msg("SIP/2.0 099 Low\r\n\r\n"),
            Err(ScanError::InvalidStartLine { .. })
        ));
    }

    #[test]
    fn request_line_rules() {
        assert!(matches!(
            msg("INVITE  sip:a@b SIP/2.0\r\n\r\n"),
            Err(ScanError::InvalidStartLine { .. })
        ));
        assert!(matches!(
            msg("INVITE sip:a@b SIP/2.0 \r\n\r\n"),
            Err(ScanError::InvalidStartLine { .. })
        ));
        assert!(matches!(
            msg("INVITE <sip:a@b> SIP/2.0\r\n\r\n"),
            Err(ScanError::InvalidRequestUri { .. })
        ));
    }

    #[test]
    fn errors_name_the_header() {
        let e = msg("OPTIONS sip:a@b SIP/2.0\r\nCSeq: 99999999999 OPTIONS\r\n\r\n").unwrap_err();
        assert!(e.to_string().contains("CSeq"), "{e}");
        let e = msg("OPTIONS sip:a@b SIP/2.0\r\ni: a\r\nCall-ID: b\r\n\r\n").unwrap_err();
        assert_eq!(
            e,
            ScanError::RepeatedHeader {
                header: "Call-ID",
                line: 3
            }
        );
        let e = msg("OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;;\r\n\r\n").unwrap_err();
        assert!(e.to_string().contains("Via"), "{e}");
        let e = msg("OPTIONS sip:a@b SIP/2.0\r\nfoo\r\n\r\n").unwrap_err();
        assert_eq!(e, ScanError::MissingColon { line: 2 });
    }

    #[test]
    fn folded_and_spaced_via() {
        let m = msg("OPTIONS sip:a@b SIP/2.0\r\nVia  : SIP  /   2.0\r\n /UDP\r\n    192.0.2.2;branch=390skdjuw\r\n\r\n").unwrap();
        let v = m.top_via().unwrap();
        assert_eq!(
            (v.protocol, v.version, v.transport),
            (&b"SIP"[..], &b"2.0"[..], &b"UDP"[..])
        );
        assert_eq!(v.host, b"192.0.2.2");
        assert_eq!(v.branch, Some(&b"390skdjuw"[..]));
    }

    #[test]
    fn uri_parts() {
        let u = parse_uri(b"sip:user;par=u%40example.net@example.com:5070;lr;maddr=x?h=1").unwrap();
        assert_eq!(u.user, Some(&b"user;par=u%40example.net"[..]));
        assert_eq!(u.host, b"example.com");
        assert_eq!(u.port, Some(5070));
        assert_eq!(u.param("lr"), Some(None));
        assert_eq!(u.param("MADDR"), Some(Some(&b"x"[..])));
        assert_eq!(u.headers, Some(&b"h=1"[..]));
        let u = parse_uri(b"sip:[2001:db8::10]:5070").unwrap();
        assert_eq!((u.host, u.port), (&b"[2001:db8::10]"[..], Some(5070)));
        assert!(parse_uri(b"sip:user@2001:db8::10").is_err());
    }

    #[test]
    fn addr_spec_params_are_header_params() {
        let (na, _) = parse_name_addr(b"sip:u@h;unknownparam;tag=1", 0).unwrap();
        assert_eq!(na.uri.raw, b"sip:u@h");
        assert_eq!(na.param("tag"), Some(Some(&b"1"[..])));
        let (na, _) = parse_name_addr(b"<sip:u@h;unknownparam>", 0).unwrap();
        assert_eq!(na.uri.param("unknownparam"), Some(None));
        assert_eq!(na.param("unknownparam"), None);
    }

    /// The word-at-a-time classification agrees with the byte one, with and
    /// without 16 readable bytes, on known names in any case and near misses.
    #[test]
    fn classify_at_agrees_with_classify() {
        let names = [
            "to",
            "TO",
            "tO",
            "t",
            "via",
            "VIA",
            "vIa",
            "v",
            "from",
            "FROM",
            "f",
            "cseq",
            "CSeq",
            "route",
            "ROUTE",
            "call-id",
            "Call-ID",
            "i",
            "contact",
            "CONTACT",
            "m",
            "max-forwards",
            "Max-Forwards",
            "content-length",
            "Content-LENGTH",
            "l",
            "c",
            "x",
            "tx",
            "vib",
            "fron",
            "cseQ1",
            "c-seq",
            "routes",
            "call_id",
            "callid-",
            "contacT",
            "c0ntact",
            "max-forward",
            "max-forwardz",
            "content-lengtH",
            "content-lengt",
            "content-length1",
            "Content-Type",
            "X-Viaduct-Backend",
            "Supported",
            "call-id!",
            "contact~",
            "1o",
            "v.a",
        ];
        for n in names {
            for pad in ["", ": x\r\n", ": some longer value\r\n"] {
                let buf = format!("{n}{pad}");
                let b = buf.as_bytes();
                assert_eq!(
                    classify_at(b, 0, n.len()),
                    classify(n.as_bytes()),
                    "{n:?} + {pad:?}"
                );
            }
        }
    }

    /// Fragments of From/To values, Via values and URIs, common and odd,
    /// for the differential tests of the fast paths.
    fn fragments(parts: &'static [&'static str]) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                4 => proptest::sample::select(parts).prop_map(|s| s.as_bytes().to_vec()),
                1 => proptest::collection::vec(any::<u8>(), 0..3),
            ],
            0..8,
        )
        .prop_map(|v| v.concat())
    }

    const ADDR_PARTS: &[&str] = &[
        "Alice ",
        "\"A <b>\" ",
        "<sip:a@h>",
        "<sip:a@h;lr>",
        "sip:a@h",
        ">",
        "<",
        ";tag=",
        ";TAG=",
        ";tAg=",
        "1928301774",
        "x",
        "; tag=",
        ";tag = ",
        ";tag",
        ";tag=\"q\"",
        ";tag=;",
        ";;",
        ";x=y",
        ",",
        " ",
        "\t",
        "\r\n ",
        "\"",
        "tag=",
        "=",
        "A\tB <",
    ];

    const URI_SCHEMES: &[&str] = &["sip:", "sips:", "SIP:", "tel:", "sip", ""];
    const URI_USERS: &[&str] = &["", "alice@", "a:pw@", "@", ":pw@", "a;b=c@", "a b@"];
    const URI_HOSTS: &[&str] = &[
        "example.com",
        "10.0.0.1",
        "[2001:db8::1]",
        "",
        "a_b-c.d",
        "h@x",
    ];
    const URI_PORTS: &[&str] = &["", ":5060", ":", ":99999", ":65535", ":0x1"];
    const URI_PARAMS: &[&str] = &[
        ";lr",
        ";transport=tcp",
        ";",
        "=",
        ";;",
        ";=",
        "?h=1",
        "%40",
        " ",
        "<",
        ">",
        "\"",
        "a",
        ";vd=0001000000000000a",
        "\x7f",
        "?",
        "@",
    ];

    fn uri() -> impl Strategy<Value = Vec<u8>> {
        let pick = |parts: &'static [&'static str]| {
            proptest::sample::select(parts).prop_map(|s| s.as_bytes().to_vec())
        };
        (
            pick(URI_SCHEMES),
            pick(URI_USERS),
            pick(URI_HOSTS),
            pick(URI_PORTS),
            proptest::collection::vec(pick(URI_PARAMS), 0..5),
        )
            .prop_map(|(a, b, c, d, e)| [a, b, c, d, e.concat()].concat())
    }

    /// `parse_via` and `parse_port` as they were before the fast paths
    /// and the offsets, the reference of `via_agrees_with_reference`.
    fn parse_port_reference(s: &[u8]) -> Result<u16, &'static str> {
        match parse_u64(s) {
            Some(p) if p <= u64::from(u16::MAX) && s.len() <= 5 => Ok(p as u16),
            _ => Err("invalid port"),
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse_via_reference(s: &[u8], i: usize) -> Result<(Via<'_>, usize), &'static str> {
        let start = skip_lws(s, i);
        let mut parts: [&[u8]; 3] = [&[], &[], &[]];
        let mut j = start;
        for (k, part) in parts.iter_mut().enumerate() {
            if k > 0 {
                j = skip_lws(s, j);
                if j >= s.len() || s[j] != b'/' {
                    return Err("sent-protocol is not name/version/transport");
                }
                j = skip_lws(s, j + 1);
            }
            let e = scan_token(s, j);
            if e == j {
                return Err("sent-protocol is not name/version/transport");
            }
            *part = &s[j..e];
            j = e;
        }
        let h = skip_lws(s, j);
        if h == j {
            return Err("no whitespace between sent-protocol and sent-by");
        }
        let he = scan_host(s, h)?;
        let host = &s[h..he];
        let mut j = skip_lws(s, he);
        let mut port = None;
        if j < s.len() && s[j] == b':' {
            let ps = skip_lws(s, j + 1);
            let mut pe = ps;
            while pe < s.len() && s[pe].is_ascii_digit() {
                pe += 1;
            }
            port = Some(parse_port_reference(&s[ps..pe])?);
            j = pe;
        }
        let params_start = skip_lws(s, j);
        let mut branch = None;
        let mut received = None;
        let mut rport: Option<Option<&[u8]>> = None;
        let end = scan_params_reference(s, j, |p| {
            let n = &s[p.name.clone()];
            let v = p.value.map(|v| &s[v]);
            if eq_ic(n, b"branch") && branch.is_none() {
                branch = Some(v.unwrap_or_default());
            } else if eq_ic(n, b"received") && received.is_none() {
                received = Some(v.unwrap_or_default());
            } else if eq_ic(n, b"rport") && rport.is_none() {
                rport = Some(v);
            }
        })?;
        let rport = match rport {
            None => None,
            Some(None) => Some(None),
            Some(Some(v)) => Some(Some(parse_port_reference(v).map_err(|_| "invalid rport")?)),
        };
        if branch == Some(&[][..]) || received == Some(&[][..]) {
            return Err("branch/received without a value");
        }
        let raw = trim_lws(&s[start..end]);
        let params = trim_lws(&s[params_start.min(end)..end]);
        let next = if end < s.len() { end + 1 } else { end };
        Ok((
            Via {
                protocol: parts[0],
                version: parts[1],
                transport: parts[2],
                host,
                port,
                branch,
                received,
                rport,
                params,
                raw,
            },
            next,
        ))
    }

    const VIA_PROTOCOLS: &[&str] = &[
        "SIP/2.0/UDP",
        "SIP/2.0/TCP",
        "SIP/2.0/",
        "sip / 2.0 / tcp",
        "SIP/2.0/TCP\r\n",
        "SIP/2.0",
        "SIP/2.0/tls-x",
    ];
    const VIA_GAPS: &[&str] = &[" ", "", "\t", "  ", "\r\n "];
    const VIA_HOSTS: &[&str] = &[
        "host.example.com",
        "192.0.2.1",
        "[2001:db8::1]",
        "",
        "h_1",
        "[x]",
    ];
    const VIA_PORTS: &[&str] = &["", ":5060", " : 5060", ":99999", ":"];
    const VIA_PARAMS: &[&str] = &[
        ";branch=z9hG4bK776",
        ";BRANCH=x",
        ";branch",
        ";received=192.0.2.2",
        ";received",
        ";rport",
        ";rport=5060",
        ";rport=x",
        ";RPort=1",
        " ; ttl = 1",
        ";x=\"q;,\"",
        ",",
        ";",
        "=",
        " ",
        ";branch=\"b\"",
        ";Received=1",
        ", SIP/2.0/UDP h2",
    ];

    fn via() -> impl Strategy<Value = Vec<u8>> {
        let pick = |parts: &'static [&'static str]| {
            proptest::sample::select(parts).prop_map(|s| s.as_bytes().to_vec())
        };
        (
            pick(VIA_GAPS),
            pick(VIA_PROTOCOLS),
            pick(VIA_GAPS),
            pick(VIA_HOSTS),
            pick(VIA_PORTS),
            proptest::collection::vec(pick(VIA_PARAMS), 0..5),
            pick(VIA_GAPS),
        )
            .prop_map(|(a, b, c, d, e, f, g)| [a, b, c, d, e, f.concat(), g].concat())
    }

    /// `scan_params` before its fast path, the reference of
    /// `params_agree_with_reference`.
    fn scan_params_reference(
        s: &[u8],
        mut i: usize,
        mut f: impl FnMut(Param),
    ) -> Result<usize, &'static str> {
        loop {
            i = skip_lws(s, i);
            if i >= s.len() || s[i] == b',' {
                return Ok(i);
            }
            if s[i] != b';' {
                return Err("unexpected character where a ';' parameter was expected");
            }
            i = skip_lws(s, i + 1);
            let ns = i;
            i += token_run(&s[i..]);
            if i == ns {
                return Err("empty parameter name");
            }
            let name = ns..i;
            let j = skip_lws(s, i);
            if j < s.len() && s[j] == b'=' {
                let vs = skip_lws(s, j + 1);
                let ve = if vs < s.len() && s[vs] == b'"' {
                    quoted_end(s, vs)?
                } else {
                    vs + run_len(&s[vs..], &PVALUE)
                };
                if ve == vs {
                    return Err("empty parameter value");
                }
                f(Param {
                    name,
                    value: Some(vs..ve),
                });
                i = ve;
            } else {
                f(Param { name, value: None });
                i = j;
            }
        }
    }

    const PARAM_PARTS: &[&str] = &[
        ";tag=1",
        ";lr",
        ";branch=z9hG4bK",
        "; x = y",
        ";x =y",
        ";x= y",
        ";q=\"a;b\"",
        ";q=\"",
        ";",
        "=",
        ",",
        " ",
        "\t",
        "\r\n ",
        "a",
        ";n=",
        ";n;",
        ";=v",
        "\"",
        "<",
        ";TAG=2",
    ];

    proptest! {
        /// `scan_params` (with its fast path) reports the same parameters
        /// and end as the general loop alone.
        #[test]
        fn params_agree_with_reference(v in fragments(PARAM_PARTS), from in 0usize..2) {
            let i = from.min(v.len());
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            let fast_end = scan_params(&v, i, |p| fast.push((p.name, p.value)));
            let slow_end = scan_params_reference(&v, i, |p| slow.push((p.name, p.value)));
            prop_assert_eq!(fast_end, slow_end);
            prop_assert_eq!(fast, slow);
        }

        /// `parse_via` agrees with the slice-based parser it replaced.
        #[test]
        fn via_agrees_with_reference(v in via(), from in 0usize..2) {
            let i = from.min(v.len());
            prop_assert_eq!(parse_via(&v, i), parse_via_reference(&v, i));
        }

        /// `parse_uri`'s fast path agrees with the general parser.
        #[test]
        fn uri_fast_path_agrees(raw in uri()) {
            let fast = parse_sip_uri_fast(&raw).map(|u| u.get(&raw));
            if fast.is_some() {
                prop_assert_eq!(fast, parse_uri_general(&raw).ok());
            }
            prop_assert_eq!(parse_uri(&raw), parse_uri_general(&raw));
        }

        /// `find_tag`'s fast path agrees with the general scan.
        #[test]
        fn find_tag_fast_path_agrees(v in fragments(ADDR_PARTS)) {
            let slow = header_params_start(&v).and_then(|ps| find_tag_from(&v, ps));
            prop_assert_eq!(find_tag(&v), slow);
        }
    }

    #[test]
    fn compact_query() {
        let q = NameQuery::new("Content-Length");
        assert!(q.matches(b"l") && q.matches(b"CONTENT-length"));
        let q = NameQuery::new("X-Foo");
        assert!(q.matches(b"x-foo") && !q.matches(b"x"));
    }
}
