//! RFC 4475 / RFC 5118 torture messages and real call flows through the
//! framers and the scanner, with the expected handling of every file
//! (see `conformance/corpus/rfc4475/README.md`).

// Test helpers too: a panic here is a test failure with its message.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use encap_proto::sip::checks::{self, assert_cached_agree};
use encap_proto::sip::{
    frame_datagram, Framed, FramingError, Limits, SipMessage, StartLine, StreamFramer,
};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/corpus");

fn read(rel: &str) -> Bytes {
    let p = Path::new(CORPUS).join(rel);
    Bytes::from(std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
}

fn sip_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sip_files(&p));
        } else if p.extension().is_some_and(|x| x == "sip") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn datagram(b: &Bytes) -> Result<Bytes, FramingError> {
    match frame_datagram(b.clone(), &Limits::default())? {
        Framed::Message(m) => Ok(m),
        other => panic!("not a message: {other:?}"),
    }
}

/// All units a stream holding exactly `b` yields, and the error ending it.
fn stream(b: &[u8]) -> (Vec<Framed>, Option<FramingError>) {
    let mut f = StreamFramer::new(Limits::default());
    let mut buf = BytesMut::from(b);
    let mut out = vec![];
    loop {
        match f.decode_eof(&mut buf) {
            Ok(Some(x)) => out.push(x),
            Ok(None) => return (out, None),
            Err(e) => return (out, Some(e)),
        }
    }
}

