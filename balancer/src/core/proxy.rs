//! The stateless proxy of plain SIP backends (design.md §7, RFC 3261
//! §16.11): pure functions over [`SipMessage`], no state, no I/O. The
//! [`router`](super::router) decides where a message goes; this module
//! writes what goes on the wire.
//!
//! # What a forwarded request looks like
//!
//! ```text
//!  INVITE sip:svc@lb SIP/2.0
//!  Via: SIP/2.0/UDP <lb egress>;branch=z9hG4bK-vp<tag><txn><loop>;vdc=<conn>   (added, top)
//!  Record-Route: <sip:<lb egress>;lr;vd=<tag>>                                   (added, initial requests)
//!  Record-Route: <sip:<lb ingress>;transport=tcp;lr;vd=<tag>>                    (only if ingress ≠ egress, RFC 5658)
//!  Max-Forwards: 69                                                              (decremented; 70 if absent)
//!  Via: SIP/2.0/TCP client;branch=..;received=..;rport=..                        (received/rport filled)
//!  Route: ...                                                                    (our own entries removed)
//! ```
//!
//! * `<tag>` is the affinity tag (17 hex digits, MAC over backend id and
//!   Call-ID, see [`encap_proto::tag`]): the response comes back by it.
//! * `<txn>` (16 hex) hashes the incoming top Via's branch and sent-by
//!   (RFC 3261 §17.2.3 transaction key), or for a pre-RFC 3261 branch the
//!   top Via, Call-ID, From/To tags, CSeq number and Request-URI (§16.11):
//!   a retransmission, and the CANCEL or non-2xx ACK of an INVITE (same
//!   incoming branch), get the same branch; every other transaction a new
//!   one.
//! * `<loop>` (8 hex) hashes what a loop leaves unchanged (Request-URI,
//!   Call-ID, From tag, CSeq number; not the To tag, which the ACK of a
//!   non-2xx answer adds to its INVITE's) and the tag: a request that comes
//!   back with a Via of ours carrying the same tag and loop hash has looped
//!   (RFC 3261 §16.3 step 4); a spiral changes the Request-URI.
//! * `vdc` names the connection (or UDP socket) the request came in on, so
//!   the response goes back over it while it is open (RFC 3261 §18.2.2).
//!
//! A response pops our Via and goes where the next Via says: `received`
//! (else the sent-by host, which must be an IP address: the core resolves
//! no names), `rport` (else the sent-by port, else 5060), over the Via's
//! transport, on the `vdc` connection if it is still open to that host.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use bytes::{Bytes, BytesMut};
use encap_proto::frame::Transport;
use encap_proto::sip::{NameAddr, Rewrite, SipMessage, Uri};
use encap_proto::tag::TAG_LEN;
use siphasher::sip::SipHasher13;

use super::router::{BackendId, ConnId, TAG_PARAM};

/// The branch prefix of requests the balancer forwards as a stateless
/// proxy; the affinity tag follows it.
pub const PROXY_BRANCH_PREFIX: &[u8] = b"z9hG4bK-vp";
/// The branch prefix of the balancer's OPTIONS probes; the backend id
/// (4 hex digits) and the probe's sequence number (16) follow.
pub const PROBE_BRANCH_PREFIX: &[u8] = b"z9hG4bK-vq";
/// The Via parameter of ours naming the inbound connection or socket.
pub const CONN_PARAM: &str = "vdc";
/// Max-Forwards of a request that had none (RFC 3261 §16.6 step 3).
pub const DEFAULT_MAX_FORWARDS: u32 = 70;

const TXN_HEX: usize = 16;
const LOOP_HEX: usize = 8;
/// The length of a stateless branch.
pub const BRANCH_LEN: usize = PROXY_BRANCH_PREFIX.len() + TAG_LEN + TXN_HEX + LOOP_HEX;

/// Fixed keys: branches must agree across restarts and replicas (a
/// retransmission may reach another one); they carry no secret, the tag
/// inside does.
const BRANCH_KEYS: (u64, u64) = (0x7669_6164_7563_7462, 0x7261_6e63_6821_2121);
const LOOP_KEYS: (u64, u64) = (0x7669_6164_7563_746c, 0x6f6f_7021_2121_2121);