fn s(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OnStream {
    /// The file is exactly one stream message.
    Whole,
    /// No Content-Length: a stream cannot frame it (fine over UDP).
    MissingContentLength,
    /// Trailing bytes after the Content-Length body (dblreq): they start another message.
    Trailing,
}

struct Valid {
    file: &'static str,
    call_id: &'static str,
    via_host: &'static str,
    via_port: Option<u16>,
    transport: &'static str,
    branch: Option<&'static str>,
    on_stream: OnStream,
}

const fn v(
    file: &'static str,
    call_id: &'static str,
    via_host: &'static str,
    via_port: Option<u16>,
    transport: &'static str,
    branch: Option<&'static str>,
) -> Valid {
    Valid {
        file,
        call_id,
        via_host,
        via_port,
        transport,
        branch,
        on_stream: OnStream::Whole,
    }
}

const KD: Option<&str> = Some("z9hG4bKkdjuw");

#[rustfmt::skip]
const VALID: &[Valid] = &[
    v("badbranch", "badbranch.sadonfo23i420jv0as0derf3j3n", "192.0.2.1", None, "UDP", Some("z9hG4bK")),
    v("bcast", "bcast.0384840201234ksdfak3j2erwedfsASdf", "192.0.2.198", None, "UDP", Some("z9hG4bK1324923")),
    v("bext01", "bext01.0ha0isndaksdj", "fold-and-staple.example.com", None, "TLS", KD),
    v("cparam01", "cparam01.70710@saturn.example.com", "saturn.example.com", Some(5060), "UDP", KD),
    v("cparam02", "cparam02.70710@saturn.example.com", "saturn.example.com", Some(5060), "UDP", KD),
    Valid { on_stream: OnStream::Trailing, ..v("dblreq", "dblreq.0ha0isndaksdj99sdfafnl3lk233412", "192.0.2.125", None, "UDP", Some("z9hG4bKkdjuw23492")) },
    v("esc01", "esc01.239409asdfakjkn23onasd0-3234", "host5.example.net", None, "UDP", KD),
    v("esc02", "esc02.asdfnqwo34rq23i34jrjasdcnl23nrlknsdf", "host.example.com", None, "TCP", Some("z9hG4bK209%fzsnel234")),
    v("escnull", "escnull.39203ndfvkjdasfkq3w4otrq0adsfdfnavd", "host5.example.com", None, "UDP", KD),
    v("intmeth", "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{", "host1.example.com", None, "TCP", Some("z9hG4bK-.!%66*_+`'~")),
    Valid { on_stream: OnStream::MissingContentLength, ..v("inv2543", "inv2543.1717@ift.client.example.com", "iftgw.example.com", None, "UDP", None) },
    v("invut", "invut.0ha0isndaksdjadsfij34n23d", "somehost.example.com", None, "UDP", KD),
    v("longreq", "longreq.onereallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallyreallylongcallid", "sip33.example.com", None, "TCP", None),
    v("lwsdisp", "lwsdisp.1234abcd@funky.example.com", "funky.example.com", None, "UDP", KD),
    v("mpart01", "3d9485ad0c49859b@Zmx1ZmZ5LW1hYy0xNi5sb2NhbA..", "127.0.0.1", Some(5070), "UDP", Some("z9hG4bK-d87543-4dade06d0bdb11ee-1--d87543-")),
    v("noreason", "noreason.asndj203insdf99223ndf", "192.0.2.105", None, "UDP", Some("z9hG4bK2398ndaoe")),
    v("novelsc", "novelsc.asdfasser0q239nwsdfasdkl34", "host9.example.com", None, "TCP", Some("z9hG4bKkdjuw39234")),
    v("regaut01", "regaut01.0ha0isndaksdj", "192.0.2.253", None, "TCP", KD),
    v("regescrt", "regescrt.k345asrl3fdbv@192.0.2.1", "host5.example.com", None, "UDP", KD),
    v("sdp01", "sdp01.ndaksdj9342dasdd", "192.0.2.15", None, "UDP", KD),
    v("semiuri", "semiuri.0ha0isndaksdj", "192.0.2.1", None, "UDP", KD),
    v("transports", "transports.kijh4akdnaqjkwendsasfdj", "t1.example.com", None, "UDP", KD),
    v("unkscm", "unkscm.nasdfasser0q239nwsdfasdkl34", "host9.example.com", None, "TCP", Some("z9hG4bKkdjuw39234")),
    v("unksm2", "unksm2.daksdj@hyphenated-host.example.com", "192.0.2.21", Some(5060), "UDP", KD),
    v("unreason", "unreason.1234ksdfak3j2erwedfsASdf", "192.0.2.198", None, "UDP", Some("z9hG4bK1324923")),
    v("wsinv", "wsinv.ndaksdj@192.0.2.1", "192.0.2.2", None, "UDP", Some("390skdjuw")),
    v("zeromf", "zeromf.jfasdlfnm2o2l43r5u0asdfas", "host1.example.com", None, "UDP", Some("z9hG4bKkdjuw2349i")),
];

#[test]
fn every_valid_rfc4475_message_frames_and_scans() {
    let files = sip_files(&Path::new(CORPUS).join("rfc4475/valid"));
    assert_eq!(files.len(), VALID.len(), "table covers every valid file");
    for t in VALID {
        let raw = read(&format!("rfc4475/valid/{}.sip", t.file));
        let m = datagram(&raw).unwrap_or_else(|e| panic!("{}: {e}", t.file));
        let msg = SipMessage::parse(m.clone()).unwrap_or_else(|e| panic!("{}: {e}", t.file));
        msg.validate()
            .unwrap_or_else(|e| panic!("{}: validate: {e}", t.file));
        assert_cached_agree(&msg);
        assert_eq!(msg.call_id().map(s), Some(t.call_id), "{}", t.file);
        let via = msg
            .top_via()
            .unwrap_or_else(|| panic!("{}: no Via", t.file));
        assert_eq!(s(via.host), t.via_host, "{}", t.file);
        assert_eq!(via.port, t.via_port, "{}", t.file);
        assert_eq!(s(via.transport), t.transport, "{}", t.file);
        assert_eq!(via.branch.map(s), t.branch, "{}", t.file);
        assert!(msg.cseq().is_some(), "{}", t.file);

        let (units, err) = stream(&raw);
        match t.on_stream {
            OnStream::Whole => {
                assert_eq!(
                    (units, err),
                    (vec![Framed::Message(raw.clone())], None),
                    "{}",
                    t.file
                );
            }
            OnStream::MissingContentLength => {
                assert_eq!(err, Some(FramingError::MissingContentLength), "{}", t.file)
            }
            OnStream::Trailing => {
                assert_eq!(
                    units.first(),
                    Some(&Framed::Message(m.clone())),
                    "{}",
                    t.file
                );
                assert!(m.len() < raw.len(), "{}", t.file);
            }
        }
    }
}

#[test]
fn rfc4475_details() {
    let p = |f: &str| SipMessage::parse(datagram(&read(f)).unwrap()).unwrap();
    // wsinv: folded, spaced, compact, mixed-case headers.
    let m = p("rfc4475/valid/wsinv.sip");
    assert_eq!(m.max_forwards(), Some(68));
    assert_eq!(m.cseq().map(|c| (c.seq, s(c.method))), Some((9, "INVITE")));
    assert_eq!(m.to_tag().map(s), Some("1918181833n"));
    assert_eq!(m.from_tag().map(s), Some("98asjd8"));
    assert_eq!(m.content_length(), Some(150));
    assert_eq!(m.body().len(), 150);
    let vias: Vec<_> = m.vias().map(|v| (s(v.transport), s(v.host))).collect();
    assert_eq!(
        vias,
        [
            ("UDP", "192.0.2.2"),
            ("TCP", "spindle.example.com"),
            ("UDP", "192.168.255.111")
        ]
    );
    assert_eq!(
        m.vias().nth(2).and_then(|v| v.branch).map(s),
        Some("z9hG4bK30239")
    );
    assert_eq!(
        m.top_route().map(|r| s(r.uri.host)),
        Some("services.example.com")
    );
    assert_eq!(m.header("subject"), Some(&b""[..]));
    // semiuri: ';' inside the user part.
    let m = p("rfc4475/valid/semiuri.sip");
    let u = m.request_uri().unwrap();
    assert_eq!(u.user.map(s), Some("user;par=u%40example.net"));
    assert_eq!(s(u.host), "example.com");
    // cparam01: addr-spec Contact, ;unknownparam is a header param.
    let m = p("rfc4475/valid/cparam01.sip");
    let c = m.contact().unwrap();
    assert_eq!(c.param("unknownparam"), Some(None));
    assert_eq!(c.uri.param("unknownparam"), None);
    // cparam02: inside <>, it is a URI param.
    let m = p("rfc4475/valid/cparam02.sip");
    let c = m.contact().unwrap();
    assert_eq!(c.uri.param("unknownparam"), Some(None));
    assert_eq!(c.param("unknownparam"), None);
    // dblreq: trailing octets dropped on a datagram.
    let m = p("rfc4475/valid/dblreq.sip");
    assert_eq!(m.method(), Some(&b"REGISTER"[..]));
    assert!(m.body().is_empty());
    // unreason / noreason.
    let m = p("rfc4475/valid/unreason.sip");
    assert!(matches!(
        m.start_line(),
        StartLine::Response { code: 200, .. }
    ));
    let m = p("rfc4475/valid/noreason.sip");
    assert_eq!(
        m.start_line(),
        StartLine::Response {
            code: 100,
            reason: b"",
            version: b"SIP/2.0"
        }
    );
    // esc02: C%6Fntact is another header, not Contact.
    let m = p("rfc4475/valid/esc02.sip");
    assert_eq!(m.headers("contact").count(), 2);
    assert_eq!(m.headers("C%6Fntact").count(), 1);
    // mpart01: binary body framed by Content-Length.
    let m = p("rfc4475/valid/mpart01.sip");
    assert_eq!(m.body().len(), m.content_length().unwrap());
    // badbranch: bare magic cookie is syntactically fine.
    assert_eq!(
        p("rfc4475/valid/badbranch.sip").top_via().unwrap().branch,
        Some(&b"z9hG4bK"[..])
    );
    // zeromf: Max-Forwards 0 scans; the router answers 483.
    assert_eq!(p("rfc4475/valid/zeromf.sip").max_forwards(), Some(0));
}

/// How an invalid message is handled.
enum Expect {
    /// Datagram framing fails with this error (Debug name).
    Frame(&'static str),
    /// Framing succeeds, the scan fails and the error's text contains this.
    Scan(&'static str),
    /// Framing and scan succeed (the routing fields are read), and
    /// `SipMessage::validate` fails with an error whose text contains this.
    Validate(&'static str),
    /// Framing and scan succeed; the router rejects on this property (checked).
    Router(&'static str, fn(&SipMessage) -> bool),
}

fn version(m: &SipMessage) -> &[u8] {
    match m.start_line() {
        StartLine::Request { version, .. } | StartLine::Response { version, .. } => version,
    }
}

#[rustfmt::skip]
const INVALID: &[(&str, Expect)] = &[
    ("badaspec", Expect::Validate("malformed To header (line 5): whitespace inside '<>'")),
    ("baddate", Expect::Router("Date is not used for routing; only an element that needs Date rejects it",
        |m| m.header("Date").is_some_and(|d| d.ends_with(b"EST")))),
    ("baddn", Expect::Frame("UnterminatedHeaders")),
    ("badinv01", Expect::Scan("malformed Via header (line 7): empty parameter name")),
    ("badvers", Expect::Router("505: version is not SIP/2.0", |m| version(m) == b"SIP/7.0")),
    ("bigcode", Expect::Scan("invalid SIP start line: status code is not 3 digits")),
    ("clerr", Expect::Frame("Truncated")),
    ("escruri", Expect::Router("400: Request-URI carries headers", |m| m.request_uri().is_some_and(|u| u.headers.is_some()))),
    ("insuf", Expect::Router("400: no Call-ID, From, To", |m| m.call_id().is_none() && m.from().is_none() && m.to().is_none())),
    ("ltgtruri", Expect::Scan("invalid Request-URI in the request line")),
    ("lwsruri", Expect::Scan("invalid SIP start line: extra SP")),
    ("lwsstart", Expect::Scan("invalid SIP start line: more than one SP")),
    ("mcl01", Expect::Frame("ConflictingContentLength")),
    ("mismatch01", Expect::Router("400: CSeq method differs from the request method", |m| m.cseq().map(|c| c.method) != m.method())),
    ("mismatch02", Expect::Router("501 (or 400): CSeq method differs from the unknown method", |m| m.cseq().map(|c| c.method) != m.method())),
    ("multi01", Expect::Scan("single-valued CSeq header repeated with a different value")),
    ("ncl", Expect::Frame("InvalidContentLength")),
    ("quotbal", Expect::Validate("malformed To header (line 2): unterminated quoted string")),
    ("regbadct", Expect::Validate("malformed Contact header (line 8)")),
    ("scalar02", Expect::Scan("malformed CSeq header (line 5): sequence number exceeds 2^32-1")),
    ("scalarlg", Expect::Scan("malformed CSeq header (line 5): sequence number exceeds 2^32-1")),
    ("trws", Expect::Scan("invalid SIP start line: extra SP")),
];

fn check(file: &str, expect: &Expect) {
    let raw = read(file);
    let framed = datagram(&raw);
    match expect {
        Expect::Frame(name) => {
            let e = framed.expect_err(file);
            assert!(format!("{e:?}").starts_with(name), "{file}: {e:?}");
        }
        Expect::Scan(text) => {
            let m = framed.unwrap_or_else(|e| panic!("{file}: {e}"));
            let e = SipMessage::parse(m).expect_err(file);
            assert!(e.to_string().contains(text), "{file}: {e}");
        }
        Expect::Validate(text) => {
            let m = framed.unwrap_or_else(|e| panic!("{file}: {e}"));
            let m = SipMessage::parse(m).unwrap_or_else(|e| panic!("{file}: {e}"));
            let e = m.validate().expect_err(file);
            assert!(e.to_string().contains(text), "{file}: {e}");
        }
        Expect::Router(why, prop) => {
            let m = framed.unwrap_or_else(|e| panic!("{file}: {e}"));
            let m = SipMessage::parse(m).unwrap_or_else(|e| panic!("{file}: {e}"));
            m.validate()
                .unwrap_or_else(|e| panic!("{file}: validate: {e}"));
            assert!(prop(&m), "{file}: property for {why:?} does not hold");
        }
    }
}

#[test]
fn every_invalid_rfc4475_message_is_caught() {
    let files = sip_files(&Path::new(CORPUS).join("rfc4475/invalid"));
    assert_eq!(
        files.len(),
        INVALID.len(),
        "table covers every invalid file"
    );
    for (name, expect) in INVALID {
        check(&format!("rfc4475/invalid/{name}.sip"), expect);
    }
    // Not described by the RFC: no SIP version in the request line.
    check(
        "rfc4475/extra/test.sip",
        &Expect::Scan("invalid SIP start line: request line has no SIP version"),
    );
    // baddn with its empty line: the unquoted display name with a comma fails.
    check(
        "rfc4475/variants/baddn-with-terminating-crlf.sip",
        &Expect::Validate("malformed From header (line 4)"),
    );
}

#[test]
fn invalid_framing_on_streams() {
    // ncl and mcl01 are unrecoverable on a stream; clerr waits for more, then is truncated.
    let (_, e) = stream(&read("rfc4475/invalid/ncl.sip"));
    assert!(matches!(e, Some(FramingError::InvalidContentLength { .. })));
    let (_, e) = stream(&read("rfc4475/invalid/mcl01.sip"));
    assert_eq!(
        e,
        Some(FramingError::ConflictingContentLength {
            first: 13,
            second: 5
        })
    );
    let raw = read("rfc4475/invalid/clerr.sip");
    let mut f = StreamFramer::new(Limits::default());
    let mut buf = BytesMut::from(&raw[..]);
    assert_eq!(f.decode(&mut buf), Ok(None));
    assert!(matches!(
        f.decode_eof(&mut buf),
        Err(FramingError::Truncated { .. })
    ));
}

#[test]
fn no_input_panics_even_truncated_at_every_length() {
    let mut files = sip_files(&Path::new(CORPUS).join("rfc4475"));
    files.extend(sip_files(&Path::new(CORPUS).join("rfc5118")));
    assert!(files.len() > 60);
    for p in files {
        let raw = Bytes::from(std::fs::read(&p).unwrap());
        for n in 0..=raw.len() {
            let cut = raw.slice(..n);
            let _ = stream(&cut);
            if let Ok(Framed::Message(m)) = frame_datagram(cut.clone(), &Limits::default()) {
                exercise(m);
            }
            exercise(cut);
        }
    }
}

/// Scans and, if that works, touches every accessor and rewrites.
fn exercise(b: Bytes) {
    if let Ok(m) = SipMessage::parse(b) {
        checks::exercise(&m);
    }
}

#[test]
fn rfc5118_ipv6_messages() {
    #[rustfmt::skip]
    let table: &[(&str, &str, &str, Option<u16>)] = &[
        ("ipv4-mapped-ipv6", "SSG9559905523997077@hlau_4100", "[::ffff:192.0.2.10]", Some(19823)),
        ("ipv6-bug-abnf-3-colons", "G9559905523997077@hlau_4100", "lab1.east.example.com", None),
        ("ipv6-correct-abnf-2-colons", "G9559905523997077@hlau_4100", "lab1.east.example.com", None),
        ("ipv6-good", "SSG9559905523997077@hlau_4100", "[2001:db8::9:1]", None),
        ("ipv6-in-sdp", "SSG9559905523997077@hlau_4100", "[2001:db8::20]", None),
        ("mult-ip-in-header", "997077@lau_4100", "[2001:db8::9:1]", Some(6050)),
        ("mult-ip-in-sdp", "SSG9559905523997077@hlau_4100", "[2001:db8::9:1]", None),
        ("port-ambiguous", "SSG9559905523997077@hlau_4100", "[2001:db8::9:1]", None),
        ("port-unambiguous", "SSG9559905523997077@hlau_4100", "[2001:db8::9:1]", None),
        ("via-received-param-no-delim", "SSG95523997077@hlau_4100", "[2001:db8::9:1]", None),
        ("via-received-param-with-delim", "SSG9559905523997077@hlau_4100", "[2001:db8::9:1]", None),
    ];
    assert_eq!(
        sip_files(&Path::new(CORPUS).join("rfc5118/wire/valid")).len(),
        table.len()
    );
    for (name, call_id, host, port) in table {
        let raw = read(&format!("rfc5118/wire/valid/{name}.sip"));
        let framed = match datagram(&raw) {
            Ok(m) => m,
            Err(FramingError::Truncated { .. }) if *name == "ipv6-in-sdp" => {
                // RFC 5118 erratum: Content-Length 268 > body; use the corrected copy.
                datagram(&read(&format!("rfc5118/wire-clfixed/{name}.sip"))).unwrap()
            }
            Err(e) => panic!("{name}: {e}"),
        };
        let m = SipMessage::parse(framed).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.call_id().map(s), Some(*call_id), "{name}");
        let via = m.top_via().unwrap();
        assert_eq!((s(via.host), via.port), (*host, *port), "{name}");
    }
    let uri = |f: &str| {
        let m = SipMessage::parse(datagram(&read(f)).unwrap()).unwrap();
        let u = m.request_uri().unwrap();
        (s(u.host).to_owned(), u.port)
    };
    assert_eq!(
        uri("rfc5118/wire/valid/port-ambiguous.sip"),
        ("[2001:db8::10:5070]".into(), None)
    );
    assert_eq!(
        uri("rfc5118/wire/valid/port-unambiguous.sip"),
        ("[2001:db8::10]".into(), Some(5070))
    );
    assert_eq!(
        uri("rfc5118/wire/valid/ipv6-bug-abnf-3-colons.sip").0,
        "[2001:db8:::192.0.2.1]"
    );
    let m = SipMessage::parse(
        datagram(&read(
            "rfc5118/wire/valid/via-received-param-with-delim.sip",
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        m.top_via().unwrap().received.map(s),
        Some("[2001:db8::9:255]")
    );
    let m = SipMessage::parse(
        datagram(&read("rfc5118/wire/valid/via-received-param-no-delim.sip")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        m.top_via().unwrap().received.map(s),
        Some("2001:db8::9:255")
    );
    let m = SipMessage::parse(datagram(&read("rfc5118/wire/valid/mult-ip-in-header.sip")).unwrap())
        .unwrap();
    assert_eq!(
        m.vias().map(|v| s(v.host)).collect::<Vec<_>>(),
        ["[2001:db8::9:1]", "192.0.2.1", "[2001:db8::9:255]"]
    );
    // 4.2: IPv6 without brackets in the Request-URI -> 400.
    check(
        "rfc5118/wire/invalid/ipv6-bad.sip",
        &Expect::Scan("invalid Request-URI in the request line: invalid port"),
    );
}

#[test]
fn call_flows_frame_and_scan() {
    let root = Path::new(CORPUS).join("callflows");
    let files = sip_files(&root);
    assert!(files.len() >= 390, "{}", files.len());
    let mut checked = 0;
    for p in &files {
        let rel = p
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .replace('\\', "/");
        let raw = Bytes::from(std::fs::read(p).unwrap());
        let framed = datagram(&raw);
        if rel.starts_with("rfc3261-s24/24.2-session-setup/")
            && ["001-", "003-", "005-", "009-", "010-", "011-"]
                .iter()
                .any(|n| rel.contains(n))
        {
            // SDP elided in the RFC: Content-Length announces an absent body.
            assert!(
                matches!(framed, Err(FramingError::Truncated { .. })),
                "{rel}: {framed:?}"
            );
            continue;
        }
        let m = framed.unwrap_or_else(|e| panic!("{rel}: {e}"));
        let scanned = SipMessage::parse(m);
        let in_flow = |flow: &str, msgs: &[&str]| {
            rel.strip_prefix(flow)
                .is_some_and(|f| msgs.iter().any(|n| f.starts_with(n)))
        };
        if in_flow(
            "rfc3665/3.10-unsuccessful-no-response-from-user-agent/",
            &["004-", "006-", "007-", "008-", "009-", "010-", "011-"],
        ) {
            // RFC typo: a header line "<sip:ss1...;lr>" with no name.
            let e = scanned.expect_err(&rel);
            assert!(e.to_string().contains("invalid header name"), "{rel}: {e}");
            continue;
        }
        if in_flow("rfc3665/3.9-unsuccessful-busy/", &["006-", "008-", "010-"]) {
            // Printed as "SIP/2.0  486 Busy Here" (two SPs): rejected like lwsstart.
            let e = scanned.expect_err(&rel);
            assert!(e.to_string().contains("status code"), "{rel}: {e}");
            continue;
        }
        let m = scanned.unwrap_or_else(|e| panic!("{rel}: {e}"));
        m.validate()
            .unwrap_or_else(|e| panic!("{rel}: validate: {e}"));
        assert_cached_agree(&m);
        assert!(m.call_id().is_some_and(|c| !c.is_empty()), "{rel}");
        assert!(m.top_via().is_some(), "{rel}");
        assert!(m.cseq().is_some(), "{rel}");
        checked += 1;
    }
    assert_eq!(
        checked,
        files.len() - 16,
        "6 truncated + 7 typos + 3 double-SP"
    );
}