/// One side of the balancer: the transport and the address peers on that
/// side reach it at (its Via sent-by, its Record-Route URI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Side {
    /// UDP or TCP.
    pub transport: Transport,
    /// The advertised address.
    pub addr: SocketAddr,
}

/// Everything [`forward_request`] adds or changes.
#[derive(Debug, Clone, Copy)]
pub struct Forward<'a> {
    /// The side the request leaves by (our Via, the top Record-Route).
    pub egress: Side,
    /// The side it came in by (the second Record-Route, when different).
    pub ingress: Side,
    /// The affinity tag of the call's backend.
    pub tag: &'a [u8; TAG_LEN],
    /// Our branch ([`stateless_branch`]).
    pub branch: &'a [u8],
    /// The connection or socket it came in on.
    pub conn: ConnId,
    /// The sender's address (`received`, `rport`).
    pub source: SocketAddr,
    /// Whether to Record-Route (initial requests that may make a dialog).
    pub record_route: bool,
    /// The request's Route entries ([`route_entries`]; empty if it has
    /// none or none is ours).
    pub routes: &'a [&'a [u8]],
    /// How many leading `routes` are ours, to remove.
    pub own_routes: usize,
    /// Failover: the tag of the call's dead backend (`X-Viaduct-Failover`).
    pub failover: Option<&'a [u8]>,
}

fn hex(out: &mut String, value: u64, digits: usize) {
    let mut text = [0u8; 16];
    hex_into(&mut text[..digits], value);
    out.extend(text[..digits].iter().map(|&b| char::from(b)));
}

/// Writes the low `out.len()` hex digits of `value` into `out`.
fn hex_into(out: &mut [u8], value: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let n = out.len();
    for (i, d) in out.iter_mut().enumerate() {
        let nibble = (value >> ((n - 1 - i) * 4)) & 0xf;
        // A nibble indexes the 16 digits.
        #[allow(clippy::cast_possible_truncation)]
        {
            *d = DIGITS[nibble as usize];
        }
    }
}

/// The input of a branch hash, gathered in a buffer on the stack and fed to
/// SipHash in as few writes as it allows (many small writes cost several
/// times more). Each field is its length (8 bytes, little-endian: what
/// `Hasher::write_usize` feeds SipHash on 64-bit targets, which the
/// first release's branches were computed with) then its bytes: SipHash
/// reads one stream whatever its writes, so the hashes are those of the
/// fields written one by one.
struct HashInput {
    hasher: SipHasher13,
    buf: [u8; 128],
    len: usize,
}

impl HashInput {
    fn new(keys: (u64, u64)) -> Self {
        HashInput {
            hasher: SipHasher13::new_with_keys(keys.0, keys.1),
            buf: [0; 128],
            len: 0,
        }
    }
    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        if self.len + bytes.len() > self.buf.len() {
            self.hasher.write(&self.buf[..self.len]);
            self.len = 0;
            if bytes.len() > self.buf.len() {
                self.hasher.write(bytes);
                return self;
            }
        }
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
        self
    }
    fn field(&mut self, bytes: &[u8]) -> &mut Self {
        self.bytes(&(bytes.len() as u64).to_le_bytes()).bytes(bytes)
    }
    fn finish(mut self) -> u64 {
        self.hasher.write(&self.buf[..self.len]);
        self.hasher.finish()
    }
}

/// The stateless branch of a request forwarded with `tag` (see the module
/// doc): retransmissions, and the CANCEL and non-2xx ACK of an INVITE, get
/// the INVITE's branch. ASCII, [`BRANCH_LEN`] bytes.
pub fn stateless_branch(msg: &SipMessage, tag: &[u8; TAG_LEN]) -> [u8; BRANCH_LEN] {
    let mut input = HashInput::new(BRANCH_KEYS);
    input.field(tag);
    match msg.top_via() {
        Some(via) if via.branch.is_some_and(|b| b.starts_with(b"z9hG4bK")) => {
            input
                .field(via.branch.unwrap_or_default())
                .field(via.host)
                .bytes(&via.port.unwrap_or(0).to_le_bytes());
        }
        via => {
            input
                .field(via.map(|v| v.raw).unwrap_or_default())
                .field(msg.call_id().unwrap_or_default())
                .field(msg.from_tag().unwrap_or_default())
                .field(msg.to_tag().unwrap_or_default())
                .bytes(&msg.cseq().map_or(0, |c| c.seq).to_le_bytes())
                .field(msg.request_uri().map(|u| u.raw).unwrap_or_default());
        }
    }
    let txn = input.finish();
    let mut out = [0u8; BRANCH_LEN];
    let (prefix, rest) = out.split_at_mut(PROXY_BRANCH_PREFIX.len());
    prefix.copy_from_slice(PROXY_BRANCH_PREFIX);
    let (tag_part, rest) = rest.split_at_mut(TAG_LEN);
    tag_part.copy_from_slice(tag);
    let (txn_part, loop_part) = rest.split_at_mut(TXN_HEX);
    hex_into(txn_part, txn);
    hex_into(loop_part, u64::from(loop_hash(msg, tag)));
    out
}

fn loop_hash(msg: &SipMessage, tag: &[u8; TAG_LEN]) -> u32 {
    let mut input = HashInput::new(LOOP_KEYS);
    input
        .field(tag)
        .field(msg.request_uri().map(|u| u.raw).unwrap_or_default())
        .field(msg.call_id().unwrap_or_default())
        .field(msg.from_tag().unwrap_or_default())
        .bytes(&msg.cseq().map_or(0, |c| c.seq).to_le_bytes());
    // The low half: 8 hex digits.
    #[allow(clippy::cast_possible_truncation)]
    let low = input.finish() as u32;
    low
}

/// Finds [`PROXY_BRANCH_PREFIX`] (a constant, built on first use).
static BRANCH_PREFIX_FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(PROXY_BRANCH_PREFIX));

/// Whether `msg`, about to be forwarded with `branch`, has been through
/// this balancer towards the same backend unchanged: a loop (RFC 3261
/// §16.3 step 4). Costs one substring search unless it has.
pub fn is_loop(msg: &SipMessage, branch: &[u8]) -> bool {
    if branch.len() != BRANCH_LEN {
        return false;
    }
    let (head, loop_part) = (
        &branch[..PROXY_BRANCH_PREFIX.len() + TAG_LEN],
        &branch[branch.len() - LOOP_HEX..],
    );
    // The prefix searcher is built once (building one per message cost
    // as much as the search); then each hit is checked for the tag.
    let bytes = &msg.bytes()[..];
    let tag_follows = BRANCH_PREFIX_FINDER
        .find_iter(bytes)
        .any(|at| bytes[at..].starts_with(head));
    if !tag_follows {
        return false;
    }
    msg.vias().any(|v| {
        v.branch.is_some_and(|vb| {
            vb.len() == BRANCH_LEN
                && vb[..head.len()].eq_ignore_ascii_case(head)
                && vb[vb.len() - LOOP_HEX..].eq_ignore_ascii_case(loop_part)
        })
    })
}

/// A Record-Route (or Route) URI of ours for `side`, carrying `tag`.
pub fn record_route_uri(side: Side, tag: &[u8]) -> String {
    let mut out = Vec::with_capacity(64);
    push_record_route(&mut out, side, tag);
    String::from_utf8_lossy(&out).into_owned()
}

/// Appends [`record_route_uri`] to `out`.
fn push_record_route(out: &mut Vec<u8>, side: Side, tag: &[u8]) {
    let transport: &[u8] = match side.transport {
        Transport::Udp => b"",
        Transport::Tcp => b";transport=tcp",
        Transport::Tls => b";transport=tls",
        Transport::Sctp => b";transport=sctp",
        Transport::Ws | Transport::Wss => b";transport=ws",
    };
    out.extend_from_slice(b"<sip:");
    push_socket_addr(out, side.addr);
    out.extend_from_slice(transport);
    out.extend_from_slice(b";lr;");
    out.extend_from_slice(TAG_PARAM.as_bytes());
    out.push(b'=');
    out.extend_from_slice(tag);
    out.push(b'>');
}

// Text of numbers and addresses for the headers the proxy writes, as their
// `Display` would give it, without the formatting machinery or a `String`
// per value on the per-message path (IPv6 takes the standard path).

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends `ip` as `IpAddr`'s `Display` writes it.
fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_decimal(out, u64::from(octet));
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// Appends `addr` as `SocketAddr`'s `Display` writes it.
fn push_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            push_ip(out, IpAddr::V4(*v4.ip()));
            out.push(b':');
            push_decimal(out, u64::from(v4.port()));
        }
        SocketAddr::V6(v6) => {
            use std::io::Write as _;
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{v6}");
        }
    }
}

/// Records where a request really came from in its top Via (RFC 3261
/// §18.2.1, RFC 3581): `received` when the sent-by is not the source or
/// `rport` was asked, `rport` filled when asked.
pub fn mark_received(rw: &mut Rewrite<'_>, msg: &SipMessage, source: SocketAddr) {
    let Some(via) = msg.top_via() else { return };
    let host = via
        .host
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(via.host);
    // Compared as addresses (no text formatting on the common path where
    // the sent-by is the source: an in-dialog request over TCP).
    let sent_by_is_source = host_is_ip(host, source.ip());
    if via.rport.is_none() && sent_by_is_source {
        // The in-dialog common case: nothing to add, nothing to allocate.
        return;
    }
    // One small buffer for both values: the address, then the port.
    let mut text = Vec::with_capacity(48);
    push_ip(&mut text, source.ip());
    let ip_end = text.len();
    if via.rport == Some(None) {
        push_decimal(&mut text, u64::from(source.port()));
        rw.set_top_via_params(&[
            ("received", Some(&text[..ip_end])),
            ("rport", Some(&text[ip_end..])),
        ]);
    } else {
        // rport given a value already, or none asked: received only.
        rw.set_top_via_param("received", Some(&text));
    }
}

/// Whether `host` (a Via sent-by host, brackets removed) is the text of
/// `ip`, with the answers of `str::parse::<IpAddr>`: an IPv4 sent-by is
/// compared octet by octet without building a string (the per-request case),
/// anything else goes through the standard parser.
fn host_is_ip(host: &[u8], ip: std::net::IpAddr) -> bool {
    if let std::net::IpAddr::V4(v4) = ip {
        // Dotted decimal as the standard parser accepts it: four octets of
        // one to three digits, no leading zero, each at most 255; one pass.
        let want = v4.octets();
        let (mut part, mut value, mut digits, mut first) = (0usize, 0u16, 0usize, 0u8);
        for &b in host {
            match b {
                b'0'..=b'9' => {
                    if digits == 0 {
                        first = b;
                    }
                    digits += 1;
                    if digits > 3 || (digits > 1 && first == b'0') {
                        return false;
                    }
                    value = value * 10 + u16::from(b - b'0');
                }
                b'.' if digits > 0 && part < 3 && value == u16::from(want[part]) => {
                    part += 1;
                    (value, digits) = (0, 0);
                }
                _ => return false,
            }
        }
        return part == 3 && digits > 0 && value == u16::from(want[3]);
    }
    std::str::from_utf8(host)
        .ok()
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        == Some(ip)
}

/// The values of every Route header, split at the commas between entries
/// (not those inside quotes or `<>`), in order, trimmed.
pub fn route_entries(msg: &SipMessage) -> Vec<&[u8]> {
    let mut out = Vec::new();
    for value in msg.headers("Route") {
        let (mut start, mut quoted, mut angle, mut i) = (0, false, false, 0);
        while i < value.len() {
            match value[i] {
                b'\\' if quoted => i += 1,
                b'"' if !angle => quoted = !quoted,
                b'<' if !quoted => angle = true,
                b'>' if !quoted => angle = false,
                b',' if !quoted && !angle => {
                    out.push(value[start..i].trim_ascii());
                    start = i + 1;
                }
                _ => {}
            }
            i += 1;
        }
        out.push(value[start.min(value.len())..].trim_ascii());
    }
    out.retain(|e| !e.is_empty());
    out
}

/// How many leading Route entries (at most two, RFC 5658) `is_ours` claims.
pub fn own_routes(entries: &[&[u8]], is_ours: impl Fn(&Uri<'_>) -> bool) -> usize {
    entries
        .iter()
        .take(2)
        .take_while(|e| NameAddr::parse(e).is_some_and(|na| is_ours(&na.uri)))
        .count()
}

/// The address a URI names, if its host is an IP address (the core
/// resolves no names); the port defaults per scheme and transport.
pub fn uri_addr(uri: &Uri<'_>) -> Option<(Transport, SocketAddr)> {
    if !uri.is_sip() {
        return None;
    }
    let sips = uri.scheme.eq_ignore_ascii_case(b"sips");
    let transport = match uri.param("transport").flatten() {
        None if sips => Transport::Tls,
        None => Transport::Udp,
        Some(t) => Transport::from_via_token(t)?,
    };
    let ip = parse_ip(uri.host)?;
    Some((
        transport,
        SocketAddr::new(ip, uri.port.unwrap_or(transport.default_port())),
    ))
}

fn parse_ip(host: &[u8]) -> Option<IpAddr> {
    let h = host
        .strip_prefix(b"[")
        .and_then(|h| h.strip_suffix(b"]"))
        .unwrap_or(host);
    std::str::from_utf8(h).ok()?.parse().ok()
}

/// The request as forwarded (see the module doc). Viaduct's own headers
/// from outside are removed; everything else is kept byte for byte.
pub fn forward_request(msg: &SipMessage, f: &Forward<'_>) -> Bytes {
    let mut rw = Rewrite::new(msg);
    // The rewrite copies each value: one buffer serves them all in turn.
    let mut text = Vec::with_capacity(160);
    text.extend_from_slice(b"SIP/2.0/");
    text.extend_from_slice(f.egress.transport.as_str().as_bytes());
    text.push(b' ');
    push_socket_addr(&mut text, f.egress.addr);
    text.extend_from_slice(b";branch=");
    text.extend_from_slice(f.branch);
    text.push(b';');
    text.extend_from_slice(CONN_PARAM.as_bytes());
    text.push(b'=');
    push_decimal(&mut text, f.conn);
    rw.insert_header("Via", &text);
    if f.record_route {
        text.clear();
        push_record_route(&mut text, f.egress, f.tag);
        rw.insert_header("Record-Route", &text);
        if f.ingress != f.egress {
            text.clear();
            push_record_route(&mut text, f.ingress, f.tag);
            rw.insert_header("Record-Route", &text);
        }
    }
    let max_forwards = msg
        .max_forwards()
        .map_or(DEFAULT_MAX_FORWARDS, |n| n.saturating_sub(1));
    if msg.max_forwards().is_some() {
        rw.remove_headers("Max-Forwards");
    }
    text.clear();
    push_decimal(&mut text, u64::from(max_forwards));
    rw.insert_header("Max-Forwards", &text);
    if msg.has_viaduct_headers() {
        rw.remove_headers_with_prefix("X-Viaduct-");
    }
    if let Some(old) = f.failover {
        rw.insert_header(super::router::FAILOVER_HEADER, old);
    }
    mark_received(&mut rw, msg, f.source);
    let remaining;
    if f.own_routes > 0 {
        rw.remove_headers("Route");
        if let Some(rest) = f.routes.get(f.own_routes..).filter(|r| !r.is_empty()) {
            remaining = rest.join(&b", "[..]);
            rw.insert_header("Route", &remaining);
        }
    }
    rw.finish()
}

/// Where a response to a request we forwarded goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHop {
    /// The next Via's transport.
    pub transport: Transport,
    /// `received`/`rport`, else the sent-by.
    pub to: SocketAddr,
    /// The connection (or socket) the request came in on, from our Via.
    pub conn: Option<ConnId>,
}

/// Where a response whose top Via is ours goes (RFC 3261 §18.2.2, RFC
/// 3581), or why it cannot.
pub fn response_hop(msg: &SipMessage) -> Result<ResponseHop, &'static str> {
    let ours = msg.top_via().ok_or("no Via")?;
    let conn = ours
        .param(CONN_PARAM)
        .flatten()
        .and_then(|c| std::str::from_utf8(c).ok()?.parse().ok());
    let next = msg.second_via().ok_or("no Via below ours")?;
    let transport = Transport::from_via_token(next.transport).ok_or("unknown Via transport")?;
    let ip = match next.received {
        Some(r) => parse_ip(r).ok_or("Via received is not an IP address")?,
        None => parse_ip(next.host).ok_or("Via sent-by is a name (not resolved here)")?,
    };
    let port = match next.rport {
        Some(Some(p)) => p,
        _ => next.port.unwrap_or(transport.default_port()),
    };
    Ok(ResponseHop {
        transport,
        to: SocketAddr::new(ip, port),
        conn,
    })
}

/// The response without its top Via.
pub fn pop_via(msg: &SipMessage) -> Bytes {
    Rewrite::new(msg).remove_top_via().finish()
}

/// The affinity tag in a stateless branch of ours, if it is one.
pub fn branch_tag(branch: &[u8]) -> Option<&[u8]> {
    let rest = branch.strip_prefix(PROXY_BRANCH_PREFIX)?;
    rest.get(..TAG_LEN)
}

/// The branch of probe `seq` of `backend`.
pub fn probe_branch(backend: BackendId, seq: u64) -> String {
    let mut out = String::with_capacity(PROBE_BRANCH_PREFIX.len() + 20);
    out.push_str("z9hG4bK-vq");
    hex(&mut out, u64::from(backend), 4);
    hex(&mut out, seq, 16);
    out
}

/// The backend and sequence number of a probe branch.
pub fn parse_probe_branch(branch: &[u8]) -> Option<(BackendId, u64)> {
    let rest = branch.strip_prefix(PROBE_BRANCH_PREFIX)?;
    if rest.len() != 20 {
        return None;
    }
    let num = |d: &[u8]| u64::from_str_radix(std::str::from_utf8(d).ok()?, 16).ok();
    let backend = BackendId::try_from(num(&rest[..4])?).ok()?;
    Some((backend, num(&rest[4..])?))
}

/// An OPTIONS probe of `backend` at `target`, sent from `via`.
pub fn probe_request(target: Side, via: Side, backend: BackendId, seq: u64) -> Bytes {
    let transport = match target.transport {
        Transport::Udp => "",
        _ => ";transport=tcp",
    };
    let branch = probe_branch(backend, seq);
    let text = format!(
        "OPTIONS sip:{target}{transport} SIP/2.0\r\n\
         Via: SIP/2.0/{t} {via};branch={branch}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:viaduct@{via}>;tag=vq{backend:04x}\r\n\
         To: <sip:{target}{transport}>\r\n\
         Call-ID: {branch}@viaduct\r\n\
         CSeq: {cseq} OPTIONS\r\n\
         User-Agent: viaduct\r\n\
         Content-Length: 0\r\n\r\n",
        target = target.addr,
        t = via.transport.as_str(),
        via = via.addr,
        cseq = seq.saturating_sub(1) % 0x7fff_ffff + 1,
    );
    let mut b = BytesMut::with_capacity(text.len());
    b.extend_from_slice(text.as_bytes());
    b.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(s: &str) -> SipMessage {
        SipMessage::parse(Bytes::copy_from_slice(s.as_bytes())).unwrap()
    }

    /// Branches must not change between releases: during a rolling
    /// upgrade a retransmission, CANCEL or ACK may reach a replica of the
    /// other version, which must give it the INVITE's branch. These values
    /// were computed by the first release's code.
    #[test]
    fn stateless_branches_are_stable_across_releases() {
        let tag = b"0123456789abcdef0";
        let rfc3261 = msg("INVITE sip:svc@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7:5070;branch=z9hG4bK-client-1;rport\r\nFrom: <sip:a@b>;tag=f1\r\nTo: <sip:svc@192.0.2.1>\r\nCall-ID: c1@h\r\nCSeq: 7 INVITE\r\nl: 0\r\n\r\n");
        let rfc2543 = msg("INVITE sip:svc@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 198.51.100.7\r\nFrom: <sip:a@b>;tag=f1\r\nTo: <sip:svc@192.0.2.1>;tag=t9\r\nCall-ID: c1@h\r\nCSeq: 7 INVITE\r\nl: 0\r\n\r\n");
        let got = [
            stateless_branch(&rfc3261, tag),
            stateless_branch(&rfc2543, tag),
        ];
        let got: Vec<&str> = got
            .iter()
            .map(|b| std::str::from_utf8(b.as_ref()).unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "z9hG4bK-vp0123456789abcdef05c68597ff853466d65a0741c",
                "z9hG4bK-vp0123456789abcdef0548d2ca1fdc971f065a0741c"
            ]
        );
    }

    /// The buffered input hashes as the fields written one by one
    /// (`write_usize` then `write`, as the first release did), whatever
    /// the lengths around the 128-byte buffer: flushes, exact fills and
    /// fields longer than the buffer.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn hash_input_is_the_field_by_field_hash() {
        let data: Vec<u8> = (0..700u32).map(|i| (i * 7 + 3) as u8).collect();
        let lens = [
            0, 1, 7, 8, 60, 111, 112, 119, 120, 121, 127, 128, 129, 135, 136, 200, 300,
        ];
        for &a in &lens {
            for &b in &lens {
                let (x, y) = (&data[..a], &data[a..a + b]);
                let mut h = SipHasher13::new_with_keys(BRANCH_KEYS.0, BRANCH_KEYS.1);
                h.write_usize(x.len());
                h.write(x);
                h.write_u16(5060);
                h.write_usize(y.len());
                h.write(y);
                h.write_u32(7);
                let mut input = HashInput::new(BRANCH_KEYS);
                input
                    .field(x)
                    .bytes(&5060u16.to_le_bytes())
                    .field(y)
                    .bytes(&7u32.to_le_bytes());
                assert_eq!(input.finish(), h.finish(), "fields of {a} and {b} bytes");
            }
        }
    }

    #[test]
    fn host_is_ip_answers_as_the_standard_parser() {
        let ips: Vec<std::net::IpAddr> = ["10.0.0.1", "192.168.100.255", "0.0.0.0", "::1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let hosts = [
            "10.0.0.1",
            "10.0.0.01",
            "010.0.0.1",
            "10.0.0",
            "10.0.0.1.",
            "10.0.0.1.5",
            "10..0.1",
            "10.0.0.256",
            "192.168.100.255",
            "0.0.0.0",
            "00.0.0.0",
            "1e.0.0.0",
            "10.0.0.1 ",
            "",
            "::1",
            "0:0:0:0:0:0:0:1",
            "host.example.com",
            "+1.0.0.0",
            "1000.0.0.1",
            "10.0.0.-1",
        ];
        for ip in &ips {
            for host in hosts {
                let by_std = host.parse::<std::net::IpAddr>().ok() == Some(*ip);
                assert_eq!(host_is_ip(host.as_bytes(), *ip), by_std, "{host:?} vs {ip}");
            }
        }
        // Every octet width against its neighbours.
        let octets = [0u8, 1, 9, 10, 99, 100, 199, 200, 254, 255];
        for a in octets {
            for b in octets {
                let ip = std::net::IpAddr::from([a, b, 255 - a, b]);
                let other = std::net::IpAddr::from([a, b, 255 - a, b ^ 1]);
                let text = ip.to_string();
                assert!(host_is_ip(text.as_bytes(), ip), "{text}");
                assert!(!host_is_ip(text.as_bytes(), other), "{text} vs {other}");
            }
        }
    }

    #[test]
    fn route_entries_split_at_top_level_commas_only() {
        let m = msg("BYE sip:a@b SIP/2.0\r\nRoute: <sip:x;lr>, \"a,b\" <sip:y;lr>\r\nRoute: <sip:z?h=1,2>\r\nl: 0\r\n\r\n");
        assert_eq!(
            route_entries(&m),
            [&b"<sip:x;lr>"[..], b"\"a,b\" <sip:y;lr>", b"<sip:z?h=1,2>"]
        );
    }

    #[test]
    fn probe_branches_read_back() {
        let b = probe_branch(0xbeef, 42);
        assert_eq!(parse_probe_branch(b.as_bytes()), Some((0xbeef, 42)));
        assert_eq!(parse_probe_branch(b"z9hG4bK-vqzz"), None);
    }

    #[test]
    fn uri_addresses_need_an_ip() {
        let u = Uri::parse(b"sip:10.0.0.1:5080;transport=TCP;lr").unwrap();
        assert_eq!(
            uri_addr(&u),
            Some((Transport::Tcp, "10.0.0.1:5080".parse().unwrap()))
        );
        let u = Uri::parse(b"sip:host.example.com").unwrap();
        assert_eq!(uri_addr(&u), None);
        let u = Uri::parse(b"sip:[2001:db8::1]").unwrap();
        assert_eq!(
            uri_addr(&u),
            Some((Transport::Udp, "[2001:db8::1]:5060".parse().unwrap()))
        );
    }
}
